"""Sequence-level expression metrics of the CTEG paper: Variation, FgD and DoT.

Xu et al., "When Words Smile: Generating Diverse Emotional Facial Expressions from Text"
(EMNLP 2025), Appendix D: Eq. 13 (Variation), Eq. 14 (FgD), Eq. 15 (DoT). Their ground-truth row
on the EmoAva test set (Table 2) is DoT 9.24, FgD 1.26, Variation 0.28.

Provenance of the definitions — read this before comparing numbers with the paper:

* The public EmoAva repository (github.com/WalkerMitty/EmoAva) ships an evaluator only for the
  continuous perplexity (``src/evaluate.py``); it contains no code for Variation, FgD or DoT.
* **Variation** follows the released code of the baseline it comes from, LM-Listener
  (github.com/sanjayss34/lm-listener, ``evaluate_listener.py``: ``np.mean(np.var(seq, axis=0))``
  per sequence, averaged over sequences).
* **FgD** and **DoT** are reconstructions from the metric names and the ground-truth row; the
  Appendix D text was not available when this module was written, so check Eqs. 14-15 in the PDF
  before citing numbers as comparable. Two consistency checks with the release statistics
  (``stage1_std.npy``, sum of per-dimension variances 45.8): frames of unrelated sequences are
  about ``sqrt(2 * 45.8) ~= 9.5`` apart, matching DoT 9.24 as a distance *between* sequences; and
  with Variation 0.28 (within-sequence variance 53 * 0.28 = 14.8), FgD 1.26 as the mean distance
  between *adjacent* frames implies a lag-1 autocorrelation of about 0.95 at 25 fps, a plausible
  smoothness for per-frame EMOCA codes. (A different reading, FgD as a per-dimension RMS diversity
  ``DoT / sqrt(53) ~= 1.27``, fits the same row; it is *not* what is implemented here.)

All metrics work on expression codes as stored (no normalisation, no prepended mean frame) and
accept a sequence of float arrays ``(T_i, D)`` with ``T_i >= 1`` and the same ``D`` (53 for
EmoAva). Everything is vectorised over the concatenated frames; no work happens at import.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

_DEFAULT_MAX_PAIRS = 10_000
_CHUNK_FRAMES = 262_144  # frames gathered at once in dot(); bounds memory to ~100 MB


def _pack(seqs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate ``seqs`` into float64 ``frames`` (N, D) and int64 ``offsets`` (n + 1,)."""
    if len(seqs) == 0:
        raise ValueError("need at least one sequence")
    arrs = [np.asarray(s) for s in seqs]
    if arrs[0].ndim != 2:
        raise ValueError(f"sequence[0] has shape {arrs[0].shape}; expected (T, D)")
    dim = arrs[0].shape[1]
    for i, a in enumerate(arrs):
        if a.ndim != 2 or a.shape[1] != dim:
            raise ValueError(f"sequence[{i}] has shape {a.shape}; expected (T, {dim}) like sequence[0]")
        if a.shape[0] < 1:
            raise ValueError(f"sequence[{i}] is empty")
    lengths = np.fromiter((a.shape[0] for a in arrs), dtype=np.int64, count=len(arrs))
    offsets = np.zeros(len(arrs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    frames = np.concatenate(arrs, axis=0).astype(np.float64, copy=False)  # (N, D)
    if not np.isfinite(frames).all():
        raise ValueError("sequences contain NaN or inf")
    return frames, offsets


# --------------------------------------------------------------------------------------------
# Variation (Eq. 13)
# --------------------------------------------------------------------------------------------


def variation_per_item(seqs: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sequence Variation: ``mean_d Var_t(x[:, d])`` for every sequence, float64 ``(n,)``."""
    frames, offsets = _pack(seqs)
    starts, lengths = offsets[:-1], np.diff(offsets)
    means = np.add.reduceat(frames, starts, axis=0) / lengths[:, None]  # (n, D)
    centred = frames - np.repeat(means, lengths, axis=0)  # (N, D)
    var = np.add.reduceat(centred * centred, starts, axis=0) / lengths[:, None]  # (n, D)
    return var.mean(axis=1)


def variation(seqs: Sequence[np.ndarray]) -> float:
    """Variation — CTEG Appendix D, Eq. 13: how much each sequence moves over time.

    ``Variation = (1/n) sum_i (1/D) sum_d (1/T_i) sum_t (x_i[t, d] - mean_t x_i[:, d])^2``

    i.e. the per-dimension variance over time (population variance, ``ddof=0``), averaged over the
    D dimensions and then over sequences (every sequence weighs the same, whatever its length).
    This is exactly what LM-Listener's released ``evaluate_listener.py`` computes per sequence
    (``np.mean(np.var(seq, axis=0))``) before averaging, which is where the metric comes from.
    A single-frame sequence has Variation 0. Higher means livelier; the GT row is 0.28.
    """
    return float(variation_per_item(seqs).mean())


# --------------------------------------------------------------------------------------------
# FgD (Eq. 14)
# --------------------------------------------------------------------------------------------


def fgd_per_item(seqs: Sequence[np.ndarray]) -> np.ndarray:
    """Per-sequence FgD: mean L2 distance between adjacent frames, float64 ``(n,)``; NaN where T_i = 1."""
    frames, offsets = _pack(seqs)
    step = np.sqrt(np.square(np.diff(frames, axis=0)).sum(axis=1))  # (N-1,) ||x[t+1] - x[t]||
    csum = np.concatenate(([0.0], np.cumsum(step)))  # csum[k] = sum of step[:k]
    starts, ends = offsets[:-1], offsets[1:] - 1  # diffs of sequence i are step[starts[i]:ends[i]]
    counts = ends - starts  # T_i - 1
    totals = csum[ends] - csum[starts]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def fgd(seqs: Sequence[np.ndarray]) -> float:
    """FgD (fine-grained diversity) — CTEG Appendix D, Eq. 14, as reconstructed here.

    ``FgD = (1/|S|) sum_{i in S} (1/(T_i - 1)) sum_{t=1}^{T_i - 1} || x_i[t] - x_i[t-1] ||_2``,
    ``S = {i : T_i >= 2}``

    The average Euclidean (53-d) distance between consecutive frames: the finest-grained change the
    face goes through from one frame to the next, averaged within each sequence, then over sequences.
    A frozen face scores 0; jitter scores high. Interpretation choices: distances are not divided
    by the frame interval (so the value is per frame at the data's 25 fps, not per second);
    single-frame sequences have no transition and are left out of the mean (an error if every
    sequence has one frame). The released EmoAva code has no implementation to compare against
    (see the module docstring); GT row: 1.26.
    """
    per_item = fgd_per_item(seqs)
    valid = per_item[np.isfinite(per_item)]
    if valid.size == 0:
        raise ValueError("FgD needs at least one sequence with 2 or more frames")
    return float(valid.mean())


# --------------------------------------------------------------------------------------------
# DoT (Eq. 15)
# --------------------------------------------------------------------------------------------


def sample_pairs(n: int, max_pairs: int = _DEFAULT_MAX_PAIRS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(a, b)``, ``a != b``, for :func:`dot`.

    All ``n (n - 1) / 2`` unordered pairs when that is at most ``max_pairs`` (exact, no randomness);
    otherwise ``max_pairs`` ordered pairs drawn uniformly with ``numpy.random.default_rng(seed)``.
    """
    if n < 2:
        raise ValueError("need at least two sequences to form pairs")
    if max_pairs < 1:
        raise ValueError("max_pairs must be >= 1")
    if n * (n - 1) // 2 <= max_pairs:
        a, b = np.triu_indices(n, k=1)
        return a.astype(np.int64), b.astype(np.int64)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n, size=max_pairs)
    b = rng.integers(0, n - 1, size=max_pairs)
    b = b + (b >= a)  # uniform over the n - 1 indices other than a
    return a.astype(np.int64), b.astype(np.int64)


def dot_per_pair(seqs: Sequence[np.ndarray], *, max_pairs: int = _DEFAULT_MAX_PAIRS, seed: int = 0) -> np.ndarray:
    """Per-pair DoT terms ``(1/L) sum_{t<L} ||x_a[t] - x_b[t]||``, ``L = min(T_a, T_b)``, float64 ``(P,)``."""
    frames, offsets = _pack(seqs)
    lengths = np.diff(offsets)
    a, b = sample_pairs(len(lengths), max_pairs=max_pairs, seed=seed)
    common = np.minimum(lengths[a], lengths[b])  # (P,)
    out = np.empty(len(a), dtype=np.float64)
    # process pairs in chunks so that at most ~_CHUNK_FRAMES aligned frame pairs are gathered at once
    cum = np.cumsum(common)
    lo = 0
    while lo < len(a):
        base = cum[lo - 1] if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, base + _CHUNK_FRAMES, side="right")))
        c = common[lo:hi]
        pair_start = np.zeros(len(c), dtype=np.int64)
        np.cumsum(c[:-1], out=pair_start[1:])
        t = np.arange(c.sum(), dtype=np.int64) - np.repeat(pair_start, c)  # time index within pair
        ia = np.repeat(offsets[a[lo:hi]], c) + t
        ib = np.repeat(offsets[b[lo:hi]], c) + t
        dist = np.sqrt(np.square(frames[ia] - frames[ib]).sum(axis=1))  # (sum c,)
        out[lo:hi] = np.add.reduceat(dist, pair_start) / c
        lo = hi
    return out


