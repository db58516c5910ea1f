"""Faults caused for real (issue 6): a Train worker SIGKILLed mid-run, the sweep driver SIGKILLed
mid-sweep, the newest checkpoint truncated, the MLflow tracking server killed mid-run.

Every process these tests start runs in its own session (``start_new_session=True``); a
:class:`Procs` tracker remembers the whole process tree of each CLI it started (the CLI's local Ray
cluster included) and kills only those processes at the end. Nothing here touches any other Ray
instance on the machine (no ``ray stop``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, TINY_PARAMS, dvc_repro, env_for, free_port, make_project

EPOCHS = 3
STEPS = 240
# 1,200 training pairs / batch 4 → up to 300 steps; 240 steps make an epoch last several seconds on
# a 2-core CPU (length-bucketed batches are fast): long enough for Ray Train's controller (it polls
# its workers every 2 s) to register a reported checkpoint and still land a kill inside the next
# epoch. The rest is kept small.
FAST = [
    f"train.epochs={EPOCHS}",
    f"train.max_steps_per_epoch={STEPS}",
    "optim.batch_size=4",
    "train.max_val_batches=1",
    "data.train_subset=1200",
    "data.dev_subset=16",
    "data.max_frames=32",
    "eval.enabled=false",
]
SWEEP = "sweeps/faults.yaml"
TWO = "sweeps/faults_two.yaml"
WAIT = 420  # seconds a CLI run may take on a busy 2-core machine


def sets(*extra: str) -> list[str]:
    return [x for s in FAST + list(extra) for x in ("--set", s)]


# ------------------------------------------------------------------------------------------------
# Processes: start in their own session, remember every descendant, kill only those
# ------------------------------------------------------------------------------------------------


class Procs:
    def __init__(self):
        self.started: list[subprocess.Popen] = []
        self.seen: dict[int, float] = {}  # pid → create_time of every descendant ever observed

    def start(self, cmd: list[str], cwd: Path, env: dict, log: Path) -> subprocess.Popen:
        f = open(log, "w")
        p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        p.log = log  # type: ignore[attr-defined]
        self.started.append(p)
        return p

    def tree(self, p: subprocess.Popen) -> list:
        import psutil

        try:
            kids = psutil.Process(p.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for k in kids:
            try:
                self.seen[k.pid] = k.create_time()
            except psutil.NoSuchProcess:
                pass
        return kids

    def train_workers(self, p: subprocess.Popen) -> list:
        """Ray Train worker processes of *this* CLI's Ray cluster (descendants of its pid)."""
        import psutil

        out = []
        for k in self.tree(p):
            try:
                if "RayTrainWorker" in " ".join(k.cmdline()):
                    out.append(k)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return out

    def kill_leftovers(self, grace: float = 30) -> int:
        """SIGKILL what is left of the trees we started (matching pid + create_time); returns how many."""
        import psutil

        deadline = time.time() + grace
        alive = []
        while True:
            alive = []
            for pid, ct in self.seen.items():
                try:
                    q = psutil.Process(pid)
                    if q.create_time() == ct and q.status() != psutil.STATUS_ZOMBIE:
                        alive.append(q)
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.time() > deadline:
                break
            time.sleep(1)
        for q in alive:
            try:
                q.kill()
            except psutil.NoSuchProcess:
                pass
        return len(alive)

    def close(self) -> None:
        for p in self.started:
            if p.poll() is None:
                self.tree(p)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=30)
        self.kill_leftovers(grace=0)


def wait_exit(procs: Procs, p: subprocess.Popen, timeout: float = WAIT) -> int:
    deadline = time.time() + timeout
    while p.poll() is None:
        if time.time() > deadline:
            raise AssertionError(f"{p.args} still running after {timeout}s:\n{tail(p)}")
        procs.tree(p)
        time.sleep(1)
    return p.returncode


def tail(p: subprocess.Popen, n: int = 6000) -> str:
    return Path(p.log).read_text(errors="replace")[-n:]  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------------------------
