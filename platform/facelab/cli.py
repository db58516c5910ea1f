"""The ``facelab`` command line (also ``python -m facelab``).

User errors (bad specs, unlocked data, an unreachable tracking store …) exit non-zero with a
one-paragraph message; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from pathlib import Path


def _root() -> Path:
    return Path.cwd().resolve()


def _user_errors() -> tuple[type[BaseException], ...]:
    from facelab.cluster import ClusterError
    from facelab.core.checkpoint import CheckpointError
    from facelab.core.lineage import DataLineageError
    from facelab.core.tracking import TrackingError
    from facelab.data.arkit import ArkitError
    from facelab.data.emoava import DataError
    from facelab.families.base import FamilyError
    from facelab.runtime.sweep import SweepError
    from facelab.spec.loading import SpecError

    return (
        ClusterError,
        FileExistsError,
        FamilyError,
        SpecError,
        DataLineageError,
        TrackingError,
        SweepError,
        DataError,
        CheckpointError,
        FileNotFoundError,
        ArkitError,
    )


# ---------------------------------------------------------------------------------------------


def cmd_sweep(args) -> int:
    from facelab.spec.loading import load_sweep

    root = _root()
    loaded = load_sweep(args.sweep, args.set, root=root)
    if args.dry_run or args.print_config:
        print_plan(loaded, full=args.print_config)
        return 0
    return _run_and_summarize(loaded, root, resume=args.resume, address=args.address, dashboard=args.dashboard)


def print_plan(loaded, full: bool = False) -> None:
    """``--dry-run``: every trial with its overrides, the resolved job config's difference from the
    base job (or the whole resolved YAML with ``--print-config``) and the resources it reserves."""
    import yaml

    from facelab.core.tracking import flatten
    from facelab.runtime.sweep import TRIAL_CPU
    from facelab.spec.loading import apply_overrides

    s, r = loaded.spec, loaded.spec.resources
    print(
        f"sweep '{s.name}': job {s.job} (kind {loaded.job_dict['kind']}), method {s.method}, metric "
        f"{s.metric.name} ({s.metric.goal}){' (shown beside it: ' + ', '.join(s.show) + ')' if s.show else ''}, "
        f"{len(loaded.trials)} trial(s)"
    )
    print(
        f"resources per trial: {r.num_workers} worker(s) x ({r.cpus_per_worker:g} CPU, {r.gpus_per_worker:g} GPU) "
        f"+ {TRIAL_CPU} CPU for the trial driver; at most {s.max_concurrent_trials} trial(s) at once"
    )
    from facelab.spec.loading import load_job

    # Differences are shown against each job *file* as written, so --set changes are visible too.
    raw = yaml.safe_load(loaded.source.read_text()) or {}
    refs = {v: (o or {}).get("job") for v, o in (raw.get("variants") or {}).items() if isinstance(o, dict)}
    files: dict[str, dict] = {}

    def file_job(ref: str | None) -> dict:
        path = str(ref or loaded.job_path)
        if path not in files:
            files[path] = flatten(load_job(path if ref is None else _root() / ref)[1])
        return files[path]

    for i, t in enumerate(loaded.trials):
        ov = t.overrides(s.variants)
        own = loaded.variant_jobs.get(t.variant)
        job = apply_overrides(loaded.job_for(t.variant), ov)
        base = file_job(refs.get(t.variant) if own is not None else None)
        print(f"  [{i}] {t.name}")
        if own is not None:
            print(f"       job: {refs.get(t.variant)} (the variant's own job file, kind {own['kind']})")
        print(f"       overrides: {json.dumps(ov, default=str)}")
        if full:
            print("       resolved job config:")
            print("\n".join("         " + line for line in yaml.safe_dump(job, sort_keys=False).splitlines()))
            continue
        flat = flatten(job)
        diff = {k: v for k, v in flat.items() if base.get(k, object()) != v}
        sampled = {k: v for k, v in t.params.items() if isinstance(v, str) and v.startswith("<")}
        changes = [f"{k}: {base.get(k, '(absent)')!r} -> {v!r}" for k, v in diff.items()]
        changes += [f"{k}: sampled {v}" for k, v in sampled.items()]
        print("       resolved vs job file: " + ("; ".join(changes) if changes else "(as written in the job file)"))


def _metrics_text(values, names: list[str]) -> str:
    """``val/mse=0.91  val/cppl=5.7e+09``: the sweep's metric first, then those its YAML asks to ``show``."""
    return "  ".join(f"{n}={_fmt(values.get(n))}" for n in names)


def _shown(parent) -> list[str]:
    """The metrics a sweep's YAML asked to show beside its own (logged as the parent run's param)."""
    import ast

    raw = parent.data.params.get("sweep.show", "[]")
    try:  # our own param: str() of a list of metric names
        names = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return []
    return [n for n in names if isinstance(n, str)] if isinstance(names, list) else []


def _run_and_summarize(loaded, root: Path, resume: bool, address: str | None, dashboard: bool = False) -> int:
    from facelab.runtime.sweep import run_sweep

    print(f"MLflow tracking store: {_tracking_uri(root)}")
    out = run_sweep(loaded, root, resume=resume, address=address, dashboard=dashboard)
    print()
    print(f"sweep '{out.sweep}': {len(out.trials)} trial(s)")
    names = [loaded.spec.metric.name, *loaded.spec.show]
    for t in out.trials:
        print(f"  {t['status']:9s} {t['variant']} seed={t['seed']}  {_metrics_text(t, names)}  run {t['run_id']}")
    if out.best:
        best = next((t for t in out.trials if t["run_id"] == out.best["run_id"]), out.best)
        print(f"best: {out.best['name']} ({_metrics_text(best, names)})")
    print(f"MLflow: experiment '{out.sweep}' (id {out.experiment_id}), parent run {out.parent_run_id}")
    print(f"  browse: mlflow ui --backend-store-uri {out.tracking_uri}")
    from facelab.core.tracking import ui_experiment_url

    print(f"          then open {ui_experiment_url('http://127.0.0.1:5000', out.experiment_id)}")
    print(f"Ray results and checkpoints: {out.storage}")
    if any(t["status"] == "INTERRUPTED" for t in out.trials):
        print(f"interrupted: continue with `facelab sweep {loaded.source} --resume` (finished trials are not re-run)")
        return 130
    failed = [t for t in out.trials if t["status"] != "FINISHED"]
    return 1 if failed else 0


def cmd_train(args) -> int:
    """One run through the sweep code path: a one-trial sweep named after the job."""
    from facelab.spec.loading import LoadedSweep, SweepSpec, load_job, plan_trials

    root = _root()
    job, job_dict = load_job(args.job, args.set)
    spec = SweepSpec(
        name=args.name or job_dict["name"],
        job=str(args.job),
        metric={"name": "val/loss", "goal": "minimize"},
        seeds=[job_dict["train"]["seed"]],
        resources={
            "num_workers": args.num_workers,
            "gpus_per_worker": args.gpus_per_worker,
            "cpus_per_worker": args.cpus_per_worker,
        },
    )
    loaded = LoadedSweep(
        spec=spec, job=job, job_dict=job_dict, source=Path(args.job), job_path=Path(args.job), trials=plan_trials(spec)
    )
    if args.dry_run or args.print_config:
        print_plan(loaded, full=args.print_config)
        return 0
    return _run_and_summarize(loaded, root, resume=False, address=args.address, dashboard=args.dashboard)


def _tracking_uri(root: Path) -> str:
    from facelab.core import tracking

    return tracking.tracking_uri(root)


