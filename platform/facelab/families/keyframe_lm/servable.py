"""Build the KeyframeFace causal LM (+ LoRA) from a resolved job; rebuild a trained adapter from its
checkpoint (only the adapter's tensors are stored; the base model is loaded from ``model.base_model``,
as with any peft adapter)."""

from __future__ import annotations

from pathlib import Path

import torch

from facelab.core import checkpoint as ckpt


def resolve_base_model(name: str, root: Path | None) -> str:
    """A base model named relative to the project (e.g. the DVC-built tiny model) → its directory;
    anything else (an absolute directory, a Hugging Face id in the local cache) unchanged."""
    p = Path(name)
    if not p.is_absolute() and root is not None and (Path(root) / p).is_dir():
        return str(Path(root) / p)
    return name


def _dtype(setting: str, device) -> torch.dtype:
    if setting == "bfloat16" or (setting == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return torch.float32


def build_keyframe_lm(job: dict, root: Path | None, device, trainable: bool = True):
    """(model, tokenizer, info) for a ``keyframe`` job: the base causal LM, with a fresh LoRA adapter
    (§5.2: r, α on every linear layer) or fully trainable (``model.lora: false``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from facelab.families.keyframe_lm.lora import LoraSettings, apply_lora, count_trainable

    m = job["model"]
    path = resolve_base_model(m["base_model"], root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_dtype(m["dtype"], device))
    except OSError as exc:
        raise ckpt.CheckpointError(
            f"model.base_model {m['base_model']!r}: cannot load it offline ({exc.__class__.__name__}); give a model "
            "directory, a Hugging Face id already in the local cache, or run `dvc repro tiny_lm` for the default"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    label = getattr(model.config, "facelab_label", None)
    if m["gradient_checkpointing"] and trainable:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if m["lora"]:
        model = apply_lora(model, LoraSettings(r=m["lora_r"], alpha=m["lora_alpha"], dropout=m["lora_dropout"]))
    if not trainable:
        for p in model.parameters():
            p.requires_grad_(False)
    model.to(device)
    info = {"base_model": m["base_model"], "label": label, "trainable_params": count_trainable(model)}
    return model, tokenizer, info


def keyframe_lm_state(model, job: dict) -> dict[str, torch.Tensor]:
    """What a keyframe checkpoint stores: the adapter's tensors (LoRA) or every weight (full fine-tuning)."""
    if job["model"]["lora"]:
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_keyframe_lm_state(model, weights: dict[str, torch.Tensor], job: dict, where: str = "checkpoint") -> None:
    if job["model"]["lora"]:
        from peft import set_peft_model_state_dict

        expected = set(keyframe_lm_state(model, job))
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ckpt.CheckpointError(
                f"{where}: adapter does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})"
            )
        try:
            set_peft_model_state_dict(model, weights)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{where}: adapter does not fit the model ({exc})") from None
        return
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{where}: weights do not fit the model ({exc})") from None


class ServableKeyframeLM:
    """A loaded keyframe model answering whole scripts (Algorithm 1: one request per keyframe)."""

    def __init__(self, model, tokenizer, job: dict):
        self.model, self.tokenizer, self.job = model, tokenizer, job

    @property
    def label(self) -> str | None:
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        return getattr(base.config, "facelab_label", None)

    def keyframes(self, background: str, emotion: str, descriptions: list[str]):
        """Generate one ParseResult per keyframe description (the descriptions fill the job's annotation type)."""
        from facelab.data.keyframeface import Keyframe, Script
        from facelab.families.keyframe_lm.generate import generate_keyframes
        from facelab.families.keyframe_lm.loop import prompt_config

        cfg = prompt_config(self.job)
        kfs = tuple(
            Keyframe(index=i + 1, descriptions={"original": d, cfg.annotation: d}, values=torch.zeros(61).numpy())
            for i, d in enumerate(descriptions)
        )
        script = Script(script_id="request", actor="unknown", background=background, emotion=emotion, keyframes=kfs)
        e = self.job["eval"]
        with torch.no_grad():
            return generate_keyframes(
                self.model,
                self.tokenizer,
                [script],
                cfg,
                mode=e["decode"],
                max_new_tokens=e["max_new_tokens"],
                batch_size=e["batch_size"],
            )[0]


def load(dirpath: Path, device: str = "cpu", root: Path | None = None) -> ServableKeyframeLM:
    """A :class:`ServableKeyframeLM` from a checkpoint directory, the adapter merged into the weights."""
    from facelab.families.keyframe_lm.lora import merge_for_inference

    config = ckpt.load_config(dirpath)
    weights = ckpt.load_weights(dirpath)
    model, tokenizer, _info = build_keyframe_lm(config, root or Path.cwd(), device, trainable=False)
    load_keyframe_lm_state(model, weights, config, str(Path(dirpath) / ckpt.MODEL_FILE))
    model = merge_for_inference(model).eval()  # the adapter folded into the weights: faster decoding
    return ServableKeyframeLM(model, tokenizer, config)


def servable_info(model: ServableKeyframeLM, config: dict) -> dict:
    """``GET /v1/models`` extras: the base model and its label (the tiny stand-in says so)."""
    return {"base_model": config["model"]["base_model"], "note": model.label}


def lineage(root: Path, job: dict) -> dict[str, str]:
    """A base LM built by a DVC stage (the tiny stand-in) is verified and pinned like the dataset."""
    from facelab.core.lineage import DataLineageError, lock_entry, verify_data

    base = job["model"]["base_model"]
    if not base or Path(base).is_absolute() or not (root / base).exists():
        return {}  # a Hugging Face id or a directory outside the project: not DVC's to pin
    try:
        lock_entry(root, base)
    except DataLineageError:
        return {}  # a local model directory that no stage builds
    return verify_data(root, base).as_tags("facelab.base_model")
