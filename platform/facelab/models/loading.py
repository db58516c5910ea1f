"""Build models from a resolved job config, and load servable checkpoints (no pickle)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from facelab.train import checkpoint as ckpt


def cteg_config(job: dict):
    """The model's typed config from a resolved ``cteg`` job dict (``model`` + ``data.max_frames``)."""
    from facelab.models.cteg.model import CTEGConfig

    names = {f.name for f in dataclasses.fields(CTEGConfig)}
    kwargs = {k: v for k, v in job["model"].items() if k in names}
    if "max_frames" in names:
        kwargs["max_frames"] = job["data"]["max_frames"]
    return CTEGConfig(**kwargs)


def build_cteg(job: dict, mean_expression) -> torch.nn.Module:
    from facelab.models.cteg.model import CTEG

    mean = torch.as_tensor(mean_expression, dtype=torch.float32)
    return CTEG(cteg_config(job), mean)


def load_servable(dirpath: Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model stored in a checkpoint directory (safetensors + config.json)."""
    config = ckpt.load_config(dirpath)
    kind = config.get("kind")
    if kind != "cteg":
        raise ckpt.CheckpointError(f"{Path(dirpath) / ckpt.CONFIG_FILE}: unknown job kind {kind!r}")
    weights = ckpt.load_weights(dirpath)
    if "mean_expression" not in weights:
        raise ckpt.CheckpointError(f"{Path(dirpath) / ckpt.MODEL_FILE}: no 'mean_expression' buffer")
    model = build_cteg(config, weights["mean_expression"])
    ckpt.load_into(model, dirpath)
    return model.to(device).eval(), config
