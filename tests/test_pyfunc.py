"""A registered facelab model is an MLflow pyfunc model: MLflow's own loader predicts with it (no
pickle: the loader is code), and facelab finds the checkpoint inside it."""

from __future__ import annotations

import json

import mlflow.pyfunc
import pandas as pd
import torch
import yaml

from facelab.core import checkpoint as ckpt
from facelab.families import registry
from facelab.families.cteg.servable import build_cteg
from facelab.serve.pyfunc import checkpoint_of, save_pyfunc

from conftest import REPO


def _cteg_checkpoint(tmp_path):
    job = registry.get("cteg").job.model_validate(yaml.safe_load((REPO / "jobs" / "cteg_tiny.yaml").read_text()))
    job = job.model_dump(mode="json")
    torch.manual_seed(0)
    model = build_cteg(job, torch.linspace(-0.2, 0.2, 53)).eval()
    ckpt.save(tmp_path / "ckpt", model, job, keep_encoder=False)
    return tmp_path / "ckpt", model


def test_pyfunc_model_predicts_as_the_model_does(tmp_path):
    src, model = _cteg_checkpoint(tmp_path)
    out = save_pyfunc(src, tmp_path / "pyfunc", "expressions")
    assert not list(out.rglob("*.pkl"))  # models from code: nothing to unpickle
    mlmodel = yaml.safe_load((out / "MLmodel").read_text())
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [c["name"] for c in inputs] == ["text", "num_samples", "max_frames", "seed"]
    assert checkpoint_of(out) == (out / "artifacts" / "ckpt").resolve() and checkpoint_of(src) == src
    assert (checkpoint_of(out) / ckpt.MODEL_FILE).is_file()

    loaded = mlflow.pyfunc.load_model(str(out))
    got = loaded.predict(
        pd.DataFrame([{"text": "I am so happy!", "num_samples": 2, "max_frames": 9, "seed": 3}, {"text": "What?"}])
    )
    assert len(got) == 2 and len(got["sequences"][0]) == 2 and len(got["sequences"][1]) == 1
    want = model.generate(["I am so happy!"] * 2, max_frames=9, generator=torch.Generator().manual_seed(3))
    for seq, ref in zip(got["sequences"][0], want):
        torch.testing.assert_close(torch.tensor(seq), ref.float(), rtol=1e-4, atol=1e-4)
        assert 1 <= len(seq) <= 9 and all(len(f) == 53 for f in seq)
