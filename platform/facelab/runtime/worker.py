"""The worker runtime: the fault-tolerant epoch protocol every family's Ray Train loop uses.

A family's worker loop stays plain PyTorch and reads top to bottom (setup → train → checkpoint); the
parts that must be the same everywhere live here, once:

* **context** — rank, world size, device, the MLflow client of rank 0 (:meth:`EpochRuntime.start`);
* **resume** — the last checkpoint Ray Train hands a restarted worker group: weights, train state
  and ``meta.json`` (epoch, step, metrics history) (:attr:`EpochRuntime.resumed`);
* **history replay** — a resumed run re-logs to MLflow every finished epoch the crash kept off the
  record (the history travels inside the checkpoint), exactly once per (metric, step);
* **node record** — rank 0 records where the worker group runs on the trial's MLflow run, kept
  across restarts and resumes: ``facelab.worker_nodes`` (this attempt: the Ray node id of every rank),
  ``facelab.nodes`` (every node any attempt ran on, first use first) and ``facelab.node_history``
  (one entry per worker-group start: the epoch it started from, each node's IP, host name and ranks),
  so a trial that lost a node and resumed elsewhere names both (:func:`node_record`);
* **finite check** — an epoch whose metrics hold NaN/inf fails the trial, naming them;
* **checkpoint → report → MLflow** — rank 0 writes the checkpoint (safetensors + JSON, atomic) and
  reports it with the metrics, *then* logs to MLflow; other ranks report metrics only
  (:meth:`EpochRuntime.end_epoch`);
* **GPU memory headroom** — a worker given a share ``g`` of a GPU (``resources.gpus_per_worker``;
  a fraction lets several trials share one card) refuses to start when the card has less than
  ``FACELAB_GPU_HEADROOM`` (default 0.9) × ``g`` × its memory free: the other tenants (trials
  packed onto the card, a Serve replica, another job) already hold this worker's share, and it
  would run out of memory mid-epoch instead (:func:`check_gpu_headroom`).

Hooks (public, for benchmarks and tooling — never a monkeypatch): :func:`add_hook` registers a
callable for ``"phase"`` events, fired by :meth:`EpochRuntime.phase` with ``(name, seconds, epoch,
info)`` as each timed phase of a loop (``train``, ``validate``, ``test``, ``checkpoint``) ends;
``info`` is what the loop counted in the phase (e.g. ``steps``, ``sequences``, ``frames``,
``padded_frames`` of a CTEG training phase). The phase ends after the loop's own host sync (the
all-reduce of its sums), so on a GPU the time covers the device work. In Ray Train workers, hooks are
installed by naming ``module:function`` callables in ``FACELAB_WORKER_HOOKS`` (comma-separated;
``facelab`` passes the variable on to its Ray workers): each is called with the
:class:`EpochRuntime` when the worker starts.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facelab.core import checkpoint as ckpt
from facelab.core import tracking
from facelab.core.distributed import worker_hosts

_HOOKS: dict[str, list[Callable[..., None]]] = {"phase": []}


def add_hook(event: str, fn: Callable[..., None]) -> Callable[[], None]:
    """Call ``fn`` on ``event`` (``"phase"``: ``fn(name, seconds, epoch, info)``) in this process;
    returns a function that removes it again."""
    if event not in _HOOKS:
        raise ValueError(f"unknown event {event!r}; known: {sorted(_HOOKS)}")
    _HOOKS[event].append(fn)
    return lambda: _HOOKS[event].remove(fn)


def install_env_hooks(rt: EpochRuntime) -> None:
    """Call every ``module:function`` named in ``FACELAB_WORKER_HOOKS`` with ``rt`` (see the module docstring)."""
    for ref in filter(None, (x.strip() for x in os.environ.get("FACELAB_WORKER_HOOKS", "").split(","))):
        module, _, attr = ref.partition(":")
        if not module or not attr:
            raise ValueError(f"FACELAB_WORKER_HOOKS: {ref!r} is not 'module:function'")
        getattr(importlib.import_module(module), attr)(rt)


GPU_HEADROOM_ENV = "FACELAB_GPU_HEADROOM"
GPU_TAG = "facelab.gpu"  # rank 0's headroom check, as JSON, on the trial's MLflow run
DEFAULT_GPU_HEADROOM = 0.9  # the rest of a share covers the other tenants' CUDA contexts and rounding
GiB = 1024**3


class GpuHeadroomError(RuntimeError):
    """The GPU a worker was given has too little free memory for its share (the message says what to do)."""


def gpu_memory(device) -> tuple[int, int]:
    """``(free, total)`` bytes of ``device``'s GPU, as the driver reports them (all processes counted)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


