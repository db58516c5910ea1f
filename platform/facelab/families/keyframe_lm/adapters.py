"""Many LoRA adapters on one base model: the base weights held once, the adapter picked per request.

Issue #22, item 2. KeyframeFace trains one LoRA adapter per annotation type × format × base model
(§5.2, Tables 2, 4, 5); served one replica each, every adapter would hold its own copy of the base
weights (8 GB per copy for Qwen3-4B in bfloat16, for an adapter of 16.5M parameters). An
:class:`AdapterSet` loads the base LM once and adds each registered adapter to it as a named peft
adapter (peft's multi-adapter support: ``add_adapter`` / ``set_adapter`` / ``delete_adapter``), up to
``max_adapters`` at once, evicting the least recently used one beyond that (an LRU, as Ray Serve's
``@serve.multiplexed`` keeps one). :meth:`AdapterSet.get` returns a servable of one adapter — the same
interface as :class:`~.servable.ServableKeyframeLM` (``keyframes``, ``prompt_tokens``) — whose calls
activate its adapter first.

One request runs on one adapter: ``set_adapter`` switches the whole model, so calls on the set are
serialised (its lock) and a batch never mixes adapters; each answer is therefore the answer of that
adapter alone. Adapters are not merged into the base (that would change the shared weights), so an
answer equals the unmerged adapter's exactly and the merged single-adapter model's to float rounding
(:func:`~.lora.merge_for_inference`; greedy decoding can differ at near-ties, in bfloat16 more often).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import torch

from facelab.core import checkpoint as ckpt
from facelab.families.keyframe_lm.servable import ServableKeyframeLM, load_base_model

SHARED_MODEL_KEYS = ("base_model", "dtype", "lora")
"""``model.*`` keys every adapter of one set must agree on: they decide the base weights."""


class AdapterSet:
    """One base causal LM (``job``'s ``model.base_model``, loaded once on ``device``) and up to
    ``max_adapters`` LoRA adapters on it, by name (e.g. ``<registered model>/<version>``)."""

    def __init__(self, job: dict, root: Path | None = None, device: str = "cpu", max_adapters: int = 8, base=None):
        """``base`` (optional): the (model, tokenizer) of the base LM, already loaded (a bench building
        one from a config); by default it is loaded from ``model.base_model`` offline, as for one model."""
        if max_adapters < 1:
            raise ValueError(f"max_adapters must be >= 1 (got {max_adapters})")
        if not job["model"]["lora"]:
            raise ckpt.CheckpointError("model.lora is false: a fully fine-tuned model has no adapter to share a base")
        lm, tokenizer = load_base_model(job, root, device) if base is None else base
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        for p in lm.parameters():
            p.requires_grad_(False)
        self.tokenizer, self.base = tokenizer, lm.to(device).eval()
        self.model = None  # the PeftModel, made with the first adapter
        self.job, self.device, self.max_adapters = job, device, max_adapters
        self._adapters: OrderedDict[str, AdapterServable] = OrderedDict()  # least recently used first
        self._pinned: set[str] = set()  # never evicted (a version in service) until released
        self.lock = threading.RLock()

    def __contains__(self, name: str) -> bool:
        return name in self._adapters

    @property
    def names(self) -> list[str]:
        """The adapters loaded now, least recently used first."""
        return list(self._adapters)

    def add(self, name: str, checkpoint_dir: Path, pinned: bool = False) -> AdapterServable:
        """Load the adapter checkpoint at ``checkpoint_dir`` (a keyframe LoRA checkpoint: its config and
        adapter tensors) as ``name``; CheckpointError naming the ``model.*`` key when it was trained on
        another base. Evicts the least recently used adapter that is not ``pinned`` when
        ``max_adapters`` are loaded (RuntimeError when every one is pinned); a pinned adapter stays until
        :meth:`release`."""
        from peft import LoraConfig, PeftModel, TaskType

        from facelab.families.keyframe_lm.lora import TARGETS

        config = ckpt.load_config(checkpoint_dir)
        weights = ckpt.load_weights(checkpoint_dir)
        differ = [k for k in SHARED_MODEL_KEYS if config["model"].get(k) != self.job["model"].get(k)]
        if differ:
            k = differ[0]
            raise ckpt.CheckpointError(
                f"adapter {name!r}: model.{k} is {config['model'].get(k)!r}, but this set's base has "
                f"{self.job['model'].get(k)!r}: only adapters of the same base model share one"
            )
        m = config["model"]
        lora = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=m["lora_r"],
            lora_alpha=m["lora_alpha"],
            lora_dropout=0.0,  # inference
            target_modules=list(TARGETS["all-linear"]),
            bias="none",
            inference_mode=True,
        )
        with self.lock:
            if name in self._adapters:
                self._drop(name)
            while len(self._adapters) >= self.max_adapters:
                victim = next((n for n in self._adapters if n not in self._pinned), None)
                if victim is None:
                    raise RuntimeError(
                        f"all {self.max_adapters} adapter slots hold adapters in service; give more (max_adapters)"
                    )
                self._drop(victim)
            if self.model is None:
                self.model = PeftModel(self.base, lora, adapter_name=name)
            else:
                self.model.add_adapter(name, lora)
            try:
                _load_adapter_state(self.model, name, weights, str(Path(checkpoint_dir) / ckpt.MODEL_FILE))
            except Exception:
                if len(self.model.peft_config) > 1:
                    self.model.delete_adapter(name)
                raise
            for orphan in [n for n in self.model.peft_config if n != name and n not in self._adapters]:
                self.model.delete_adapter(orphan)  # the last one evicted (peft keeps one adapter at least)
            self.model.eval()
            servable = AdapterServable(self, name, config)
            self._adapters[name] = servable
            if pinned:
                self._pinned.add(name)
            return servable

    def release(self, name: str) -> None:
        """Let adapter ``name`` be evicted again (its version left service, or never entered it)."""
        with self.lock:
            self._pinned.discard(name)

    def get(self, name: str) -> AdapterServable | None:
        """The servable of adapter ``name`` (now the most recently used), or None when it is not loaded."""
        with self.lock:
            servable = self._adapters.get(name)
            if servable is not None:
                self._adapters.move_to_end(name)
            return servable

    def _drop(self, name: str) -> None:
        servable = self._adapters.pop(name)
        self._pinned.discard(name)
        servable.evicted = True
        if len(self.model.peft_config) > 1:
            self.model.delete_adapter(name)  # the last one stays (peft keeps one) until the next add

    def activate(self, name: str) -> None:
        """Make ``name`` the adapter the model runs (call with :attr:`lock` held)."""
        if name not in self._adapters:
            raise KeyError(f"adapter {name!r} is not loaded (evicted?)")
        self.model.set_adapter(name)


def _load_adapter_state(model, name: str, weights: dict[str, torch.Tensor], where: str) -> None:
    """Put a checkpoint's adapter tensors into adapter ``name`` of the peft model (as
    :func:`~.servable.load_keyframe_lm_state` does for a single adapter): CheckpointError when they do
    not fit it."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ckpt.CheckpointError(
            f"{where}: adapter does not fit the model (missing {missing[:3]}, unexpected {extra[:3]})"
        )
    try:
        set_peft_model_state_dict(model, weights, adapter_name=name)
    except RuntimeError as exc:
        raise ckpt.CheckpointError(f"{where}: adapter does not fit the model ({exc})") from None