# MLflow views
# ------------------------------------------------------------------------------------------------


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def sqlite_uri(project: Path) -> str:
    return f"sqlite:///{project / 'mlruns.db'}"


def runs(c, experiment: str, role: str | None = None) -> list:
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out = c.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in out if role is None or r.data.tags.get("facelab.role") == role]


def epochs(c, run_id: str, key: str = "val/loss") -> list[int]:
    return sorted(int(m.step) for m in c.get_metric_history(run_id, key))


def last(c, run_id: str, key: str) -> float:
    hist = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return hist[-1].value


def poll(fn, what: str, procs: Procs, p: subprocess.Popen | None, timeout: float = WAIT, every: float = 0.2):
    """Call ``fn`` until it returns something truthy; store errors (sqlite locked, server down) are retried."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if p is not None:
            if p.poll() is not None:
                raise AssertionError(f"{what}: the CLI exited ({p.returncode}) first:\n{tail(p)}")
            procs.tree(p)
        try:
            got = fn()
        except Exception:  # noqa: BLE001 - a busy or unreachable store: try again
            got = None
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{tail(p)}" if p is not None else ""))


def trial_with_epoch(c, experiment: str, epoch: int):
    """The trial run that has ``val/loss`` logged at ``epoch``."""
    for r in runs(c, experiment, "trial"):
        if epoch in epochs(c, r.info.run_id):
            return r
    return None


def train_dir(project: Path, sweep: str, trial_key: str) -> Path:
    base = project / "ray_results" / sweep
    return base / (base / "LATEST").read_text().strip() / "train" / trial_key


def registered_epoch(project: Path, sweep: str, trial_key: str) -> int | None:
    """The epoch of the newest checkpoint Ray Train's controller has registered (what a restarted
    worker group resumes from); a reported checkpoint is registered at the controller's next poll."""
    f = train_dir(project, sweep, trial_key) / "checkpoint_manager_snapshot.json"
    if not f.is_file():
        return None
    latest = json.loads(f.read_text()).get("latest_checkpoint_result") or {}
    epoch = (latest.get("metrics") or {}).get("epoch")
    return None if epoch is None else int(epoch)


def checkpoints(project: Path, sweep: str, trial_key: str) -> list[tuple[int, Path]]:
    """(epoch, dir) of every checkpoint a trial has on disk, oldest first."""
    d = train_dir(project, sweep, trial_key)
    out = []
    for ck in d.glob("checkpoint_*"):
        meta = ck / "meta.json"
        if meta.is_file():
            out.append((json.loads(meta.read_text())["epoch"], ck))
    return sorted(out)


# ------------------------------------------------------------------------------------------------
# Fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project of its own (git + DVC + the EmoAva stage built by `dvc repro`), one- and two-variant sweeps."""
    p = make_project(
        tmp_path_factory.mktemp("faults"), {**TINY_PARAMS, "emoava": {**TINY_PARAMS["emoava"], "n_train": 1200}}
    )
    dvc_repro(p, "emoava")
    common = (
        "job: jobs/cteg_tiny.yaml\nmetric: {name: val/loss, goal: minimize}\nmethod: grid\nseeds: [0]\n"
        "resources: {num_workers: 1, gpus_per_worker: 0, cpus_per_worker: 0.5}\nmax_concurrent_trials: 1\n"
    )
    (p / SWEEP).write_text("name: faults\nvariants: {CTEG: {}}\n" + common)
    (p / TWO).write_text("name: faults-two\nvariants: {CTEG: {}, w.o. EwA: {model.ewa: false}}\n" + common)
    return p


@pytest.fixture
def procs():
    pr = Procs()
    yield pr
    pr.close()


def facelab_bg(procs: Procs, project: Path, name: str, *args: str, **env: str) -> subprocess.Popen:
    return procs.start([str(BIN / "facelab"), *args], project, env_for(project, **env), project / f"{name}.log")


# ------------------------------------------------------------------------------------------------
# 3 (unit level): a truncated or deleted checkpoint file is refused, naming the file
# ------------------------------------------------------------------------------------------------


