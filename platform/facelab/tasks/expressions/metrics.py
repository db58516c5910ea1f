"""Sequence-level expression metrics of the CTEG paper: Diversity, MModality, Variation, FgD, DoT, Cppl.

Xu et al., "When Words Smile: Generating Diverse Emotional Facial Expressions from Text"
(EMNLP 2025), Appendix D: Eq. 11 (Diversity), Eq. 12 (MModality), Eq. 13 (Variation), Eq. 14 (FgD),
Eq. 15 (DoT), Eq. 16-18 (continuous perplexity, Cppl). Their ground-truth row on the EmoAva test set
(Table 2) is DoT 9.24, FgD 1.26, Variation 0.28. :mod:`facelab.tasks.expressions.evaluate` runs the whole
evaluation (model and baselines) on top of these functions.
The last section holds the evaluation of the LM-Listener release (L2, FD, P-FD; with Variation, CTEG's
Table 5), which :mod:`facelab.tasks.expressions.listener` runs.

Provenance of the definitions — read this before comparing numbers with the paper:

* The public EmoAva repository (github.com/WalkerMitty/EmoAva) ships an evaluator only for the
  continuous perplexity (``src/evaluate.py``; :func:`cppl` follows its constants and aggregation
  and documents where its code departs from the stated formula); it contains no code for
  Diversity, MModality, Variation, FgD or DoT.
* **Diversity** and **MModality** follow the text-to-motion definitions they are named after
  (random pairs of unconditional samples; two samples per text), with the same between-sequence
  distance as DoT (:func:`sequence_distance`) because EmoAva has no pretrained feature encoder.
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
from scipy.special import log_ndtr, logsumexp

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


def _aligned_distance(frames: np.ndarray, offsets: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(1/L) sum_{t<L} ||x_a[t] - x_b[t]||_2``, ``L = min(T_a, T_b)``, for index pairs ``(a, b)`` of a packed set."""
    lengths = np.diff(offsets)
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


def sequence_distance(seqs_a: Sequence[np.ndarray], seqs_b: Sequence[np.ndarray]) -> np.ndarray:
    """Distance between paired sequences ``seqs_a[k]`` and ``seqs_b[k]``, float64 ``(P,)``.

    ``d(x, y) = (1/L) sum_{t=0}^{L-1} ||x[t] - y[t]||_2``, ``L = min(T_x, T_y)``: the mean Euclidean
    distance of the frames aligned from the start over the common duration. This is the one
    between-sequence distance of this module: DoT (Eq. 15), Diversity (Eq. 11) and MModality
    (Eq. 12) all average it over different sets of pairs.
    """
    if len(seqs_a) != len(seqs_b):
        raise ValueError(f"{len(seqs_a)} first sequences but {len(seqs_b)} second sequences")
    n = len(seqs_a)
    frames, offsets = _pack(list(seqs_a) + list(seqs_b))
    idx = np.arange(n, dtype=np.int64)
    return _aligned_distance(frames, offsets, idx, idx + n)


def dot_per_pair(seqs: Sequence[np.ndarray], *, max_pairs: int = _DEFAULT_MAX_PAIRS, seed: int = 0) -> np.ndarray:
    """Per-pair DoT terms ``(1/L) sum_{t<L} ||x_a[t] - x_b[t]||``, ``L = min(T_a, T_b)``, float64 ``(P,)``."""
    frames, offsets = _pack(seqs)
    a, b = sample_pairs(len(offsets) - 1, max_pairs=max_pairs, seed=seed)
    return _aligned_distance(frames, offsets, a, b)


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
# Diversity (Eq. 11) and MModality (Eq. 12)
# --------------------------------------------------------------------------------------------


