"""The KeyframeFace LoRA-LM job schema (Wu et al. 2025, §4-§5.2): data, base model + LoRA, prompt, optimiser, training, evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from facelab.core.config import Strict
from facelab.tasks.keyframes.config import KeyframeData
from facelab.tasks.keyframes.metrics import TEST_METRICS

TINY_LM = "models/tiny-qwen3"  # DVC stage `tiny_lm`: a random-init Qwen3-architecture model, not pretrained


class KeyframeModel(Strict):
    base_model: str = Field(
        TINY_LM,
        description="Causal LM: a directory (relative to the project root or absolute) or a Hugging Face id "
        "already in the local cache. Paper: Qwen/Qwen3-4B-Instruct-2507, Qwen/Qwen3-14B, "
        "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B. Default: the tiny random-init model the `tiny_lm` stage builds.",
    )
    lora: bool = Field(True, description="LoRA fine-tuning (§5.2); false = full fine-tuning (tiny models only).")
    lora_r: int = Field(8, ge=1, description="LoRA rank r (§5.2: 8).")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling α (§5.2: 32).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA branch.")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto = bfloat16 on GPU, float32 on CPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (less memory).")


class KeyframePrompt(Strict):
    format: Literal["semantic", "non_semantic"] = Field(
        "semantic",
        description="§5.1: semantic = system prompt + JSON with ARKit names; non_semantic = plain numeric vector.",
    )
    glossary: bool = Field(
        True,
        description="Semantic format: explain every ARKit parameter in the system prompt (the non_semantic format has no system prompt; ignored there).",
    )
    target_frame_instruction: bool = Field(True, description="End the request with the Target Frame Instruction (§4).")
    max_tokens: int = Field(
        4096, ge=64, description="Training examples longer than this (prompt + answer) are refused."
    )


class KeyframeOptim(Strict):
    batch_size: int = Field(8, ge=1, description="Requests (one per keyframe) per optimizer step, summed over workers.")
    lr: float = Field(1e-4, gt=0.0, description="AdamW peak learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.05, ge=0.0, lt=1.0, description="Linear warmup as a fraction of all steps, then cosine decay."
    )
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the gradient norm to this value; null = off.")


class KeyframeTrain(Strict):
    finetune: bool = Field(True, description="false = evaluate the base model as is (the tables' 'Base' rows).")
    epochs: int = Field(90, ge=1, description='Training epochs (§5.2: "for 90 epochs").')
    seed: int = Field(0, description="Seed for adapter init, data order (a sweep sets it per trial).")
    max_steps_per_epoch: int | None = Field(
        None, ge=1, description="Cap on optimizer steps per epoch; null = full epoch."
    )
    max_val_batches: int | None = Field(
        None, ge=1, description="Cap on validation batches; null = the whole val split."
    )
    checkpoints_to_keep: int = Field(2, ge=1, description="Ray Train keeps this many newest checkpoints per trial.")
    max_failures: int = Field(
        1, ge=0, description="Worker-group restarts allowed per trial (resumes from the last checkpoint)."
    )
    log_every_steps: int = Field(10, ge=1, description="Per-step loss is logged every N optimizer steps.")


class KeyframeEval(Strict):
    enabled: bool = Field(True, description="Generate the test split's keyframes after the last epoch and score them.")
    baseline: Literal["gt"] | None = Field(
        None, description="gt = score the ground truth (the tables' GT row, see gt_reference); no model."
    )
    gt_reference: Literal["val", "halves", "self"] = Field(
        "val",
        description="GT row: the sample of real keyframes the test keyframes are compared with (FID, W-Dist). "
        "val = the val split (disjoint scripts, about the test split's size: the sampling-noise floor of the "
        "model rows; Table 3's GT row has FID 0.0115, W-Dist 0.0055, so two different samples); halves = the "
        "test split's scripts in two random halves; self = the test keyframes themselves (FID = W-Dist = 0, "
        "MSE reported as 0).",
    )
    decode: Literal["constrained", "plain"] = Field(
        "plain",
        description="How the test split is generated. plain = unconstrained greedy `generate` of the whole "
        "answer (the release: infer.sh, temperature 0, max_new_tokens 1024); constrained = only the values are "
        "decoded, the JSON skeleton is forced (fast, always parseable, always in range).",
    )
    serve_decode: Literal["constrained", "plain"] = Field(
        "constrained",
        description="How a promoted model decodes POST /v1/keyframes (independent of `decode`): constrained "
        "(always parseable and in range; the serving default) or plain.",
    )
    parse: Literal["release", "facelab"] = Field(
        "release",
        description="What the metrics score of an answer. release = the release's converter (jsonl2csv.py: the "
        "last balanced JSON object, its 61-name mapping or its first Keyframe_x object, missing names 0); an "
        "answer it cannot read is dropped from the metrics (counted in test/validity). facelab = the lenient "
        "parser, an unreadable answer scored as the zero keyframe. Values are scored as written in both "
        "(never clipped).",
    )
    max_new_tokens: int = Field(1024, ge=8, description="Plain decoding: generation budget per keyframe.")
    batch_size: int = Field(8, ge=1, description="Requests generated in parallel.")
    evaluator: str | None = Field(
        None,
        description="Registered text–motion evaluator, 'NAME@ALIAS' or 'NAME/VERSION' (Appendix C); resolved to "
        "one version when the sweep starts. null = FID, R-Precision, MMD and Diversity are not computed.",
    )
    diversity_pairs: int = Field(300, ge=2, description="Pairs for Diversity (T2M protocol).")
    diversity_space: Literal["arkit", "embedding"] = Field(
        "arkit",
        description="Diversity on the raw ARKit values (Table 3's 2.95 is impossible on unit vectors) or on "
        "the evaluator's unit-norm embeddings (every distance at most 2).",
    )
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


METRICS = frozenset({"val/loss", "train/loss", *(f"test/{m}" for m in TEST_METRICS)})
