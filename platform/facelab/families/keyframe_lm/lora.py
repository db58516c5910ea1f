"""The §5.2 LoRA adapter: rank 8, α = 32, on every linear layer of the transformer blocks.

KeyframeFace (Wu et al. 2025) fine-tunes Qwen3 with LoRA r = 8, α = 32 on all linear layers,
about 16.5M trainable parameters for Qwen3-4B. "All linear layers" means the seven projections of
each decoder block (``q_proj k_proj v_proj o_proj gate_proj up_proj down_proj``), not the embedding
or the LM head: with Qwen3-4B's shapes (hidden 2560, 36 layers, 32 query / 8 key-value heads of
128, MLP 9728) that is ``r * sum(in + out)`` = 8 * 57,344 * 36 = 16,515,072, the paper's 16.5M
(:func:`lora_param_count`; the test checks peft's count against it on the meta device).
Dropout 0.05 is the MS-SWIFT default the release trains with (the paper does not state it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TARGETS = {
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
"""Named sets of target modules: the paper's ``all-linear`` and an attention-only variant."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters (§5.2 defaults)."""

    r: int = 8
    """Rank of the update ``B @ A``."""
    alpha: int = 32
    """Scale numerator: the update is multiplied by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the adapter's input."""
    target: str = "all-linear"
    """A key of :data:`TARGETS`."""

    def __post_init__(self) -> None:
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            problems.append(f"r must be an integer >= 1, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            problems.append(f"alpha must be > 0, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.target not in TARGETS:
            problems.append(f"target must be one of {sorted(TARGETS)}, got {self.target!r}")
        if problems:
            raise ValueError("LoraSettings: " + "; ".join(problems))


def apply_lora(model: Any, settings: LoraSettings = LoraSettings()) -> Any:
    """Wrap a causal LM in a fresh peft LoRA adapter (base weights frozen) -> ``PeftModel``."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=float(settings.dropout),
        target_modules=list(TARGETS[settings.target]),
        bias="none",
    )
    return get_peft_model(model, config)


def merge_for_inference(model: Any) -> Any:
    """A LoRA ``PeftModel`` → its base model with ``W + (α/r)·B·A`` folded into each targeted weight
    (peft's ``merge_and_unload``); any other model unchanged. For serving only: the adapter is gone
    afterwards. The same function (exact in real arithmetic), at a fraction of the cost: an unmerged
    adapter adds four small kernels and a Python call per targeted projection and forward (252 for
    Qwen3-4B), which dominates a decoding step at small batch. In bfloat16 the merged weight is rounded
    once, so greedy outputs can differ from the unmerged model at near-ties; in float32 the logits
    agree to float rounding (tested)."""
    if hasattr(model, "merge_and_unload") and hasattr(model, "peft_config"):
        return model.merge_and_unload()
    return model


def count_trainable(model: Any) -> int:
    """Number of parameters with ``requires_grad`` (each shared tensor counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lora_param_count(config: Any, settings: LoraSettings = LoraSettings()) -> int:
    """Analytic adapter size for a Qwen/Llama-style config: ``r * (in + out)`` per targeted projection,
    summed over the layers."""
    h = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = config.num_key_value_heads * head_dim
    shapes = {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, config.intermediate_size),
        "up_proj": (h, config.intermediate_size),
        "down_proj": (config.intermediate_size, h),
    }
    per_layer = sum(settings.r * sum(shapes[name]) for name in TARGETS[settings.target])
    return per_layer * config.num_hidden_layers
