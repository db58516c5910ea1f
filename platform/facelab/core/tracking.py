"""MLflow: tracking store resolution, sweep/trial runs, lineage tags, artifacts, registry, promotion.

The embedded default store is sqlite (``mlruns.db``) with artifacts under ``mlartifacts/``, both in
the project root; ``MLFLOW_TRACKING_URI`` switches to a tracking server. All logging goes through an
explicit :class:`~mlflow.tracking.MlflowClient` and run ids (no global "active run" state), so the
sweep driver, the Tune trial functions and rank 0 of each Train worker group log into the same runs
from different processes.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

# Tag keys (one place, so queries and writers agree).
TAG_SWEEP = "facelab.sweep"
TAG_ROLE = "facelab.role"  # "sweep" | "trial" | "train"
TAG_TRIAL_KEY = "facelab.trial_key"  # stable id of a trial within its sweep
TAG_VARIANT = "facelab.variant"
TAG_SEED = "facelab.seed"
TAG_JOB_KIND = "facelab.job_kind"
TAG_GIT_SHA = "facelab.git_sha"
TAG_GIT_DIRTY = "facelab.git_dirty"
TAG_STOPPED_EARLY = "facelab.stopped_early"
PARENT_TAG = "mlflow.parentRunId"


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable, or a run/model it should hold is missing)."""


