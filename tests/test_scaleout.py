"""Scale-out, proven on one machine (infra/README.md, steps 2 and 3):

- a DVC remote: `dvc push`, a fresh `git clone` + `dvc pull` gets the exact data by hash, and the
  lineage check refuses a modified copy;
- a two-node Ray cluster on loopback (two `ray start` processes, token auth on) on which a
  2-worker DDP trial runs with one worker per node, submitted with `--address`;
- the same sweep submitted with `ray job submit`, shipping the working directory.

The cluster uses its own temp dir and ports and is torn down by killing only the processes it
started (never `ray stop`, which would stop every Ray instance of this user on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from conftest import BIN, dvc_repro, env_for, facelab, make_project
from test_e2e import FAST, runs_of, store

pytestmark = pytest.mark.slow

# Each node offers 1 CPU; a worker takes 0.99 and the Tune trial function 0.01. Whichever node
# hosts the trial function can then hold only one worker, so the two DDP workers must land on
# different nodes.
NODE_CPUS = 1
WORKER_CPUS = 0.99
DDP = FAST + [
    "variants={CTEG: {}}",
    "resources.num_workers=2",
    f"resources.cpus_per_worker={WORKER_CPUS}",
    "resources.gpus_per_worker=0",
    "max_concurrent_trials=1",
    "optim.batch_size=8",
]


def sets(items: list[str]) -> list[str]:
    return [x for s in items for x in ("--set", s)]


def tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args],
        cwd=project,
        env=env_for(project),
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def dvc(project: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=project, env=env_for(project), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{tail(proc.stdout)}\n{tail(proc.stderr)}"
    return proc


def locked_md5(project: Path, path: str = "data/emoava") -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == path)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A committed project whose data is built, locked and pushed to a directory DVC remote."""
    root = tmp_path_factory.mktemp("scaleout")
    p = make_project(root / "project")
    dvc_repro(p)
    dvc(p, "remote", "add", "-d", "local", str(root / "dvc-remote"))
    dvc(p, "push")
    git(p, "add", "-A")  # dvc.yaml, dvc.lock, params.yaml, .dvc/config, the sources; data/ is ignored
    git(p, "commit", "-q", "-m", "data pinned and pushed")
    return p


# ------------------------------------------------------------------------------------------------
# DVC remote
# ------------------------------------------------------------------------------------------------


def test_fresh_clone_pulls_the_locked_data_from_the_remote(project, tmp_path, monkeypatch):
    from facelab.core.lineage import DataLineageError, lock_entry, verify_data

    assert git(project, "status", "--porcelain").strip() == "", "the project must be fully committed"
    clone = tmp_path / "clone"
    subprocess.run(
        ["git", "clone", "-q", str(project), str(clone)],
        check=True,
        capture_output=True,
        text=True,
        env=env_for(project),
    )
    assert not (clone / "data").exists(), "data must come from the DVC remote, not from git"
    dvc(clone, "pull")

    monkeypatch.chdir(clone)  # DVC resolves the target against the working directory, as `facelab` runs
    entry = verify_data(clone, "data/emoava")
    assert entry.md5 == locked_md5(project) == lock_entry(project, "data/emoava").md5
    originals = sorted(f.relative_to(project) for f in (project / "data" / "emoava").rglob("*") if f.is_file())
    pulled = sorted(f.relative_to(clone) for f in (clone / "data" / "emoava").rglob("*") if f.is_file())
    assert pulled == originals
    assert all((clone / f).read_bytes() == (project / f).read_bytes() for f in originals)

    f = clone / "data" / "emoava" / "dev.texts.json"
    f.chmod(0o644)  # DVC may link read-only files from its cache
    f.write_bytes(f.read_bytes() + b" ")
    with pytest.raises(DataLineageError, match="dvc checkout"):
        verify_data(clone, "data/emoava")
    dvc(clone, "checkout", "--force", "data/emoava")
    assert verify_data(clone, "data/emoava").md5 == entry.md5


