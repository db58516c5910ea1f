"""Checkpoints without pickle: weights in safetensors, config and progress in JSON.

Layout of a checkpoint directory::

    model.safetensors   model weights (the frozen pretrained text encoder is not stored: it is
                        rebuilt from ``model.text_encoder``; a fine-tuned encoder is stored)
    config.json         the resolved job config + the job kind: enough to rebuild the model
    train_state.pt      optimizer / LR-schedule / RNG state, loaded with ``weights_only=True``
    meta.json           epoch, global step, metrics history

``model.safetensors`` + ``config.json`` alone make a servable model (what MLflow stores).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
SERVABLE_FILES = (MODEL_FILE, CONFIG_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing files or holds unusable contents (the message names the file)."""


def _file_mode() -> int:
    """The mode a plainly created file gets (0666 less the umask), read without changing the umask
    (``os.umask`` would, for every thread): ``mkstemp`` makes 0600 files, and a checkpoint on shared
    storage must stay as readable as it was before temporary files were unique."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def _fsync_dir(dirpath: Path) -> None:
    """Make a rename in ``dirpath`` durable; a filesystem that cannot fsync a directory is let be."""
    try:
        fd = os.open(dirpath, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through ``write(tmp)`` to a unique temporary file in the same directory, fsync
    it, rename it over ``path`` and fsync the directory.

    Unique names (``mkstemp``), not a fixed ``name.tmp``: two writers of one checkpoint (a retried
    worker beside a stale one) must not write into the same temporary file. The fsyncs make a crash
    or power loss leave either the old file or the complete new one, never a renamed empty file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.close(fd)
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            os.fchmod(fd, _file_mode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def model_state(model: torch.nn.Module, keep_encoder: bool) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    if not keep_encoder:
        sd = {k: v for k, v in sd.items() if not k.startswith("text_encoder.")}
    # safetensors refuses shared storage; clone makes every tensor own its memory.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}


def save(
    dirpath: Path,
    model: torch.nn.Module,
    config: dict,
    *,
    keep_encoder: bool,
    train_state: dict[str, Any] | None = None,
    meta: dict | None = None,
) -> Path:
    return save_tensors(dirpath, model_state(model, keep_encoder), config, train_state=train_state, meta=meta)


def save_tensors(
    dirpath: Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    *,
    train_state: dict[str, Any] | None = None,
    meta: dict | None = None,
) -> Path:
    """Write a checkpoint from an explicit weight dict (e.g. only a LoRA adapter's tensors)."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    _atomic_write(dirpath / MODEL_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write_text(dirpath / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    if train_state is not None:
        _atomic_write(dirpath / STATE_FILE, lambda tmp: torch.save(train_state, tmp))
    if meta is not None:
        _atomic_write_text(dirpath / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    return dirpath


def load_config(dirpath: Path) -> dict:
    p = Path(dirpath) / CONFIG_FILE
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{p}: not valid JSON ({exc})") from None


def load_weights(dirpath: Path) -> dict[str, torch.Tensor]:
    p = Path(dirpath) / MODEL_FILE
    if not p.is_file():
        raise CheckpointError(f"{p}: missing")
    try:
        return load_file(str(p))
    except Exception as exc:  # safetensors raises several types for truncated/corrupt files
        raise CheckpointError(f"{p}: unreadable safetensors file ({exc})") from None


def load_train_state(dirpath: Path) -> dict | None:
    p = Path(dirpath) / STATE_FILE
    if not p.is_file():
        return None
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: unreadable training state ({exc})") from None


def load_meta(dirpath: Path) -> dict:
    p = Path(dirpath) / META_FILE
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{p}: not valid JSON ({exc})") from None


def load_resume(checkpoint) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(weights, train_state, meta)`` of the Ray Train checkpoint a restarted worker resumes from;
    a checkpoint without training state cannot be resumed and says so."""
    with checkpoint.as_directory() as d:
        weights, state, meta = load_weights(Path(d)), load_train_state(Path(d)), load_meta(Path(d))
    if state is None:
        raise CheckpointError(f"{checkpoint.path}: no {STATE_FILE}; cannot resume training state")
    return weights, state, meta


def load_into(model: torch.nn.Module, dirpath: Path, sd: dict[str, torch.Tensor] | None = None) -> None:
    """Load weights (``sd``, or the directory's file) into ``model``; only the frozen encoder may be absent."""
    load_checked(model, load_weights(dirpath) if sd is None else sd, str(Path(dirpath) / MODEL_FILE))


def load_checked(model: torch.nn.Module, sd: dict[str, torch.Tensor], where: str) -> None:
    """``model.load_state_dict(sd)`` where only the frozen encoder (``text_encoder.*``) may be absent;
    a wrong shape, a missing or an unknown weight raises :class:`CheckpointError` naming ``where``."""
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{where}: does not fit the model ({exc})") from None
    missing = [k for k in result.missing_keys if not k.startswith("text_encoder.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"{where}: does not fit the model "
            f"(missing {missing[:5]}{'…' if len(missing) > 5 else ''}, unexpected {result.unexpected_keys[:5]})"
        )


def servable_dir(model_dir: Path) -> Path:
    """The checkpoint directory of a downloaded model version: inside an MLflow pyfunc model (the
    ``checkpoint`` artifact its ``MLmodel`` names; see ``facelab.serve.pyfunc``), else the folder itself
    (versions registered as a bare checkpoint folder)."""
    import yaml

    model_dir = Path(model_dir)
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        return model_dir
    try:
        spec = yaml.safe_load(mlmodel.read_text()) or {}
        rel = spec["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
    except (yaml.YAMLError, KeyError, TypeError):
        raise CheckpointError(f"{mlmodel}: an MLflow model without a facelab 'checkpoint' artifact") from None
    inner = (model_dir / rel).resolve()
    if not inner.is_dir() or model_dir.resolve() not in inner.parents:
        raise CheckpointError(f"{mlmodel}: its checkpoint artifact {rel!r} is not a folder inside the model")
    return inner
