"""The Express4D-MDM baseline job schema (KeyframeFace Table 3: a motion diffusion model over ARKit keyframes)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from facelab.core.config import Strict, Train
from facelab.tasks.keyframes.config import KeyframeData
from facelab.tasks.keyframes.metrics import TEST_METRICS


class MDMModel(Strict):
    text_encoder: str = Field(
        "minilm",
        description="Frozen text encoder; the paper's MDM uses CLIP, here the offline MiniLM (documented substitution).",
    )
    max_text_tokens: int = Field(64, ge=4, description="Text is truncated to this many tokens.")
    d_model: int = Field(256, ge=8, description="Denoiser transformer width.")
    n_heads: int = Field(4, ge=1, description="Denoiser attention heads.")
    n_layers: int = Field(4, ge=1, le=24, description="Denoiser transformer layers.")
    ff_dim: int = Field(1024, ge=8, description="Denoiser feed-forward width.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout rate.")
    diffusion_steps: int = Field(1000, ge=2, description="DDPM training steps T (MDM: 1000).")
    noise_schedule: Literal["cosine", "linear"] = Field("cosine", description="β schedule (MDM: cosine).")
    prediction: Literal["eps", "x0"] = Field(
        "eps",
        description="What the denoiser predicts: eps = the Gaussian noise (KeyframeFace's Express4D-MDM baseline, "
        "Ho et al.'s objective); x0 = the clean sample (MDM's own choice).",
    )
    unit: Literal["keyframe", "script"] = Field(
        "keyframe",
        description="One example is: keyframe = one keyframe with its own prompt (its description; the script's "
        "emotion and background on the condition token), trained and sampled alone (the paper's baseline); "
        "script = a script's 1-5 keyframes denoised jointly.",
    )
    cond_drop: float = Field(
        0.1, ge=0.0, lt=1.0, description="Probability of dropping the text in training (classifier-free guidance)."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> "MDMModel":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class MDMOptim(Strict):
    batch_size: int = Field(
        64, ge=1, description="Examples (keyframes or scripts, model.unit) per optimizer step, summed over all workers."
    )
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate (MDM: 1e-4).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the gradient norm to this value; null = off.")


class MDMEval(Strict):
    enabled: bool = Field(True, description="Sample the test split's keyframes after the last epoch and score them.")
    sampling_steps: int = Field(
        1000,
        ge=1,
        description="Denoising steps at sampling (the paper's baseline: 1000, the full chain); fewer are respaced "
        "from the T training steps.",
    )
    guidance_scale: float = Field(
        2.5, ge=0.0, description="Classifier-free guidance scale s (MDM: 2.5; 1 = off, 0 = unconditional)."
    )
    batch_size: int = Field(64, ge=1, description="Examples (keyframes or scripts, model.unit) sampled in parallel.")
    evaluator: str | None = Field(None, description="Registered text–motion evaluator, as for `keyframe` jobs.")
    diversity_pairs: int = Field(300, ge=2, description="Pairs for Diversity (T2M protocol).")
    diversity_space: Literal["arkit", "embedding"] = Field(
        "arkit",
        description="Diversity on the raw ARKit values or the evaluator's unit-norm embeddings, as for `keyframe` jobs.",
    )
    r_precision_batch: int = Field(32, ge=2, description="R-Precision batch size (Appendix C: 32).")


class KeyframeMDMJob(Strict):
    kind: Literal["keyframe_mdm"] = "keyframe_mdm"
    name: str = Field("keyframe-mdm", description="Registered-model name used by `facelab promote` unless overridden.")
    description: str = ""
    data: KeyframeData = KeyframeData()
    model: MDMModel = MDMModel()
    optim: MDMOptim = MDMOptim()
    train: Train = Train()  # the same training-loop settings as CTEG's
    eval: MDMEval = MDMEval()


METRICS = frozenset({"val/loss", "train/loss", *(f"test/{m}" for m in TEST_METRICS)})