def ui_experiment_url(base: str, experiment_id: str) -> str:
    """The MLflow UI link of an experiment's *training runs*. MLflow 3.x's UI ignores the experiment
    tag ``mlflow.experimentKind`` when it picks a page (a fresh browser lands on the GenAI traces
    overview, empty for facelab); the ``workflowType`` query parameter is what it obeys."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def default_tracking_uri(root: Path) -> str:
    return f"sqlite:///{(root / 'mlruns.db').resolve()}"


def tracking_uri(root: Path) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded sqlite store under ``root``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def artifact_location(root: Path, experiment: str) -> str | None:
    """Local artifact directory for the embedded store; ``None`` lets a server choose."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (root / "mlartifacts" / experiment).resolve().as_uri()


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str, timeout_s: float = 15.0):
    """Fail fast, naming the URI, when the store cannot be reached."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    c = client(uri)
    try:
        c.search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - any failure here means "unusable store"
        raise TrackingError(f"MLflow tracking store {uri} is not reachable: {type(exc).__name__}: {exc}") from None
    return c


# MLflow's UI opens an experiment of this kind on its training runs (not the GenAI traces overview).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def ensure_experiment(c, name: str, root: Path) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    try:
        exp_id = c.create_experiment(
            name, artifact_location=artifact_location(root, name), tags=dict([EXPERIMENT_KIND])
        )
    except Exception:  # a concurrent creator won the race
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id
    return exp_id


def git_state(root: Path) -> dict[str, str]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    sha = git("rev-parse", "HEAD") or "unknown"
    dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    return {TAG_GIT_SHA: sha, TAG_GIT_DIRTY: dirty, "mlflow.source.git.commit": sha}


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    """Log flat params in batches (MLflow takes 100 per call); idempotent for equal values."""
    from mlflow.entities import Param

    existing = c.get_run(run_id).data.params
    items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metric_steps(c, run_id: str, rows: list[tuple[int, dict[str, float]]], retries: int = 5) -> None:
    """Log (step, metrics) rows in batches of up to 1,000 values (MLflow's batch limit); each batch
    is retried with backoff and the last failure raises (metrics are never silently dropped).

    Idempotent: a (metric, step) the run already holds is not logged again. A trial restarted from
    a checkpoint older than its last MLflow record (Ray Train had not yet registered the newest
    checkpoint when the process died) retrains that epoch deterministically; its record stays one
    entry per epoch instead of two."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    keys = {k for _step, row in rows for k in row}
    logged = _retry(lambda: {k: {m.step for m in c.get_metric_history(run_id, k)} for k in keys}, retries)
    batch = [
        Metric(k, float(v), ts, step)
        for step, row in rows
        for k, v in row.items()
        if isinstance(v, (int, float)) and math.isfinite(float(v)) and step not in logged[k]
    ]
    for i in range(0, len(batch), 1000):
        _retry(lambda: c.log_batch(run_id, metrics=batch[i : i + 1000]), retries)


def _retry(fn, retries: int):
    """``fn()``, retried with exponential backoff (0.5 s, 1 s, 2 s …); the last failure raises."""
    for attempt in range(retries):
        try:
            return fn()
        except Exception:
            if attempt == retries - 1:
                raise
            time.sleep(0.5 * 2**attempt)


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Log one step of metrics (see :func:`log_metric_steps`)."""
    log_metric_steps(c, run_id, [(step, metrics)])


def log_missing_history(c, run_id: str, history: list[dict], key: str = "val/loss") -> int:
    """Log the epochs of ``history`` (from a checkpoint's meta) that the run lacks; returns how many.

    Rank 0 writes the checkpoint before the MLflow record, so a process killed in between (a
    crash, or ASHA stopping the trial) leaves the checkpoint as the record of truth."""
    logged = {m.step for m in c.get_metric_history(run_id, key)}
    missing = [h for h in history if h.get("epoch") not in logged]
    for h in missing:
        log_metrics(c, run_id, h, step=int(h["epoch"]))
    return len(missing)


def find_runs(c, experiment_id: str, filter_string: str, max_results: int = 1000) -> list:
    return c.search_runs(
        [experiment_id], filter_string=filter_string, max_results=max_results, order_by=["attributes.start_time ASC"]
    )


def get_or_create_run(c, experiment_id: str, run_name: str, tags: dict[str, str], key_filter: str):
    """Return the run matching ``key_filter`` (e.g. the trial key), or create it: never duplicates
    a trial's run when Tune restarts or resumes the trial."""
    found = find_runs(c, experiment_id, key_filter)
    if found:
        run = found[-1]
        if run.info.status != "RUNNING":
            c.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, False
    run = c.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id, True


@dataclass
class TrialRun:
    run_id: str
    variant: str
    seed: int
    status: str
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    name: str


def sweeps(c) -> list[tuple[Any, Any]]:
    """Every (experiment, latest sweep parent run) in the store, newest first."""
    out = []
    for exp in c.search_experiments():
        parent = sweep_parent(c, exp.experiment_id, exp.name)
        if parent is not None:
            out.append((exp, parent))
    return sorted(out, key=lambda ep: ep[1].info.start_time or 0, reverse=True)


def sweep_parent(c, experiment_id: str, sweep: str):
    runs = find_runs(c, experiment_id, f"tags.`{TAG_ROLE}` = 'sweep' and tags.`{TAG_SWEEP}` = '{sweep}'")
    return runs[-1] if runs else None


def trial_runs(c, experiment_id: str, parent_id: str) -> list[TrialRun]:
    runs = find_runs(c, experiment_id, f"tags.`{PARENT_TAG}` = '{parent_id}'")
    return [
        TrialRun(
            r.info.run_id,
            r.data.tags.get(TAG_VARIANT, ""),
            int(r.data.tags.get(TAG_SEED, 0)),
            r.info.status,
            r.data.metrics,
            r.data.params,
            r.data.tags,
            r.info.run_name or "",
        )
        for r in runs
    ]


# ------------------------------------------------------------------------------------------
# Registry and promotion
# ------------------------------------------------------------------------------------------

CHAMPION, PREVIOUS = "champion", "previous"


def _better(a: float, b: float, goal: str) -> bool:
    return a < b if goal == "minimize" else a > b


@dataclass
class Promotion:
    model_name: str
    version: str
    run_id: str
    metric: str
    value: float
    previous_version: str | None
    previous_value: float | None


def best_trial(trials: Iterable[TrialRun], metric: str, goal: str) -> TrialRun | None:
    best = None
    for t in trials:
        if t.status != "FINISHED" or metric not in t.metrics or not math.isfinite(t.metrics[metric]):
            continue
        if t.params.get("eval.baseline", "None") not in ("None", ""):
            continue  # a baseline row (GT / Shuffle / Random) has no model to promote
        if best is None or _better(t.metrics[metric], best.metrics[metric], goal):
            best = t
    return best


def promote(
    c, trial: TrialRun, model_name: str, metric: str, goal: str, force: bool = False, make_source=None
) -> Promotion:
    """Register ``trial``'s checkpoint as a new version with alias ``champion``; the old champion
    becomes ``previous``. Refuses a candidate that is not better than the champion unless ``force``.
    ``make_source(trial) -> artifact URI`` (called only once the candidate is accepted) gives the
    version's source, e.g. a pyfunc model built from the checkpoint; default: the checkpoint folder."""
    from mlflow.exceptions import MlflowException

    value = trial.metrics[metric]
    prev_version, prev_value = None, None
    t0_ms = int(time.time() * 1000) - 1000  # versions registered from here on may race with this one
    try:
        c.get_registered_model(model_name)
    except MlflowException:
        c.create_registered_model(model_name, description="facelab model; alias 'champion' is served.")
    try:
        prev = c.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        prev = None
    if prev is not None:
        prev_version = prev.version
        prev_metric = prev.tags.get("facelab.metric")
        if prev.run_id == trial.run_id and not force:
            raise TrackingError(f"run {trial.run_id} is already champion (version {prev.version}) of {model_name}")
        if prev_metric == metric and "facelab.metric_value" in prev.tags:
            prev_value = float(prev.tags["facelab.metric_value"])
            if not force and not _better(value, prev_value, goal):
                raise TrackingError(
                    f"candidate {metric}={value:.6g} (run {trial.run_id}) is not better than the current "
                    f"champion of {model_name} (version {prev.version}, {metric}={prev_value:.6g}, goal "
                    f"{goal}); pass --force to promote it anyway"
                )
    source = (
        make_source(trial) if make_source else f"{c.get_run(trial.run_id).info.artifact_uri.rstrip('/')}/checkpoint"
    )
    mv = c.create_model_version(
        model_name,
        source=source,
        run_id=trial.run_id,
        tags={
            "facelab.metric": metric,
            "facelab.metric_value": repr(value),
            "facelab.goal": goal,
            TAG_SWEEP: trial.tags.get(TAG_SWEEP, ""),
            TAG_VARIANT: trial.variant,
            TAG_SEED: str(trial.seed),
            TAG_JOB_KIND: trial.tags.get(TAG_JOB_KIND, ""),
        },
        description=f"{trial.name}: {metric}={value:.6g}",
    )
    if prev is not None:
        c.set_registered_model_alias(model_name, PREVIOUS, prev.version)
    c.set_registered_model_alias(model_name, CHAMPION, mv.version)
    if not force:
        # No compare-and-swap in the registry: two promotions can both pass the check above and set
        # the alias in either order. Each re-reads what was registered since it began and points
        # `champion` at the best of it, so concurrent promotions converge on the best candidate.
        best = _best_recent_version(c, model_name, metric, goal, t0_ms)
        if best is not None and best.version != mv.version:
            c.set_registered_model_alias(model_name, CHAMPION, best.version)
    return Promotion(model_name, mv.version, trial.run_id, metric, value, prev_version, prev_value)


def _best_recent_version(c, model_name: str, metric: str, goal: str, since_ms: int):
    """The best version of ``model_name`` registered since ``since_ms`` and scored on ``metric``."""
    best, best_value = None, None
    for v in c.search_model_versions(f"name = '{model_name}'"):
        if (v.creation_timestamp or 0) < since_ms or v.tags.get("facelab.metric") != metric:
            continue
        try:
            val = float(v.tags["facelab.metric_value"])
        except (KeyError, ValueError):
            continue
        if best is None or _better(val, best_value, goal):
            best, best_value = v, val
    return best


def resolve_model_version(c, ref: str) -> str:
    """``NAME@ALIAS`` or ``NAME/VERSION`` → ``NAME/VERSION`` (pins an alias to the version it points at now)."""
    from mlflow.exceptions import MlflowException

    if "@" in ref:
        name, alias = ref.split("@", 1)
        try:
            return f"{name}/{c.get_model_version_by_alias(name, alias).version}"
        except MlflowException as exc:
            raise TrackingError(f"no model version models:/{ref} in {c.tracking_uri}: {exc.message}") from None
    name, sep, version = ref.partition("/")
    if not sep or not version.isdigit():
        raise TrackingError(f"model reference {ref!r}: expected NAME@ALIAS or NAME/VERSION")
    try:
        c.get_model_version(name, version)
    except MlflowException as exc:
        raise TrackingError(f"no model version models:/{ref} in {c.tracking_uri}: {exc.message}") from None
    return ref


def download_model(c, model_name: str, alias: str, dst: Path, by: str = "alias") -> tuple[Path, dict]:
    """Download ``models:/<name>@<alias>`` (or ``<name>/<version>`` with ``by="version"``); return (local dir, info)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        mv = (
            c.get_model_version(model_name, alias)
            if by == "version"
            else c.get_model_version_by_alias(model_name, alias)
        )
    except MlflowException as exc:
        sep = "/" if by == "version" else "@"
        raise TrackingError(
            f"no model version models:/{model_name}{sep}{alias} in {c.tracking_uri}: {exc.message}"
        ) from None
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=mv.source, dst_path=str(dst), tracking_uri=c.tracking_uri)
    )
    from facelab.core.checkpoint import servable_dir

    local = servable_dir(local)  # a pyfunc model (facelab.serve.pyfunc) holds the checkpoint inside
    info = {
        "name": model_name,
        "version": mv.version,
        "alias": alias,
        "run_id": mv.run_id,
        "job_kind": mv.tags.get(TAG_JOB_KIND, ""),
        "metric": mv.tags.get("facelab.metric"),
        "metric_value": mv.tags.get("facelab.metric_value"),
    }
    return Path(local), info
