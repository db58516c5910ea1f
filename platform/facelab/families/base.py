"""The ``Family`` contract: what a model family tells the platform about itself.

A family is one folder (``facelab/families/<name>/``, or a package of your own that declares an
entry point in the ``facelab.families`` group) whose ``__init__.py`` defines ``FAMILY = Family(...)``.
The platform (spec loading, the sweep driver, serving, reports, the CLI) reads only this object;
it never imports a family's modules by name.

Heavy parts are named as ``"module:attribute"`` strings and imported on first use, so listing the
families, validating a sweep or printing ``--dry-run`` never imports torch or a model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facelab.core.config import Strict

TASKS = ("expressions", "keyframes")
"""The tasks a family can serve: ``expressions`` (``POST /v1/expressions``: text → 53-d FLAME
sequences) and ``keyframes`` (``POST /v1/keyframes``: script → 61-channel ARKit keyframes)."""


class FamilyError(ValueError):
    """A family is declared wrongly, or a kind names no installed family (the message says which)."""


def resolve(ref: str | Callable) -> Callable:
    """``"package.module:attribute"`` → the attribute (imported now); a callable is returned as is."""
    if callable(ref):
        return ref
    module, _, attr = str(ref).partition(":")
    if not module or not attr:
        raise FamilyError(f"{ref!r}: expected 'package.module:attribute'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise FamilyError(f"{ref!r} cannot be imported ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class Family:
    """One model family. Required: ``kind``, ``job``, ``metrics``, ``worker_loop``, ``load_servable``."""

    kind: str
    """The ``kind:`` of its job YAMLs, stored in every checkpoint's ``config.json`` and run tag."""
    job: type[Strict]
    """The job schema: the one declaration of the family's hyperparameters. It must have a
    ``kind: Literal['<kind>']`` field, and ``name``, ``data.path`` and ``train.{seed, epochs,
    max_failures, checkpoints_to_keep}`` fields (the sweep driver reads them)."""
    metrics: frozenset[str]
    """Metric names its worker loop reports (a sweep's ``metric.name`` must be one of them)."""
    worker_loop: str | Callable[[dict], None]
    """The Ray Train per-worker function, ``(config) -> None``; see :mod:`facelab.runtime.worker`."""
    load_servable: str | Callable[..., Any]
    """``(checkpoint_dir: Path, device: str, root: Path | None) -> model``: rebuild a trained model
    from a checkpoint directory (safetensors + ``config.json``, no pickle)."""
    task: str | None = None
    """Which task it serves (:data:`TASKS`), or None for a model that is only used by others (the
    keyframe evaluator)."""
    description: str = ""
    """One line for ``facelab families``."""
    lineage: str | Callable[[Path, dict], dict[str, str]] | None = None
    """Optional ``(project_root, job) -> tags``: lineage beyond the dataset (e.g. a DVC-built base
    model), verified before the sweep starts."""
    servable_info: str | Callable[[Any, dict], dict[str, Any]] | None = None
    """Optional ``(model, config) -> dict``: extra fields for ``GET /v1/models``."""
    report_label: str | Callable[[Any], str] | None = None
    """Optional ``(trial) -> str``: the row label of its trials in the task's paper tables."""
    add_cli: str | Callable[[Any], None] | None = None
    """Optional ``(data_subparsers) -> None``: ``facelab data`` subcommands of its own (each sets
    ``func``)."""
    shared_base: str | Callable[..., Any] | None = None
    """Optional ``(config, root, device, max_adapters) -> set``: serve several registered models of this
    family that share a base model from one copy of it (LoRA adapters): the set's ``add(name,
    checkpoint_dir)`` returns a servable of one of them (``facelab serve --model A+B``)."""
    script_writer: str | Callable[..., Any] | None = None
    """Optional ``(name | None, root, device, *, check_only=False) -> writer``: KeyframeFace's first stage
    (§4.1), the LM that rewrites free text into a script for ``POST /v1/scripts`` (``writer.info``,
    ``writer.write(text, max_keyframes=, seed=, should_stop=)``); ``name`` None is the family's default
    writer; ``check_only`` only checks, before anything starts, that ``name`` can load. A writer that
    cannot load raises ``ValueError`` naming ``--script-writer``. The first installed family that
    declares one provides the route (:func:`facelab.families.registry.script_writer`)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.kind, str) or not self.kind.isidentifier():
            problems.append(f"kind {self.kind!r} must be an identifier")
        if not (isinstance(self.job, type) and issubclass(self.job, Strict)):
            problems.append("job must be a facelab.core.config.Strict subclass")
        else:
            kind_field = self.job.model_fields.get("kind")
            if kind_field is None or kind_field.default != self.kind:
                problems.append(f"job {self.job.__name__} must declare kind: Literal[{self.kind!r}] = {self.kind!r}")
            for key in ("name", "data", "train"):
                if key not in self.job.model_fields:
                    problems.append(f"job {self.job.__name__} has no '{key}' field")
        if self.task is not None and self.task not in TASKS:
            problems.append(f"task {self.task!r} is not one of {TASKS}")
        if not self.metrics:
            problems.append("metrics is empty")
        if problems:
            raise FamilyError(f"family {self.kind!r}: " + "; ".join(problems))

    # Resolved on first use (imports the family's modules).
    def get_worker_loop(self) -> Callable[[dict], None]:
        return resolve(self.worker_loop)

    def get_load_servable(self) -> Callable[..., Any]:
        return resolve(self.load_servable)

    def hook(self, name: str) -> Callable | None:
        ref = getattr(self, name)
        return None if ref is None else resolve(ref)
