"""Data lineage: which DVC-locked version of a dataset a run uses, and refusing unlocked data.

``dvc.lock`` pins every stage output by content hash. Before a run starts, :func:`verify_data`
asks DVC whether the dataset directory still matches its lock entry; a run on modified, missing
or untracked data is refused with a message naming the path and the command that fixes it.
The lock entry's hashes are then logged on every run (:func:`lock_entry`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml


class DataLineageError(RuntimeError):
    """The data a run would use is not the version pinned in dvc.lock."""


@dataclass(frozen=True)
class LockedOutput:
    stage: str
    path: str  # as written in dvc.lock, relative to the project root
    md5: str  # DVC content hash ('<hash>.dir' for directories)
    size: int | None
    nfiles: int | None

    def as_tags(self, prefix: str = "facelab.data") -> dict[str, str]:
        return {
            f"{prefix}.path": self.path,
            f"{prefix}.md5": self.md5,
            f"{prefix}.stage": self.stage,
            f"{prefix}.nfiles": str(self.nfiles),
            f"{prefix}.size": str(self.size),
        }


def _outside(root: Path, data_path: str | Path) -> DataLineageError:
    return DataLineageError(
        f"data path {data_path} is outside the project at {root}; DVC only pins data inside "
        "the project (put it under data/ and track it with a dvc.yaml stage or `dvc add`)"
    )


def _relative(root: Path, data_path: str | Path) -> str:
    """``data_path`` as a normalised POSIX path relative to ``root``; refused when it leaves the project.

    ``..`` is collapsed first (``data/emoava/../../x`` is ``../x``: outside), so no spelling of a path
    can borrow the hash of an output it only passes through. An absolute path is taken relative to
    the project as written, or else after resolving symlinks on both sides."""
    root = Path(root)
    p = Path(data_path)
    if p.is_absolute():
        base = os.path.normpath(root.absolute())
        norm = os.path.normpath(p)
        if os.path.commonpath([base, norm]) == base:
            rel = os.path.relpath(norm, base)
        else:
            try:
                rel = str(p.resolve().relative_to(root.resolve()))
            except ValueError:
                raise _outside(root, data_path) from None
    else:
        rel = os.path.normpath(p)
    rel = Path(rel).as_posix()
    if rel == ".." or rel.startswith("../"):
        raise _outside(root, data_path)
    return rel


def lock_entry(root: Path, data_path: str | Path) -> LockedOutput:
    """The dvc.lock output entry that ``data_path`` is: the path, normalised, must equal a stage output.

    A path inside an output, or one that reaches an output's name through ``..`` and symlinks but
    resolves elsewhere, is refused: its data is not what the output's hash pins."""
    root = Path(root)
    lock = root / "dvc.lock"
    rel = _relative(root, data_path)
    if rel == ".":
        raise DataLineageError(f"{data_path}: the project root itself is not a stage output in dvc.lock")
    if not lock.is_file():
        raise DataLineageError(
            f"{rel}: no dvc.lock in {root}; build the data first with `dvc repro` "
            "(or `facelab data build-emoava` through its DVC stage)"
        )
    doc = yaml.safe_load(lock.read_text()) or {}
    inside: list[str] = []
    for stage, body in (doc.get("stages") or {}).items():
        for out in body.get("outs") or []:
            opath = Path(os.path.normpath(str(out.get("path", "")))).as_posix()
            if rel == opath:
                given = Path(data_path) if Path(data_path).is_absolute() else root / data_path
                if given.resolve() != (root / opath).resolve():
                    raise DataLineageError(
                        f"{data_path}: resolves to {given.resolve()}, not to the output {opath} of stage "
                        f"{stage!r} ({(root / opath).resolve()}); name the output by its own path"
                    )
                return LockedOutput(
                    stage=stage, path=opath, md5=str(out.get("md5")), size=out.get("size"), nfiles=out.get("nfiles")
                )
            if rel.startswith(opath + "/"):
                inside.append(f"{opath} (stage {stage!r})")
    if inside:
        raise DataLineageError(
            f"{rel}: inside the output {inside[0]} but not the output itself; dvc.lock pins the whole "
            f"output, so name it ({inside[0].split(' ')[0]}) as the data path"
        )
    raise DataLineageError(
        f"{rel}: not an output of any stage in dvc.lock; add a stage for it to dvc.yaml and run `dvc repro`"
    )


def verify_data(root: Path, data_path: str | Path) -> LockedOutput:
    """Check that ``data_path`` matches dvc.lock; raise :class:`DataLineageError` saying how to fix it."""
    entry = lock_entry(root, data_path)
    from dvc.repo import Repo  # heavy import, only where it is needed

    with Repo(str(root)) as repo:
        status = repo.status(targets=[str(Path(root).resolve() / entry.path)])  # absolute: independent of the cwd
    # Only the outputs matter here: a stage whose code changed still pins the data it built.
    problems = []
    for changes in status.values():
        for change in changes:
            if not isinstance(change, dict):
                continue
            for out, state in (change.get("changed outs") or {}).items():
                problems.append(f"{out} is {state}")
    if problems:
        raise DataLineageError(
            f"data at {entry.path} does not match dvc.lock (locked md5 {entry.md5}): "
            + "; ".join(problems)
            + f". Run `dvc repro {entry.stage}` to rebuild and re-lock it, or `dvc checkout {entry.path}` "
            "to restore the locked version from the DVC cache."
        )
    return entry
