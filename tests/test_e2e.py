"""End to end with the real components: DVC stage → Ray Tune + Train sweep → MLflow store →
promote → Ray Serve → HTTP. One project is built once (session fixture) and shared in order."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, QUICKSTART_FAST, clone_with_runs, env_for, facelab, free_port

pytestmark = pytest.mark.slow

FAST = QUICKSTART_FAST


def store(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlruns.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(c, experiment: str):
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, quickstart_runs):
    """The session's quickstart sweep (conftest.quickstart_runs), in a clone this module may change."""
    src, proc = quickstart_runs
    return clone_with_runs(src, tmp_path_factory.mktemp("e2e-quickstart") / "p"), proc


def test_dvc_stage_built_and_locked(built_project):
    lock = (built_project / "dvc.lock").read_text()
    assert "data/emoava" in lock and ".dir" in lock
    assert (built_project / "data" / "emoava" / "train.npz").is_file()


def test_quickstart_sweep_records_parent_and_children(quickstart):
    project, proc = quickstart
    num = r"[0-9.]+(e[+-][0-9]+)?"
    assert re.search(rf"best: (CTEG|w\.o\. EwA) \| seed=0 \(val/mse={num}  val/cppl={num}\)", proc.stdout), proc.stdout
    c = store(project)
    runs = runs_of(c, "quickstart")
    parents = [r for r in runs if r.data.tags.get("facelab.role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("facelab.role") == "trial"]
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    lock_md5 = [
        line.split("md5: ")[1]
        for line in (project / "dvc.lock").read_text().splitlines()
        if "md5: " in line and ".dir" in line
    ][0]
    assert {r.data.tags["facelab.variant"] for r in children} == {"CTEG", "w.o. EwA"}
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["facelab.sweep"] == "quickstart" and r.data.tags["facelab.seed"] == "0"
        assert r.data.tags["facelab.data.md5"] == lock_md5
        assert len(r.data.tags["facelab.git_sha"]) == 40
        # resolved config as params, per-epoch metrics
        assert r.data.params["model.d_model"] == "64" and r.data.params["train.epochs"] == "2"
        hist = c.get_metric_history(r.info.run_id, "val/loss")
        assert [m.step for m in hist] == [0, 1]
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"config.yaml", "checkpoint", "plots"} <= arts
        ck = {a.path for a in c.list_artifacts(r.info.run_id, "checkpoint")}
        assert ck == {"checkpoint/model.safetensors", "checkpoint/config.json"}
        assert {a.path for a in c.list_artifacts(r.info.run_id, "plots")} == {
            "plots/loss_curve.png",
            "plots/trajectories.png",
        }
        viewer = {a.path for a in c.list_artifacts(r.info.run_id, "viewer")}
        assert viewer == {"viewer/preview.html", "viewer/preview.json"}  # heatmaps and curves, gt vs generated
        for m in ("cppl", "dot", "fgd", "diversity", "mmodality", "variation"):
            assert r.data.metrics[f"test/{m}"] >= 0 and r.data.metrics[f"test/{m}_se"] >= 0
        assert len(c.get_metric_history(r.info.run_id, "step/kl")) >= 2  # per-step KL (Figure 5)
        assert r.data.metrics["val/cppl"] > 1.0
    ewa = {r.data.tags["facelab.variant"]: r.data.params["model.ewa"] for r in children}
    assert ewa == {"CTEG": "True", "w.o. EwA": "False"}


def test_resume_does_not_rerun_finished_trials(quickstart):
    project, _ = quickstart
    c = store(project)
    before = {r.info.run_id: (r.info.start_time, r.info.end_time) for r in runs_of(c, "quickstart")}
    facelab(project, "sweep", "sweeps/quickstart.yaml", "--resume", *[x for s in FAST for x in ("--set", s)])
    after = {r.info.run_id: (r.info.start_time, r.info.end_time) for r in runs_of(c, "quickstart")}
    assert set(after) == set(before)
    children = [r for r in runs_of(c, "quickstart") if r.data.tags.get("facelab.role") == "trial"]
    for r in children:  # not re-run: still exactly two epochs logged
        assert len(c.get_metric_history(r.info.run_id, "val/loss")) == 2


def test_report_prints_table(quickstart):
    project, _ = quickstart
    out = facelab(project, "report", "quickstart").stdout
    assert out.splitlines()[0] == ("| Variant | Cppl ↓ | DoT → | FgD → | Diversity ↑ | MModality ↑ | Variation → |")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines()[2:] if line.startswith("|")}
    assert set(rows) == {"CTEG", "w.o. EwA"}
    assert all(line.count(" ± ") == 6 for line in rows.values()), out  # bootstrap SE on every cell
    csv = facelab(project, "report", "quickstart", "--format", "csv").stdout
    assert csv.splitlines()[0].startswith("variant,n_seeds,Cppl,Cppl_se,DoT,DoT_se")
    c = store(project)
    parent = [r for r in runs_of(c, "quickstart") if r.data.tags.get("facelab.role") == "sweep"][-1]
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "report")} >= {
        "report/table.md",
        "report/table.csv",
        "report/kl_curve.png",
        "report/trajectories_CTEG_seed0.png",
        "report/trajectories_w.o._EwA_seed0.png",
    }


