"""Contrastive text–keyframe evaluator of KeyframeFace (Wu et al. 2025, arXiv 2512.11321), Appendix C.

The embedding-space metrics of §5.3 (FID, R-Precision, MM-Dist "MMD", Diversity;
:mod:`facelab.tasks.keyframes.metrics`) need a joint embedding of texts and ARKit keyframes, as the
text-to-motion metrics of Guo et al. 2022 ("Generating Diverse and Natural 3D Human Motions from
Text") need their co-trained text and motion encoders. Appendix C trains one contrastively:

* text branch — a pretrained text encoder (here :func:`facelab.core.text_encoder.load_text_encoder`,
  offline default ``"minilm"``), masked mean pooling over the tokens' last hidden states, then a
  projection MLP to ``embed_dim``. "Both the text encoder and motion encoder are fully trainable":
  ``finetune_encoder`` (default true) trains the encoder with the heads; false freezes it (its
  pooled features are then cached per string, and it stays in eval mode);
* motion branch — an MLP over the 61 ARKit coefficients, z-scored with the training split's
  per-channel mean and std (stored as buffers, so they travel with the weights);
* both outputs L2-normalised; loss = symmetric InfoNCE with temperature τ = 0.07 over the
  in-batch similarity matrix ``S = T M^T / τ`` (B, B): ``(CE(S, I) + CE(S^T, I)) / 2``;
* AdamW (lr 1e-4, weight decay 1e-4; the encoder's weights too when it is trained), cosine
  schedule, "up to 1000" epochs with early stopping on validation R-Precision@1 (patience 10), seed 42.

Choices where the appendix is silent (each is a config field or documented where it is made):

* MLP shapes — text projection ``Linear(384, hidden) → GELU → Dropout → Linear(hidden, embed_dim)``;
  motion encoder ``Linear(61, hidden) → GELU → Dropout → Linear(hidden, hidden) → GELU → Dropout
  → Linear(hidden, embed_dim)`` (a keyframe is a single 61-d vector: no temporal model needed).
* z-score std floor :data:`STD_FLOOR` = 0.05 (5% of a blendshape's range): channels that are
  (nearly) constant in the training split — e.g. TongueOut, or channels carrying only ±0.02
  noise — would otherwise turn tiny deviations into huge features.
* τ is fixed (not learned), as stated.
* Frozen-encoder text features are cached per string inside the module (texts repeat every
  epoch); the cache is a plain dict, never part of the state dict. A trained encoder is run on
  every batch instead (no cache).
* Duplicate texts inside a batch are ordinary negatives of each other (no false-negative filtering).

Save/load is pickle-free: :func:`evaluator_state` (trainable weights -- the encoder's too when it is
trained -- + z-score buffers; a frozen encoder is rebuilt from its name) and :func:`load_evaluator` from those tensors and
``cfg.model_dump()``. :func:`train_evaluator` is the plain-PyTorch loop; the Ray Train
worker around it lives in :mod:`facelab.families.keyframe_evaluator.loop`. Nothing happens at import.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.core.text_encoder import load_text_encoder
from facelab.families.keyframe_evaluator.job import EvaluatorModel as EvaluatorConfig  # declared once: the job schema
from facelab.tasks.keyframes.metrics import STD_FLOOR, mm_dist, r_precision  # noqa: F401 - STD_FLOOR re-exported
from facelab.tasks.keyframes.metrics import feature_stats as keyframe_feature_stats

N_FEATURES = 61
"""ARKit coefficients per keyframe: 52 blendshapes + 3 head + 6 eye rotations (release order)."""
FROZEN_PREFIX = "text_encoder."
"""State-dict prefix of the pretrained encoder, left out of :func:`evaluator_state` when it is frozen."""
_ENCODE_CHUNK = 128  # texts per frozen-encoder forward when filling the cache


class EvaluatorError(ValueError):
    """Bad evaluator config, statistics, saved state or training pairs."""


def feature_stats(motions) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(mean, std)`` of training keyframes ``(N, 61)``, float32 ``(61,)`` each.

    Population std (``ddof=0``), floored at :data:`STD_FLOOR`.
    """
    x = _motions_array(motions, "motions")
    if x.shape[0] < 1:
        raise EvaluatorError("feature_stats needs at least one keyframe")
    return keyframe_feature_stats(x)


