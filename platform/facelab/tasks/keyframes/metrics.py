"""Keyframe metrics of KeyframeFace (Wu et al. 2025, arXiv 2512.11321), §5.3 and Appendix C.

Every metric compares predicted ARKit keyframes with the ground truth, both float arrays
``(N, 61)`` (row ``i`` of ``pred`` is the prediction for row ``i`` of ``gt`` and for text ``i``),
in the release's channel order (:data:`facelab.data.arkit.CHANNELS`):

* parameter space — :func:`regression_errors` (MSE, MAE, RMSE), :func:`per_channel_errors`,
  :func:`wasserstein` (W-Dist) and :func:`validity_rate`;
* embedding space of the contrastive text–motion evaluator of Appendix C
  (the keyframe evaluator family, KeyframeFace Appendix C) — :func:`fid`, :func:`r_precision`,
  :func:`mm_dist` ("MMD" in the paper's tables);
* :func:`diversity` in either space (:data:`DIVERSITY_SPACES`): by default on the raw ARKit values
  (``"arkit"``), the space in which Table 3's values are possible (see :func:`evaluate_keyframes`),
  or on the evaluator's unit-norm embeddings (``"embedding"``, where no distance exceeds 2).

The embedding-space metrics follow the text-to-motion protocol they are named after: Guo et al.
2022, "Generating Diverse and Natural 3D Human Motions from Text" (CVPR), §5 and its released
evaluation code (``calculate_R_precision``, ``calculate_matching_score``,
``calculate_frechet_distance``, ``calculate_diversity``). Departures from that code — made where
KeyframeFace's sets are smaller than HumanML3D's, or to make a value independent of arbitrary
tie-breaking — are stated in each function's docstring. :func:`evaluate_keyframes` computes the
whole §5.3 table row at once. Nothing happens at import.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np
from scipy import linalg
from scipy.stats import wasserstein_distance

__all__ = [
    "KeyframeMetricError",
    "KeyframeEmbedder",
    "regression_errors",
    "per_channel_errors",
    "per_region",
    "wasserstein_per_channel",
    "wasserstein",
    "fid",
    "r_precision",
    "mm_dist",
    "diversity",
    "validity_rate",
    "evaluate_keyframes",
    "evaluate_reference",
    "DIVERSITY_SPACES",
]

R_PRECISION_TOP_K = (1, 2, 3)

TEST_METRICS = (
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
)
"""What a keyframes-task worker loop reports as ``test/<name>`` (Tables 2-4 read them)."""

DIVERSITY_SPACES = ("arkit", "embedding")
"""Where :func:`diversity` is measured: ``arkit`` = the raw 61 ARKit values of the keyframes (the
default: Table 3's Diversity of 2.95 is impossible on unit vectors), ``embedding`` = the evaluator's
L2-normalised motion embeddings (the T2M protocol on this evaluator; every distance is at most 2)."""


class KeyframeMetricError(ValueError):
    """Inputs a keyframe metric cannot score (wrong shapes, too few rows, non-finite values)."""


class KeyframeEmbedder(Protocol):
    """What :func:`evaluate_keyframes` needs from an evaluator (``TextMotionEvaluator`` has it)."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...  # (N, D)

    def embed_motions(self, motions: np.ndarray) -> np.ndarray: ...  # (N, 61) -> (N, D)


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _matrix(x, name: str, min_rows: int = 1) -> np.ndarray:
    """``x`` as a finite float64 ``(N, D)`` array with ``N >= min_rows``."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise KeyframeMetricError(f"{name} has shape {a.shape}; expected (N, D)")
    if a.shape[0] < min_rows:
        raise KeyframeMetricError(f"{name} has {a.shape[0]} rows; this metric needs at least {min_rows}")
    if not np.isfinite(a).all():
        row = int(np.argwhere(~np.isfinite(a))[0, 0])
        raise KeyframeMetricError(f"{name} contains NaN or inf (first in row {row})")
    return a


def _pair(pred, gt, min_rows: int = 1, names: tuple[str, str] = ("pred", "gt")) -> tuple[np.ndarray, np.ndarray]:
    p = _matrix(pred, names[0], min_rows)
    g = _matrix(gt, names[1], min_rows)
    if p.shape != g.shape:
        raise KeyframeMetricError(f"{names[0]} {p.shape} and {names[1]} {g.shape} differ in shape")
    return p, g


# --------------------------------------------------------------------------------------------
# parameter space: MSE / MAE / RMSE, W-Dist, validity
# --------------------------------------------------------------------------------------------


def regression_errors(pred, gt) -> dict[str, float]:
    """``{"mse", "mae", "rmse"}`` over all ``N * 61`` values (§5.3).

    ``mse = mean((pred - gt)^2)``, ``mae = mean(|pred - gt|)`` over every coefficient of every
    keyframe (each keyframe and each channel weighs the same), and ``rmse = sqrt(mse)`` — the
    root of the pooled MSE, not the mean of per-keyframe RMSEs.
    """
    p, g = _pair(pred, gt)
    diff = p - g  # (N, D)
    mse = float(np.mean(diff * diff))
    return {"mse": mse, "mae": float(np.mean(np.abs(diff))), "rmse": float(np.sqrt(mse))}


def per_channel_errors(pred, gt) -> dict[str, np.ndarray]:
    """``{"mse", "mae", "rmse"}``, each a float64 ``(61,)`` array: the errors of each channel over the N keyframes.

    ``rmse[c] = sqrt(mse[c])``. The mean of ``mse`` over channels is :func:`regression_errors`'s ``mse``.
    """
    p, g = _pair(pred, gt)
    diff = p - g  # (N, D)
    mse = np.mean(diff * diff, axis=0)  # (D,)
    return {"mse": mse, "mae": np.mean(np.abs(diff), axis=0), "rmse": np.sqrt(mse)}


def per_region(values, regions: Mapping[str, Sequence[str]], channels: Sequence[str]) -> dict[str, float]:
    """Mean of a per-channel array ``values (61,)`` over each region's channels.

    ``regions`` maps a region name to channel names (e.g. :data:`facelab.data.arkit.REGIONS`),
    ``channels`` is the channel order of ``values`` (:data:`facelab.data.arkit.CHANNELS`). Every
    channel of a region weighs the same, so a region's MSE is the MSE over its coefficients.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size != len(channels):
        raise KeyframeMetricError(f"values has {v.size} entries but {len(channels)} channel names were given")
    index = {name: i for i, name in enumerate(channels)}
    out = {}
    for region, names in regions.items():
        unknown = [n for n in names if n not in index]
        if unknown or not names:
            problem = f"unknown channels {unknown}" if unknown else "no channels"
            raise KeyframeMetricError(f"region {region!r}: {problem}")
        out[region] = float(v[[index[n] for n in names]].mean())
    return out


def wasserstein_per_channel(pred, gt) -> np.ndarray:
    """1-D Wasserstein-1 distance between the predicted and GT values of each channel, float64 ``(61,)``.

    ``W1_c = scipy.stats.wasserstein_distance(pred[:, c], gt[:, c])``: each column is an empirical
    distribution of N equally weighted values; for equal N it equals ``mean(|sort(pred_c) - sort(gt_c)|)``.
    The rows need not correspond (it compares distributions, not pairs), so ``pred`` and ``gt``
    may have different row counts.
    """
    p = _matrix(pred, "pred")
    g = _matrix(gt, "gt")
    if p.shape[1] != g.shape[1]:
        raise KeyframeMetricError(f"pred has {p.shape[1]} channels, gt {g.shape[1]}")
    return np.array([wasserstein_distance(p[:, c], g[:, c]) for c in range(p.shape[1])])


def wasserstein(pred, gt) -> float:
    """W-Dist (§5.3): the mean over the 61 channels of :func:`wasserstein_per_channel`.

    The paper reports a Wasserstein distance between predicted and ground-truth parameters without
    fixing its form; a 61-d optimal-transport distance on N points would need an assignment
    solver and depends on the channel scaling, so the choice here is the per-channel (marginal)
    1-D W1, which is exact, cheap, in the coefficients' own units, and averaged with every
    channel weighing the same (as MSE/MAE). It measures whether the *distribution* of each
    coefficient matches — e.g. a model that always predicts the mean has low MSE but a high W-Dist.
    """
    return float(wasserstein_per_channel(pred, gt).mean())


def validity_rate(n_valid: int, n_total: int) -> float:
    """Fraction of generated answers that parsed into a complete 61-channel keyframe (``n_valid / n_total``)."""
    if n_total <= 0:
        raise KeyframeMetricError(f"n_total must be >= 1, got {n_total}")
    if not 0 <= n_valid <= n_total:
        raise KeyframeMetricError(f"n_valid must be in [0, n_total={n_total}], got {n_valid}")
    return n_valid / n_total


# --------------------------------------------------------------------------------------------
# evaluator embedding space: FID, R-Precision, MM-Dist, Diversity (Guo et al. 2022)
# --------------------------------------------------------------------------------------------


def fid(feat_a, feat_b, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two embedding sets ``(N_a, D)``, ``(N_b, D)``.

    ``FID = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with sample means and sample
    covariances (``np.cov``, ``ddof=1``), as ``calculate_frechet_distance`` of Guo et al. 2022
    (itself from pytorch-fid). ``(S_a S_b)^{1/2}`` is ``scipy.linalg.sqrtm``; when it is not finite
    or not accurate (singular covariances: fewer rows than dimensions, which is common for
    KeyframeFace's test split in a 256-d space) ``eps`` is added to both diagonals and it is
    recomputed; the imaginary part round-off leaves is dropped (real part). The result is clipped
    at 0 (round-off can make identical sets score ``-1e-12``). Needs at least 2 rows per set.
    """
    a = _matrix(feat_a, "feat_a", 2)
    b = _matrix(feat_b, "feat_b", 2)
    if a.shape[1] != b.shape[1]:
        raise KeyframeMetricError(f"feat_a has {a.shape[1]} dimensions, feat_b {b.shape[1]}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)  # (D,)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))  # (D, D)
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    prod = s_a @ s_b
    with warnings.catch_warnings():  # singular products are expected and handled right below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(prod)
        scale = max(np.linalg.norm(prod), 1e-300)
        if not np.isfinite(covmean).all() or np.linalg.norm(covmean @ covmean - prod) / scale > 1e-3:
            offset = np.eye(s_a.shape[0]) * eps
            covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    covmean = np.real(covmean)
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distance matrix ``d[i, j] = ||x_i - y_j||``, ``(n, m)``; computed pairwise, so ties are exact."""
    return np.sqrt(np.square(x[:, None, :] - y[None, :, :]).sum(axis=-1))


def r_precision(
    text_emb, motion_emb, batch: int = 32, top_k: Sequence[int] = R_PRECISION_TOP_K, seed: int = 0
) -> dict[int, float]:
    """R-Precision (top-k text→motion retrieval accuracy) — Guo et al. 2022, §5; KeyframeFace §5.3.

    Row ``i`` of ``text_emb`` and ``motion_emb`` (both ``(N, D)``) is a matching pair. Protocol of
    the T2M evaluation code: the pairs are shuffled (``numpy.random.default_rng(seed)``) and cut
    into batches of ``batch`` (32); the last partial batch is dropped (T2M's ``drop_last``). In each
    batch every text ranks the batch's ``batch`` motions by Euclidean distance; it scores a hit at
    ``k`` when its own motion is among the ``k`` closest. The result, ``{k: hits / texts scored}``
    for each ``k`` in ``top_k``, is the mean over all scored texts (= mean over equal batches).
    Chance level is ``k / batch``.

    Choices where T2M's code is silent or arbitrary:

    * ``N < batch``: one batch of all ``N`` pairs is scored (nothing would be left after dropping
      the partial batch). Chance is then ``k / N``, so such numbers are not comparable with
      batch-32 ones; callers should report the batch size.
    * ties: T2M's ``np.argsort`` orders tied motions arbitrarily. Here a text whose own motion
      is at distance ``d`` from it, with ``s`` motions strictly closer and ``t`` others exactly at
      ``d``, scores ``clip((k - s) / (t + 1), 0, 1)`` — the expected hit under a uniformly random
      tie order. A model that outputs the same keyframe for every text therefore scores exactly
      chance (``k / batch``), not 1 or 0.
    * duplicate texts in a batch are kept (as in T2M): each text's "own" motion is the one of
      its own row.
    """
    t, m = _pair(text_emb, motion_emb, 2, ("text_emb", "motion_emb"))
    ks = tuple(int(k) for k in top_k)
    if batch < 2 or any(k < 1 for k in ks):
        raise KeyframeMetricError(f"batch must be >= 2 and every k >= 1; got batch={batch}, top_k={ks}")
    n = t.shape[0]
    size = min(batch, n)
    n_batches = n // size
    perm = np.random.default_rng(seed).permutation(n)
    hits = np.zeros(len(ks))
    for b in range(n_batches):
        idx = perm[b * size : (b + 1) * size]
        d = _distances(t[idx], m[idx])  # (size, size): text i to motion j
        own = np.diag(d)[:, None]  # (size, 1)
        closer = (d < own).sum(axis=1)  # (size,)
        tied = (d == own).sum(axis=1) - 1  # other motions at exactly the own distance
        for j, k in enumerate(ks):
            hits[j] += np.clip((k - closer) / (tied + 1), 0.0, 1.0).sum()
    scored = n_batches * size
    return {k: float(hits[j] / scored) for j, k in enumerate(ks)}


def mm_dist(text_emb, motion_emb) -> float:
    """Multimodal Distance — the "MMD" column of KeyframeFace's tables (§5.3), Guo et al. 2022's MM-Dist.

    ``MM-Dist = (1/N) sum_i ||t_i - m_i||_2``: the mean Euclidean distance between each text's
    embedding and the embedding of its own keyframe (T2M's ``calculate_matching_score``). Lower is
    better. Note: despite the abbreviation this is *not* the maximum mean discrepancy. Choice:
    averaged over all N pairs, not only over the pairs kept by R-Precision's full batches.
    """
    t, m = _pair(text_emb, motion_emb, 1, ("text_emb", "motion_emb"))
    return float(np.sqrt(np.square(t - m).sum(axis=1)).mean())


def diversity(motion_emb, n_pairs: int = 300, seed: int = 0) -> float:
    """Diversity — Guo et al. 2022 (``calculate_diversity``, S_d = 300 pairs); KeyframeFace §5.3.

    ``motion_emb`` ``(N, D)``: the vectors whose spread is measured -- raw ARKit keyframes
    ``(N, 61)`` or evaluator embeddings (:data:`DIVERSITY_SPACES`). Two index lists of ``n = min(n_pairs, N)`` rows are drawn independently, each *without*
    replacement (``numpy.random.default_rng(seed)``), and the score is the mean Euclidean
    distance between the paired embeddings ``(1/n) sum_i ||x_{a_i} - x_{b_i}||``. As in T2M, a
    pair may pick the same row twice (distance 0), so for N points that are all ``d`` apart the
    expected value is ``d (1 - 1/N)``. Choice: T2M requires ``N > 300``; here smaller sets use
    ``n = N`` pairs instead of failing. Compare with the ground truth's Diversity (closer is better).
    """
    x = _matrix(motion_emb, "motion_emb", 2)
    if n_pairs < 1:
        raise KeyframeMetricError(f"n_pairs must be >= 1, got {n_pairs}")
    n = min(n_pairs, x.shape[0])
    rng = np.random.default_rng(seed)
    first = rng.choice(x.shape[0], n, replace=False)
    second = rng.choice(x.shape[0], n, replace=False)
    return float(np.sqrt(np.square(x[first] - x[second]).sum(axis=1)).mean())


# --------------------------------------------------------------------------------------------
# the whole §5.3 row
# --------------------------------------------------------------------------------------------


def evaluate_keyframes(
    pred,
    gt,
    texts: Sequence[str],
    evaluator: KeyframeEmbedder | None,
    *,
    n_valid: int,
    n_total: int,
    seed: int = 0,
    r_batch: int = 32,
    diversity_pairs: int = 300,
    diversity_space: str = "arkit",
) -> dict[str, float]:
    """Every §5.3 metric for predictions ``pred (N, 61)`` of ``gt (N, 61)`` described by ``texts`` (N).

    Keys: ``mse``, ``mae``, ``rmse`` (:func:`regression_errors`), ``w_dist`` (:func:`wasserstein`),
    ``validity`` (:func:`validity_rate` of ``n_valid`` / ``n_total``), ``diversity`` when
    ``diversity_space`` is ``"arkit"`` (:func:`diversity` of the predicted keyframes' raw values,
    ``min(diversity_pairs, N)`` pairs; N >= 2) and, when ``evaluator`` is given (anything with
    ``embed_texts`` and ``embed_motions``, e.g. the keyframe evaluator family) and N >= 2:

    * ``fid`` — :func:`fid` between the embeddings of ``pred`` and of ``gt``;
    * ``r_precision_1/2/3`` — :func:`r_precision` of the texts against the *predicted* keyframes'
      embeddings, batches of ``r_batch`` (one batch of N when ``N < r_batch``);
    * ``mmd`` — :func:`mm_dist` between the texts and the predicted keyframes' embeddings;
    * ``diversity`` when ``diversity_space`` is ``"embedding"`` — :func:`diversity` of the predicted
      keyframes' (unit-norm) embeddings.

    Why the raw ARKit values are the default space of Diversity: Table 3 reports a Diversity of 2.95,
    and no two unit vectors are more than 2 apart, so it was not measured on the evaluator's
    normalised embeddings. Nor, in all likelihood, on the unnormalised embedding FID is computed
    in: a mean pair distance d means ``2 Tr(S) >= d^2`` (Tr(S) >= 4.35 for d = 2.95), and the
    Fréchet distance of two independent samples of sizes a and b is at least its mean term, whose
    expectation is ``Tr(S) (1/a + 1/b)``: 0.017 for two samples of ~500 keyframes (a 10% test split
    against the val split) -- above the 0.0115 of Table 3's GT row before the covariance term, which
    finite samples in 256 dimensions inflate far more (about 0.05 to 1 for simulated Gaussians of that
    trace, even against a 4,000-keyframe sample). In ARKit units (52 values in [0, 1], 9 in
    [-1, 1]; up to sqrt(88) ~ 9.4 apart) 2.95 is an ordinary spread. The release ships no
    evaluation code to settle it (docs/fidelity.md).

    ``pred`` holds a row for every scored keyframe (a caller that drops unparseable answers passes
    the kept rows of both arrays), so the error metrics include whatever the parser fell back to;
    validity is reported beside them. ``seed`` fixes R-Precision's shuffle and Diversity's pairs.
    """
    if diversity_space not in DIVERSITY_SPACES:
        raise KeyframeMetricError(f"diversity_space must be one of {DIVERSITY_SPACES}, got {diversity_space!r}")
    p, g = _pair(pred, gt)
    if len(texts) != p.shape[0]:
        raise KeyframeMetricError(f"{len(texts)} texts for {p.shape[0]} keyframes")
    out = dict(regression_errors(p, g))
    out["w_dist"] = wasserstein(p, g)
    out["validity"] = validity_rate(n_valid, n_total)
    if diversity_space == "arkit" and p.shape[0] >= 2:
        out["diversity"] = diversity(p, n_pairs=diversity_pairs, seed=seed)
    if evaluator is None or p.shape[0] < 2:
        return out
    text_emb = np.asarray(evaluator.embed_texts(list(texts)), dtype=np.float64)  # (N, D)
    pred_emb = np.asarray(evaluator.embed_motions(p.astype(np.float32)), dtype=np.float64)  # (N, D)
    gt_emb = np.asarray(evaluator.embed_motions(g.astype(np.float32)), dtype=np.float64)  # (N, D)
    out["fid"] = fid(pred_emb, gt_emb)
    for k, v in r_precision(text_emb, pred_emb, batch=r_batch, top_k=R_PRECISION_TOP_K, seed=seed).items():
        out[f"r_precision_{k}"] = v
    out["mmd"] = mm_dist(text_emb, pred_emb)
    if diversity_space == "embedding":
        out["diversity"] = diversity(pred_emb, n_pairs=diversity_pairs, seed=seed)
    return out


def evaluate_reference(
    gt,
    reference,
    texts: Sequence[str],
    evaluator: KeyframeEmbedder | None,
    *,
    seed: int = 0,
    r_batch: int = 32,
    diversity_pairs: int = 300,
    diversity_space: str = "arkit",
) -> dict[str, float]:
    """The GT ("Real") row of Table 3: ground truth scored against a *different* sample of ground truth.

    ``gt (N, 61)`` are the test keyframes described by ``texts``; ``reference (M, 61)`` another
    sample of real keyframes, disjoint from ``gt`` (e.g. the val split, or the other half of the
    test split). The distribution metrics compare the two samples -- ``w_dist`` =
    :func:`wasserstein` (reference, gt) and, with an evaluator, ``fid`` = :func:`fid` of their
    embeddings -- so they are the sampling-noise floor of the model rows (> 0, as the paper's
    0.0115 / 0.0055), not the 0 that scoring ``gt`` against itself gives. The alignment metrics are
    those of the ground truth itself: ``r_precision_1/2/3`` and ``mmd`` of ``texts`` against the
    embeddings of ``gt``, and ``diversity`` of ``gt`` (in ``diversity_space``). ``validity`` is 1.
    MSE / MAE / RMSE pair row i with row i: two different samples have no such pairing, so they
    are not reported.
    """
    if diversity_space not in DIVERSITY_SPACES:
        raise KeyframeMetricError(f"diversity_space must be one of {DIVERSITY_SPACES}, got {diversity_space!r}")
    g = _matrix(gt, "gt", 2)
    ref = _matrix(reference, "reference", 2)
    if ref.shape[1] != g.shape[1]:
        raise KeyframeMetricError(f"reference has {ref.shape[1]} channels, gt {g.shape[1]}")
    if len(texts) != g.shape[0]:
        raise KeyframeMetricError(f"{len(texts)} texts for {g.shape[0]} keyframes")
    out = {"w_dist": wasserstein(ref, g), "validity": 1.0}
    if diversity_space == "arkit":
        out["diversity"] = diversity(g, n_pairs=diversity_pairs, seed=seed)
    if evaluator is None:
        return out
    text_emb = np.asarray(evaluator.embed_texts(list(texts)), dtype=np.float64)  # (N, D)
    gt_emb = np.asarray(evaluator.embed_motions(g.astype(np.float32)), dtype=np.float64)  # (N, D)
    ref_emb = np.asarray(evaluator.embed_motions(ref.astype(np.float32)), dtype=np.float64)  # (M, D)
    out["fid"] = fid(ref_emb, gt_emb)
    for k, v in r_precision(text_emb, gt_emb, batch=r_batch, top_k=R_PRECISION_TOP_K, seed=seed).items():
        out[f"r_precision_{k}"] = v
    out["mmd"] = mm_dist(text_emb, gt_emb)
    if diversity_space == "embedding":
        out["diversity"] = diversity(gt_emb, n_pairs=diversity_pairs, seed=seed)
    return out


STD_FLOOR = 0.05
"""Lower bound on a channel's z-score std: a channel (nearly) constant in the training keyframes
would otherwise blow its z-scores up."""


def feature_stats(motions) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of training keyframes ``(N, 61)``, float32 ``(61,)`` each: the
    z-score statistics of the evaluator and of Express4D-MDM. Population std (``ddof=0``), floored
    at :data:`STD_FLOOR`."""
    x = _matrix(motions, "motions")
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), STD_FLOOR)  # population std (ddof=0)
    return mean.astype(np.float32), std.astype(np.float32)
