"""CTEG decoding on CUDA (and the single-query attention it uses, on any device): the cached multi-step CUDA graph of the compiled step (decoding._GraphDecoder)
gives the frames of the full recomputation, keeps no state between calls, and follows the weights."""

from __future__ import annotations

import pytest
import torch

from facelab.families.cteg import decoding
from facelab.families.cteg.model import CTEG, CTEGConfig

from tolerances import FP32_DECODE

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TINY = dict(d_model=32, n_heads=4, ff_dim=64, latent_dim=16, ewa_dim=8, ewa_heads=2, max_frames=40)
TEXTS = ["I am so happy", "", "What a beautiful story.", "ok", "What the hell?"]
MEAN = torch.linspace(-0.2, 0.2, 53)


WORDS = "i am so happy what a beautiful story ok the hell no fine thanks".split()


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> str:
    """A tiny random-init BERT saved as a local encoder (no model download on a GPU machine)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = tmp_path_factory.mktemp("tiny-bert")
    vocab = out / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "!", ".", ",", *WORDS]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=24, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture
def make(encoder):
    def build(**overrides) -> CTEG:
        torch.manual_seed(0)
        return CTEG(CTEGConfig(**{**TINY, "text_encoder": encoder, **overrides}), MEAN).cuda()

    return build


def gen(seed: int = 3) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def assert_frames_equal(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **FP32_DECODE)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    "compile, one_query",
    [(True, False), (True, True), (False, False)],
    ids=["compiled", "compiled-one-query", "eager-step"],
)
@pytest.mark.parametrize("overrides", [dict(), dict(lta="pooling", cvad_layers=2)], ids=["default", "pooling-2layers"])
def test_graph_decoding_equals_recomputation_with_stopping(make, overrides, compile, one_query, monkeypatch):
    monkeypatch.setattr(decoding, "ONE_QUERY_ATTENTION", one_query)
    model = make(stop_threshold=0.0, **overrides)
    n_max = 37  # not a multiple of GRAPH_STEPS: the last replay runs past n_max
    free = decoding.generate(model, TEXTS, max_frames=n_max, generator=gen(), compile=compile)
    assert [len(f) for f in free] == [n_max] * len(TEXTS)
    full = decoding.generate(model, TEXTS, max_frames=n_max, generator=gen(), use_cache=False)
    assert_frames_equal(free, full)

    # a threshold between observed norms: rows stop at different steps, one replay apart or more
    norms = torch.stack([f.norm(dim=-1) for f in free])[:, 1:].flatten().sort().values
    model.cfg.stop_threshold = float(norms[len(norms) // 20] + norms[len(norms) // 20 + 1]) / 2
    a = decoding.generate(model, TEXTS, max_frames=n_max, generator=gen(), compile=compile)
    b = decoding.generate(model, TEXTS, max_frames=n_max, generator=gen(), use_cache=False)
    assert len({len(x) for x in a}) >= 2
    assert_frames_equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_graph_is_reused_keeps_no_state_and_follows_in_place_weight_updates(make):
    model = make(stop_threshold=0.0)
    decoding.clear_graph_cache(model)
    first = decoding.generate(model, TEXTS[:2], max_frames=20, generator=gen(1))
    cache = model.__dict__["_graph_decoders"]
    assert len(cache) == 1
    (dec,) = cache.values()
    # other texts of the same batch size and text bucket, another seed: same captured decoder
    other = decoding.generate(model, ["Nooo!", "Fine, thanks."], max_frames=20, generator=gen(2))
    assert list(cache.values()) == [dec]
    again = decoding.generate(model, TEXTS[:2], max_frames=20, generator=gen(1))
    for x, y in zip(first, again):  # nothing of the call in between leaks in
        assert torch.equal(x, y)
    assert not torch.allclose(other[0], first[0])

    with torch.no_grad():  # an optimizer-style in-place update: the graph reads the new weights
        for p in model.layers.parameters():
            p.mul_(1.5)
    moved = decoding.generate(model, TEXTS[:2], max_frames=20, generator=gen(1))
    assert list(cache.values()) == [dec]
    assert not torch.allclose(moved[0], first[0])
    assert_frames_equal(moved, decoding.generate(model, TEXTS[:2], max_frames=20, generator=gen(1), use_cache=False))

    # parameters replaced by new tensors: captured again, still right
    model.load_state_dict({k: v.clone() * 0.5 for k, v in model.state_dict().items()}, assign=True)
    replaced = decoding.generate(model, TEXTS[:2], max_frames=20, generator=gen(1))
    assert list(cache.values()) != [dec]
    full = decoding.generate(model, TEXTS[:2], max_frames=20, generator=gen(1), use_cache=False)
    assert_frames_equal(replaced, full)


@pytest.mark.gpu
@needs_cuda
def test_graph_cache_is_bounded_and_deadline_stops_between_replays(make):
    model = make(stop_threshold=0.0)
    decoding.clear_graph_cache(model)
    shapes = [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5), (1, 20)]  # (batch, max_frames): 6 decoders
    for b, n in shapes:
        out = decoding.generate(model, TEXTS[:b], max_frames=n, generator=gen(), compile=False)
        assert [len(x) for x in out] == [n] * b
    assert len(model.__dict__["_graph_decoders"]) == decoding.GRAPH_CACHE_SIZE
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 1  # the second check: after the first replay

    with pytest.raises(TimeoutError, match="step 16"):
        decoding.generate(model, TEXTS[:1], max_frames=40, generator=gen(), compile=False, should_stop=stop)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])])
def test_one_query_attention_equals_sdpa(device):
    from facelab.core.layers import Attention, KeyMask

    torch.manual_seed(1)
    attn = Attention(32, 4).to(device).eval()
    x = torch.randn(3, 1, 32, device=device)
    k, v = attn.keys_values(torch.randn(3, 7, 32, device=device))
    valid = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]], device=device).bool()
    for mask in (
        dict(key_valid=KeyMask(valid)),
        dict(attn_mask=(torch.arange(7, device=device) <= 4)[None, None, None]),
    ):
        want = attn(x, k, v, **mask)
        got = attn(x, k, v, **mask, one_query=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # an empty text (row 1): the block passes its input through, as with SDPA
    torch.testing.assert_close(attn(x, k, v, key_valid=valid, one_query=True)[1], attn.norm(x[1]))
    with pytest.raises(ValueError, match="one query"):
        attn(torch.randn(3, 2, 32, device=device), k, v, one_query=True)
