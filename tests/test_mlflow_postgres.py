"""A real MLflow tracking server on PostgreSQL with a server-side artifact store (``--serve-artifacts``):
a sweep logs to it over HTTP, ``facelab promote`` registers from it and ``facelab serve`` loads the
champion from it — the deployment shape of infra/mlflow, minus the containers.

PostgreSQL comes from the distribution's packages (``.ci/run`` installs them when missing); without
it the test is skipped, saying so."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, env_for, facelab, free_port

pytestmark = pytest.mark.slow

FAST = [
    "train.epochs=1",
    "train.max_steps_per_epoch=4",
    "train.max_val_batches=1",
    "data.train_subset=64",
    "data.dev_subset=16",
    "data.max_frames=32",
]


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    raise AssertionError(f"{url} did not come up:\n" + log.read_text()[-3000:])


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL is not installed (.ci/run installs the distribution's package)")
    pytest.importorskip("psycopg2", reason="psycopg2 (the dev extra) is needed for a PostgreSQL backend store")
    # initdb refuses to run as root: run the server as the package's `postgres` user then.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    d = Path(tempfile.mkdtemp(prefix="facelab-pg-"))
    os.chmod(d, 0o755)
    if as_user:
        shutil.chown(d, "postgres", "postgres")
    data, port = d / "data", free_port()
    subprocess.run(
        as_user + [initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    subprocess.run(
        as_user
        + [
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(d / "pg.log"),
            "-w",
            "-t",
            "60",
            "start",
            "-o",
            f"-p {port} -k {d} -c listen_addresses=127.0.0.1",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_user + [pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def server(postgres, tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-pg")
    port = free_port()
    log = d / "server.log"
    proc = subprocess.Popen(
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
            postgres,
            "--serve-artifacts",
            "--artifacts-destination",
            str(d / "artifacts"),
        ],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=d,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(url + "/health", proc, log)
        yield url, d
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_sweep_promote_serve_against_postgres_backed_server(built_project, server):
    from mlflow.tracking import MlflowClient

    url, d = server
    facelab(
        built_project,
        "sweep",
        "sweeps/quickstart.yaml",
        "--set",
        "variants={CTEG: {}}",
        "--set",
        "resources.cpus_per_worker=0.5",
        *[x for s in FAST for x in ("--set", s)],
        "--set",
        "name=pg-quickstart",
        MLFLOW_TRACKING_URI=url,
    )
    c = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = c.get_experiment_by_name("pg-quickstart")
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # the server owns the artifact store
    runs = c.search_runs([exp.experiment_id])
    trials = [r for r in runs if r.data.tags.get("facelab.role") == "trial"]
    assert len(trials) == 1 and trials[0].info.status == "FINISHED"
    assert "val/cppl" in trials[0].data.metrics
    assert list((d / "artifacts").rglob("model.safetensors"))
    assert not (built_project / "mlartifacts" / "pg-quickstart").exists()

    facelab(built_project, "promote", "pg-quickstart", "--model-name", "pg-model", MLFLOW_TRACKING_URI=url)
    assert c.get_model_version_by_alias("pg-model", "champion").run_id == trials[0].info.run_id

    port = free_port()
    log = d / "serve.log"
    srv = subprocess.Popen(
        [str(BIN / "facelab"), "serve", "--model", "pg-model", "--port", str(port)],
        cwd=built_project,
        env=env_for(built_project, MLFLOW_TRACKING_URI=url),
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", srv, log, timeout=240)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/expressions",
            data=json.dumps({"text": "hello there", "max_frames": 16, "seed": 0}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            out = json.loads(r.read())
        assert out["model"]["name"] == "pg-model" and len(out["sequences"][0]["frames"][0]) == 53
    finally:
        srv.send_signal(signal.SIGTERM)
        try:
            srv.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(srv.pid, signal.SIGKILL)
