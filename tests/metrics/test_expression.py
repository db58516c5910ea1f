"""CTEG expression metrics against small cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from facelab.metrics.expression import (
    bootstrap_se,
    dot,
    dot_per_pair,
    expression_metrics,
    fgd,
    fgd_per_item,
    sample_pairs,
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