class AdapterServable(ServableKeyframeLM):
    """One adapter of an :class:`AdapterSet`: a :class:`~.servable.ServableKeyframeLM` over the shared
    model whose generation activates its adapter first, under the set's lock."""

    def __init__(self, adapters: AdapterSet, name: str, job: dict):
        super().__init__(adapters.model, adapters.tokenizer, job)
        self.adapters, self.name, self.evicted = adapters, name, False

    def keyframes(self, background: str, emotion: str, descriptions: list[str], should_stop=None):
        """As :meth:`ServableKeyframeLM.keyframes`, on this adapter (KeyError once it was evicted)."""
        with self.adapters.lock:
            self.adapters.activate(self.name)
            return super().keyframes(background, emotion, descriptions, should_stop=should_stop)


def adapter_memory_bytes(adapters: AdapterSet) -> dict[str, int]:
    """Bytes held by the base weights and by each loaded adapter (the bench reports them)."""
    if adapters.model is None:
        return {"base": sum(p.numel() * p.element_size() for p in adapters.base.parameters())}
    base = 0
    per: dict[str, int] = {n: 0 for n in adapters.names}
    for pname, p in adapters.model.named_parameters():
        size = p.numel() * p.element_size()
        hit = next((n for n in per if f".{n}." in pname and "lora_" in pname), None)
        if hit is None:
            base += size
        else:
            per[hit] += size
    return {"base": base, **{f"adapter:{n}": b for n, b in per.items()}}