def _motions_array(motions, name: str) -> np.ndarray:
    x = np.asarray(motions, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != N_FEATURES:
        raise EvaluatorError(f"{name} has shape {x.shape}; expected (N, {N_FEATURES})")
    if not np.isfinite(x).all():
        raise EvaluatorError(f"{name} contains NaN or inf (first in row {int(np.argwhere(~np.isfinite(x))[0, 0])})")
    return x


class TextMotionEvaluator(nn.Module):
    """Joint text / ARKit-keyframe embedding (Appendix C). See the module docstring."""

    def __init__(self, cfg: EvaluatorConfig, feat_mean, feat_std):
        super().__init__()
        self.cfg = cfg
        mean = torch.as_tensor(np.asarray(feat_mean, dtype=np.float32)).reshape(-1)
        std = torch.as_tensor(np.asarray(feat_std, dtype=np.float32)).reshape(-1)
        if mean.numel() != N_FEATURES or std.numel() != N_FEATURES:
            raise EvaluatorError(f"feat_mean/feat_std have {mean.numel()}/{std.numel()} values, expected {N_FEATURES}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise EvaluatorError("feat_mean must be finite and feat_std finite and > 0")
        self.register_buffer("feat_mean", mean.clone())  # (61,)
        self.register_buffer("feat_std", std.clone())  # (61,)

        # Loading the pretrained encoder must not advance the global RNG: the trainable layers'
        # initialisation then depends on the caller's seed only.
        with torch.random.fork_rng(devices=[]):
            encoder, tokenizer = load_text_encoder(cfg.text_encoder)
        enc_dim = getattr(encoder.config, "hidden_size", None) or encoder.config.d_model
        h, d, p = cfg.hidden, cfg.embed_dim, cfg.dropout
        self.text_proj = nn.Sequential(nn.Linear(enc_dim, h), nn.GELU(), nn.Dropout(p), nn.Linear(h, d))
        self.motion_encoder = nn.Sequential(
            nn.Linear(N_FEATURES, h),
            nn.GELU(),
            nn.Dropout(p),
            nn.Linear(h, h),
            nn.GELU(),
            nn.Dropout(p),
            nn.Linear(h, d),
        )
        self.text_encoder = encoder.train(self.training) if cfg.finetune_encoder else encoder.eval()
        self.text_encoder.requires_grad_(cfg.finetune_encoder)
        if getattr(encoder, "pooler", None) is not None:  # BERT's [CLS] pooler: unused (masked mean pooling)
            encoder.pooler.requires_grad_(False)  # no gradient ever reaches it (and DDP needs none unused)
        self.tokenizer = tokenizer
        self._text_cache: dict[str, Tensor] = {}  # string -> frozen pooled feature (enc_dim,), CPU float32

    def train(self, mode: bool = True) -> "TextMotionEvaluator":
        super().train(mode)
        if not self.cfg.finetune_encoder:
            self.text_encoder.eval()  # frozen feature extractor: never dropout
        return self

    def _pooled(self, texts: list[str]) -> Tensor:
        """The encoder's masked-mean-pooled last hidden states of ``texts``, ``(b, E)`` float32 on the
        module's device (with gradients when the encoder is trained and grad is enabled)."""
        device = self.feat_mean.device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
        )
        ids = batch["input_ids"].to(device)  # (b, L)
        mask = batch["attention_mask"].to(device)  # (b, L)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()  # (b, L, E)
        w = mask.unsqueeze(-1).float()  # (b, L, 1)
        return (hidden * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (b, E) masked mean pooling

    # ---------------------------------------------------------------------------------------
    # text
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def cache_texts(self, texts: Sequence[str]) -> int:
        """Run the frozen encoder on the strings of ``texts`` not cached yet; returns how many were new
        (always 0 when the encoder is trained: its features change with every step, nothing is cached)."""
        if self.cfg.finetune_encoder:
            return 0
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        for i in range(0, len(new), _ENCODE_CHUNK):
            chunk = new[i : i + _ENCODE_CHUNK]
            for text, row in zip(chunk, self._pooled(chunk).cpu()):
                self._text_cache[text] = row.clone()
        return len(new)

    def frozen_text_features(self, texts: Sequence[str]) -> Tensor:
        """Mean-pooled frozen-encoder features of ``texts``, ``(B, E)`` on the module's device (cached per string)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise EvaluatorError("texts must be strings")
        self.cache_texts(texts)
        return torch.stack([self._text_cache[t] for t in texts]).to(self.feat_mean.device)  # (B, E)

    def encode_text(self, texts: list[str]) -> Tensor:
        """Texts -> L2-normalised embeddings ``(B, embed_dim)`` (through the trained encoder, or the
        frozen one's cached features)."""
        if self.cfg.finetune_encoder:
            texts = list(texts)
            if not all(isinstance(t, str) for t in texts):
                raise EvaluatorError("texts must be strings")
            feats = self._pooled(texts)  # (B, E)
        else:
            feats = self.frozen_text_features(texts)  # (B, E)
        return F.normalize(self.text_proj(feats), dim=-1)

    # ---------------------------------------------------------------------------------------
    # motion
    # ---------------------------------------------------------------------------------------

    def encode_motion(self, motions: Tensor) -> Tensor:
        """ARKit keyframes ``(B, 61)`` -> L2-normalised embeddings ``(B, embed_dim)``."""
        if motions.ndim != 2 or motions.shape[1] != N_FEATURES:
            raise EvaluatorError(f"motions have shape {tuple(motions.shape)}; expected (B, {N_FEATURES})")
        x = (motions.to(self.feat_mean) - self.feat_mean) / self.feat_std  # (B, 61) z-scored
        return F.normalize(self.motion_encoder(x), dim=-1)  # (B, D)

    # ---------------------------------------------------------------------------------------
    # loss
    # ---------------------------------------------------------------------------------------

    def forward(self, texts: list[str], motions: Tensor) -> Tensor:
        """Symmetric InfoNCE (Appendix C): mean of the text→motion and motion→text cross-entropies."""
        if len(texts) != motions.shape[0]:
            raise EvaluatorError(f"{len(texts)} texts for {motions.shape[0]} keyframes")
        t = self.encode_text(texts)  # (B, D)
        m = self.encode_motion(motions)  # (B, D)
        logits = t @ m.T / self.cfg.temperature  # (B, B): row i = text i against every motion
        labels = torch.arange(len(texts), device=logits.device)  # (B,)
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))

    # ---------------------------------------------------------------------------------------
    # numpy helpers for the metrics (eval mode, no grad)
    # ---------------------------------------------------------------------------------------

    def _eval_call(self, fn: Callable[[], np.ndarray]) -> np.ndarray:
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return fn()
        finally:
            self.train(was_training)

    def embed_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Embeddings of ``texts`` as float32 ``(N, embed_dim)``, in eval mode (no dropout)."""
        texts = list(texts)
        return self._eval_call(
            lambda: np.concatenate(
                [self.encode_text(texts[i : i + batch_size]).cpu().numpy() for i in range(0, len(texts), batch_size)]
                or [np.zeros((0, self.cfg.embed_dim), np.float32)]
            )
        )

    def embed_motions(self, motions, batch_size: int = 1024) -> np.ndarray:
        """Embeddings of keyframes ``(N, 61)`` as float32 ``(N, embed_dim)``, in eval mode."""
        x = torch.as_tensor(_motions_array(motions, "motions"))
        return self._eval_call(
            lambda: np.concatenate(
                [self.encode_motion(x[i : i + batch_size]).cpu().numpy() for i in range(0, len(x), batch_size)]
                or [np.zeros((0, self.cfg.embed_dim), np.float32)]
            )
        )


# --------------------------------------------------------------------------------------------
# save / load (no pickle)
# --------------------------------------------------------------------------------------------


def evaluator_state(model: TextMotionEvaluator) -> dict[str, Tensor]:
    """Trainable weights and z-score buffers as contiguous CPU tensors (safetensors-ready).

    A frozen encoder's weights (``text_encoder.*``) are left out: :func:`load_evaluator` rebuilds
    it from ``cfg.text_encoder``. A trained one's are kept (``finetune_encoder``).
    """
    keep_encoder = model.cfg.finetune_encoder
    return {
        k: v.detach().cpu().clone().contiguous()
        for k, v in model.state_dict().items()
        if keep_encoder or not k.startswith(FROZEN_PREFIX)
    }


def load_evaluator(weights: dict[str, Tensor], cfg_dict: dict) -> TextMotionEvaluator:
    """Rebuild an evaluator from :func:`evaluator_state` tensors and ``cfg.model_dump()``.

    Every trainable tensor and both z-score buffers must be present with the shapes the config
    implies (else :class:`EvaluatorError` naming the key). Returned in eval mode, on the CPU.
    """
    known = set(EvaluatorConfig.model_fields)
    # An evaluator saved before ``finetune_encoder`` existed had a frozen encoder (no weights stored).
    cfg_dict = {"finetune_encoder": False, **cfg_dict}
    unknown = sorted(set(cfg_dict) - known)
    if unknown:
        raise EvaluatorError(f"evaluator config: unknown field(s) {unknown}; known: {sorted(known)}")
    try:
        cfg = EvaluatorConfig(**cfg_dict)
    except ValueError as exc:  # the schema's ValidationError, named as the evaluator's
        raise EvaluatorError(f"evaluator config: {exc}") from None
    for name in ("feat_mean", "feat_std"):
        if name not in weights:
            raise EvaluatorError(f"evaluator weights: missing {name!r} (z-score statistics)")
    model = TextMotionEvaluator(cfg, weights["feat_mean"].cpu().numpy(), weights["feat_std"].cpu().numpy())
    expected = evaluator_state(model)
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise EvaluatorError(f"evaluator weights: missing {missing}, unexpected {extra}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise EvaluatorError(
                f"evaluator weights: {k!r} has shape {tuple(weights[k].shape)}, the config gives {tuple(v.shape)}"
            )
    model.load_state_dict(weights, strict=False)
    return model.eval()


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


Pairs = Sequence[tuple[str, Sequence[float]]] | tuple[Sequence[str], np.ndarray]


def _as_pairs(pairs: Pairs, name: str) -> tuple[list[str], np.ndarray]:
    """``[(text, values (61,)), ...]`` or ``(texts, values (N, 61))`` -> ``(texts, float32 (N, 61))``."""
    if isinstance(pairs, tuple) and len(pairs) == 2 and isinstance(pairs[1], np.ndarray) and pairs[1].ndim == 2:
        texts, values = list(pairs[0]), pairs[1]
    else:
        texts, values = [], []
        for i, item in enumerate(pairs):
            if len(item) != 2 or not isinstance(item[0], str):
                raise EvaluatorError(f"{name}[{i}]: expected (text, 61 values)")
            texts.append(item[0])
            values.append(np.asarray(item[1], dtype=np.float32).reshape(-1))
        values = np.stack(values) if values else np.zeros((0, N_FEATURES), np.float32)
    x = _motions_array(values, name)
    if len(texts) != len(x):
        raise EvaluatorError(f"{name}: {len(texts)} texts for {len(x)} keyframes")
    if not all(isinstance(t, str) for t in texts):
        raise EvaluatorError(f"{name}: texts must be strings")
    return texts, x


@dataclass
class EvaluatorTrainResult:
    """What :func:`train_evaluator` returns; ``model`` holds the best epoch's weights, in eval mode."""

    model: TextMotionEvaluator
    state: dict[str, Tensor]
    """:func:`evaluator_state` of the best epoch."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One metrics dict per finished epoch (the same dicts ``on_epoch`` received)."""
    best_epoch: int = 0
    """0-based epoch with the highest val R-Precision@1 (the first one on ties)."""
    best_metrics: dict[str, float] = field(default_factory=dict)
    stopped_early: bool = False


VAL_R_BATCH = 32
"""R-Precision batch of the validation metric (T2M protocol; one batch of N if the split is smaller)."""
VAL_SEED = 0
"""Fixed shuffle of the validation R-Precision, so epochs are compared on the same batches."""


@torch.no_grad()
def validation_metrics(
    model: TextMotionEvaluator, texts: list[str], motions: np.ndarray, batch_size: int
) -> dict[str, float]:
    """``val/loss`` (InfoNCE over consecutive batches of ``batch_size``), ``val/r_precision_1..3``, ``val/mmd``."""
    was_training = model.training
    model.eval()
    try:
        x = torch.as_tensor(motions)
        losses, weights = [], []
        for i in range(0, len(texts), batch_size):
            if len(texts[i : i + batch_size]) < 2:  # a one-pair batch has no negative: loss 0, skip it
                continue
            losses.append(float(model(texts[i : i + batch_size], x[i : i + batch_size])))
            weights.append(len(texts[i : i + batch_size]))
        t = model.embed_texts(texts)
        m = model.embed_motions(motions)
    finally:
        model.train(was_training)
    out = {"val/loss": float(np.average(losses, weights=weights)) if losses else float("nan")}
    for k, v in r_precision(t, m, batch=VAL_R_BATCH, seed=VAL_SEED).items():
        out[f"val/r_precision_{k}"] = v
    out["val/mmd"] = mm_dist(t, m)
    return out


def train_evaluator(
    train_pairs: Pairs,
    val_pairs: Pairs,
    *,
    epochs: int,
    batch_size: int,
    lr: float = 1e-4,
    weight_decay: float = 1e-4,
    patience: int = 10,
    seed: int = 42,
    on_epoch: Callable[[int, dict[str, float], TextMotionEvaluator], None] | None = None,
    cfg: EvaluatorConfig | None = None,
    device: str | torch.device = "cpu",
    max_steps_per_epoch: int | None = None,
) -> EvaluatorTrainResult:
    """Train a :class:`TextMotionEvaluator` (Appendix C) and return the best epoch's state and the history.

    ``train_pairs`` / ``val_pairs``: ``[(text, values (61,)), ...]`` or ``(texts, values (N, 61))``.
    The z-score statistics come from ``train_pairs`` (:func:`feature_stats`). AdamW over the
    trainable parameters, ``CosineAnnealingLR`` stepped per step over ``epochs * steps_per_epoch``;
    each epoch reshuffles the training pairs and drops the last partial batch (a contrastive batch
    needs its negatives; with fewer pairs than ``batch_size`` one batch of all of them is used).
    After every epoch the validation metrics (:func:`validation_metrics`) are computed and
    ``on_epoch(epoch, metrics, model)`` is called (0-based ``epoch``; metrics keys ``epoch``,
    ``step``, ``lr``, ``train/loss``, ``val/loss``, ``val/r_precision_1..3``, ``val/mmd``).
    Early stopping: training ends once val R-Precision@1 has not improved (strictly) for
    ``patience`` epochs; the best epoch's weights are loaded back into the returned model.

    Deterministic for a ``seed`` on a given device: the global torch RNG is seeded before the model
    is built and again before the first step (dropout), and the shuffles use their own generator.
    """
    if epochs < 1 or batch_size < 2 or patience < 1:
        raise EvaluatorError(
            f"need epochs >= 1, batch_size >= 2, patience >= 1; got {epochs}, {batch_size}, {patience}"
        )
    train_texts, train_x = _as_pairs(train_pairs, "train_pairs")
    val_texts, val_x = _as_pairs(val_pairs, "val_pairs")
    if len(train_texts) < 2 or len(val_texts) < 2:
        raise EvaluatorError(
            f"need at least 2 training and 2 validation pairs; got {len(train_texts)}, {len(val_texts)}"
        )
    cfg = cfg or EvaluatorConfig()

    torch.manual_seed(seed)
    mean, std = feature_stats(train_x)
    model = TextMotionEvaluator(cfg, mean, std).to(device)
    model.cache_texts(train_texts + val_texts)  # every frozen-encoder forward happens once, here

    n = len(train_texts)
    size = min(batch_size, n)
    steps_per_epoch = n // size
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps_per_epoch))
    x_all = torch.as_tensor(train_x).to(device)  # (N, 61)
    shuffle = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    history: list[dict[str, float]] = []
    best_r1, best_epoch, best_state, best_metrics, bad = -math.inf, 0, None, {}, 0
    step, stopped = 0, False
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=shuffle)  # (N,)
        total = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * size : (b + 1) * size]
            loss = model([train_texts[i] for i in idx.tolist()], x_all[idx.to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
            step += 1
        metrics = {"epoch": epoch, "step": step, "lr": sched.get_last_lr()[0], "train/loss": total / steps_per_epoch}
        metrics.update(validation_metrics(model, val_texts, val_x, size))
        history.append(metrics)
        if metrics["val/r_precision_1"] > best_r1:
            best_r1, best_epoch, best_metrics, bad = metrics["val/r_precision_1"], epoch, metrics, 0
            best_state = evaluator_state(model)
        else:
            bad += 1
        if on_epoch is not None:
            on_epoch(epoch, metrics, model)
        if bad >= patience:
            stopped = epoch < epochs - 1
            break

    model.load_state_dict({k: v.to(device) for k, v in best_state.items()}, strict=False)
    return EvaluatorTrainResult(
        model=model.eval(),
        state=best_state,
        history=history,
        best_epoch=best_epoch,
        best_metrics=dict(best_metrics),
        stopped_early=stopped,
    )


def load_servable(dirpath, device: str = "cpu", root=None) -> TextMotionEvaluator:
    """The family's loader (:class:`facelab.families.base.Family`): a checkpoint directory → evaluator."""
    from pathlib import Path

    from facelab.core import checkpoint as ckpt

    config = ckpt.load_config(dirpath)
    where = str(Path(dirpath) / ckpt.MODEL_FILE)
    try:
        model = load_evaluator(ckpt.load_weights(dirpath), config["evaluator"])
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ckpt.CheckpointError(f"{where}: not a usable evaluator checkpoint ({exc})") from None
    return model.to(device).eval()