def diversity_pairs(n: int, n_pairs: int = 750, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_pairs`` index pairs ``(a, b)``, ``a != b``, of :func:`diversity`.

    With ``n >= 2 * n_pairs`` sequences: a random permutation (``numpy.random.default_rng(seed)``)
    split into two disjoint halves of ``n_pairs`` — every sequence is used at most once, the pairs
    are independent. With fewer sequences: ``n_pairs`` pairs drawn uniformly with replacement
    (``a != b`` within a pair), so the count is always exactly ``n_pairs``.
    """
    if n < 2:
        raise ValueError("need at least two sequences to form pairs")
    if n_pairs < 1:
        raise ValueError("n_pairs must be >= 1")
    rng = np.random.default_rng(seed)
    if n >= 2 * n_pairs:
        perm = rng.permutation(n)
        return perm[:n_pairs].astype(np.int64), perm[n_pairs : 2 * n_pairs].astype(np.int64)
    a = rng.integers(0, n, size=n_pairs)
    b = rng.integers(0, n - 1, size=n_pairs)
    b = b + (b >= a)
    return a.astype(np.int64), b.astype(np.int64)


def diversity_per_pair(seqs: Sequence[np.ndarray], n_pairs: int = 750, seed: int = 0) -> np.ndarray:
    """Per-pair Diversity terms :func:`sequence_distance` over :func:`diversity_pairs`, float64 ``(n_pairs,)``."""
    frames, offsets = _pack(seqs)
    a, b = diversity_pairs(len(offsets) - 1, n_pairs=n_pairs, seed=seed)
    return _aligned_distance(frames, offsets, a, b)


def diversity(seqs: Sequence[np.ndarray], n_pairs: int = 750, seed: int = 0) -> float:
    """Diversity — CTEG Appendix D, Eq. 11: how different the model's expressions are overall.

    ``Diversity = (1/N_d) sum_{k=1}^{N_d} d(x_{a_k}, x_{b_k})``,  ``N_d = 750`` (the paper's),
    ``d(x, y) = (1/L) sum_{t<L} ||x[t] - y[t]||_2``, ``L = min(T_x, T_y)`` (:func:`sequence_distance`)

    ``seqs`` are sequences generated *without* text (unconditional generation, §5); the pairs are
    drawn at random (:func:`diversity_pairs`; disjoint when there are at least ``2 N_d``
    sequences, which is how :mod:`facelab.tasks.expressions.evaluate` calls it). This is the Diversity of
    text-to-motion work (Guo et al., 2020/2022: the mean distance of ``S_d`` random pairs).

    Interpretation choices: text-to-motion computes the distance between fixed-size features of a
    pretrained motion encoder; EmoAva has no such encoder, so the distance is taken on the raw
    expression codes, with the same start-aligned, common-duration frame distance as :func:`dot`
    (so Diversity and DoT are on the same scale: DoT is this quantity over *text-conditioned*
    generations of the test texts, Diversity over unconditional ones).
    """
    return float(diversity_per_pair(seqs, n_pairs=n_pairs, seed=seed).mean())


def mmodality_per_item(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Per-text MModality terms ``d(x_i^(1), x_i^(2))``, float64 ``(N_m,)``."""
    if len(pairs) == 0:
        raise ValueError("need at least one pair")
    for i, pair in enumerate(pairs):
        if len(pair) != 2:
            raise ValueError(f"pairs[{i}] has {len(pair)} sequences; expected 2")
    return sequence_distance([p[0] for p in pairs], [p[1] for p in pairs])


def mmodality(pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """MModality (multimodality) — CTEG Appendix D, Eq. 12: how varied the expressions for one text are.

    ``MModality = (1/N_m) sum_{i=1}^{N_m} d(x_i^(1), x_i^(2))``,  ``N_m = 1,500`` texts (the paper's)

    where ``x_i^(1)``, ``x_i^(2)`` are two sequences sampled independently for the same text ``i``
    and ``d`` is :func:`sequence_distance` (as in :func:`diversity` and :func:`dot`). A model that
    ignores its noise (deterministic given the text) scores 0. Interpretation choices: one pair
    per text, each text weighs the same (text-to-motion's multimodality with ``S_l = 1`` pair per
    condition); raw expression codes instead of encoder features (see :func:`diversity`).
    """
    return float(mmodality_per_item(pairs).mean())


# --------------------------------------------------------------------------------------------
# Continuous perplexity (Eq. 16-18)
# --------------------------------------------------------------------------------------------

CPPL_REGIONS = ("box", "cdf_difference")
CPPL_FLOOR = 1e-10
"""Probability floor of the reference evaluator (``max(prob, eps)``, eps = 1e-10 in ``src/evaluate.py``)."""


def _log_diff_ndtr(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``log(Phi(hi) - Phi(lo))`` for ``lo < hi`` elementwise, accurate in both tails."""
    # Reflect intervals that lie right of 0 into the left tail (Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)),
    # where log Phi is accurate; then log(Phi(b) - Phi(a)) = log Phi(b) + log(-expm1(log Phi(a) - log Phi(b))).
    right = lo > 0
    a = np.where(right, -hi, lo)
    b = np.where(right, -lo, hi)
    log_b = log_ndtr(b)
    return log_b + np.log(-np.expm1(log_ndtr(a) - log_b))


def _log_neg_log_ndtr(y: np.ndarray) -> np.ndarray:
    """``log(-log Phi(y))``; for ``y > 30``, ``-log Phi(y) = Phi(-y) (1 + O(Phi(-y)))`` avoids the underflow of ``log Phi(y)``."""
    with np.errstate(divide="ignore"):
        return np.where(y > 30.0, log_ndtr(-y), np.log(-log_ndtr(np.minimum(y, 30.0))))


def _log_one_minus_cdf(y: np.ndarray) -> np.ndarray:
    """``log(1 - prod_d Phi(y_d))`` over the last axis, accurate when the product is close to 1."""
    log_s = logsumexp(_log_neg_log_ndtr(y), axis=-1)  # log S, S = -sum_d log Phi(y_d) >= 0
    s = np.exp(np.minimum(log_s, 700.0))
    with np.errstate(divide="ignore"):
        return np.where(log_s < -30.0, log_s, np.log(-np.expm1(-s)))  # 1 - e^{-S}; = S when S is tiny


def _log_cdf_difference(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """``log(F(hi) - F(lo))``, ``F(y) = prod_d Phi(y_d)`` over the last axis, for ``lo < hi`` elementwise."""
    log_f_hi = log_ndtr(hi).sum(axis=-1)
    log_f_lo = log_ndtr(lo).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        direct = log_f_hi + np.log(-np.expm1(log_f_lo - log_f_hi))
        # both CDFs near 1: F(hi) - F(lo) = (1 - F(lo)) - (1 - F(hi)), each in log space
        c_lo, c_hi = _log_one_minus_cdf(lo), _log_one_minus_cdf(hi)
        complement = c_lo + np.log(-np.expm1(c_hi - c_lo))
    return np.where(log_f_lo > np.log(0.5), complement, direct)


def frame_log_prob(
    means: np.ndarray,
    targets: np.ndarray,
    delta: float = 0.8,
    sigma: float = 0.2,
    region: str = "box",
) -> np.ndarray:
    """Natural-log probability of each target frame under ``N(mu, sigma^2 I)``; arrays ``(..., D)`` -> ``(...)``.

    ``region="box"`` (Eq. 17 as stated: the mass of the neighbourhood ``[x - delta, x + delta]``):
    ``log p = sum_d log(Phi((x_d + delta - mu_d)/sigma) - Phi((x_d - delta - mu_d)/sigma))``.

    ``region="cdf_difference"`` (what the reference code computes): ``p = F(x + delta) - F(x - delta)``
    with ``F`` the joint CDF, ``F(y) = prod_d Phi((y_d - mu_d)/sigma)``; for ``D > 1`` that is the
    mass of ``{y <= x + delta} minus {y <= x - delta}`` (an L-shaped region containing the box), not
    of the box. Both in closed form and in log space, exact (no Monte Carlo), finite however far
    ``x`` is from ``mu``. No floor is applied here.
    """
    if region not in CPPL_REGIONS:
        raise ValueError(f"region must be one of {CPPL_REGIONS}, got {region!r}")
    if not (delta > 0 and sigma > 0):
        raise ValueError("delta and sigma must be > 0")
    mu = np.asarray(means, dtype=np.float64)
    x = np.asarray(targets, dtype=np.float64)
    if mu.shape != x.shape:
        raise ValueError(f"means {mu.shape} and targets {x.shape} differ in shape")
    lo = (x - delta - mu) / sigma
    hi = (x + delta - mu) / sigma
    if region == "box":
        return _log_diff_ndtr(lo, hi).sum(axis=-1)
    return _log_cdf_difference(lo, hi)


def cppl_per_item(
    means: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    delta: float = 0.8,
    sigma: float = 0.2,
    *,
    region: str = "box",
    floor: float | None = CPPL_FLOOR,
) -> np.ndarray:
    """Per-sequence cross-entropy ``H_i = -(1/N_i) sum_j log p_ij`` in nats (Eq. 18's inner mean), float64 ``(n,)``.

    ``means[i]`` and ``targets[i]`` are ``(N_i, D)`` arrays of the same shape: the predicted means and
    the frames they predict (for CTEG: the ``T_i`` frames and the zero-face terminator). ``p_ij``
    is :func:`frame_log_prob`; with ``floor`` (default 1e-10, the reference's) ``p_ij`` is clamped
    to at least ``floor`` first, so one frame contributes at most ``-log(floor)`` (23.0 nats);
    ``floor=None`` (or 0) scores the exact probability. Feed the result to :func:`perplexity` or
    to :func:`bootstrap_se` with ``stat=perplexity``.
    """
    if len(means) != len(targets):
        raise ValueError(f"{len(means)} mean sequences but {len(targets)} target sequences")
    mu, offsets = _pack(means)
    x, offsets_x = _pack(targets)
    if mu.shape != x.shape or not np.array_equal(offsets, offsets_x):
        bad = next(i for i, (m, t) in enumerate(zip(means, targets)) if np.shape(m) != np.shape(t))
        raise ValueError(
            f"means[{bad}] {np.shape(means[bad])} and targets[{bad}] {np.shape(targets[bad])} differ in shape"
        )
    logp = frame_log_prob(mu, x, delta, sigma, region)  # (N,)
    if floor:
        logp = np.maximum(logp, np.log(floor))
    return -np.add.reduceat(logp, offsets[:-1]) / np.diff(offsets)


def perplexity(nll_per_item: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    """``exp(mean(H_i))`` over ``axis``: Cppl from :func:`cppl_per_item` (usable as a bootstrap ``stat``)."""
    return np.exp(np.mean(nll_per_item, axis=axis))


def cppl(
    means: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    delta: float = 0.8,
    sigma: float = 0.2,
    *,
    region: str = "box",
    floor: float | None = CPPL_FLOOR,
) -> float:
    """Cppl (continuous perplexity) — CTEG Appendix D, Eq. 16-18. Lower is better; 1 is the minimum.

    Eq. 16: the model's prediction for a frame is the Gaussian ``N(mu, sigma^2 I)`` around its
    predicted mean ``mu`` (sigma = 0.2). Eq. 17: the probability of the true frame ``x`` is the mass
    of its neighbourhood ``[x - delta, x + delta]`` (delta = 0.8); with the diagonal covariance it
    factorises, ``p(x) = prod_{d=1}^{53} [Phi((x_d + delta - mu_d)/sigma) - Phi((x_d - delta - mu_d)/sigma)]``.
    Eq. 18: perplexity as for a language model, ``Cppl = exp((1/n) sum_i H_i)``,
    ``H_i = -(1/N_i) sum_{j=1}^{N_i} log p_ij`` — the mean per-frame surprisal of each sequence,
    averaged over sequences (each sequence weighs the same), then exponentiated.

    Aggregation and constants follow the reference evaluator (WalkerMitty/EmoAva
    ``src/evaluate.py``: ``sigma=0.2``, ``threshold=0.8``; log2 per frame, mean over a sequence's
    valid frames, mean over sequences, ``2**H`` — identical to the natural-log form here; every
    probability clamped at ``eps=1e-10``, reproduced by ``floor``). Two points where the reference
    *code* differs and this function offers it as an option:

    * it evaluates ``p = F(x + delta) - F(x - delta)`` with the joint CDF ``F`` of
      ``scipy.stats.multivariate_normal`` — not the box mass for D > 1 (see :func:`frame_log_prob`);
      ``region="cdf_difference"`` computes exactly that quantity, in closed form (the reference
      gets it by quasi-Monte Carlo integration, default tolerance ~1e-5, so its values below
      ~1e-5 are integration noise, then floored);
    * which frames are scored and what ``mu`` is are decided by the caller (see
      :func:`facelab.tasks.expressions.evaluate.evaluate_model`).

    Without the floor a frame far from its prediction has ``log p`` of order ``-(53/2)(|x-mu|/sigma)^2``
    and Cppl can overflow to ``inf``; it stays finite per frame either way.
    """
    return float(perplexity(cppl_per_item(means, targets, delta, sigma, region=region, floor=floor)))


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


def expression_metrics(
    seqs: Sequence[np.ndarray], *, max_pairs: int = _DEFAULT_MAX_PAIRS, seed: int = 0
) -> dict[str, float]:
    """``{"dot", "fgd", "variation"}`` for ``seqs`` (see :func:`dot`, :func:`fgd`, :func:`variation`)."""
    return {
        "dot": dot(seqs, max_pairs=max_pairs, seed=seed),
        "fgd": fgd(seqs),
        "variation": variation(seqs),
    }


# --------------------------------------------------------------------------------------------
# LM-Listener's evaluation: L2, FD, Variation, P-FD (CTEG Appendix C, Table 5)
# --------------------------------------------------------------------------------------------
#
# Ng et al., "Can Language Models Learn to Listen?" (ICCV 2023), as its release computes them:
# github.com/sanjayss34/lm-listener ``evaluate_listener.py`` (``main``, with its helpers
# ``calculate_activation_statistics`` and ``calculate_frechet_distance``). Everything is per item --
# one generated sequence against the ground-truth sequence of the same test window, frames aligned
# from the start -- and the reported number is the plain mean over items. Variation is
# :func:`variation` above (``np.mean(np.var(pred, axis=0))`` per sequence).


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of the rows of ``features`` ``(T, D)``.

    ``evaluate_listener.py`` ``calculate_activation_statistics``: ``np.mean(axis=0)`` and
    ``np.cov(rowvar=False)`` (the unbiased estimate, divided by ``T - 1``), here in float64.
    """
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need (T, D) features with T >= 2 for a covariance, got shape {x.shape}")
    return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance of two Gaussians: ``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^{1/2})``.

    ``evaluate_listener.py`` ``calculate_frechet_distance``, step for step: the matrix square root of
    ``S1 S2`` by ``scipy.linalg.sqrtm``; if it is not finite, ``eps`` (1e-6) is added to both
    diagonals and the root taken again; an imaginary part is dropped when the diagonal's imaginary
    parts are within 1e-3 of zero, else :class:`ValueError` (the release raises there too). (The
    release calls ``sqrtm(..., disp=False)``, whose second output it ignores; SciPy >= 1.16
    deprecates ``disp``, and the root is the same.)
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"mean shapes {mu1.shape} / {mu2.shape} or covariance shapes {sigma1.shape} / {sigma2.shape} differ"
        )
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the covariance root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def _aligned(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs ``(gt_i[:L], pred_i[:L])``, ``L = min(T_gt, T_pred)``, float64; checks counts and widths."""
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} ground-truth sequences but {len(pred)} predicted ones")
    out = []
    for i, (g, p) in enumerate(zip(gt, pred)):
        g, p = np.asarray(g, dtype=np.float64), np.asarray(p, dtype=np.float64)
        if g.ndim != 2 or p.ndim != 2 or g.shape[1] != p.shape[1] or min(len(g), len(p)) < 1:
            raise ValueError(f"item {i}: ground truth {g.shape} and prediction {p.shape} are not (T, D) with one D")
        n = min(len(g), len(p))
        out.append((g[:n], p[:n]))
    return out


def listener_l2_per_item(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> np.ndarray:
    """Per-item L2 of ``evaluate_listener.py``: ``((gt - pred) ** 2).mean()`` over the aligned frames and
    all dimensions (a mean squared error, despite the name), float64 ``(n,)``.

    The release takes the ground truth of the predicted window (``gt`` has ``pred``'s length); here
    both are cut to the common length ``min(T_gt, T_pred)`` (a prediction longer than its window
    would be skipped by the release's "NOT FOUND" branch)."""
    return np.array([float(np.mean(np.square(g - p))) for g, p in _aligned(gt, pred)])


def _fd_item(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return float("nan")  # np.cov of one frame is undefined (the release would print NaN)
    try:
        return frechet_distance(*activation_statistics(a), *activation_statistics(b))
    except (ValueError, np.linalg.LinAlgError):
        return float("nan")


def listener_fd_per_item(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> np.ndarray:
    """Per-item FD of ``evaluate_listener.py`` ("1. fid"): :func:`frechet_distance` between the Gaussians
    fitted (:func:`activation_statistics`) to the ground truth's and the prediction's frames of one
    window, each frame a sample; float64 ``(n,)``. NaN where fewer than 2 frames align, or where the
    covariance root has a large imaginary part (the release raises there); :func:`listener_fd` leaves
    those out."""
    return np.array([_fd_item(g, p) for g, p in _aligned(gt, pred)])


def listener_pfd_per_item(
    gt: Sequence[np.ndarray], pred: Sequence[np.ndarray], speaker: Sequence[np.ndarray]
) -> np.ndarray:
    """Per-item P-FD (paired FD) of ``evaluate_listener.py`` ("2. paired fid"): the FD of the joint
    frames ``[speaker | listener]`` -- the speaker's frames of the window concatenated with the ground
    truth's, against the same speaker frames concatenated with the prediction's. It scores whether the
    listener moves *with* the speaker, not only like a listener. ``speaker[i]`` must cover the aligned
    frames (``T_speaker >= min(T_gt, T_pred)``); NaN as in :func:`listener_fd_per_item`."""
    pairs = _aligned(gt, pred)
    if len(speaker) != len(pairs):
        raise ValueError(f"{len(speaker)} speaker sequences for {len(pairs)} items")
    out = []
    for i, ((g, p), s) in enumerate(zip(pairs, speaker)):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim != 2 or len(s) < len(g):
            raise ValueError(f"item {i}: speaker frames {s.shape} do not cover the {len(g)} aligned frames")
        out.append(_fd_item(np.concatenate([s[: len(g)], g], 1), np.concatenate([s[: len(p)], p], 1)))
    return np.array(out)


def _finite_mean(values: np.ndarray, what: str) -> float:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(f"{what}: no item has a finite value")
    return float(finite.mean())


def listener_l2(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> float:
    """L2 of the LM-Listener evaluation (CTEG Table 5, lower is better): mean of :func:`listener_l2_per_item`."""
    return _finite_mean(listener_l2_per_item(gt, pred), "L2")


def listener_fd(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray]) -> float:
    """FD of the LM-Listener evaluation (lower is better): mean of the finite :func:`listener_fd_per_item`."""
    return _finite_mean(listener_fd_per_item(gt, pred), "FD")


def listener_pfd(gt: Sequence[np.ndarray], pred: Sequence[np.ndarray], speaker: Sequence[np.ndarray]) -> float:
    """P-FD of the LM-Listener evaluation (lower is better): mean of the finite :func:`listener_pfd_per_item`."""
    return _finite_mean(listener_pfd_per_item(gt, pred, speaker), "P-FD")
