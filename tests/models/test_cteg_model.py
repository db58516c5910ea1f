"""CTEG (facelab.families.cteg): losses, switches, causality, decoding, encoder handling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel

from facelab.core.text_encoder import resolve_encoder
from facelab.families.cteg.model import CTEG, CTEGConfig, noam_lambda

from tolerances import FP32_DECODE

TINY = dict(d_model=32, n_heads=4, ff_dim=64, latent_dim=16, ewa_dim=8, ewa_heads=2, max_frames=16)
TEXTS = ["I am so happy!", "That is terrible.", "What?", ""]
MEAN = torch.linspace(-0.2, 0.2, 53)


def make(seed: int = 0, **overrides) -> CTEG:
    torch.manual_seed(seed)
    return CTEG(CTEGConfig(**{**TINY, **overrides}), MEAN)


def batch(seed: int = 0, t: int = 8, lengths=(8, 6, 3, 1)):
    g = torch.Generator().manual_seed(seed)
    frames = 0.5 * torch.randn(len(lengths), 1, 53, generator=g) + 0.1 * torch.randn(
        len(lengths), t, 53, generator=g
    ).cumsum(1)
    lengths = torch.tensor(lengths)
    frames = frames * (torch.arange(t)[None, :, None] < lengths[:, None, None])  # zero padding
    return frames, lengths


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def train_step(model, frames, lengths, texts=TEXTS, lr=1e-3):
    opt = torch.optim.Adam([p for _, p in trainable(model)], lr=lr)
    out = model(texts[: len(frames)], frames, lengths)
    opt.zero_grad()
    out["loss"].backward()
    missing = [n for n, p in trainable(model) if p.grad is None]
    opt.step()
    return out, missing


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------


def test_forward_backward_finite_with_all_terms():
    model = make()
    frames, lengths = batch()
    out, missing = train_step(model, frames, lengths)
    assert set(out) == {"loss", "mse", "kl", "lg"}
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    assert out["mse"] > 0 and out["kl"] > 0 and out["lg"] > 0
    torch.testing.assert_close(out["loss"], out["mse"] + out["kl"] + out["lg"])
    assert missing == []  # every trainable parameter is used: DDP without find_unused_parameters
    assert all(not p.requires_grad for p in model.text_encoder.parameters())


def test_loss_normalisation_sum_over_steps_mean_over_batch():
    model = make(dropout=0.0)
    frames, lengths = batch()
    torch.manual_seed(1)
    steps = model.step_losses(TEXTS, frames, lengths)
    torch.manual_seed(1)
    out = model(TEXTS, frames, lengths)
    assert steps["mse"].shape == (4, 9)  # T + 1 steps: T frames + the terminator
    assert steps["mask"].sum(1).tolist() == [9, 7, 4, 2]
    for k in ("mse", "kl", "lg"):
        assert (steps[k][~steps["mask"]] == 0).all()
        torch.testing.assert_close(out[k], steps[k].sum(1).mean())
    # the last valid step of every sequence is the zero-face terminator
    step_targets = torch.cat([frames, torch.zeros(4, 1, 53)], dim=1)
    for b, n in enumerate(lengths.tolist()):
        assert (step_targets[b, n] == 0).all()


SWITCHES = [
    dict(ewa=False),
    dict(lta="pooling"),
    dict(lta="none"),
    dict(target_guided=False),
    dict(share_projection=True),
    dict(cvad_layers=2),
    dict(latent_dim=32),  # latent_dim == d_model: z added as is (the reference)
    dict(output_sigma=0.0),
    dict(kl_reduction="mean"),
    dict(finetune_encoder=True),
]


@pytest.mark.parametrize("overrides", SWITCHES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_each_switch_builds_and_trains_a_step(overrides):
    model = make(**overrides)
    frames, lengths = batch()
    before = {n: p.detach().clone() for n, p in trainable(model)}
    out, missing = train_step(model, frames, lengths)
    assert all(torch.isfinite(v) for v in out.values())
    assert missing == []
    changed = [n for n, p in trainable(model) if not torch.equal(before[n], p.detach())]
    assert changed
    if overrides.get("target_guided") is False:
        assert out["lg"] == 0 and model.guide_head is None
    if overrides.get("share_projection"):
        assert model.out_proj is None
        h = torch.randn(2, 32)
        torch.testing.assert_close(model.project_out(h), h @ model.embed.proj.weight)
    if overrides.get("finetune_encoder"):
        enc = [n for n, p in model.text_encoder.named_parameters() if p.requires_grad]
        assert enc and not any(n.startswith("pooler.") for n in enc)
        assert any(n.startswith("text_encoder.") for n in changed)
        model.train()
        assert model.text_encoder.training
    else:
        assert not any(n.startswith("text_encoder.") for n in changed)


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="lta"):
        CTEGConfig(lta="lstm")
    with pytest.raises(ValueError, match="divisible"):
        CTEGConfig(d_model=30, n_heads=4)


# --------------------------------------------------------------------------------------------
# causality and padding
# --------------------------------------------------------------------------------------------


def _steps(model, frames, lengths, seed=7):
    torch.manual_seed(seed)  # same dropout masks and latent/output noise in both runs
    return model.step_losses(TEXTS[:3], frames, lengths)


@pytest.mark.parametrize("overrides", [dict(), dict(lta="pooling"), dict(lta="none", ewa=False)], ids=str)
def test_later_frames_never_change_earlier_steps(overrides):
    model = make(dropout=0.1, **overrides).train()
    frames, lengths = batch(t=10, lengths=(10, 10, 7))
    j = 5  # change frame ψ_{j+1} (0-based index j) and everything after it
    edited = frames.clone()
    edited[:, j:] += torch.randn_like(edited[:, j:])
    a, b = _steps(model, frames, lengths), _steps(model, edited, lengths)
    for k in ("mse", "kl", "lg", "pred"):
        torch.testing.assert_close(a[k][:, :j], b[k][:, :j], rtol=0, atol=1e-6)
    assert not torch.allclose(a["mse"][:, j], b["mse"][:, j])  # step j predicts the edited frame


def test_stacked_layers_posterior_sees_one_frame_ahead_only():
    # With N_c = 2, layer 2's recognition network reads layer 1's output, which carries layer 1's
    # posterior sample of the next step (as in the paper/reference stacking); nothing earlier leaks.
    model = make(dropout=0.1, cvad_layers=2).train()
    frames, lengths = batch(t=10, lengths=(10, 10, 7))
    j = 5
    edited = frames.clone()
    edited[:, j:] += torch.randn_like(edited[:, j:])
    a, b = _steps(model, frames, lengths), _steps(model, edited, lengths)
    for k in ("mse", "kl", "lg", "pred"):
        torch.testing.assert_close(a[k][:, : j - 1], b[k][:, : j - 1], rtol=0, atol=1e-6)


def test_padding_content_is_ignored():
    model = make(dropout=0.1).train()
    frames, lengths = batch(t=10, lengths=(10, 4, 7))
    garbage = frames.clone()
    pad = torch.arange(10)[None, :] >= lengths[:, None]
    garbage[pad] = torch.randn(int(pad.sum()), 53)
    a, b = _steps(model, frames, lengths), _steps(model, garbage, lengths)
    for k in ("mse", "kl", "lg"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------

GEN_TEXTS = ["I am so happy", "", "What a beautiful story.", "ok", "What the hell?"]


def _expected_lengths(norms: torch.Tensor, threshold: float, n_max: int) -> list[int]:
    out = []
    for row in norms:
        hit = [p for p in range(1, n_max) if row[p] < threshold]
        out.append(hit[0] if hit else n_max)
    return out


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(lta="pooling", cvad_layers=2), dict(lta="none", ewa=False, latent_dim=32)],
    ids=["default", "pooling-2layers", "none-noewa"],
)
def test_cached_decoding_equals_recomputation_and_stops_at_threshold(overrides):
    n_max = 20
    model = make(max_frames=n_max, stop_threshold=0.0, **overrides)  # threshold 0: never stops
    model.train()  # generate must switch to eval itself and restore the mode
    free = model.generate(GEN_TEXTS, generator=torch.Generator().manual_seed(3))
    assert model.training
    assert [len(f) for f in free] == [n_max] * len(GEN_TEXTS)
    norms = torch.stack([f.norm(dim=-1) for f in free])

    # a threshold between two observed norms so that the texts stop at different steps
    values = norms[:, 1:].flatten().sort().values
    i = len(values) // 12
    model.cfg.stop_threshold = float(values[i] + values[i + 1]) / 2
    expected = _expected_lengths(norms, model.cfg.stop_threshold, n_max)
    assert len(set(expected)) >= 3, expected

    cached = model.generate(GEN_TEXTS, generator=torch.Generator().manual_seed(3))
    recomputed = model.generate(GEN_TEXTS, generator=torch.Generator().manual_seed(3), use_cache=False)
    assert [len(f) for f in cached] == expected == [len(f) for f in recomputed]
    for c, r, f in zip(cached, recomputed, free):
        torch.testing.assert_close(c, r, **FP32_DECODE)
        torch.testing.assert_close(c, f[: len(c)], **FP32_DECODE)  # stopping changes nothing else
        assert (c[1:].norm(dim=-1) >= model.cfg.stop_threshold).all()


def test_generation_is_seeded_and_sampled():
    model = make()
    a = model.generate(GEN_TEXTS[:2], max_frames=6, generator=torch.Generator().manual_seed(0))
    b = model.generate(GEN_TEXTS[:2], max_frames=6, generator=torch.Generator().manual_seed(0))
    c = model.generate(GEN_TEXTS[:2], max_frames=6, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.allclose(a[0], c[0])


def test_zero_output_stops_after_one_frame_and_max_frames_caps():
    model = make(stop_threshold=1.0)
    with torch.no_grad():
        model.out_proj.weight.zero_()  # every generated frame is exactly the zero face
    out = model.generate(GEN_TEXTS, max_frames=7)
    assert [f.shape for f in out] == [(1, 53)] * len(GEN_TEXTS)  # T_i >= 1: the first frame is kept
    model = make(stop_threshold=0.0)
    out = model.generate(GEN_TEXTS, max_frames=7)
    assert [f.shape for f in out] == [(7, 53)] * len(GEN_TEXTS)
    assert all(torch.isfinite(f).all() for f in out)


def test_empty_text_is_unconditional():
    model = make()
    memory, pad = model.encode_text(["", "   ", "hello there"])
    assert memory.shape == (3, pad.shape[1], 32)
    assert pad[0].all() and pad[1].all() and not pad[2].all()
    out = model.generate(["", ""], max_frames=5, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(f).all() and 1 <= len(f) <= 5 for f in out)


# --------------------------------------------------------------------------------------------
# encoder, buffers, schedule, training signal
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("finetune", [False, True])
def test_pretrained_encoder_weights_survive_construction(finetune):
    model = make(finetune_encoder=finetune)
    fresh = AutoModel.from_pretrained(resolve_encoder("minilm"), local_files_only=True).state_dict()
    mine = model.text_encoder.state_dict()
    assert mine.keys() == fresh.keys()
    assert all(torch.equal(mine[k], fresh[k]) for k in fresh)
    assert hasattr(model, "tokenizer")


def test_state_dict_layout_and_frozen_encoder_mode():
    model = make()
    sd = model.state_dict()
    torch.testing.assert_close(sd["mean_expression"], MEAN)
    assert any(k.startswith("text_encoder.") for k in sd)
    model.train()
    assert model.layers[0].training and not model.text_encoder.training
    with pytest.raises(ValueError):
        CTEG(CTEGConfig(**TINY), torch.zeros(50))


def test_noam_schedule():
    fn = noam_lambda(768, 4000)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, fn)
    lrs = []
    for _ in range(8000):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 * 768**-0.5 * 4000**-1.5)
    assert max(range(len(lrs)), key=lrs.__getitem__) == 3999  # peak at step n = warmup
    assert lrs[3999] == pytest.approx(2.0 * 768**-0.5 * 4000**-0.5)
    assert lrs[7999] == pytest.approx(2.0 * 768**-0.5 * 8000**-0.5)
    assert "lr_lambdas" in sched.state_dict()


def test_overfits_four_sequences():
    model = make(dropout=0.0)
    frames, lengths = batch(t=8, lengths=(8, 6, 5, 3))
    opt = torch.optim.Adam([p for _, p in trainable(model)], lr=3e-3)
    losses = []
    for _ in range(100):
        out = model(TEXTS, frames, lengths)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append({k: v.item() for k, v in out.items()})
    assert losses[-1]["loss"] < 0.05 * losses[0]["loss"]
    assert losses[-1]["mse"] < 0.3 * losses[0]["mse"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_step_and_decoding():
    model = make().cuda()
    frames, lengths = batch()
    out, missing = train_step(model, frames.cuda(), lengths.cuda())
    assert torch.isfinite(out["loss"]) and missing == []
    for gen in (torch.Generator(device="cuda").manual_seed(0), torch.Generator().manual_seed(0)):
        a = model.generate(GEN_TEXTS, max_frames=10, generator=gen)
        assert all(f.is_cuda and torch.isfinite(f).all() for f in a)
    g = lambda: torch.Generator(device="cuda").manual_seed(5)  # noqa: E731
    model.cfg.stop_threshold = 9.0
    a = model.generate(GEN_TEXTS, max_frames=12, generator=g())
    b = model.generate(GEN_TEXTS, max_frames=12, generator=g(), use_cache=False)
    assert [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