def _sweep_runs(name: str):
    from facelab.core import tracking

    root = _root()
    c = tracking.check_reachable(_tracking_uri(root))
    exp = c.get_experiment_by_name(name)
    if exp is None:
        known = [e.name for e, _p in tracking.sweeps(c)]
        close = difflib.get_close_matches(name, known, n=1)
        raise tracking.TrackingError(
            f"no sweep '{name}' in {c.tracking_uri}"
            + (f" (did you mean '{close[0]}'?)" if close else "")
            + (f"; sweeps: {', '.join(known)}" if known else "; no sweep has run yet (`facelab sweep SWEEP.yaml`)")
        )
    parent = tracking.sweep_parent(c, exp.experiment_id, name)
    if parent is None:
        raise tracking.TrackingError(f"experiment '{name}' has no sweep run in {c.tracking_uri}")
    return c, exp, parent, tracking.trial_runs(c, exp.experiment_id, parent.info.run_id)


def _pyfunc_source(c):
    """``make_source`` for :func:`tracking.promote`: the trial's checkpoint as an MLflow pyfunc model
    (facelab.serve.pyfunc), logged under the trial's run as ``registered_model/``."""

    def make(trial) -> str:
        import tempfile

        from facelab.families import registry
        from facelab.serve.pyfunc import save_pyfunc

        task = registry.get(trial.tags.get("facelab.job_kind")).task
        with tempfile.TemporaryDirectory() as d:
            ckpt = Path(c.download_artifacts(trial.run_id, "checkpoint", d))
            save_pyfunc(ckpt, Path(d) / "registered_model", task)
            c.log_artifacts(trial.run_id, str(Path(d) / "registered_model"), "registered_model")
        return f"{c.get_run(trial.run_id).info.artifact_uri.rstrip('/')}/registered_model"

    return make


def cmd_promote(args) -> int:
    from facelab.core import tracking

    c, exp, parent, trials = _sweep_runs(args.sweep)
    metric = parent.data.params.get("sweep.metric.name", "val/loss")
    goal = parent.data.params.get("sweep.metric.goal", "minimize")
    if args.variant:
        pool = [t for t in trials if t.variant == args.variant]
        if not pool:
            known = sorted({t.variant for t in trials})
            raise tracking.TrackingError(
                f"--variant {args.variant!r}: no trial of that variant in sweep '{args.sweep}'; variants: {known}"
            )
    else:  # the sweep's own model family; a baseline of another family is promoted by naming its variant
        kind = parent.data.tags.get(tracking.TAG_JOB_KIND)
        pool = [t for t in trials if not kind or t.tags.get(tracking.TAG_JOB_KIND, kind) == kind]
    best = tracking.best_trial(pool, metric, goal)
    if best is None:
        where = f"variant {args.variant!r} of " if args.variant else ""
        raise tracking.TrackingError(f"{where}sweep '{args.sweep}' has no finished trial with metric {metric}")
    model_name = args.model_name or best.params.get("name") or args.sweep
    p = tracking.promote(c, best, model_name, metric, goal, force=args.force, make_source=_pyfunc_source(c))
    prev = (
        f"; previous champion version {p.previous_version} is now '{tracking.PREVIOUS}'" if p.previous_version else ""
    )
    print(
        f"promoted {best.name} (run {p.run_id}, {metric}={p.value:.5g}) → models:/{p.model_name} "
        f"version {p.version} @{tracking.CHAMPION}{prev}"
    )
    return 0


def cmd_report(args) -> int:
    from facelab.report import sweep_table

    c, exp, parent, trials = _sweep_runs(args.sweep)
    by = [k.strip() for k in args.by.split(",") if k.strip()] if args.by else None
    out = Path(args.out) if args.out else None
    print(sweep_table(c, parent, trials, fmt=args.format, log=not args.no_log, by=by, out_dir=out))
    if out is not None:
        print(f"wrote {out}/ (table, CSV and plots)", file=sys.stderr)
    if args.html:
        from facelab.report import sweep_html

        page = sweep_html(c, parent, trials, Path(args.html), by=by, log=not args.no_log)
        print(f"wrote {page}" if page else "no trial of this sweep logged viewer/preview.json", file=sys.stderr)
    return 0


