"""Job and sweep specifications: schema (pydantic), loading, ``--set`` overrides, validation.

Everything a user writes in YAML is checked here, once, at the entry point. Validation collects
every problem (YAML syntax with its line, unknown keys, wrong types, a missing job file, override
dot-paths that do not exist in the job config, empty search spaces, conflicting options) and
raises a single :class:`SpecError` listing them with their key paths, before Ray or MLflow is
touched. Modules downstream receive typed objects, never raw dicts.
"""

from __future__ import annotations

import copy
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class SpecError(ValueError):
    """One or more problems in a job or sweep spec; ``problems`` lists them with key paths."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s):\n{lines}")


class Strict(BaseModel):
    """Base model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# Job: CTEG
# --------------------------------------------------------------------------------------------


class CTEGData(Strict):
    path: str = Field("data/emoava", description="Dataset directory (DVC output), relative to the project root.")
    max_frames: int = Field(256, ge=1, description="Training sequences are cut to this many frames (the paper's MSL, §5.1).")
    train_subset: int | None = Field(None, ge=1, description="Use only the first N training pairs (quick runs); null = all.")
    dev_subset: int | None = Field(None, ge=1, description="Use only the first N dev pairs for validation; null = all.")


class CTEGModel(Strict):
    text_encoder: str = Field("minilm", description="Pretrained text encoder: 'minilm' (offline default) or a local path / HF id (paper: bert-base-cased).")
    finetune_encoder: bool = Field(False, description="Train the text encoder too (Table 6 'w. BERT fine-tuning').")
    max_text_tokens: int = Field(128, ge=4, description="Text is truncated to this many tokens.")
    d_model: int = Field(768, ge=8, description="Transformer width (§5.1).")
    n_heads: int = Field(12, ge=1, description="Attention heads (§5.1).")
    ff_dim: int = Field(2048, ge=8, description="Feed-forward width (§5.1).")
    cvad_layers: int = Field(1, ge=1, le=8, description="Stacked CVAD layers N_c (Figure 9).")
    latent_dim: int = Field(768, ge=1, description="Size of the per-step latent z_t (§3.4).")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout rate.")
    ewa: bool = Field(True, description="Expression-wise Attention input block (§3.3); false = linear projection.")
    ewa_dim: int = Field(64, ge=1, description="Latent size of the EwA cross-attention (§3.3).")
    ewa_heads: int = Field(4, ge=1, description="Heads of the EwA cross-attention (§3.3).")
    lta: Literal["attention", "pooling", "none"] = Field("attention", description="Latent Temporal Attention variant (§3.4, Table 6).")
    target_guided: bool = Field(True, description="Target-guided loss L_g (§3.5, Eq. 8).")
    share_projection: bool = Field(False, description="Share projections (Table 6 'w. sharing').")
    stop_threshold: float = Field(1.0, gt=0.0, description="Decoding stops when a frame is this close (L2) to the zero face (§3.6).")
    output_sigma: float = Field(1.0, ge=0.0, description="σ of the output Gaussian N(μ_g, σ²) (Eq. 5: σ = 1); 0 = use μ_g.")
    kl_reduction: Literal["sum", "mean"] = Field("sum", description="KL over latent dims: exact 'sum', or the reference code's 'mean'.")
    scale_embedding: bool = Field(True, description="Scale projected expressions by √d_model before the PE (reference -scale_emb).")

    @model_validator(mode="after")
    def _heads_divide(self) -> "CTEGModel":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.ewa_dim % self.ewa_heads:
            raise ValueError(f"ewa_dim ({self.ewa_dim}) must be divisible by ewa_heads ({self.ewa_heads})")
        return self


class Optim(Strict):
    batch_size: int = Field(32, ge=1, description="Sequences per optimizer step, summed over all workers.")
    lr_mul: float = Field(1.0, gt=0.0, description="Multiplier on the Noam learning rate (Eq. 10).")
    warmup: int = Field(4000, ge=1, description="Noam warmup steps (Eq. 10).")
    betas: tuple[float, float] = Field((0.9, 0.98), description="Adam betas.")
    eps: float = Field(1e-9, gt=0.0, description="Adam epsilon.")
    grad_clip: float | None = Field(None, gt=0.0, description="Clip the gradient norm to this value; null = off.")


