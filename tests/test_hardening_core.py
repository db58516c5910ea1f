"""Hardening of the DVC lineage check and the checkpoint writers (audit items 3 and 4).

3. A data path is normalised before it is matched against ``dvc.lock``: ``..`` cannot borrow an
   output's hash for data the run never read, a path must equal a stage output, and one that
   leaves the project (lexically or through a symlink) is refused, naming the path.
4. Checkpoint files are written through unique temporary names, fsynced (file and directory)
   before the rename; ``finalize_trial_run`` copies checkpoint files in chunks, never whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from facelab.core import checkpoint as ckpt
from facelab.core.lineage import DataLineageError, lock_entry

# --------------------------------------------------------------------------------------------
# 3. lineage: `..` and sub-paths
# --------------------------------------------------------------------------------------------


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    for out in ("data/emoava", "data/keyframeface"):
        (root / out).mkdir(parents=True)
    lock = {
        "schema": "2.0",
        "stages": {
            "emoava": {"outs": [{"path": "data/emoava", "md5": "emoava.dir", "size": 1, "nfiles": 4}]},
            "keyframeface": {"outs": [{"path": "data/keyframeface", "md5": "kf.dir", "size": 2, "nfiles": 4}]},
        },
    }
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    return root


def test_dotdot_out_of_the_project_does_not_borrow_an_outputs_hash(project):
    with pytest.raises(DataLineageError) as err:
        lock_entry(project, "data/emoava/../../../tmp/x")
    msg = str(err.value)
    assert "data/emoava/../../../tmp/x" in msg and "outside the project" in msg


def test_dotdot_is_resolved_before_matching(project):
    assert lock_entry(project, "data/emoava/../keyframeface").md5 == "kf.dir"
    assert lock_entry(project, "./data//emoava/").md5 == "emoava.dir"
    assert lock_entry(project, project / "data" / "emoava").md5 == "emoava.dir"


def test_a_path_inside_an_output_is_not_the_output(project):
    with pytest.raises(DataLineageError) as err:
        lock_entry(project, "data/emoava/train.npz")
    msg = str(err.value)
    assert "data/emoava/train.npz" in msg and "inside the output data/emoava" in msg


def test_paths_that_are_no_stage_output_are_refused(project, tmp_path):
    with pytest.raises(DataLineageError, match="outside the project"):
        lock_entry(project, tmp_path / "elsewhere")
    with pytest.raises(DataLineageError, match="project root itself"):
        lock_entry(project, "data/..")
    with pytest.raises(DataLineageError, match="data/emoava-copy: not an output"):
        lock_entry(project, "data/emoava-copy")


def test_a_symlink_cannot_make_dotdot_land_on_an_outputs_name(project, tmp_path):
    """``data/link/../emoava`` reads ``data/emoava`` as text, but the run would open <target>/../emoava."""
    target = tmp_path / "other" / "sub"
    target.mkdir(parents=True)
    (tmp_path / "other" / "emoava").mkdir()
    (project / "data" / "link").symlink_to(target)
    with pytest.raises(DataLineageError) as err:
        lock_entry(project, "data/link/../emoava")
    assert "data/link/../emoava: resolves to" in str(err.value)


# --------------------------------------------------------------------------------------------
# 4. checkpoints: unique temporary files, fsync, streamed copies
# --------------------------------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


def test_a_concurrent_writers_temporary_file_is_left_alone(tmp_path):
    """The old fixed ``model.safetensors.tmp`` name made two writers of one checkpoint write into,
    and rename away, each other's half-written file."""
    other = tmp_path / "model.safetensors.tmp"
    other.write_bytes(b"another writer's half-written file")
    (tmp_path / "config.json.tmp").write_bytes(b"another writer's config")
    ckpt.save_tensors(tmp_path, _tensors(), {"kind": "x"}, train_state={"step": 3}, meta={"epoch": 1})
    assert other.read_bytes() == b"another writer's half-written file"
    assert (tmp_path / "config.json.tmp").read_bytes() == b"another writer's config"
    torch.testing.assert_close(ckpt.load_weights(tmp_path)["w"], _tensors()["w"])
    assert ckpt.load_config(tmp_path) == {"kind": "x"}
    assert ckpt.load_train_state(tmp_path) == {"step": 3}
    assert ckpt.load_meta(tmp_path) == {"epoch": 1}
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == sorted(
        ["model.safetensors", "config.json", "train_state.pt", "meta.json", "model.safetensors.tmp", "config.json.tmp"]
    )


def test_every_file_is_fsynced_before_its_rename_and_the_directory_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kw):
        events.append(("replace", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        return real_replace(src, dst, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.save_tensors(tmp_path, _tensors(), {"kind": "x"}, train_state={"step": 1}, meta={"epoch": 0})

    renames = [(i, e[1]) for i, e in enumerate(events) if e[0] == "replace"]
    assert {r.split(" -> ")[1] for _, r in renames} == {
        str(tmp_path / f) for f in ("model.safetensors", "config.json", "train_state.pt", "meta.json")
    }
    for i, rename in renames:
        tmp, dst = rename.split(" -> ")
        assert Path(tmp).parent == tmp_path and Path(tmp).name != Path(dst).name + ".tmp"  # unique, same dir
        assert ("fsync", tmp) in events[:i], f"{tmp} renamed before it was fsynced"
        assert ("fsync", str(tmp_path)) in events[i + 1 :], f"directory not fsynced after {rename}"


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    ckpt.save_tensors(tmp_path, _tensors(), {"kind": "x"}, train_state={"step": 1})
    before = (tmp_path / "train_state.pt").read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever torch.save raises for an unpicklable object
        ckpt.save_tensors(tmp_path, _tensors(), {"kind": "x"}, train_state={"step": lambda: 0})
    assert (tmp_path / "train_state.pt").read_bytes() == before
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_files_keep_the_usual_permissions(tmp_path):
    """mkstemp makes 0600 files; a checkpoint on shared storage stays readable as before."""
    umask = os.umask(0o022)
    os.umask(umask)
    ckpt.save_tensors(tmp_path, _tensors(), {"kind": "x"}, meta={"epoch": 0})
    for name in ("model.safetensors", "config.json", "meta.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


class _FakeClient:
    """The two MlflowClient calls finalize_trial_run makes, recorded."""

    def __init__(self, dest: Path):
        self.dest = dest

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        shutil.copytree(local_dir, self.dest / (artifact_path or ""), dirs_exist_ok=True)

    def log_artifact(self, run_id, local_path, artifact_path=None):  # pragma: no cover - plot is stubbed
        raise AssertionError("no plot expected")

    def get_metric_history(self, run_id, key):
        return []


def test_finalize_trial_run_streams_checkpoint_files(tmp_path, monkeypatch):
    from facelab import plots
    from facelab.runtime import sweep

    src = tmp_path / "ckpt"
    ckpt.save_tensors(src, {"w": torch.zeros(1000, 100)}, {"kind": "x"}, meta={"history": []})
    real_read_bytes = Path.read_bytes

    def read_bytes(self):
        if self.parent == src and self.name in ckpt.SERVABLE_FILES:
            raise AssertionError(f"{self} read whole into memory")
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(plots, "loss_curves", lambda *a, **k: None)
    client = _FakeClient(tmp_path / "artifacts")
    sweep.finalize_trial_run(client, "run", str(src))
    for name in ckpt.SERVABLE_FILES:
        assert real_read_bytes(tmp_path / "artifacts" / "checkpoint" / name) == real_read_bytes(src / name)
