"""LM-Listener baseline (facelab.families.lm_listener.model, facelab.families.lm_listener.loop): VQ-VAE behaviour,
code-LM learning and sampling, teacher-forced means against a brute-force expectation, the CTEG
evaluation protocol on the model, checkpoints, and the two-stage Ray Train worker loop."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from facelab.core import checkpoint as ckpt
from facelab.core.text_encoder import load_text_encoder
from facelab.families.lm_listener import model as lml
from facelab.families.lm_listener.job import LMListenerJob
from facelab.families.lm_listener.model import build_lm_listener, load_servable_lm_listener, nucleus_sample
from facelab.tasks.expressions.data import collate

from tolerances import FP32_SHAPES

TINY = dict(
    codebook_size=16,
    code_dim=16,
    vq_hidden=32,
    vq_layers=1,
    d_model=32,
    n_heads=4,
    n_layers=1,
    ff_dim=64,
    dropout=0.0,
    downsample=2,
    cppl_top_k=4,
    max_text_tokens=16,
)
MEAN = torch.linspace(-0.2, 0.2, 53)
TEXTS = ["I am so happy today!", "That is terrible news.", "What did you say?", "We won the game."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: one intra-op thread is as fast, and a busy 2-core machine cannot
    slow it down by oversubscription (two threads competing with other processes can be 100x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def shared_encoder():
    """Load MiniLM once for the module; every model built here shares it (it is frozen)."""
    enc = load_text_encoder("minilm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lml, "load_text_encoder", lambda name: enc)
        yield enc


CONFIG_ONLY = {"text_dropout", "dead_code_threshold"}  # LMListenerConfig fields the job spec does not expose


def make_job(max_frames: int = 24, **model) -> dict:
    return LMListenerJob(data={"max_frames": max_frames}, model={**TINY, **model}).model_dump(mode="json")


def make(seed: int = 0, max_frames: int = 24, **model) -> lml.LMListener:
    torch.manual_seed(seed)
    extra = {k: model.pop(k) for k in CONFIG_ONLY & set(model)}
    if not extra:
        return build_lm_listener(make_job(max_frames, **model), MEAN)
    cfg = lml.lm_listener_config(make_job(max_frames, **model)).model_copy(update=extra)
    return lml.LMListener(cfg, MEAN)


def circles(n: int, t_min: int, t_max: int, seed: int) -> list[torch.Tensor]:
    """Smooth sequences on a 2-d manifold: mean + sin/cos of a per-sequence phase along a fixed basis."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(2, 53, generator=torch.Generator().manual_seed(123))
    out = []
    for _ in range(n):
        length = int(torch.randint(t_min, t_max + 1, (1,), generator=g))
        t = torch.arange(length) * 0.35 + float(torch.rand(1, generator=g)) * 2 * math.pi
        out.append(MEAN + torch.stack([t.sin(), t.cos()], -1) @ basis)
    return out


def batch(seqs: list[torch.Tensor], texts: list[str] | None = None):
    texts = texts or [f"text {i}" for i in range(len(seqs))]
    return collate(list(zip(texts, seqs)))


# --------------------------------------------------------------------------------------------
# VQ-VAE
# --------------------------------------------------------------------------------------------


def test_straight_through_gradient_reaches_the_encoder():
    model = make()
    _, frames, lengths = batch(circles(3, 5, 11, seed=0))
    out = model.vq_losses(frames, lengths)
    assert set(out) >= {"loss", "recon_mse", "commit", "perplexity"}
    out["recon_mse"].backward()  # the reconstruction alone: its only path to the encoder is the STE
    for name, p in model.vq.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in model.lm.parameters())  # stage 1 trains the VQ-VAE only