def dot(seqs: Sequence[np.ndarray], *, max_pairs: int = _DEFAULT_MAX_PAIRS, seed: int = 0) -> float:
    """DoT (diversity across sequences, aligned over time) — CTEG Appendix D, Eq. 15, as reconstructed.

    ``DoT = (1/|P|) sum_{(a,b) in P} (1/L_ab) sum_{t=0}^{L_ab - 1} || x_a[t] - x_b[t] ||_2``,
    ``L_ab = min(T_a, T_b)``

    The mean Euclidean distance between two *different* sequences of the set, compared frame by
    frame from their first frames over their common duration, averaged over pairs. It measures how
    different the expressions produced for different utterances are (a model that outputs the same
    face for every text scores 0). Interpretation choices: frames are time-aligned at the start
    (no resampling or DTW); each pair weighs the same; pairs are all unordered pairs when there
    are at most ``max_pairs`` of them, else ``max_pairs`` random pairs (``seed``), as in the
    random-pair "Diversity" of text-to-motion work. With the release statistics a random pair of
    frames is ~9.5 apart, consistent with the GT row's 9.24. The released EmoAva code has no
    implementation to compare against (see the module docstring).
    """
    return float(dot_per_pair(seqs, max_pairs=max_pairs, seed=seed).mean())


