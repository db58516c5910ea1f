"""CTEG training loop pieces: the length-bucketing batch sampler and the frozen-encoder state cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facelab.families.cteg.loop import BucketBatchSampler

from tolerances import FP32_DECODE, FP32_SHAPES


def test_bucket_sampler_shards_pads_little_and_is_reproducible():
    lengths = np.random.default_rng(0).lognormal(np.log(36), 0.86, size=1000).astype(int) + 1
    samplers = [BucketBatchSampler(lengths, 16, num_replicas=2, rank=r, seed=3, bucket_batches=8) for r in (0, 1)]
    for s in samplers:
        s.set_epoch(1)
    a, b = (list(s) for s in samplers)
    assert len(a) == len(b) == len(samplers[0]) == 1000 // 32
    flat = [i for batch in a + b for i in batch]
    assert len(flat) == len(set(flat)) == 31 * 32  # disjoint shards, incomplete global batch dropped
    assert all(len(x) == 16 for x in a + b)
    padded = sum(16 * max(lengths[i] for i in x) for x in a + b)
    random_batches = np.random.default_rng(0).permutation(1000)[: 31 * 32].reshape(-1, 16)
    assert padded < 0.5 * sum(16 * lengths[x].max() for x in random_batches)  # far less padding than random batches
    for s in samplers:
        s.set_epoch(1)
    assert list(samplers[0]) == a  # same epoch, same batches (resumable)
    samplers[0].set_epoch(2)
    assert list(samplers[0]) != a
    with pytest.raises(ValueError):
        BucketBatchSampler(lengths, 16, num_replicas=2, rank=2)


def test_static_decoding_equals_the_eager_paths():
    """The fixed-shape decoding step (the CUDA-graph path, run here without a graph) gives the frames
    of the eager cached and the full-recomputation paths, stops included."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from facelab.families.cteg.decoding import generate

    from test_cteg_model import GEN_TEXTS, make

    for overrides in (dict(), dict(lta="pooling", cvad_layers=2)):
        model = make(max_frames=24, stop_threshold=0.0, **overrides)
        free = generate(model, GEN_TEXTS, generator=torch.Generator().manual_seed(3))
        v = torch.stack([f.norm(dim=-1) for f in free])[:, 1:].flatten().sort().values
        model.cfg.stop_threshold = float(v[len(v) // 12] + v[len(v) // 12 + 1]) / 2
        eager = generate(model, GEN_TEXTS, generator=torch.Generator().manual_seed(3))
        static = generate(model, GEN_TEXTS, generator=torch.Generator().manual_seed(3), static=True)
        full = generate(model, GEN_TEXTS, generator=torch.Generator().manual_seed(3), use_cache=False)
        assert [len(x) for x in static] == [len(x) for x in eager] == [len(x) for x in full]
        assert len({len(x) for x in static}) >= 2
        for s, e, f in zip(static, eager, full):
            torch.testing.assert_close(s, e, **FP32_DECODE)
            torch.testing.assert_close(s, f, **FP32_DECODE)


def test_text_state_cache_gives_the_encoder_states():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from facelab.families.cteg.model import TextStateCache

    from test_cteg_model import TEXTS, batch, make

    model = make().eval()
    mem, pad = model.encode_text(TEXTS)
    frames, lengths = batch()
    torch.manual_seed(0)
    loss = model(TEXTS, frames, lengths)["loss"]
    model.text_cache = TextStateCache()
    model.encode_text(TEXTS[1:3])  # partly filled
    mem2, pad2 = model.encode_text(TEXTS)
    assert len(model.text_cache) == len(TEXTS) and torch.equal(pad, pad2)
    torch.testing.assert_close(mem2[~pad], mem[~pad], **FP32_SHAPES)  # batch of 2 vs 5
    torch.manual_seed(0)
    torch.testing.assert_close(model(TEXTS, frames, lengths)["loss"], loss, **FP32_SHAPES)


def test_a_request_decoded_in_a_batch_gets_the_answer_it_gets_alone():
    """Request batching (the server's): each request's rows draw their noise from its own generator
    and are cut to its own max_frames, so a seeded request gets the same frames and lengths alone as
    inside a batch of other requests -- on the eager and on the static path, in any batch order."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    from facelab.families.cteg.decoding import generate, generate_groups

    from test_cteg_model import GEN_TEXTS, make

    model = make(max_frames=40, stop_threshold=0.0)
    free = generate(model, GEN_TEXTS, generator=torch.Generator().manual_seed(3))
    v = torch.stack([f.norm(dim=-1) for f in free])[:, 1:].flatten().sort().values
    model.cfg.stop_threshold = float(v[len(v) // 30] + v[len(v) // 30 + 1]) / 2  # some rows stop early
    # (texts, max_frames, seed): several samples of one text, lengths across a noise-chunk boundary
    requests = [(GEN_TEXTS[:1] * 3, 40, 11), (GEN_TEXTS[1:3], 17, 12), (GEN_TEXTS[3:4], 33, 13), ([""], 5, 14)]

    def alone(static):
        return [
            generate(model, t, max_frames=n, generator=torch.Generator().manual_seed(s), static=static)
            for t, n, s in requests
        ]

    for static in (False, True):
        want = alone(static)
        assert len({len(x) for r in want for x in r}) >= 3  # stops and max_frames cuts both happen
        for order in ([0, 1, 2, 3], [3, 2, 1, 0]):
            reqs = [(requests[i][0], requests[i][1], torch.Generator().manual_seed(requests[i][2])) for i in order]
            got = generate_groups(model, reqs, static=static)
            for i, answer in zip(order, got):
                assert [len(x) for x in answer] == [len(x) for x in want[i]]
                for a, w in zip(answer, want[i]):
                    torch.testing.assert_close(a, w, **FP32_DECODE)
    with pytest.raises(ValueError, match="one generator per text"):
        generate(model, GEN_TEXTS[:2], generator=[torch.Generator()])
