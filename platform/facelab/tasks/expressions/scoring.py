"""What every expressions-task worker loop calls to score a model: the dev-split Cppl (Eq. 18) each
epoch, the six test metrics of the CTEG paper after the last (Appendix D), and the §5.3 baseline rows.

A model of this task (CTEG, LM-Listener, a team's own) offers ``generate(texts, max_frames, generator)``,
``teacher_forced_means(...)``, ``cfg.max_frames`` and a ``mean_expression`` buffer; see
:mod:`facelab.tasks.expressions.evaluate`.
"""

from __future__ import annotations

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


def flatten_eval(results: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for name, (value, se) in results.items():
        out[f"test/{name}"] = value
        out[f"test/{name}_se"] = se
    return out


def run_test_eval(model, job: dict, data_dir: Path, device, client, run_id) -> dict[str, float]:
    """The six metrics on the test split (+ a trajectories plot logged to the run)."""
    from facelab.data import emoava
    from facelab.tasks.expressions.evaluate import evaluate_model

    test = emoava.load_split(data_dir, "test")
    cfg = eval_config(job)
    t0 = time.time()
    metrics = flatten_eval(evaluate_model(model, test, cfg, device=device))
    metrics["test/eval_time_s"] = time.time() - t0
    if client:
        log_trajectories(model, test, job, client, run_id)
    return metrics


def log_trajectories(model, test, job: dict, client, run_id: str, n: int = 3) -> None:
    from facelab.plots import trajectories

    gen = torch.Generator(device=model.mean_expression.device).manual_seed(job["train"]["seed"])
    texts = test.texts[:n]
    out = model.generate(texts, max_frames=min(job["eval"]["max_frames"], model.cfg.max_frames), generator=gen)
    with tempfile.TemporaryDirectory() as d:
        png = trajectories(
            texts, [o.float().cpu().numpy() for o in out], test.sequences[:n], Path(d) / "trajectories.png"
        )
        client.log_artifact(run_id, str(png), "plots")


def run_baseline_eval(job: dict, data_dir: Path) -> dict[str, float]:
    from facelab.data import emoava
    from facelab.tasks.expressions.evaluate import evaluate_baseline

    test = emoava.load_split(data_dir, "test")
    train = emoava.load_split(data_dir, "train")
    return flatten_eval(evaluate_baseline(job["eval"]["baseline"], test, train, eval_config(job)))