class Train(Strict):
    epochs: int = Field(50, ge=1, description="Training epochs.")
    seed: int = Field(0, description="Seed for weights, data order and sampling (a sweep sets it per trial).")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on optimizer steps per epoch (quick runs); null = full epoch.")
    max_val_batches: int | None = Field(None, ge=1, description="Cap on validation batches; null = the whole dev split.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train keeps this many newest checkpoints per trial.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts allowed per trial (resumes from the last checkpoint).")
    log_every_steps: int = Field(10, ge=1, description="Per-step loss terms (KL curve, Figure 5) are logged every N optimizer steps.")


class CTEGEval(Strict):
    """Test-split evaluation after training (paper Appendix D) and the §5.3 baselines."""

    baseline: Literal["gt", "shuffle", "random"] | None = Field(
        None, description="null = train and evaluate CTEG; gt | shuffle | random = evaluate that §5.3 baseline row instead (no training).")
    max_frames: int = Field(256, ge=1, description="Maximum generated sequence length (MSL) at evaluation (Table 2: 256 and 64).")
    n_diversity: int = Field(750, ge=2, description="Pairs of text-free generations for Diversity (Eq. 11, N_d).")
    n_mmodality: int = Field(1500, ge=1, description="Texts with two samples each for MModality (Eq. 12, N_m).")
    n_bootstrap: int = Field(1000, ge=10, description="Bootstrap resamples for the standard errors.")
    max_texts: int | None = Field(None, ge=1, description="Evaluate on the first N test pairs only (quick runs); null = all 1,500.")
    batch_size: int = Field(64, ge=1, description="Sequences decoded in parallel.")
    delta: float = Field(0.8, gt=0, description="Cppl box half-width δ (Eq. 16).")
    sigma: float = Field(0.2, gt=0, description="Cppl Gaussian σ (Eq. 17).")
    cppl_region: Literal["cdf_difference", "box"] = Field(
        "cdf_difference", description="Cppl probability: the reference's CDF difference F(x+δ)−F(x−δ), or the box mass.")
    enabled: bool = Field(True, description="Run the test-split evaluation after the last epoch.")


class CTEGJob(Strict):
    kind: Literal["cteg"] = "cteg"
    name: str = Field("cteg", description="Registered-model name used by `facelab promote` unless overridden.")
    description: str = ""
    data: CTEGData = CTEGData()
    model: CTEGModel = CTEGModel()
    optim: Optim = Optim()
    train: Train = Train()
    eval: CTEGEval = CTEGEval()


# --------------------------------------------------------------------------------------------
# Job: KeyframeFace (LoRA-tuned causal LM → 61-channel ARKit keyframes)
# --------------------------------------------------------------------------------------------

TINY_LM = "models/tiny-qwen3"  # DVC stage `tiny_lm`: a random-init Qwen3-architecture model, not pretrained


class KeyframeData(Strict):
    path: str = Field("data/keyframeface", description="Dataset directory (DVC output), relative to the project root.")
    annotation: Literal["original", "arkit", "image"] = Field(
        "arkit", description="Keyframe description type in the prompt (§3: original, ARKit-based or image-based annotation).")
    train_subset: int | None = Field(None, ge=1, description="Use only the first N training scripts (quick runs); null = all.")
    val_subset: int | None = Field(None, ge=1, description="Use only the first N validation scripts; null = all.")
    test_subset: int | None = Field(None, ge=1, description="Evaluate on the first N test scripts only; null = all.")


