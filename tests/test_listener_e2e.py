"""CTEG Table 5 end to end at a tiny size: `dvc repro lm_listener` (synthetic release → import) → a
three-row sweep (CTEG, LM-Listener, GT) with `eval.protocol: listener` through Ray Tune + Train and
MLflow → `facelab report` in Table 5's layout (L2 ↓, FD ↓, Variation →, P-FD ↓)."""

from __future__ import annotations

import pytest

from conftest import dvc_repro, facelab, make_project

pytestmark = pytest.mark.slow

SWEEP = """name: listener-tiny
job: jobs/cteg_tiny.yaml
metric: {name: val/cppl, goal: minimize}
method: grid
variants:
  CTEG: {}
  LM-Listener: {job: jobs/lm_listener_tiny.yaml}
  GT: {eval.baseline: gt}
seeds: [0]
resources: {num_workers: 1, gpus_per_worker: 0, cpus_per_worker: 0.5}
max_concurrent_trials: 2
"""

TINY = [
    "data.path=data/lm_listener",  # every job of the sweep: the lineage check covers the data each row uses
    "eval.protocol=listener",
    "train.epochs=1",
    "train.vq_epochs=1",
    "train.max_steps_per_epoch=3",
    "train.max_val_batches=1",
    "eval.n_bootstrap=20",
]


def test_table5_sweep_reports_l2_fd_variation_pfd(tmp_path):
    p = make_project(tmp_path / "project")
    dvc_repro(p, "lm_listener")
    lock = (p / "dvc.lock").read_text()
    assert "data/lm_listener" in lock and "data/lm_listener_release" in lock
    (p / "sweeps" / "listener_tiny.yaml").write_text(SWEEP)
    facelab(p, "sweep", "sweeps/listener_tiny.yaml", *[x for s in TINY for x in ("--set", s)])
    out = facelab(p, "report", "listener-tiny").stdout
    assert "| Variant | L2 ↓ | FD ↓ | Variation → | P-FD ↓ |" in out, out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"CTEG", "LM-Listener", "GT"} <= set(rows), out
    assert "0.000" in rows["GT"] and "–" not in rows["CTEG"] and "–" not in rows["LM-Listener"], out
