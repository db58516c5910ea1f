"""CTEG expression metrics against small cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facelab.tasks.expressions.metrics import (
    bootstrap_se,
    cppl,
    cppl_per_item,
    diversity,
    diversity_pairs,
    diversity_per_pair,
    dot,
    dot_per_pair,
    expression_metrics,
    fgd,
    fgd_per_item,
    frame_log_prob,
    mmodality,
    mmodality_per_item,
    perplexity,
    sample_pairs,
    sequence_distance,
    variation,
    variation_per_item,
)


def a(rows) -> np.ndarray:
    return np.asarray(rows, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Variation (Eq. 13)
# --------------------------------------------------------------------------------------------


def test_variation_hand_computed():
    # A: dim0 = 0, 2 -> mean 1, var ((1 + 1) / 2) = 1; dim1 constant -> 0; mean over dims = 0.5
    seq_a = a([[0, 0], [2, 0]])
    # B: dim0 constant -> 0; dim1 = 1, 1, 4 -> mean 2, var (1 + 1 + 4) / 3 = 2; mean over dims = 1.0
    seq_b = a([[1, 1], [1, 1], [1, 4]])
    # C: one frame -> 0
    seq_c = a([[5, -3]])
    np.testing.assert_allclose(variation_per_item([seq_a, seq_b, seq_c]), [0.5, 1.0, 0.0])
    assert variation([seq_a, seq_b]) == pytest.approx(0.75)  # sequences weigh equally
    assert variation([seq_a, seq_b, seq_c]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# FgD (Eq. 14)
# --------------------------------------------------------------------------------------------


def test_fgd_hand_computed():
    seq_a = a([[0, 0], [3, 4]])  # one step of length 5
    seq_b = a([[0, 0], [0, 1], [0, 3]])  # steps 1 and 2 -> mean 1.5
    seq_c = a([[7, 7]])  # no step: left out of the mean
    per_item = fgd_per_item([seq_a, seq_b, seq_c])
    np.testing.assert_allclose(per_item[:2], [5.0, 1.5])
    assert np.isnan(per_item[2])
    assert fgd([seq_a, seq_b, seq_c]) == pytest.approx(3.25)
    # steps never cross sequence boundaries: (3,4) -> (0,0) between A and B is not a step
    assert fgd([seq_a, seq_b]) == pytest.approx(3.25)


def test_fgd_needs_a_sequence_with_two_frames():
    with pytest.raises(ValueError, match="2 or more frames"):
        fgd([a([[1, 2]]), a([[3, 4]])])


# --------------------------------------------------------------------------------------------
# DoT (Eq. 15)
# --------------------------------------------------------------------------------------------


def test_dot_hand_computed():
    seq_a = a([[0, 0], [3, 4]])  # T = 2
    seq_b = a([[0, 0], [0, 0], [9, 9]])  # T = 3
    seq_c = a([[1, 0]])  # T = 1
    # (A, B): common length 2: |(0,0)-(0,0)| = 0, |(3,4)-(0,0)| = 5 -> 2.5
    # (A, C): common length 1: |(0,0)-(1,0)| = 1 -> 1
    # (B, C): common length 1: |(0,0)-(1,0)| = 1 -> 1
    np.testing.assert_allclose(dot_per_pair([seq_a, seq_b, seq_c]), [2.5, 1.0, 1.0])
    assert dot([seq_a, seq_b, seq_c]) == pytest.approx(1.5)
    assert dot([seq_a, seq_b]) == pytest.approx(2.5)


def test_dot_of_identical_sequences_is_zero():
    seq = a([[1, 2], [3, 4], [5, 6]])
    assert dot([seq, seq.copy(), seq[:2].copy()]) == 0.0


def test_dot_pairs_exact_when_few_and_sampled_when_many():
    first, second = sample_pairs(4, max_pairs=6)
    assert list(zip(first.tolist(), second.tolist())) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    first, second = sample_pairs(1000, max_pairs=500, seed=3)
    assert len(first) == 500 and (first != second).all()
    again = sample_pairs(1000, max_pairs=500, seed=3)
    assert (again[0] == first).all() and (again[1] == second).all()

    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(int(rng.integers(1, 30)), 53)) for _ in range(200)]
    exact = dot(seqs, max_pairs=10**6)  # all 19,900 pairs
    sampled = dot(seqs, max_pairs=5000, seed=1)
    assert sampled == pytest.approx(exact, rel=0.02)
    assert dot(seqs, max_pairs=5000, seed=1) == sampled  # deterministic for a seed


def test_dot_needs_two_sequences():
    with pytest.raises(ValueError, match="two sequences"):
        dot([a([[0, 0]])])


# --------------------------------------------------------------------------------------------
# Shared properties and input checks
# --------------------------------------------------------------------------------------------


def test_metrics_ignore_a_common_offset_and_sequence_order():
    rng = np.random.default_rng(5)
    seqs = [rng.normal(size=(t, 53)) for t in (4, 9, 2, 15)]
    shifted = [s + 10.0 for s in seqs]
    base = expression_metrics(seqs)
    for key, value in expression_metrics(shifted).items():
        assert value == pytest.approx(base[key], rel=1e-9)
    reordered = seqs[::-1]
    assert variation(reordered) == pytest.approx(base["variation"])
    assert fgd(reordered) == pytest.approx(base["fgd"])
    assert dot(reordered) == pytest.approx(base["dot"])  # all pairs: order-free


@pytest.mark.parametrize(
    "seqs, match",
    [
        ([], "at least one sequence"),
        ([a([[0, 0]]), a([[0, 0, 0]])], r"sequence\[1\] has shape"),
        ([a(np.zeros((0, 2)))], r"sequence\[0\] is empty"),
        ([a([[0, np.nan]])], "NaN or inf"),
    ],
)
def test_bad_input_is_rejected(seqs, match):
    with pytest.raises(ValueError, match=match):
        variation(seqs)


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


def test_bootstrap_se_matches_the_analytic_standard_error():
    values = np.arange(100, dtype=np.float64)
    # SE of the mean under the bootstrap = population std / sqrt(n) = sqrt((100^2 - 1) / 12) / 10
    expected = np.sqrt((100**2 - 1) / 12) / 10  # 2.8866
    assert bootstrap_se(values, n_resamples=4000, seed=0) == pytest.approx(expected, rel=0.05)


def test_bootstrap_se_properties():
    assert bootstrap_se(np.full(10, 3.0)) == 0.0
    values = np.array([0.0, 1.0, 5.0, np.nan, 2.0])  # NaN (e.g. a one-frame FgD item) is dropped
    assert bootstrap_se(values, seed=1) == bootstrap_se(values[[0, 1, 2, 4]], seed=1)
    assert bootstrap_se(values, seed=1) == bootstrap_se(values, seed=1)
    # any statistic: vectorised numpy reductions and plain callables give the same answer
    vec = bootstrap_se(np.arange(30.0), stat=np.median, n_resamples=300, seed=2)
    loop = bootstrap_se(np.arange(30.0), stat=lambda x: float(np.median(x)), n_resamples=300, seed=2)
    assert vec == pytest.approx(loop)
    with pytest.raises(ValueError):
        bootstrap_se(np.array([1.0]))


# --------------------------------------------------------------------------------------------
# Sequence distance, Diversity (Eq. 11), MModality (Eq. 12)
# --------------------------------------------------------------------------------------------


def test_sequence_distance_hand_computed_and_shared_with_dot():
    x = a([[0, 0], [3, 4], [1, 1]])  # T = 3
    y = a([[0, 0], [0, 0]])  # T = 2: common length 2 -> (0 + 5) / 2
    z = a([[1, 0], [9, 9], [9, 9], [9, 9]])  # vs x: common 3 -> (1 + |(3,4)-(9,9)| + |(1,1)-(9,9)|) / 3
    np.testing.assert_allclose(sequence_distance([x, x], [y, z]), [2.5, (1 + np.sqrt(36 + 25) + np.sqrt(128)) / 3])
    np.testing.assert_allclose(sequence_distance([y], [x]), [2.5])  # symmetric
    assert dot([x, y]) == pytest.approx(2.5)  # DoT of two sequences is this same distance
    with pytest.raises(ValueError, match="first sequences"):
        sequence_distance([x], [y, z])


def test_mmodality_hand_computed():
    pairs = [
        (a([[0, 0], [3, 4]]), a([[0, 0], [0, 0], [9, 9]])),  # common length 2: (0 + 5) / 2 = 2.5
        (a([[1, 0]]), a([[0, 0], [5, 5]])),  # common length 1: 1
        (a([[2, 2], [2, 2]]), a([[2, 2], [2, 2]])),  # identical samples: 0
    ]
    np.testing.assert_allclose(mmodality_per_item(pairs), [2.5, 1.0, 0.0])
    assert mmodality(pairs) == pytest.approx(3.5 / 3)
    with pytest.raises(ValueError, match="expected 2"):
        mmodality([(a([[0, 0]]),)])


def _level(k: float, t: int) -> np.ndarray:
    """t frames all equal to (k, 0): any two such sequences are |k - k'| apart."""
    return a([[k, 0.0]] * t)


