"""KeyframeFace §5.3 metrics (facelab.tasks.keyframes.metrics) on small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facelab.tasks.keyframes.metrics import (
    KeyframeMetricError,
    diversity,
    evaluate_keyframes,
    fid,
    mm_dist,
    per_channel_errors,
    per_region,
    r_precision,
    regression_errors,
    validity_rate,
    wasserstein,
    wasserstein_per_channel,
)

# --------------------------------------------------------------------------------------------
# MSE / MAE / RMSE
# --------------------------------------------------------------------------------------------


def test_regression_errors_hand_computed():
    pred = [[0.0, 1.0], [2.0, 2.0]]
    gt = [[0.0, 0.0], [0.0, 2.0]]
    # differences 0, 1, 2, 0 -> squared 0, 1, 4, 0
    out = regression_errors(pred, gt)
    assert out["mse"] == pytest.approx(5 / 4)
    assert out["mae"] == pytest.approx(3 / 4)
    assert out["rmse"] == pytest.approx(math.sqrt(5 / 4))  # root of the pooled MSE


def test_per_channel_errors_hand_computed_and_consistent():
    pred = np.array([[0.0, 1.0], [2.0, 2.0]])
    gt = np.array([[0.0, 0.0], [0.0, 2.0]])
    pc = per_channel_errors(pred, gt)
    np.testing.assert_allclose(pc["mse"], [2.0, 0.5])  # channel 0: (0 + 4) / 2; channel 1: (1 + 0) / 2
    np.testing.assert_allclose(pc["mae"], [1.0, 0.5])
    np.testing.assert_allclose(pc["rmse"], [math.sqrt(2.0), math.sqrt(0.5)])
    assert pc["mse"].mean() == pytest.approx(regression_errors(pred, gt)["mse"])


def test_per_region_means_over_named_channels():
    channels = ["A", "B", "C"]
    regions = {"ab": ["A", "B"], "c": ["C"]}
    assert per_region([1.0, 3.0, 10.0], regions, channels) == {"ab": 2.0, "c": 10.0}
    with pytest.raises(KeyframeMetricError, match="unknown channels"):
        per_region([1.0, 3.0, 10.0], {"x": ["Z"]}, channels)


@pytest.mark.parametrize(
    "pred, gt, match",
    [
        (np.zeros((2, 3)), np.zeros((3, 3)), "differ in shape"),
        (np.zeros(3), np.zeros(3), "expected \\(N, D\\)"),
        (np.array([[0.0, np.nan]]), np.zeros((1, 2)), "NaN or inf \\(first in row 0\\)"),
    ],
)
def test_bad_inputs_raise(pred, gt, match):
    with pytest.raises(KeyframeMetricError, match=match):
        regression_errors(pred, gt)


# --------------------------------------------------------------------------------------------
# W-Dist
# --------------------------------------------------------------------------------------------


def test_wasserstein_hand_computed():
    pred = np.array([[0.0, 0.0], [1.0, 0.0]])
    gt = np.array([[1.0, 0.0], [2.0, 1.0]])
    # channel 0: {0, 1} vs {1, 2} -> every unit of mass moves 1 -> 1.0
    # channel 1: {0, 0} vs {0, 1} -> half the mass moves 1 -> 0.5
    np.testing.assert_allclose(wasserstein_per_channel(pred, gt), [1.0, 0.5])
    assert wasserstein(pred, gt) == pytest.approx(0.75)


def test_wasserstein_compares_distributions_not_pairs():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0, 1, size=(50, 61))
    shuffled = gt[rng.permutation(50)]
    assert wasserstein(shuffled, gt) == pytest.approx(0.0, abs=1e-12)  # same values, other rows
    assert regression_errors(shuffled, gt)["mse"] > 0.05
    mean_pred = np.repeat(gt.mean(axis=0, keepdims=True), 50, axis=0)  # low MSE, wrong distribution
    assert wasserstein(mean_pred, gt) > 0.2
    assert wasserstein([[0.0]], [[0.0], [1.0]]) == pytest.approx(0.5)  # different row counts are allowed


# --------------------------------------------------------------------------------------------
# validity
# --------------------------------------------------------------------------------------------


def test_validity_rate():
    assert validity_rate(3, 4) == 0.75
    assert validity_rate(0, 5) == 0.0
    for bad in [(5, 4), (-1, 4), (0, 0)]:
        with pytest.raises(KeyframeMetricError):
            validity_rate(*bad)


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------


def test_fid_identical_sets_is_zero():
    a = np.random.default_rng(0).normal(size=(40, 5))
    assert fid(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fid_shifted_gaussians_is_squared_shift():
    a = np.random.default_rng(1).normal(size=(60, 4))
    shift = np.array([1.0, -2.0, 0.5, 0.0])  # same covariance -> only the means differ
    assert fid(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_fid_one_dimensional_hand_computed():
    # a = {-1, 1}: mean 0, sample variance 2; b = {1, 5}: mean 3, sample variance 8
    # FID = (0 - 3)^2 + (sqrt(2) - sqrt(8))^2 = 9 + 2 = 11
    assert fid([[-1.0], [1.0]], [[1.0], [5.0]]) == pytest.approx(11.0)
    assert fid([[1.0], [5.0]], [[-1.0], [1.0]]) == pytest.approx(11.0)  # symmetric


def test_fid_singular_covariances_stay_finite():
    # 10 embeddings in 256 dimensions: rank-deficient covariances (the small-test-split case)
    a = np.random.default_rng(2).normal(size=(10, 256))
    value = fid(a, a + 1.0)
    assert math.isfinite(value)
    assert value == pytest.approx(256.0, rel=1e-4)
    with pytest.raises(KeyframeMetricError, match="at least 2"):
        fid(a[:1], a)


# --------------------------------------------------------------------------------------------
# R-Precision
# --------------------------------------------------------------------------------------------


def test_r_precision_aligned_embeddings_is_one():
    t = np.random.default_rng(3).normal(size=(96, 8))
    assert r_precision(t, t, batch=32) == {1: 1.0, 2: 1.0, 3: 1.0}


def test_r_precision_known_permutation_hand_computed():
    # 1-D embeddings; N = 4 < batch = 32, so one batch of the 4 pairs is ranked.
    texts = np.array([[0.0], [1.0], [2.0], [3.0]])
    motions = np.array([[1.0], [0.0], [2.0], [3.0]])  # the first two motions swapped
    # text 0: own motion at distance 1, one motion closer (0)           -> ranks 2       -> hit@1 0, hit@2 1
    # text 1: own motion at distance 1, one closer (motion 0 at 0),
    #         one tied (motion 2 at 1) -> rank 2 or 3 with prob. 1/2   -> hit@1 0, hit@2 .5, hit@3 1
    # texts 2, 3: own motion at distance 0                             -> hit 1 at every k
    out = r_precision(texts, motions)
    assert out == {1: pytest.approx(2 / 4), 2: pytest.approx(3.5 / 4), 3: pytest.approx(1.0)}


def test_r_precision_constant_motions_score_exactly_chance():
    rng = np.random.default_rng(4)
    texts = rng.normal(size=(64, 6))
    motions = np.zeros((64, 6))  # a model that outputs the same keyframe for every text
    out = r_precision(texts, motions, batch=32)
    assert out == {1: pytest.approx(1 / 32), 2: pytest.approx(2 / 32), 3: pytest.approx(3 / 32)}


def test_r_precision_drops_the_last_partial_batch():
    rng = np.random.default_rng(5)
    texts = rng.normal(size=(70, 3))
    motions = texts + rng.normal(scale=1.0, size=(70, 3))
    out = r_precision(texts, motions, batch=32, top_k=(1,), seed=7)
    assert 0 < out[1] < 1
    assert out[1] * 64 == pytest.approx(round(out[1] * 64))  # two full batches of 32 = 64 texts scored
    assert r_precision(texts, motions, batch=32, top_k=(1,), seed=7) == out  # seeded shuffle
    # the dropped pairs are the ones the seed put last: scoring the 64 kept ones directly agrees
    kept = np.random.default_rng(7).permutation(70)[:64]
    halves = [r_precision(texts[kept[i : i + 32]], motions[kept[i : i + 32]], batch=32, top_k=(1,))[1] for i in (0, 32)]
    assert out[1] == pytest.approx(np.mean(halves))


# --------------------------------------------------------------------------------------------
# MM-Dist and Diversity
# --------------------------------------------------------------------------------------------


def test_mm_dist_hand_computed():
    t = [[0.0, 0.0], [1.0, 1.0]]
    m = [[3.0, 4.0], [1.0, 1.0]]
    assert mm_dist(t, m) == pytest.approx((5.0 + 0.0) / 2)


def test_diversity_identical_embeddings_is_zero():
    assert diversity(np.ones((20, 4)), n_pairs=300) == 0.0


def test_diversity_expected_value_on_a_simplex():
    # N points, every two sqrt(2) apart (one-hot rows). Pairs are two independent draws without
    # replacement, so P(same row) = 1/N and E[Diversity] = sqrt(2) (1 - 1/N) (Guo et al.'s protocol).
    n = 4
    x = np.eye(n)
    values = np.array([diversity(x, n_pairs=300, seed=s) for s in range(400)])
    # with n_pairs >= N, min(n_pairs, N) = 4 pairs: every value is sqrt(2) * (4 - fixed points) / 4
    steps = values / math.sqrt(2) * 4
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert values.mean() == pytest.approx(math.sqrt(2) * (1 - 1 / n), abs=0.06)


def test_diversity_is_seeded_and_scales_with_the_embeddings():
    x = np.random.default_rng(6).normal(size=(500, 16))
    assert diversity(x, seed=3) == diversity(x, seed=3)
    assert diversity(2 * x, seed=3) == pytest.approx(2 * diversity(x, seed=3))
    # for i.i.d. N(0, I_16) rows the distance of two distinct rows is about sqrt(2 * 16)
    assert diversity(x, n_pairs=300) == pytest.approx(math.sqrt(32), rel=0.1)


# --------------------------------------------------------------------------------------------
# evaluate_keyframes
# --------------------------------------------------------------------------------------------


class LookupEmbedder:
    """A stand-in evaluator: motions embed as themselves, each text as a fixed vector."""

    def __init__(self, table: dict[str, np.ndarray]):
        self.table = table

    def embed_texts(self, texts):
        return np.stack([self.table[t] for t in texts])

    def embed_motions(self, motions):
        return np.asarray(motions, dtype=np.float32)


def _toy_set(n: int = 40, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0, 1, size=(n, 61)).astype(np.float32)
    texts = [f"text {i}" for i in range(n)]
    return gt, texts, LookupEmbedder({t: gt[i] for i, t in enumerate(texts)})


def test_evaluate_keyframes_without_evaluator():
    pred = np.zeros((2, 61), np.float32)
    gt = np.zeros((2, 61), np.float32)
    gt[0, 0] = 1.0  # one coefficient off by 1 out of 122
    out = evaluate_keyframes(pred, gt, ["a", "b"], None, n_valid=1, n_total=2)
    assert set(out) == {"mse", "mae", "rmse", "w_dist", "validity", "diversity"}  # Diversity: raw ARKit values
    assert out["mse"] == pytest.approx(1 / 122)
    assert out["mae"] == pytest.approx(1 / 122)
    assert out["rmse"] == pytest.approx(math.sqrt(1 / 122))
    assert out["w_dist"] == pytest.approx(0.5 / 61)  # channel 0: {0, 0} vs {0, 1}
    assert out["validity"] == 0.5
    with pytest.raises(KeyframeMetricError, match="1 texts for 2 keyframes"):
        evaluate_keyframes(pred, gt, ["a"], None, n_valid=1, n_total=2)


def test_evaluate_keyframes_with_evaluator_perfect_prediction():
    gt, texts, ev = _toy_set()
    out = evaluate_keyframes(gt.copy(), gt, texts, ev, n_valid=40, n_total=40, seed=0)
    assert set(out) == {
        "mse",
        "mae",
        "rmse",
        "w_dist",
        "validity",
        "fid",
        "r_precision_1",
        "r_precision_2",
        "r_precision_3",
        "mmd",
        "diversity",
    }
    assert out["mse"] == 0.0 and out["validity"] == 1.0
    assert out["fid"] == pytest.approx(0.0, abs=1e-6)
    assert out["r_precision_1"] == out["r_precision_2"] == out["r_precision_3"] == 1.0
    assert out["mmd"] == pytest.approx(0.0, abs=1e-6)  # texts embed exactly where their keyframes do
    assert out["diversity"] > 1.0


def test_evaluate_keyframes_with_evaluator_constant_prediction():
    gt, texts, ev = _toy_set(n=20)  # N = 20 < r_batch = 32: one batch of 20
    pred = np.full_like(gt, 0.5)
    out = evaluate_keyframes(pred, gt, texts, ev, n_valid=20, n_total=20, r_batch=32, diversity_pairs=300)
    assert out["r_precision_1"] == pytest.approx(1 / 20)  # chance for a batch of 20
    assert out["r_precision_3"] == pytest.approx(3 / 20)
    assert out["diversity"] == 0.0
    # a zero covariance: FID = ||mu_gt - 0.5||^2 + Tr(S_gt)
    expected_fid = np.square(gt.mean(axis=0) - 0.5).sum() + np.trace(np.cov(gt.astype(np.float64), rowvar=False))
    assert out["fid"] == pytest.approx(float(expected_fid), rel=1e-6)
    # MM-Dist: mean distance of each GT row (its text's embedding) to the constant 0.5 row
    assert out["mmd"] == pytest.approx(float(np.linalg.norm(gt - 0.5, axis=1).mean()), rel=1e-5)