def gpu_headroom() -> float:
    """The fraction of its share a worker wants free at start (``FACELAB_GPU_HEADROOM``; 0 = no check)."""
    raw = os.environ.get(GPU_HEADROOM_ENV, "").strip()
    if not raw:
        return DEFAULT_GPU_HEADROOM
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{GPU_HEADROOM_ENV}={raw!r}: a fraction between 0 (no check) and 1") from None
    if not 0 <= v <= 1:
        raise ValueError(f"{GPU_HEADROOM_ENV}={raw!r}: a fraction between 0 (no check) and 1")
    return v


def required_free_bytes(gpus_per_worker: float, total: int, headroom: float) -> int:
    """Bytes a worker with ``gpus_per_worker`` of a card of ``total`` bytes wants free when it starts."""
    return int(min(float(gpus_per_worker), 1.0) * total * headroom)


def check_gpu_headroom(
    device,
    gpus_per_worker: float,
    *,
    headroom: float | None = None,
    query: Callable[[Any], tuple[int, int]] = gpu_memory,
) -> dict | None:
    """Before a worker allocates anything: is its share of the GPU free? Raises
    :class:`GpuHeadroomError` naming the numbers and the remedies; returns what it measured
    (``None`` on the CPU, with no GPU share, or with the check turned off)."""
    kind = getattr(device, "type", str(device).split(":")[0])
    g = float(gpus_per_worker or 0)
    h = gpu_headroom() if headroom is None else float(headroom)
    if kind != "cuda" or g <= 0 or h <= 0:
        return None
    free, total = query(device)
    need = required_free_bytes(g, total, h)
    if free < need:
        raise GpuHeadroomError(
            f"not enough free GPU memory to start this worker: {device} has {free / GiB:.1f} GiB free of "
            f"{total / GiB:.1f} GiB; resources.gpus_per_worker={g:g} is {min(g, 1.0) * total / GiB:.1f} GiB of it "
            f"and the worker wants {h:.0%} of that free ({need / GiB:.1f} GiB). Other processes on this GPU "
            "(trials packed onto the same card, a Serve replica, another job) hold the rest. Lower "
            "max_concurrent_trials, give each trial a larger share (resources.gpus_per_worker) so fewer share "
            f"a card, shrink the trial (optim.batch_size, data.max_frames), or set {GPU_HEADROOM_ENV} to a "
            "smaller fraction (0 turns the check off)"
        )
    return {
        "device": str(device),
        "name": gpu_name(device),
        "free_gib": round(free / GiB, 2),
        "total_gib": round(total / GiB, 2),
        "need_gib": round(need / GiB, 2),
        "gpus_per_worker": g,
        "headroom": h,
    }


def gpu_name(device) -> str:
    try:
        import torch

        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001 - a name is for the record only
        return "unknown"


WORKER_NODES_TAG = "facelab.worker_nodes"  # this attempt: the Ray node id of every rank (JSON list)
NODES_TAG = "facelab.nodes"  # every node any attempt ran on, first use first (comma-separated node ids)
NODE_HISTORY_TAG = "facelab.node_history"  # one entry per worker-group start (JSON list)
MAX_TAG_CHARS = 8000  # MLflow's limit on a tag value


def node_record(tags: dict[str, str], hosts: list[dict[str, str]], start_epoch: int, started: float) -> dict[str, str]:
    """The node tags of a run after a worker group started on ``hosts`` (one ``{"node_id", "ip",
    "hostname"}`` per rank, by rank) at ``start_epoch`` (0, or the epoch after the checkpoint it
    resumed from), at time ``started``; ``tags`` are the run's tags so far (earlier attempts).

    ``facelab.nodes`` keeps every node of every attempt, in order of first use; ``facelab.node_history``
    gains one entry (``attempt`` counts from 0). When the history outgrows MLflow's tag limit, its
    oldest entries are dropped (the attempt numbers still say how many there were)."""
    try:
        history = json.loads(tags.get(NODE_HISTORY_TAG) or "[]")
    except ValueError:
        history = []
    nodes: dict[str, dict] = {}
    for rank, h in enumerate(hosts):
        n = nodes.setdefault(h["node_id"], {"ip": h["ip"], "hostname": h["hostname"], "ranks": []})
        n["ranks"].append(rank)
    attempt = history[-1]["attempt"] + 1 if history else 0
    history.append(
        {
            "attempt": attempt,
            "start_epoch": int(start_epoch),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "nodes": nodes,
        }
    )
    while len(history) > 1 and len(json.dumps(history)) > MAX_TAG_CHARS:
        history.pop(0)
    seen = [x for x in (tags.get(NODES_TAG) or "").split(",") if x]
    seen += [n for n in nodes if n not in seen]
    return {
        WORKER_NODES_TAG: json.dumps([h["node_id"] for h in hosts]),
        NODES_TAG: ",".join(seen)[:MAX_TAG_CHARS],
        NODE_HISTORY_TAG: json.dumps(history)[:MAX_TAG_CHARS],
    }