def test_diversity_pairs_are_disjoint_when_enough_sequences():
    a_idx, b_idx = diversity_pairs(10, n_pairs=5, seed=4)
    assert len(a_idx) == 5 and len(set(a_idx.tolist()) | set(b_idx.tolist())) == 10  # each used once
    again = diversity_pairs(10, n_pairs=5, seed=4)
    assert (again[0] == a_idx).all() and (again[1] == b_idx).all()
    a_idx, b_idx = diversity_pairs(3, n_pairs=50, seed=0)  # too few: drawn with replacement
    assert len(a_idx) == 50 and (a_idx != b_idx).all()
    with pytest.raises(ValueError, match="two sequences"):
        diversity_pairs(1, 3)


def test_diversity_hand_computed():
    seqs = [_level(k, t) for k, t in zip([0.0, 1.0, 3.0, 7.0], [2, 5, 1, 3])]
    a_idx, b_idx = diversity_pairs(4, n_pairs=2, seed=1)
    levels = np.array([0.0, 1.0, 3.0, 7.0])
    expected = np.abs(levels[a_idx] - levels[b_idx])  # hand: constant sequences are |k - k'| apart
    np.testing.assert_allclose(diversity_per_pair(seqs, n_pairs=2, seed=1), expected)
    assert diversity(seqs, n_pairs=2, seed=1) == pytest.approx(expected.mean())
    # two sequences: every pair is (0, 1) or (1, 0), 4 apart
    assert diversity([_level(0, 3), _level(4, 2)], n_pairs=7) == pytest.approx(4.0)
    # a model that always produces the same face has zero diversity
    assert diversity([_level(2, 4)] * 6, n_pairs=3) == 0.0


