"""Sweep driver: a validated sweep spec → Ray Tune (search, scheduler, resume) → one Ray Train run per trial.

Ray 2.60 (Train V2): Tune launches a *function trainable* (:func:`run_trial`) per trial; it builds
a ``TorchTrainer`` over the worker loop of the trial's family (``Family.worker_loop``, found in the
registry by the job's ``kind``) and calls ``fit()``; the workers' metrics reach Tune through
``TuneReportCallback``. The driver never names a family: a plug-in family runs like a built-in one. MLflow: the driver opens one parent run per
sweep; each trial function gets-or-creates its child run (keyed by Tune's trial id, so a restarted
or resumed trial never duplicates it); rank 0 logs per-epoch metrics; the trial function logs the
final checkpoint, config and plots once ``fit()`` returns.

Lost nodes: a worker group that loses a worker (its node died) is restarted by Ray Train from the
last checkpoint (the job's ``train.max_failures``), which lives on ``FACELAB_STORAGE``. The trial's
*driver* (the Tune trial function and the Train controller it runs) can be kept on stable nodes
(``resources.driver_resources``); a trial whose driver died with its node is restarted by Tune only
with the sweep's ``max_trial_failures`` (off by default), and a trial whose ``fit()`` failed for
good is never restarted by Tune (:data:`TAG_FIT_FAILED`).
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from facelab.core import tracking
from facelab.families import registry
from facelab.spec.loading import LoadedSweep, SweepSpec, apply_overrides, validate_job

SWEEP_STATE = "facelab_sweep.json"
# Set on a trial's run when its ``fit()`` raised: Ray Train already spent the job's restarts on it,
# so a Tune restart in the same sweep run (meant for a trial whose driver died) fails at once.
TAG_FIT_FAILED = "facelab.fit_failed"


class SweepError(RuntimeError):
    """A sweep cannot start or continue (the message says why and what to do)."""


@dataclass
class SweepContext:
    """Everything a trial needs that is the same for all trials of a sweep (shipped once)."""

    sweep: str
    root: str
    data_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    base_job: dict
    variants: dict[str, dict]
    variant_jobs: dict[str, dict]  # variants with their own job file (another family) → that job
    resources: dict
    storage: str
    lineage_tags: dict[str, str]
    git_tags: dict[str, str]
    session: str = ""  # one id per `facelab sweep` process (a --resume is a new one)


def storage_root(root: Path) -> Path:
    """Where Tune/Train keep trial state and checkpoints (``FACELAB_STORAGE`` for shared storage)."""
    return Path(os.environ.get("FACELAB_STORAGE") or (root / "ray_results")).resolve()


# ------------------------------------------------------------------------------------------------
# Search space
# ------------------------------------------------------------------------------------------------


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """Variants x seeds x parameters as a Tune search space.

    grid / random: variants and seeds are ``grid_search`` dimensions (one trial per variant x
    seed x grid point; ``num_samples`` repeats the sampled dimensions). optuna: Optuna's sampler
    cannot take grid dimensions, so variant and seed become categorical dimensions it searches
    and ``num_samples`` counts trials per variant x seed (the total is their product).
    """
    from ray import tune

    params: dict[str, Any] = {}
    for key, p in spec.parameters.items():
        pts = p.grid_points()
        if pts is not None:
            if len(pts) == 1:
                params[key] = pts[0]
            elif spec.method == "grid":
                params[key] = tune.grid_search(pts)
            else:
                params[key] = tune.choice(pts)
        elif p.distribution == "uniform":
            params[key] = tune.uniform(p.min, p.max)
        elif p.distribution == "log_uniform_values":
            params[key] = tune.loguniform(p.min, p.max)
        else:
            params[key] = tune.randint(int(p.min), int(p.max) + 1)
    variants, seeds = list(spec.variants), list(spec.seeds)
    if spec.method == "optuna":
        return {"variant": tune.choice(variants), "seed": tune.choice(seeds), "params": params}
    return {"variant": tune.grid_search(variants), "seed": tune.grid_search(seeds), "params": params}


def progress_reporter(spec: SweepSpec):
    """The table Tune prints while a sweep runs: the sweep's metric, the epoch, variant, seed and the
    searched parameters (not Ray Train's internal columns), in trial order.

    Not ``sort_by_metric``: Tune's sort compares the metric of every finished trial, and a trial that
    ended without reporting it (a ground-truth reference row, an errored trial) makes that compare
    ``float < None`` and kills the sweep's driver; ``facelab report`` ranks the finished sweep."""
    from ray.tune import CLIReporter

    params = {"variant": "variant", "seed": "seed", **{f"params/{k}": k for k in spec.parameters}}
    # No metric/mode here: Tune hands the reporter the TuneConfig's (Ray 2.60 refuses both at once).
    return CLIReporter(
        metric_columns={m: m for m in (spec.metric.name, *spec.show)} | {"epoch": "epoch"},
        parameter_columns=params,
        max_report_frequency=30,
    )


def search_alg(spec: SweepSpec):
    if spec.method != "optuna":
        return None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=spec.seeds[0])