def record_nodes(client, run_id: str, hosts: list[dict[str, str]], start_epoch: int) -> dict[str, str]:
    """Add this worker group's nodes to the run's node tags (:func:`node_record`); returns the tags."""
    tags = node_record(client.get_run(run_id).data.tags, hosts, start_epoch, time.time())
    for k, v in tags.items():
        client.set_tag(run_id, k, v)
    return tags


class NonFiniteMetrics(FloatingPointError):
    """An epoch produced NaN/inf metrics (the message names them)."""


def check_finite(metrics: dict[str, float], epoch: int) -> None:
    bad = {k: v for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        raise NonFiniteMetrics(f"non-finite metrics at epoch {epoch}: {bad} (all: {metrics})")


@dataclass
class Resumed:
    """What a restarted worker resumes from."""

    path: Path
    weights: dict
    state: dict | None
    meta: dict


@dataclass
class EpochRuntime:
    """The per-worker side of one trial: see the module docstring."""

    config: dict
    rank: int = 0
    world: int = 1
    device: Any = "cpu"
    client: Any = None
    run_id: str | None = None
    resumed: Resumed | None = None
    gpu_check: dict | None = None  # what the headroom check measured at start (None: not checked)
    start_epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)

    @classmethod
    def start(cls, config: dict) -> EpochRuntime:
        """Inside a Ray Train worker: read the context and the checkpoint to resume from (if any),
        and replay the finished epochs the MLflow record lacks."""
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        rt = cls(
            config=config, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=ray.train.torch.get_device()
        )
        # First, before the loop allocates anything on the GPU: is this worker's share of it free?
        rt.gpu_check = check_gpu_headroom(rt.device, (config.get("resources") or {}).get("gpus_per_worker", 0))
        tr = config.get("tracking") or None
        if rt.rank == 0 and tr:
            rt.client, rt.run_id = tracking.client(tr["uri"]), tr["run_id"]
        resume = ray.train.get_checkpoint()
        if resume is not None:
            weights, state, meta = ckpt.load_resume(resume)
            rt.resumed = Resumed(Path(resume.path), weights, state, meta)
            rt.start_epoch, rt.step, rt.history = meta["epoch"] + 1, meta["step"], meta.get("history", [])
        if rt.client and rt.history:  # resumed: every finished epoch is on record exactly once
            tracking.log_missing_history(rt.client, rt.run_id, rt.history)
        if tr:  # where this worker group runs (a collective: every rank has the same config and takes part)
            hosts = worker_hosts()
            if rt.client:
                record_nodes(rt.client, rt.run_id, hosts, rt.start_epoch)
        if rt.client and rt.gpu_check:  # which card the trial got, its share, and what was free at start
            rt.client.set_tag(rt.run_id, GPU_TAG, json.dumps(rt.gpu_check, sort_keys=True))
        install_env_hooks(rt)
        return rt

    @property
    def job(self) -> dict:
        return self.config["job"]

    @property
    def data_dir(self) -> Path:
        return Path(self.config["data_dir"])

    @contextlib.contextmanager
    def phase(self, name: str, epoch: int) -> Iterator[dict]:
        """Time a phase of the loop and tell the ``phase`` hooks (a benchmark's per-phase timings).
        Yields a dict the loop may fill with counts (steps, sequences, frames) for the hooks."""
        info: dict = {}
        t0 = time.perf_counter()
        try:
            yield info
        finally:
            dt = time.perf_counter() - t0
            for fn in list(_HOOKS["phase"]):
                fn(name, dt, epoch, info)

    def end_epoch(
        self,
        epoch: int,
        metrics: dict[str, float],
        save: Callable[[Path, dict], None] | None,
        *,
        step_log: list[tuple[int, dict]] | None = None,
        meta: dict | None = None,
    ) -> None:
        """Finish an epoch: finite check, history, then on rank 0 ``save(dir, meta)`` writes the
        checkpoint (the runtime adds epoch, step, history and the MLflow run id to ``meta``), it is
        reported with the metrics, and MLflow gets the metrics (and ``step_log``) afterwards; other
        ranks report the metrics only. With ``save=None`` no checkpoint is written this epoch."""
        import ray.train

        metrics = {**metrics, "epoch": epoch, "step": self.step}
        self.history.append(dict(metrics))
        check_finite(metrics, epoch)
        if self.rank != 0:
            ray.train.report(metrics)
            return
        # The checkpoint (with the history) lands first: if the process dies before the MLflow
        # write, the resumed run re-logs the missing epochs from that history.
        with self.phase("checkpoint", epoch):
            if save is None:
                ray.train.report(metrics)
            else:
                with tempfile.TemporaryDirectory() as d:
                    full = {
                        **(meta or {}),
                        "epoch": epoch,
                        "step": self.step,
                        "history": self.history,
                        "mlflow_run_id": self.run_id,
                    }
                    save(Path(d), full)
                    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        if self.client:
            tracking.log_metrics(self.client, self.run_id, metrics, step=epoch)
            if step_log:
                tracking.log_metric_steps(self.client, self.run_id, step_log)
