"""What every expressions-task worker loop calls to score a model: the dev-split Cppl (Eq. 18) each
epoch, the six test metrics of the CTEG paper after the last (Appendix D), and the §5.3 baseline rows.

Metric names :func:`run_test_eval` logs (each with ``<name>_se``, its bootstrap standard error):

* ``test/<metric>`` — the model's Table 2 row at ``eval.max_frames``;
* ``test<N>/<metric>`` — the same trained model at each generation limit ``N`` of
  ``eval.extra_max_frames`` (Table 2's "CTEG (MSL = 64)" is ``test64/``): DoT, FgD, Diversity,
  MModality, Variation; never Cppl (the paper's "/");
* ``shuffle/<metric>`` — with ``eval.shuffle_row``, Table 2's Shuffle row: the model's Cppl of the
  shuffled test sequences and the other five metrics of those sequences.
* with ``eval.protocol: listener`` instead, CTEG Table 5: ``test/l2``, ``test/fd``, ``test/variation``,
  ``test/pfd`` -- LM-Listener's evaluation (:mod:`facelab.tasks.expressions.listener`).

A value that is not finite is left out (a report shows "–"), so it cannot fail the trial's last epoch.

A model of this task (CTEG, LM-Listener, a team's own) offers ``generate(texts, max_frames, generator)``,
``teacher_forced_means(...)``, ``cfg.max_frames`` and a ``mean_expression`` buffer; see
:mod:`facelab.tasks.expressions.evaluate`.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from facelab.tasks.expressions.data import PairDataset


def eval_config(job: dict):
    from facelab.tasks.expressions.evaluate import EvalConfig

    e = job["eval"]
    return EvalConfig(
        n_diversity=e["n_diversity"],
        n_mmodality=e["n_mmodality"],
        n_bootstrap=e["n_bootstrap"],
        max_frames=e["max_frames"],
        batch_size=e["batch_size"],
        seed=job["train"]["seed"],
        delta=e["delta"],
        sigma=e["sigma"],
        max_texts=e["max_texts"],
        cppl_region=e["cppl_region"],
        cppl_first_step=e.get("cppl_first_step", False),
        cppl_output=e.get("cppl_output", "mean"),  # a CTEG-only key (CTEGEval)
    )


def val_cppl_terms(
    model, dev_ds: PairDataset, idx: list[int], job: dict, batch_size: int, epoch: int
) -> tuple[float, int]:
    """This rank's sum of per-sequence Cppl cross-entropies (Eq. 18's inner mean) and their count."""
    from facelab.tasks.expressions.evaluate import model_cppl_inputs
    from facelab.tasks.expressions.metrics import cppl_per_item

    n_max = job["train"]["max_val_batches"]
    idx = idx[: n_max * batch_size] if n_max else idx
    if not idx:
        return 0.0, 0
    cfg = eval_config(job)
    texts = [dev_ds.texts[i] for i in idx]
    seqs = [np.asarray(dev_ds.raw[i], dtype=np.float32) for i in idx]  # uncut: a cut sequence has no terminator step
    gen = torch.Generator(device=model.mean_expression.device).manual_seed(job["train"]["seed"] + epoch)
    means, targets = model_cppl_inputs(model, texts, seqs, cfg, model.cfg.max_frames, gen)
    nll = cppl_per_item(means, targets, cfg.delta, cfg.sigma, region=cfg.cppl_region, floor=cfg.cppl_floor)
    return float(nll.sum()), len(nll)


def flatten_eval(
    results: dict[str, tuple[float, float]], prefix: str = "test", finite_only: bool = False
) -> dict[str, float]:
    """``{f"{prefix}/{metric}": value, f"{prefix}/{metric}_se": se}``; ``finite_only`` leaves out a
    metric whose value is not finite (and a non-finite SE)."""
    out = {}
    for name, (value, se) in results.items():
        if finite_only and not math.isfinite(value):
            continue
        out[f"{prefix}/{name}"] = value
        if not finite_only or math.isfinite(se):
            out[f"{prefix}/{name}_se"] = se
    return out


def run_test_eval(model, job: dict, data_dir: Path, device, client, run_id) -> dict[str, float]:
    """The six metrics on the test split (+ a trajectories plot logged to the run), and the rows of
    ``eval.extra_max_frames`` and ``eval.shuffle_row`` from the same model (module docstring)."""
    import dataclasses

    from facelab.data import emoava
    from facelab.tasks.expressions.evaluate import evaluate_model, evaluate_shuffle

    test = emoava.load_split(data_dir, "test")
    cfg = eval_config(job)
    e = job["eval"]
    if e.get("protocol") == "listener":  # CTEG Table 5: LM-Listener's L2, FD, Variation, P-FD
        metrics = run_listener_eval(model, test, cfg, data_dir, device)
        if client:
            log_trajectories(model, test, job, client, run_id)
        return metrics
    t0 = time.time()
    metrics = flatten_eval(evaluate_model(model, test, cfg, device=device))
    metrics["test/eval_time_s"] = time.time() - t0
    for n in e.get("extra_max_frames") or []:
        t0 = time.time()
        res = evaluate_model(model, test, dataclasses.replace(cfg, max_frames=int(n)), device=device, cppl=False)
        res.pop("cppl")
        metrics.update(flatten_eval(res, prefix=f"test{int(n)}", finite_only=True))
        metrics[f"test{int(n)}/eval_time_s"] = time.time() - t0
    if e.get("shuffle_row"):
        t0 = time.time()
        metrics.update(flatten_eval(evaluate_shuffle(model, test, cfg, device=device), "shuffle", finite_only=True))
        metrics["shuffle/eval_time_s"] = time.time() - t0
    if client:
        log_trajectories(model, test, job, client, run_id)
    return metrics


def log_trajectories(model, test, job: dict, client, run_id: str, n: int = 3, n_samples: int = 2) -> None:
    """The first ``n`` test texts generated and logged beside their ground truth: ``plots/trajectories.png``
    (one sample) and ``viewer/preview.html`` (``n_samples`` samples per text as heatmaps and curves,
    stop frames marked; :mod:`facelab.viewer`). The extra samples are drawn after the first, from the
    same generator, so the PNG is the one a single-sample run draws."""
    from facelab.plots import trajectories
    from facelab.viewer.html import expression_payload, log_run_preview

    gen = torch.Generator(device=model.mean_expression.device).manual_seed(job["train"]["seed"])
    texts = test.texts[:n]
    max_frames = min(job["eval"]["max_frames"], model.cfg.max_frames)
    out = model.generate(texts, max_frames=max_frames, generator=gen)
    samples = [[o.float().cpu().numpy()] for o in out]
    with tempfile.TemporaryDirectory() as d:
        png = trajectories(texts, [s[0] for s in samples], test.sequences[:n], Path(d) / "trajectories.png")
        client.log_artifact(run_id, str(png), "plots")
    for _ in range(n_samples - 1):
        for per_text, o in zip(samples, model.generate(texts, max_frames=max_frames, generator=gen)):
            per_text.append(o.float().cpu().numpy())
    payload = expression_payload(
        texts,
        samples,
        test.sequences[:n],
        title=f"{client.get_run(run_id).info.run_name}: generated vs ground truth",
        subtitle=f"First test texts: {n_samples} generated sample(s) beside the ground truth, "
        "each coefficient over time; the black line is where the sequence stops.",
        n=n,
    )
    log_run_preview(client, run_id, payload)
    log_flame_avatars(client, run_id, texts, [per_text[0] for per_text in samples])


def log_flame_avatars(client, run_id: str, texts: list[str], sequences: list[np.ndarray]) -> int:
    """Issue #20 item 3: when the user pointed facelab at their own FLAME model (``FACELAB_FLAME_MODEL``;
    FLAME is licensed and never shipped), each generated sequence rendered as a FLAME avatar, a 24 fps GIF
    (``viewer/flame_<i>.gif``; :func:`facelab.viewer.flame.render_gif`). A variable naming a bad file does
    not fail the trial at its last step: the reason is printed and tagged (``facelab.flame_error``) and
    the avatars are skipped. Returns how many GIFs were logged."""
    from facelab.viewer.flame import FlameError, configured_model, render_gif

    try:
        flame = configured_model()
    except FlameError as e:
        print(f"facelab: no FLAME avatars for this run: {e}", file=sys.stderr)
        client.set_tag(run_id, "facelab.flame_error", str(e)[:4000])
        return 0
    if flame is None:
        return 0
    with tempfile.TemporaryDirectory() as d:
        for i, (text, seq) in enumerate(zip(texts, sequences, strict=True)):
            gif = render_gif(flame, np.asarray(seq, dtype=np.float64), Path(d) / f"flame_{i}.gif", title=text[:48])
            client.log_artifact(run_id, str(gif), "viewer")
    return len(sequences)


def run_baseline_eval(job: dict, data_dir: Path) -> dict[str, float]:
    """A model-free §5.3 row (``eval.baseline``); the Shuffle row's Cppl is NaN here (it needs the
    trained model: ``eval.shuffle_row`` of a model's trial)."""
    from facelab.data import emoava
    from facelab.tasks.expressions.evaluate import evaluate_baseline

    test = emoava.load_split(data_dir, "test")
    train = emoava.load_split(data_dir, "train")
    if job["eval"].get("protocol") == "listener":
        return run_listener_eval(None, test, eval_config(job), data_dir, baseline=job["eval"]["baseline"], train=train)
    mean, _std = emoava.load_stats(data_dir)
    return flatten_eval(evaluate_baseline(job["eval"]["baseline"], test, train, eval_config(job), mean_face=mean))


