"""The family registry: the built-in families plus every ``facelab.families`` entry point.

A team's package adds a family without touching facelab::

    # pyproject.toml of the team's package
    [project.entry-points."facelab.families"]
    nearest = "facelab_nearest:FAMILY"

and ``facelab families`` lists it; ``facelab sweep`` / ``report`` / ``promote`` / ``serve`` use it
like a built-in one. Two families of one ``kind`` are an error naming both sources.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import tempfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from facelab.core import checkpoint as ckpt
from facelab.families.base import Family, FamilyError

ENTRY_POINT_GROUP = "facelab.families"

# The families that ship with facelab: package names whose ``FAMILY`` is imported on first use.
BUILTIN = (
    "facelab.families.cteg",
    "facelab.families.lm_listener",
    "facelab.families.keyframe_lm",
    "facelab.families.keyframe_mdm",
    "facelab.families.keyframe_evaluator",
)


@functools.cache
def _load() -> tuple[dict[str, Family], dict[str, str]]:
    found: dict[str, Family] = {}
    source: dict[str, str] = {}

    def add(fam: Any, where: str) -> None:
        if callable(fam) and not isinstance(fam, Family):
            fam = fam()
        if not isinstance(fam, Family):
            raise FamilyError(f"{where}: expected a facelab.families.base.Family, got {type(fam).__name__}")
        if fam.kind in found:
            raise FamilyError(f"two families of kind {fam.kind!r}: {source[fam.kind]} and {where}")
        found[fam.kind], source[fam.kind] = fam, where

    for mod in BUILTIN:
        add(importlib.import_module(mod).FAMILY, mod)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plug-in is named, not a traceback
            raise FamilyError(
                f"entry point {ep.name!r} = {ep.value!r} ({ENTRY_POINT_GROUP}) cannot be loaded: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        add(obj, f"entry point {ep.value} ({getattr(ep.dist, 'name', '?')})")
    return found, source


def families() -> dict[str, Family]:
    """Every installed family by kind (built-ins first, then plug-ins in entry-point order)."""
    return dict(_load()[0])


def source_of(kind: str) -> str:
    """Where a family comes from: its package (built-in) or its entry point."""
    return _load()[1][kind]


def get(kind: Any) -> Family:
    """The family of ``kind``, or :class:`FamilyError` listing the known kinds (with a close match)."""
    fams = _load()[0]
    if isinstance(kind, str) and kind in fams:
        return fams[kind]
    hint = difflib.get_close_matches(str(kind), list(fams), n=1)
    raise FamilyError(
        f"unknown job kind {kind!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known: {sorted(fams)}"
    )


def script_writer():
    """The ``script_writer`` hook (:attr:`Family.script_writer`, ``POST /v1/scripts``) of the first installed
    family that declares one, or :class:`FamilyError` when none does."""
    for family in families().values():
        if family.script_writer is not None:
            return family.hook("script_writer")
    raise FamilyError("no installed family provides a script writer (Family.script_writer) for POST /v1/scripts")


def job_types() -> dict[str, type]:
    """kind → job schema class."""
    return {k: f.job for k, f in _load()[0].items()}


def load_servable(dirpath: Path, device: str = "cpu", root: Path | None = None):
    """Rebuild the model stored in a checkpoint directory → (model, resolved job config).

    The family is chosen by the ``kind`` in the checkpoint's ``config.json``."""
    config = ckpt.load_config(dirpath)
    kind = config.get("kind")
    try:
        fam = get(kind)
    except FamilyError as exc:
        raise ckpt.CheckpointError(f"{Path(dirpath) / ckpt.CONFIG_FILE}: {exc}") from None
    return fam.get_load_servable()(Path(dirpath), device, root), config


def load_registered(tracking_uri: str | None, spec: str | None, device) -> Any:
    """A registered model (``NAME/VERSION`` or ``NAME@ALIAS``) downloaded and rebuilt; None for no spec.
    (The keyframes task scores through an evaluator that is itself a registered model.)"""
    if not spec:
        return None
    from facelab.core import tracking

    c = tracking.client(tracking_uri)
    name, _, version = tracking.resolve_model_version(c, spec).partition("/")
    with tempfile.TemporaryDirectory() as d:
        local, _info = tracking.download_model(c, name, version, Path(d), by="version")
        model, _cfg = load_servable(local, device=str(device))
    return model
