"""Sweeps on a shared Ray cluster, through Ray's Job API: submit, status, logs, stop.

``facelab submit SWEEP.yaml`` validates the sweep here (every problem at once, before anything is
sent), then submits a Ray Job whose runtime env packages the project directory (without its
git-ignored data, run stores and virtualenvs) and whose entrypoint pulls the locked data from the
project's DVC remote and runs ``facelab sweep`` on the cluster. It returns at once with the job id;
``facelab status JOB``, ``facelab logs JOB [--follow]`` and ``facelab stop JOB`` wrap the same API.

The Jobs API lives on the head node's dashboard port (``http://HEAD:8265``): ``--address`` or
``RAY_JOB_ADDRESS`` / ``RAY_ADDRESS`` when it is an ``http(s)://`` URL. A token-authenticated cluster
takes its token from ``RAY_AUTH_TOKEN`` as Ray's own CLI does.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

# Never shipped with the working directory: data comes from the DVC remote, runs go to the tracking
# store, and environments are the cluster's own.
EXCLUDES = [
    ".venv",
    "venv",
    "__pycache__",
    ".git/objects/pack/*.tmp",
    "data",
    "models",
    "mlruns.db",
    "mlartifacts",
    "ray_results",
    ".dvc/cache",
    ".dvc/tmp",
]


class ClusterError(RuntimeError):
    """The Jobs API cannot be reached or refuses a request (the message names the address)."""


def job_address(address: str | None) -> str:
    addr = address or os.environ.get("RAY_JOB_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    if not addr.startswith(("http://", "https://")):
        raise ClusterError(
            "no Ray Jobs address: pass --address http://HEAD:8265 (the head node's dashboard port) or set "
            f"RAY_JOB_ADDRESS{f'; RAY_ADDRESS={addr!r} is not an http(s) URL' if addr else ''}"
        )
    return addr


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    addr = job_address(address)
    try:
        return JobSubmissionClient(addr)
    except Exception as exc:  # noqa: BLE001 - connection errors of every kind become one message
        raise ClusterError(f"cannot reach the Ray Jobs API at {addr} ({type(exc).__name__}: {exc})") from None


def entrypoint(sweep: str, sets: list[str], pull: bool) -> str:
    cmd = shlex.join(["facelab", "sweep", sweep, *[x for s in sets for x in ("--set", s)]])
    return f"dvc pull --allow-missing && {cmd}" if pull else cmd


def submit(
    sweep_path: Path, sets: list[str], root: Path, *, address: str | None, pull: bool = True, env: dict | None = None
) -> str:
    """Validate ``sweep_path`` locally, then submit it as a Ray Job; returns the job id at once."""
    from facelab.spec.loading import load_sweep

    loaded = load_sweep(sweep_path, sets, root=root)  # SpecError before anything is sent
    rel = os.path.relpath(Path(sweep_path).resolve(), root)
    env_vars = {k: v for k, v in (env or {}).items() if v}
    for key in ("MLFLOW_TRACKING_URI", "FACELAB_STORAGE"):  # where the cluster records, if set here
        if os.environ.get(key):
            env_vars.setdefault(key, os.environ[key])
    # Ray leaves .git out of a working_dir by default; DVC needs the repository (and runs record its SHA).
    os.environ.setdefault("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", ".venv,venv,__pycache__")
    c = client(address)
    try:
        return c.submit_job(
            entrypoint=entrypoint(rel, sets, pull),
            runtime_env={"working_dir": str(root), "excludes": EXCLUDES, "env_vars": env_vars},
            metadata={"facelab.sweep": loaded.spec.name, "facelab.source": rel},
        )
    except Exception as exc:  # noqa: BLE001
        raise ClusterError(f"the Ray Jobs API at {job_address(address)} refused the job: {exc}") from None


def _call(address: str | None, fn: str, *args):
    c = client(address)
    try:
        return getattr(c, fn)(*args)
    except RuntimeError as exc:  # Ray raises RuntimeError for an unknown job id
        raise ClusterError(f"{fn.replace('_', ' ')} {args[0] if args else ''}: {exc}") from None


def status(address: str | None, job_id: str) -> dict:
    info = _call(address, "get_job_info", job_id)
    return {
        "job_id": job_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "entrypoint": info.entrypoint,
        "message": info.message,
        "sweep": (info.metadata or {}).get("facelab.sweep"),
        "start_time": info.start_time,
        "end_time": info.end_time,
    }


def logs(address: str | None, job_id: str) -> str:
    return _call(address, "get_job_logs", job_id)


async def follow(address: str | None, job_id: str):
    c = client(address)
    async for chunk in c.tail_job_logs(job_id):
        yield chunk


def stop(address: str | None, job_id: str) -> bool:
    return bool(_call(address, "stop_job", job_id))
