"""KeyframeFace end to end with the real components: DVC stages (corpus + tiny LM) → the evaluator
sweep → promote it → a LoRA sweep on Ray Tune + Train scored through the pinned evaluator → report
(Tables 2–4) → promote the adapter → Ray Serve → POST /v1/keyframes (JSON and Live Link Face CSV)."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import BIN, SHARED_DATA, clone_built, env_for, facelab, free_port

pytestmark = pytest.mark.slow

EVAL_FAST = ["train.epochs=6", "data.train_subset=200", "optim.batch_size=32"]
KF_FAST = [
    "train.max_steps_per_epoch=25",
    "data.train_subset=160",
    "data.test_subset=12",
    "data.val_subset=12",
    "train.max_val_batches=2",
    "eval.diversity_pairs=20",
]


def sets(xs):
    return [x for s in xs for x in ("--set", s)]


def store(project: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlruns.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def children(c, experiment: str):
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    return {r.data.tags["facelab.variant"]: r for r in runs if r.data.tags.get("facelab.role") == "trial"}


@pytest.fixture(scope="module")
def kf(tmp_path_factory, built_project):
    project = clone_built(built_project, tmp_path_factory.mktemp("kfproject") / "p")
    facelab(project, "sweep", "sweeps/keyframe_evaluator.yaml", *sets(EVAL_FAST))
    facelab(project, "promote", "keyframe-evaluator")
    proc = facelab(
        project,
        "sweep",
        "sweeps/keyframe_quickstart.yaml",
        *sets(KF_FAST + ["eval.evaluator=keyframe-evaluator@champion"]),
    )
    return project, proc


def test_stages_build_corpus_and_labelled_tiny_model(kf):
    project, _ = kf
    lock = (project / "dvc.lock").read_text()
    assert "data/keyframeface" in lock and "models/tiny-qwen3" in lock
    cfg = json.loads((project / "models" / "tiny-qwen3" / "config.json").read_text())
    assert cfg["model_type"] == "qwen3" and "not a pretrained" in cfg["facelab_label"]


def test_evaluator_trained_registered_and_pinned(kf):
    project, _ = kf
    c = store(project)
    ev = next(iter(children(c, "keyframe-evaluator").values()))
    assert ev.info.status == "FINISHED"
    # R-Precision@1 of ground truth on the test split, batches of 32: far above chance (1/32).
    assert ev.data.metrics["test/r_precision_1"] > 0.25
    mv = c.get_model_version_by_alias("keyframe-evaluator", "champion")
    parent = [
        r
        for r in c.search_runs([c.get_experiment_by_name("keyframe-quickstart").experiment_id])
        if r.data.tags.get("facelab.role") == "sweep"
    ][0]
    assert parent.data.tags["facelab.evaluator"] == f"keyframe-evaluator/{mv.version}"


def test_lora_sweep_learns_and_records_everything(kf):
    project, proc = kf
    c = store(project)
    runs = children(c, "keyframe-quickstart")
    assert set(runs) == {"GT", "Base", "Tuned", "Express4D-MDM"}
    assert all(r.info.status == "FINISHED" for r in runs.values()), proc.stdout
    tuned, base, gt = runs["Tuned"], runs["Base"], runs["GT"]
    hist = sorted(c.get_metric_history(tuned.info.run_id, "step/loss"), key=lambda m: m.step)
    assert len(hist) >= 4 and hist[-1].value < 0.7 * hist[0].value  # the loss falls
    assert tuned.data.metrics["val/loss"] < base.data.metrics["val/loss"]
    assert tuned.data.metrics["test/validity"] == 1.0  # constrained decoding always parses
    assert tuned.data.metrics["test/mse"] < base.data.metrics["test/mse"]
    # the GT row: test keyframes against the val split's (two samples of real keyframes, as Table 3)
    assert "test/mse" not in gt.data.metrics and gt.data.metrics["test/fid"] > 0 and gt.data.metrics["test/w_dist"] > 0
    for key in ("test/fid", "test/w_dist", "test/r_precision_1", "test/r_precision_3", "test/mmd", "test/diversity"):
        assert key in tuned.data.metrics
    assert tuned.data.tags["facelab.base_model_label"].startswith("tiny")
    assert tuned.data.tags["facelab.base_model.md5"].endswith(".dir")
    arts = {a.path for a in c.list_artifacts(tuned.info.run_id, "plots")}
    assert {"plots/per_channel_error.png", "plots/keyframe_preview.png", "plots/loss_curve.png"} <= arts
    viewer = {a.path for a in c.list_artifacts(tuned.info.run_id, "viewer")}
    assert viewer == {"viewer/preview.html", "viewer/preview.json"}  # the page MLflow's artifact view opens
    ck = {a.path for a in c.list_artifacts(tuned.info.run_id, "checkpoint")}
    assert {"checkpoint/model.safetensors", "checkpoint/config.json"} <= ck


def test_report_renders_tables_2_3_4(kf):
    project, _ = kf
    out = facelab(project, "report", "keyframe-quickstart").stdout
    for title in ("Table 2", "Table 3", "Table 4"):
        assert title in out
    assert "| ARKit-based | Semantic |" in out
    assert "| GT |" in out and "R-Prec@1 ↑" in out and "MSE ↓" in out
    table3 = out[out.index("Table 3") : out.index("Table 4")]
    assert "| Express4D-MDM (Express4D-MDM, ARKit-based, 20 steps) |" in table3 and "Keyframes/s ↑" in table3
    assert "Express4D-MDM" not in out[out.index("Table 4") :]  # Tables 2 and 4 are about the LoRA LMs
    csv_out = facelab(project, "report", "keyframe-quickstart", "--format", "csv").stdout
    assert "Tuned MSE" in csv_out


def test_sweep_viewer_page_has_a_row_per_variant(kf, tmp_path):
    """report.sweep_html on the finished sweep (what `facelab report --html` writes): the ground truth,
    then one row of faces per variant that logged a preview, one column per test keyframe."""
    from facelab.core import tracking
    from facelab.report import sweep_html

    project, _ = kf
    c = store(project)
    exp = c.get_experiment_by_name("keyframe-quickstart")
    parent = tracking.sweep_parent(c, exp.experiment_id, "keyframe-quickstart")
    trials = tracking.trial_runs(c, exp.experiment_id, parent.info.run_id)
    page = sweep_html(c, parent, trials, tmp_path / "sweep.html")
    data = json.loads(page.read_text().split('id="facelab-data">', 1)[1].split("</script>", 1)[0])["page"]
    labels = [r["label"] for r in data["rows"]]
    assert labels[0] == "ground truth" and data["task"] == "keyframes"
    assert {"Base", "Tuned", "Express4D-MDM"} <= {label.split(" (")[0] for label in labels}
    assert all(len(r["cells"]) == len(data["columns"]) >= 1 for r in data["rows"])


def _post(url: str, body: bytes, timeout: float = 120):
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("content-type", ""), e.read()


@contextlib.contextmanager
def serving(project: Path, model: str):
    """`facelab serve --model MODEL` on a free port until the block ends; yields the base URL."""
    port = free_port()
    server = subprocess.Popen(
        [str(BIN / "facelab"), "serve", "--model", model, "--port", str(port)],
        cwd=project,
        env=env_for(project),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            assert server.poll() is None and time.time() < deadline, "server did not come up"
            time.sleep(1)
        yield base
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


SCRIPT = {
    "background": "A student waits outside an interview room.",
    "emotion": "joy",
    "keyframes": ["The mouth corners lift into a wide smile.", "The eyes close briefly."],
}


def test_adapter_round_trips_through_registry_and_endpoint(kf):
    project, _ = kf
    facelab(project, "promote", "keyframe-quickstart")
    c = store(project)
    mv = c.get_model_version_by_alias("keyframe-tiny", "champion")
    assert mv.run_id == children(c, "keyframe-quickstart")["Tuned"].info.run_id  # the sweep's own family by default

    with serving(project, "keyframe-tiny") as base:
        script = SCRIPT
        status, ctype, body = _post(f"{base}/v1/keyframes", json.dumps(script).encode())
        assert status == 200, body
        out = json.loads(body)
        assert out["model"]["version"] == str(mv.version) and "tiny" in (out["model"]["note"] or "")
        assert [k["index"] for k in out["keyframes"]] == [1, 2]
        from facelab.data.arkit import CHANNELS

        assert list(out["keyframes"][0]["blendshapes"]) == list(CHANNELS)
        assert all(k["valid"] for k in out["keyframes"])

        # The same answer as the offline model (load the registered files and generate locally).
        status, ctype, csv_body = _post(f"{base}/v1/keyframes?format=csv", json.dumps(script).encode())
        assert status == 200 and ctype.startswith("text/csv")
        lines = csv_body.decode().split("\n")
        if SHARED_DATA.is_dir():
            release_header = (SHARED_DATA / "keyframeface" / "example_result.csv").read_text().split("\n")[0]
            assert lines[0] == release_header
        assert lines[1].startswith("00:00:00:00.000,61,") and lines[2].startswith("00:00:01:00.000,61,")
        row = [float(x) for x in lines[1].split(",")[2:]]
        assert row == pytest.approx([out["keyframes"][0]["blendshapes"][n] for n in CHANNELS], abs=1e-6)

        # Bad requests name the field; the server keeps serving.
        for bad, field in (
            (dict(script, keyframes=[]), "keyframes"),
            (dict(script, keyframes=["x"] * 6), "keyframes"),
            (dict(script, emotion=3), "emotion"),
            ({"background": "b", "keyframes": ["a"]}, "emotion"),
            (dict(script, background="x" * 5000), "background"),
        ):
            status, _, body = _post(f"{base}/v1/keyframes", json.dumps(bad).encode())
            assert status == 422, body
            assert field in {d["field"] for d in json.loads(body)["detail"]}
        status, _, body = _post(f"{base}/v1/expressions", json.dumps({"text": "hello"}).encode())
        assert status == 409 and "keyframe" in body.decode()
        status, _, _ = _post(f"{base}/v1/keyframes", json.dumps(script).encode())
        assert status == 200


def test_mdm_baseline_learns_reports_and_serves(kf):
    """Express4D-MDM: a row of the same sweep, its loss falls, it is scored through the same pinned
    evaluator, round-trips through the registry (promote --variant) and answers POST /v1/keyframes."""
    from facelab.data.arkit import CHANNELS, HIGH, LOW

    project, _ = kf
    c = store(project)
    mdm = children(c, "keyframe-quickstart")["Express4D-MDM"]
    assert mdm.info.status == "FINISHED" and mdm.data.tags["facelab.job_kind"] == "keyframe_mdm"
    # val/loss is the denoising loss at fixed timesteps and noise, so epochs compare (a step's loss
    # depends on the random timesteps it drew).
    val = [m.value for m in sorted(c.get_metric_history(mdm.info.run_id, "val/loss"), key=lambda m: m.step)]
    assert len(val) == 3 and val[-1] < 0.95 * val[0], val
    for key in ("test/mse", "test/fid", "test/r_precision_1", "test/mmd", "test/diversity", "test/keyframes_per_s"):
        assert key in mdm.data.metrics
    assert mdm.data.metrics["test/validity"] == 1.0

    out = facelab(project, "promote", "keyframe-quickstart", "--variant", "Express4D-MDM").stdout
    assert "keyframe-mdm-tiny" in out
    mv = c.get_model_version_by_alias("keyframe-mdm-tiny", "champion")
    assert mv.run_id == mdm.info.run_id
    with serving(project, "keyframe-mdm-tiny") as base:
        status, _, body = _post(f"{base}/v1/keyframes", json.dumps(SCRIPT).encode())
        assert status == 200, body
        got = json.loads(body)
        assert got["model"]["job_kind"] == "keyframe_mdm" and [k["index"] for k in got["keyframes"]] == [1, 2]
        for k in got["keyframes"]:
            vals = [k["blendshapes"][n] for n in CHANNELS]
            assert all(lo - 1e-6 <= v <= hi + 1e-6 for v, lo, hi in zip(vals, LOW, HIGH))
        status, _, body = _post(f"{base}/v1/expressions", json.dumps({"text": "hello"}).encode())
        assert status == 409 and "keyframe_mdm" in body.decode()


def test_export_interpolates_to_60hz(kf, tmp_path):
    project, _ = kf
    import numpy as np

    from facelab.data.arkit import CHANNELS, mapping_from_vector

    rows = np.zeros((3, len(CHANNELS)), dtype=np.float32)
    rows[1, CHANNELS.index("JawOpen")] = 0.6
    doc = {
        "keyframes": [
            {"index": i + 1, "valid": True, "blendshapes": mapping_from_vector(r)} for i, r in enumerate(rows)
        ]
    }
    src = tmp_path / "kf.json"
    src.write_text(json.dumps(doc))
    out = tmp_path / "anim.csv"
    facelab(project, "export", str(src), "--out", str(out))
    lines = out.read_text().strip().split("\n")
    assert len(lines) == 1 + 121  # 2 s at 60 Hz, both ends included
    jaw = [float(line.split(",")[2 + CHANNELS.index("JawOpen")]) for line in lines[1:]]
    assert jaw[0] == 0.0 and jaw[60] == pytest.approx(0.6) and max(jaw) <= 0.6 + 1e-6


def test_ranking_study_of_the_keyframe_sweep(kf, tmp_path):
    """`facelab study create` on the finished keyframe sweep (issue #20 item 4 with keyframe models):
    the sampled items are test scripts, every method answers each script's keyframes (61 ARKit channels
    in range, one row per description), the page data a rater gets names no method, and two scripted
    raters' rankings give the report's kappa computed independently here."""
    import numpy as np

    from facelab.data.arkit import HIGH, LOW
    from facelab.data.keyframeface import load_split
    from facelab.study import core, report

    project, _ = kf
    out = tmp_path / "study"
    facelab(project, "study", "create", "keyframe-quickstart", "--variants", "Tuned,Base", "--items", "3",
            "--seed", "1", "--out", str(out))  # fmt: skip
    study = core.load(out)
    assert study["task"] == "keyframes" and [m["name"] for m in study["methods"]] == ["Tuned", "Base"]
    scripts = load_split(project / "data" / "keyframeface", "test")
    for i, item in enumerate(study["items"]):
        script = scripts[item["index"]]
        assert item["descriptions"] == [k.descriptions["original"] for k in script.keyframes]
        outs = core.outputs(out, item["id"])
        for m in study["methods"]:
            rows = np.asarray(outs[m["id"]]["keyframes"])
            assert rows.shape == (len(item["descriptions"]), 61)
            assert (rows >= LOW - 1e-6).all() and (rows <= HIGH + 1e-6).all()
        shown = json.dumps(core.rater_item(out, study, "r1", i))
        assert "Tuned" not in shown and "Base" not in shown and study["methods"][0]["run_id"] not in shown

    # r1 prefers Tuned (m0) on every item, r2 too but on the first: Fleiss' table over the 6 (item, method)
    # subjects has 4 agreeing rows and 2 split ones -> P = 4/6, P_e = 0.5^2 + 0.5^2, kappa = (2/3 - 1/2) / (1/2)
    plan = {"r1": [{"m0": 1, "m1": 2}] * 3, "r2": [{"m0": 2, "m1": 1}] + [{"m0": 1, "m1": 2}] * 2}
    for rater, by_item in plan.items():
        for i, item in enumerate(study["items"]):
            shown_order = core.order(study, rater, item["id"])  # label A, B, ... -> method id
            core.submit(out, study, rater, i, {"AB"[k]: by_item[i][mid] for k, mid in enumerate(shown_order)})
    _text, summary = report.report(out)
    assert summary["raters"] == 2 and summary["items"] == 3
    assert summary["kappa"] == pytest.approx(1 / 3, abs=1e-12)
    assert summary["avg_rank"]["Tuned"] == pytest.approx(7 / 6) and summary["avg_rank"]["Base"] == pytest.approx(11 / 6)