class KeyframeModel(Strict):
    base_model: str = Field(
        TINY_LM, description="Causal LM: a directory (relative to the project root or absolute) or a Hugging Face id "
        "already in the local cache. Paper: Qwen/Qwen3-4B-Instruct-2507, Qwen/Qwen3-14B, "
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B. Default: the tiny random-init model the `tiny_lm` stage builds.")
    lora: bool = Field(True, description="LoRA fine-tuning (§5.2); false = full fine-tuning (tiny models only).")
    lora_r: int = Field(8, ge=1, description="LoRA rank r (§5.2: 8).")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling α (§5.2: 32).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto = bfloat16 on GPU, float32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")


class KeyframePrompt(Strict):
    format: Literal["semantic", "non_semantic"] = Field(
        "semantic", description="§5.1: semantic = system prompt + JSON with ARKit names; non_semantic = plain numeric vector.")
    glossary: bool = Field(True, description="Semantic format: explain every ARKit parameter in the system prompt (the non_semantic format has no system prompt; ignored there).")
    target_frame_instruction: bool = Field(True, description="End the request with the Target Frame Instruction (§4).")
    max_tokens: int = Field(4096, ge=64, description="Training examples longer than this (prompt + answer) are refused.")


class KeyframeOptim(Strict):
    batch_size: int = Field(8, ge=1, description="Requests (one per keyframe) per optimizer step, summed over workers.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0, description="Linear warmup as a fraction of all steps, then cosine decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the gradient norm to this value; null = off.")


class KeyframeTrain(Strict):
    finetune: bool = Field(True, description="false = evaluate the base model as is (the tables' 'Base' rows).")
    epochs: int = Field(3, ge=1, description="Training epochs.")
    seed: int = Field(0, description="Seed for adapter init, data order (a sweep sets it per trial).")
    max_steps_per_epoch: int | None = Field(None, ge=1, description="Cap on optimizer steps per epoch; null = full epoch.")
    max_val_batches: int | None = Field(None, ge=1, description="Cap on validation batches; null = the whole val split.")
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train keeps this many newest checkpoints per trial.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts allowed per trial (resumes from the last checkpoint).")
    log_every_steps: int = Field(10, ge=1, description="Per-step loss is logged every N optimizer steps.")


class KeyframeEval(Strict):
    enabled: bool = Field(True, description="Generate the test split's keyframes after the last epoch and score them.")
    baseline: Literal["gt"] | None = Field(None, description="gt = score the ground truth itself (the tables' GT row); no model.")
    decode: Literal["constrained", "plain"] = Field(
        "constrained", description="constrained = only the values are decoded, the JSON skeleton is forced (fast, always "
        "parseable); plain = unconstrained greedy `generate` of the whole answer.")
    max_new_tokens: int = Field(1024, ge=8, description="Plain decoding: generation budget per keyframe.")
    batch_size: int = Field(8, ge=1, description="Requests generated in parallel.")
    evaluator: str | None = Field(
        None, description="Registered text–motion evaluator, 'NAME@ALIAS' or 'NAME/VERSION' (Appendix C); resolved to "
        "one version when the sweep starts. null = FID, R-Precision, MMD and Diversity are not computed.")
    diversity_pairs: int = Field(300, ge=2, description="Pairs for Diversity (T2M protocol).")
    r_precision_batch: int = Field(32, ge=2, description="R-Precision batch size (Appendix C: 32).")


class KeyframeJob(Strict):
    kind: Literal["keyframe"] = "keyframe"
    name: str = Field("keyframe", description="Registered-model name used by `facelab promote` unless overridden.")
    description: str = ""
    data: KeyframeData = KeyframeData()
    model: KeyframeModel = KeyframeModel()
    prompt: KeyframePrompt = KeyframePrompt()
    optim: KeyframeOptim = KeyframeOptim()
    train: KeyframeTrain = KeyframeTrain()
    eval: KeyframeEval = KeyframeEval()



# --------------------------------------------------------------------------------------------
# Job: the contrastive text–motion evaluator (KeyframeFace Appendix C)
# --------------------------------------------------------------------------------------------


class EvaluatorData(Strict):
    path: str = Field("data/keyframeface", description="Dataset directory (DVC output), relative to the project root.")
    train_subset: int | None = Field(None, ge=1, description="Use only the first N training scripts; null = all.")


class EvaluatorModel(Strict):
    text_encoder: str = Field("minilm", description="Frozen pretrained text encoder ('minilm' offline default, or a local path).")
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
    epochs: int = Field(100, ge=1, description="Maximum epochs (cosine schedule over them).")
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


# --------------------------------------------------------------------------------------------
# Job: LM-Listener baseline (Ng et al. 2023: VQ-VAE over FLAME expressions + text-conditioned LM)
# --------------------------------------------------------------------------------------------


class LMListenerModel(Strict):
    text_encoder: str = Field("minilm", description="Frozen text encoder: 'minilm' (offline default) or a local path / HF id.")
    max_text_tokens: int = Field(128, ge=4, description="Text is truncated to this many tokens.")
    codebook_size: int = Field(256, ge=2, description="VQ-VAE codebook entries K.")
    code_dim: int = Field(128, ge=4, description="Size of a codebook vector.")
    downsample: int = Field(4, ge=1, le=32, description="Frames per code (temporal downsampling of the VQ-VAE encoder).")
    vq_hidden: int = Field(256, ge=8, description="Channels of the VQ-VAE's temporal convolutions.")
    vq_layers: int = Field(2, ge=1, le=8, description="Residual conv blocks per VQ-VAE encoder/decoder.")
    commitment: float = Field(0.25, ge=0.0, description="VQ-VAE commitment weight β.")
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="Codebook EMA decay (0 = codebook loss instead of EMA).")
    dead_code_threshold: float = Field(1.0, ge=0.0, description="EMA codebook: a code used less than this often (EMA count) is restarted on a batch vector.")
    text_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Code LM: drop the text with this probability in training (trains the unconditional mode).")
    d_model: int = Field(256, ge=8, description="Code LM transformer width.")
    n_heads: int = Field(4, ge=1, description="Code LM attention heads.")
    n_layers: int = Field(4, ge=1, le=24, description="Code LM transformer layers.")
    ff_dim: int = Field(1024, ge=8, description="Code LM feed-forward width.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout rate.")
    top_p: float = Field(0.8, gt=0.0, le=1.0, description="Nucleus sampling p at generation (the CTEG paper's comparison: 0.8).")
    cppl_top_k: int = Field(16, ge=1, description="Cppl: expected frame over the LM's k most likely next codes (renormalised).")

    @model_validator(mode="after")
    def _heads_divide(self) -> "LMListenerModel":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


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
    data: CTEGData = CTEGData()
    model: LMListenerModel = LMListenerModel()
    optim: LMListenerOptim = LMListenerOptim()
    train: LMListenerTrain = LMListenerTrain()
    eval: CTEGEval = CTEGEval()


# --------------------------------------------------------------------------------------------
# Job: Express4D-MDM baseline (KeyframeFace Table 3: a motion diffusion model over ARKit keyframes)
# --------------------------------------------------------------------------------------------


class MDMModel(Strict):
    text_encoder: str = Field("minilm", description="Frozen text encoder; the paper's MDM uses CLIP, here the offline MiniLM (documented substitution).")
    max_text_tokens: int = Field(64, ge=4, description="Text is truncated to this many tokens.")
    d_model: int = Field(256, ge=8, description="Denoiser transformer width.")
    n_heads: int = Field(4, ge=1, description="Denoiser attention heads.")
    n_layers: int = Field(4, ge=1, le=24, description="Denoiser transformer layers.")
    ff_dim: int = Field(1024, ge=8, description="Denoiser feed-forward width.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout rate.")
    diffusion_steps: int = Field(1000, ge=2, description="DDPM training steps T (MDM: 1000).")
    noise_schedule: Literal["cosine", "linear"] = Field("cosine", description="β schedule (MDM: cosine).")
    prediction: Literal["x0", "eps"] = Field("x0", description="What the denoiser predicts (MDM: the clean sample x0).")
    cond_drop: float = Field(0.1, ge=0.0, lt=1.0, description="Probability of dropping the text in training (classifier-free guidance).")

    @model_validator(mode="after")
    def _heads_divide(self) -> "MDMModel":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        return self


class MDMOptim(Strict):
    batch_size: int = Field(64, ge=1, description="Scripts per optimizer step, summed over all workers.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW learning rate (MDM: 1e-4).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the gradient norm to this value; null = off.")


class MDMEval(Strict):
    enabled: bool = Field(True, description="Sample the test split's keyframes after the last epoch and score them.")
    sampling_steps: int = Field(50, ge=1, description="Denoising steps at sampling (respaced from the T training steps).")
    guidance_scale: float = Field(2.5, ge=0.0, description="Classifier-free guidance scale s (MDM: 2.5; 1 = off, 0 = unconditional).")
    batch_size: int = Field(64, ge=1, description="Scripts sampled in parallel.")
    evaluator: str | None = Field(None, description="Registered text–motion evaluator, as for `keyframe` jobs.")
    diversity_pairs: int = Field(300, ge=2, description="Pairs for Diversity (T2M protocol).")
    r_precision_batch: int = Field(32, ge=2, description="R-Precision batch size (Appendix C: 32).")


class KeyframeMDMJob(Strict):
    kind: Literal["keyframe_mdm"] = "keyframe_mdm"
    name: str = Field("keyframe-mdm", description="Registered-model name used by `facelab promote` unless overridden.")
    description: str = ""
    data: KeyframeData = KeyframeData()
    model: MDMModel = MDMModel()
    optim: MDMOptim = MDMOptim()
    train: Train = Train()             # the same training-loop settings as CTEG's
    eval: MDMEval = MDMEval()


# Discriminated on ``kind``; further job families add themselves here.
JOB_TYPES: dict[str, type[Strict]] = {"cteg": CTEGJob, "keyframe": KeyframeJob, "keyframe_evaluator": EvaluatorJob,
                                      "lm_listener": LMListenerJob, "keyframe_mdm": KeyframeMDMJob}


# --------------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------------

SWEEP_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class Metric(Strict):
    name: str = Field(..., min_length=1, description="A metric reported by the job, e.g. 'val/loss'.")
    goal: Literal["minimize", "maximize"] = "minimize"


class Parameter(Strict):
    """One search dimension, W&B-style: ``values`` | ``value`` | ``distribution`` + ``min``/``max``."""

    values: list[Any] | None = None
    value: Any = None
    distribution: Literal["uniform", "log_uniform", "int_uniform"] | None = None
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "Parameter":
        forms = [self.values is not None, "value" in self.model_fields_set, self.distribution is not None]
        if sum(forms) != 1:
            raise ValueError("give exactly one of 'values', 'value' or 'distribution' (+ 'min'/'max')")
        if self.values is not None and not self.values:
            raise ValueError("'values' is empty: the search space has no points")
        if self.distribution is not None:
            if self.min is None or self.max is None:
                raise ValueError(f"distribution '{self.distribution}' needs both 'min' and 'max'")
            if not self.min < self.max:
                raise ValueError(f"'min' ({self.min}) must be below 'max' ({self.max})")
            if self.distribution == "log_uniform" and self.min <= 0:
                raise ValueError("log_uniform needs min > 0")
        elif self.min is not None or self.max is not None:
            raise ValueError("'min'/'max' only go with 'distribution'")
        return self

    def grid_points(self) -> list[Any] | None:
        """The finite list of points, or None for a continuous distribution."""
        if self.values is not None:
            return list(self.values)
        if self.distribution is None:
            return [self.value]
        return None


class EarlyTerminate(Strict):
    type: Literal["asha"] = "asha"
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2.0, gt=1.0, description="ASHA halving rate.")
    max_t: int | None = Field(None, ge=1, description="Epoch budget for ASHA's rungs; default: the job's train.epochs.")