# --------------------------------------------------------------------------------------------
# Continuous perplexity (Eq. 16-18)
# --------------------------------------------------------------------------------------------

PHI4 = 0.9999683287581669  # Φ(4) = Φ(δ/σ) for δ = 0.8, σ = 0.2 (tables / mpmath)


def test_cppl_hand_computed_single_frames():
    # prediction exactly on target: every dimension keeps the mass of [-4σ, 4σ] = 2Φ(4) - 1
    zero = np.zeros((1, 53))
    assert cppl([zero], [zero]) == pytest.approx((2 * PHI4 - 1) ** -53, rel=1e-12)
    # one dimension off by exactly δ: that dimension's box is [0, 8σ] -> Φ(8) - Φ(0) = 0.5 - 6.2e-16
    mu = zero.copy()
    mu[0, 0] = -0.8
    expected = (2 * PHI4 - 1) ** 52 * (0.5 - 6.22096057427174e-16)
    assert frame_log_prob(mu[0], zero[0]) == pytest.approx(np.log(expected), rel=1e-12)
    assert cppl([mu], [zero]) == pytest.approx(1 / expected, rel=1e-12)


def test_cppl_aggregates_per_sequence_then_over_sequences():
    # D = 1, σ = 0.2, δ = 0.8. Offsets x - μ of 0 and 0.8 give p0 = 2Φ(4) - 1 and p1 = Φ(8) - Φ(0).
    p0, p1 = 2 * PHI4 - 1, 0.5 - 6.22096057427174e-16
    f64 = lambda rows: np.asarray(rows, dtype=np.float64)  # noqa: E731  (0.8 exactly, not float32's)
    seq_a = (f64([[0.0], [0.0], [0.0]]), f64([[0.0], [0.0], [0.8]]))  # frames: p0, p0, p1
    seq_b = (f64([[0.0]]), f64([[0.8]]))  # frame: p1
    h_a = -(2 * np.log(p0) + np.log(p1)) / 3
    h_b = -np.log(p1)
    means, targets = [seq_a[0], seq_b[0]], [seq_a[1], seq_b[1]]
    np.testing.assert_allclose(cppl_per_item(means, targets), [h_a, h_b], rtol=1e-12)
    assert cppl(means, targets) == pytest.approx(np.exp((h_a + h_b) / 2), rel=1e-12)
    # not the frame-pooled perplexity exp(mean over all 4 frames)
    assert cppl(means, targets) != pytest.approx(np.exp(-(2 * np.log(p0) + 2 * np.log(p1)) / 4), rel=1e-3)
    assert perplexity(np.array([h_a, h_b])) == pytest.approx(cppl(means, targets))


