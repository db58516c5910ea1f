"""The CTEG evaluation protocol (facelab.tasks.expressions.evaluate) and CTEG.teacher_forced_means."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from scipy.stats import norm

from facelab.data.emoava import EmoAvaSplit, load_split
from facelab.data.synth import generate_emoava
from facelab.families.cteg.model import CTEG, CTEGConfig
from facelab.tasks.expressions.evaluate import (
    DIRECTIONS,
    METRICS,
    EvalConfig,
    baseline_means,
    best_rows,
    closeness_to_gt,
    cppl_targets,
    evaluate_baseline,
    evaluate_model,
    model_cppl_inputs,
)
from facelab.tasks.expressions.metrics import diversity, expression_metrics, fgd, variation

from tolerances import FP32_SHAPES

TINY = dict(d_model=32, n_heads=4, ff_dim=64, latent_dim=16, ewa_dim=8, ewa_heads=2, max_frames=16)
QUICK = dict(n_diversity=40, n_bootstrap=200)


@pytest.fixture(scope="module")
def splits(tmp_path_factory) -> tuple[EmoAvaSplit, EmoAvaSplit]:
    root = tmp_path_factory.mktemp("emoava")
    generate_emoava(root, n_train=240, n_dev=0, n_test=48, seed=0)
    return load_split(root, "test"), load_split(root, "train")


def make_model(seed: int = 0, **overrides) -> CTEG:
    torch.manual_seed(seed)
    return CTEG(CTEGConfig(**{**TINY, **overrides}), torch.linspace(-0.2, 0.2, 53))


def frames_batch(lengths=(7, 4, 1), t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    frames = 0.5 * torch.randn(len(lengths), t, 53, generator=g)
    frames = frames * (torch.arange(t)[None, :, None] < lengths[:, None, None])
    return frames, lengths


TEXTS = ["I am so happy!", "That is terrible.", ""]


# --------------------------------------------------------------------------------------------
# CTEG.teacher_forced_means
# --------------------------------------------------------------------------------------------


def test_teacher_forced_means_shapes_and_mask():
    model = make_model()
    frames, lengths = frames_batch()
    means, mask = model.teacher_forced_means(TEXTS, frames, lengths, generator=torch.Generator().manual_seed(0))
    assert means.shape == (3, 8, 53) and mask.shape == (3, 8) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [8, 5, 2]  # T frames + the terminator step
    assert (means[~mask] == 0).all() and torch.isfinite(means).all()
    assert (means[mask].abs().sum(-1) > 0).all()


def test_teacher_forced_means_deterministic_and_restores_mode():
    model = make_model()
    model.train()
    frames, lengths = frames_batch()
    a, _ = model.teacher_forced_means(TEXTS, frames, lengths, generator=torch.Generator().manual_seed(5))
    b, _ = model.teacher_forced_means(TEXTS, frames, lengths, generator=torch.Generator().manual_seed(5))
    c, _ = model.teacher_forced_means(TEXTS, frames, lengths, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)  # prior latents are sampled with the generator
    m1, _ = model.teacher_forced_means(TEXTS, frames, lengths, latent="mean")
    m2, _ = model.teacher_forced_means(TEXTS, frames, lengths, latent="mean")
    assert torch.equal(m1, m2)  # z = prior mean: no randomness at all (eval mode: no dropout)
    assert model.training and not model.text_encoder.training
    with pytest.raises(ValueError, match="latent"):
        model.teacher_forced_means(TEXTS, frames, lengths, latent="posterior")


def test_teacher_forced_means_ignore_padding_and_batch_company():
    model = make_model()
    frames, lengths = frames_batch()
    ref, mask = model.teacher_forced_means(TEXTS, frames, lengths, latent="mean")
    noisy = frames.clone()
    noisy[1, 4:] = 100.0  # padding content of the second sequence
    noisy[2, 1:] = -50.0
    out, _ = model.teacher_forced_means(TEXTS, noisy, lengths, latent="mean")
    torch.testing.assert_close(out[mask], ref[mask], **FP32_SHAPES)
    alone, alone_mask = model.teacher_forced_means(TEXTS[1:2], frames[1:2, :4], lengths[1:2], latent="mean")
    torch.testing.assert_close(alone[0, :5], ref[1, :5], **FP32_SHAPES)


def test_teacher_forced_means_are_causal():
    model = make_model(cvad_layers=2)
    frames, lengths = frames_batch(lengths=(7, 7, 7))
    ref, _ = model.teacher_forced_means(TEXTS, frames, lengths, latent="mean")
    changed = frames.clone()
    changed[:, 4] += 3.0  # frame ψ_5 (index 4) is the input of step 5 and the target of step 4
    out, _ = model.teacher_forced_means(TEXTS, changed, lengths, latent="mean")
    torch.testing.assert_close(out[:, :5], ref[:, :5])  # steps 0..4 only see ψ_0..ψ_4
    assert not torch.allclose(out[:, 5:], ref[:, 5:])


def test_teacher_forced_means_use_the_prior_mean_without_output_noise():
    # with output_sigma = 0 the mean is the decoder output itself: recompute step by step with the
    # cached generation path fed the true frames, z = prior mean (eps_z = 0).
    model = make_model(output_sigma=0.0).eval()
    frames, lengths = frames_batch(lengths=(5,), t=5)
    means, _ = model.teacher_forced_means(TEXTS[:1], frames, lengths, latent="mean")
    memory, pad = model.encode_text(TEXTS[:1])
    x, _ = model._teacher_inputs(frames, lengths)
    layer = model.layers[0]
    state = layer.new_state(8)
    mem_kv = layer.memory_kv(memory)
    for p in range(6):
        h = model.embed(x[:, p : p + 1], start=p)
        h = layer.forward_infer(h, mem_kv, ~pad, torch.zeros(1, 1, layer.latent_dim), None, state=state)
        torch.testing.assert_close(model.project_out(h[:, 0]), means[:, p], **FP32_SHAPES)


# --------------------------------------------------------------------------------------------
# protocol pieces
# --------------------------------------------------------------------------------------------


def test_cppl_targets_and_baseline_means_by_hand():
    s3 = np.arange(6, dtype=np.float64).reshape(3, 2)
    s5 = np.ones((5, 2))
    t3, t5 = cppl_targets([s3, s5], max_frames=4)
    np.testing.assert_array_equal(t3, [[0, 1], [2, 3], [4, 5], [0, 0]])  # frames + terminator
    np.testing.assert_array_equal(t5, np.ones((4, 2)))  # cut at max_frames, no terminator step
    np.testing.assert_array_equal(baseline_means(s3, 5), [[0, 1], [2, 3], [4, 5], [0, 0], [0, 0]])
    np.testing.assert_array_equal(baseline_means(s5, 2), np.ones((2, 2)))


def test_eval_config_validation():
    with pytest.raises(ValueError, match="n_diversity"):
        EvalConfig(n_diversity=0)
    with pytest.raises(ValueError, match="cppl_region"):
        EvalConfig(cppl_region="ball")
    with pytest.raises(ValueError, match="max_texts"):
        EvalConfig(max_texts=1)


def test_directions_and_best_rows():
    assert METRICS == ["cppl", "dot", "fgd", "diversity", "mmodality", "variation"]
    assert set(DIRECTIONS) == set(METRICS)
    assert closeness_to_gt(8.0, 9.24) == pytest.approx(1.24)
    row = lambda *v: dict(zip(METRICS, [(x, 0.0) for x in v]))  # noqa: E731
    results = {
        "gt": row(1.0, 9.0, 1.2, 9.0, math.nan, 0.28),
        "a": row(5.0, 8.0, 1.0, 12.0, 2.0, 0.30),
        "b": row(3.0, 9.5, 3.0, 8.5, 4.0, math.nan),
    }
    assert best_rows(results) == {
        "cppl": "b",  # lower
        "dot": "b",  # |9.5 - 9| < |8 - 9|
        "fgd": "a",
        "diversity": "a",  # higher (Table 2's ↑)
        "mmodality": "b",  # higher
        "variation": "a",  # b is NaN
    }
    no_gt = best_rows({k: v for k, v in results.items() if k != "gt"})
    assert no_gt["dot"] is None and no_gt["cppl"] == "b"


# --------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------


def test_gt_baseline_reproduces_the_dataset_metrics(splits):
    test, train = splits
    cfg = EvalConfig(**QUICK)
    res = evaluate_baseline("gt", test, train, cfg)
    assert list(res) == METRICS
    own = expression_metrics(test.sequences, seed=cfg.seed)
    for m in ("dot", "fgd", "variation"):
        assert res[m][0] == pytest.approx(own[m], rel=1e-12)
        assert res[m][1] > 0
    assert res["diversity"][0] == pytest.approx(diversity(test.sequences, n_pairs=40, seed=cfg.seed))
    # frames as μ on their own targets: every frame has the box mass (2Φ(4) - 1)^53
    # default region (the reference's CDF difference): p = Φ(4)^53 − Φ(−4)^53 per frame
    assert res["cppl"][0] == pytest.approx(1.0 / (norm.cdf(4.0) ** 53 - norm.cdf(-4.0) ** 53), rel=1e-9)
    box = evaluate_baseline("gt", test, None, dataclasses.replace(cfg, cppl_region="box"))
    assert box["cppl"][0] == pytest.approx((2 * norm.cdf(4.0) - 1) ** -53, rel=1e-9)
    assert all(math.isnan(v) for v in res["mmodality"])  # one sequence per text
    # the dataset's calibrated statistics (synthetic corpus: GT row of Table 2 is 9.24 / 1.26 / 0.28)
    assert 8 < res["dot"][0] < 11 and 1.0 < res["fgd"][0] < 1.6 and 0.2 < res["variation"][0] < 0.4


def test_gt_baseline_respects_max_texts(splits):
    test, train = splits
    res = evaluate_baseline("gt", test, train, EvalConfig(max_texts=10, **QUICK))
    assert res["variation"][0] == pytest.approx(variation(test.sequences[:10]))
    assert res["fgd"][0] == pytest.approx(fgd(test.sequences[:10]))


def test_shuffle_destroys_smoothness_but_keeps_variation(splits):
    test, train = splits
    cfg = EvalConfig(**QUICK)
    gt = evaluate_baseline("gt", test, train, cfg)
    sh = evaluate_baseline("shuffle", test, train, cfg)
    assert sh["variation"][0] == pytest.approx(gt["variation"][0], rel=1e-12)  # a permutation in time
    assert sh["fgd"][0] > 2.5 * gt["fgd"][0]  # adjacent frames are now unrelated
    assert all(math.isnan(v) for v in sh["cppl"])  # the model's (evaluate_shuffle): no model here
    assert sh["mmodality"][0] > 0 and math.isfinite(sh["mmodality"][1])
    assert evaluate_baseline("shuffle", test, train, cfg) == sh  # seeded
    assert evaluate_baseline("shuffle", test, train, EvalConfig(seed=1, **QUICK))["fgd"] != sh["fgd"]


def test_random_baseline_draws_training_sequences(splits):
    test, train = splits
    cfg = EvalConfig(**QUICK)
    rnd = evaluate_baseline("random", test, train, cfg)
    assert all(math.isfinite(v) for m in METRICS for v in rnd[m])
    assert rnd["fgd"][0] == pytest.approx(fgd(train.sequences), rel=0.25)  # real, smooth sequences
    assert rnd["cppl"][0] > 1e6  # unrelated frames as predictions
    assert evaluate_baseline("random", test, train, cfg) == rnd
    with pytest.raises(ValueError, match="training split"):
        evaluate_baseline("random", test, None, cfg)
    with pytest.raises(ValueError, match="kind"):
        evaluate_baseline("oracle", test, train, cfg)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def test_evaluate_model_tiny_cteg(splits):
    test, _ = splits
    model = make_model()
    model.train()
    cfg = EvalConfig(**QUICK)
    start = time.perf_counter()
    res = evaluate_model(model, test, cfg)
    elapsed = time.perf_counter() - start
    assert list(res) == METRICS
    for m in METRICS:
        value, se = res[m]
        assert math.isfinite(value) and math.isfinite(se) and se >= 0, (m, value, se)
    assert res["cppl"][0] >= 1.0 and res["mmodality"][0] > 0 and res["diversity"][0] > 0
    assert model.training  # mode restored
    assert evaluate_model(model, test, cfg) == res  # deterministic for a seed
    other = evaluate_model(model, test, EvalConfig(seed=1, **QUICK))
    assert other["dot"] != res["dot"] and other["mmodality"] != res["mmodality"]
    assert elapsed < 30


def test_model_cppl_inputs_align_with_targets(splits):
    test, _ = splits
    model = make_model()
    texts, seqs = test.texts[:6], test.sequences[:6]
    cfg = EvalConfig(batch_size=4)
    means, targets = model_cppl_inputs(model, texts, seqs, cfg, 16, torch.Generator().manual_seed(0))
    for s, m, t in zip(seqs, means, targets):
        n = min(len(s), 16) + (len(s) <= 16)
        assert m.shape == t.shape == (n, 53)
        np.testing.assert_allclose(t[: min(len(s), 16)], s[:16])
    # the first row of a batch draws the first latent noise values: alone or batched, same means
    alone, _ = model_cppl_inputs(model, texts[:1], seqs[:1], cfg, 16, torch.Generator().manual_seed(0))
    np.testing.assert_allclose(alone[0], means[0], rtol=1e-4, atol=1e-4)
