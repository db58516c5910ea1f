"""The Express4D-MDM baseline (facelab.families.keyframe_mdm.model, facelab.families.keyframe_mdm.loop).

Uses the real offline MiniLM encoder and a toy corpus defined here: "joy" scripts whose keyframes
smile, "anger" scripts whose keyframes lower the brows, open the jaw and pitch the head down, with
1-3 keyframes each and a little noise. Tiny denoiser (d_model 32, one layer, T = 100).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from facelab.core import checkpoint as ckpt
from facelab.data.arkit import HIGH, INDEX, LOW, N_CHANNELS
from facelab.data.keyframeface import DataError, Keyframe, Script
from facelab.families.keyframe_mdm.job import KeyframeMDMJob
from facelab.families.keyframe_mdm.loop import feature_stats_of
from facelab.families.keyframe_mdm.model import (
    GaussianDiffusion,
    MDMConfig,
    MDMError,
    ServableKeyframeMDM,
    beta_schedule,
    build_keyframe_mdm,
    cosine_alpha_bar,
    load_servable_mdm,
    mdm_config,
    space_timesteps,
)

from tolerances import FP32_SHAPES

SMILE = [INDEX["MouthSmileLeft"], INDEX["MouthSmileRight"]]
BROW = [INDEX["BrowDownLeft"], INDEX["BrowDownRight"]]
JAW, PITCH = INDEX["JawOpen"], INDEX["HeadPitch"]
KINDS = {
    "joy": ("Joy.", "A child opens a birthday present.", "A broad smile with raised cheeks."),
    "anger": ("Anger.", "A driver is cut off in traffic.", "Brows pulled down hard, jaw dropped, head lowered."),
}
STEPS = 100  # diffusion steps of the tiny model


def tiny_job(**eval_overrides) -> dict:
    return KeyframeMDMJob(
        data={"annotation": "arkit"},
        # MDM's x0 objective over whole scripts (the options; the paper's eps / per-keyframe defaults are
        # pinned in tests/test_keyframe_protocol.py)
        model={
            "d_model": 32,
            "n_heads": 2,
            "n_layers": 1,
            "ff_dim": 64,
            "dropout": 0.0,
            "diffusion_steps": STEPS,
            "prediction": "x0",
            "unit": "script",
        },
        optim={"batch_size": 8, "lr": 2e-3},
        eval={"sampling_steps": 20, "guidance_scale": 2.5, "batch_size": 16, **eval_overrides},
    ).model_dump(mode="json")


def toy_values(kind: str, rng: np.random.Generator) -> np.ndarray:
    v = np.abs(rng.normal(0.0, 0.02, N_CHANNELS))
    v[52:] = rng.normal(0.0, 0.02, N_CHANNELS - 52)
    if kind == "joy":
        v[SMILE] += 0.8
    else:
        v[BROW] += 0.8
        v[JAW] += 0.5
        v[PITCH] -= 0.4
    return np.clip(v, LOW, HIGH).astype(np.float32)


def toy_script(i: int, kind: str, n_kf: int, rng: np.random.Generator) -> Script:
    emotion, background, desc = KINDS[kind]
    kfs = tuple(
        Keyframe(index=k + 1, descriptions={"original": desc, "arkit": desc}, values=toy_values(kind, rng))
        for k in range(n_kf)
    )
    return Script(script_id=f"{kind}-{i:03d}", actor="actor01", background=background, emotion=emotion, keyframes=kfs)


def toy_scripts(n: int, seed: int) -> list[Script]:
    rng = np.random.default_rng(seed)
    return [toy_script(i, ("joy", "anger")[i % 2], 1 + i % 3, rng) for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def encoder():
    from facelab.core.text_encoder import load_text_encoder

    return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def corpus():
    return toy_scripts(24, seed=0)


def fresh_model(encoder, corpus, seed: int = 0, job: dict | None = None):
    torch.manual_seed(seed)
    mean, std = feature_stats_of(corpus)
    return build_keyframe_mdm(job or tiny_job(), mean, std, text_encoder=encoder)


def fixed_loss(model, scripts) -> float:
    model.eval()
    with torch.no_grad():
        loss = float(model.losses(scripts, "arkit", generator=torch.Generator().manual_seed(123))["loss"])
    model.train()
    return loss


@pytest.fixture(scope="module")
def trained(encoder, corpus):
    """The tiny model after 250 AdamW steps on the toy corpus, and its fixed-noise loss before/after."""
    model = fresh_model(encoder, corpus)
    before = fixed_loss(model, corpus)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(250):
        idx = torch.randperm(len(corpus), generator=gen)[:12].tolist()
        loss = model.losses([corpus[i] for i in idx], "arkit", generator=gen)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), before, fixed_loss(model, corpus)


# --------------------------------------------------------------------------------------------
# the diffusion process
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_alphas_cumprod_decrease_inside_the_unit_interval(name):
    d = GaussianDiffusion.from_schedule(name, 1000)
    abar = d.alphas_cumprod
    assert abar.shape == (1000,)
    assert ((abar > 0) & (abar < 1)).all()
    assert (np.diff(abar) < 0).all()
    assert abar[0] > 0.999 and abar[-1] < 1e-3  # almost clean at t = 0, almost pure noise at T - 1


def test_cosine_schedule_matches_the_closed_form():
    T = 1000
    abar = GaussianDiffusion.from_schedule("cosine", T).alphas_cumprod
    t = np.arange(1, T + 1)
    f = np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    np.testing.assert_allclose(abar[:-1], f[:-1], rtol=1e-9)  # the last β is clipped at 0.999
    np.testing.assert_allclose(cosine_alpha_bar(t / T)[:-1], f[:-1], rtol=1e-12)
    np.testing.assert_allclose(beta_schedule("linear", T), np.linspace(1e-4, 0.02, T))


def test_q_sample_moves_from_the_data_to_noise():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, N_CHANNELS, generator=gen)
    noise = torch.randn(64, 3, N_CHANNELS, generator=gen)
    first = d.q_sample(x0, torch.zeros(64, dtype=torch.long), noise)
    assert (first - x0).abs().max() < 0.05
    last = d.q_sample(x0, torch.full((64,), 999), noise)
    assert (last - noise).abs().max() < 0.05
    mid = d.q_sample(x0, torch.full((64,), 500), noise)
    np.testing.assert_allclose(
        mid, math.sqrt(d.alphas_cumprod[500]) * x0 + math.sqrt(1 - d.alphas_cumprod[500]) * noise, atol=1e-6
    )


def test_respacing_keeps_the_marginals_and_the_ends():
    d = GaussianDiffusion.from_schedule("cosine", STEPS)
    kept = space_timesteps(STEPS, 10)
    assert len(kept) == 10 and kept[0] == 0 and kept[-1] == STEPS - 1 and kept == sorted(kept)
    spaced = d.respace(10)
    np.testing.assert_array_equal(spaced.timestep_map, kept)
    np.testing.assert_allclose(spaced.alphas_cumprod, d.alphas_cumprod[kept], rtol=1e-9)
    full = d.respace(STEPS)
    np.testing.assert_allclose(full.betas, d.betas, rtol=1e-9)
    np.testing.assert_array_equal(full.timestep_map, np.arange(STEPS))
    assert space_timesteps(STEPS, 1) == [STEPS - 1]
    for bad in (0, STEPS + 1):
        with pytest.raises(MDMError, match="sampling steps"):
            space_timesteps(STEPS, bad)


# --------------------------------------------------------------------------------------------
# the denoiser: guidance, masks, sampling
# --------------------------------------------------------------------------------------------


def test_config_follows_the_job_and_rejects_bad_values(encoder, corpus):
    cfg = mdm_config(tiny_job())
    assert (cfg.d_model, cfg.n_layers, cfg.diffusion_steps, cfg.prediction, cfg.cond_drop) == (32, 1, STEPS, "x0", 0.1)
    with pytest.raises(ValueError, match="divisible"):  # the job schema's own validation
        MDMConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="prediction"):
        MDMConfig(prediction="v")
    mean, std = feature_stats_of(corpus)
    with pytest.raises(MDMError, match="61"):
        build_keyframe_mdm(tiny_job(), mean[:60], std, text_encoder=encoder)
    model = fresh_model(encoder, corpus)
    with pytest.raises(MDMError, match="sampling steps"):
        model.sample(corpus[:1], "arkit", STEPS + 1, 2.5)
    with pytest.raises(DataError, match="no 'image' description"):
        model.losses(corpus[:2], "image")


def test_guidance_scale_one_is_conditional_and_zero_unconditional(encoder, corpus):
    model = fresh_model(encoder, corpus).eval()
    _x0, cond = model.prepare(corpus[:4], "arkit")
    gen = torch.Generator().manual_seed(0)
    x_t = torch.randn(cond.mask.shape + (N_CHANNELS,), generator=gen)
    t = torch.tensor([0, 10, 50, 99])
    with torch.no_grad():
        model.null_script.normal_()  # a trained null embedding is not zero
        cond_out = model.denoise(x_t, t, cond, drop=False)
        uncond_out = model.denoise(x_t, t, cond, drop=True)
        assert (cond_out - uncond_out).abs().max() > 1e-3
        torch.testing.assert_close(model.guided_output(x_t, t, cond, 1.0), cond_out)
        torch.testing.assert_close(model.guided_output(x_t, t, cond, 0.0), uncond_out, **FP32_SHAPES)
        torch.testing.assert_close(
            model.guided_output(x_t, t, cond, 2.5), uncond_out + 2.5 * (cond_out - uncond_out), atol=1e-5, rtol=1e-5
        )


def test_padding_keyframes_change_neither_the_loss_nor_the_prediction(encoder, corpus):
    model = fresh_model(encoder, corpus).eval()
    short, long = corpus[1], corpus[2]  # 2 and 3 keyframes
    assert (len(short.keyframes), len(long.keyframes)) == (2, 3)
    gen = torch.Generator().manual_seed(0)
    x0_a, cond_a = model.prepare([short], "arkit")
    x0_b, cond_b = model.prepare([short, long], "arkit")
    assert cond_b.mask.tolist() == [[True, True, False], [True, True, True]]
    torch.testing.assert_close(x0_b[0, :2], x0_a[0])
    noise_a = torch.randn(1, 2, N_CHANNELS, generator=gen)
    noise_b = torch.randn(2, 3, N_CHANNELS, generator=gen)
    noise_b[0, :2] = noise_a[0]
    noise_b[0, 2] = 1e4  # garbage in the padding slot
    x0_b[0, 2] = -1e6
    t = torch.tensor([37])
    with torch.no_grad():
        alone = model.loss_terms(x0_a, cond_a, t, noise_a, False)
        batched = model.loss_terms(x0_b, cond_b, t.repeat(2), noise_b, False)
        torch.testing.assert_close(batched[0], alone[0], **FP32_SHAPES)
        x_t_a = model.diffusion.q_sample(x0_a, t, noise_a)
        x_t_b = model.diffusion.q_sample(x0_b, t.repeat(2), noise_b)
        torch.testing.assert_close(
            model.denoise(x_t_b, t.repeat(2), cond_b)[0, :2], model.denoise(x_t_a, t, cond_a)[0], **FP32_SHAPES
        )
    assert torch.isfinite(batched).all()


def test_the_sampler_with_every_step_is_the_full_ddpm_chain(encoder, corpus):
    """Ho et al. 2020 Algorithm 2 written out from the βs: x_T ~ N(0, I), then
    x_{t-1} = μ̃_t(x̂_0, x_t) + σ_t z with Eq. 7's coefficients (x̂_0 guided, clamped to the ranges)."""
    model = fresh_model(encoder, corpus).eval()
    _x0, cond = model.prepare(corpus[:3], "arkit")
    scale = 2.5
    got = model.sample_normalised(cond, STEPS, scale, torch.Generator().manual_seed(7))

    betas = torch.as_tensor(model.diffusion.betas)
    abar = torch.cumprod(1 - betas, 0)
    gen = torch.Generator().manual_seed(7)
    shape = cond.mask.shape + (N_CHANNELS,)
    x = torch.randn(shape, generator=gen)
    with torch.no_grad():
        for t in reversed(range(STEPS)):
            x0 = model.guided_output(x, torch.full((3,), t), cond, scale).clamp(model.low_z, model.high_z)
            prev = abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
            mu = (prev.sqrt() * betas[t] / (1 - abar[t])) * x0 + (
                (1 - betas[t]).sqrt() * (1 - prev) / (1 - abar[t])
            ) * x
            sigma = ((1 - prev) / (1 - abar[t]) * betas[t]).sqrt()
            x = (mu + sigma * torch.randn(shape, generator=gen) if t > 0 else mu).float()
    torch.testing.assert_close(got, x, atol=1e-4, rtol=1e-4)