def _tiny_checkpoint(d: Path) -> tuple[Path, "object"]:
    import torch

    from facelab.core import checkpoint as ckpt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    ckpt.save(
        d,
        model,
        {"kind": "cteg"},
        keep_encoder=True,
        train_state={"optimizer": opt.state_dict()},
        meta={"epoch": 1, "step": 10, "history": [{"epoch": 0}, {"epoch": 1}]},
    )
    return d, model


def _truncate(f: Path, keep: float = 0.5) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])


def test_truncated_or_deleted_checkpoint_files_are_refused_naming_the_file(tmp_path):
    import torch

    from facelab.core import checkpoint as ckpt

    d, model = _tiny_checkpoint(tmp_path / "ck")
    ckpt.load_into(model, d)  # intact: loads
    assert ckpt.load_train_state(d)["optimizer"]["state"]

    _truncate(d / ckpt.MODEL_FILE)
    with pytest.raises(ckpt.CheckpointError, match=str(d / ckpt.MODEL_FILE)):
        ckpt.load_into(model, d)
    (d / ckpt.MODEL_FILE).write_bytes(b"")
    with pytest.raises(ckpt.CheckpointError, match="model.safetensors"):
        ckpt.load_weights(d)
    (d / ckpt.MODEL_FILE).unlink()
    with pytest.raises(ckpt.CheckpointError, match=f"{d / ckpt.MODEL_FILE}: missing"):
        ckpt.load_into(model, d)

    _truncate(d / ckpt.STATE_FILE)
    with pytest.raises(ckpt.CheckpointError, match=str(d / ckpt.STATE_FILE)):
        ckpt.load_train_state(d)

    _truncate(d / ckpt.META_FILE)
    with pytest.raises(ckpt.CheckpointError, match=str(d / ckpt.META_FILE)):
        ckpt.load_meta(d)
    _truncate(d / ckpt.CONFIG_FILE)
    with pytest.raises(ckpt.CheckpointError, match=str(d / ckpt.CONFIG_FILE)):
        ckpt.load_config(d)

    # A checkpoint whose weights do not fit the model is refused too (never half-loaded).
    d2, _ = _tiny_checkpoint(tmp_path / "ck2")
    other = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 4))
    with pytest.raises(ckpt.CheckpointError, match="does not fit the model"):
        ckpt.load_into(other, d2)


# ------------------------------------------------------------------------------------------------
# 1: a Ray Train worker SIGKILLed mid-run
# ------------------------------------------------------------------------------------------------


def _when_checkpoint_registered(c, project: Path, experiment: str, after_epoch: int, run=None):
    """The trial run, once its newest logged epoch (>= ``after_epoch``, not the last) has a checkpoint
    the Train controller registered: the point where a restart must resume from that epoch."""
    runs_ = [run] if run is not None else runs(c, experiment, "trial")
    for r in runs_:
        logged = epochs(c, r.info.run_id)
        if not logged or logged[-1] < after_epoch or logged[-1] >= EPOCHS - 1:
            continue
        if registered_epoch(project, experiment, r.data.tags["facelab.trial_key"]) == logged[-1]:
            return r
    return None


def _kill_train_worker(procs: Procs, c, p: subprocess.Popen, project: Path, experiment: str, after_epoch: int) -> dict:
    """Wait until ``after_epoch`` is on record and its checkpoint registered, then SIGKILL this CLI's
    RayTrainWorker process (mid-way through the next epoch)."""
    run = poll(
        lambda: _when_checkpoint_registered(c, project, experiment, after_epoch),
        f"epoch {after_epoch} of {experiment} logged and checkpointed",
        procs,
        p,
    )
    workers = poll(lambda: procs.train_workers(p), "the RayTrainWorker process", procs, p, timeout=60, every=0.05)
    assert len(workers) == 1, [w.cmdline() for w in workers]
    w = workers[0]
    w.send_signal(signal.SIGKILL)
    w.wait(timeout=30)
    logged = epochs(c, run.info.run_id)
    registered = registered_epoch(project, experiment, run.data.tags["facelab.trial_key"])
    return {"run_id": run.info.run_id, "worker_pid": w.pid, "epochs_at_kill": logged, "registered": registered}


