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


def missing_base_model(name: str, path: str, exc: Exception) -> str:
    """Why ``model.base_model`` could not be loaded offline, naming what to download (runs never download)."""
    what = exc.__class__.__name__
    if "/" in name and not Path(path).exists():  # a Hugging Face id, absent from the local cache
        return (
            f"model.base_model {name!r} is not in the local Hugging Face cache ({what}); runs never download: "
            f"fetch it first with `hf download {name}` (huggingface_hub's CLI, into the cache HF_HOME / "
            "HF_HUB_CACHE name), or give a local model directory; the CPU grid is sweeps/keyframe_lora_tiny.yaml"
        )
    return (
        f"model.base_model {name!r}: cannot load it offline ({what}); give a model directory, a Hugging Face "
        "id already in the local cache (`hf download ID`), or run `dvc repro tiny_lm` for the default"
    )


def serve_decode(job: dict) -> str:
    """How a served model decodes (``eval.serve_decode``; a checkpoint older than that key serves as its
    ``eval.decode`` said)."""
    e = job["eval"]
    return e.get("serve_decode") or e["decode"]


def _dtype(setting: str, device) -> torch.dtype:
    if setting == "bfloat16" or (setting == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return torch.float32


def load_base_model(job: dict, root: Path | None, device):
    """(model, tokenizer) of a ``keyframe`` job's base causal LM (``model.base_model``, resolved under
    ``root``, in ``model.dtype``), local files only; a missing base is a CheckpointError saying where it
    was looked for. The tokenizer pads with its end-of-sequence token when it has no pad token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = job["model"]
    path = resolve_base_model(m["base_model"], root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_dtype(m["dtype"], device))
    except OSError as exc:
        raise ckpt.CheckpointError(missing_base_model(m["base_model"], path, exc)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def build_keyframe_lm(job: dict, root: Path | None, device, trainable: bool = True):
    """(model, tokenizer, info) for a ``keyframe`` job: the base causal LM, with a fresh LoRA adapter
    (§5.2: r, α on every linear layer) or fully trainable (``model.lora: false``)."""
    from facelab.families.keyframe_lm.lora import LoraSettings, apply_lora, count_trainable

    m = job["model"]
    model, tokenizer = load_base_model(job, root, device)
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
        import threading

        self.model, self.tokenizer, self.job = model, tokenizer, job
        self._counting = threading.Lock()  # guards the counting copy of the tokenizer
        self._count_tok = None
        self._answer_tokens = None

    @property
    def label(self) -> str | None:
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        return getattr(base.config, "facelab_label", None)

    def _script(self, background: str, emotion: str, descriptions: list[str]):
        from facelab.data.keyframeface import Keyframe, Script
        from facelab.families.keyframe_lm.loop import prompt_config

        cfg = prompt_config(self.job)
        kfs = tuple(
            Keyframe(index=i + 1, descriptions={"original": d, cfg.annotation: d}, values=torch.zeros(61).numpy())
            for i, d in enumerate(descriptions)
        )
        return cfg, Script(script_id="request", actor="unknown", background=background, emotion=emotion, keyframes=kfs)

    def prompt_tokens(self, request: dict) -> dict:
        """How long the prompts of a ``/v1/keyframes`` request are, against what this model takes —
        counted before any generation, without the model: ``{"prompt": tokens of the longest of its
        per-keyframe prompts (each holds the whole script), "limit": the most a prompt may have,
        "why": what sets the limit, "fields": tokens per request field}``. The limit is the job's
        ``prompt.max_tokens`` (prompt + answer, as in training) or the model's maximum length, whichever
        is smaller, less the answer's tokens (the constrained skeleton, or ``eval.max_new_tokens`` in plain
        mode). Counted on a private copy of the tokenizer: a fast tokenizer must not serve two threads
        at once, and generation may be using the model's."""
        import copy

        from facelab.families.keyframe_lm.data import answer_ids, prompt_ids
        from facelab.families.keyframe_lm.prompts import answer_text, build_messages

        background, emotion, descriptions = request["background"], request["emotion"], list(request["keyframes"])
        cfg, script = self._script(background, emotion, descriptions)
        with self._counting:
            if self._count_tok is None:
                self._count_tok = copy.deepcopy(self.tokenizer)
            tok = self._count_tok
            if self._answer_tokens is None:
                if serve_decode(self.job) == "plain":
                    self._answer_tokens = int(self.job["eval"]["max_new_tokens"])
                else:  # the longest answer the skeleton allows: every value at its most characters
                    from facelab.data.arkit import LOW

                    widest = [-0.55 if lo < 0 else 0.55 for lo in LOW]
                    self._answer_tokens = len(answer_ids(tok, answer_text(widest, 1, cfg))) + 1
            fields = {"background": background, "emotion": emotion}
            fields.update({f"keyframes.{i}": d for i, d in enumerate(descriptions)})
            counts = {k: len(tok(v, add_special_tokens=False)["input_ids"]) for k, v in fields.items()}
            prompt = max(len(prompt_ids(tok, build_messages(script, k, cfg))) for k in range(1, len(descriptions) + 1))
        base = getattr(self.model, "get_base_model", lambda: self.model)()
        model_max = int(getattr(base.config, "max_position_embeddings", 0) or 0)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**7:
            model_max = min(model_max, tok_max) if model_max else tok_max
        job_max = int(self.job["prompt"]["max_tokens"])
        total, why = (
            (job_max, f"prompt.max_tokens={job_max}")
            if not model_max or job_max <= model_max
            else (model_max, f"the model's maximum length {model_max}")
        )
        return {
            "prompt": prompt,
            "limit": total - self._answer_tokens,
            "why": f"{why} for prompt + answer, less {self._answer_tokens} answer tokens",
            "fields": counts,
        }

    def keyframes(self, background: str, emotion: str, descriptions: list[str], should_stop=None):
        """Generate one ParseResult per keyframe description (the descriptions fill the job's annotation
        type). ``should_stop`` (optional): asked between decoding steps; True stops generation with a
        ``TimeoutError`` (:class:`~.generate.GenerationStopped`)."""
        from facelab.families.keyframe_lm.generate import generate_keyframes

        cfg, script = self._script(background, emotion, descriptions)
        e = self.job["eval"]
        with torch.no_grad():
            return generate_keyframes(
                self.model,
                self.tokenizer,
                [script],
                cfg,
                mode=serve_decode(self.job),
                max_new_tokens=e["max_new_tokens"],
                batch_size=e["batch_size"],
                should_stop=should_stop,
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