def test_sampling_is_deterministic_per_seed_and_in_range(encoder, corpus):
    model = fresh_model(encoder, corpus)
    scripts = corpus[:5]
    a = model.sample(scripts, "arkit", 10, 2.5, torch.Generator().manual_seed(0))
    b = model.sample(scripts, "arkit", 10, 2.5, torch.Generator().manual_seed(0))
    c = model.sample(scripts, "arkit", 10, 2.5, torch.Generator().manual_seed(1))
    assert model.training  # the mode is restored
    assert [x.shape for x in a] == [(len(s.keyframes), N_CHANNELS) for s in scripts]
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        assert not np.allclose(x, z)
        assert x.dtype == np.float32 and np.isfinite(x).all()
        assert (x >= LOW).all() and (x <= HIGH).all()


def test_eps_prediction_targets_the_noise(encoder, corpus):
    job = tiny_job()
    job["model"].update(prediction="eps", noise_schedule="linear")
    model = fresh_model(encoder, corpus, job=job).eval()
    x0, cond = model.prepare(corpus[:3], "arkit")
    gen = torch.Generator().manual_seed(0)
    t, noise = torch.tensor([5, 50, 95]), torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        out = model.denoise(model.diffusion.q_sample(x0, t, noise), t, cond)
        m = cond.mask[..., None]
        expected = torch.where(m, (out - noise) ** 2, 0.0).sum(dim=(1, 2)) / (cond.mask.sum(1) * N_CHANNELS)
        torch.testing.assert_close(model.loss_terms(x0, cond, t, noise, False), expected)
    for x in model.sample(corpus[:3], "arkit", 10, 2.5, torch.Generator().manual_seed(0)):
        assert np.isfinite(x).all() and (x >= LOW).all() and (x <= HIGH).all()