@pytest.mark.slow
def test_train_worker_sigkill_resumes_from_checkpoint_and_matches_an_undisturbed_run(project, procs):
    c = client(sqlite_uri(project))
    # The undisturbed reference run and the disturbed one run side by side (separate local Rays).
    base = facelab_bg(procs, project, "w-base", "sweep", SWEEP, *sets("name=w-base", "train.max_failures=1"))
    hit = facelab_bg(procs, project, "w-kill", "sweep", SWEEP, *sets("name=w-kill", "train.max_failures=1"))
    kill = _kill_train_worker(procs, c, hit, project, "w-kill", after_epoch=0)
    assert kill["epochs_at_kill"][-1] < EPOCHS - 1, f"killed too late to be mid-run: {kill}"

    assert wait_exit(procs, hit) == 0, tail(hit)
    assert wait_exit(procs, base) == 0, tail(base)
    assert "FINISHED" in tail(hit)

    children = runs(c, "w-kill", "trial")
    assert len(children) == 1, "a restarted worker group logs into the same MLflow run"
    r = children[0]
    assert r.info.status == "FINISHED" and r.info.run_id == kill["run_id"]
    assert epochs(c, r.info.run_id) == list(range(EPOCHS)), "one val/loss value per epoch, none twice"
    assert epochs(c, r.info.run_id, "train/loss") == list(range(EPOCHS))

    ref = runs(c, "w-base", "trial")[0]
    assert epochs(c, ref.info.run_id) == list(range(EPOCHS))
    # Same seed, resumed from epoch 0's checkpoint (weights, optimizer, schedule, per-epoch RNG):
    # the same step count and the same final metrics as the undisturbed run.
    assert r.data.metrics["step"] == ref.data.metrics["step"] == EPOCHS * STEPS
    for key in ("val/loss", "val/cppl", "train/loss", "lr"):
        assert last(c, r.info.run_id, key) == pytest.approx(last(c, ref.info.run_id, key), rel=1e-5), key
    # and every epoch of the history, not only the last one
    hist_r = {m.step: m.value for m in c.get_metric_history(r.info.run_id, "val/loss")}
    hist_b = {m.step: m.value for m in c.get_metric_history(ref.info.run_id, "val/loss")}
    assert hist_r == pytest.approx(hist_b, rel=1e-5)
    assert "checkpoint/model.safetensors" in {a.path for a in c.list_artifacts(r.info.run_id, "checkpoint")}
    print(
        f"\n[worker kill] killed pid {kill['worker_pid']} with epochs {kill['epochs_at_kill']} on record "
        f"(registered checkpoint: epoch {kill['registered']}); "
        f"final val/loss {hist_r[EPOCHS - 1]:.6f} vs undisturbed {hist_b[EPOCHS - 1]:.6f}"
    )


@pytest.fixture(scope="module")
def failed_trial(project):
    """A trial with ``max_failures=0`` whose worker is SIGKILLed after two epochs were checkpointed."""
    procs = Procs()
    try:
        c = client(sqlite_uri(project))
        p = facelab_bg(procs, project, "w-fail", "sweep", SWEEP, *sets("name=w-fail", "train.max_failures=0"))
        kill = _kill_train_worker(procs, c, p, project, "w-fail", after_epoch=1)
        rc = wait_exit(procs, p)
        yield {"rc": rc, "out": tail(p), **kill}
    finally:
        procs.close()