def cmd_study(args) -> int:
    """``facelab study create | serve | report``: a blind ranking study (CTEG §4.5, Figure 4; facelab.study)."""
    from facelab.study.core import StudyError

    try:
        if args.study_cmd == "create":
            from facelab.study.core import create

            c, exp, parent, trials = _sweep_runs(args.sweep)
            variants = [v.strip() for v in args.variants.split(",") if v.strip()] if args.variants else None
            out = Path(args.out or f"studies/{args.sweep}")
            log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
            create(c, parent, trials, out, root=_root(), variants=variants, items=args.items, seed=args.seed,
                   max_frames=args.max_frames, force=args.force, log=log)  # fmt: skip
            print(f"wrote study {out} (serve it: facelab study serve {out} --port 8321)")
        elif args.study_cmd == "serve":
            from facelab.study.server import serve

            server = serve(args.study, host=args.host, port=args.port)
            print(f"study page: http://{args.host}:{server.server_address[1]}/?rater=NAME (Ctrl-C stops)", flush=True)
            try:
                server.serve_forever()
            finally:
                server.server_close()
        else:
            from facelab.study.report import report

            client = None
            if args.log:
                from facelab.core import tracking

                client = tracking.check_reachable(_tracking_uri(_root()))
            text, _summary = report(args.study, log=args.log, client=client)
            print(text, end="")
            print(f"wrote {Path(args.study) / 'report.md'} and {Path(args.study) / 'preference.png'}", file=sys.stderr)
    except StudyError as exc:
        print(f"facelab: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _champion_models(c) -> list[str]:
    return sorted(m.name for m in c.search_registered_models(max_results=1000) if "champion" in (m.aliases or {}))


def _serving_check(c, model_name: str, alias: str = "champion") -> str | None:
    """Refuse, in one paragraph (TrackingError), a model ``facelab serve`` cannot serve: one that is not
    registered (naming the models that have a champion) or one with neither a ``champion`` nor a
    ``previous`` version (for another ``alias``: one whose alias points at no version). Returns a
    warning line when ``champion`` is gone but ``previous`` can stand in (the replicas then fall back to
    it, loudly)."""
    from mlflow.exceptions import MlflowException

    from facelab.core.tracking import TrackingError

    try:
        c.get_registered_model(model_name)
    except MlflowException:
        names = _champion_models(c)
        close = difflib.get_close_matches(model_name, names, n=1)
        raise TrackingError(
            f"--model {model_name!r}: no such registered model in {c.tracking_uri}"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + (
                f"; registered models with a champion: {', '.join(names)}"
                if names
                else "; no registered model has a champion yet: run `facelab promote SWEEP` first"
            )
        ) from None
    try:
        c.get_model_version_by_alias(model_name, alias)
        return None
    except MlflowException:
        if alias != "champion":  # only the champion falls back
            raise TrackingError(
                f"--model {model_name}@{alias}: the alias points at no model version of {model_name!r}"
            ) from None
    try:
        prev = c.get_model_version_by_alias(model_name, "previous")
    except MlflowException:
        raise TrackingError(
            f"models:/{model_name}@champion points at no model version (the version was deleted, or none was "
            f"promoted) and there is no @previous to fall back to: promote one (`facelab promote SWEEP`) or "
            f"point the alias at an existing version (MlflowClient.set_registered_model_alias({model_name!r}, "
            f"'champion', VERSION)); versions: "
            + (
                ", ".join(sorted((str(v.version) for v in c.search_model_versions(f"name = '{model_name}'")), key=int))
                or "none"
            )
        ) from None
    return (
        f"facelab: WARNING: models:/{model_name}@champion points at no model version (deleted?); falling back "
        f"to models:/{model_name}@previous (version {prev.version}) until a champion loads"
    )


def _replica_count(apps: list[str], default: int) -> int:
    """RUNNING replicas of the apps' deployments now (the drain waits for each to report)."""
    try:
        from ray import serve

        applications = serve.status().applications
        deployments = [d for app in apps for d in applications[app].deployments.values()]
        return sum(d.replica_states.get("RUNNING", 0) for d in deployments) or default
    except Exception:  # noqa: BLE001 - best effort; the drain timeout bounds the wait anyway
        return default


def _stop_serve_and_ray() -> None:
    import logging

    from ray import serve

    for name in ("ray", "ray.serve"):  # Serve's own shutdown chatter is not news to the user
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        serve.shutdown()
    finally:
        import ray

        ray.shutdown()


def _drain_and_stop(signame: str, key: str, replicas: int, timeout_s: float, again, apps: list[str]) -> str:
    """Drain (503 for new requests, wait for those in flight up to ``timeout_s``), stop Serve and Ray;
    → the one line to print. ``again`` (an Event) is set by a second signal: stop at once."""
    import time

    from facelab.serve.app import DRAIN_POLL_S, drain_report, end_drain, start_drain

    t0 = time.monotonic()
    expected = _replica_count(apps, replicas)
    print(
        f"facelab: {signame}: draining: new requests get 503; waiting up to {timeout_s:g}s for the requests "
        "in flight (a second Ctrl-C stops at once)",
        flush=True,
    )
    first = running = None
    try:
        start_drain(key)
        while True:
            time.sleep(DRAIN_POLL_S)
            seen, running = drain_report(key)
            if seen and first is None:
                first = running
            if (seen >= expected and running == 0) or time.monotonic() - t0 > timeout_s or again.is_set():
                break
        end_drain(key)
    except Exception as exc:  # noqa: BLE001 - Ray already going away: nothing left to drain
        running = None
        print(f"facelab: drain not possible ({type(exc).__name__}); stopping", flush=True)
    took = time.monotonic() - t0
    _stop_serve_and_ray()
    if running:
        why = "was cut short by a second signal" if again.is_set() else f"timeout ({timeout_s:g}s) passed"
        return (
            f"facelab: stopped on {signame} after {took:.1f}s: {running} request(s) still running when the drain {why}"
        )
    finished = f"the {first} request(s) in flight finished" if first else "no request was in flight"
    return f"facelab: stopped cleanly on {signame}: drained in {took:.1f}s ({finished})"


def cmd_serve(args) -> int:
    import signal
    import threading

    from ray import serve

    from facelab.core import tracking
    from facelab.runtime.sweep import init_ray
    from facelab.serve.app import batch_size_for, build_app, drain_key_for, peers_of, plan_models
    from facelab.serve.config import load_serve_config

    raw_batch = args.max_batch_size
    try:  # checked before Ray starts
        args.max_batch_size = batch_size_for(args.max_batch_size, args.max_ongoing_requests)
    except ValueError as exc:
        print(f"facelab: error: --max-batch-size: {exc}", file=sys.stderr)
        return 2
    if args.config and (args.model or args.default):
        print(
            "facelab: error: --config lists the models: give it, or --model (and --default), not both", file=sys.stderr
        )
        return 2
    if args.default is not None and not args.model:
        print("facelab: error: --default names one of the --model names; give them", file=sys.stderr)
        return 2
    per: dict[str, dict] = {}  # per model (an entry's first name): the settings --config gives it
    try:
        if args.config:
            cfg = load_serve_config(Path(args.config))
            args.model, args.default, per = [m.model for m in cfg.models], cfg.default, cfg.settings()
        entries = plan_models(args.model, args.default) if args.model else None
        settings: dict[str, argparse.Namespace] = {}
        for e in entries or ():
            own = per.get(e.name, {})
            s = settings[e.name] = argparse.Namespace(**{**vars(args), **own})
            s.max_batch_size = batch_size_for(own.get("max_batch_size", raw_batch), s.max_ongoing_requests)
            if s.max_adapters < 1 + len(e.adapters):
                raise ValueError(
                    f"--max-adapters {s.max_adapters} is smaller than the adapter group --model "
                    f"{'+'.join([e.name, *(n for n, _ in e.adapters)])} ({1 + len(e.adapters)} models)"
                )
    except ValueError as exc:  # ServeConfigError too
        print(f"facelab: error: {exc}", file=sys.stderr)
        return 2
    root = _root()
    try:  # a script writer (POST /v1/scripts) that cannot load offline is refused before Ray starts
        writers = {args.script_writer, *(s.script_writer for s in settings.values())} - {None}
        if writers:
            from facelab.families import registry

            for writer in writers:
                registry.script_writer()(writer, root, check_only=True)
    except ValueError as exc:  # FamilyError too
        print(f"facelab: error: {exc}", file=sys.stderr)
        return 2
    uri = _tracking_uri(root)
    c = tracking.check_reachable(uri)
    entries = entries or plan_models([_default_model(c)])
    model_name = entries[0].name
    for name, alias in ((n, a) for e in entries for n, a in ((e.name, e.alias), *e.adapters)):
        warning = _serving_check(c, name, alias)  # a clear paragraph, not an MLflow traceback, before Ray starts
        if warning:
            print(warning, file=sys.stderr, flush=True)
    # The key is read from the environment (never from argv, where `ps` shows it) and removed from it
    # before Ray starts, so no Ray process inherits it; build_app gives the replicas only a salted digest.
    api_key = os.environ.pop(args.api_key_env, "") or None

    # SIGTERM (a supervisor, `kill`) and SIGINT (Ctrl-C) drain first (see _drain_and_stop); a second one
    # stops at once. Installed after ray.init, whose own SIGTERM handler prints a C++ stack trace and exits.
    got: list[int] = []
    stop, again, up = threading.Event(), threading.Event(), threading.Event()

    def _on_signal(signum, frame):
        if got and not up.is_set():  # a second one while still starting (a start that hangs): give up
            raise KeyboardInterrupt
        if got:
            again.set()
        elif not up.is_set():  # the proxy may answer before serve.run returns: drain once it has
            print(
                f"facelab: {signal.Signals(signum).name} during start-up: draining once started (again: stop now)",
                flush=True,
            )
        got.append(signum)
        stop.set()

    init_ray(args.address)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    drain_key = drain_key_for("facelab")
    several = len(entries) > 1 or bool(entries[0].adapters)
    board_key = f"board:{drain_key}" if several else None
    peers = peers_of(entries)

    def app_of(e):
        s = settings.get(e.name, args)  # the command line's, with what --config gives this model
        return build_app(
            e.name,
            uri,
            alias=e.alias,
            root=str(root),
            api_key=api_key,
            replicas=s.replicas,
            max_ongoing_requests=s.max_ongoing_requests,
            max_queued_requests=s.max_queued_requests,
            watch_s=s.watch_champion,
            max_batch_size=s.max_batch_size,
            batch_wait_s=s.batch_wait_ms / 1000.0,
            gpus_per_replica=s.gpus_per_replica,
            cpus_per_replica=s.cpus_per_replica,
            request_timeout_s=args.request_timeout_s,
            drain_key=drain_key,
            script_writer=s.script_writer,
            **(
                {
                    "strict": False,
                    "peers": peers,
                    "board_key": board_key,
                    "route_prefix": e.route_prefix,
                    "adapters": e.adapters,
                    "max_adapters": s.max_adapters,
                }
                if several
                else {}
            ),
        )

    try:
        # request_timeout_s bounds every request (Serve answers 408 past it); the replicas stop generating
        # at the same deadline, and generation is bounded by the request schema and token counts.
        serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s})
        # One Serve application per model, deployed together (each loads its model in its own replicas).
        serve.run_many([serve.RunTarget(app_of(e), name=e.app_name, route_prefix=e.route_prefix) for e in entries])
        every = [(p["name"], p["alias"]) for p in peers]
        failed = _failed_models(board_key, [n for n, _ in every]) if several else {}
        if several and len(failed) == len(every):
            raise RuntimeError(
                "no model could be loaded: " + "; ".join(f"models:/{n}@{a}: {failed[n]}" for n, a in every)
            )
    except KeyboardInterrupt:
        print("facelab: stopped during start-up (signal); nothing was served", flush=True)
        _stop_serve_and_ray()
        return 130
    except RuntimeError as exc:  # the deployment failed: no replica could load a model
        if args.debug:
            raise
        import re

        text = str(exc)
        why = re.findall(r"RuntimeError: (models:/\S+ cannot be loaded .*)", text) or re.findall(
            r"^(no model could be loaded: .*)", text
        )
        _stop_serve_and_ray()
        print(
            "facelab: error: no replica could start: "
            + (why[-1].strip() if why else text.strip().splitlines()[-1][:500] + " (--debug for the traceback)"),
            file=sys.stderr,
            flush=True,
        )
        return 2
    up.set()
    print(
        f"API key: {'required (X-API-Key header; from $' + args.api_key_env + ')' if api_key else 'none ($' + args.api_key_env + ' is unset)'}; "
        f"{args.replicas} replica(s){' per model' if several else ''}{' (unless --config says otherwise)' if per else ''} on {'CUDA' if args.gpus_per_replica > 0 else 'CPU'} x "
        f"{args.max_ongoing_requests} concurrent + {args.max_queued_requests} queued, "
        f"timeout {args.request_timeout_s:g}s; "
        + (
            f"expression requests batched up to {args.max_batch_size} (wait {args.batch_wait_ms:g} ms); "
            if args.max_batch_size > 1
            else "no request batching; "
        )
        + (
            f"a new champion is health-probed and swapped in (checked every {args.watch_champion:g}s)"
            if args.watch_champion > 0
            else "the champion is loaded once (--watch-champion 0)"
        ),
        flush=True,
    )
    print(
        f"serving models:/{model_name}@{entries[0].alias} on http://{args.host}:{args.port}  (docs: /docs; Ctrl-C or "
        f"SIGTERM drains for up to {args.drain_timeout_s:g}s, then stops)",
        flush=True,
    )
    for p in peers if several else ():
        where = f"http://{args.host}:{args.port}{p['route_prefix']}/v1/..." + (
            f" with '{p['header']}'" if p["header"] else ""
        )
        if p["default"]:
            where += f" and (the default) http://{args.host}:{args.port}/v1/..."
        if p["name"] in failed:
            print(
                f"facelab: ERROR: models:/{p['name']}@{p['alias']} could not be loaded ({failed[p['name']]}); it "
                f"answers 503 at {where} (/healthz says failed) while the other models serve"
                + (", and is served once a loadable version is promoted" if args.watch_champion > 0 else ""),
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"  models:/{p['name']}@{p['alias']} at {where}", flush=True)
    while not stop.wait(1.0):
        pass
    apps = [e.app_name for e in entries]
    line = _drain_and_stop(signal.Signals(got[0]).name, drain_key, args.replicas, args.drain_timeout_s, again, apps)
    print(line, flush=True)
    # Serve and Ray are stopped; the interpreter's own teardown of Ray's C++ core can take seconds more
    # (measured: 3-6 s), which a supervisor's grace period need not pay for.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _failed_models(board_key: str, names: list[str], wait_s: float = 10.0) -> dict[str, str]:
    """Models whose replicas could load no version (name → why), once every model's replicas have
    reported their state (they do so as soon as they start; waits at most ``wait_s``)."""
    import time

    from facelab.serve.app import BOARD_PUBLISH_S, read_states

    deadline = time.monotonic() + wait_s
    while True:
        states = read_states(board_key)
        if all(n in states for n in names) or time.monotonic() > deadline:
            break
        time.sleep(BOARD_PUBLISH_S / 4)
    return {
        name: st.get("error") or "no version could be loaded" for name, st in states.items() if st["status"] == "failed"
    }