def _density(mu, sigma):
    """The N(mu, sigma^2 I) density as a plain-Python function of the coordinates (fast under nquad)."""
    norm_const = (sigma * math.sqrt(2 * math.pi)) ** len(mu)
    mu = [float(m) for m in mu]

    def density(*y):
        return math.exp(-0.5 * sum(((yi - mi) / sigma) ** 2 for yi, mi in zip(y, mu))) / norm_const

    return density


def _integrate(mu, sigma, ranges):
    from scipy import integrate

    value, _ = integrate.nquad(_density(mu, sigma), ranges, opts={"epsabs": 0.0, "epsrel": 1e-9})
    return value


def _box_by_quadrature(mu, x, delta, sigma):
    return _integrate(mu, sigma, [(xi - delta, xi + delta) for xi in x])


def _cdf_difference_by_quadrature(mu, x, delta, sigma):
    # F(u) = integral over (-inf, u]; the density is < 1e-31 beyond 12σ, so start there
    def cdf(upper):
        return _integrate(mu, sigma, [(m - 12 * sigma, u) for m, u in zip(mu, upper)])

    return cdf(x + delta) - cdf(x - delta)


@pytest.mark.parametrize(
    "mu, x",
    [
        ([0.1, -0.3], [0.5, 0.2]),
        ([0.0, 0.0, 0.0], [0.05, -0.6, 0.3]),
        ([1.0, -1.0, 0.2], [0.4, -0.7, 0.9]),
        ([0.3, 0.0], [1.4, -0.9]),  # both dimensions more than δ away: small but nonzero mass
    ],
)
def test_cppl_closed_form_matches_numerical_integration(mu, x):
    mu, x = np.asarray(mu), np.asarray(x)
    box = _box_by_quadrature(mu, x, 0.8, 0.2)
    assert np.exp(frame_log_prob(mu, x, 0.8, 0.2)) == pytest.approx(box, rel=1e-6)
    if len(mu) == 2:  # (3-d semi-infinite quadrature is slow; the 3-d case is checked against scipy below)
        diff = _cdf_difference_by_quadrature(mu, x, 0.8, 0.2)
        assert np.exp(frame_log_prob(mu, x, 0.8, 0.2, region="cdf_difference")) == pytest.approx(diff, rel=1e-6)
    # other δ, σ
    box = _box_by_quadrature(mu, x, 0.3, 0.5)
    assert np.exp(frame_log_prob(mu, x, 0.3, 0.5)) == pytest.approx(box, rel=1e-6)


def test_cppl_matches_scipy_multivariate_normal_box():
    from scipy.stats import multivariate_normal

    mu, x = np.array([0.2, -0.1, 0.5]), np.array([0.4, 0.3, 0.1])
    mvn = multivariate_normal(mu, np.diag([0.04] * 3))
    box = mvn.cdf(x + 0.8, lower_limit=x - 0.8)  # quasi-Monte Carlo, ~1e-5 absolute
    assert np.exp(frame_log_prob(mu, x)) == pytest.approx(box, abs=1e-5)
    # the reference code's quantity, F(x + δ) - F(x - δ), is a different (larger) number for D > 1
    ref = mvn.cdf(x + 0.8) - mvn.cdf(x - 0.8)
    assert np.exp(frame_log_prob(mu, x, region="cdf_difference")) == pytest.approx(ref, abs=1e-5)
    assert ref > box + 1e-4