# ------------------------------------------------------------------------------------------------
# A two-node Ray cluster on loopback
# ------------------------------------------------------------------------------------------------


def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports (held open together so none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_range(size: int, taken: set[int]) -> tuple[int, int]:
    """A block of ``size`` free ports below the ephemeral range (where Ray puts worker ports too)."""
    for _ in range(200):
        lo = random.randrange(20000, 30000 - size)
        block = range(lo, lo + size)
        if taken.intersection(block):
            continue
        try:
            socks = []
            for port in block:
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        taken.update(block)
        return lo, lo + size - 1
    raise RuntimeError("no free block of worker ports")


@dataclass
class Cluster:
    address: str  # GCS address, for --address / RAY_ADDRESS
    dashboard: str  # Jobs API, for `ray job submit --address`
    temp_dir: Path
    env: dict[str, str]  # what a client needs: token auth + the cluster's settings
    node_ids: list[str] = field(default_factory=list)
    node_ips: list[str] = field(default_factory=list)
    pgids: list[int] = field(default_factory=list)

    def logs(self, n: int = 3000) -> str:
        """The tail of the Ray processes' error logs (raylets, GCS, dashboard, workers)."""
        out = []
        for f in sorted(self.temp_dir.glob("n*/session_*/logs/*")):
            if f.is_file() and f.suffix in (".err", ".log") and f.stat().st_size:
                text = f.read_text(errors="replace")
                if "Error" in text or "error" in text:
                    out.append(f"--- {f.name}\n{text[-800:]}")
        return tail("\n".join(out), n)


def _ray_start(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> int:
    """`ray start ...` in a new session: its daemons keep that process group, which teardown kills."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(BIN / "ray"), "start", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        rc = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        rc = None
    if rc != 0:
        raise RuntimeError(f"ray start {' '.join(args[:2])} failed ({rc}):\n{tail(log.read_text())}")
    return proc.pid


def _alive_nodes(address: str, env: dict[str, str]) -> list[dict]:
    code = (
        "import json, ray; ray.init(address=%r, logging_level='ERROR', log_to_driver=False); "
        "print(json.dumps([{'id': n['NodeID'], 'ip': n['NodeManagerAddress'], 'resources': n['Resources']} "
        "for n in ray.nodes() if n['Alive']]))" % address
    )
    proc = subprocess.run([str(BIN / "python"), "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"cannot list the cluster's nodes:\n{tail(proc.stderr)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _processes_under(temp_dir: Path) -> list[int]:
    """Pids of processes whose command line names the cluster's own temp dir (ours only)."""
    needle = str(temp_dir).encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if needle in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _teardown(c: Cluster) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pgid in c.pgids:
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                pass
        for pid in _processes_under(c.temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + (8 if sig == signal.SIGTERM else 15)
        while time.time() < deadline and _processes_under(c.temp_dir):
            time.sleep(0.5)
    shutil.rmtree(c.temp_dir, ignore_errors=True)


@contextlib.contextmanager
def two_node_cluster(
    project: Path, node_cpus: float = NODE_CPUS, node_env: list[dict[str, str]] | None = None
) -> Iterator[Cluster]:
    """A head node (GCS, dashboard + Jobs API) and a second node, each its own `ray start` process
    offering ``node_cpus`` CPUs and a custom resource ``facelab_node_<i>``; torn down on exit.
    ``node_env``: extra environment of each node (its daemons and workers inherit it)."""
    # A short root: Ray's unix socket paths live under it and must stay under ~100 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="fl-ray-"))
    # Token auth on, with a token of this cluster only (never the user's ~/.ray/auth_token).
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # Set before `ray start`: job drivers and trial workers inherit the node's environment.
    settings = {
        "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlruns.db'}",
        "FACELAB_STORAGE": str(project / "ray_results"),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env = env_for(project, **auth, **settings)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    taken: set[int] = set()
    (gcs, dash, client, *node_ports) = ports = free_ports(3 + 2 * 7)
    taken.update(ports)
    c = Cluster(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", temp_dir=temp_dir, env=env)

    def node_args(i: int) -> list[str]:
        nm, om, agent, agent_grpc, metrics, rt_env, _ = node_ports[7 * i : 7 * i + 7]
        lo, hi = free_port_range(40, taken)
        return [
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={node_cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps({f'facelab_node_{i}': 1})}",
            # One temp dir per node: nodes sharing one would share runtime_resources/, and the
            # second node re-extracting a job's working_dir there pulls it from under the driver.
            f"--temp-dir={temp_dir / f'n{i}'}",
            f"--node-manager-port={nm}",
            f"--object-manager-port={om}",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}",
            f"--runtime-env-agent-port={rt_env}",
            f"--min-worker-port={lo}",
            f"--max-worker-port={hi}",
            f"--object-store-memory={200 * 1024 * 1024}",
            "--disable-usage-stats",
        ]

    log = temp_dir / "ray-start.log"
    extra = node_env or [{}, {}]
    try:
        c.pgids.append(
            _ray_start(
                [
                    "--head",
                    f"--port={gcs}",
                    f"--ray-client-server-port={client}",
                    "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}",
                    *node_args(0),
                ],
                {**env, **extra[0]},
                project,
                log,
            )
        )
        c.pgids.append(_ray_start([f"--address={c.address}", *node_args(1)], {**env, **extra[1]}, project, log))
        deadline = time.time() + 120
        nodes: list[dict] = []
        while time.time() < deadline:
            nodes = _alive_nodes(c.address, env)
            if len(nodes) == 2:
                break
            time.sleep(2)
        assert len(nodes) == 2, f"expected 2 alive nodes, got {nodes}\n{c.logs()}"
        # node_ids[i] is the node started with facelab_node_<i> (0: the head)
        ordered = [next(n for n in nodes if f"facelab_node_{i}" in n["resources"]) for i in range(2)]
        c.node_ids, c.node_ips = [n["id"] for n in ordered], [n["ip"] for n in ordered]
        yield c
    finally:
        _teardown(c)


@pytest.fixture(scope="module")
def cluster(project):
    """The two-node cluster the scale-out tests share."""
    with two_node_cluster(project) as c:
        yield c


def _trial(project: Path, experiment: str):
    c = store(project)
    children = [r for r in runs_of(c, experiment) if r.data.tags.get("facelab.role") == "trial"]
    assert len(children) == 1, [r.data.tags for r in children]
    return children[0]


def test_wrong_token_is_refused(cluster):
    with pytest.raises(RuntimeError, match="(?i)auth|token|unauthenticated"):
        _alive_nodes(cluster.address, {**cluster.env, "RAY_AUTH_TOKEN": secrets.token_hex(32)})


def test_ddp_trial_spans_both_nodes(project, cluster):
    proc = facelab(
        project,
        "sweep",
        "sweeps/quickstart.yaml",
        "--address",
        cluster.address,
        *sets(DDP + ["name=scaleout-ddp"]),
        check=False,
        timeout=600,
        **{k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")},
    )
    assert proc.returncode == 0, f"sweep failed:\n{tail(proc.stdout)}\n{tail(proc.stderr)}\n{cluster.logs()}"
    run = _trial(project, "scaleout-ddp")
    assert run.info.status == "FINISHED"
    nodes = json.loads(run.data.tags["facelab.worker_nodes"])
    assert len(nodes) == 2 and nodes[0] != nodes[1], f"both DDP workers ran on one node: {nodes}"
    assert set(nodes) <= set(cluster.node_ids), (nodes, cluster.node_ids)
    assert [m.step for m in store(project).get_metric_history(run.info.run_id, "val/loss")] == [0, 1]
    # trial state and checkpoints went to the storage both nodes reach
    assert list((project / "ray_results" / "scaleout-ddp").rglob("model.safetensors"))


def test_facelab_submit_ships_the_working_directory(project, cluster):
    # `facelab submit` validates the sweep here, then sends a Ray Job whose working directory is the
    # project without its git-ignored data: the job pulls the data from the DVC remote first. `.git`
    # travels (DVC opens the repository; runs record the git SHA). It returns at once with the job id.
    env = {**cluster.env, "RAY_JOB_ADDRESS": cluster.dashboard}
    t0 = time.time()
    sub = facelab(project, "submit", "sweeps/quickstart.yaml", *sets(DDP + ["name=scaleout-job"]), **env)
    job_id = sub.stdout.strip().splitlines()[-1]
    assert job_id.startswith("raysubmit_") and time.time() - t0 < 60, sub.stdout + sub.stderr
    assert job_id in facelab(project, "status", job_id, **env).stdout
    logs = facelab(project, "logs", job_id, "--follow", check=False, timeout=900, **env)
    assert logs.returncode == 0, f"{tail(logs.stdout + logs.stderr, 8000)}\n{cluster.logs()}"
    assert "SUCCEEDED" in facelab(project, "status", job_id, **env).stdout
    bad = facelab(project, "submit", "sweeps/quickstart.yaml", "--set", "seeds=[]", check=False, **env)
    assert bad.returncode == 2 and "seeds: " in bad.stderr  # refused here: nothing was sent
    run = _trial(project, "scaleout-job")
    assert run.info.status == "FINISHED"
    assert run.data.tags["facelab.data.md5"] == locked_md5(project)
    assert run.data.tags["facelab.git_sha"] == git(project, "rev-parse", "HEAD").strip()
    nodes = json.loads(run.data.tags["facelab.worker_nodes"])
    assert len(set(nodes)) == 2 and set(nodes) <= set(cluster.node_ids), (nodes, cluster.node_ids)


def test_facelab_stop_cancels_a_submitted_sweep(project, cluster):
    env = {**cluster.env, "RAY_JOB_ADDRESS": cluster.dashboard}
    sub = facelab(project, "submit", "sweeps/quickstart.yaml", *sets(["name=scaleout-stop", "train.epochs=50"]), **env)
    job_id = sub.stdout.strip().splitlines()[-1]
    assert "stop requested" in facelab(project, "stop", job_id, **env).stdout
    deadline = time.time() + 120
    while time.time() < deadline:
        state = facelab(project, "status", job_id, **env).stdout
        if "STOPPED" in state:
            break
        time.sleep(2)
    assert "STOPPED" in state, state


# ------------------------------------------------------------------------------------------------
# A lost node: the worker node's raylet and everything it runs killed mid-sweep
# ------------------------------------------------------------------------------------------------

LOST_EPOCHS = 5
# Two trials at once, one worker each: 0.98 CPU per worker + 0.01 per trial driver (both on the
# head), so each 1-CPU node holds exactly one worker and one trial's worker is on the worker node for
# certain. Once that node is gone, the head runs the surviving trial, then the interrupted one.
LOST = FAST + [
    f"train.epochs={LOST_EPOCHS}",
    "data.train_subset=240",
    "train.max_steps_per_epoch=60",  # about a second an epoch: the node dies mid-trial
    "optim.batch_size=4",
    "eval.enabled=false",
    "resources.num_workers=1",
    "resources.cpus_per_worker=0.98",
    "resources.gpus_per_worker=0",
    "max_concurrent_trials=2",
    "train.max_failures=1",  # Ray Train restarts the worker group that lost its node
    # The trials' drivers (trial function + Train controller) stay on the head, as on a cluster
    # whose stable nodes offer a resource the preemptible ones do not.
    "resources.driver_resources={facelab_node_0: 0.01}",
]


def node_processes(c: Cluster, i: int) -> list:
    """Every process of node ``i`` of ``c`` (none of another Ray instance): its `ray start` session
    (raylet, agents, log monitor), whatever names the node's own temp dir, and their descendants
    (the workers its raylet started)."""
    import psutil

    root, needle = c.pgids[i], str(c.temp_dir / f"n{i}")
    found: dict[int, psutil.Process] = {}
    for q in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(q.pid) == root or needle in " ".join(q.info["cmdline"] or []):
                found[q.pid] = q
        except (psutil.Error, OSError):
            pass
    for q in list(found.values()):
        try:
            found.update((k.pid, k) for k in q.children(recursive=True))
        except psutil.Error:
            pass
    found.pop(os.getpid(), None)
    return list(found.values())


def kill_node(c: Cluster, i: int) -> list[str]:
    """SIGKILL node ``i``'s raylet and every process it runs, at once (a node lost, not drained);
    returns the names of what was killed."""
    import psutil

    procs = node_processes(c, i)
    names = []
    for q in procs:
        try:
            names.append(q.name())
            q.kill()
        except psutil.Error:
            pass
    assert "raylet" in names, f"node {i}'s raylet not found among {names}"
    psutil.wait_procs(procs, timeout=30)
    return names


def poll_until(fn, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300, every: float = 0.2):
    """Call ``fn`` until it returns something truthy (a busy store is retried), while ``proc`` (a `facelab` command) runs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what}: {proc.args[1]} exited ({proc.returncode}) first:\n{tail(log.read_text())}")
        try:
            got = fn()
        except Exception:  # noqa: BLE001 - sqlite busy: try again
            got = None
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}:\n{tail(log.read_text())}")


LOST_SWEEP = "scaleout-lost-node"


@pytest.fixture(scope="module")
def lost_node(project, tmp_path_factory) -> dict:
    """A 2-trial sweep on a two-node cluster of its own whose worker node is killed (raylet, agents,
    trial workers) once the trial on it has a checkpoint registered, mid-run. What happened, for the
    assertions (and a finished sweep the serve test promotes)."""
    from test_faults import epochs, registered_epoch

    log = tmp_path_factory.mktemp("lost-node") / "sweep.log"
    with two_node_cluster(project) as lost:
        head, worker = lost.node_ids
        env = env_for(project, **{k: lost.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")})
        c = store(project)
        c.search_experiments(max_results=1)  # the store's tables exist before the sweep opens it too
        t0 = time.time()
        with open(log, "w") as out:
            sweep = subprocess.Popen(
                [str(BIN / "facelab"), "sweep", "sweeps/quickstart.yaml", "--address", lost.address]
                + sets(LOST + [f"name={LOST_SWEEP}"]),
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:

            def victim_checkpointed():
                """The trial on the worker node, mid-run, once Ray Train registered a checkpoint of
                it (what a restarted worker group resumes from): its epochs on record, that epoch."""
                for r in runs_of(c, LOST_SWEEP):
                    tags = r.data.tags
                    if tags.get("facelab.role") != "trial" or tags.get("facelab.worker_nodes") != json.dumps([worker]):
                        continue
                    logged = epochs(c, r.info.run_id)
                    registered = registered_epoch(project, LOST_SWEEP, tags["facelab.trial_key"])
                    if logged and logged[-1] < LOST_EPOCHS - 1 and registered is not None:
                        return r, logged, registered
                return None

            victim, logged, registered = poll_until(
                victim_checkpointed, "a trial on the worker node to checkpoint", sweep, log, every=0.1
            )
            killed = kill_node(lost, 1)
            t_kill = time.time() - t0
            rc = sweep.wait(timeout=420)
        finally:
            if sweep.poll() is None:
                os.killpg(sweep.pid, signal.SIGKILL)
                sweep.wait(timeout=30)
        ray_logs = lost.logs()
    return {
        "rc": rc,
        "out": log.read_text(),
        "ray_logs": ray_logs,
        "head": head,
        "worker": worker,
        "ips": lost.node_ips,
        "victim": victim.info.run_id,
        "logged": logged,
        "registered": registered,
        "killed": killed,
        "t_kill": t_kill,
        "wall": time.time() - t0,
    }


def test_sweep_survives_losing_the_worker_node(project, lost_node):
    """The worker node died while a trial ran on it: the sweep finishes, the interrupted trial resumes
    from its checkpoint on the head node with every epoch logged exactly once, and its run names both
    nodes."""
    ln = lost_node
    head, worker, registered = ln["head"], ln["worker"], ln["registered"]
    assert ln["rc"] == 0, f"sweep failed ({ln['rc']}):\n{tail(ln['out'])}\n{ln['ray_logs']}"
    c = store(project)
    trials = [r for r in runs_of(c, LOST_SWEEP) if r.data.tags.get("facelab.role") == "trial"]
    assert len(trials) == 2 and {r.info.status for r in trials} == {"FINISHED"}, [
        (r.info.status, r.data.tags.get("facelab.error")) for r in trials
    ]
    for r in trials:  # every epoch exactly once: no gap, no duplicate (a resumed run re-logs nothing)
        for key in ("val/loss", "train/loss"):
            steps = sorted(int(m.step) for m in c.get_metric_history(r.info.run_id, key))
            assert steps == list(range(LOST_EPOCHS)), (r.info.run_name, key, steps)
    r = next(t for t in trials if t.info.run_id == ln["victim"])
    tags = r.data.tags
    history = json.loads(tags["facelab.node_history"])
    # It started on the worker node and resumed on the head from the checkpoint it had when the node
    # died (or a newer one Ray Train registered before it noticed), not from epoch 0.
    assert list(history[0]["nodes"]) == [worker] and history[0]["start_epoch"] == 0, history
    assert list(history[-1]["nodes"]) == [head], history
    assert history[-1]["start_epoch"] >= registered + 1 >= 1, (registered, history)
    # each node as Ray knows it: the address it registered with
    assert history[0]["nodes"][worker]["ip"] == ln["ips"][1], (history, ln["ips"])
    assert history[-1]["nodes"][head]["ip"] == ln["ips"][0], (history, ln["ips"])
    assert tags["facelab.nodes"].split(",") == [worker, head]
    assert json.loads(tags["facelab.worker_nodes"]) == [head]  # the last attempt's ranks
    other = next(t for t in trials if t.info.run_id != ln["victim"])
    assert other.data.tags["facelab.nodes"] == head  # the other trial's worker was on the head all along
    print(
        f"\n[lost node] killed {len(ln['killed'])} process(es) of the worker node at {ln['t_kill']:.0f}s, "
        f"epochs {ln['logged']} of '{r.info.run_name}' on record (checkpoint of epoch {registered} registered); "
        f"resumed from epoch {history[-1]['start_epoch']} on the head ({len(history)} attempt(s)); "
        f"sweep done in {ln['wall']:.0f}s"
    )


OK_REQUEST = {"text": "I am so happy to see you!", "num_samples": 1, "max_frames": 16, "seed": 3}


def replicas_by_node(c: Cluster) -> list[int]:
    """How many Serve replica processes each node of ``c`` runs."""
    import psutil

    counts = []
    for i in range(2):
        n = 0
        for q in node_processes(c, i):
            try:
                n += "ServeReplica:" in " ".join(q.cmdline()) and q.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                pass
        counts.append(n)
    return counts


def answered_by_node(c: Cluster, i: int) -> int:
    """Requests the Serve replicas of node ``i`` logged as answered (their access log lines)."""
    lines = 0
    for f in c.temp_dir.glob(f"n{i}/session_*/logs/serve/replica_*.log"):
        lines += sum(" POST " in ln and " 200 " in ln for ln in f.read_text(errors="replace").splitlines())
    return lines


def test_endpoint_keeps_answering_when_a_replica_node_is_lost(project, lost_node, tmp_path):
    """`facelab serve` with two replicas, one on each node; the worker node is killed while clients
    send requests: the endpoint keeps answering, errors (counted) fall only inside the kill window."""
    import httpx

    assert lost_node["rc"] == 0, "needs the lost-node sweep's trials to promote"
    facelab(project, "promote", LOST_SWEEP, "--model-name", "lost-node")
    port, worker_proxy = free_ports(2)
    # Both nodes share one host: the worker node's Serve proxy gets a port of its own (the head's
    # proxy, on `--port`, is the endpoint the clients use). A proxy prefers the replicas of its own
    # node; off, so that the head's proxy sends requests to the worker node's replica too.
    spread = {"RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
    node_env = [spread, {**spread, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(worker_proxy)}]
    with two_node_cluster(project, node_env=node_env) as cl:
        log = tmp_path / "serve.log"
        env = env_for(project, **{k: cl.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
        with open(log, "w") as out:
            server = subprocess.Popen(
                [str(BIN / "facelab"), "serve", "--address", cl.address, "--model", "lost-node"]
                + ["--replicas", "2", "--port", str(port)],
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        base = f"http://127.0.0.1:{port}"
        results: list[tuple[float, float, int | str]] = []  # (start, end, status or exception)
        stop = threading.Event()
        try:

            def healthy_on_both_nodes():
                return replicas_by_node(cl) == [1, 1] and httpx.get(base + "/healthz", timeout=3).status_code == 200

            poll_until(healthy_on_both_nodes, "a replica on each node, healthy", server, log, timeout=300, every=1)

            def client(i: int) -> None:
                with httpx.Client(timeout=60) as http:
                    while not stop.is_set():
                        t0 = time.time()
                        try:
                            st: int | str = http.post(
                                base + "/v1/expressions", json={**OK_REQUEST, "seed": i}
                            ).status_code
                        except httpx.HTTPError as e:
                            st = type(e).__name__
                        results.append((t0, time.time(), st))

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
            for t in threads:
                t.start()
            poll_until(lambda: sum(r[2] == 200 for r in results) >= 20, "answers before the kill", server, log)
            poll_until(lambda: answered_by_node(cl, 1) >= 3, "the worker node's replica answering", server, log)
            t_kill = time.time()
            killed = kill_node(cl, 1)
            lost_answered = answered_by_node(cl, 1)  # what the lost replica had served
            # Keep the load on until 15 s pass without an error (at most 150 s after the kill).
            while time.time() < t_kill + 150:
                bad = [r[1] for r in results if r[2] != 200 and r[1] >= t_kill]
                if time.time() - max(bad, default=t_kill) >= 15:
                    break
                time.sleep(0.5)
            health = httpx.get(base + "/healthz", timeout=10).status_code
        finally:
            stop.set()
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=30)
    t_end = time.time()
    before = [r for r in results if r[1] < t_kill]
    after = [r for r in results if r[0] >= t_kill]
    errors = [r for r in after if r[2] != 200]
    last_error = max((r[1] for r in errors), default=t_kill)
    window = [r for r in after if r[0] <= last_error]
    print(
        f"\n[lost replica node] killed {len(killed)} process(es) of the worker node; {len(before)} requests before "
        f"the kill, all 200: {all(r[2] == 200 for r in before)}; {len(after)} after it, {len(errors)} error(s) "
        f"({sorted({str(r[2]) for r in errors})}), all within {last_error - t_kill:.1f}s of the kill "
        f"({sum(r[2] == 200 for r in window)} answered in that window); "
        f"{sum(r[1] > last_error and r[2] == 200 for r in after)} answered after it; the lost node's replica "
        f"had logged {lost_answered} answer(s)"
    )
    assert before and all(r[2] == 200 for r in before), [r for r in before if r[2] != 200][:5]
    assert lost_answered >= 3  # the lost replica was taking its share of the load
    assert last_error - t_kill < 120, f"errors went on for {last_error - t_kill:.0f}s after the kill"
    served_after = [r for r in after if r[0] > last_error]
    assert len(served_after) >= 10 and all(r[2] == 200 for r in served_after)  # answering again, on the head
    assert t_end - last_error >= 15  # ... for at least 15 s with no error
    assert health == 200
