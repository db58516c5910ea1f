"""Checkpoint selection (``train.select``): which epoch's weights a CTEG trial ends with.

The paper trains for 100 epochs; the reference's ``train.py`` (``-save_mode best``, its default)
keeps the weights of the epoch with the lowest dev reconstruction loss and evaluates those. Here:

* ``select: best`` — after every validation, the epoch whose ``select_metric`` (a ``val/*``
  metric, lower is better) is the lowest so far becomes the selection; ties go to the later epoch
  (the reference's ``<=``). Rank 0 keeps that epoch's weights on the host.
* ``select: last`` — the final epoch's weights.

At the last epoch the selected weights are loaded into the model *before* the test-split
evaluation, so the test metrics, the trial's final checkpoint (what MLflow logs and ``facelab
promote`` registers) and the selection agree. The selection survives a restart: every checkpoint
carries it (``meta.json`` key ``select`` and, for ``best``, the weights in :data:`FILE`).

Every epoch reports ``select/epoch`` and ``select/value`` (the selection so far); at the end the
run is tagged ``facelab.select`` (mode), ``facelab.select.metric``, ``facelab.select.epoch`` and
``facelab.select.value``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from facelab.core import checkpoint as ckpt

FILE = "selected.safetensors"
"""The best-so-far weights inside a checkpoint directory (``select: best``)."""


class CheckpointSelector:
    """Tracks the selected epoch over a trial (see the module docstring).

    ``keep_weights``: hold the selected weights (rank 0); other ranks only follow the numbers."""

    def __init__(self, mode: str, metric: str, *, keep_encoder: bool, keep_weights: bool = True):
        if mode not in ("best", "last"):
            raise ValueError(f"train.select must be 'best' or 'last', got {mode!r}")
        self.mode, self.metric = mode, metric
        self.keep_encoder, self.keep_weights = keep_encoder, keep_weights
        self.epoch: int | None = None
        self.value: float | None = None
        self.weights: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_job(cls, job: dict, *, keep_weights: bool = True) -> CheckpointSelector:
        t = job["train"]
        return cls(
            t.get("select", "last"),
            t.get("select_metric", "val/mse"),
            keep_encoder=bool(job["model"]["finetune_encoder"]),
            keep_weights=keep_weights,
        )

    def update(self, epoch: int, metrics: dict[str, float], model: torch.nn.Module) -> bool:
        """After validating ``epoch``: is it the selection now? (Copies the weights if so, mode best.)"""
        if self.metric not in metrics:
            raise KeyError(f"train.select_metric {self.metric!r} is not among this epoch's metrics {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.mode == "best" and self.value is not None and not value <= self.value:
            return False
        self.epoch, self.value = epoch, value
        if self.mode == "best" and self.keep_weights:
            self.weights = ckpt.model_state(model, self.keep_encoder)
        return True

    def metrics(self) -> dict[str, float]:
        return {"select/epoch": float(self.epoch), "select/value": float(self.value)}

    def meta(self) -> dict:
        return {"select": {"mode": self.mode, "metric": self.metric, "epoch": self.epoch, "value": self.value}}

    def tags(self) -> dict[str, str]:
        return {
            "facelab.select": self.mode,
            "facelab.select.metric": self.metric,
            "facelab.select.epoch": str(self.epoch),
            "facelab.select.value": repr(self.value),
        }

    def save(self, dirpath: Path) -> None:
        """Write the best-so-far weights into a checkpoint directory (mode best; atomic)."""
        if self.mode == "best" and self.weights is not None:
            tmp = Path(dirpath) / (FILE + ".tmp")
            save_file(self.weights, str(tmp), metadata={"format": "pt"})
            tmp.replace(Path(dirpath) / FILE)

    def restore(self, dirpath: Path | None, meta: dict) -> None:
        """Resume the selection a checkpoint carries (nothing if it was made with other settings)."""
        sel = meta.get("select") or {}
        if sel.get("mode") != self.mode or sel.get("metric") != self.metric or sel.get("epoch") is None:
            return
        self.epoch, self.value = int(sel["epoch"]), float(sel["value"])
        if self.mode == "best" and self.keep_weights:
            path = Path(dirpath) / FILE if dirpath is not None else None
            if path is None or not path.is_file():
                raise ckpt.CheckpointError(f"{path}: missing (the checkpoint's meta.json names a selected epoch)")
            self.weights = load_file(str(path))

    def apply(self, model: torch.nn.Module) -> None:
        """Load the selected weights into ``model`` (mode best; mode last: it already holds them)."""
        if self.mode == "best" and self.weights is not None:
            ckpt.load_checked(model, self.weights, f"selected weights of epoch {self.epoch}")
