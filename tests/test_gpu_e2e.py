"""The real path on a GPU at small size: `dvc repro` → `facelab sweep` (DVC's data check, Ray Tune + Train with
``resources.gpus_per_worker: 1``) → `facelab promote` → `facelab serve --gpus-per-replica 1` → one HTTP request.

The same code as ``bench/gpu_e2e.py --size tiny`` (the test runs its :func:`run`): the quickstart sweep's two
tiny CTEG trials on the GPU, each worker on CUDA, the champion served from a GPU replica. Skipped without
CUDA. On the GPU machine (the bundle of bench/gpu_site.sh unpacked on PYTHONPATH; pytest is there):

    python3 -m pytest -m gpu tests/test_gpu_e2e.py
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_e2e", REPO / "bench" / "gpu_e2e.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_promote_serve_on_the_gpu(tmp_path):
    e2e = load_bench()
    s = e2e.run(tmp_path / "project", size="tiny", epochs=2, steps=6, gpus_per_worker=1.0, gpus_per_replica=1.0)
    e2e.print_summary(s)

    lock_md5 = s["data_md5"]
    assert lock_md5.endswith(".dir")
    trials = s["trials"]
    assert {t["variant"] for t in trials} == {"CTEG", "w.o. EwA"}
    for t in trials:
        assert t["status"] == "FINISHED"
        assert t["data_md5"] == lock_md5  # the sweep checked the data against dvc.lock and logged its hash
        assert t["val/cppl"] > 1.0 and t["val/loss"] > 0

    project = tmp_path / "project"
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlruns.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = c.get_model_version_by_alias("cteg-tiny", "champion")
    run = c.get_run(champion.run_id)
    parent = c.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.params["sweep.resources.gpus_per_worker"] == "1.0"
    # each trial's worker ran on CUDA with the whole card, its free memory checked at start
    for r in c.search_runs([parent.info.experiment_id], filter_string="tags.`facelab.role` = 'trial'"):
        gpu = json.loads(r.data.tags["facelab.gpu"])
        assert gpu["device"].startswith("cuda") and gpu["gpus_per_worker"] == 1.0
        assert gpu["free_gib"] >= gpu["need_gib"] > 0

    sv = s["serve"]
    assert sv["status"] == 200
    assert sv["model"]["name"] == "cteg-tiny" and sv["model"]["version"] == str(champion.version)
    assert len(sv["frames"]) == 1 and 1 <= sv["frames"][0] <= 20 and sv["frame_width"] == [53]
    # the replica ran on the GPU: the server said so when it started
    log = (project / "serve.log").read_text()
    assert "replica(s) on CUDA" in log, log[-3000:]
