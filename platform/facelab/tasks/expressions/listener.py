"""The LM-Listener evaluation protocol (``eval.protocol: listener``): CTEG Appendix C, Q1, Table 5.

The CTEG paper compares CTEG and LM-Listener on the LM-Listener dataset "following exactly the same
evaluation settings" as the LM-Listener release (github.com/sanjayss34/lm-listener,
``evaluate_listener.py``): four numbers per row, each the mean over test windows of a per-window value
(:mod:`facelab.tasks.expressions.metrics`, last section):

=========== ====================================================== ==========
metric      per test window                                        better
=========== ====================================================== ==========
l2          mean squared error of prediction vs ground truth       ↓
fd          Fréchet distance of the two windows' frame Gaussians    ↓
variation   ``mean_d Var_t`` of the prediction (of the GT for GT)   → GT
pfd         FD of ``[speaker | listener]`` frames (paired FD)       ↓
=========== ====================================================== ==========

The release prints L2, FD and P-FD as errors (lower is better: they compare a prediction with its own
ground truth) and Variation for the prediction *and* the ground truth ("var" / "var GT"), the
reference a prediction should match; the CTEG paper treats Variation the same way in its Table 2
(→, closest to GT best). :data:`DIRECTIONS` says so and ``facelab report`` marks it.

Protocol choices (beyond the formulas):

* One sample per test window, generated from the window's text with the same seeds and batching as
  the Table 2 evaluation (:func:`facelab.tasks.expressions.evaluate.evaluate_model`'s first stage), up
  to ``min(eval.max_frames, model.cfg.max_frames)`` frames. Prediction and ground truth are compared
  over their common length, from the first frame.
* Features: the platform's 53-d frames (50 expression + 3 jaw). The release scores 56-d frames
  (``exp`` + the whole 6-d ``pose``, i.e. also the global head rotation, which a text-to-expression
  model does not generate). P-FD's speaker half is the release's 56-d ``p1_exp | p1_pose``.
* A window whose FD is undefined (fewer than 2 aligned frames, or a covariance root with a large
  imaginary part, where the release stops with an error) is left out of that metric's mean.
* ± is the bootstrap standard error over windows (``eval.n_bootstrap`` resamples), as for Table 2.
* Baseline rows (``eval.baseline``): ``gt`` scores the test windows against themselves (L2 = FD =
  P-FD = 0, Variation of the data); ``random`` a random training window per test window (the
  release's "Random Train" baseline); ``shuffle`` each test window with its frames permuted in time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from facelab.tasks.expressions.config import LISTENER_METRICS
from facelab.tasks.expressions.metrics import (
    bootstrap_se,
    listener_fd_per_item,
    listener_l2_per_item,
    listener_pfd_per_item,
    variation_per_item,
)

if TYPE_CHECKING:
    from facelab.data.emoava import EmoAvaSplit
    from facelab.tasks.expressions.evaluate import EvalConfig, ExpressionModel

METRICS = list(LISTENER_METRICS)
"""Table 5's columns, in the paper's order: L2, FD, Variation, P-FD."""

DIRECTIONS = {"l2": "↓", "fd": "↓", "variation": "→", "pfd": "↓"}
"""↓ lower is better, → closer to the ground-truth row (see the module docstring)."""

LABELS = {"l2": "L2", "fd": "FD", "variation": "Variation", "pfd": "P-FD"}


def _summary(values: np.ndarray, cfg: EvalConfig) -> tuple[float, float]:
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return (math.nan, math.nan)
    se = bootstrap_se(finite, n_resamples=cfg.n_bootstrap, seed=cfg.seed) if finite.size >= 2 else math.nan
    return (float(finite.mean()), se)


def listener_metrics_from_samples(
    samples: Sequence[np.ndarray],
    truth: Sequence[np.ndarray],
    speaker: Sequence[np.ndarray],
    cfg: EvalConfig,
) -> dict[str, tuple[float, float]]:
    """``{metric: (mean, bootstrap SE)}`` for :data:`METRICS`: ``samples[i]`` is the row's sequence for
    test window ``i``, ``truth[i]`` its ground truth and ``speaker[i]`` the speaker's frames there."""
    per_item = {
        "l2": listener_l2_per_item(truth, samples),
        "fd": listener_fd_per_item(truth, samples),
        "variation": variation_per_item(samples),
        "pfd": listener_pfd_per_item(truth, samples, speaker),
    }
    return {m: _summary(per_item[m], cfg) for m in METRICS}


def _test_items(
    test: EmoAvaSplit, speaker: Sequence[np.ndarray], cfg: EvalConfig
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    if len(speaker) != len(test):
        raise ValueError(f"{len(speaker)} speaker sequences for {len(test)} test windows")
    n = len(test) if cfg.max_texts is None else min(len(test), cfg.max_texts)
    if n < 2:
        raise ValueError(f"the test split needs at least 2 windows, has {n}")
    seqs = [np.asarray(s) for s in test.sequences[:n]]
    return list(test.texts[:n]), seqs, [np.asarray(s) for s in speaker[:n]]


def evaluate_listener_model(
    model: ExpressionModel,
    test: EmoAvaSplit,
    speaker: Sequence[np.ndarray],
    cfg: EvalConfig | None = None,
    device="cpu",
) -> dict[str, tuple[float, float]]:
    """Table 5 row of a trained model of the expressions task (CTEG, LM-Listener, ...) on ``test``.

    Moves ``model`` to ``device``; samples in eval mode with ``torch.no_grad`` and restores the mode.
    """
    import torch

    from facelab.tasks.expressions.evaluate import _STAGE_SAMPLES, EvalConfig, _generate, _generator

    cfg = cfg or EvalConfig()
    model.to(device)
    texts, seqs, spk = _test_items(test, speaker, cfg)
    max_frames = min(cfg.max_frames, model.cfg.max_frames)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            samples = _generate(model, texts, cfg, max_frames, _generator(cfg, _STAGE_SAMPLES))
    finally:
        model.train(was_training)
    return listener_metrics_from_samples(samples, seqs, spk, cfg)


def evaluate_listener_baseline(
    kind: str,
    test: EmoAvaSplit,
    speaker: Sequence[np.ndarray],
    train: EmoAvaSplit | None = None,
    cfg: EvalConfig | None = None,
) -> dict[str, tuple[float, float]]:
    """Table 5 row of a model-free baseline: ``gt``, ``random`` or ``shuffle`` (module docstring)."""
    from facelab.tasks.expressions.evaluate import BASELINES, EvalConfig

    cfg = cfg or EvalConfig()
    if kind not in BASELINES:
        raise ValueError(f"kind must be one of {BASELINES}, got {kind!r}")
    _texts, seqs, spk = _test_items(test, speaker, cfg)
    rng = np.random.default_rng([cfg.seed, BASELINES.index(kind)])
    if kind == "gt":
        samples = seqs
    elif kind == "shuffle":
        samples = [s[rng.permutation(len(s))] for s in seqs]
    else:
        if train is None or len(train) < 1:
            raise ValueError("the 'random' baseline needs a non-empty training split")
        samples = [np.asarray(train.sequences[j]) for j in rng.integers(0, len(train), size=len(seqs))]
    return listener_metrics_from_samples(samples, seqs, spk, cfg)