def scheduler(spec: SweepSpec, epochs: int):
    if spec.early_terminate is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    et = spec.early_terminate
    return ASHAScheduler(
        time_attr="training_iteration",
        max_t=et.max_t or epochs,
        grace_period=et.grace_period,
        reduction_factor=et.reduction_factor,
    )


def num_samples(spec: SweepSpec) -> int:
    if spec.method == "optuna":
        return spec.num_samples * len(spec.variants) * len(spec.seeds)
    return spec.num_samples


# ------------------------------------------------------------------------------------------------
# One trial (runs inside a Tune trial actor)
# ------------------------------------------------------------------------------------------------


def trial_overrides(ctx: SweepContext, config: dict) -> dict[str, Any]:
    return {**ctx.variants[config["variant"]], **config.get("params", {}), "train.seed": int(config["seed"])}


def worker_loop_for(kind: str):
    """The Ray Train per-worker loop of a job's family (from the registry; an unknown kind is an error)."""
    return registry.get(kind).get_worker_loop()


def scaling_kwargs(res: dict) -> dict[str, Any]:
    """``ScalingConfig`` arguments of a trial: ``gpus_per_worker`` may be a fraction of one GPU
    (several trials share a card) or whole GPUs; 0 trains on the CPU."""
    g = float(res["gpus_per_worker"])
    check_gpu_share(int(res["num_workers"]), g)
    per_worker: dict[str, float] = {"CPU": float(res["cpus_per_worker"])}
    if g > 0:
        per_worker["GPU"] = g
    return {"num_workers": int(res["num_workers"]), "use_gpu": g > 0, "resources_per_worker": per_worker}


def run_trial(config: dict, ctx: SweepContext) -> None:
    """Tune function trainable: resolve the trial's job, open its MLflow child run, fit a TorchTrainer."""
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    base_job = ctx.variant_jobs.get(config["variant"], ctx.base_job)
    worker_loop = worker_loop_for(base_job["kind"])
    trial_id = tune.get_context().get_trial_id()
    overrides = trial_overrides(ctx, config)
    job = validate_job(apply_overrides(base_job, overrides), f"trial {trial_id}").model_dump(mode="json")

    c = tracking.client(ctx.tracking_uri)
    name = f"{config['variant']} | seed={config['seed']}" + "".join(
        f" | {k}={v}" for k, v in config.get("params", {}).items()
    )
    tags = {
        tracking.PARENT_TAG: ctx.parent_run_id,
        tracking.TAG_ROLE: "trial",
        tracking.TAG_SWEEP: ctx.sweep,
        tracking.TAG_TRIAL_KEY: trial_id,
        tracking.TAG_VARIANT: config["variant"],
        tracking.TAG_SEED: str(config["seed"]),
        tracking.TAG_JOB_KIND: job["kind"],
        **ctx.git_tags,
        **ctx.lineage_tags,
    }
    run_id, created = tracking.get_or_create_run(
        c,
        ctx.experiment_id,
        name,
        tags,
        f"tags.`{tracking.PARENT_TAG}` = '{ctx.parent_run_id}' and tags.`{tracking.TAG_TRIAL_KEY}` = '{trial_id}'",
    )
    if created:
        tracking.log_params(c, run_id, {**tracking.flatten(job), **{f"override.{k}": v for k, v in overrides.items()}})
        c.log_text(run_id, yaml.safe_dump(job, sort_keys=False), "config.yaml")

    res = ctx.resources
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={
            "job": job,
            "data_dir": str((Path(ctx.root) / job["data"]["path"]).resolve()),
            "root": ctx.root,
            "tracking": {"uri": ctx.tracking_uri, "run_id": run_id},
            # The worker runtime checks the GPU's free memory against this share before it starts.
            "resources": dict(res),
        },
        scaling_config=ScalingConfig(**scaling_kwargs(res)),
        run_config=RunConfig(
            name=trial_id,
            storage_path=str(Path(ctx.storage) / "train"),
            failure_config=FailureConfig(max_failures=job["train"]["max_failures"]),
            checkpoint_config=CheckpointConfig(num_to_keep=job["train"]["checkpoints_to_keep"]),
            callbacks=[TuneReportCallback()],
        ),
    )
    session, _, cause = c.get_run(run_id).data.tags.get(TAG_FIT_FAILED, "").partition("\n")
    if ctx.session and session == ctx.session:
        raise SweepError(
            "not restarted: this trial's training already failed in this sweep run, after the job's "
            "train.max_failures worker-group restarts (max_trial_failures restarts a trial whose driver died, "
            f"e.g. with its node). The failure:\n{cause}"
        )
    # An exception here is either a real failure or Tune stopping the trial (ASHA removes its
    # placement group, so the TrainController dies under fit()); only the driver can tell the
    # two apart, so it closes the run in reconcile() rather than this function.
    try:
        result = trainer.fit()
    except Exception as err:
        c.set_tag(run_id, TAG_FIT_FAILED, f"{ctx.session}\n{error_summary(err, 4000)}")
        raise
    finalize_trial_run(c, run_id, result.checkpoint.path if result.checkpoint else None)
    c.set_terminated(run_id, "FINISHED")


