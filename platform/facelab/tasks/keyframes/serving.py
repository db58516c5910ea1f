"""The keyframes task's health probe: a model must answer a one-keyframe script with 61 finite values."""

from __future__ import annotations

import math

import numpy as np
import torch

from facelab.tasks import ModelUnhealthy


def probe(model) -> None:
    with torch.no_grad():
        results = model.keyframes("health check", "neutral", ["a neutral face"])
    values = np.stack([r.values for r in results])
    if values.shape != (1, 61):
        raise ModelUnhealthy(f"probe answer has the wrong shape: {values.shape}, expected (1, 61)")
    if not all(math.isfinite(v) for v in values.ravel().tolist()):
        raise ModelUnhealthy("probe answer holds non-finite values (NaN/inf weights?)")