@pytest.mark.slow
def test_train_worker_sigkill_past_the_failure_budget_fails_with_cause_and_keeps_checkpoints(project, failed_trial):
    c = client(sqlite_uri(project))
    assert failed_trial["rc"] == 1, failed_trial["out"]
    assert failed_trial["epochs_at_kill"][-1] < EPOCHS - 1
    children = runs(c, "w-fail", "trial")
    assert len(children) == 1
    r = children[0]
    assert r.info.status == "FAILED"
    err = r.data.tags.get("facelab.error", "")
    assert err and err != "unknown", err
    assert "WorkerGroupError" in err, err  # the cause: the worker group lost its (killed) worker
    # Nothing logged after the kill, nothing lost before it.
    assert epochs(c, r.info.run_id) == failed_trial["epochs_at_kill"]
    parent = runs(c, "w-fail", "sweep")
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    # The checkpoints stay on disk, complete.
    cks = checkpoints(project, "w-fail", r.data.tags["facelab.trial_key"])
    assert [e for e, _ in cks] == failed_trial["epochs_at_kill"][-2:]
    for _, d in cks:
        assert {f.name for f in d.iterdir()} >= {"model.safetensors", "config.json", "train_state.pt", "meta.json"}
    print(f"\n[worker kill, max_failures=0] facelab.error = {err[:300]!r}; checkpoints kept: {[e for e, _ in cks]}")


# ------------------------------------------------------------------------------------------------
# 3 (end to end): the newest checkpoint truncated, then --resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_truncated_newest_checkpoint_never_silently_restarts_from_scratch(project, failed_trial, procs):
    c = client(sqlite_uri(project))
    r = runs(c, "w-fail", "trial")[0]
    cks = checkpoints(project, "w-fail", r.data.tags["facelab.trial_key"])
    assert len(cks) >= 2, cks
    newest = cks[-1][1] / "model.safetensors"
    _truncate(newest)
    before = epochs(c, r.info.run_id)

    p = facelab_bg(
        procs, project, "w-fail-resume", "sweep", SWEEP, "--resume", *sets("name=w-fail", "train.max_failures=0")
    )
    rc = wait_exit(procs, p)
    children = runs(c, "w-fail", "trial")
    assert len(children) == 1, "resume reopens the trial's run, never a second one"
    r = children[0]
    hist = epochs(c, r.info.run_id)
    assert len(hist) == len(set(hist)), f"an epoch logged twice (restarted from scratch?): {hist}"
    if rc == 0:  # resumed from the previous valid checkpoint
        assert r.info.status == "FINISHED" and hist == list(range(EPOCHS))
        outcome = "resumed from the previous valid checkpoint"
    else:  # refused, naming the file
        assert r.info.status == "FAILED", tail(p)
        err = r.data.tags.get("facelab.error", "")
        assert "CheckpointError" in err and str(newest) in err, err
        assert hist == before, f"nothing may be trained from scratch: {before} → {hist}"
        outcome = f"FAILED: {err[:300]!r}"
    assert r.info.status != "RUNNING"
    print(f"\n[truncated checkpoint] rc={rc}; epochs on record {hist}; {outcome}")