@pytest.mark.parametrize("ema_decay", [0.99, 0.0])
def test_each_stage_gives_every_trainable_parameter_a_gradient(ema_decay):
    """DDP runs with find_unused_parameters=False: each stage's loss must reach all it trains."""
    model = make(ema_decay=ema_decay, dropout=0.1)
    texts, frames, lengths = batch(circles(3, 4, 11, seed=0), TEXTS[:3])
    model.train()
    out = model(texts, frames, lengths)  # stage 1 by default
    if ema_decay == 0:  # a learned codebook, trained by the codebook loss ||sg[z_e] - e||²
        torch.testing.assert_close(out["loss"], out["recon_mse"] + 0.25 * out["commit"] + out["codebook"])
    out["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"vq.{n}" for n, _ in model.vq.named_parameters()}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    model.zero_grad(set_to_none=True)
    model.set_stage(2)
    model.train()
    assert not model.vq.training and model.lm.training and not model.text_encoder.training
    out = model(texts, frames, lengths)
    out["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {f"lm.{n}" for n, _ in model.lm.named_parameters()}
    assert [n for n, p in trainable.items() if p.grad is None] == []
    assert all(p.grad is None for p in model.vq.parameters())


def test_ema_update_moves_used_codes_to_the_running_mean_of_their_vectors():
    model = make(ema_decay=0.9, dead_code_threshold=0.0)
    q = model.vq.quantizer
    z_rows = []
    for seed in (1, 2):
        _, frames, lengths = batch(circles(4, 4, 9, seed=seed))
        x, _, wv = model.vq.prepare(frames, lengths, model.mean_expression)
        with torch.no_grad():
            z = model.vq.encoder(x)[wv]
        z_rows.append((z, q.nearest(z)))
        before = (q.codebook.clone(), q.ema_count.clone(), q.ema_sum.clone())
        model.train()
        model.vq_losses(frames, lengths)
        z, idx = z_rows[-1]
        counts = torch.bincount(idx, minlength=16).float()
        sums = torch.zeros(16, 16).index_add_(0, idx, z)
        count = 0.9 * before[1] + 0.1 * counts
        total = 0.9 * before[2] + 0.1 * sums
        used = count > 0
        torch.testing.assert_close(q.codebook[used], total[used] / count[used, None])
        torch.testing.assert_close(q.codebook[~used], before[0][~used])  # never-used codes stay put
        assert used.sum() >= 2
    moved = (q.codebook - before[0]).norm(dim=-1)
    assert moved[counts > 0].min() > 0  # the codes used by the last batch moved
    # eval mode never touches the codebook
    model.eval()
    snapshot = q.codebook.clone()
    model.vq_losses(frames, lengths)
    assert torch.equal(q.codebook, snapshot)


def test_dead_codes_restart_on_encoder_outputs():
    model = make(dead_code_threshold=1.0)
    _, frames, lengths = batch(circles(6, 8, 16, seed=3))
    x, _, wv = model.vq.prepare(frames, lengths, model.mean_expression)
    with torch.no_grad():
        z = model.vq.encoder(x)[wv]
    model.train()
    model.vq_losses(frames, lengths)
    # counts start at 0, so the first batch re-seeds every code on one of its encoder outputs
    dist = (model.vq.quantizer.codebook[:, None] - z[None]).norm(dim=-1)
    assert dist.min(dim=1).values.max() < 1e-5
    assert torch.all(model.vq.quantizer.ema_count == 1.0)


def test_reconstruction_error_halves_with_training():
    model = make(seed=1)
    _, frames, lengths = batch(circles(16, 10, 24, seed=4))
    opt = torch.optim.Adam(model.stage_parameters(1), lr=5e-3)
    model.eval()
    with torch.no_grad():
        before = float(model.vq_losses(frames, lengths)["recon_mse"])
    model.train()
    for _ in range(150):
        out = model.vq_losses(frames, lengths)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = model.vq_losses(frames, lengths)
    assert float(after["recon_mse"]) < 0.25 * before, (before, float(after["recon_mse"]))
    assert float(after["perplexity"]) > 2  # more than a couple of codes in use
    recon = model.reconstruct(frames, lengths)
    assert [len(r) for r in recon] == lengths.tolist()


def test_padding_frames_do_not_affect_the_losses():
    model = make(downsample=3)
    seqs = circles(2, 7, 7, seed=5)
    short = torch.stack(seqs)  # (2, 7, 53): both of length 7
    long = torch.cat([short, 50 * torch.randn(2, 9, 53)], dim=1)  # garbage after the end
    lengths = torch.tensor([7, 5])
    model.eval()
    a, b = model.vq_losses(short, lengths), model.vq_losses(long, lengths)
    for k in ("loss", "recon_mse", "commit"):
        torch.testing.assert_close(a[k], b[k], **FP32_SHAPES)
    model.set_stage(2)
    torch.testing.assert_close(
        model.lm_losses(TEXTS[:2], short, lengths)["code_ce"],
        model.lm_losses(TEXTS[:2], long, lengths)["code_ce"],
        **FP32_SHAPES,
    )
    codes_a, n_a = model.encode_codes(short, lengths)
    codes_b, n_b = model.encode_codes(long, lengths)
    assert n_a.tolist() == n_b.tolist() == [3, 2]
    assert torch.equal(codes_a[0, :3], codes_b[0, :3]) and torch.equal(codes_a[1, :2], codes_b[1, :2])


def test_decoder_crop_equals_full_decode():
    for s, layers in ((1, 1), (2, 1), (3, 2), (4, 2), (8, 3), (12, 4)):  # 12 = strides 2·2·3
        model = make(downsample=s, vq_layers=layers, max_frames=256)
        n = model.vq.decoder.context_codes
        codes = torch.randint(0, 16, (1, n + 12))
        with torch.no_grad():
            full = model.vq.decode(codes)
            for w in range(codes.shape[1]):
                crop = model.vq.decode(codes[:, max(0, w - n) : w + 1])[:, -s:]
                torch.testing.assert_close(crop, full[:, w * s : (w + 1) * s], **FP32_SHAPES)


# --------------------------------------------------------------------------------------------
# code LM
# --------------------------------------------------------------------------------------------


def test_code_lm_learns_codes_the_text_determines():
    model = make(seed=2, text_dropout=0.0)
    seqs = [s for s in circles(4, 6, 14, seed=6)]
    texts, frames, lengths = batch(seqs, TEXTS)
    model.set_stage(2)
    opt = torch.optim.Adam(model.stage_parameters(2), lr=5e-3)
    model.eval()
    before = float(model.lm_losses(texts, frames, lengths)["code_ce"])
    model.train()
    for _ in range(60):
        out = model.lm_losses(texts, frames, lengths)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    after = float(model.lm_losses(texts, frames, lengths)["code_ce"])
    assert after < 0.2 * before, (before, after)
    # greedy decoding now reproduces each text's own code sequence, EOS included
    model.cfg.top_p = 1e-6
    codes, n_codes = model.encode_codes(frames, lengths)
    recon = model.decode_codes(codes)
    out = model.generate(texts, generator=torch.Generator().manual_seed(0))
    for i, seq in enumerate(out):
        assert len(seq) == int(n_codes[i]) * 2
        torch.testing.assert_close(seq, recon[i, : len(seq)])


def test_generation_is_deterministic_for_a_seed_and_the_cache_changes_nothing():
    model = make(seed=3)
    gen = lambda seed, **kw: model.generate(TEXTS, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    a, b, c = gen(7), gen(7), gen(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, c))
    full = gen(7, use_cache=False)
    assert [x.shape for x in a] == [x.shape for x in full]
    for x, y in zip(a, full):
        torch.testing.assert_close(x, y)
    assert all(torch.isfinite(x).all() and 1 <= len(x) <= 24 for x in a + c)


def test_tiny_top_p_is_greedy():
    model = make(seed=4)
    model.lm.head.bias.data[model.eos] += 1.5  # make EOS a real contender
    model.cfg.top_p = 1e-9
    out = model.generate(TEXTS, max_frames=20, generator=torch.Generator().manual_seed(0))
    for text, seq in zip(TEXTS, out):  # an independent greedy loop over full teacher-forced logits
        codes = torch.zeros(1, 0, dtype=torch.long)
        for step in range(10):
            logits = model.code_logits([text], codes)[0, -1]
            if step == 0:
                logits[model.eos] = -math.inf
            nxt = int(logits.argmax())
            if nxt == model.eos:
                break
            codes = torch.cat([codes, torch.tensor([[nxt]])], dim=1)
        expected = model.decode_codes(codes)[0]
        torch.testing.assert_close(seq, expected)
    assert len({len(s) for s in out}) > 1 or any(len(s) < 20 for s in out)  # EOS did end some sequence


def test_nucleus_sampling_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.linspace(0, 0.999, 400)
    picked = torch.stack([nucleus_sample(logits, 0.8, u[None]) for u in draws]).flatten()
    assert set(picked.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.8: the last two are cut
    assert abs(float((picked == 0).float().mean()) - 0.5 / 0.8) < 0.01
    assert set(nucleus_sample(logits.expand(5, -1), 1e-6, torch.rand(5)).tolist()) == {0}


def test_empty_text_is_unconditional():
    model = make(seed=5)
    codes = torch.randint(0, 16, (2, 4))
    texts = ["", "hello there"]
    before = model.code_logits(texts, codes)
    with torch.no_grad():
        model.lm.text_proj.weight.mul_(3.0)
        model.lm.text_proj.bias.add_(1.0)
    after = model.code_logits(texts, codes)
    torch.testing.assert_close(after[0], before[0])  # "" ignores the text memory entirely
    assert not torch.allclose(after[1], before[1])
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a, b = model.generate([""], generator=g()), model.generate(["   "], generator=g())
    assert torch.equal(a[0], b[0]) and torch.isfinite(a[0]).all()


def test_max_frames_and_eos_semantics():
    model = make(seed=6)
    eos_bias = model.lm.head.bias.data
    eos_bias[model.eos] = -1e4  # never stop: length is max_frames exactly (cut inside the last code)
    for n in (1, 2, 7, 24):
        out = model.generate(TEXTS, max_frames=n, generator=torch.Generator().manual_seed(0))
        assert [len(s) for s in out] == [n] * len(TEXTS)
        assert all(torch.isfinite(s).all() for s in out)
    eos_bias[model.eos] = 1e4  # always stop: EOS cannot be first, so one code = `downsample` frames
    out = model.generate(TEXTS, max_frames=24, generator=torch.Generator().manual_seed(0))
    assert [len(s) for s in out] == [2] * len(TEXTS)
    with pytest.raises(ValueError, match="max_frames"):
        model.generate(TEXTS, max_frames=25)
    assert model.generate([], max_frames=5) == []


# --------------------------------------------------------------------------------------------
# teacher-forced means (Cppl)
# --------------------------------------------------------------------------------------------


def brute_force_means(model, text: str, seq: torch.Tensor) -> torch.Tensor:
    """Eq. of the docstring, computed the slow way: prefix-only LM calls, full decodes with the
    true future codes in place (which must not matter), one candidate at a time."""
    s, k, K = model.cfg.downsample, model.cfg.cppl_top_k, model.cfg.codebook_size
    L = len(seq)
    codes, n = model.encode_codes(seq[None], torch.tensor([L]))
    n = int(n)
    memory, key_valid = model.encode_text([text])
    mem_kv = model.lm.memory_kv(memory)

    def next_probs(prefix):  # the LM run on the prefix alone: [BOS, c_0..c_{w-1}]
        tokens = torch.cat([torch.tensor([[model.bos]]), prefix], dim=1)
        return model.lm(tokens, mem_kv, key_valid)[0, -1].softmax(-1)

    expected = torch.zeros((L // s + 1) * s, 53)
    for w in range(L // s + 1):
        probs = next_probs(codes[:, :w])[:K]
        q, cand = probs.topk(k)
        q = q / q.sum()
        for qj, j in zip(q, cand):
            trial = torch.cat([codes[:, :w], j.view(1, 1), codes[:, w + 1 : n]], dim=1)
            expected[w * s : (w + 1) * s] += qj * model.decode_codes(trial)[0, w * s : (w + 1) * s]
    p_end = next_probs(codes[:, :n])[model.eos]
    means = expected[: L + 1].clone()
    means[L] *= 1 - p_end
    return means


@pytest.mark.parametrize("downsample", [2, 3])
def test_teacher_forced_means_equal_the_brute_force_expectation(downsample):
    model = make(seed=7, downsample=downsample, max_frames=32)
    model.lm.head.bias.data[model.eos] += 1.0
    # two sequences longer than the decoder's context (crops start past 0), one frame, one short
    seqs = circles(2, 24, 31, seed=8) + [circles(1, 1, 1, seed=9)[0], circles(1, 6, 6, seed=10)[0]]
    texts, frames, lengths = batch(seqs, TEXTS[:3] + [""])
    model.train()  # teacher_forced_means must switch to eval itself and restore the mode
    means, mask = model.teacher_forced_means(texts, frames, lengths, generator=torch.Generator().manual_seed(0))
    assert model.training
    t = frames.shape[1]
    assert means.shape == (len(seqs), t + 1, 53) and mask.shape == (len(seqs), t + 1)
    model.eval()
    for i, (text, seq) in enumerate(zip(texts, seqs)):
        L = len(seq)
        assert mask[i].tolist() == [p <= L for p in range(t + 1)]
        assert torch.all(means[i, L + 1 :] == 0)
        torch.testing.assert_close(means[i, : L + 1], brute_force_means(model, text, seq), atol=2e-5, rtol=1e-4)
    # the terminator step shrinks the expected next frame towards the zero face by p(EOS)
    assert torch.all(means[torch.arange(len(seqs)), lengths].norm(dim=-1) > 0)
    again, _ = model.teacher_forced_means(texts, frames, lengths)
    torch.testing.assert_close(again, means)  # deterministic: no sampling involved


def test_teacher_forced_terminator_is_zero_when_eos_is_certain():
    model = make(seed=8)
    model.lm.head.bias.data[model.eos] = 1e4
    texts, frames, lengths = batch(circles(2, 4, 9, seed=11), TEXTS[:2])
    means, mask = model.teacher_forced_means(texts, frames, lengths)
    end = means[torch.arange(2), lengths]
    assert torch.all(end == 0)
    assert torch.isfinite(means).all() and mask.sum().item() == int(lengths.sum()) + 2


# --------------------------------------------------------------------------------------------
# the CTEG evaluation protocol, unchanged, on this model
# --------------------------------------------------------------------------------------------


def test_evaluate_model_gives_all_six_metrics():
    from facelab.data.emoava import EmoAvaSplit
    from facelab.tasks.expressions.evaluate import METRICS, EvalConfig, evaluate_model

    model = make(seed=9)
    seqs = [s.numpy().astype(np.float32) for s in circles(6, 3, 20, seed=12)]
    test = EmoAvaSplit(texts=TEXTS + ["Oh no.", "Fine."], sequences=seqs)
    cfg = EvalConfig(n_diversity=3, n_mmodality=4, n_bootstrap=10, max_frames=16, batch_size=4)
    model.train()
    results = evaluate_model(model, test, cfg, device="cpu")
    assert model.training  # mode restored
    assert list(results) == METRICS
    for name, (value, se) in results.items():
        assert math.isfinite(value) and math.isfinite(se), (name, value, se)
    assert results["cppl"][0] >= 1.0
    assert results == evaluate_model(model, test, cfg, device="cpu")  # seeded end to end


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_and_strict_loading(tmp_path):
    model = make(seed=10)
    _, frames, lengths = batch(circles(4, 6, 12, seed=13))
    model.train()
    model.vq_losses(frames, lengths)  # codebook buffers now differ from a fresh model's
    job = make_job()
    ckpt.save(tmp_path, model, job, keep_encoder=False)
    weights, config = ckpt.load_weights(tmp_path), ckpt.load_config(tmp_path)
    assert not any(k.startswith("text_encoder.") for k in weights)
    assert {"mean_expression", "vq.quantizer.codebook", "vq.quantizer.ema_count"} <= set(weights)
    where = str(tmp_path / ckpt.MODEL_FILE)
    loaded = load_servable_lm_listener(weights, config, "cpu", where)
    assert not loaded.training
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    for x, y in zip(model.generate(TEXTS, generator=g()), loaded.generate(TEXTS, generator=g())):
        assert torch.equal(x, y)
    torch.testing.assert_close(
        model.teacher_forced_means(TEXTS, frames, lengths)[0], loaded.teacher_forced_means(TEXTS, frames, lengths)[0]
    )

    bad = dict(weights, **{"lm.head.weight": torch.zeros(3, 3)})
    with pytest.raises(ckpt.CheckpointError, match=where):
        load_servable_lm_listener(bad, config, "cpu", where)
    missing = {k: v for k, v in weights.items() if k != "lm.pos.weight"}
    with pytest.raises(ckpt.CheckpointError, match="lm.pos.weight"):
        load_servable_lm_listener(missing, config, "cpu", where)
    with pytest.raises(ckpt.CheckpointError, match="unexpected"):
        load_servable_lm_listener(dict(weights, extra=torch.zeros(1)), config, "cpu", where)
    no_mean = {k: v for k, v in weights.items() if k != "mean_expression"}
    with pytest.raises(ckpt.CheckpointError, match="mean_expression"):
        load_servable_lm_listener(no_mean, config, "cpu", where)
    other = make_job(codebook_size=32)  # a config that does not describe these weights
    with pytest.raises(ckpt.CheckpointError, match=where):
        load_servable_lm_listener(weights, other, "cpu", where)


# --------------------------------------------------------------------------------------------
# the two-stage worker loop through a real Ray TorchTrainer
# --------------------------------------------------------------------------------------------


def test_reconstruction_plot_is_logged(tmp_path):
    from facelab.families.lm_listener.loop import log_reconstructions
    from facelab.tasks.expressions.data import PairDataset

    class Client:
        def __init__(self):
            self.logged = []

        def log_artifact(self, run_id, path, artifact_path):
            assert Path(path).stat().st_size > 0
            self.logged.append((run_id, Path(path).name, artifact_path))

    seqs = [s.numpy() for s in circles(3, 5, 9, seed=14)]
    dev = PairDataset(TEXTS[:3], seqs, max_frames=24)
    client = Client()
    log_reconstructions(make(), dev, make_job(), client, "run-1")
    assert client.logged == [("run-1", "vq_reconstruction.png", "plots")]


def test_worker_refuses_a_baseline_row():
    from facelab.families.lm_listener.loop import worker_loop

    job = LMListenerJob(eval={"baseline": "gt"}).model_dump(mode="json")
    with pytest.raises(ValueError, match="eval.baseline"):
        worker_loop({"job": job, "data_dir": ".", "root": ".", "tracking": None})


class _Ctx:
    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1


class _ResumeFrom:
    """What ``ray.train.get_checkpoint()`` hands a restarted worker."""

    def __init__(self, path):
        self.path = str(path)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


def run_in_process(monkeypatch, job: dict, data, out, resume_from=None) -> list[dict]:
    """``worker_loop`` in this process, one worker on CPU: Ray Train's context, report and DDP
    wrapper are replaced; every reported checkpoint is copied to ``out`` before it is deleted."""
    import ray.train
    import ray.train.torch

    from facelab.families.lm_listener import loop as wl

    reports: list[dict] = []

    def report(metrics, checkpoint=None):
        entry = {"metrics": dict(metrics)}
        if checkpoint is not None:
            entry["dir"] = Path(out) / f"epoch{metrics['epoch']}"
            shutil.copytree(checkpoint.path, entry["dir"])
        reports.append(entry)

    monkeypatch.setattr(ray.train, "get_context", lambda: _Ctx())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: resume_from and _ResumeFrom(resume_from))
    monkeypatch.setattr(ray.train, "report", report)
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(ray.train.torch, "prepare_model", lambda model, **kw: model)
    wl.worker_loop({"job": job, "data_dir": str(data), "root": str(out), "tracking": None})
    return reports


def test_worker_loop_resumes_either_stage_exactly(tmp_path, monkeypatch):
    from facelab.data.synth import generate_emoava

    data = tmp_path / "emoava"
    generate_emoava(data, n_train=24, n_dev=4, n_test=4, seed=1)
    job = LMListenerJob(
        data={"max_frames": 24, "dev_subset": 4},
        model={**TINY, "dropout": 0.1},
        optim={"batch_size": 4, "vq_lr": 3e-3, "lr": 3e-3},
        train={"vq_epochs": 2, "epochs": 2, "max_steps_per_epoch": 3, "max_val_batches": 1, "seed": 5},
        eval={"enabled": False},
    ).model_dump(mode="json")
    full = run_in_process(monkeypatch, job, data, tmp_path / "full")
    assert [r["metrics"]["stage"] for r in full] == [1, 1, 2, 2]
    assert [r["metrics"]["step"] for r in full] == [3, 6, 9, 12]
    for r in full:
        assert r["metrics"]["val/loss"] == r["metrics"]["val/vq_loss" if r["metrics"]["stage"] == 1 else "val/code_ce"]
    state = ckpt.load_train_state(full[0]["dir"])  # torch.load(weights_only=True)
    assert state["stage"] == 1 and ckpt.load_meta(full[2]["dir"])["stage"] == 2
    final = ckpt.load_weights(full[-1]["dir"])
    keys = ("val/loss", "val/code_ce", "val/cppl", "train/loss")
    # resume mid stage 1 (AdamW state of the VQ-VAE), at the stage change (fresh LM optimizer), mid stage 2
    for k in range(3):
        resumed = run_in_process(monkeypatch, job, data, tmp_path / f"resumed{k}", resume_from=full[k]["dir"])
        assert [r["metrics"]["epoch"] for r in resumed] == list(range(k + 1, 4))
        assert [resumed[-1]["metrics"][m] for m in keys] == [full[-1]["metrics"][m] for m in keys]
        again = ckpt.load_weights(resumed[-1]["dir"])
        assert all(torch.equal(again[n], final[n]) for n in final), k
        assert len(ckpt.load_meta(resumed[-1]["dir"])["history"]) == 4


# The worker loops run through real Ray Tune + Train sweeps in tests/test_e2e.py (LM-Listener)
# and tests/test_keyframe_e2e.py (Express4D-MDM): training, test-split scores, registry, endpoint.