def _mp_log_box(z_lo, z_hi):
    import mpmath

    z_lo, z_hi = mpmath.mpf(z_lo), mpmath.mpf(z_hi)
    if z_lo > 0:  # Φ(hi) - Φ(lo) = Φ(-lo) - Φ(-hi): stay in the left tail, where the digits are
        z_lo, z_hi = -z_hi, -z_lo
    return float(mpmath.log(mpmath.ncdf(z_hi) - mpmath.ncdf(z_lo)))


@pytest.mark.parametrize("offset", [3.0, -3.0, 10.0, -10.0, 60.0, -60.0, 400.0])
def test_cppl_extreme_tails_are_finite_and_exact(offset):
    import mpmath

    mpmath.mp.dps = 60
    # 1-D: target `offset` away from the mean -> box in units of σ is [(offset - δ)/σ, (offset + δ)/σ]
    lo, hi = (offset - 0.8) / 0.2, (offset + 0.8) / 0.2
    expected = _mp_log_box(lo, hi)
    got = frame_log_prob(np.zeros(1), np.array([offset]))
    assert np.isfinite(got)
    assert got == pytest.approx(expected, rel=1e-9)
    # 53-d: the sum over dimensions, still finite, and the floor caps each frame at -log(1e-10)
    got53 = frame_log_prob(np.zeros(53), np.full(53, offset))
    assert np.isfinite(got53) and got53 == pytest.approx(53 * expected, rel=1e-9)
    frames = [np.zeros((4, 53))]
    far = [np.full((4, 53), offset)]
    assert cppl(frames, far) == pytest.approx(1e10, rel=1e-9)  # the reference's floor
    nll = cppl_per_item(frames, far, floor=None)
    assert np.isfinite(nll).all() and nll[0] == pytest.approx(-53 * expected, rel=1e-9)


@pytest.mark.parametrize("offset", [1.0, 6.0, -6.0, 60.0])
def test_cppl_cdf_difference_tails_are_finite_and_exact(offset):
    import mpmath

    mpmath.mp.dps = 400
    d = 53
    lo, hi = mpmath.mpf(offset - 0.8) / mpmath.mpf(0.2), mpmath.mpf(offset + 0.8) / mpmath.mpf(0.2)
    if offset < 30:
        expected = float(mpmath.log(mpmath.ncdf(hi) ** d - mpmath.ncdf(lo) ** d))
    else:  # 1 - Φ(z) ~ 1e-13000: use F(hi) - F(lo) = d Q(lo) - d Q(hi) + O(Q^2), Q = upper tail
        expected = float(mpmath.log(d * (mpmath.ncdf(-lo) - mpmath.ncdf(-hi))))
    got = frame_log_prob(np.zeros(d), np.full(d, offset), region="cdf_difference")
    assert np.isfinite(got) and got == pytest.approx(expected, rel=1e-9)


def test_cppl_input_checks():
    with pytest.raises(ValueError, match="differ in shape"):
        cppl([np.zeros((3, 53))], [np.zeros((4, 53))])
    with pytest.raises(ValueError, match="target sequences"):
        cppl([np.zeros((3, 53))], [])
    with pytest.raises(ValueError, match="region"):
        frame_log_prob(np.zeros(2), np.zeros(2), region="sphere")
    with pytest.raises(ValueError, match="delta and sigma"):
        frame_log_prob(np.zeros(2), np.zeros(2), sigma=0.0)


def test_cppl_bootstrap_with_the_perplexity_statistic():
    rng = np.random.default_rng(0)
    targets = [rng.normal(size=(t, 53)) for t in (5, 9, 3, 12, 7, 4)]
    means = [t + rng.normal(scale=0.15, size=t.shape) for t in targets]
    nll = cppl_per_item(means, targets)
    se = bootstrap_se(nll, stat=perplexity, n_resamples=300, seed=0)
    loop = bootstrap_se(nll, stat=lambda v: float(np.exp(np.mean(v))), n_resamples=300, seed=0)
    assert se == pytest.approx(loop) and se > 0