def test_ls_status_and_report_out_from_the_store(quickstart, tmp_path):
    project, _ = quickstart
    sweeps = facelab(project, "ls", "sweeps").stdout
    # ranked by val/mse, with the paper's Cppl shown beside it (sweeps/quickstart.yaml `show:`)
    assert "quickstart" in sweeps and "2 trial(s)" in sweeps and re.search(r"best val/mse=\S+  val/cppl=\S", sweeps)
    status = facelab(project, "status", "quickstart").stdout
    assert "sweep 'quickstart' (FINISHED" in status and status.count("epoch 2/2") == 2
    assert "best so far: " in status and status.count("val/cppl=") == 3  # two trials + the best
    # the same table, up to the clock: "started 45s ago" reads 49s a few seconds later
    ago = re.compile(r"started [^,)]* ago")
    assert ago.sub("started … ago", facelab(project, "ls", "runs", "quickstart").stdout) == ago.sub(
        "started … ago", status
    )
    typo = facelab(project, "report", "quickstrat", check=False)
    assert typo.returncode == 2 and "did you mean 'quickstart'?" in typo.stderr and "Traceback" not in typo.stderr
    facelab(project, "report", "quickstart", "--no-log", "--out", str(tmp_path / "rep"))
    assert (tmp_path / "rep" / "table.md").read_text().startswith("| Variant |")
    assert (tmp_path / "rep" / "table.csv").read_text().startswith("variant,n_seeds,")
    # the sweep's viewer page (issue #20): one self-contained file, a row per variant under the ground truth
    html = facelab(project, "report", "quickstart", "--no-log", "--html", str(tmp_path / "sweep.html"))
    assert f"wrote {tmp_path / 'sweep.html'}" in html.stderr
    page = (tmp_path / "sweep.html").read_text()
    assert page.startswith("<!doctype html>") and '"CTEG"' in page and '"w.o. EwA"' in page
    # MLflow's experiment kind: training runs (the UI link facelab prints also says so: see below)
    assert store(project).get_experiment_by_name("quickstart").tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )


def test_promote_then_serve_over_http(quickstart):
    project, _ = quickstart
    c = store(project)
    out = facelab(project, "promote", "quickstart").stdout
    assert "@champion" in out
    mv = c.get_model_version_by_alias("cteg-tiny", "champion")
    # Promoting the same (not better) candidate again is refused; --force moves the alias.
    again = facelab(project, "promote", "quickstart", check=False)
    assert again.returncode != 0 and "already champion" in again.stderr
    facelab(project, "promote", "quickstart", "--force")
    assert c.get_model_version_by_alias("cteg-tiny", "previous").version == mv.version  # noqa
    champion = c.get_model_version_by_alias("cteg-tiny", "champion")
    models = facelab(project, "ls", "models").stdout
    assert f"champion=v{champion.version}" in models and "cteg, val/mse=" in models
    _check_mlflow_tools_load_the_registered_model(project)

    port = free_port()
    log = open(project / "serve.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "facelab"), "serve", "--port", str(port)],
        cwd=project,
        env=env_for(project),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, project)
        info = _get(base + "/v1/models")
        assert info["name"] == "cteg-tiny" and info["version"] == str(champion.version)
        assert info["alias"] == "champion" and info["job_kind"] == "cteg"

        status, body = _post(
            base + "/v1/expressions", {"text": "I am so happy today!", "num_samples": 2, "max_frames": 20, "seed": 7}
        )
        assert status == 200, body
        assert body["fps"] == 25 and len(body["sequences"]) == 2
        for s in body["sequences"]:
            assert 1 <= len(s["frames"]) <= 20 and all(len(f) == 53 for f in s["frames"])
        # same seed → same frames
        assert (
            _post(
                base + "/v1/expressions",
                {"text": "I am so happy today!", "num_samples": 2, "max_frames": 20, "seed": 7},
            )[1]
            == body
        )
        _check_request_batching(base)

        bad = [
            ({"text": ""}, "text"),
            ({"text": "   "}, "text"),
            ({"text": "x" * 5000}, "text"),
            ({"text": "hi", "max_frames": 0}, "max_frames"),
            ({"text": "hi", "max_frames": 10**6}, "max_frames"),
            ({"text": "hi", "num_samples": "two"}, "num_samples"),
            ({"text": 3}, "text"),
            ({}, "text"),
            ({"text": "hi", "extra": 1}, "extra"),
        ]
        for payload, field in bad:
            status, body = _post(base + "/v1/expressions", payload)
            assert 400 <= status < 500, (payload, status, body)
            assert field in json.dumps(body["detail"]), (payload, body)
        status, body = _post(base + "/v1/expressions", b"{not json", raw=True)
        assert 400 <= status < 500 and "detail" in body
        status, body = _post(base + "/v1/expressions", b'{"text": "\xff\xfe hi"}', raw=True)  # not UTF-8
        assert 400 <= status < 500 and "detail" in body
        status, body = _post(base + "/v1/expressions", json.dumps({"text": "x" * 200_000}).encode(), raw=True)
        assert status == 413 and body["detail"][0]["field"] == "body"
        # still serving correct answers afterwards
        assert _get(base + "/healthz")["status"] == "ok"
        assert _post(base + "/v1/expressions", {"text": "still there?", "max_frames": 5})[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _check_request_batching(base: str) -> None:
    """Concurrent seeded requests are decoded in batches (X-Facelab-Batch > 1), and each gets the answer
    it gets alone: same number of sequences and frames, values equal to float rounding."""
    import threading

    reqs = [
        {"text": t, "num_samples": k, "max_frames": n, "seed": 100 + i}
        for i, (t, k, n) in enumerate(
            [
                ("I am so happy today!", 1, 20),
                ("Why would you do that?", 3, 12),
                ("Well, this is awkward.", 2, 20),
                ("No way!", 1, 7),
                ("I missed you so much.", 2, 18),
                ("Leave me alone.", 1, 20),
            ]
        )
    ]
    alone = []
    for r in reqs:
        status, body, headers = _post(base + "/v1/expressions", r, with_headers=True)
        assert status == 200 and headers["x-facelab-batch"] == "1", (status, body)
        alone.append(body["sequences"])
    batch_sizes: list[int] = []
    for _ in range(5):  # released together; a round may still find the replica free for each one alone
        got: list = [None] * len(reqs)
        gate = threading.Barrier(len(reqs))

        def send(i: int) -> None:
            gate.wait()
            got[i] = _post(base + "/v1/expressions", reqs[i], with_headers=True)

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (status, body, headers), want in zip(got, alone):
            assert status == 200, body
            batch_sizes.append(int(headers["x-facelab-batch"]))
            assert [len(s["frames"]) for s in body["sequences"]] == [len(s["frames"]) for s in want]
            for s, w in zip(body["sequences"], want):
                np.testing.assert_allclose(np.array(s["frames"]), np.array(w["frames"]), rtol=1e-4, atol=1e-5)
        if max(batch_sizes) > 1:
            break
    assert max(batch_sizes) > 1, batch_sizes


def _check_mlflow_tools_load_the_registered_model(project: Path) -> None:
    """The registered version is an MLflow pyfunc model: MLflow's loader predicts with it and
    `mlflow models serve` answers /invocations (facelab serve keeps its own path)."""
    import mlflow.pyfunc
    import pandas as pd

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlruns.db'}")
    try:
        model = mlflow.pyfunc.load_model("models:/cteg-tiny@champion")
    finally:  # set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ: later tests must not inherit it
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    out = model.predict(pd.DataFrame([{"text": "I am so happy today!", "num_samples": 2, "max_frames": 12, "seed": 1}]))
    assert len(out["sequences"][0]) == 2 and all(len(f) == 53 for s in out["sequences"][0] for f in s)
    port = free_port()
    log = open(project / "mlflow-serve.log", "w")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "models",
            "serve",
            "-m",
            "models:/cteg-tiny@champion",
            "--env-manager",
            "local",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=project,
        env=env_for(project, MLFLOW_TRACKING_URI=f"sqlite:///{project / 'mlruns.db'}"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline, status, body = time.time() + 180, None, None
        while time.time() < deadline and status != 200:
            if proc.poll() is not None:
                raise AssertionError(
                    "mlflow models serve exited:\n" + (project / "mlflow-serve.log").read_text()[-4000:]
                )
            try:
                status, body = _post(
                    f"http://127.0.0.1:{port}/invocations",
                    {"dataframe_records": [{"text": "hello there", "max_frames": 5}]},
                )
            except (urllib.error.URLError, OSError):
                time.sleep(1)
        assert status == 200, body
        seqs = body["predictions"][0]["sequences"]
        assert len(seqs) == 1 and 1 <= len(seqs[0]) <= 5 and len(seqs[0][0]) == 53
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_healthy(base: str, proc, project: Path, timeout: float = 240, log_name: str = "serve.log") -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError("server exited:\n" + (project / log_name).read_text()[-5000:])
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=3) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError("server never became healthy:\n" + (project / log_name).read_text()[-5000:])


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _post(url: str, payload, raw: bool = False, with_headers: bool = False):
    data = payload if raw else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            out = r.status, json.loads(r.read()), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        out = e.code, json.loads(e.read() or b"{}"), {k.lower(): v for k, v in e.headers.items()}
    return out if with_headers else out[:2]


def test_ddp_two_workers_one_run(built_project):
    p = built_project
    facelab(
        p,
        "train",
        "jobs/cteg_tiny.yaml",
        "--name",
        "ddp",
        "--num-workers",
        "2",
        "--cpus-per-worker",
        "0.5",
        *[x for s in FAST for x in ("--set", s)],
        "--set",
        "optim.batch_size=8",
    )
    runs = runs_of(store(p), "ddp")
    children = [r for r in runs if r.data.tags.get("facelab.role") == "trial"]
    assert len(children) == 1, "rank 0 only: one MLflow run per DDP trial"
    assert children[0].info.status == "FINISHED"
    assert len(store(p).get_metric_history(children[0].info.run_id, "train/loss")) == 2


def test_refuses_data_that_does_not_match_dvc_lock(built_project):
    p = built_project
    f = p / "data" / "emoava" / "dev.texts.json"
    original = f.read_bytes()
    n_before = len(runs_of(store(p), "quickstart"))
    try:
        f.write_bytes(original.replace(b'"', b'"x', 1) if original.startswith(b'["') else original + b" ")
        proc = facelab(p, "sweep", "sweeps/quickstart.yaml", check=False)
        assert proc.returncode == 2
        assert "data/emoava" in proc.stderr and "dvc.lock" in proc.stderr
        assert "dvc repro emoava" in proc.stderr and "dvc checkout" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert len(runs_of(store(p), "quickstart")) == n_before, "no MLflow run may be created"
    finally:
        f.write_bytes(original)


def test_bad_spec_fails_before_ray_or_mlflow(tmp_path):
    from conftest import make_project

    p = make_project(tmp_path / "p")
    (p / "sweeps" / "bad.yaml").write_text(
        "name: bad\njob: jobs/cteg_tiny.yaml\nmetric: {name: val/loss}\nvariants: {x: {model.nope: 1}}\nseeds: []\n"
    )
    proc = facelab(p, "sweep", "sweeps/bad.yaml", check=False)
    assert proc.returncode == 2
    assert "variants.x.model.nope" in proc.stderr and "seeds" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (p / "mlruns.db").exists() and not (p / "ray_results").exists()
    dry = facelab(p, "sweep", "sweeps/quickstart.yaml", "--dry-run")
    assert "2 trial(s)" in dry.stdout and "w.o. EwA" in dry.stdout
    assert not (p / "mlruns.db").exists()


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(built_project):
    """SIGINT the driver after the first trial finished; --resume runs only what is left."""
    p = built_project
    sets = [x for s in FAST + ["max_concurrent_trials=1", "name=interrupt"] for x in ("--set", s)]
    c = store(p)
    proc = subprocess.Popen(
        [str(BIN / "facelab"), "sweep", "sweeps/quickstart.yaml", *sets],
        cwd=p,
        env=env_for(p),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 400
    first = None
    while time.time() < deadline and first is None:
        done = [
            r
            for r in runs_of(c, "interrupt")
            if r.data.tags.get("facelab.role") == "trial" and r.info.status == "FINISHED"
        ]
        first = done[0] if done else None
        time.sleep(1)
    assert first is not None, "first trial never finished"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "--resume" in out

    facelab(p, "sweep", "sweeps/quickstart.yaml", "--resume", *sets)
    children = [r for r in runs_of(c, "interrupt") if r.data.tags.get("facelab.role") == "trial"]
    assert len(children) == 2, "a resumed trial reopens its run, never duplicates it"
    assert all(r.info.status == "FINISHED" for r in children)
    again = next(r for r in children if r.info.run_id == first.info.run_id)
    assert (again.info.start_time, again.info.end_time) == (first.info.start_time, first.info.end_time)
    for r in children:
        assert [m.step for m in c.get_metric_history(r.info.run_id, "val/loss")] == [0, 1]
    parents = [r for r in runs_of(c, "interrupt") if r.data.tags.get("facelab.role") == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"


def test_optuna_search_with_asha_records_every_trial(built_project):
    """method: optuna (Ray Tune's OptunaSearch) + ASHA: sampled values are logged, stopped trials
    are closed with their last checkpoint, and every trial is exactly one FINISHED run."""
    p = built_project
    (p / "sweeps" / "search.yaml").write_text(
        "name: search\njob: jobs/cteg_tiny.yaml\nmetric: {name: val/loss, goal: minimize}\nmethod: optuna\n"
        "variants: {CTEG: {}}\nparameters: {optim.lr_mul: {distribution: log_uniform_values, min: 0.001, max: 1000}}\n"
        "num_samples: 3\nearly_terminate: {type: asha, grace_period: 1, reduction_factor: 2}\n"
        "resources: {num_workers: 1, cpus_per_worker: 0.5}\nmax_concurrent_trials: 1\n"
    )
    facelab(p, "sweep", "sweeps/search.yaml", *[x for s in FAST + ["train.epochs=3"] for x in ("--set", s)])
    c = store(p)
    children = [r for r in runs_of(c, "search") if r.data.tags.get("facelab.role") == "trial"]
    assert len(children) == 3
    lrs = {float(r.data.params["override.optim.lr_mul"]) for r in children}
    assert len(lrs) == 3 and all(0.001 <= x <= 1000 for x in lrs)
    for r in children:
        assert r.info.status == "FINISHED"
        n_epochs = len(c.get_metric_history(r.info.run_id, "val/loss"))
        stopped = r.data.tags.get("facelab.stopped_early") == "true"
        assert (n_epochs < 3) == stopped, (n_epochs, r.data.tags)
        assert {a.path for a in c.list_artifacts(r.info.run_id, "checkpoint")} == {
            "checkpoint/model.safetensors",
            "checkpoint/config.json",
        }


def test_lm_listener_baseline_learns_reports_and_serves(built_project):
    """LM-Listener as a row of a CTEG sweep (its own job file): both stages train and their losses
    fall, the six metrics are computed by the same protocol, the report shows it beside CTEG and GT,
    `promote --variant` registers it and `POST /v1/expressions` answers with it."""
    import yaml

    p = built_project
    # The shipped sweep without its CTEG row (the quickstart tests train that one already).
    spec = yaml.safe_load((p / "sweeps" / "cteg_baselines_quickstart.yaml").read_text())
    del spec["variants"]["CTEG"]
    (p / "sweeps" / "baselines_test.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    sets = FAST + ["train.vq_epochs=2"]
    facelab(p, "sweep", "sweeps/baselines_test.yaml", *[x for s in sets for x in ("--set", s)])
    c = store(p)
    trials = {
        r.data.tags["facelab.variant"]: r
        for r in runs_of(c, "cteg-baselines-quickstart")
        if r.data.tags.get("facelab.role") == "trial"
    }
    assert set(trials) == {"GT", "LM-Listener"} and all(r.info.status == "FINISHED" for r in trials.values())
    lml = trials["LM-Listener"]
    assert lml.data.tags["facelab.job_kind"] == "lm_listener" and lml.data.params["train.vq_epochs"] == "2"
    by_epoch = {m.step: m.value for m in c.get_metric_history(lml.info.run_id, "train/loss")}
    stage = {m.step: m.value for m in c.get_metric_history(lml.info.run_id, "stage")}
    s1 = [by_epoch[e] for e in sorted(by_epoch) if stage[e] == 1]
    s2 = [by_epoch[e] for e in sorted(by_epoch) if stage[e] == 2]
    assert len(s1) == 2 and len(s2) == 2
    assert s1[-1] < s1[0] and s2[-1] < s2[0], (s1, s2)  # the VQ-VAE and the code LM both learn
    for m in ("cppl", "dot", "fgd", "diversity", "mmodality", "variation"):
        assert f"test/{m}" in lml.data.metrics, m

    out = facelab(p, "report", "cteg-baselines-quickstart").stdout
    assert "| LM-Listener |" in out and "| GT |" in out
    print("\n" + out)

    promoted = facelab(p, "promote", "cteg-baselines-quickstart", "--variant", "LM-Listener").stdout
    assert "lm-listener-tiny" in promoted
    assert c.get_model_version_by_alias("lm-listener-tiny", "champion").run_id == lml.info.run_id
    port = free_port()
    log = open(p / "serve-lml.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "facelab"), "serve", "--model", "lm-listener-tiny", "--port", str(port)],
        cwd=p,
        env=env_for(p),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, p, log_name="serve-lml.log")
        assert _get(base + "/v1/models")["job_kind"] == "lm_listener"
        req = {"text": "I am so happy today!", "num_samples": 2, "max_frames": 20, "seed": 7}
        status, body = _post(base + "/v1/expressions", req)
        assert status == 200, body
        for s in body["sequences"]:
            assert 1 <= len(s["frames"]) <= 20 and all(len(f) == 53 for f in s["frames"])
        assert _post(base + "/v1/expressions", req)[1] == body  # seeded: the same answer
        status, body = _post(base + "/v1/keyframes", {"background": "b", "emotion": "joy", "keyframes": ["a smile"]})
        assert status == 409 and "lm_listener" in json.dumps(body)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_mlflow_ui_opens_sweep_on_training_runs(quickstart, tmp_path):
    """`mlflow ui` on the finished quickstart sweep, in headless Chromium: the experiment link facelab
    prints opens on its training runs, not an empty GenAI overview, and the trials' names,
    the sweep's metric, variant and seed can be read in the runs table; a trial's
    viewer/preview.html opens in the artifact view and draws its heatmaps."""
    import os

    browser_bin = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright (the dev extra) drives the browser")
    import mlflow

    from facelab.core import tracking

    project, proc = quickstart
    c = store(project)
    exp = c.get_experiment_by_name("quickstart")
    assert tracking.ui_experiment_url("http://127.0.0.1:5000", exp.experiment_id) in proc.stdout  # printed
    runs = runs_of(c, "quickstart")
    parent = next(r for r in runs if r.data.tags.get("facelab.role") == "sweep")
    children = [r for r in runs if r.data.tags.get("facelab.role") == "trial"]
    metric = parent.data.params["sweep.metric.name"]  # val/mse (sweeps/quickstart.yaml)
    assert len(children) == 2 and all(metric in r.data.metrics for r in children)

    t0 = time.time()
    port = free_port()
    log = open(tmp_path / "mlflow-ui.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{project / 'mlruns.db'}"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=project,
        env=env_for(project),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own session: stopped below by killing that session only
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_ok(base + "/health", server, tmp_path / "mlflow-ui.log", timeout=120)
        print(f"\nmlflow ui up after {time.time() - t0:.1f}s")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_bin, headless=True)
            try:
                page = browser.new_page(viewport={"width": 2400, "height": 1200})  # wide: no column is virtualised
                page.set_default_timeout(90_000)
                t1 = time.time()
                # the link `facelab sweep` prints; MLflow 3's UI ignores mlflow.experimentKind when it
                # picks a page (a fresh browser lands on the empty GenAI overview) but obeys workflowType
                page.goto(tracking.ui_experiment_url(base, exp.experiment_id))
                page.wait_for_function(
                    "id => new RegExp(`/experiments/${id}/(runs|overview|traces)`).test(location.hash)",
                    arg=exp.experiment_id,
                )
                opened = page.url
                if "/runs" in opened:
                    page.get_by_text(parent.info.run_name, exact=True).wait_for()
                shot = tmp_path / "mlflow-ui-opened.png"
                page.screenshot(path=str(shot))
                print(f"experiment page rendered after {time.time() - t1:.1f}s: {opened}\nscreenshot: {shot}")
                assert "/runs" in opened, (
                    f"MLflow {mlflow.__version__}'s UI opened the link facelab prints on {opened}, not on the "
                    f"training runs; see {shot}"
                )
                close = page.get_by_role("button", name="Close")  # the assistant panel takes a third of the page
                if close.count() == 1:
                    close.click()

                # the trials are nested under the sweep's parent run: expand it as a user would
                name_col = '[col-id="attributes.`Run Name`"]'
                page.locator(f'[role=row][row-id="{parent.info.run_id}"] {name_col} button').first.click()
                for r in children:
                    page.get_by_text(r.info.run_name, exact=True).wait_for(state="visible")
                # the sweep's metric, variant and seed: columns picked in the table's "Columns" menu
                page.get_by_test_id("column-selection-dropdown").first.click()
                menu = page.get_by_test_id("column-selector-tree")
                for name in (metric, "facelab.variant", "facelab.seed"):
                    menu.get_by_title(name, exact=True).click()
                page.keyboard.press("Escape")
                cols = {
                    "metric": f'[col-id="metrics.`{metric}`"]',
                    "variant": '[col-id="tags.`facelab.variant`"]',
                    "seed": '[col-id="tags.`facelab.seed`"]',
                }
                page.locator(f"[role=columnheader]{cols['metric']}").get_by_text(metric, exact=True).wait_for()
                shot = tmp_path / "mlflow-ui-runs.png"
                page.screenshot(path=str(shot))
                print(f"runs table with {metric}, variant, seed after {time.time() - t1:.1f}s\nscreenshot: {shot}")
                for r in children:
                    row = f'[role=row][row-id="{r.info.run_id}"]'
                    cell = {k: page.locator(f"{row} {sel}").first.inner_text().strip() for k, sel in cols.items()}
                    name = page.locator(f"{row} {name_col}").first.inner_text()
                    print(f"  {name.splitlines()[-1]}: {cell}")
                    assert r.info.run_name in name  # "CTEG | seed=0"
                    assert (
                        cell["variant"] == r.data.tags["facelab.variant"]
                        and cell["seed"] == r.data.tags["facelab.seed"]
                    )
                    assert float(cell["metric"]) == pytest.approx(r.data.metrics[metric], rel=1e-6)

                # a trial's viewer page in MLflow's artifact view: a sandboxed frame that runs its script
                run = children[0]
                page.goto(
                    f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/artifacts/viewer/preview.html"
                )
                frame = page.frame_locator("iframe.mlflow-html-iframe")
                frame.locator("#facelab-root[data-ready='1']").wait_for()
                assert frame.locator("section.item").count() == 3 and frame.locator("figure.seq.gt").count() == 3
                assert frame.locator("figure.seq.gen canvas.heatmap").count() == 6  # two samples per text
                shot = tmp_path / "mlflow-ui-viewer.png"
                page.screenshot(path=str(shot))
                print(f"viewer page in the artifact view after {time.time() - t1:.1f}s\nscreenshot: {shot}")
            finally:
                browser.close()
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()
        print(f"mlflow ui test took {time.time() - t0:.1f}s")


def _chromium() -> str:
    """The system Chromium (Debian's `chromium`, installed by .ci/run), or skip saying so."""
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.skip("no chromium, chromium-browser or google-chrome on PATH (apt-get install chromium)")


def _wait_ok(url: str, proc, log: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited:\n{log.read_text()[-5000:]}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise AssertionError(f"{url} never answered:\n{log.read_text()[-5000:]}")
