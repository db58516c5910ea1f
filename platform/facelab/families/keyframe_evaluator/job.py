"""The text–motion evaluator job schema (KeyframeFace Appendix C)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from facelab.core.config import Strict


class EvaluatorData(Strict):
    path: str = Field("data/keyframeface", description="Dataset directory (DVC output), relative to the project root.")
    train_subset: int | None = Field(None, ge=1, description="Use only the first N training scripts; null = all.")


class EvaluatorModel(Strict):
    text_encoder: str = Field(
        "minilm", description="Pretrained text encoder ('minilm' offline default, or a local path)."
    )
    finetune_encoder: bool = Field(
        True,
        description='Train the text encoder with the heads (Appendix C: "Both the text encoder and motion '
        'encoder are fully trainable"); false = frozen, its pooled features cached (faster).',
    )
    embed_dim: int = Field(256, ge=8, description="Joint embedding size.")
    hidden: int = Field(512, ge=8, description="Hidden width of the text projection and motion encoder MLPs.")
    max_text_tokens: int = Field(64, ge=4, description="Text is truncated to this many tokens.")
    temperature: float = Field(0.07, gt=0.0, description="InfoNCE temperature τ (Appendix C: 0.07).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout in the MLPs.")


class EvaluatorOptim(Strict):
    batch_size: int = Field(64, ge=2, description="Pairs per step (in-batch negatives).")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate (Appendix C: 1e-4).")
    weight_decay: float = Field(1e-4, ge=0.0, description="AdamW weight decay (Appendix C: the same value as the lr).")


class EvaluatorTrain(Strict):
    epochs: int = Field(
        1000,
        ge=1,
        description='Maximum epochs (Appendix C: "up to 1000"; cosine schedule over them), early stopping ends it.',
    )
    patience: int = Field(10, ge=1, description="Early stopping on validation R-Precision@1 (Appendix C: 10).")
    seed: int = Field(42, description="Appendix C: 42.")
    max_steps_per_epoch: int | None = Field(None, ge=1)
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)


class EvaluatorJob(Strict):
    kind: Literal["keyframe_evaluator"] = "keyframe_evaluator"
    name: str = Field("keyframe-evaluator", description="Registered-model name; keyframe jobs pin it by version.")
    description: str = ""
    data: EvaluatorData = EvaluatorData()
    model: EvaluatorModel = EvaluatorModel()
    optim: EvaluatorOptim = EvaluatorOptim()
    train: EvaluatorTrain = EvaluatorTrain()


METRICS = frozenset({"val/loss", "train/loss", "val/r_precision_1", "val/r_precision_2", "val/r_precision_3"})