def _default_model(c) -> str:
    from facelab.core.tracking import TrackingError

    models = c.search_registered_models(max_results=100)
    names = [m.name for m in models if "champion" in (m.aliases or {})]
    if len(names) == 1:
        return names[0]
    if not names:
        raise TrackingError(
            f"no registered model with a 'champion' alias in {c.tracking_uri}; run `facelab promote SWEEP` first"
        )
    raise TrackingError(
        f"several registered models have a champion ({', '.join(sorted(names))}); pick one with --model"
    )


def _request_headers(model: str | None = None) -> dict[str, str]:
    """JSON, plus the API key from FACELAB_API_KEY when the server requires one, and ``X-Facelab-Model``
    when ``model`` names an adapter of a group (``request-keyframes --model``)."""
    headers = {"Content-Type": "application/json"}
    if os.environ.get("FACELAB_API_KEY"):
        headers["X-API-Key"] = os.environ["FACELAB_API_KEY"]
    if model:
        headers["X-Facelab-Model"] = model
    return headers


def _wait_healthy(url: str, wait: float) -> str | None:
    """Wait up to ``wait`` seconds for ``GET url/healthz`` to answer 200; → None when it does, else the
    one-paragraph reason. Nothing listening (connection refused) and a server that is there but not
    ready (starting, draining, slow) are told apart; either is retried while ``wait`` allows, with one
    progress line the first time."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + wait
    said = False
    while True:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                if r.status == 200:
                    return None
                state = f"/healthz answered HTTP {r.status}"
        except urllib.error.HTTPError as e:  # e.g. 503 while draining
            state = f"/healthz answered HTTP {e.code}"
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ConnectionRefusedError):
                state = "refused"
            elif isinstance(reason, TimeoutError) or "timed out" in str(reason):
                state = "/healthz did not answer within 5s"
            else:
                state = f"{type(reason).__name__}: {reason}"
        left = deadline - time.monotonic()
        if left <= 0:
            if state == "refused":
                return (
                    f"nothing listens at {url} (connection refused for {wait:g}s): start a server with "
                    "`facelab serve`, or give --url; a server that is still starting needs a longer --wait"
                )
            return f"the server at {url} did not become healthy within {wait:g}s ({state})"
        if not said:
            what = "nothing listens there yet (connection refused)" if state == "refused" else f"not ready ({state})"
            print(f"facelab: {url}: {what}; waiting up to {wait:g}s", file=sys.stderr, flush=True)
            said = True
        time.sleep(min(1.0, max(left, 0.05)))


def _post_json(url: str, body: dict, timeout: float = 120, model: str | None = None) -> tuple[bytes | None, str | None]:
    """POST ``body``; → (the answer's bytes, None), or (None, a one-paragraph error that carries the
    server's ``detail`` for a 4xx/5xx answer)."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=_request_headers(model))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read(), None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            detail = json.loads(raw).get("detail")
        except (ValueError, AttributeError):
            detail = raw.decode("utf-8", "replace").strip()[:500] or None
        if isinstance(detail, list):
            parts = [
                f"{d.get('field')}: {d.get('msg')}" if isinstance(d, dict) and d.get("field") else str(d)
                for d in detail
            ]
            detail = "; ".join(parts)
        hint = " (set FACELAB_API_KEY to the server's key)" if e.code == 401 else ""
        return None, f"the server answered {e.code} {e.reason}: {detail or 'no detail'}{hint}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return None, f"no answer from {url}: {type(reason).__name__}: {reason}"


def cmd_request(args) -> int:
    """Send one /v1/expressions request and print a short summary (used by the Quickstart). A refused
    request prints the server's detail and exits 1; no server exits 1 after --wait (default 10 s)."""
    problem = _wait_healthy(args.url, args.wait)
    if problem:
        print(f"facelab: error: {problem}", file=sys.stderr)
        return 1
    body = {"text": args.text, "num_samples": args.num_samples, "max_frames": args.max_frames, "seed": args.seed}
    payload, problem = _post_json(f"{args.url}/v1/expressions", body)
    if problem:
        print(f"facelab: error: POST /v1/expressions: {problem}", file=sys.stderr)
        return 1
    out = json.loads(payload)
    m = out["model"]
    print(f"POST /v1/expressions {{'text': {args.text!r}}} → models:/{m['name']} v{m['version']} (run {m['run_id']})")
    for i, s in enumerate(out["sequences"]):
        f = s["frames"]
        print(
            f"  sample {i}: {len(f)} frames x {len(f[0]) if f else 0} dims at {out['fps']} fps; "
            f"first frame[:4] = {[round(v, 3) for v in f[0][:4]] if f else []}"
        )
    return 0


def _ago(ms: int | None) -> str:
    import time

    if not ms:
        return "-"
    s = max(0, time.time() - ms / 1000)
    return f"{s:.0f}s ago" if s < 90 else f"{s / 60:.0f}m ago" if s < 5400 else f"{s / 3600:.1f}h ago"


def _fmt(v) -> str:
    return f"{v:.5g}" if isinstance(v, (int, float)) else "-"


def cmd_ls(args) -> int:
    """List sweeps, the runs of one sweep, or registered models, from the tracking store."""
    from facelab.core import tracking

    if args.what == "runs":
        if not args.sweep:
            raise tracking.TrackingError("facelab ls runs SWEEP: name the sweep (`facelab ls sweeps` lists them)")
        return _print_trials(args.sweep)
    c = tracking.check_reachable(_tracking_uri(_root()))
    if args.what == "sweeps":
        rows = tracking.sweeps(c)
        if not rows:
            print(f"no sweeps in {c.tracking_uri}")
        for exp, parent in rows:
            metric = parent.data.params.get("sweep.metric.name", "val/loss")
            trials = tracking.trial_runs(c, exp.experiment_id, parent.info.run_id)
            best = tracking.best_trial(
                trials, metric, parent.data.params.get("sweep.metric.goal", "minimize")
            )  # the finished trial the sweep ranks first, with what the YAML shows beside it
            shown = _metrics_text(best.metrics, [metric, *_shown(parent)]) if best else f"{metric}=-"
            print(
                f"{exp.name:<32} {parent.info.status:<9} {len(trials):>3} trial(s)  best {shown}  "
                f"started {_ago(parent.info.start_time)}"
            )
        return 0
    models = c.search_registered_models()
    if not models:
        print(f"no registered models in {c.tracking_uri} (`facelab promote SWEEP` registers one)")
    for m in models:
        aliases = {a: v for a, v in (m.aliases or {}).items()}
        champ = aliases.get(tracking.CHAMPION)
        info = ""
        if champ is not None:
            mv = c.get_model_version(m.name, champ)
            info = (
                f"{mv.tags.get(tracking.TAG_JOB_KIND, '?')}, {mv.tags.get('facelab.metric', '?')}="
                f"{mv.tags.get('facelab.metric_value', '?')} (sweep {mv.tags.get(tracking.TAG_SWEEP, '?')})"
            )
        al = ", ".join(f"{a}=v{v}" for a, v in sorted(aliases.items())) or "no aliases"
        print(f"{m.name:<32} {al:<28} {info}")
    return 0


def _print_trials(sweep: str) -> int:
    """Each trial of a sweep: state, epoch, the sweep's metric (latest), and the current best."""
    from facelab.core import tracking

    c, exp, parent, trials = _sweep_runs(sweep)
    metric = parent.data.params.get("sweep.metric.name", "val/loss")
    goal = parent.data.params.get("sweep.metric.goal", "minimize")
    names = [metric, *_shown(parent)]
    print(f"sweep '{sweep}' ({parent.info.status}, started {_ago(parent.info.start_time)}), metric {metric} ({goal})")
    for t in sorted(trials, key=lambda t: t.name):
        epoch = t.metrics.get("epoch")
        ep = f"epoch {int(epoch) + 1}/{t.params.get('train.epochs', '?')}" if epoch is not None else "not started"
        flag = " (stopped early)" if t.tags.get(tracking.TAG_STOPPED_EARLY) == "true" else ""
        print(f"  {t.status:<9} {t.name:<40} {ep:<14} {_metrics_text(t.metrics, names)}{flag}  run {t.run_id}")
    done = [t for t in trials if t.status in ("RUNNING", "FINISHED")]
    import dataclasses

    # best so far: finished trials and the latest epoch of running ones
    best = tracking.best_trial([dataclasses.replace(t, status="FINISHED") for t in done], metric, goal)
    if best is not None:
        print(f"best so far: {best.name} ({_metrics_text(best.metrics, names)})")
    return 0


def cmd_status(args) -> int:
    """A Ray job (``raysubmit_...``; needs --address or RAY_JOB_ADDRESS) or a sweep (from MLflow)."""
    if args.target.startswith("raysubmit_") or args.address:
        from facelab import cluster

        st = cluster.status(args.address, args.target)
        print(f"job {st['job_id']}: {st['status']}" + (f" (sweep {st['sweep']})" if st["sweep"] else ""))
        if st["message"]:
            print(f"  {st['message']}")
        print(f"  entrypoint: {st['entrypoint']}")
        if st["sweep"] and os.environ.get("MLFLOW_TRACKING_URI"):
            try:
                _print_trials(st["sweep"])
            except Exception as exc:  # noqa: BLE001 - the sweep may not have started recording yet
                print(f"  (no trials on record yet: {exc})")
        return 0
    return _print_trials(args.target)


def cmd_submit(args) -> int:
    from facelab import cluster

    job_id = cluster.submit(Path(args.sweep), args.set, _root(), address=args.address, pull=not args.no_pull)
    print(job_id)
    print(
        f"submitted to {cluster.job_address(args.address)}; follow with `facelab logs {job_id} --follow`, "
        f"check with `facelab status {job_id}`, cancel with `facelab stop {job_id}`",
        file=sys.stderr,
    )
    return 0


def cmd_logs(args) -> int:
    from facelab import cluster

    if not args.follow:
        print(cluster.logs(args.address, args.job), end="")
        return 0
    import asyncio

    async def run() -> None:
        async for chunk in cluster.follow(args.address, args.job):
            print(chunk, end="", flush=True)

    asyncio.run(run())
    st = cluster.status(args.address, args.job)["status"]
    print(f"\njob {args.job}: {st}", file=sys.stderr)
    return 0 if st == "SUCCEEDED" else 1


def cmd_stop(args) -> int:
    from facelab import cluster

    stopped = cluster.stop(args.address, args.job)
    print(f"job {args.job}: " + ("stop requested" if stopped else "already finished"))
    return 0


STARTERS = {"sweep": "sweeps", "job": "jobs", "family": "examples"}


def cmd_cp(args) -> int:
    """Copy a shipped starter (a sweep, a job, or the example plug-in family) to edit as your own."""
    import shutil

    import facelab

    repo = Path(facelab.__file__).resolve().parents[2]
    src_dir = repo / STARTERS[args.kind]
    names = sorted(p.stem if p.is_file() else p.name for p in src_dir.iterdir() if not p.name.startswith("."))
    if args.name is None:
        print(f"{args.kind} starters: {', '.join(names)}")
        return 0
    src = src_dir / (args.name if args.kind == "family" else f"{args.name}.yaml")
    if not src.exists():
        close = difflib.get_close_matches(args.name, names, n=1)
        raise FileNotFoundError(
            f"no {args.kind} starter '{args.name}'"
            + (f" (did you mean '{close[0]}'?)" if close else "")
            + f"; starters: {', '.join(names)}"
        )
    dst = Path(args.dest or (src.name if args.kind == "family" else f"{STARTERS[args.kind]}/{src.name}"))
    if dst.exists() and not args.force:
        raise FileExistsError(f"{dst} exists; pass --force to overwrite it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(
            src, dst, dirs_exist_ok=args.force, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
        )
    else:
        shutil.copyfile(src, dst)
    print(f"copied {args.kind} '{args.name}' to {dst}")
    return 0


def cmd_families(args) -> int:
    """List the installed model families: built-in ones and ``facelab.families`` entry points."""
    from facelab.families import registry
    from facelab.tasks import ROUTES

    fams = registry.families()
    width = max(len(k) for k in fams)
    for kind, fam in fams.items():
        route = ROUTES.get(fam.task, "-") if fam.task else "(not served)"
        print(f"{kind:<{width}}  {route:<16}  {fam.description}")
        if args.verbose:
            print(f"{'':<{width}}  from {registry.source_of(kind)}; job schema {fam.job.__module__}.{fam.job.__name__}")
            print(f"{'':<{width}}  metrics: {', '.join(sorted(fam.metrics))}")
    return 0


def cmd_data(args) -> int:
    import yaml

    from facelab.data import emoava
    from facelab.data.lm_listener_data import is_lm_listener_dir as lm_listener_dir

    def params(section: str) -> dict:
        return (yaml.safe_load(Path(args.params).read_text()) or {}).get(section, {}) if args.params else {}

    if args.data_cmd == "build-emoava":
        from facelab.data.synth import generate_emoava

        summary = generate_emoava(Path(args.out), **params("emoava"), force=args.force)
    elif args.data_cmd == "build-keyframeface":
        from facelab.data.synth_keyframe import generate_keyframeface

        summary = generate_keyframeface(Path(args.out), **params("keyframeface"), force=args.force)
    elif args.data_cmd == "describe":  # KeyframeFace Figures 8-11 + summary.json / summary.md
        from facelab.data.describe import describe, format_report

        print(format_report(describe(Path(args.path), Path(args.out), force=args.force), args.out))
        return 0
    elif getattr(args, "data_fn", None) is not None:  # a family's own data command (Family.add_cli)
        summary = args.data_fn(args, params)
    elif args.data_cmd == "import-emoava":
        summary = emoava.import_release(Path(args.release_dir), Path(args.out), force=args.force)
    elif args.data_cmd == "build-lm-listener":  # CTEG Table 5's data: synthetic release, then imported
        from facelab.data.lm_listener_data import DATASET
        from facelab.data.synth_lm_listener import build_lm_listener

        release = Path(args.release_out) if args.release_out else None
        summary = build_lm_listener(Path(args.out), release_dir=release, **params(DATASET), force=args.force)
    elif args.data_cmd == "import-lm-listener":
        from facelab.data.lm_listener_data import import_release as import_lm_listener

        summary = import_lm_listener(Path(args.release_dir), Path(args.out), force=args.force)
    elif args.data_cmd == "import-keyframeface":
        from facelab.data.keyframeface import claim_output, import_chat_jsonl, write_dataset

        claim_output(Path(args.out), args.force)  # before the import: a wrong --out fails at once
        scripts = import_chat_jsonl(Path(args.requests), Path(args.results), annotation=args.annotation)
        summary = write_dataset(
            Path(args.out), {args.split: scripts}, {"source": "release (chat JSONL)"}, force=args.force
        )
    elif (Path(args.path) / "meta.json").is_file() and "keyframeface" in (Path(args.path) / "meta.json").read_text():
        from facelab.data.keyframeface import validate_dir

        summary = validate_dir(Path(args.path))
    elif lm_listener_dir(Path(args.path)):  # an LM-Listener dataset: also its speaker frames
        from facelab.data.lm_listener_data import summarize as summarize_lm_listener

        summary = summarize_lm_listener(Path(args.path))
    else:
        summary = emoava.summarize(Path(args.path))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_export(args) -> int:
    """Keyframes (a /v1/keyframes JSON answer or a keyframe CSV) → a 60 Hz Live Link Face animation CSV."""
    import numpy as np

    from facelab.data.arkit import ArkitError, interpolate_keyframes, read_llf_csv, vector_from_mapping, write_llf_csv

    src = Path(args.input)
    if src.suffix.lower() == ".json":
        try:
            doc = json.loads(src.read_text(encoding="utf-8"))
            frames = doc["keyframes"]
            rows = np.stack(
                [vector_from_mapping(k["blendshapes"], where=f"{src}: keyframes[{i}]") for i, k in enumerate(frames)]
            )
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ArkitError(f"{src}: not a /v1/keyframes answer ({type(exc).__name__}: {exc})") from None
    else:
        _, rows = read_llf_csv(src)
    times = [i * args.spacing for i in range(len(rows))]
    _, anim = interpolate_keyframes(rows, times, fps=args.fps)
    write_llf_csv(anim, args.out, fps=args.fps)
    print(f"{len(rows)} keyframe(s), {args.spacing:g} s apart → {len(anim)} frames at {args.fps:g} Hz → {args.out}")
    return 0


def cmd_request_keyframes(args) -> int:
    """Send one /v1/keyframes request (JSON, or the Live Link Face CSV with --csv). A refused request
    prints the server's detail and exits 1; no server exits 1 after --wait (default 10 s)."""
    problem = _wait_healthy(args.url, args.wait)
    if problem:
        print(f"facelab: error: {problem}", file=sys.stderr)
        return 1
    body = {"background": args.background, "emotion": args.emotion, "keyframes": args.keyframe}
    url = f"{args.url}/v1/keyframes" + ("?format=csv" if args.csv else "")
    payload, problem = _post_json(url, body, model=args.model)
    if problem:
        print(f"facelab: error: POST /v1/keyframes: {problem}", file=sys.stderr)
        return 1
    if args.csv:
        Path(args.csv).write_bytes(payload)
        rows = payload.count(b"\n") - 1
        print(f"wrote {args.csv} ({rows} keyframe rows)")
        return 0
    out = json.loads(payload)
    m = out["model"]
    print(f"POST /v1/keyframes → models:/{m['name']} v{m['version']}" + (f"  [{m['note']}]" if m.get("note") else ""))
    for k in out["keyframes"]:
        top = sorted(k["blendshapes"].items(), key=lambda kv: -abs(kv[1]))[:5]
        print(f"  keyframe {k['index']} (valid={k['valid']}): " + ", ".join(f"{n}={v:.2f}" for n, v in top))
    return 0


# ---------------------------------------------------------------------------------------------


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facelab")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facelab", description="Sweeps, tracking and serving for text-to-facial-expression models."
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors (accepted anywhere on the line)")
    p.add_argument("--version", action="version", version=f"facelab {_version()}")
    p.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="count",
        default=0,
        help="more output: Ray's INFO logs and Tune's trial events (-vv: DEBUG)",
    )
    p.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=-1,
        help="less output: no progress table, Ray errors only (results and errors are still printed)",
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("sweep", help="run a sweep YAML on Ray Tune + Train")
    s.add_argument("sweep", help="the sweep YAML (see README: Sweep YAML)")
    s.add_argument(
        "--dry-run", action="store_true", help="print the resolved trials, configs and resources; start nothing"
    )
    s.add_argument(
        "--print-config", action="store_true", help="like --dry-run, with each trial's whole resolved job YAML"
    )
    s.add_argument("--resume", action="store_true", help="continue the latest run of this sweep")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep or job key")
    s.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    s.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local Ray (default: off)")
    s.set_defaults(fn=cmd_sweep)

    t = sub.add_parser("train", help="one run of a job YAML (a one-trial sweep)")
    t.add_argument("job", help="the job YAML")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job key")
    t.add_argument("--name", default=None, help="sweep/experiment name (default: the job's name)")
    t.add_argument("--num-workers", type=int, default=1, help="Ray Train workers, DDP ranks (default 1)")
    t.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (default 0: CPU)")
    t.add_argument("--cpus-per-worker", type=float, default=1, help="CPUs per worker (default 1)")
    t.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    t.add_argument("--dry-run", action="store_true", help="print the resolved job config and resources; start nothing")
    t.add_argument("--print-config", action="store_true", help="like --dry-run, with the whole resolved job YAML")
    t.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with a local Ray (default: off)")
    t.set_defaults(fn=cmd_train)

    r = sub.add_parser("report", help="paper-layout table of a finished sweep")
    r.add_argument("sweep")
    r.add_argument("--format", choices=["md", "csv"], default="md")
    r.add_argument("--no-log", action="store_true", help="do not log the table to the sweep's MLflow run")
    r.add_argument(
        "--by",
        default=None,
        metavar="KEY[,KEY]",
        help="group rows by these keys ('variant' and/or job keys such as optim.lr_mul); default: the variant "
        "and every searched parameter, so ± is over seeds only",
    )
    r.add_argument("--out", default=None, metavar="DIR", help="also write the table (md, csv) and plots into DIR")
    r.add_argument(
        "--html",
        default=None,
        metavar="FILE",
        help="also write the sweep's viewer page (faces or heatmaps, ground truth then one row per variant) to FILE "
        "and log it to the sweep's run (unless --no-log)",
    )
    r.set_defaults(fn=cmd_report)

    sy = sub.add_parser("study", help="blind ranking study of a sweep's outputs (CTEG Figure 4): create, serve, report")
    sysub = sy.add_subparsers(dest="study_cmd", required=True)
    syc = sysub.add_parser("create", help="sample test texts, generate every method's output, write a study folder")
    syc.add_argument("sweep")
    syc.add_argument("--variants", default=None, metavar="A,B", help="variants to compare (default: all with a model)")
    syc.add_argument("--items", type=int, default=50, help="test texts to sample (default 50, as CTEG §4.5)")
    syc.add_argument("--seed", type=int, default=0, help="sampling, generation and shuffling seed (default 0)")
    syc.add_argument("--max-frames", type=int, default=128, help="longest expression output (default 128)")
    syc.add_argument("--out", default=None, metavar="DIR", help="the study folder (default studies/SWEEP)")
    syc.add_argument("--force", action="store_true", help="replace an existing study folder")
    sys_ = sysub.add_parser("serve", help="serve the raters' page: open /?rater=NAME")
    sys_.add_argument("study", metavar="STUDY_DIR")
    sys_.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sys_.add_argument("--port", type=int, default=8321, help="port (default 8321)")
    syr = sysub.add_parser("report", help="preference distribution, average rank, Fleiss' kappa, heat map")
    syr.add_argument("study", metavar="STUDY_DIR")
    syr.add_argument("--log", action="store_true", help="log the metrics, table and heat map to the sweep's run")
    sy.set_defaults(fn=cmd_study)

    pr = sub.add_parser("promote", help="register the sweep's best trial as champion")
    pr.add_argument("sweep")
    pr.add_argument("--model-name", default=None, help="registered model name (default: the job's name)")
    pr.add_argument("--force", action="store_true", help="promote even if not better than the champion")
    pr.add_argument(
        "--variant",
        help="promote the best trial of this variant (e.g. a learned baseline of another "
        "model family); default: the best trial of the sweep's own job kind",
    )
    pr.set_defaults(fn=cmd_promote)

    sv = sub.add_parser("serve", help="serve models:/NAME@champion over HTTP (Ray Serve)")

    def _at_least(lo: float, cast=int):
        def parse(text: str):
            try:
                v = cast(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
            if not v >= lo:
                raise argparse.ArgumentTypeError(f"must be >= {lo:g} (got {text})")
            return v

        return parse

    sv.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME[@ALIAS]",
        help="registered model to serve, following ALIAS (default champion); repeat it to serve several "
        "models at once, each at /models/NAME/v1/... and the first (or --default) also at /v1/...; "
        "NAME+NAME...: LoRA adapters of one base model served by one deployment holding the base once "
        "(the others picked with the X-Facelab-Model header) (default: the only model with a champion)",
    )
    sv.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a serve config YAML listing the models (instead of --model) and, per model, its own --replicas, "
        "limits, batching, CPUs/GPUs, watch interval (facelab.serve.config)",
    )
    sv.add_argument(
        "--default",
        default=None,
        metavar="NAME",
        help="with several --model: the one that also answers the plain /v1/... routes (default: the first)",
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--address", default=None)
    sv.add_argument(
        "--api-key-env",
        default="FACELAB_API_KEY",
        metavar="NAME",
        help="environment variable holding the API key; when set and non-empty, every route but /healthz "
        "needs 'X-API-Key: <key>' or 'Authorization: Bearer <key>' (default: FACELAB_API_KEY)",
    )
    sv.add_argument(
        "--replicas",
        type=_at_least(1),
        default=1,
        help="Serve replicas (each loads the model and reserves one CPU); 2+ keep answering while a dead "
        "replica is replaced (default 1)",
    )
    sv.add_argument(
        "--max-ongoing-requests", type=_at_least(1), default=8, help="requests one replica runs at once (default 8)"
    )
    sv.add_argument(
        "--max-queued-requests",
        type=_at_least(0),
        default=64,
        help="requests waiting beyond those; more get an immediate 503 (default 64)",
    )
    sv.add_argument(
        "--request-timeout-s",
        type=_at_least(0.1, float),
        default=120.0,
        help="per-request limit; slower requests are answered 408 (default 120)",
    )
    sv.add_argument(
        "--watch-champion",
        type=_at_least(0.0, float),
        default=30.0,
        metavar="SECONDS",
        help="look for a newly promoted champion this often; it is health-probed and swapped in "
        "without dropping requests, or refused while the current one keeps serving (default 30; 0 = never)",
    )
    sv.add_argument(
        "--max-batch-size",
        type=_at_least(1),
        default=None,
        help="expression requests waiting in a replica are decoded as one batch of up to this many "
        "(each keeps its own seed; at most --max-ongoing-requests; 1 = no batching; default 8, "
        "or --max-ongoing-requests if smaller)",
    )
    sv.add_argument(
        "--gpus-per-replica",
        type=_at_least(0.0, float),
        default=0.0,
        help="GPUs each replica reserves from Ray; > 0 runs the model on CUDA (default 0: CPU)",
    )
    sv.add_argument(
        "--max-adapters",
        type=_at_least(1),
        default=8,
        help="an adapter group (--model A+B): LoRA adapters one replica holds at once on the shared base "
        "(at least the group's size; one more lets a new champion be probed beside the one in service; default 8)",
    )
    sv.add_argument(
        "--script-writer",
        default=None,
        metavar="NAME_OR_DIR",
        help="the LM behind POST /v1/scripts of a keyframes model (KeyframeFace §4.1: free text -> script): a "
        "model directory or a Hugging Face id already in the local cache, loaded offline (never downloaded); "
        "default: a tiny untrained test model whose scripts are well-formed but not meaningful",
    )
    sv.add_argument(
        "--cpus-per-replica",
        type=_at_least(0.01, float),
        default=1.0,
        help="CPUs each replica reserves from Ray (default 1); several small models on a small machine "
        "may take less, e.g. 0.5",
    )
    sv.add_argument(
        "--batch-wait-ms",
        type=_at_least(0.0, float),
        default=0.0,
        help="hold a lone request this long for others to batch with (default 0: batch what is "
        "already waiting, add no latency)",
    )
    sv.add_argument(
        "--drain-timeout-s",
        type=_at_least(0.0, float),
        default=20.0,
        metavar="SECONDS",
        help="on SIGTERM / SIGINT: answer new requests 503 and let those in flight finish for up to this "
        "long before stopping (default 20; a second Ctrl-C stops at once)",
    )
    sv.set_defaults(fn=cmd_serve)

    rq = sub.add_parser("request", help="send one expression request to a running server")
    rq.add_argument("text")
    rq.add_argument("--url", default="http://127.0.0.1:8000")
    rq.add_argument("--num-samples", type=int, default=1)
    rq.add_argument("--max-frames", type=int, default=256)
    rq.add_argument("--seed", type=int, default=0)
    rq.add_argument(
        "--wait",
        type=float,
        default=10,
        help="seconds to wait for a healthy /healthz (default 10; a server that is still starting needs more, "
        "e.g. 180)",
    )
    rq.set_defaults(fn=cmd_request)

    ls = sub.add_parser("ls", help="list sweeps, the runs of a sweep, or registered models (from MLflow)")
    ls.add_argument("what", choices=["sweeps", "runs", "models"], help="what to list")
    ls.add_argument("sweep", nargs="?", help="the sweep whose runs to list (for `ls runs`)")
    ls.set_defaults(fn=cmd_ls)

    st = sub.add_parser("status", help="a sweep's trials (state, epoch, metric, best so far) or a Ray job's state")
    st.add_argument("target", help="a sweep name, or a Ray job id (raysubmit_...)")
    st.add_argument("--address", default=None, help="Ray Jobs address http://HEAD:8265 (default: RAY_JOB_ADDRESS)")
    st.set_defaults(fn=cmd_status)

    sb = sub.add_parser("submit", help="send a sweep to a Ray cluster as a Ray Job; prints the job id at once")
    sb.add_argument("sweep", help="the sweep YAML (validated here before anything is sent)")
    sb.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a sweep or job key")
    sb.add_argument("--address", default=None, help="Ray Jobs address http://HEAD:8265 (default: RAY_JOB_ADDRESS)")
    sb.add_argument("--no-pull", action="store_true", help="do not `dvc pull` the data on the cluster first")
    sb.set_defaults(fn=cmd_submit)

    lg = sub.add_parser("logs", help="a submitted job's output")
    lg.add_argument("job", help="the Ray job id")
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends (exit 0 if it succeeded)")
    lg.add_argument("--address", default=None, help="Ray Jobs address http://HEAD:8265 (default: RAY_JOB_ADDRESS)")
    lg.set_defaults(fn=cmd_logs)

    sp = sub.add_parser("stop", help="stop a submitted job")
    sp.add_argument("job", help="the Ray job id")
    sp.add_argument("--address", default=None, help="Ray Jobs address http://HEAD:8265 (default: RAY_JOB_ADDRESS)")
    sp.set_defaults(fn=cmd_stop)

    cp = sub.add_parser("cp", help="copy a starter sweep, job or family to edit (without NAME: list them)")
    cp.add_argument("kind", choices=sorted(STARTERS), help="what to copy")
    cp.add_argument("name", nargs="?", help="the starter's name, e.g. quickstart, cteg_tiny, facelab-nearest")
    cp.add_argument("dest", nargs="?", help="where to (default: sweeps/NAME.yaml, jobs/NAME.yaml, ./NAME)")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    cp.set_defaults(fn=cmd_cp)

    fm = sub.add_parser("families", help="list the installed model families (built-in and plug-ins)")
    fm.add_argument("-v", "--verbose", action="store_true", help="also where each comes from and its metrics")
    fm.set_defaults(fn=cmd_families)

    d = sub.add_parser("data", help="build, import and check datasets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    # A writer replaces --out only when it is empty or its own earlier output (what a DVC stage re-run finds).
    force_help = "replace --out even if it is not empty and was not written by this command"
    b = dsub.add_parser("build-emoava", help="write the synthetic EmoAva-format corpus (the DVC stage)")
    b.add_argument("--params", default="params.yaml")
    b.add_argument("--out", default="data/emoava")
    b.add_argument("--force", action="store_true", help=force_help)
    bk = dsub.add_parser("build-keyframeface", help="write the synthetic KeyframeFace-format corpus (the DVC stage)")
    bk.add_argument("--params", default="params.yaml")
    bk.add_argument("--out", default="data/keyframeface")
    bk.add_argument("--force", action="store_true", help=force_help)
    from facelab.families import registry

    for fam in registry.families().values():  # families add data commands of their own
        hook = fam.hook("add_cli")
        if hook is not None:
            hook(dsub)
    ik = dsub.add_parser("import-keyframeface", help="import release chat JSONL (requests + answers)")
    ik.add_argument("requests", help="example.jsonl-style requests")
    ik.add_argument("results", help="example_result.jsonl-style answers")
    ik.add_argument("--annotation", default="original", choices=["original", "arkit", "image"])
    ik.add_argument("--split", default="test", choices=["train", "val", "test"])
    ik.add_argument("--out", default="data/keyframeface-release")
    ik.add_argument("--force", action="store_true", help=force_help)
    i = dsub.add_parser("import-emoava", help="import the EmoAva release pickles (safe unpickler)")
    i.add_argument("release_dir")
    i.add_argument("--out", default="data/emoava")
    i.add_argument("--force", action="store_true", help=force_help)
    bl = dsub.add_parser(
        "build-lm-listener", help="write the synthetic LM-Listener-format corpus and import it (the DVC stage)"
    )
    bl.add_argument("--params", default="params.yaml")
    bl.add_argument("--out", default="data/lm_listener")
    bl.add_argument("--release-out", default=None, help="where the release-format files go (default: OUT_release)")
    bl.add_argument("--force", action="store_true", help=force_help)
    il = dsub.add_parser(
        "import-lm-listener", help="import an LM-Listener release directory (segments_{train,val}.pth; safe loader)"
    )
    il.add_argument("release_dir")
    il.add_argument("--out", default="data/lm_listener")
    il.add_argument("--force", action="store_true", help=force_help)
    v = dsub.add_parser("validate", help="validate a dataset directory and print its summary")
    v.add_argument("path")
    de = dsub.add_parser("describe", help="statistics and the KeyframeFace paper's Figures 8-11 of a dataset")
    de.add_argument("path", help="a KeyframeFace-format dataset directory (built or imported)")
    de.add_argument("--out", required=True, help="directory for summary.json, summary.md and the figures")
    de.add_argument("--force", action="store_true", help=force_help)
    d.set_defaults(fn=cmd_data)

    ex = sub.add_parser("export", help="keyframes → a 60 Hz Live Link Face animation CSV (interpolated)")
    ex.add_argument("input", help="a /v1/keyframes JSON answer (.json) or a keyframe CSV")
    ex.add_argument("--out", required=True)
    ex.add_argument("--fps", type=float, default=60.0)
    ex.add_argument("--spacing", type=float, default=1.0, help="seconds between consecutive keyframes")
    ex.set_defaults(fn=cmd_export)

    rk = sub.add_parser("request-keyframes", help="send one keyframe request to a running server")
    rk.add_argument("--background", required=True)
    rk.add_argument("--emotion", required=True)
    rk.add_argument("--keyframe", action="append", required=True, help="a keyframe description (repeat, in order)")
    rk.add_argument("--url", default="http://127.0.0.1:8000")
    rk.add_argument("--csv", default=None, metavar="PATH", help="ask for the Live Link Face CSV and write it here")
    rk.add_argument(
        "--model",
        default=None,
        metavar="NAME",
        help="an adapter of a group (serve --model A+B): sent as the X-Facelab-Model header to --url, the "
        "group's route (e.g. http://127.0.0.1:8000/models/A)",
    )
    rk.add_argument(
        "--wait",
        type=float,
        default=10,
        help="seconds to wait for a healthy /healthz (default 10; a server that is still starting needs more, "
        "e.g. 180)",
    )
    rk.set_defaults(fn=cmd_request_keyframes)

    cm = sub.add_parser(
        "completion",
        help="print a shell completion script",
        description="Completion for commands, options, choices and files. "
        'Add to ~/.bashrc: eval "$(facelab completion bash)"   (zsh: eval "$(facelab completion zsh)")',
    )
    cm.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    cm.set_defaults(fn=lambda args: cmd_completion(args, p))
    return p


def cmd_completion(args, parser: argparse.ArgumentParser) -> int:
    from facelab.completion import script

    print(script(parser, args.shell), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere, not only before the subcommand
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    args.debug = args.debug or debug
    if args.verbosity:  # read by the sweep driver (and inherited by the processes it starts)
        os.environ["FACELAB_VERBOSITY"] = str(max(-1, min(2, args.verbosity)))
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except Exception as exc:  # noqa: BLE001 - user errors become one paragraph, the rest re-raise
        if args.debug or not isinstance(exc, _user_errors()):
            raise
        print(f"facelab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