class Resources(Strict):
    num_workers: int = Field(1, ge=1, le=512, description="Ray Train workers (DDP ranks) per trial.")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs per worker; 0 trains on CPU (gloo).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per worker.")


class SweepSpec(Strict):
    name: str = Field(..., pattern=SWEEP_NAME_RE, description="MLflow experiment and sweep id.")
    job: str = Field(..., description="Path of the job YAML, relative to the project root.")
    description: str = ""
    metric: Metric
    method: Literal["grid", "random", "optuna"] = "grid"
    variants: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"default": {}})
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    seeds: list[int] = Field(default_factory=lambda: [0])
    num_samples: int = Field(1, ge=1, description="random/optuna: samples per variant x seed (optuna: total trials per variant x seed).")
    early_terminate: EarlyTerminate | None = None
    resources: Resources = Resources()
    max_concurrent_trials: int = Field(1, ge=1)

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: dict) -> dict:
        if not v:
            raise ValueError("empty: give at least one variant (e.g. 'default: {}')")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("empty: give at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicates in {v}")
        return v

    @model_validator(mode="after")
    def _grid_points(self) -> "SweepSpec":
        bad = [k for k, p in self.parameters.items() if p.grid_points() is None]
        if self.method == "grid" and bad:
            raise ValueError(grid_problem(bad[0]))
        return self


