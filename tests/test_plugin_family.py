"""A model family from outside the repository (``examples/facelab-nearest``), pip-installed into this
environment as a team would install theirs, runs sweep → report → promote → serve → HTTP exactly like
a built-in family: the platform finds it only through the ``facelab.families`` entry point."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import BIN, REPO, env_for, facelab, free_port
from test_e2e import _get, _post, _wait_healthy, runs_of, store

pytestmark = pytest.mark.slow
EXAMPLE = REPO / "examples" / "facelab-nearest"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip-install the example (no dependencies: facelab is already here), uninstall afterwards. It is
    built from a copy, so the build leaves nothing in the checkout."""
    src = tmp_path_factory.mktemp("plugin") / "facelab-nearest"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        pip + ["install", "--no-deps", "--no-build-isolation", str(src)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    try:
        yield
    finally:
        subprocess.run(pip + ["uninstall", "-y", "facelab-nearest"], capture_output=True, timeout=300)


def test_plugin_family_runs_sweep_report_promote_serve(installed, built_project):
    p = built_project
    dst = p / "examples" / "facelab-nearest"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("job.yaml", "sweep.yaml"):
        shutil.copy(EXAMPLE / name, dst / name)

    listing = facelab(p, "families").stdout
    assert "nearest" in listing and "/v1/expressions" in listing.split("nearest", 1)[1].splitlines()[0]

    facelab(p, "sweep", "examples/facelab-nearest/sweep.yaml")
    c = store(p)
    trials = {
        r.data.tags["facelab.variant"]: r
        for r in runs_of(c, "nearest-quickstart")
        if r.data.tags.get("facelab.role") == "trial"
    }
    assert set(trials) == {"nearest", "nearest (top-3)"}
    for r in trials.values():
        assert r.info.status == "FINISHED" and r.data.tags["facelab.job_kind"] == "nearest"
        for m in ("cppl", "dot", "fgd", "diversity", "mmodality", "variation"):
            assert np.isfinite(r.data.metrics[f"test/{m}"]), m

    report = facelab(p, "report", "nearest-quickstart").stdout
    assert "| nearest |" in report and "| nearest (top-3) |" in report

    assert "nearest" in facelab(p, "promote", "nearest-quickstart").stdout
    champion = c.get_model_version_by_alias("nearest", "champion")

    from facelab.data import emoava

    train = emoava.load_split(p / "data" / "emoava", "train")
    port = free_port()
    log = open(p / "serve-nearest.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "facelab"), "serve", "--model", "nearest", "--port", str(port)],
        cwd=p,
        env=env_for(p),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, p, log_name="serve-nearest.log")
        info = _get(base + "/v1/models")
        assert info["job_kind"] == "nearest" and info["version"] == str(champion.version)
        # A training text retrieves itself: the answer is its own training sequence.
        i = next(k for k, t in enumerate(train.texts) if train.texts.count(t) == 1 and len(train.sequences[k]) >= 2)
        status, body = _post(
            base + "/v1/expressions", {"text": train.texts[i], "num_samples": 1, "max_frames": 256, "seed": 0}
        )
        assert status == 200, body
        got = np.array(body["sequences"][0]["frames"])
        want = np.asarray(train.sequences[i][:256], dtype=np.float32)
        assert got.shape == want.shape and np.allclose(got, want, atol=1e-6)
        status, body = _post(base + "/v1/keyframes", {"background": "b", "emotion": "joy", "keyframes": ["a smile"]})
        assert status == 409 and "nearest" in str(body)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