# --------------------------------------------------------------------------------------------
# Uncertainty and convenience
# --------------------------------------------------------------------------------------------


def bootstrap_se(
    values_per_item: np.ndarray,
    stat: Callable[..., float] = np.mean,
    n_resamples: int = 1000,
    seed: int = 0,
) -> float:
    """Bootstrap standard error of ``stat`` over items (e.g. :func:`variation_per_item` output).

    Resamples the items with replacement ``n_resamples`` times (``numpy.random.default_rng(seed)``)
    and returns the sample standard deviation (``ddof=1``) of the statistic. Non-finite values
    (e.g. FgD of single-frame sequences) are dropped first. ``stat`` is called as
    ``stat(resamples, axis=1)`` when it accepts ``axis`` (numpy reductions do), else once per
    resample. For DoT the items are pairs that share sequences, so the SE from
    :func:`dot_per_pair` is optimistic.
    """
    values = np.asarray(values_per_item, dtype=np.float64).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size < 2:
        raise ValueError("bootstrap_se needs at least two finite values")
    if n_resamples < 2:
        raise ValueError("n_resamples must be >= 2")
    rng = np.random.default_rng(seed)
    n = values.size
    block = max(1, min(n_resamples, 4_000_000 // n))  # resamples drawn per batch (bounded memory)
    stats: list[np.ndarray] = []
    done = 0
    while done < n_resamples:
        k = min(block, n_resamples - done)
        resampled = values[rng.integers(0, n, size=(k, n))]  # (k, n)
        try:
            s = np.asarray(stat(resampled, axis=1), dtype=np.float64).reshape(-1)
            if s.shape != (k,):
                raise TypeError
        except TypeError:
            s = np.array([stat(row) for row in resampled], dtype=np.float64)
        stats.append(s)
        done += k
    return float(np.std(np.concatenate(stats), ddof=1))


def expression_metrics(seqs: Sequence[np.ndarray], *, max_pairs: int = _DEFAULT_MAX_PAIRS, seed: int = 0) -> dict[str, float]:
    """``{"dot", "fgd", "variation"}`` for ``seqs`` (see :func:`dot`, :func:`fgd`, :func:`variation`)."""
    return {
        "dot": dot(seqs, max_pairs=max_pairs, seed=seed),
        "fgd": fgd(seqs),
        "variation": variation(seqs),
    }
