"""The expressions task's health probe: a model must answer one small request with (T, 53) finite frames."""

from __future__ import annotations

import math

import torch

from facelab.tasks import ModelUnhealthy


def probe(model) -> None:
    with torch.no_grad():
        seqs = model.generate(["health check"], max_frames=8, generator=torch.Generator().manual_seed(0))
    if len(seqs) != 1 or seqs[0].ndim != 2 or seqs[0].shape[-1] != 53 or seqs[0].shape[0] < 1:
        raise ModelUnhealthy(f"probe answer has the wrong shape: {[tuple(x.shape) for x in seqs]}")
    if not all(math.isfinite(v) for v in seqs[0].float().cpu().numpy().ravel().tolist()):
        raise ModelUnhealthy("probe answer holds non-finite values (NaN/inf weights?)")
