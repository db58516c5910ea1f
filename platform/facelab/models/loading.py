"""Build models from a resolved job config, and load servable checkpoints (no pickle).

A checkpoint's ``config.json`` holds the resolved job (with its ``kind``); ``model.safetensors``
holds the weights: the whole CTEG model (minus the frozen text encoder), the trainable part of the
text–motion evaluator, or — for a KeyframeFace LoRA run — only the adapter's tensors (the base
model is loaded from ``model.base_model``, as with any peft adapter).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from facelab.train import checkpoint as ckpt


def cteg_config(job: dict):
    """The model's typed config from a resolved ``cteg`` job dict (``model`` + ``data.max_frames``)."""
    from facelab.models.cteg.model import CTEGConfig

    names = {f.name for f in dataclasses.fields(CTEGConfig)}
    kwargs = {k: v for k, v in job["model"].items() if k in names}
    if "max_frames" in names:
        kwargs["max_frames"] = job["data"]["max_frames"]
    return CTEGConfig(**kwargs)


def build_cteg(job: dict, mean_expression) -> torch.nn.Module:
    from facelab.models.cteg.model import CTEG

    mean = torch.as_tensor(mean_expression, dtype=torch.float32)
    return CTEG(cteg_config(job), mean)


# ------------------------------------------------------------------------------------------------
# KeyframeFace causal LM (+ LoRA)
# ------------------------------------------------------------------------------------------------


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

    from facelab.models.keyframe_lm.lora import LoraSettings, apply_lora, count_trainable

    m = job["model"]
    path = resolve_base_model(m["base_model"], root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_dtype(m["dtype"], device))
    except OSError as exc:
        raise ckpt.CheckpointError(
            f"model.base_model {m['base_model']!r}: cannot load it offline ({exc.__class__.__name__}); give a model "
            "directory, a Hugging Face id already in the local cache, or run `dvc repro tiny_lm` for the default") from None
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
            raise ckpt.CheckpointError(f"{where}: adapter does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})")
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
        from facelab.models.keyframe_lm.generate import generate_keyframes
        from facelab.train.keyframe import prompt_config

        cfg = prompt_config(self.job)
        kfs = tuple(Keyframe(index=i + 1, descriptions={"original": d, cfg.annotation: d},
                             values=torch.zeros(61).numpy()) for i, d in enumerate(descriptions))
        script = Script(script_id="request", actor="unknown", background=background, emotion=emotion, keyframes=kfs)
        e = self.job["eval"]
        with torch.no_grad():
            return generate_keyframes(self.model, self.tokenizer, [script], cfg, mode=e["decode"],
                                      max_new_tokens=e["max_new_tokens"], batch_size=e["batch_size"])[0]


def load_servable(dirpath: Path, device: str = "cpu", root: Path | None = None):
    """Rebuild the model stored in a checkpoint directory (safetensors + config.json) → (model, config).

    ``cteg`` → the CTEG module; ``keyframe`` → :class:`ServableKeyframeLM`; ``keyframe_evaluator``
    → the text–motion evaluator; the learned baselines ``lm_listener`` (same interface as CTEG) and
    ``keyframe_mdm`` (same ``keyframes`` method as :class:`ServableKeyframeLM`)."""
    config = ckpt.load_config(dirpath)
    kind = config.get("kind")
    weights = ckpt.load_weights(dirpath)
    where = str(Path(dirpath) / ckpt.MODEL_FILE)
    if kind == "cteg":
        if "mean_expression" not in weights:
            raise ckpt.CheckpointError(f"{where}: no 'mean_expression' buffer")
        model = build_cteg(config, weights["mean_expression"])
        ckpt.load_into(model, dirpath)
        return model.to(device).eval(), config
    if kind == "keyframe":
        from facelab.models.keyframe_lm.lora import merge_for_inference

        model, tokenizer, _info = build_keyframe_lm(config, root or Path.cwd(), device, trainable=False)
        load_keyframe_lm_state(model, weights, config, where)
        model = merge_for_inference(model).eval()  # the adapter folded into the weights: faster decoding
        return ServableKeyframeLM(model, tokenizer, config), config
    if kind == "keyframe_evaluator":
        from facelab.models.keyframe_evaluator import load_evaluator

        try:
            model = load_evaluator(weights, config["evaluator"])
        except (KeyError, RuntimeError, TypeError) as exc:
            raise ckpt.CheckpointError(f"{where}: not a usable evaluator checkpoint ({exc})") from None
        return model.to(device).eval(), config
    if kind == "lm_listener":
        from facelab.models.lm_listener import load_servable_lm_listener

        return load_servable_lm_listener(weights, config, device, where), config
    if kind == "keyframe_mdm":
        from facelab.models.keyframe_mdm import load_servable_mdm

        return load_servable_mdm(weights, config, device, where), config
    raise ckpt.CheckpointError(f"{Path(dirpath) / ckpt.CONFIG_FILE}: unknown job kind {kind!r}")