# ------------------------------------------------------------------------------------------------
# 2: the sweep driver SIGKILLed mid-sweep, then --resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sweep_driver_sigkill_then_resume_continues_without_rerunning_or_duplicating(project, procs):
    c = client(sqlite_uri(project))
    name = "d-kill"
    p = facelab_bg(procs, project, name, "sweep", TWO, *sets(f"name={name}"))
    first = poll(
        lambda: next((r for r in runs(c, name, "trial") if r.info.status == "FINISHED"), None),
        "the first trial to finish",
        procs,
        p,
    )
    second = poll(
        lambda: next(
            (
                x
                for r in runs(c, name, "trial")
                if r.info.run_id != first.info.run_id
                for x in [_when_checkpoint_registered(c, project, name, 0, run=r)]
                if x
            ),
            None,
        ),
        "the second trial's epoch 0, logged and checkpointed",
        procs,
        p,
    )
    procs.tree(p)
    os.kill(p.pid, signal.SIGKILL)  # the driver only: its local Ray is left to notice on its own
    p.wait(timeout=30)
    leftovers = procs.kill_leftovers(grace=30)  # what Ray did not clean up within 30 s (then killed)

    left = {r.info.run_id: r.info.status for r in runs(c, name)}
    second_epochs = epochs(c, second.info.run_id)
    assert left[second.info.run_id] == "RUNNING"  # the dead driver could not close it
    first_hist = {m.step: m.value for m in c.get_metric_history(first.info.run_id, "val/loss")}

    resumed = facelab_bg(procs, project, name + "-resume", "sweep", TWO, "--resume", *sets(f"name={name}"))
    assert wait_exit(procs, resumed) == 0, tail(resumed)

    children = runs(c, name, "trial")
    keys = [r.data.tags["facelab.trial_key"] for r in children]
    assert len(children) == 2 and len(set(keys)) == 2, f"one run per trial key: {keys}"
    assert {r.info.run_id for r in children} == {first.info.run_id, second.info.run_id}
    again = next(r for r in children if r.info.run_id == first.info.run_id)
    # the finished trial was not re-run
    assert (again.info.start_time, again.info.end_time) == (first.info.start_time, first.info.end_time)
    assert {m.step: m.value for m in c.get_metric_history(first.info.run_id, "val/loss")} == first_hist
    assert again.data.metrics == first.data.metrics
    for r in children:
        assert r.info.status == "FINISHED"
        assert epochs(c, r.info.run_id) == list(range(EPOCHS)), "every epoch exactly once"
    parents = runs(c, name, "sweep")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert not [r for r in runs(c, name) if r.info.status == "RUNNING"]
    print(
        f"\n[driver kill] second trial had epochs {second_epochs} at the kill; runs left {left}; "
        f"{leftovers} Ray process(es) outlived the driver by 30 s"
    )


# ------------------------------------------------------------------------------------------------
# 4: the MLflow tracking server killed mid-run, restarted on the same port and backend
# ------------------------------------------------------------------------------------------------


def _start_server(procs: Procs, d: Path, port: int, log: str) -> subprocess.Popen:
    s = procs.start(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{d / 'server.db'}",
            "--artifacts-destination",
            str(d / "artifacts"),
        ],
        d,
        dict(os.environ),
        d / log,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200

    poll(healthy, "the MLflow server", procs, s, timeout=180, every=0.3)
    return s


@pytest.mark.slow
def test_tracking_server_killed_mid_run_then_back_loses_no_epoch(project, procs, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_server(procs, tmp_path, port, "server1.log")
    c = client(url)
    name = "m-kill"
    p = facelab_bg(
        procs, project, name, "sweep", SWEEP, *sets(f"name={name}", "train.max_failures=1"), MLFLOW_TRACKING_URI=url
    )
    run = poll(lambda: trial_with_epoch(c, name, 0), "epoch 0 on the server", procs, p)
    procs.tree(server)
    os.killpg(server.pid, signal.SIGKILL)  # the server and its workers, at once
    server.wait(timeout=30)
    t_down = time.time()
    server2 = _start_server(procs, tmp_path, port, "server2.log")  # same port, same backend store
    downtime = time.time() - t_down

    rc = wait_exit(procs, p)
    out = tail(p)
    r = c.get_run(run.info.run_id)
    hist = epochs(c, r.info.run_id)
    assert len(runs(c, name, "trial")) == 1
    assert len(hist) == len(set(hist)), f"an epoch logged twice: {hist}"
    if rc == 0:
        assert r.info.status == "FINISHED"
        assert hist == list(range(EPOCHS)), f"FINISHED with missing epochs: {hist}"
        assert epochs(c, r.info.run_id, "train/loss") == list(range(EPOCHS))
        outcome = "FINISHED with every epoch"
    else:  # failing loudly is acceptable; finishing with holes is not
        assert r.info.status in ("FAILED", "RUNNING"), r.info.status
        assert url in out or str(port) in out or r.data.tags.get("facelab.error"), out
        outcome = f"failed loudly (rc={rc})"
    assert server2.poll() is None
    print(f"\n[tracking server kill] down {downtime:.1f}s; rc={rc}; epochs on record {hist}; {outcome}")