def grid_problem(key: str) -> str:
    return (f"parameters.{key}: method 'grid' needs 'values' or 'value', not a distribution "
            "(use method: random or optuna)")


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping; syntax errors name the file and line."""
    if not path.is_file():
        raise SpecError(str(path), ["file not found"])
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(str(path), [f"YAML syntax error at {where}{problem}"]) from None
    except UnicodeDecodeError as exc:
        raise SpecError(str(path), [f"not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(str(path), [f"top level must be a mapping, got {type(data).__name__}"])
    return data


def _fmt_loc(prefix: str, loc: tuple) -> str:
    path = ".".join(str(p) for p in loc)
    return ".".join(x for x in (prefix, path) if x) or "(top level)"


def pydantic_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    out = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        out.append(f"{_fmt_loc(prefix, err['loc'])}: {msg}")
    return out


def parse_set(items: list[str]) -> list[tuple[str, Any]]:
    """``KEY=VALUE`` strings → (key, YAML-parsed value) pairs."""
    out, problems = [], []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key):
            problems.append(f"--set {item!r}: expected KEY=VALUE with a dotted KEY")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out.append((key, value))
    if problems:
        raise SpecError("command line", problems)
    return out


def has_path(model_cls: type[BaseModel], dotted: str) -> bool:
    """Is ``dotted`` a field path of the pydantic model class (nested models followed)?"""
    cls: Any = model_cls
    for part in dotted.split("."):
        fields = getattr(cls, "model_fields", None)
        if fields is None or part not in fields:
            return False
        cls = fields[part].annotation
    return True


def set_path(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, last = dotted.split(".")
    for part in parents:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[last] = value


def apply_overrides(base: dict, overrides: dict[str, Any]) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        set_path(out, key, value)
    return out


def job_class(raw: dict, source: str) -> type[Strict]:
    kind = raw.get("kind", "cteg")
    if kind not in JOB_TYPES:
        raise SpecError(source, [f"kind: unknown job kind {kind!r}; known: {sorted(JOB_TYPES)}"])
    return JOB_TYPES[kind]


def validate_job(raw: dict, source: str, prefix: str = "") -> Strict:
    cls = job_class(raw, source)
    try:
        return cls.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(source, pydantic_problems(exc, prefix)) from None


def load_job(path: str | Path, sets: list[str] | None = None) -> tuple[Strict, dict]:
    """Load and validate a job YAML with ``--set`` overrides → (typed job, resolved dict)."""
    path = Path(path)
    raw = read_yaml(path)
    cls = job_class(raw, str(path))
    problems = []
    for key, value in parse_set(sets or []):
        if not has_path(cls, key):
            problems.append(f"--set {key}: not a key of the {cls.__name__} config")
        else:
            set_path(raw, key, value)
    if problems:
        raise SpecError(str(path), problems)
    job = validate_job(raw, str(path))
    return job, job.model_dump(mode="json")


SWEEP_KEYS = set(SweepSpec.model_fields)


@dataclass
class LoadedSweep:
    spec: SweepSpec
    job: Strict                    # the base job, ``--set`` job overrides applied
    job_dict: dict                 # same, as a plain dict
    source: Path
    job_path: Path
    trials: list["TrialPlan"] = field(default_factory=list)
    variant_jobs: dict[str, dict] = field(default_factory=dict)  # variants with their own job file → that job

    def job_for(self, variant: str) -> dict:
        """The base job of a variant's trials (its own job file, or the sweep's)."""
        return self.variant_jobs.get(variant, self.job_dict)


@dataclass(frozen=True)
class TrialPlan:
    """One trial as planned before Ray starts (``--dry-run`` prints these)."""

    variant: str
    seed: int
    params: dict[str, Any]          # fixed values, or a '<dist ...>' label for sampled ones

    @property
    def name(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.variant} | seed={self.seed}" + (f" | {extra}" if extra else "")

    def overrides(self, variants: dict[str, dict]) -> dict[str, Any]:
        out = dict(variants[self.variant])
        out.update({k: v for k, v in self.params.items() if not (isinstance(v, str) and v.startswith("<"))})
        out["train.seed"] = self.seed
        return out


def plan_trials(spec: SweepSpec) -> list[TrialPlan]:
    """Expand variants x parameters x seeds into the trial list (sampled dims shown as labels)."""
    fixed, sampled = {}, {}
    for key, p in spec.parameters.items():
        pts = p.grid_points()
        if pts is None:
            sampled[key] = f"<{p.distribution} {p.min}..{p.max}>"
        else:
            fixed[key] = pts
    out = []
    for variant in spec.variants:
        for seed in spec.seeds:
            if spec.method == "grid":
                keys = list(fixed)
                for combo in itertools.product(*(fixed[k] for k in keys)):
                    out.append(TrialPlan(variant, seed, dict(zip(keys, combo))))
            else:
                for _ in range(spec.num_samples):
                    labels = {k: (v[0] if len(v) == 1 else f"<one of {v}>") for k, v in fixed.items()}
                    out.append(TrialPlan(variant, seed, {**labels, **sampled}))
    return out


def load_sweep(path: str | Path, sets: list[str] | None = None, root: Path | None = None) -> LoadedSweep:
    """Load a sweep YAML and its job, apply ``--set``, validate everything, plan the trials.

    ``--set`` keys that are sweep fields (``seeds``, ``resources.num_workers`` …) change the
    sweep; any other key (``train.epochs`` …), or one prefixed ``job.``, changes the base job.
    All problems are collected and raised once as :class:`SpecError`.
    """
    path = Path(path)
    root = root or Path.cwd()
    raw = read_yaml(path)
    problems: list[str] = []
    job_sets: dict[str, Any] = {}
    for key, value in parse_set(sets or []):
        if key.startswith("job."):
            job_sets[key[4:]] = value
        elif key.split(".")[0] in SWEEP_KEYS:
            set_path(raw, key, value)
        else:
            job_sets[key] = value

    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as exc:
        problems += pydantic_problems(exc)
        spec = None
        if raw.get("method", "grid") == "grid" and isinstance(raw.get("parameters"), dict):
            problems += [grid_problem(k) for k, p in raw["parameters"].items()
                         if isinstance(p, dict) and "distribution" in p]

    job_ref = raw.get("job")
    job_path = (root / job_ref) if isinstance(job_ref, str) else None
    variants = raw.get("variants") if isinstance(raw.get("variants"), dict) else {"default": {}}
    params = raw.get("parameters") if isinstance(raw.get("parameters"), dict) else {}
    base_job, cls = _load_job_file(root, job_ref, "job", job_sets, problems) if isinstance(job_ref, str) else (None, None)

    # A variant may name its own job file (``job: jobs/other.yaml``): a different model family
    # in the same sweep, e.g. a learned baseline as one row of a paper table.
    jobs: dict[str, tuple[Strict | None, type[Strict] | None]] = {}
    for vname, overrides in variants.items():
        if not isinstance(overrides, dict):
            continue
        ref = overrides.get("job")
        if ref is None:
            jobs[vname] = (base_job, cls)
        elif not isinstance(ref, str):
            problems.append(f"variants.{vname}.job: must be a job file path, got {ref!r}")
        else:
            jobs[vname] = _load_job_file(root, ref, f"variants.{vname}.job", job_sets, problems)
    unused = [k for k in job_sets if not any(c is not None and has_path(c, k) for _j, c in [(base_job, cls), *jobs.values()])]
    for key in unused:
        problems.append(f"--set {key}: not a sweep key nor a key of any job config of this sweep")

    # Dot-paths of variants/parameters must exist in the job config and give a valid job.
    for vname, (vjob, vcls) in jobs.items():
        if vcls is None:
            continue
        overrides = {str(k): v for k, v in variants[vname].items() if k != "job"}
        for key in overrides:
            if not has_path(vcls, key):
                problems.append(f"variants.{vname}.{key}: not a key of the {vcls.__name__} config")
        for key in params:
            if not has_path(vcls, str(key)):
                problems.append(f"parameters.{key}: not a key of the {vcls.__name__} config"
                                + (f" (variant {vname!r})" if vcls is not cls else ""))
        reported = JOB_METRICS.get(getattr(vcls.model_fields.get("kind"), "default", None))
        if reported and isinstance(raw.get("metric"), dict):
            name = raw["metric"].get("name")
            if isinstance(name, str) and name not in reported:
                problems.append(f"metric.name: {name!r} is not reported by the {vcls.model_fields['kind'].default} job"
                                + (f" of variant {vname!r}" if vcls is not cls else "") + f"; choose one of {sorted(reported)}")
        if vjob is None:
            continue
        # Every concrete override must give a valid job (types, ranges, cross-field rules).
        base = vjob.model_dump(mode="json")
        known = {k: v for k, v in overrides.items() if has_path(vcls, k)}
        try:
            vcls.model_validate(apply_overrides(base, known))
        except ValidationError as exc:
            problems += pydantic_problems(exc, prefix=f"variants.{vname}")
        for key, p in params.items():
            if not (isinstance(p, dict) and has_path(vcls, str(key))):
                continue
            if isinstance(p.get("values"), list):
                points = p["values"]
            elif "value" in p:
                points = [p["value"]]
            else:
                points = [int(b) if p.get("distribution") == "int_uniform" and isinstance(b, (int, float)) else b
                          for b in (p.get("min"), p.get("max")) if b is not None]
            for i, point in enumerate(points):
                try:
                    vcls.model_validate(apply_overrides(base, {str(key): point}))
                except ValidationError as exc:
                    problems += [f"parameters.{key}[{i}] = {point!r}: " + e.split(": ", 1)[1]
                                 for e in pydantic_problems(exc)]
        bs = getattr(getattr(vjob, "optim", None), "batch_size", None)
        if spec is not None and bs is not None and bs < spec.resources.num_workers:
            problems.append(f"resources.num_workers: {spec.resources.num_workers} workers cannot split optim.batch_size {bs}"
                            + (f" (variant {vname!r})" if vcls is not cls else ""))
    if "train.seed" in params:
        problems.append("parameters.train.seed: set seeds with the sweep's 'seeds' list")

    if problems:
        # Keep order, drop exact duplicates (the same bad variant seen for several seeds).
        raise SpecError(str(path), list(dict.fromkeys(problems)))
    assert spec is not None and base_job is not None and job_path is not None
    variant_jobs = {v: j.model_dump(mode="json") for v, (j, _c) in jobs.items() if j is not base_job and j is not None}
    for v in spec.variants:  # from here on a variant is its overrides only
        spec.variants[v] = {k: val for k, val in spec.variants[v].items() if k != "job"}
    return LoadedSweep(spec=spec, job=base_job, job_dict=base_job.model_dump(mode="json"),
                       source=path, job_path=job_path, trials=plan_trials(spec), variant_jobs=variant_jobs)


def _load_job_file(root: Path, ref: str, where: str, job_sets: dict[str, Any],
                   problems: list[str]) -> tuple[Strict | None, type[Strict] | None]:
    """Read and validate one job file of a sweep (``--set`` job overrides applied where the key
    exists in its config); problems are appended, prefixed with ``where``."""
    job_path = root / ref
    if not job_path.is_file():
        problems.append(f"{where}: job file '{ref}' does not exist (relative to {root.name or root}/)")
        return None, None
    try:
        job_raw = read_yaml(job_path)
        cls = job_class(job_raw, str(ref))
    except SpecError as exc:
        problems += [f"{where} ({ref}): {p}" for p in exc.problems]
        return None, None
    for key, value in job_sets.items():
        if has_path(cls, key):
            set_path(job_raw, key, value)
    try:
        return cls.model_validate(job_raw), cls
    except ValidationError as exc:
        problems += pydantic_problems(exc, prefix=f"{where} ({ref})")
        return None, cls


# Metrics the cteg worker loop reports each epoch (``metric.name`` must be one of them).
CTEG_METRICS = {"val/loss", "val/mse", "val/kl", "val/lg", "val/cppl", "train/loss", "train/mse", "train/kl", "train/lg",
                *(f"test/{m}" for m in ("cppl", "dot", "fgd", "diversity", "mmodality", "variation"))}

KEYFRAME_TEST = ("mse", "mae", "rmse", "w_dist", "validity", "fid", "r_precision_1", "r_precision_2",
                 "r_precision_3", "mmd", "diversity")
KEYFRAME_METRICS = {"val/loss", "train/loss", *(f"test/{m}" for m in KEYFRAME_TEST)}
EVALUATOR_METRICS = {"val/loss", "train/loss", "val/r_precision_1", "val/r_precision_2", "val/r_precision_3"}
# lm_listener: val/loss and train/loss are the current stage's objective (stage 1 VQ-VAE, stage 2 code LM).
LM_LISTENER_METRICS = {"val/loss", "train/loss", "val/vq_loss", "train/vq_loss", "val/recon_mse", "val/code_ce",
                       "val/code_perplexity", "val/cppl", *(f"test/{m}" for m in ("cppl", "dot", "fgd", "diversity",
                                                                                  "mmodality", "variation"))}
MDM_METRICS = {"val/loss", "train/loss", *(f"test/{m}" for m in KEYFRAME_TEST)}
JOB_METRICS = {"cteg": CTEG_METRICS, "keyframe": KEYFRAME_METRICS, "keyframe_evaluator": EVALUATOR_METRICS,
               "lm_listener": LM_LISTENER_METRICS, "keyframe_mdm": MDM_METRICS}
