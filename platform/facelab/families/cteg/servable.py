"""Build a CTEG model from a resolved job, and rebuild a trained one from its checkpoint (no pickle)."""

from __future__ import annotations

from pathlib import Path

import torch

from facelab.core import checkpoint as ckpt


def cteg_config(job: dict):
    """The model's typed config from a resolved ``cteg`` job dict (``model`` + ``data.max_frames``)."""
    from facelab.families.cteg.job import CTEGConfig

    return CTEGConfig(**job["model"], max_frames=job["data"]["max_frames"])


def build_cteg(job: dict, mean_expression) -> torch.nn.Module:
    from facelab.families.cteg.model import CTEG

    mean = torch.as_tensor(mean_expression, dtype=torch.float32)
    return CTEG(cteg_config(job), mean)


def load(dirpath: Path, device: str = "cpu", root: Path | None = None):
    """The CTEG module of a checkpoint directory (safetensors + config.json), in eval mode on ``device``."""
    config = ckpt.load_config(dirpath)
    weights = ckpt.load_weights(dirpath)
    if "mean_expression" not in weights:
        raise ckpt.CheckpointError(f"{Path(dirpath) / ckpt.MODEL_FILE}: no 'mean_expression' buffer")
    model = build_cteg(config, weights["mean_expression"])
    ckpt.load_into(model, dirpath)
    return model.to(device).eval()
