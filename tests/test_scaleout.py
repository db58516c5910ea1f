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

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
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
        "print(json.dumps([{'id': n['NodeID'], 'resources': n['Resources']} for n in ray.nodes() if n['Alive']]))"
        % address
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


@pytest.fixture(scope="module")
def cluster(project):
    """A head node (GCS, dashboard + Jobs API) and a second node, each its own `ray start` process."""
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
            f"--num-cpus={NODE_CPUS}",
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
                env,
                project,
                log,
            )
        )
        c.pgids.append(_ray_start([f"--address={c.address}", *node_args(1)], env, project, log))
        deadline = time.time() + 120
        nodes: list[dict] = []
        while time.time() < deadline:
            nodes = _alive_nodes(c.address, env)
            if len(nodes) == 2:
                break
            time.sleep(2)
        assert len(nodes) == 2, f"expected 2 alive nodes, got {nodes}\n{c.logs()}"
        c.node_ids = [n["id"] for n in nodes]
        yield c
    finally:
        _teardown(c)


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
