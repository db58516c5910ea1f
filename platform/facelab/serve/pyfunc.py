"""Registered models every MLflow tool understands: the MLflow ``pyfunc`` flavour of a facelab model.

``facelab promote`` registers each version as a pyfunc model (:func:`save_pyfunc`): the checkpoint
(safetensors + ``config.json``) is the model's artifact, the loader is *code* (MLflow's "models from
code": :mod:`facelab.serve.pyfunc_entry`, nothing is pickled), and a signature plus an input example
describe the task's inputs and outputs. So ``mlflow.pyfunc.load_model("models:/NAME@champion")``
predicts and ``mlflow models serve -m models:/NAME@champion --env-manager local`` answers
``POST /invocations``, while ``facelab serve`` keeps its own faster path (batching, probes, swaps) and
reads the same checkpoint from the model's ``artifacts/checkpoint``.

Inputs and outputs (one row per request; missing optional columns take the defaults of the HTTP API):

* expressions: ``text`` (str), ``num_samples`` (int, 1), ``max_frames`` (int, the model's MSL),
  ``seed`` (int, 0) → ``sequences``: ``num_samples`` lists of frames of 53 floats (25 fps);
* keyframes: ``background``, ``emotion`` (str), ``keyframes`` (list of str) → ``keyframes``: one
  ``{channel: value}`` mapping of the 61 ARKit channels per keyframe.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import mlflow.pyfunc

CHECKPOINT = "checkpoint"  # the artifact key (and folder under artifacts/) holding the checkpoint


def _signature(task: str | None):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, DataType, Map, Schema

    if task == "expressions":
        inputs = Schema(
            [
                ColSpec(DataType.string, "text"),
                # whole numbers of any dtype: a column with a missing value arrives as float (NaN),
                # one without as int, and MLflow converts neither into the other
                ColSpec(AnyType(), "num_samples", required=False),
                ColSpec(AnyType(), "max_frames", required=False),
                ColSpec(AnyType(), "seed", required=False),
            ]
        )
        outputs = Schema([ColSpec(Array(Array(Array(DataType.double))), "sequences")])
        example = {"text": "I am so happy to see you again!", "num_samples": 1, "max_frames": 64, "seed": 0}
    elif task == "keyframes":
        inputs = Schema(
            [
                ColSpec(DataType.string, "background"),
                ColSpec(DataType.string, "emotion"),
                ColSpec(Array(DataType.string), "keyframes"),
            ]
        )
        outputs = Schema([ColSpec(Array(Map(DataType.double)), "keyframes")])
        example = {
            "background": "A student waits outside an interview room.",
            "emotion": "Anxiety.",
            "keyframes": ["The gaze is lowered and the lips press together."],
        }
    else:
        return None, None
    return ModelSignature(inputs=inputs, outputs=outputs), example


def save_pyfunc(checkpoint_dir: Path, out: Path, task: str | None) -> Path:
    """Write the pyfunc model of ``checkpoint_dir`` to ``out`` (which must not exist)."""
    import pandas as pd

    signature, example = _signature(task)
    mlflow.pyfunc.save_model(
        path=str(out),
        python_model=str(Path(__file__).with_name("pyfunc_entry.py")),
        artifacts={CHECKPOINT: str(checkpoint_dir)},
        signature=signature,
        input_example=pd.DataFrame([example]) if example else None,
        pip_requirements=["facelab"],
        metadata={"facelab.task": task or ""},
    )
    return out


def checkpoint_of(model_dir: Path) -> Path:
    """The checkpoint directory of a downloaded model version (see :func:`facelab.core.checkpoint.servable_dir`)."""
    from facelab.core.checkpoint import servable_dir

    return servable_dir(model_dir)


class FacelabPyfunc(mlflow.pyfunc.PythonModel):
    """The pyfunc model: loads the checkpoint through the family registry, answers its task."""

    def load_context(self, context) -> None:
        from facelab.families import registry

        self.model, self.config = registry.load_servable(Path(context.artifacts[CHECKPOINT]), device="cpu")
        self.task = registry.get(self.config["kind"]).task

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
        if self.task == "expressions":
            return pd.DataFrame({"sequences": [self._expressions(r) for r in rows]})
        if self.task == "keyframes":
            return pd.DataFrame({"keyframes": [self._keyframes(r) for r in rows]})
        raise ValueError(f"a {self.config['kind']!r} model serves no task: nothing to predict")

    @staticmethod
    def _int(row: dict, key: str, default: int) -> int:
        v = row.get(key)
        return default if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)

    def _expressions(self, row: dict) -> list:
        import torch

        text = str(row["text"])
        n = self._int(row, "num_samples", 1)
        frames = min(self._int(row, "max_frames", self.model.cfg.max_frames), self.model.cfg.max_frames)
        gen = torch.Generator().manual_seed(self._int(row, "seed", 0))
        with torch.no_grad():
            seqs = self.model.generate([text] * n, max_frames=frames, generator=gen)
        return [s.float().cpu().tolist() for s in seqs]

    def _keyframes(self, row: dict) -> list:
        from facelab.data.arkit import mapping_from_vector

        descriptions = [str(d) for d in row["keyframes"]]
        results = self.model.keyframes(str(row["background"]), str(row["emotion"]), descriptions)
        return [mapping_from_vector(r.values) for r in results]