# --------------------------------------------------------------------------------------------
# learning
# --------------------------------------------------------------------------------------------


def test_training_lowers_the_loss(trained):
    _model, before, after = trained
    assert after < 0.5 * before, (before, after)


def test_samples_follow_their_text(trained):
    model, _before, _after = trained
    rng = np.random.default_rng(5)
    joy, anger = toy_script(900, "joy", 3, rng), toy_script(901, "anger", 3, rng)
    pred_joy, pred_anger = model.sample([joy, anger], "arkit", 20, 2.5, torch.Generator().manual_seed(3))
    smile = pred_joy[:, SMILE].mean() - pred_anger[:, SMILE].mean()
    brow = pred_anger[:, BROW].mean() - pred_joy[:, BROW].mean()
    pitch = pred_joy[:, PITCH].mean() - pred_anger[:, PITCH].mean()
    assert smile > 0.4 and brow > 0.4 and pitch > 0.15, (smile, brow, pitch)
    # and close to the training targets of their own kind
    assert np.abs(pred_joy - joy.values).mean() < np.abs(pred_joy - anger.values).mean()
    assert np.abs(pred_anger - anger.values).mean() < np.abs(pred_anger - joy.values).mean()


def test_servable_answers_one_keyframe_per_description(trained):
    model, _before, _after = trained
    servable = ServableKeyframeMDM(model, tiny_job())
    assert servable.label is None
    emotion, background, desc = KINDS["joy"]
    results = servable.keyframes(background, emotion, [desc, desc])
    assert len(results) == 2
    for r in results:
        assert r.valid and r.values.shape == (N_CHANNELS,) and np.isfinite(r.values).all()
        assert (r.values >= LOW).all() and (r.values <= HIGH).all()
        assert r.values[SMILE].mean() > 0.5
    again = servable.keyframes(background, emotion, [desc, desc])
    np.testing.assert_array_equal(np.stack([r.values for r in again]), np.stack([r.values for r in results]))
    with pytest.raises(DataError):
        servable.keyframes(background, emotion, [desc] * 6)


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_gives_identical_samples(trained, tmp_path):
    model, _before, _after = trained
    job = tiny_job()
    ckpt.save(tmp_path, model, job, keep_encoder=False)
    weights, config = ckpt.load_weights(tmp_path), ckpt.load_config(tmp_path)
    assert not any(k.startswith("text_encoder.") for k in weights)
    assert {"feat_mean", "feat_std", "null_script", "pos_embed"} <= set(weights)
    where = str(tmp_path / ckpt.MODEL_FILE)
    servable = load_servable_mdm(weights, config, "cpu", where)
    scripts = toy_scripts(4, seed=9)
    a = model.sample(scripts, "arkit", 10, 2.5, torch.Generator().manual_seed(4))
    b = servable.model.sample(scripts, "arkit", 10, 2.5, torch.Generator().manual_seed(4))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_unfit_weights_raise_a_checkpoint_error_naming_the_file(trained, tmp_path):
    model, _before, _after = trained
    job = tiny_job()
    weights = ckpt.model_state(model, keep_encoder=False)
    where = str(tmp_path / ckpt.MODEL_FILE)
    missing = {k: v for k, v in weights.items() if k != "output_process.weight"}
    with pytest.raises(ckpt.CheckpointError, match=f"{where}.*missing.*output_process.weight"):
        load_servable_mdm(missing, job, "cpu", where)
    wrong = dict(weights, **{"pos_embed": torch.zeros(4, 32)})
    with pytest.raises(ckpt.CheckpointError, match=f"{where}.*pos_embed.*shape"):
        load_servable_mdm(wrong, job, "cpu", where)
    with pytest.raises(ckpt.CheckpointError, match=f"{where}.*feat_std"):
        load_servable_mdm({k: v for k, v in weights.items() if k != "feat_std"}, job, "cpu", where)
    bigger = KeyframeMDMJob(**{**job, "model": {**job["model"], "d_model": 64}}).model_dump(mode="json")
    with pytest.raises(ckpt.CheckpointError, match=where):
        load_servable_mdm(weights, bigger, "cpu", where)
    extra = dict(weights, **{"text_encoder.embeddings.word_embeddings.weight": torch.zeros(1)})
    with pytest.raises(ckpt.CheckpointError, match="unexpected"):
        load_servable_mdm(extra, job, "cpu", where)


# The worker loops run through real Ray Tune + Train sweeps in tests/test_e2e.py (LM-Listener)
# and tests/test_keyframe_e2e.py (Express4D-MDM): training, test-split scores, registry, endpoint.
