"""The ``nearest`` job schema: the one declaration of this family's settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from facelab.core.config import Strict, Train
from facelab.tasks.expressions.config import ExpressionData, ExpressionEval
from facelab.tasks.expressions.evaluate import METRICS as TEST_METRICS


class NearestModel(Strict):
    text_encoder: str = Field("minilm", description="Frozen text encoder ('minilm' offline default, or a local path).")
    max_text_tokens: int = Field(128, ge=4, description="Text is truncated to this many tokens.")
    top_k: int = Field(1, ge=1, description="Sample among the k most similar training texts (1 = always the nearest).")
    temperature: float = Field(0.05, gt=0.0, description="Softmax temperature over cosine similarities when top_k > 1.")


class NearestJob(Strict):
    kind: Literal["nearest"] = "nearest"
    name: str = Field("nearest", description="Registered-model name used by `facelab promote` unless overridden.")
    description: str = ""
    data: ExpressionData = ExpressionData()
    model: NearestModel = NearestModel()
    train: Train = Train(epochs=1)
    eval: ExpressionEval = ExpressionEval()


METRICS = frozenset({"val/loss", "val/cppl", *(f"test/{m}" for m in TEST_METRICS)})
