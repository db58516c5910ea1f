"""MLFLOW_TRACKING_URI switches facelab to a real MLflow tracking server (HTTP, proxied artifacts)."""

from __future__ import annotations

import subprocess
import time
import urllib.request

import pytest

from conftest import BIN, facelab, free_port

pytestmark = pytest.mark.slow

FAST = [
    "train.epochs=1",
    "train.max_steps_per_epoch=4",
    "train.max_val_batches=1",
    "data.train_subset=64",
    "data.dev_subset=16",
    "data.max_frames=32",
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(d / "server.log", "w")
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
            f"sqlite:///{d / 'server.db'}",
            "--artifacts-destination",
            str(d / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=d,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise AssertionError((d / "server.log").read_text()[-3000:])
    else:
        proc.kill()
        raise AssertionError("mlflow server did not start:\n" + (d / "server.log").read_text()[-3000:])
    yield url, d
    proc.terminate()
    proc.wait(timeout=30)


def test_train_and_promote_against_a_tracking_server(built_project, server):
    from mlflow.tracking import MlflowClient

    url, d = server
    facelab(
        built_project,
        "train",
        "jobs/cteg_tiny.yaml",
        "--name",
        "remote",
        "--cpus-per-worker",
        "0.5",
        *[x for s in FAST for x in ("--set", s)],
        MLFLOW_TRACKING_URI=url,
    )
    c = MlflowClient(tracking_uri=url, registry_uri=url)
    exp = c.get_experiment_by_name("remote")
    runs = c.search_runs([exp.experiment_id])
    trial = [r for r in runs if r.data.tags.get("facelab.role") == "trial"]
    assert len(trial) == 1 and trial[0].info.status == "FINISHED"
    assert {a.path for a in c.list_artifacts(trial[0].info.run_id, "checkpoint")} == {
        "checkpoint/model.safetensors",
        "checkpoint/config.json",
    }
    # artifacts went through the server into its own artifact store, not the project directory
    assert list((d / "artifacts").rglob("model.safetensors"))
    assert not (built_project / "mlartifacts" / "remote").exists()
    facelab(built_project, "promote", "remote", "--model-name", "remote-model", MLFLOW_TRACKING_URI=url)
    assert c.get_model_version_by_alias("remote-model", "champion").run_id == trial[0].info.run_id


def test_unreachable_store_fails_fast_naming_the_uri(built_project):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.time()
    proc = facelab(built_project, "sweep", "sweeps/quickstart.yaml", check=False, MLFLOW_TRACKING_URI=url)
    assert proc.returncode == 2
    assert url in proc.stderr and "not reachable" in proc.stderr and "Traceback" not in proc.stderr
    assert time.time() - t0 < 90