def check_eval_data(job: dict, data_dir: Path) -> None:
    """Before training: the data the test evaluation will need is there (``eval.protocol: listener``
    needs the speaker frames of the test split), so a long run cannot fail at its last step."""
    if job["eval"].get("protocol") == "listener" and job["eval"].get("enabled", True):
        from facelab.data.lm_listener_data import load_speaker

        load_speaker(data_dir, "test")


def run_listener_eval(
    model, test, cfg, data_dir: Path, device="cpu", *, baseline: str | None = None, train=None
) -> dict[str, float]:
    """``eval.protocol: listener`` (CTEG Table 5): ``test/{l2,fd,variation,pfd}`` and their ``_se`` for a
    trained ``model`` or a model-free ``baseline`` row (:mod:`facelab.tasks.expressions.listener`)."""
    from facelab.data.lm_listener_data import load_speaker
    from facelab.tasks.expressions.listener import evaluate_listener_baseline, evaluate_listener_model

    speaker = load_speaker(data_dir, "test")
    t0 = time.time()
    if baseline:
        results = evaluate_listener_baseline(baseline, test, speaker, train, cfg)
    else:
        results = evaluate_listener_model(model, test, speaker, cfg, device=device)
    metrics = flatten_eval(results, finite_only=True)
    metrics["test/eval_time_s"] = time.time() - t0
    return metrics
