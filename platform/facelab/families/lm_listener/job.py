"""The LM-Listener baseline job schema (Ng et al. 2023: VQ-VAE over FLAME expressions + a text-conditioned code LM)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from facelab.core.config import Strict, Train
from facelab.tasks.expressions.config import LISTENER_METRICS, ExpressionData, ExpressionEval


class LMListenerModel(Strict):
    text_encoder: str = Field(
        "minilm", description="Frozen text encoder: 'minilm' (offline default) or a local path / HF id."
    )
    max_text_tokens: int = Field(128, ge=4, description="Text is truncated to this many tokens.")
    codebook_size: int = Field(256, ge=2, description="VQ-VAE codebook entries K.")
    code_dim: int = Field(128, ge=4, description="Size of a codebook vector.")
    downsample: int = Field(
        4, ge=1, le=32, description="Frames per code (temporal downsampling of the VQ-VAE encoder)."
    )
    vq_hidden: int = Field(256, ge=8, description="Channels of the VQ-VAE's temporal convolutions.")
    vq_layers: int = Field(2, ge=1, le=8, description="Residual conv blocks per VQ-VAE encoder/decoder.")
    commitment: float = Field(0.25, ge=0.0, description="VQ-VAE commitment weight β.")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="Codebook EMA decay (0 = codebook loss instead of EMA).")
    dead_code_threshold: float = Field(
        1.0,
        ge=0.0,
        description="EMA codebook: a code used less than this often (EMA count) is restarted on a batch vector.",
    )
    text_dropout: float = Field(
        0.1,
        ge=0.0,
        lt=1.0,
        description="Code LM: drop the text with this probability in training (trains the unconditional mode).",
    )
    d_model: int = Field(256, ge=8, description="Code LM transformer width.")
    n_heads: int = Field(4, ge=1, description="Code LM attention heads.")
    n_layers: int = Field(4, ge=1, le=24, description="Code LM transformer layers.")
    ff_dim: int = Field(1024, ge=8, description="Code LM feed-forward width.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout rate.")
    top_p: float = Field(
        0.8, gt=0.0, le=1.0, description="Nucleus sampling p at generation (the CTEG paper's comparison: 0.8)."
    )
    cppl_top_k: int = Field(
        16, ge=1, description="Cppl: expected frame over the LM's k most likely next codes (renormalised)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "LMListenerModel":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class LMListenerConfig(LMListenerModel):
    """The model's typed config: the job's ``model`` section plus the maximum sequence length
    (``data.max_frames``) and the expression-vector size. Declared once, here."""

    max_frames: int = Field(
        256, ge=1, description="Maximum sequence length (MSL) in frames; sets the LM's positional table."
    )
    expr_dim: int = Field(
        53, ge=1, description="Expression vector size: 50 FLAME expression + 3 jaw-pose coefficients."
    )

    @property
    def max_codes(self) -> int:
        """Codes of a ``max_frames``-frame sequence: ceil(max_frames / downsample)."""
        return -(-self.max_frames // self.downsample)


class LMListenerOptim(Strict):
    batch_size: int = Field(32, ge=1, description="Sequences per optimizer step, summed over all workers.")
    vq_lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate of the VQ-VAE stage.")
    lr: float = Field(2e-4, gt=0.0, description="AdamW learning rate of the code LM stage.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the gradient norm to this value; null = off.")


class LMListenerTrain(Train):
    vq_epochs: int = Field(20, ge=1, description="Stage 1: VQ-VAE epochs (then `epochs` of code-LM training).")


class LMListenerJob(Strict):
    kind: Literal["lm_listener"] = "lm_listener"
    name: str = Field("lm-listener", description="Registered-model name used by `facelab promote` unless overridden.")
    description: str = ""
    data: ExpressionData = ExpressionData()
    model: LMListenerModel = LMListenerModel()
    optim: LMListenerOptim = LMListenerOptim()
    train: LMListenerTrain = LMListenerTrain()
    eval: ExpressionEval = ExpressionEval()


# val/loss and train/loss are the current stage's objective (stage 1 VQ-VAE, stage 2 code LM).
METRICS = frozenset(
    {
        "val/loss",
        "train/loss",
        "val/vq_loss",
        "train/vq_loss",
        "val/recon_mse",
        "val/code_ce",
        "val/code_perplexity",
        "val/cppl",
        *(f"test/{m}" for m in ("cppl", "dot", "fgd", "diversity", "mmodality", "variation")),
        *(f"test/{m}" for m in LISTENER_METRICS),  # eval.protocol: listener (CTEG Table 5)
    }
)
