"""The CTEG paper's evaluation protocol (Xu et al., "When Words Smile", EMNLP 2025, §5 and Appendix D).

:func:`evaluate_model` scores a trained model of the expressions task (CTEG, LM-Listener, ... -- see :class:`ExpressionModel`) on a test split,
:func:`evaluate_shuffle` the §5.3 Shuffle row with a trained model (its Cppl of shuffled sequences),
:func:`evaluate_baseline` the model-free §5.3 reference rows (GT, Random; Shuffle without its Cppl). All return
``{metric: (value, bootstrap standard error)}`` for the six metrics of Table 2, in the paper's column
order :data:`METRICS`; the formulas live in :mod:`facelab.tasks.expressions.metrics`:

=========== ============================== ======================================================
metric      what it is scored on           per-item values bootstrapped (statistic)
=========== ============================== ======================================================
cppl        teacher-forced means, Eq. 16-18 per-sequence mean surprisal H_i (exp of the mean)
dot         one sample per test text, Eq. 15 per pair of sequences (mean)
fgd         one sample per test text, Eq. 14 per sequence (mean)
diversity   2·N_d unconditional samples, Eq. 11 per pair, N_d = 750 pairs (mean)
mmodality   two samples per text, Eq. 12   per text, N_m = 1,500 texts (mean)
variation   one sample per test text, Eq. 13 per sequence (mean)
=========== ============================== ======================================================

Protocol choices (each is also stated where it is implemented):

* Texts: the test split in order, the first ``max_texts`` of them when that is set. MModality uses
  ``min(N_m, n)`` of these texts (all of them when there are at most N_m, else a seeded random
  subset); its first sample of each text is the same sample DoT/FgD/Variation use.
* Generation: ``model.generate`` (KV cache), batches of ``batch_size`` texts in order, maximum
  length ``min(cfg.max_frames, model.cfg.max_frames)`` (the model cannot go past its positional
  table), one CPU ``torch.Generator`` per stage, seeded ``4·seed + k`` (k = 0 samples, 1 second
  MModality samples, 2 unconditional samples, 3 Cppl latents). Results are
  deterministic for a seed *and* a batch size (noise is drawn per batch).
* Diversity: ``2 N_d`` sequences generated from the empty text ``""`` (the model's unconditional
  mode; for CTEG ``model.unconditional``: by default the cross-attentions contribute nothing, or, as
  the reference's ``translate.py -uncondition``, they attend uniformly to the encoder's states of an
  all-[PAD] input), split into ``N_d`` disjoint random pairs.
* Cppl: for a test sequence of ``T`` frames the model predicts ``T + 1`` steps teacher-forced
  (:meth:`CTEG.teacher_forced_means`: true history, latents sampled from the prior, output mean
  without the output noise), the targets are ``ψ_1..ψ_T`` and the zero-face terminator. Sequences
  longer than the maximum length are cut to it and lose the terminator step (the reference
  truncates them the same way). The reference additionally scores a first step that predicts the
  mean face from its [CLS] start token; CTEG here starts *from* the mean face, so there is no such
  step (``cppl_first_step`` adds it, scored as given: see :class:`EvalConfig`). ``cppl_output="sample"``
  scores a sampled output instead of the mean, as the reference's ``-second_sample one`` does.
  δ = 0.8, σ = 0.2, probabilities floored at 1e-10 as in the reference; the neighbourhood is the
  reference code's CDF difference (``cppl_region`` / ``cppl_floor`` switch to the box mass or to
  exact probabilities; see :func:`~facelab.tasks.expressions.metrics.cppl`).
* More generation limits (``extra_max_frames``, Table 2's "CTEG (MSL = 64)"): the same model, the
  same seeds, generation capped at the other limit; no Cppl (teacher-forced, so the paper gives "/").
* Shuffle (:func:`evaluate_shuffle`): the test sequences with their frames permuted in time; the
  model's teacher-forced Cppl of them, and the five other metrics of the shuffled sequences
  themselves (the same draw as the model-free ``evaluate_baseline("shuffle")``).
* Standard errors: :func:`~facelab.tasks.expressions.metrics.bootstrap_se` over the per-item values above,
  ``n_bootstrap`` resamples, seed ``cfg.seed``. DoT's and Diversity's items are pairs; for DoT the
  pairs share sequences, so its SE is optimistic.
* A metric that is undefined for a row is ``(nan, nan)`` (e.g. MModality of GT, FgD when every
  sequence has one frame).

Everything runs on CPU for small models; there is no work at import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from facelab.tasks.expressions.metrics import (
    CPPL_FLOOR,
    CPPL_REGIONS,
    bootstrap_se,
    cppl_per_item,
    diversity_per_pair,
    dot_per_pair,
    fgd_per_item,
    mmodality_per_item,
    perplexity,
    variation_per_item,
)

if TYPE_CHECKING:
    from facelab.data.emoava import EmoAvaSplit


class ExpressionModel(Protocol):
    """What the expressions task needs of a model (CTEG, LM-Listener, a team's own family)."""

    cfg: Any  # .max_frames: the trained maximum sequence length
    mean_expression: Any  # (53,) tensor on the model's device

    def generate(self, texts: list[str], max_frames: int | None = None, generator=None) -> list: ...

    def teacher_forced_means(self, texts: list[str], frames, lengths, latent: str = "mean") -> tuple: ...


METRICS = ["cppl", "dot", "fgd", "diversity", "mmodality", "variation"]
"""Table 2's metric columns, in the paper's order."""

DIRECTIONS = {
    "cppl": "↓",
    "dot": "→",
    "fgd": "→",
    "diversity": "↑",
    "mmodality": "↑",
    "variation": "→",
}
"""Which value is better: ↓ lower, ↑ higher, → closer to the ground-truth (GT) row — Table 2's
header markers of "When Words Smile".

Cppl is a perplexity (lower is better, 1 is perfect). DoT, FgD and Variation describe the
*character* of the expressions (how much consecutive frames differ, how smoothly and how much they
move), for which the data itself is the target, so closer to GT is better. Diversity (Eq. 11, over
text-free samples) and MModality (Eq. 12, two samples of one text) measure how varied the model's
generations are: the paper marks both ↑ (MModality also has no ground truth: EmoAva has one sequence
per utterance).
"""

BaselineKind = Literal["gt", "shuffle", "random"]
BASELINES: tuple[str, ...] = ("gt", "shuffle", "random")

_STAGE_SAMPLES, _STAGE_SECOND, _STAGE_UNCOND, _STAGE_CPPL = 0, 1, 2, 3


@dataclass
class EvalConfig:
    """Settings of :func:`evaluate_model` / :func:`evaluate_baseline`; defaults are the paper's."""

    n_diversity: int = 750
    """N_d of Eq. 11: pairs of unconditional samples (2·N_d sequences are generated)."""
    n_mmodality: int = 1500
    """N_m of Eq. 12: texts with two samples each (all test texts when there are fewer)."""
    n_bootstrap: int = 1000
    """Bootstrap resamples for the standard errors."""
    max_frames: int = 256
    """Maximum sequence length (the paper's MSL); also capped by the model's own ``max_frames``."""
    batch_size: int = 64
    """Texts per generation / teacher-forcing batch."""
    seed: int = 0
    """Seed of every random choice (generation noise, pairs, subsets, bootstrap)."""
    delta: float = 0.8
    """δ of Eq. 17: half-width of the neighbourhood of a target frame."""
    sigma: float = 0.2
    """σ of Eq. 16: standard deviation of the predictive Gaussian around the predicted mean."""
    max_texts: int | None = None
    """Use only the first ``max_texts`` test texts (quick runs); None = all."""
    cppl_region: str = "cdf_difference"
    """Neighbourhood of Eq. 17. Default 'cdf_difference': the multivariate normal CDF difference
    F(x+δ) − F(x−δ) with diagonal covariance (a product of 1-d CDFs), which is what the reference
    evaluator computes (by numerical integration) and so what the paper's numbers mean; 'box': the
    mass of the box [x−δ, x+δ], which for 53 dimensions saturates at the probability floor unless the
    model is very accurate."""
    cppl_floor: float | None = CPPL_FLOOR
    """Per-frame probability floor of the reference evaluator (1e-10); None = exact probabilities."""
    cppl_first_step: bool = False
    """Also score a first step whose target and predicted mean are the model's start frame (the
    training-set mean face): the reference evaluator scores its step 0 (the mean face predicted from
    the [CLS] start token, a prediction its training loss never scores); a model that starts *from*
    the mean face is given it, so the step contributes the floor term of Eq. 17 and counts in each
    sequence's average. False (default): the T frames and the terminator only."""
    cppl_output: str = "mean"
    """The predicted frame of Eq. 16: ``"mean"`` (the model's predictive mean, no output noise) or
    ``"sample"`` (a sampled output; only for models whose ``teacher_forced_means`` takes ``output``)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_diversity", "n_mmodality", "max_frames", "batch_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1")
        if self.n_bootstrap < 2:
            problems.append("n_bootstrap must be >= 2")
        if not (self.delta > 0 and self.sigma > 0):
            problems.append("delta and sigma must be > 0")
        if self.max_texts is not None and self.max_texts < 2:
            problems.append("max_texts must be None or >= 2")
        if self.cppl_region not in CPPL_REGIONS:
            problems.append(f"cppl_region must be one of {CPPL_REGIONS}")
        if self.cppl_floor is not None and not 0 <= self.cppl_floor < 1:
            problems.append("cppl_floor must be None or in [0, 1)")
        if self.cppl_output not in ("mean", "sample"):
            problems.append("cppl_output must be 'mean' or 'sample'")
        if problems:
            raise ValueError("invalid EvalConfig: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------------------------


def _test_items(test: EmoAvaSplit, cfg: EvalConfig) -> tuple[list[str], list[np.ndarray]]:
    n = len(test) if cfg.max_texts is None else min(len(test), cfg.max_texts)
    if n < 2:
        raise ValueError(f"the test split needs at least 2 items, has {n}")
    return list(test.texts[:n]), [np.asarray(s) for s in test.sequences[:n]]


def _mmodality_indices(n: int, cfg: EvalConfig) -> np.ndarray:
    """Texts scored by MModality: all ``n`` if ``n <= N_m``, else ``N_m`` of them at random (sorted)."""
    if n <= cfg.n_mmodality:
        return np.arange(n)
    rng = np.random.default_rng([cfg.seed, 12])
    return np.sort(rng.choice(n, size=cfg.n_mmodality, replace=False))


def cppl_targets(seqs: Sequence[np.ndarray], max_frames: int) -> list[np.ndarray]:
    """Frames a model's teacher-forced steps predict: ``ψ_1..ψ_T`` then the zero-face terminator.

    A sequence longer than ``max_frames`` is cut to its first ``max_frames`` frames and has no
    terminator step (it does not end there). float64 ``(min(T, max_frames) + [T <= max_frames], 53)``.
    """
    out = []
    for s in seqs:
        s = np.asarray(s, dtype=np.float64)
        if len(s) > max_frames:
            out.append(s[:max_frames])
        else:
            out.append(np.concatenate([s, np.zeros((1, s.shape[1]))], axis=0))
    return out


def _se(values: np.ndarray, cfg: EvalConfig, stat: Callable = np.mean) -> float:
    finite = np.asarray(values, dtype=np.float64)
    if np.isfinite(finite).sum() < 2:
        return math.nan
    return bootstrap_se(finite, stat=stat, n_resamples=cfg.n_bootstrap, seed=cfg.seed)


def _summary(values: np.ndarray | None, cfg: EvalConfig, stat: Callable = np.mean) -> tuple[float, float]:
    if values is None:
        return (math.nan, math.nan)
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return (math.nan, math.nan)
    return (float(stat(finite)), _se(finite, cfg, stat))


def metrics_from_samples(
    samples: Sequence[np.ndarray],
    unconditional: Sequence[np.ndarray],
    mm_pairs: Sequence[tuple[np.ndarray, np.ndarray]] | None,
    cppl_means: Sequence[np.ndarray] | None,
    cppl_targets_: Sequence[np.ndarray] | None,
    cfg: EvalConfig,
) -> dict[str, tuple[float, float]]:
    """The six metrics (value, bootstrap SE) from what a model or a baseline produced.

    ``samples``: one sequence per test text (DoT, FgD, Variation); ``unconditional``: sequences made
    without text (Diversity, ``cfg.n_diversity`` pairs); ``mm_pairs``: two sequences per text
    (MModality) or None (undefined: NaN); ``cppl_means`` / ``cppl_targets_``: predicted means and
    their targets per sequence (Cppl) or None (NaN).
    """
    per_item: dict[str, np.ndarray | None] = {
        "cppl": None,
        "dot": dot_per_pair(samples, seed=cfg.seed),
        "fgd": fgd_per_item(samples),
        "diversity": diversity_per_pair(unconditional, n_pairs=cfg.n_diversity, seed=cfg.seed),
        "mmodality": mmodality_per_item(mm_pairs) if mm_pairs else None,
        "variation": variation_per_item(samples),
    }
    if cppl_means is not None:
        per_item["cppl"] = cppl_per_item(
            cppl_means, cppl_targets_, cfg.delta, cfg.sigma, region=cfg.cppl_region, floor=cfg.cppl_floor
        )
    return {m: _summary(per_item[m], cfg, perplexity if m == "cppl" else np.mean) for m in METRICS}


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def _generator(cfg: EvalConfig, stage: int):
    import torch

    return torch.Generator().manual_seed(cfg.seed * 4 + stage)


def _generate(
    model: ExpressionModel, texts: list[str], cfg: EvalConfig, max_frames: int, generator
) -> list[np.ndarray]:
    import torch

    out: list[np.ndarray] = []
    for lo in range(0, len(texts), cfg.batch_size):
        batch = model.generate(texts[lo : lo + cfg.batch_size], max_frames=max_frames, generator=generator)
        out.extend(s.detach().to("cpu", dtype=torch.float64).numpy() for s in batch)
    return out


def with_first_step(
    means: list[np.ndarray], targets: list[np.ndarray], start: np.ndarray
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``cppl_first_step``: a step whose target and prediction are the start frame, before every sequence."""
    start = np.asarray(start, dtype=np.float64).reshape(1, -1)
    return [np.concatenate([start, m]) for m in means], [np.concatenate([start, t]) for t in targets]


def model_cppl_inputs(
    model: ExpressionModel, texts: list[str], seqs: list[np.ndarray], cfg: EvalConfig, max_frames: int, generator
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Teacher-forced means and their targets (:func:`cppl_targets`) for every test sequence
    (``cfg.cppl_output`` and ``cfg.cppl_first_step`` as :class:`EvalConfig` says)."""
    import torch

    device = model.mean_expression.device
    targets = cppl_targets(seqs, max_frames)
    kwargs = {} if cfg.cppl_output == "mean" else {"output": cfg.cppl_output}
    means: list[np.ndarray] = []
    for lo in range(0, len(texts), cfg.batch_size):
        chunk = seqs[lo : lo + cfg.batch_size]
        lengths = [min(len(s), max_frames) for s in chunk]
        frames = torch.zeros(len(chunk), max(lengths), chunk[0].shape[1], dtype=model.mean_expression.dtype)
        for i, (s, n) in enumerate(zip(chunk, lengths)):
            frames[i, :n] = torch.as_tensor(np.asarray(s[:n]), dtype=frames.dtype)
        mu, _ = model.teacher_forced_means(
            texts[lo : lo + cfg.batch_size],
            frames.to(device),
            torch.tensor(lengths, device=device),
            generator=generator,
            **kwargs,
        )
        mu = mu.to("cpu", dtype=torch.float64).numpy()
        for i in range(len(chunk)):
            means.append(mu[i, : len(targets[lo + i])])
    if cfg.cppl_first_step:
        return with_first_step(means, targets, model.mean_expression.detach().to("cpu", dtype=torch.float64).numpy())
    return means, targets


def evaluate_model(
    model: ExpressionModel, test: EmoAvaSplit, cfg: EvalConfig | None = None, device="cpu", *, cppl: bool = True
) -> dict[str, tuple[float, float]]:
    """Table 2 row of a CTEG model on ``test``: ``{metric: (value, bootstrap SE)}`` for :data:`METRICS`.

    Moves ``model`` to ``device`` (in place, as ``nn.Module.to`` does). Sampling is seeded
    (``cfg.seed``) and runs in eval mode; the model's train/eval mode is restored afterwards. See
    the module docstring for the protocol. ``cppl=False`` skips the teacher-forced pass (Cppl is
    then ``(nan, nan)``): the rows of ``extra_max_frames``.
    """
    import torch

    cfg = cfg or EvalConfig()
    model.to(device)
    texts, seqs = _test_items(test, cfg)
    max_frames = min(cfg.max_frames, model.cfg.max_frames)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            samples = _generate(model, texts, cfg, max_frames, _generator(cfg, _STAGE_SAMPLES))
            mm_idx = _mmodality_indices(len(texts), cfg)
            second = _generate(model, [texts[i] for i in mm_idx], cfg, max_frames, _generator(cfg, _STAGE_SECOND))
            uncond = _generate(model, [""] * (2 * cfg.n_diversity), cfg, max_frames, _generator(cfg, _STAGE_UNCOND))
            means = targets = None
            if cppl:
                means, targets = model_cppl_inputs(model, texts, seqs, cfg, max_frames, _generator(cfg, _STAGE_CPPL))
    finally:
        model.train(was_training)
    mm_pairs = [(samples[i], s) for i, s in zip(mm_idx.tolist(), second)]
    return metrics_from_samples(samples, uncond, mm_pairs, means, targets, cfg)


# --------------------------------------------------------------------------------------------
# baselines (§5.3)
# --------------------------------------------------------------------------------------------


def baseline_means(seq: np.ndarray, n_steps: int) -> np.ndarray:
    """A baseline's "prediction" for Cppl: its own frames, then the zero face, over ``n_steps`` steps.

    ``[x_1..x_S, 0, 0, ...]`` cut or zero-padded to ``n_steps`` rows: step ``j`` predicts the
    baseline's frame ``j`` and every step past its end predicts the terminator.
    """
    seq = np.asarray(seq, dtype=np.float64)
    out = np.zeros((n_steps, seq.shape[1]))
    n = min(n_steps, len(seq))
    out[:n] = seq[:n]
    return out


def _shuffled(seq: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(seq)[rng.permutation(len(seq))]


def shuffle_draw(
    seqs: Sequence[np.ndarray], mm_idx: np.ndarray, cfg: EvalConfig
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    """The Shuffle row's sequences: every test sequence permuted in time (one per text) and, for
    MModality, a second independent permutation of each text's sequence. Seeded by ``cfg.seed``:
    :func:`evaluate_baseline` and :func:`evaluate_shuffle` draw the same ones."""
    rng = np.random.default_rng([cfg.seed, BASELINES.index("shuffle")])
    samples = [_shuffled(s, rng) for s in seqs]
    return samples, [(samples[i], _shuffled(seqs[i], rng)) for i in mm_idx.tolist()]


def evaluate_shuffle(
    model: ExpressionModel, test: EmoAvaSplit, cfg: EvalConfig | None = None, device="cpu"
) -> dict[str, tuple[float, float]]:
    """Table 2's Shuffle row (§5.3) scored with a trained model: ``{metric: (value, bootstrap SE)}``.

    The sequences are :func:`shuffle_draw`'s (every test sequence with its frames permuted in time).
    Cppl is the *model's* teacher-forced likelihood of them — the text, then the shuffled frames as
    history and as targets (:func:`model_cppl_inputs`, the same protocol and seed as the model's own
    Cppl): how much less likely the model finds a sequence whose temporal order is destroyed.
    DoT/FgD/Variation/Diversity/MModality are those of the shuffled sequences themselves (as in
    :func:`evaluate_baseline`). Moves ``model`` to ``device``; eval mode, restored afterwards.
    """
    import torch

    cfg = cfg or EvalConfig()
    model.to(device)
    texts, seqs = _test_items(test, cfg)
    samples, mm_pairs = shuffle_draw(seqs, _mmodality_indices(len(seqs), cfg), cfg)
    max_frames = min(cfg.max_frames, model.cfg.max_frames)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            means, targets = model_cppl_inputs(model, texts, samples, cfg, max_frames, _generator(cfg, _STAGE_CPPL))
    finally:
        model.train(was_training)
    return metrics_from_samples(samples, samples, mm_pairs, means, targets, cfg)


def evaluate_baseline(
    kind: BaselineKind,
    test: EmoAvaSplit,
    train: EmoAvaSplit | None = None,
    cfg: EvalConfig | None = None,
    mean_face: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """Table 2 row of a §5.3 reference baseline: ``{metric: (value, bootstrap SE)}``.

    * ``"gt"``: the test sequences themselves. DoT/FgD/Variation are the dataset's own values;
      Diversity uses ``N_d`` random pairs of test sequences (the data has no unconditional
      samples); MModality is undefined (one sequence per text) -> NaN.
    * ``"shuffle"``: every test sequence with its frames permuted in time (:func:`shuffle_draw`).
      Variation is unchanged by construction; temporal smoothness is destroyed (FgD rises).
      MModality: two independent shuffles of the text's sequence. **Cppl is NaN** here: the paper
      scores the shuffled sequences with CTEG itself, which needs the trained model —
      :func:`evaluate_shuffle` (``eval.shuffle_row``) gives the whole row with it. (The
      reference's ``load_dataset_split_batch(baseline='shuffle')`` also shuffles its prepended
      mean frame into the sequence; here only the real frames are permuted.)
    * ``"random"``: for each test text a training sequence drawn uniformly at random (seeded),
      ignoring the text. Diversity: ``2 N_d`` fresh draws split into pairs (random draws *are*
      this baseline's unconditional samples); MModality: two independent draws per text. (The
      reference's ``baseline='random'`` instead permutes the *test* sequences among the texts.)

    Cppl of GT and Random (no model, so no predictive distribution of their own): their frames are
    used as the means μ of Eq. 16 against the same targets as for a model (:func:`cppl_targets`),
    i.e. step ``j`` predicts the baseline's frame ``j`` and steps past its end predict the
    terminator (:func:`baseline_means`). For GT this gives the floor of the metric (≈ 1.0034 for the
    defaults). With ``cfg.cppl_first_step`` the start step needs ``mean_face`` (the training-set
    mean, the start frame a model is given).
    """
    cfg = cfg or EvalConfig()
    if kind not in BASELINES:
        raise ValueError(f"kind must be one of {BASELINES}, got {kind!r}")
    texts, seqs = _test_items(test, cfg)
    n = len(seqs)
    rng = np.random.default_rng([cfg.seed, BASELINES.index(kind)])
    mm_idx = _mmodality_indices(n, cfg)

    if kind == "gt":
        samples = seqs
        uncond = seqs
        mm_pairs = None
    elif kind == "shuffle":
        samples, mm_pairs = shuffle_draw(seqs, mm_idx, cfg)
        uncond = samples
    else:
        if train is None or len(train) < 1:
            raise ValueError("the 'random' baseline needs a non-empty training split")
        pool = train.sequences
        samples = [np.asarray(pool[j]) for j in rng.integers(0, len(pool), size=n)]
        mm_pairs = [
            (samples[i], np.asarray(pool[j]))
            for i, j in zip(mm_idx.tolist(), rng.integers(0, len(pool), size=len(mm_idx)))
        ]
        uncond = [np.asarray(pool[j]) for j in rng.integers(0, len(pool), size=2 * cfg.n_diversity)]

    if kind == "shuffle":  # its Cppl is the trained model's (evaluate_shuffle), not the frames'
        return metrics_from_samples(samples, uncond, mm_pairs, None, None, cfg)
    targets = cppl_targets(seqs, cfg.max_frames)
    means = [baseline_means(s, len(t)) for s, t in zip(samples, targets)]
    if cfg.cppl_first_step:
        if mean_face is None:
            raise ValueError("cppl_first_step: a baseline row needs mean_face (the training-set mean expression)")
        means, targets = with_first_step(means, targets, mean_face)
    return metrics_from_samples(samples, uncond, mm_pairs, means, targets, cfg)


# --------------------------------------------------------------------------------------------
# comparing rows
# --------------------------------------------------------------------------------------------


def closeness_to_gt(value: float, gt: float) -> float:
    """``|value - gt|``: the score of a → metric (smaller is better)."""
    return abs(float(value) - float(gt))


def best_rows(results: dict[str, dict[str, tuple[float, float]]], gt: str = "gt") -> dict[str, str | None]:
    """For every metric, the name of the best row of ``results`` other than ``gt`` (None if none is finite).

    ``results`` maps row names to :func:`evaluate_model` / :func:`evaluate_baseline` outputs. Best
    follows :data:`DIRECTIONS`; → metrics need the ``gt`` row (:func:`closeness_to_gt`) and give
    None without it. Ties go to the first row.
    """
    out: dict[str, str | None] = {}
    for metric in METRICS:
        direction = DIRECTIONS[metric]
        target = results.get(gt, {}).get(metric, (math.nan,))[0]
        best, best_score = None, math.inf
        for name, row in results.items():
            if name == gt:
                continue
            value = row.get(metric, (math.nan,))[0]
            if not math.isfinite(value):
                continue
            if direction == "↓":
                score = value
            elif direction == "↑":
                score = -value
            else:
                if not math.isfinite(target):
                    continue
                score = closeness_to_gt(value, target)
            if score < best_score:
                best, best_score = name, score
        out[metric] = best
    return out
