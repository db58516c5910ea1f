"""The CTEG job schema: the one declaration of CTEG's hyperparameters (Xu et al., EMNLP 2025, §5.1).

Defaults are the paper's text; where the released reference code (WalkerMitty/EmoAva ``src/``) does
something else, that behaviour is an option whose description says "reference: ...". Every paper
statement this implements, with its key, default, the reference's choice and the test that pins it,
is a row of ``docs/fidelity.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from facelab.core.config import Strict, Train
from facelab.tasks.expressions.config import LISTENER_METRICS, ExpressionData, ExpressionEval


class CTEGModel(Strict):
    text_encoder: str = Field(
        "minilm",
        description=(
            "Pretrained text encoder: 'minilm' (offline default, 384 wide, mapped to d_model by a linear layer) "
            "or a local directory / Hugging Face id already in the local cache (paper §5.1 and reference: "
            "bert-base-cased; cache it first with `hf download bert-base-cased`)."
        ),
    )
    finetune_encoder: bool = Field(False, description="Train the text encoder too (Table 6 'w. BERT fine-tuning').")
    max_text_tokens: int = Field(128, ge=4, description="Text is truncated to this many tokens.")
    d_model: int = Field(768, ge=8, description="Transformer width (§5.1).")
    n_heads: int = Field(12, ge=1, description="Attention heads (§5.1).")
    ff_dim: int = Field(2048, ge=8, description="Feed-forward width (§5.1).")
    cvad_layers: int = Field(1, ge=1, le=8, description="Stacked CVAD layers N_c (Figure 9).")
    latent_dim: int = Field(768, ge=1, description="Size of the per-step latent z_t (§3.4).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout rate.")
    ewa: bool = Field(True, description="Expression-wise Attention input block (§3.3); false = linear projection.")
    ewa_dim: int = Field(
        768,
        ge=1,
        description=(
            "Token size of the EwA cross-attention (§3.3): 768 = 12 heads x 64, the per-head size of every "
            "other attention here and the reference's fea_proj width (d_model). Must divide by ewa_heads."
        ),
    )
    ewa_heads: int = Field(
        12, ge=1, description="Heads of the EwA cross-attention (§5.1: 12 heads in all attention modules)."
    )
    lta: Literal["attention", "pooling", "none"] = Field(
        "attention", description="Latent Temporal Attention variant (§3.4, Table 6)."
    )
    target_guided: bool = Field(True, description="Target-guided loss L_g (§3.5, Eq. 8).")
    share_projection: bool = Field(False, description="Share projections (Table 6 'w. sharing').")
    stop_threshold: float = Field(
        1.0,
        ge=0.0,
        description="Decoding stops when a frame is this close (L2) to the zero face (§3.6); 0 = never early.",
    )
    output_sigma: float = Field(
        1.0,
        ge=0.0,
        description=(
            "σ of the output Gaussian N(μ_g, σ²) (Eq. 5: σ = 1); 0 = use μ_g. Reference -second_sample one: "
            "log-variance 1, σ = e^0.5 ≈ 1.6487."
        ),
    )
    kl_reduction: Literal["sum", "mean"] = Field(
        "sum", description="KL over latent dims: exact 'sum' (Eq. 6), or 'mean' (reference obtain_kl)."
    )
    kl_layers: Literal["sum", "mean"] = Field(
        "sum",
        description="KL over the N_c CVAD layers: 'sum' (Eq. 6 per layer, summed), or 'mean' (reference Decoder: / n_layers).",
    )
    recon_loss: Literal["mse", "l2"] = Field(
        "mse",
        description=(
            "Per-step reconstruction term of Eq. 6 and of L_g (Eq. 8): 'mse' = mean squared error over the 53 "
            "coordinates (paper); 'l2' = Euclidean norm of the difference (reference cal_loss_continue)."
        ),
    )
    jaw_weight: float = Field(
        1.0,
        gt=0.0,
        description="Weight of the jaw-pose coordinates' difference in the reconstruction terms (paper 1; reference 5).",
    )
    unconditional: Literal["masked", "pad_states"] = Field(
        "masked",
        description=(
            "An empty text (Diversity's text-free samples): 'masked' = the cross-attentions contribute nothing; "
            "'pad_states' = attend uniformly to the encoder's states of max_text_tokens [PAD] tokens under an "
            "all-zero attention mask (reference translate.py -uncondition)."
        ),
    )
    scale_embedding: bool = Field(
        True, description="Scale projected expressions by √d_model before the PE (reference -scale_emb)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "CTEGModel":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.ewa_dim % self.ewa_heads:
            raise ValueError(f"ewa_dim ({self.ewa_dim}) must be divisible by ewa_heads ({self.ewa_heads})")
        return self


class CTEGConfig(CTEGModel):
    """The CTEG model's typed config: the job's ``model`` section plus the maximum sequence length
    (``data.max_frames``) and the expression-vector layout. Declared once, here; the model reads only
    this (built by :func:`facelab.families.cteg.servable.cteg_config`, unknown keys are errors)."""

    max_frames: int = Field(
        256,
        ge=1,
        description="Maximum generated sequence length, MSL (reference trg_len 256); the job's data.max_frames.",
    )
    expr_dim: int = Field(
        53, ge=2, description="Expression vector size: 50 FLAME expression + 3 jaw-pose coefficients."
    )
    jaw_dim: int = Field(3, ge=1, description="Trailing coefficients of the vector that are the jaw pose E^j (§3.3).")

    @model_validator(mode="after")
    def _jaw_inside(self) -> "CTEGConfig":
        if not 0 < self.jaw_dim < self.expr_dim:
            raise ValueError(f"jaw_dim ({self.jaw_dim}) must be in (0, expr_dim={self.expr_dim})")
        return self


class Optim(Strict):
    batch_size: int = Field(32, ge=1, description="Sequences per optimizer step, summed over all workers.")
    lr_mul: float = Field(1.0, gt=0.0, description="Multiplier on the Noam learning rate (Eq. 10).")
    warmup: int = Field(4000, ge=1, description="Noam warmup steps (Eq. 10).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="Adam betas.")
    eps: float = Field(1e-9, gt=0.0, description="Adam epsilon.")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the gradient norm to this value; null = off.")


class CTEGTrain(Train):
    epochs: int = Field(100, ge=1, description="Training epochs (reference train.sh: -epoch 100).")
    select: Literal["best", "last"] = Field(
        "best",
        description=(
            "Which epoch's weights the trial ends with (test split, final checkpoint, registry): 'best' = the "
            "lowest train.select_metric over the epochs (reference save_mode best, its default), 'last' = the "
            "final epoch."
        ),
    )
    select_metric: Literal["val/mse", "val/cppl", "val/loss", "val/kl", "val/lg"] = Field(
        "val/mse",
        description=(
            "Dev metric of train.select=best (lower is better; ties go to the later epoch, as the reference's "
            "<=). val/mse = the reconstruction term, what the reference's save_mode best compares (its dev "
            "dis_loss); val/cppl = the dev continuous perplexity."
        ),
    )
    bucket_batches: int = Field(
        32,
        ge=1,
        description="Length bucketing: sequences are sorted by length within pools of this many global batches (1 = batches of similar length only within one batch's worth).",
    )


class CTEGEval(ExpressionEval):
    """The shared test-split evaluation block plus what only a CTEG model can be asked."""

    cppl_output: Literal["mean", "sample"] = Field(
        "mean",
        description=(
            "Cppl's predicted frame (Eq. 16's μ): 'mean' = the generation network's mean μ_g, no output noise; "
            "'sample' = μ_g + σ·ε, a sampled output (reference translate.py -infer_mode p with -second_sample one)."
        ),
    )


class CTEGJob(Strict):
    kind: Literal["cteg"] = "cteg"
    name: str = Field("cteg", description="Registered-model name used by `facelab promote` unless overridden.")
    description: str = ""
    data: ExpressionData = ExpressionData()
    model: CTEGModel = CTEGModel()
    optim: Optim = Optim()
    train: CTEGTrain = CTEGTrain()
    eval: CTEGEval = CTEGEval()


# Metrics the worker loop reports each epoch (a sweep's ``metric.name`` must be one of them).
METRICS = frozenset(
    {
        "val/loss",
        "val/mse",
        "val/kl",
        "val/lg",
        "val/cppl",
        "train/loss",
        "train/mse",
        "train/kl",
        "train/lg",
        *(f"test/{m}" for m in ("cppl", "dot", "fgd", "diversity", "mmodality", "variation")),
        *(f"test/{m}" for m in LISTENER_METRICS),  # eval.protocol: listener (CTEG Table 5)
        # eval.shuffle_row: the Shuffle row of Table 2 scored with this trained model
        *(f"shuffle/{m}" for m in ("cppl", "dot", "fgd", "diversity", "mmodality", "variation")),
        # train.select: the selected epoch and its select_metric value (best so far, every epoch)
        "select/epoch",
        "select/value",
    }
)