def finalize_trial_run(c, run_id: str, checkpoint_dir: str | None) -> None:
    """Log the final checkpoint (servable files only) and the loss-curve plot to the trial's run.

    The files are copied in chunks (``shutil.copyfile``), never read whole into memory: a model's
    weights can be gigabytes, on a driver that also holds Tune's state."""
    import shutil
    import tempfile

    from facelab.core import checkpoint as ckpt

    if checkpoint_dir:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "checkpoint"
            out.mkdir()
            for f in ckpt.SERVABLE_FILES:
                src = Path(checkpoint_dir) / f
                if not src.is_file():
                    raise ckpt.CheckpointError(f"{src}: missing from the final checkpoint")
                shutil.copyfile(src, out / f)
            c.log_artifacts(run_id, str(out), "checkpoint")
        tracking.log_missing_history(c, run_id, ckpt.load_meta(Path(checkpoint_dir)).get("history", []))
    from facelab.plots import loss_curves

    with tempfile.TemporaryDirectory() as d:
        png = loss_curves(c, run_id, Path(d) / "loss_curve.png")
        if png is not None:
            c.log_artifact(run_id, str(png), "plots")


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file in the same folder, fsynced, then renamed."""
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_sweep_dir(storage: Path, sweep: str) -> Path:
    """A fresh, empty run directory of ``sweep``; ``LATEST`` is *not* moved yet (see :func:`mark_latest`)."""
    base = storage / sweep
    stamp = time.strftime("%Y%m%d-%H%M%S")
    i = 0
    while True:
        d = base / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            d.mkdir(parents=True)
            return d
        except FileExistsError:  # a second start in the same second
            i += 1


def mark_latest(sweep_dir: Path) -> None:
    """Point ``LATEST`` at ``sweep_dir`` -- only once its state file is written, so ``LATEST`` never
    names a run that cannot be resumed."""
    _write_atomic(sweep_dir.parent / "LATEST", sweep_dir.name)


def resume_dir(storage: Path, sweep: str, log=print) -> Path:
    """The run directory ``--resume`` continues: ``LATEST`` when its state file is there, else the
    newest directory that has one (a start that died before writing its state is skipped, loudly)."""
    base = storage / sweep
    latest = base / "LATEST"
    if latest.is_file():
        d = base / latest.read_text().strip()
        if (d / SWEEP_STATE).is_file():
            return d
    runs = (
        sorted((d for d in base.iterdir() if d.is_dir() and (d / SWEEP_STATE).is_file()), key=lambda d: d.name)
        if base.is_dir()
        else []
    )
    if not runs:
        raise SweepError(f"nothing to resume: no earlier run of sweep '{sweep}' under {base}")
    log(f"resume: LATEST of '{sweep}' names no resumable run; continuing the newest one with a state file, {runs[-1]}")
    return runs[-1]


def init_ray(address: str | None = None, dashboard: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Baseline rows (GT / Shuffle / Random) report test metrics only, not the sweep metric.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune's legacy console output honours the sweep's progress reporter (metric/variant/seed columns).
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # No address: always a fresh local instance, never whatever cluster a stale session file points at.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    # Workers import facelab from the source tree; ship the path so they find it.
    src = str(Path(__file__).resolve().parents[2])
    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join(x for x in (src, os.environ.get("PYTHONPATH")) if x),
            "RAY_TRAIN_V2_ENABLED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    }
    if os.environ.get("FACELAB_WORKER_HOOKS"):  # tooling hooks of the worker runtime (facelab.runtime.worker)
        env["env_vars"]["FACELAB_WORKER_HOOKS"] = os.environ["FACELAB_WORKER_HOOKS"]
    ray.init(
        address=address,
        runtime_env=env,
        log_to_driver=True,
        include_dashboard=dashboard,  # off by default: a local Ray starts faster without it
        configure_logging=True,
        logging_level=_RAY_LOG_LEVEL[verbosity()],
    )


# `facelab -q` / `facelab -v` (the CLI sets FACELAB_VERBOSITY): how much Ray and Tune print.
_RAY_LOG_LEVEL = {-1: "ERROR", 0: "WARNING", 1: "INFO", 2: "DEBUG"}


def verbosity() -> int:
    """-1 quiet, 0 default, 1 verbose, 2 debug-level logs (from FACELAB_VERBOSITY; bad values → 0)."""
    try:
        return max(-1, min(2, int(os.environ.get("FACELAB_VERBOSITY", "0"))))
    except ValueError:
        return 0


TRIAL_CPU = 0.01  # the Tune trial function only drives the trainer (0 is rejected by Tune)


GPU_SHARE_MIN = 1e-4  # Ray's resolution for fractional resources


def check_gpu_share(num_workers: int, gpus_per_worker: float) -> None:
    """Refuse a GPU share Ray or DDP cannot honour (a message saying what to write instead).

    A worker gets either a fraction of *one* GPU (``0 < g < 1``: several trials share a card, which
    is how small trials fill a large GPU) or whole GPUs (``g >= 1``, an integer: Ray cannot give 1.5
    cards). A fraction is for one-worker trials: the DDP ranks of one trial could land on the same
    card, and NCCL refuses two ranks on one device."""
    g = float(gpus_per_worker)
    if g <= 0:
        return
    if g < GPU_SHARE_MIN:
        raise SweepError(
            f"resources.gpus_per_worker={g:g}: below Ray's resolution for fractional resources ({GPU_SHARE_MIN:g}); "
            "use 0 to train on the CPU or a share such as 0.25"
        )
    if g > 1 and abs(g - round(g)) > 1e-9:
        raise SweepError(
            f"resources.gpus_per_worker={g:g}: more than one GPU must be a whole number (Ray gives a worker "
            f"a fraction of one card, or whole cards); use {int(g)} or {int(g) + 1}, or a share below 1"
        )
    if g < 1 and num_workers > 1:
        raise SweepError(
            f"resources.gpus_per_worker={g:g} with num_workers={num_workers}: a fractional GPU is for one-worker "
            "trials that share a card; the DDP ranks of one trial could be placed on the same GPU, which NCCL "
            "refuses. Use num_workers: 1 to pack trials onto a GPU, or gpus_per_worker: 1 for a multi-worker trial"
        )


def trials_at_once(resources: dict, total: dict) -> dict[str, int]:
    """How many trials of ``resources`` the cluster ``total`` (``ray.cluster_resources()``) runs at
    once, per resource. GPU shares pack per card: a share of 0.2 fits 5 trials on each GPU."""
    n, cpu, g = int(resources["num_workers"]), float(resources["cpus_per_worker"]), float(resources["gpus_per_worker"])
    fit = {"CPU": int((total.get("CPU", 0) + 1e-9) // (n * cpu + TRIAL_CPU))}
    if g > 0:
        cards = int(total.get("GPU", 0) + 1e-9)
        fit["GPU"] = cards * int(1 / g + 1e-9) if g < 1 else int(cards // (n * g))
    return fit


def check_resources(spec: SweepSpec, total: dict | None = None, log=print) -> int:
    """Refuse a trial that can never be scheduled on this cluster instead of waiting forever, and a
    GPU share that Ray or DDP cannot honour; say when ``max_concurrent_trials`` is more than the
    cluster runs at once. ``total`` defaults to ``ray.cluster_resources()``. Returns how many trials
    run at once."""
    r = spec.resources
    check_gpu_share(r.num_workers, r.gpus_per_worker)
    if total is None:
        import ray

        total = ray.cluster_resources()
    need = {
        "CPU": r.num_workers * r.cpus_per_worker + TRIAL_CPU,
        "GPU": r.num_workers * r.gpus_per_worker,
        **r.driver_resources,
    }
    short = [
        f"{k}: needs {v:g}, cluster has {total.get(k, 0):g}" for k, v in need.items() if v > total.get(k, 0) + 1e-9
    ]
    if short:
        raise SweepError(
            f"resources: one trial ({r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU "
            f"+ {TRIAL_CPU} CPU for the trial driver) does not fit this Ray cluster ({'; '.join(short)}); lower "
            "resources.cpus_per_worker / num_workers / gpus_per_worker or add nodes"
        )
    fit = trials_at_once(r.model_dump(), total)
    at_once = min(spec.max_concurrent_trials, *fit.values())
    if at_once < spec.max_concurrent_trials:
        limits = ", ".join(f"{k}: {v}" for k, v in fit.items())
        log(
            f"resources: max_concurrent_trials is {spec.max_concurrent_trials}, but this cluster runs {at_once} trial(s) "
            f"of this size at once ({limits}); the others wait for a slot"
            + (
                " (to share a GPU between trials, give each a fraction, e.g. resources.gpus_per_worker=0.2)"
                if r.gpus_per_worker >= 1 and fit.get("GPU", 0) < fit["CPU"]
                else ""
            )
        )
    return at_once


def job_lineage(root: Path, job: dict) -> dict[str, str]:
    """Extra lineage of a job beyond its dataset (``Family.lineage``), e.g. a DVC-built base model."""
    hook = registry.get(job["kind"]).hook("lineage")
    return hook(root, job) if hook else {}


@dataclass
class SweepOutcome:
    sweep: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    storage: Path
    trials: list[dict]
    best: dict | None


def run_sweep(
    loaded: LoadedSweep,
    root: Path,
    *,
    resume: bool = False,
    address: str | None = None,
    log=print,
    dashboard: bool = False,
) -> SweepOutcome:
    """Run (or resume) a validated sweep end to end; returns where everything was recorded."""
    from facelab.core.lineage import verify_data

    spec, job = loaded.spec, loaded.job_dict
    data_dir = (root / job["data"]["path"]).resolve()
    entry = verify_data(root, job["data"]["path"])  # refuses unlocked data, before Ray starts
    uri = tracking.tracking_uri(root)
    c = tracking.check_reachable(uri)
    lineage = {**entry.as_tags(), **job_lineage(root, job)}
    variant_jobs = loaded.variant_jobs
    for vname, vjob in variant_jobs.items():  # another family's job in the same sweep: its data is checked too
        key = re.sub(r"[^\w.\-]", "_", vname)  # an MLflow tag key
        if vjob["data"]["path"] != job["data"]["path"]:
            lineage.update(verify_data(root, vjob["data"]["path"]).as_tags(f"facelab.data.{key}"))
        lineage.update(
            {
                k.replace("facelab.base_model", f"facelab.base_model.{key}"): v
                for k, v in job_lineage(root, vjob).items()
            }
        )
    pinned: dict[str, str] = {}
    for one in (job, *variant_jobs.values()):
        spec_str = (one.get("eval") or {}).get("evaluator")
        if spec_str:
            # Pin the evaluator once for the whole sweep: every trial is scored by the same version.
            pinned.setdefault(spec_str, tracking.resolve_model_version(c, spec_str))
            one["eval"]["evaluator"] = pinned[spec_str]
            lineage["facelab.evaluator"] = pinned[spec_str]
    for overrides in spec.variants.values():  # a variant may name the evaluator itself
        spec_str = overrides.get("eval.evaluator")
        if isinstance(spec_str, str):
            pinned.setdefault(spec_str, tracking.resolve_model_version(c, spec_str))
            overrides["eval.evaluator"] = pinned[spec_str]
            lineage["facelab.evaluator"] = pinned[spec_str]
    if len(set(pinned.values())) > 1:
        raise SweepError(
            f"eval.evaluator: the sweep's jobs name different evaluators {sorted(pinned)}; a table "
            "needs one evaluator for every row"
        )
    init_ray(address, dashboard=dashboard)
    if dashboard:
        import ray

        log(f"Ray dashboard: {ray.get_runtime_context().dashboard_url or '(not started by this process)'}")
    check_resources(spec)  # before any run is recorded
    exp_id = tracking.ensure_experiment(c, spec.name, root)
    storage = storage_root(root)
    sweep_dir = resume_dir(storage, spec.name, log) if resume else new_sweep_dir(storage, spec.name)
    state_file = sweep_dir / SWEEP_STATE

    if resume:
        state = json.loads(state_file.read_text())
        parent_id = state["parent_run_id"]
        c.update_run(parent_id, status="RUNNING")
        log(f"resuming sweep '{spec.name}' from {sweep_dir} (MLflow parent run {parent_id})")
    else:
        parent = c.create_run(
            exp_id,
            run_name=f"sweep {spec.name}",
            tags={
                tracking.TAG_ROLE: "sweep",
                tracking.TAG_SWEEP: spec.name,
                **tracking.git_state(root),
                **lineage,
                "facelab.sweep_dir": str(sweep_dir),
                "facelab.variants": json.dumps(list(spec.variants)),
                tracking.TAG_JOB_KIND: job["kind"],
            },
        )
        parent_id = parent.info.run_id
        _write_atomic(state_file, json.dumps({"parent_run_id": parent_id, "experiment_id": exp_id, "sweep": spec.name}))
        mark_latest(sweep_dir)  # last: LATEST only ever names a run with its state written
        tracking.log_params(
            c,
            parent_id,
            {f"sweep.{k}": v for k, v in tracking.flatten(spec.model_dump(mode="json", exclude={"variants"})).items()},
        )
        c.log_text(parent_id, loaded.source.read_text(), "sweep.yaml")
        c.log_text(parent_id, yaml.safe_dump(job, sort_keys=False), "base_job.yaml")
        for vname, vjob in variant_jobs.items():
            c.log_text(parent_id, yaml.safe_dump(vjob, sort_keys=False), f"variant_jobs/{vname}.yaml")

    ctx = SweepContext(
        sweep=spec.name,
        root=str(root),
        data_dir=str(data_dir),
        tracking_uri=uri,
        experiment_id=exp_id,
        parent_run_id=parent_id,
        base_job=job,
        variants=spec.variants,
        variant_jobs=variant_jobs,
        resources=spec.resources.model_dump(),
        storage=str(sweep_dir),
        lineage_tags=lineage,
        git_tags=tracking.git_state(root),
        session=uuid.uuid4().hex,
    )

    from ray import tune

    # The trial's driver: the trial function and the Train controller it runs (placed on its node).
    driver = {"cpu": TRIAL_CPU, **spec.resources.driver_resources}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), driver)
    tune_dir = sweep_dir / "tune"
    try:
        if resume:
            tuner = tune.Tuner.restore(
                str(tune_dir / spec.name), trainable=trainable, resume_errored=True, restart_errored=False
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space=param_space(spec),
                tune_config=tune.TuneConfig(
                    metric=spec.metric.name,
                    mode="min" if spec.metric.goal == "minimize" else "max",
                    num_samples=num_samples(spec),
                    search_alg=search_alg(spec),
                    scheduler=scheduler(spec, job["train"]["epochs"]),
                    max_concurrent_trials=spec.max_concurrent_trials,
                ),
                run_config=tune.RunConfig(
                    name=spec.name,
                    storage_path=str(tune_dir),
                    # quiet: no progress table (the summary is still printed); verbose: Tune's trial events too
                    # max_trial_failures: a trial whose driver died (e.g. with its node) is restarted
                    failure_config=tune.FailureConfig(max_failures=spec.max_trial_failures),
                    verbose={-1: 0, 0: 1, 1: 2, 2: 3}[verbosity()],
                    progress_reporter=progress_reporter(spec) if verbosity() >= 0 else None,
                ),
            )
        results = tuner.fit()
    except BaseException:
        c.set_terminated(parent_id, "FAILED")
        raise

    trials = reconcile(c, ctx, results, spec.metric.name, tuple(spec.show))
    best = tracking.best_trial(tracking.trial_runs(c, exp_id, parent_id), spec.metric.name, spec.metric.goal)
    best_info = None
    if best is not None:
        best_info = {"run_id": best.run_id, "name": best.name, spec.metric.name: best.metrics[spec.metric.name]}
        c.log_metric(parent_id, f"best/{spec.metric.name}", best.metrics[spec.metric.name])
        c.set_tag(parent_id, "facelab.best_run_id", best.run_id)
    states = {t["status"] for t in trials}
    if "INTERRUPTED" in states:
        c.set_terminated(parent_id, "KILLED")
    else:
        c.set_terminated(parent_id, "FAILED" if states == {"FAILED"} else "FINISHED")
    return SweepOutcome(spec.name, exp_id, parent_id, uri, sweep_dir, trials, best_info)


_EXC_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure|Died)\b(: .*)?$")


def error_summary(err: BaseException, limit: int = 5000) -> str:
    """A failed trial's error for the run's ``facelab.error`` tag: the innermost cause first (Ray wraps
    a worker's exception in layers of remote tracebacks; the last ``SomeError: message`` line is what
    actually went wrong), then the whole text, cut to ``limit`` characters."""
    full = f"{type(err).__name__}: {err}"
    causes = [ln.strip() for ln in full.splitlines() if _EXC_LINE.match(ln.strip())]
    head = causes[-1] if causes else full.splitlines()[0]
    return (head if head == full else f"{head}\n\n{full}")[:limit]


def reconcile(c, ctx: SweepContext, results, metric: str, show: tuple[str, ...] = ()) -> list[dict]:
    """Bring every child run in line with what Tune says happened to its trial.

    * TERMINATED but the run still RUNNING: ASHA stopped the trial inside ``fit()``; the run is
      finalized from the last checkpoint Tune saw and tagged ``facelab.stopped_early``.
    * ERROR: the run is FAILED (the trial function usually did it; a killed one could not).
    * anything else (the sweep was interrupted): the run is KILLED and tagged
      ``facelab.interrupted``; ``facelab sweep --resume`` reopens the same run.
    """
    from ray.tune.experiment import Trial

    runs = {r.tags.get(tracking.TAG_TRIAL_KEY): r for r in tracking.trial_runs(c, ctx.experiment_id, ctx.parent_run_id)}
    errors = {Path(r.path).name: r.error for r in results if r.error is not None and r.path}
    out = []
    for trial in results._experiment_analysis.trials:  # ResultGrid exposes no public trial status
        run = runs.get(trial.trial_id)
        last = trial.last_result or {}
        if run is not None and run.status in ("FINISHED", "FAILED"):
            status = run.status  # the trial function closed its own run
        elif trial.status == Trial.ERROR:
            status = "FAILED"
        # Tune marks a trial that ended on its own or by the scheduler's STOP with done=True; a
        # trial stopped because the sweep was interrupted (SIGINT) is TERMINATED but not done.
        elif trial.status == Trial.TERMINATED and last.get("done"):
            status = "FINISHED"
        else:
            status = "INTERRUPTED"
        if run is not None and run.status not in ("FINISHED", "FAILED"):
            if status == "FINISHED":  # stopped by the scheduler inside fit()
                base = ctx.variant_jobs.get(trial.config.get("variant"), ctx.base_job)
                epochs = apply_overrides(base, trial_overrides(ctx, trial.config))["train"]["epochs"]
                early = int(last.get("epoch", -1)) + 1 < int(epochs)  # ASHA also stops at max_t
                c.set_tag(run.run_id, tracking.TAG_STOPPED_EARLY, str(early).lower())
                finalize_trial_run(c, run.run_id, last.get("checkpoint_path"))
                c.set_terminated(run.run_id, "FINISHED")
            elif status == "FAILED":
                err = errors.get(Path(trial.path).name) if trial.path else None
                c.set_tag(run.run_id, "facelab.error", error_summary(err) if err else "unknown")
                c.set_terminated(run.run_id, "FAILED")
            elif run.status == "RUNNING":
                c.set_tag(run.run_id, "facelab.interrupted", "true")
                c.set_terminated(run.run_id, "KILLED")
        out.append(
            {
                "trial_id": trial.trial_id,
                "run_id": run.run_id if run else None,
                "status": status,
                "variant": trial.config.get("variant"),
                "seed": trial.config.get("seed"),
                **{m: last.get(m) for m in (*show, metric)},
            }
        )
    return out
