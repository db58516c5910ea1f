"""Shared fixtures: a throw-away facelab project (git + DVC + tiny corpus) for end-to-end tests."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
BIN = Path(sys.executable).parent

# Small but real: the DVC stage builds this corpus in a second.
TINY_PARAMS = {
    "emoava": {"n_train": 240, "n_dev": 48, "n_test": 48, "seed": 0},
    "lm_listener": {"n_train": 4, "n_val": 2, "seed": 0},  # the `lm_listener` stage (CTEG Table 5's data)
    "keyframeface": {"n_scripts": 400, "split": [0.8, 0.1, 0.1], "seed": 0},
    "tiny_lm": {
        "vocab_size": 1024,
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "num_kv_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "seed": 0,
    },
}


def env_for(project: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env.update(
        {
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "FACELAB_STORAGE": str(project / "ray_results"),
            "RAY_DEDUP_LOGS": "0",
        }
    )
    env.update(extra)
    return env


def facelab(project: Path, *args: str, check: bool = True, timeout: float = 900, **env) -> subprocess.CompletedProcess:
    """Run the real CLI in ``project`` as a user would."""
    proc = subprocess.run(
        [str(BIN / "facelab"), *args],
        cwd=project,
        env=env_for(project, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"facelab {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def make_project(dst: Path, params: dict | None = None) -> Path:
    """Copy what a project needs (dvc.yaml, params, jobs, sweeps, the data-stage sources), init git + DVC."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dst / name)
    for d in ("jobs", "sweeps"):
        shutil.copytree(REPO / d, dst / d)
    for pkg in ("data", "families/keyframe_lm"):  # the sources the DVC stages depend on
        src = dst / "platform" / "facelab" / pkg
        src.mkdir(parents=True)
        for f in (REPO / "platform" / "facelab" / pkg).glob("*.py"):
            shutil.copy(f, src / f.name)
    (dst / "params.yaml").write_text(yaml.safe_dump(params or TINY_PARAMS))
    (dst / ".gitignore").write_text("/data/\n/models/\n/mlruns.db\n/mlartifacts/\n/ray_results/\n")
    env = env_for(dst)
    run = lambda *a: subprocess.run(a, cwd=dst, env=env, check=True, capture_output=True, text=True)  # noqa: E731
    run("git", "init", "-q")
    run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "init")
    run(str(BIN / "dvc"), "init", "-q")
    run(str(BIN / "dvc"), "config", "core.analytics", "false")
    return dst


def dvc_repro(project: Path, *stages: str) -> subprocess.CompletedProcess:
    """`dvc repro` of ``stages`` (all of dvc.yaml's when none is named) in ``project``."""
    return subprocess.run(
        [str(BIN / "dvc"), "repro", *stages],
        cwd=project,
        env=env_for(project),
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clone_built(src: Path, dst: Path) -> Path:
    """A project of its own with the data ``src``'s `dvc repro` built (and locked): its git and DVC
    state, data and cache copied, no runs. Saves each module that needs a private tracking store the
    minute of rebuilding the same corpora and tiny model."""
    shutil.copytree(
        src,
        dst,
        symlinks=True,
        ignore=shutil.ignore_patterns("mlruns.db", "mlartifacts", "ray_results", "*.log", "__pycache__"),
    )
    return dst


def clone_with_runs(src: Path, dst: Path) -> Path:
    """A project of its own with everything ``src`` holds, its MLflow store included: the files are
    copied and every absolute path of ``src`` in the store (experiments' artifact locations, runs'
    artifact URIs, model versions' sources) is rewritten to ``dst``, so the clone's runs, artifacts and
    registry are its own and changing them leaves ``src`` as it was."""
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("*.log", "__pycache__"))
    db = dst / "mlruns.db"
    if db.is_file():
        old, new = str(src), str(dst)
        con = sqlite3.connect(db)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            for t in tables:
                for col in [r[1] for r in con.execute(f'PRAGMA table_info("{t}")')]:
                    q = f'UPDATE "{t}" SET "{col}" = REPLACE("{col}", ?, ?) WHERE typeof("{col}") = ? AND instr("{col}", ?)'
                    con.execute(q, (old, new, "text", old))
            con.commit()
        finally:
            con.close()
    return dst


# The quickstart sweep at the tests' size: 2 tiny CTEG trials, a few steps each.
QUICKSTART_FAST = [
    "train.epochs=2",
    "train.max_steps_per_epoch=6",
    "train.max_val_batches=2",
    "data.train_subset=160",
    "data.dev_subset=32",
    "data.max_frames=48",
]


@pytest.fixture(scope="session")
def built_project(tmp_path_factory) -> Path:
    """A project whose data was built by `dvc repro` (shared by the end-to-end tests)."""
    p = make_project(tmp_path_factory.mktemp("project"))
    dvc_repro(p)
    return p


@pytest.fixture(scope="session")
def quickstart_runs(tmp_path_factory, built_project) -> tuple[Path, subprocess.CompletedProcess]:
    """The quickstart sweep run once for the session, in a project nobody changes: each module that needs
    trained quickstart runs takes its own :func:`clone_with_runs` of it (and the sweep's output)."""
    p = clone_built(built_project, tmp_path_factory.mktemp("quickstart-runs") / "p")
    proc = facelab(p, "sweep", "sweeps/quickstart.yaml", *[x for s in QUICKSTART_FAST for x in ("--set", s)])
    return p, proc
