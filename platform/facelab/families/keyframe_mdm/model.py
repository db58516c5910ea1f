"""Express4D-MDM: the Motion Diffusion Model over ARKit keyframes (KeyframeFace baseline, Table 3).

KeyframeFace (Wu et al. 2025, "KeyframeFace: From Text to Expressive Facial Keyframes", Table 3)
compares against the Motion Diffusion Model (MDM; Tevet et al. 2023, "Human Motion Diffusion
Model", ICLR) as Express4D adapted it to faces: a transformer denoiser trained with the DDPM
objective, conditioned on a frozen text encoder, sampled with classifier-free guidance. This
module is that model for the platform's data: keyframes of 61 ARKit values
(:mod:`facelab.data.keyframeface`).

The paper's baseline (the defaults): the denoiser predicts the Gaussian noise ε
(``model.prediction: eps``), it is trained on one prompt per keyframe -- every keyframe is its own
example (``model.unit: keyframe``) -- and sampled with the full chain of 1000 steps
(``eval.sampling_steps: 1000``). MDM's own choices stay options: ``prediction: x0`` (the clean
sample), ``unit: script`` (a script's keyframes denoised jointly) and respaced sampling with fewer
steps.

What follows MDM (section numbers of Tevet et al. 2023):

* §3 "Framework" — with ``model.prediction: x0`` the denoiser ``G(x_t, t, c)`` predicts the clean
  sample ``x̂_0``, objective ``L_simple = E ||x_0 − G(x_t, t, c)||²`` (MDM Eq. 2), with
  ``x_t ~ q(x_t | x_0)`` of Ho et al. 2020 (Eq. 4) and ``t`` uniform in ``0..T−1``; with
  ``eps`` (the default, KeyframeFace's baseline) it predicts ε, Ho et al.'s ``E ||ε − G(x_t, t, c)||²``,
  and ``x̂_0`` is recovered from it while sampling.
* §3 "Model" — a transformer *encoder* ("trans_enc" of the reference code): the noise step ``t``
  goes through a sinusoidal embedding and a two-layer MLP (MDM's ``TimestepEmbedder``), the
  pooled text feature through a linear layer (``embed_text``); their sum is one extra token
  ``z_tk`` placed before the frame tokens; frames enter through a linear layer
  (``InputProcess``) and leave through one (``OutputProcess``). Post-norm layers, GELU, dropout
  0.1 (``torch.nn.TransformerEncoderLayer`` defaults, as the reference uses).
* §3 "Classifier-free guidance" — during training the condition is dropped (``c = ∅``) with
  probability ``model.cond_drop`` (MDM: 10 %); at sampling
  ``G_s = G(x_t, t, ∅) + s · (G(x_t, t, c) − G(x_t, t, ∅))`` with ``s = eval.guidance_scale``
  (MDM: 2.5). ``s = 1`` is the conditional model, ``s = 0`` the unconditional one.
* §4 "Implementation" — ``T = 1000`` diffusion steps, cosine noise schedule (Nichol & Dhariwal
  2021, Eq. 17), fixed small posterior variance (``sigma_small``), AdamW with lr 1e-4; the
  reference code does not clip ``x̂_0``.

Adaptations to keyframes (our choices; MDM and the KeyframeFace paper do not specify them):

* **The "motion".** ``model.unit: keyframe`` (the default): one keyframe, alone, with its own
  prompt (:func:`keyframe_units`: a one-keyframe script keeping the emotion and background), as the
  paper trains its baseline. ``model.unit: script``: MDM denoises ``N`` frames of a pose
  sequence at once; here the ``K ≤ 5`` keyframes of a script (``K × 61``) are denoised jointly, so
  the keyframes of one script can agree with each other. Scripts with fewer keyframes are padded
  to the batch's longest; padding tokens are masked as attention keys and left out of the loss
  (MDM masks frames beyond a motion's length the same way, ``masked_l2``).
* **Text conditioning on two levels.** MDM has one sentence per motion; a script has a
  background, an emotion and one description per keyframe. The condition token gets the pooled
  text of ``"{emotion} {background}"`` (emotion first: the encoder truncates at
  ``model.max_text_tokens``, and the scene is less informative about the face than the emotion);
  keyframe token ``k`` gets ``Linear(x_t[k]) + learned position k + Linear(pooled description k)``,
  the description of the job's annotation type (``data.annotation``). Per-token text keeps every
  description attached to its keyframe without cross-attention (MDM has no cross-attention in its
  encoder variant either).
* **Pooled text of a frozen encoder.** MDM uses CLIP ViT-B/32's sentence embedding; the
  machines here are offline, so the encoder is :func:`facelab.core.text_encoder.load_text_encoder`
  (default ``"minilm"``: sentence-transformers all-MiniLM-L6-v2, whose training objective makes
  its masked-mean-pooled output a sentence embedding — the documented substitution). Features are
  cached per string, as in :mod:`facelab.families.keyframe_evaluator.model`. The encoder module is
  named ``text_encoder`` so :func:`facelab.core.checkpoint.save` (``keep_encoder=False``) leaves
  it out; it is rebuilt from its name on load.
* **The null condition** (``c = ∅``) replaces *both* text embeddings of a script by learned
  vectors (``null_script``, ``null_keyframe``), initialised at zero — which is what MDM's
  ``mask_cond`` does (multiplies the text embedding by 0) — and then trained. The keyframe count
  is structure, not text: it is kept.
* **Learned positions** (6 of them: the condition token and up to 5 keyframes) instead of MDM's
  sinusoidal table, which serves sequences of hundreds of frames.
* **Normalisation.** Values are z-scored per channel with the training split's mean and std
  (:func:`facelab.tasks.keyframes.metrics.feature_stats`, std floored at 0.05), stored as
  buffers ``feat_mean`` / ``feat_std`` (MDM normalises HumanML3D features the same way with the
  dataset's Mean/Std). Samples are de-normalised and clipped to the channel ranges
  (:data:`facelab.data.arkit.LOW` / ``HIGH``).
* **Clipping x̂_0 while sampling.** Each step's ``x̂_0`` is clamped to the z-scored channel
  ranges before the posterior mean — the analogue of improved-diffusion's ``clip_denoised`` for
  data in ``[−1, 1]`` (MDM itself does not clip). Values outside a channel's range can never be
  the answer, and clamping keeps guided predictions (``s > 1`` extrapolates) from drifting.
* **Respaced sampling.** ``eval.sampling_steps`` of the ``T`` training steps, evenly spaced and
  always including ``t = T − 1`` and ``t = 0``, with the betas recomputed from ``ᾱ`` of the kept
  steps (improved-diffusion's ``space_timesteps`` / ``SpacedDiffusion``, Nichol & Dhariwal 2021
  §4.2); ancestral DDPM sampling (Ho et al. 2020, Algorithm 2) with the posterior of their Eq. 6–7.
  With ``sampling_steps == diffusion_steps`` this is the full DDPM chain. (With one step,
  improved-diffusion would keep ``t = 0``, i.e. start from pure noise as if it were almost clean;
  we keep ``t = T − 1`` instead, a single ``x̂_0`` prediction from noise.)
* **Determinism.** All noise of :meth:`KeyframeMDM.losses` and :meth:`KeyframeMDM.sample` (timesteps,
  ε, condition drops, the sampler's ``x_T`` and per-step noise) is drawn from a CPU
  ``torch.Generator`` when one is given and moved to the device afterwards, so a seed gives the
  same numbers on any device.

Saving and loading are pickle-free: :func:`facelab.core.checkpoint.save` with
``keep_encoder=False`` writes the denoiser and the normalisation buffers to safetensors;
:func:`load_servable_mdm` rebuilds the model from the resolved job (``config.json``) and checks
every key and shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from facelab.core import checkpoint as ckpt
from facelab.core.text_encoder import load_text_encoder
from facelab.data.arkit import HIGH, LOW, N_CHANNELS
from facelab.data.keyframeface import MAX_KEYFRAMES, DataError, Keyframe, Script
from facelab.families.keyframe_mdm.job import MDMModel as MDMConfig  # the job's model section, declared once
from facelab.tasks.keyframes.answer import ParseResult

FROZEN_PREFIX = "text_encoder."
"""State-dict prefix of the frozen text encoder; never stored in a checkpoint."""
MAX_BETA = 0.999
"""Upper bound on β_t (improved-diffusion's ``betas_for_alpha_bar`` clips the cosine schedule here)."""
COSINE_S = 0.008
"""Offset s of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17)."""
_ENCODE_CHUNK = 128  # texts per frozen-encoder forward when filling the cache


class MDMError(ValueError):
    """Bad MDM config, statistics or sampling arguments."""


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------


def mdm_config(job: dict) -> MDMConfig:
    """The typed config from a resolved ``keyframe_mdm`` job dict (its ``model`` section). A checkpoint
    saved before ``model.unit`` existed denoised whole scripts: it loads as ``unit: script``."""
    return MDMConfig(**{"unit": "script", **job["model"]})


# --------------------------------------------------------------------------------------------
# diffusion (Ho et al. 2020; Nichol & Dhariwal 2021)
# --------------------------------------------------------------------------------------------


def cosine_alpha_bar(u: np.ndarray, s: float = COSINE_S) -> np.ndarray:
    """ᾱ at the fractions ``u = t / T`` of the cosine schedule (Nichol & Dhariwal 2021, Eq. 17):
    ``ᾱ(t) = f(t) / f(0)``, ``f(t) = cos²(((t/T + s) / (1 + s)) · π/2)``."""
    f = lambda x: np.cos((np.asarray(x, dtype=np.float64) + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    return f(u) / f(0.0)


def beta_schedule(name: str, steps: int) -> np.ndarray:
    """β_1..β_T as float64 ``(T,)``.

    ``cosine``: ``β_t = min(1 − ᾱ(t+1)/ᾱ(t), 0.999)`` (Nichol & Dhariwal 2021, §3.2; the clip
    avoids the singularity at the end). ``linear``: Ho et al. 2020's ``1e-4 → 0.02`` for T = 1000,
    scaled by ``1000 / T`` for other T as improved-diffusion does, and clipped at 0.999 too (for
    T < 50 the scaled end would exceed 1).
    """
    if steps < 2:
        raise MDMError(f"need at least 2 diffusion steps, got {steps}")
    if name == "cosine":
        abar = cosine_alpha_bar(np.arange(steps + 1) / steps)
        return np.minimum(1.0 - abar[1:] / abar[:-1], MAX_BETA)
    if name == "linear":
        scale = 1000.0 / steps
        return np.minimum(np.linspace(scale * 1e-4, scale * 0.02, steps, dtype=np.float64), MAX_BETA)
    raise MDMError(f"unknown noise schedule {name!r}; expected 'cosine' or 'linear'")


def space_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` of the ``num_timesteps`` training steps, evenly spaced (improved-diffusion's
    ``space_timesteps`` with one section: ``round(i · (T−1)/(steps−1))``, so ``0`` and ``T−1`` are
    kept); one step keeps ``T−1`` (see the module docstring)."""
    if not 1 <= steps <= num_timesteps:
        raise MDMError(f"sampling steps must be in 1..{num_timesteps} (the diffusion steps), got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return sorted({round(i * stride) for i in range(steps)})


def _extract(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
    """``arr[t]`` as float32 on ``like``'s device, shaped ``(B, 1, ..., 1)`` to broadcast against it."""
    out = torch.as_tensor(arr[t.detach().cpu().numpy()], dtype=torch.float32, device=like.device)
    return out.reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion:
    """The forward process and the DDPM posterior for one β schedule (Ho et al. 2020, §2).

    ``timestep_map[i]`` is the training timestep the denoiser sees at index ``i`` of this chain:
    the identity for the training diffusion, the kept steps for a respaced one (:meth:`respace`).
    Arrays are float64 numpy; :func:`_extract` casts per use.
    """

    def __init__(self, betas: np.ndarray, timestep_map: Sequence[int] | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not ((betas > 0) & (betas <= 1)).all():
            raise MDMError("betas must be a non-empty 1-d array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # Ho et al. Eq. 7: q(x_{t-1} | x_t, x_0) = N(coef1 · x_0 + coef2 · x_t, β̃_t)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    @classmethod
    def from_schedule(cls, name: str, steps: int) -> "GaussianDiffusion":
        return cls(beta_schedule(name, steps))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε`` (Ho et al. Eq. 4)."""
        return (
            _extract(self.sqrt_alphas_cumprod, t, x0) * x0 + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Eq. 4 solved for ``x_0``."""
        return (x_t - _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _extract(
            self.sqrt_alphas_cumprod, t, x_t
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_{t-1} | x_t, x_0)`` (Ho et al. Eq. 6–7)."""
        mean = _extract(self.posterior_mean_coef1, t, x_t) * x0 + _extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _extract(self.posterior_variance, t, x_t)

    def respace(self, steps: int) -> "GaussianDiffusion":
        """The chain over :func:`space_timesteps` of this one: ``β'_i = 1 − ᾱ_{τ_i} / ᾱ_{τ_{i−1}}``
        (improved-diffusion's ``SpacedDiffusion``); the marginals ``q(x_t | x_0)`` of the kept steps
        are unchanged."""
        kept = space_timesteps(self.num_timesteps, steps)
        abar = self.alphas_cumprod[kept]
        betas = 1.0 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(betas, self.timestep_map[kept])


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of integer timesteps ``(B,)`` → ``(B, dim)`` (improved-diffusion's
    ``timestep_embedding``; MDM indexes the same sin/cos table by ``t``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim % 2))


# --------------------------------------------------------------------------------------------
# the denoiser
# --------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """The frozen-encoder features of a batch of scripts (on the model's device).

    ``script`` (B, E): pooled ``"{emotion} {background}"``; ``keyframe`` (B, K, E): pooled
    description of each keyframe (zeros at padding); ``mask`` (B, K) bool, True = a real keyframe.
    """

    script: Tensor
    keyframe: Tensor
    mask: Tensor


def script_text(script: Script) -> str:
    """The text of the condition token: emotion, then background (see the module docstring)."""
    return " ".join(p for p in (script.emotion.strip(), script.background.strip()) if p)


def keyframe_description(script: Script, k: int, annotation: str) -> str:
    """Keyframe ``k``'s (1-based) description of type ``annotation``; missing is an error, never a fallback."""
    desc = script.keyframes[k - 1].descriptions.get(annotation)
    if desc is None:
        raise DataError(f"script {script.script_id!r} keyframe {k}: no {annotation!r} description")
    return desc.strip()


def keyframe_units(scripts: Sequence[Script]) -> list[Script]:
    """Every keyframe as its own one-keyframe script (``model.unit: keyframe``, the paper's baseline: one
    prompt per keyframe): its descriptions and values, the script's emotion and background, index 1;
    in script / keyframe order, so their values stack like the scripts' (a one-keyframe script maps
    to itself)."""
    from dataclasses import replace

    return [
        s if len(s.keyframes) == 1 else replace(s, keyframes=(replace(kf, index=1),))
        for s in scripts
        for kf in s.keyframes
    ]


class KeyframeMDM(nn.Module):
    """MDM's transformer-encoder denoiser over a script's keyframes (see the module docstring).

    Sequence: ``[z_tk, kf_1, ..., kf_K]`` with ``z_tk = MLP(sin(t)) + pos_0 + (Linear(text) or null)``
    and ``kf_k = Linear(x_t[k]) + pos_k + (Linear(description_k) or null)``; output
    ``Linear(h[1:])`` per keyframe, in z-scored units.
    """

    def __init__(self, cfg: MDMConfig, feat_mean, feat_std, text_encoder=None):
        """``text_encoder``: an already loaded ``(encoder, tokenizer)`` pair (shared, frozen), or None
        to load ``cfg.text_encoder``."""
        super().__init__()
        self.cfg = cfg
        mean = torch.as_tensor(np.asarray(feat_mean, dtype=np.float32)).reshape(-1)
        std = torch.as_tensor(np.asarray(feat_std, dtype=np.float32)).reshape(-1)
        if mean.numel() != N_CHANNELS or std.numel() != N_CHANNELS:
            raise MDMError(f"feat_mean/feat_std have {mean.numel()}/{std.numel()} values, expected {N_CHANNELS}")
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise MDMError("feat_mean must be finite and feat_std finite and > 0")
        self.register_buffer("feat_mean", mean.clone())  # (61,)
        self.register_buffer("feat_std", std.clone())  # (61,)
        # The channel ranges, as values and in z-scored units (constants and derived: not saved).
        self.register_buffer("low", torch.tensor(LOW), persistent=False)  # (61,)
        self.register_buffer("high", torch.tensor(HIGH), persistent=False)  # (61,)
        self.register_buffer("low_z", (self.low - mean) / std, persistent=False)  # (61,)
        self.register_buffer("high_z", (self.high - mean) / std, persistent=False)  # (61,)

        if text_encoder is None:
            with torch.random.fork_rng(devices=[]):  # loading must not move the caller's RNG
                text_encoder = load_text_encoder(cfg.text_encoder)
        encoder, tokenizer = text_encoder
        enc_dim = getattr(encoder.config, "hidden_size", None) or encoder.config.d_model
        d = cfg.d_model

        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))  # MDM TimestepEmbedder
        self.embed_script = nn.Linear(enc_dim, d)  # MDM embed_text
        self.embed_keyframe_text = nn.Linear(enc_dim, d)
        self.null_script = nn.Parameter(torch.zeros(d))  # c = ∅ (zero = MDM's mask_cond, then learned)
        self.null_keyframe = nn.Parameter(torch.zeros(d))
        self.input_process = nn.Linear(N_CHANNELS, d)  # MDM InputProcess
        self.pos_embed = nn.Parameter(torch.randn(MAX_KEYFRAMES + 1, d) * 0.02)  # cond token + 5 keyframes
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, cfg.ff_dim, cfg.dropout, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)  # MDM trans_enc
        self.output_process = nn.Linear(d, N_CHANNELS)  # MDM OutputProcess

        self.text_encoder = encoder.eval()
        self.text_encoder.requires_grad_(False)
        self.tokenizer = tokenizer
        self._text_cache: dict[str, Tensor] = {}  # string -> pooled frozen feature (E,), CPU float32
        self.diffusion = GaussianDiffusion.from_schedule(cfg.noise_schedule, cfg.diffusion_steps)
        self._spaced: dict[int, GaussianDiffusion] = {}

    def train(self, mode: bool = True) -> "KeyframeMDM":
        super().train(mode)
        self.text_encoder.eval()  # frozen feature extractor: never dropout
        return self

    @contextmanager
    def _eval_mode(self):
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------------------------------
    # text
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def cache_texts(self, texts: Sequence[str]) -> int:
        """Run the frozen encoder (masked mean pooling) on the strings not cached yet; returns how many were new."""
        new = [t for t in dict.fromkeys(texts) if t not in self._text_cache]
        device = self.feat_mean.device
        for i in range(0, len(new), _ENCODE_CHUNK):
            chunk = new[i : i + _ENCODE_CHUNK]
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
            )
            mask = batch["attention_mask"].to(device)  # (b, L)
            hidden = self.text_encoder(input_ids=batch["input_ids"].to(device), attention_mask=mask).last_hidden_state
            w = mask.unsqueeze(-1).float()  # (b, L, 1)
            pooled = (hidden.float() * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # (b, E)
            for text, row in zip(chunk, pooled.cpu()):
                self._text_cache[text] = row.clone()
        return len(new)

    def text_features(self, texts: Sequence[str]) -> Tensor:
        """Pooled frozen features ``(N, E)`` of ``texts`` on the model's device (cached per string)."""
        texts = list(texts)
        self.cache_texts(texts)
        return torch.stack([self._text_cache[t] for t in texts]).to(self.feat_mean.device)

    def script_texts(self, scripts: Sequence[Script], annotation: str) -> list[str]:
        """Every string the conditioning of ``scripts`` needs (to fill the cache up front)."""
        return [script_text(s) for s in scripts] + [
            keyframe_description(s, kf.index, annotation) for s in scripts for kf in s.keyframes
        ]

    # ---------------------------------------------------------------------------------------
    # batches
    # ---------------------------------------------------------------------------------------

    def normalise(self, values: Tensor) -> Tensor:
        return (values - self.feat_mean) / self.feat_std

    def denormalise(self, z: Tensor) -> Tensor:
        """z-scored → ARKit values, clipped to the channel ranges."""
        return torch.minimum(torch.maximum(z * self.feat_std + self.feat_mean, self.low), self.high)

    def prepare(self, scripts: Sequence[Script], annotation: str) -> tuple[Tensor, Conditioning]:
        """``(x0, cond)``: the z-scored keyframes ``(B, K, 61)`` (zeros at padding) and their conditioning."""
        if not scripts:
            raise MDMError("no scripts")
        device = self.feat_mean.device
        k_max = max(len(s.keyframes) for s in scripts)
        mask = torch.zeros(len(scripts), k_max, dtype=torch.bool)
        x0 = torch.zeros(len(scripts), k_max, N_CHANNELS)
        for b, s in enumerate(scripts):
            mask[b, : len(s.keyframes)] = True
            x0[b, : len(s.keyframes)] = torch.as_tensor(s.values)
        mask, x0 = mask.to(device), x0.to(device)
        x0 = torch.where(mask[..., None], self.normalise(x0), torch.zeros_like(x0))
        script_feat = self.text_features([script_text(s) for s in scripts])  # (B, E)
        kf_feat = torch.zeros(len(scripts), k_max, script_feat.shape[-1], device=device)
        descs = [keyframe_description(s, kf.index, annotation) for s in scripts for kf in s.keyframes]
        kf_feat[mask] = self.text_features(descs)  # row-major order matches the loop above
        return x0, Conditioning(script=script_feat, keyframe=kf_feat, mask=mask)

    # ---------------------------------------------------------------------------------------
    # the network G(x_t, t, c)
    # ---------------------------------------------------------------------------------------

    def denoise(self, x_t: Tensor, t: Tensor, cond: Conditioning, drop: Tensor | bool = False) -> Tensor:
        """The raw network output ``(B, K, 61)`` (``x̂_0`` or ``ε̂`` in z-scored units).

        ``t`` (B,) training timesteps; ``drop`` (B,) bool or a bool for all: use the null condition.
        Padding keyframes are masked attention keys: they cannot affect the real ones.
        """
        b, k, _ = x_t.shape
        drop = torch.as_tensor(drop, dtype=torch.bool, device=x_t.device).expand(b)
        text = torch.where(drop[:, None], self.null_script, self.embed_script(cond.script))  # (B, d)
        cond_tok = self.time_embed(timestep_embedding(t, self.cfg.d_model)) + text + self.pos_embed[0]  # (B, d)
        kf_text = torch.where(
            drop[:, None, None], self.null_keyframe, self.embed_keyframe_text(cond.keyframe)
        )  # (B, K, d)
        kf_tok = self.input_process(x_t) + self.pos_embed[1 : k + 1] + kf_text  # (B, K, d)
        seq = torch.cat([cond_tok[:, None], kf_tok], dim=1)  # (B, 1 + K, d)
        pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=x_t.device), ~cond.mask], dim=1)  # True = ignore
        h = self.encoder(seq, src_key_padding_mask=pad)  # (B, 1 + K, d)
        return self.output_process(h[:, 1:])  # (B, K, 61)

    def guided_output(self, x_t: Tensor, t: Tensor, cond: Conditioning, scale: float) -> Tensor:
        """Classifier-free guidance on the network output (MDM §3):
        ``G(x_t, t, ∅) + s · (G(x_t, t, c) − G(x_t, t, ∅))``; ``s = 1`` runs only the conditional pass."""
        if scale == 1.0:
            return self.denoise(x_t, t, cond, drop=False)
        b = x_t.shape[0]
        both = Conditioning(
            script=cond.script.repeat(2, 1), keyframe=cond.keyframe.repeat(2, 1, 1), mask=cond.mask.repeat(2, 1)
        )
        drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x_t.device)
        out = self.denoise(x_t.repeat(2, 1, 1), t.repeat(2), both, drop)
        out_cond, out_uncond = out[:b], out[b:]
        return out_uncond + scale * (out_cond - out_uncond)

    # ---------------------------------------------------------------------------------------
    # training objective
    # ---------------------------------------------------------------------------------------

    def loss_terms(self, x0: Tensor, cond: Conditioning, t: Tensor, noise: Tensor, drop: Tensor | bool) -> Tensor:
        """Per-script masked MSE ``(B,)`` of the prediction against ``x_0`` (MDM Eq. 2) or ``ε``:
        the mean over the script's real keyframes and 61 channels (MDM's ``masked_l2``)."""
        x_t = self.diffusion.q_sample(x0, t, noise)
        out = self.denoise(x_t, t, cond, drop)
        target = x0 if self.cfg.prediction == "x0" else noise
        m = cond.mask[..., None]  # (B, K, 1)
        sq = torch.where(m, (out - target) ** 2, torch.zeros_like(out))  # where, not *, so padding can't leak NaN
        return sq.sum(dim=(1, 2)) / (cond.mask.sum(dim=1) * N_CHANNELS)

    def examples(self, scripts: Sequence[Script]) -> list[Script]:
        """The examples ``scripts`` make: one per keyframe (:func:`keyframe_units`) with ``unit: keyframe``,
        the scripts themselves with ``unit: script``."""
        return keyframe_units(scripts) if self.cfg.unit == "keyframe" else list(scripts)

    def losses(self, scripts: Sequence[Script], annotation: str, generator: torch.Generator | None = None) -> dict:
        """``{"loss": scalar, "per_script": (B,)}`` for a batch of scripts, one loss per example
        (:meth:`examples`: per keyframe with ``unit: keyframe``).

        ``t ~ U{0..T−1}``, ``ε ~ N(0, I)`` and, in training mode, the condition drops (probability
        ``cfg.cond_drop``) come from ``generator`` (CPU; the global RNG when None). In eval mode
        nothing is dropped: a fixed generator then gives a comparable validation loss.
        """
        x0, cond = self.prepare(self.examples(scripts), annotation)
        b = x0.shape[0]
        t = torch.randint(0, self.cfg.diffusion_steps, (b,), generator=generator).to(x0.device)
        noise = torch.randn(tuple(x0.shape), generator=generator).to(x0.device)
        u = torch.rand(b, generator=generator).to(x0.device)  # always drawn: the same stream in both modes
        drop = (u < self.cfg.cond_drop) if self.training else torch.zeros(b, dtype=torch.bool, device=x0.device)
        per_script = self.loss_terms(x0, cond, t, noise, drop)
        return {"loss": per_script.mean(), "per_script": per_script}

    forward = losses  # DDP synchronises gradients through forward()

    # ---------------------------------------------------------------------------------------
    # sampling
    # ---------------------------------------------------------------------------------------

    def spaced(self, steps: int) -> GaussianDiffusion:
        if steps not in self._spaced:
            self._spaced[steps] = self.diffusion.respace(steps)
        return self._spaced[steps]

    def predict_x0(
        self, x_t: Tensor, i: Tensor, cond: Conditioning, scale: float, diffusion: GaussianDiffusion
    ) -> Tensor:
        """Guided ``x̂_0`` at index ``i`` of ``diffusion``, clamped to the z-scored channel ranges."""
        t = torch.as_tensor(diffusion.timestep_map[i.cpu().numpy()], device=x_t.device)
        out = self.guided_output(x_t, t, cond, scale)
        x0 = out if self.cfg.prediction == "x0" else diffusion.predict_x0_from_eps(x_t, i, out)
        return torch.minimum(torch.maximum(x0, self.low_z), self.high_z)

    @torch.no_grad()
    def sample_normalised(
        self,
        cond: Conditioning,
        steps: int,
        guidance_scale: float,
        generator: torch.Generator | None = None,
        should_stop=None,
    ) -> Tensor:
        """Ancestral sampling (Ho et al. Algorithm 2) over the respaced chain → z-scored ``x_0`` (B, K, 61).

        Noise order: ``x_T`` first, then one draw per step ``i > 0`` (no noise at the last step).
        ``should_stop`` (optional, no arguments) is asked before every denoising step; True raises
        ``TimeoutError`` (a server's request deadline passed: nobody waits for the answer)."""
        diffusion = self.spaced(steps)
        b, k = cond.mask.shape
        device = self.feat_mean.device
        x = torch.randn(b, k, N_CHANNELS, generator=generator).to(device)
        for i in reversed(range(diffusion.num_timesteps)):
            if should_stop is not None and should_stop():
                raise TimeoutError(f"sampling stopped with {i + 1} of {diffusion.num_timesteps} steps left")
            idx = torch.full((b,), i, dtype=torch.long)
            x0 = self.predict_x0(x, idx, cond, guidance_scale, diffusion)
            mean, var = diffusion.q_posterior(x0, x, idx)
            if i > 0:
                x = mean + var.sqrt() * torch.randn(b, k, N_CHANNELS, generator=generator).to(device)
            else:
                x = mean
        return x

    def sample(
        self,
        scripts: Sequence[Script],
        annotation: str,
        steps: int,
        guidance_scale: float,
        generator: torch.Generator | None = None,
        should_stop=None,
    ) -> list[np.ndarray]:
        """Keyframes for each script: float32 ``(K_i, 61)`` arrays, finite and in the channel ranges.

        Only the scripts' texts and keyframe counts are used (their values are ignored). With
        ``unit: keyframe`` every keyframe is sampled alone (:meth:`examples`), all in one batch. Runs in
        eval mode (the module's mode is restored). ``should_stop``: see :meth:`sample_normalised`."""
        if guidance_scale < 0 or not math.isfinite(guidance_scale):
            raise MDMError(f"guidance_scale must be finite and >= 0, got {guidance_scale!r}")
        space_timesteps(self.cfg.diffusion_steps, steps)  # validates steps
        units = self.examples(scripts)
        with self._eval_mode(), torch.no_grad():
            _x0, cond = self.prepare(units, annotation)
            x0 = self.sample_normalised(cond, steps, guidance_scale, generator, should_stop)
            values = self.denormalise(x0).cpu().numpy()
        per_unit = [values[b, : len(s.keyframes)].astype(np.float32) for b, s in enumerate(units)]
        if self.cfg.unit != "keyframe":
            return per_unit
        ends = np.cumsum([len(s.keyframes) for s in scripts])
        return [np.concatenate(per_unit[e - len(s.keyframes) : e]) for s, e in zip(scripts, ends)]


def build_keyframe_mdm(job: dict, feat_mean, feat_std, text_encoder=None) -> KeyframeMDM:
    """A fresh :class:`KeyframeMDM` for a resolved ``keyframe_mdm`` job (CPU, training mode);
    ``text_encoder`` optionally an already loaded ``(encoder, tokenizer)`` pair."""
    return KeyframeMDM(mdm_config(job), feat_mean, feat_std, text_encoder=text_encoder)


# --------------------------------------------------------------------------------------------
# save / load / serve (no pickle)
# --------------------------------------------------------------------------------------------


def mdm_state(model: KeyframeMDM) -> dict[str, Tensor]:
    """What a checkpoint stores: every tensor but the frozen encoder's (= ``checkpoint.model_state(model, False)``)."""
    return ckpt.model_state(model, keep_encoder=False)


def load_mdm_weights(model: KeyframeMDM, weights: dict[str, Tensor], where: str) -> None:
    """Load checkpoint tensors into ``model``; every key and shape must match (the encoder's are
    never stored). :class:`~facelab.core.checkpoint.CheckpointError` naming ``where`` otherwise."""
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise ckpt.CheckpointError(
            f"{where}: weights do not fit the keyframe_mdm model (missing {missing[:5]}, unexpected {extra[:5]})"
        )
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape):
            raise ckpt.CheckpointError(
                f"{where}: {k!r} has shape {tuple(weights[k].shape)}, the config gives {tuple(v.shape)}"
            )
    model.load_state_dict(weights, strict=False)


class ServableKeyframeMDM:
    """A loaded MDM answering whole scripts, with the interface of
    :class:`facelab.families.keyframe_lm.servable.ServableKeyframeLM` (``keyframes``, ``label``)."""

    label = None  # no base-model label: the denoiser is trained from scratch

    def __init__(self, model: KeyframeMDM, config: dict):
        import threading

        self.model, self.config = model, config
        self._count_lock, self._count_tok = threading.Lock(), None  # prompt_tokens' own tokenizer copy

    def prompt_tokens(self, request: dict) -> dict:
        """Token counts of a ``/v1/keyframes`` request against the frozen text encoder: ``{"prompt": the
        longest encoder input it makes ("emotion background", or a description), "limit": the encoder's
        maximum length, "why", "read": model.max_text_tokens (inputs are truncated to that), "fields":
        tokens per request field}``. Counted on a private copy of the tokenizer (thread safety)."""
        import copy

        fields = {"background": request["background"], "emotion": request["emotion"]}
        fields.update({f"keyframes.{i}": d for i, d in enumerate(request["keyframes"])})
        script = " ".join(p for p in (request["emotion"].strip(), request["background"].strip()) if p)
        with self._count_lock:
            if self._count_tok is None:
                self._count_tok = copy.deepcopy(self.model.tokenizer)
            n = lambda t: len(self._count_tok(t)["input_ids"])  # noqa: E731 - with [CLS] / [SEP], as encoded
            counts = {k: n(v) for k, v in fields.items()}
            prompt = max([n(script)] + [n(d.strip()) for d in request["keyframes"]])
        enc = self.model.text_encoder.config
        limit = int(getattr(enc, "max_position_embeddings", 0) or 0) or 512
        tok_max = getattr(self.model.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < limit:
            limit = tok_max
        return {
            "prompt": prompt,
            "limit": limit,
            "why": f"the text encoder reads at most {limit} tokens",
            "read": int(self.model.cfg.max_text_tokens),
            "fields": counts,
        }

    def keyframes(
        self,
        background: str,
        emotion: str,
        descriptions: list[str],
        seed: int | None = None,
        should_stop=None,
    ) -> list[ParseResult]:
        """One result per keyframe description (of the job's annotation type), sampled (each alone with
        ``model.unit: keyframe``, jointly with ``script``) with the job's ``eval.sampling_steps`` and
        ``eval.guidance_scale``. Deterministic: the noise
        comes from ``seed`` (default: the job's ``train.seed``). Always ``valid`` and nothing is
        clipped after the fact (``n_clipped = 0``): the last sampling step returns the clamped
        ``x̂_0`` itself (its posterior has ``ᾱ_prev = 1``), which is in range by construction (the final
        clip to the ranges only removes float rounding)."""
        annotation = self.config["data"]["annotation"]
        kfs = tuple(
            Keyframe(index=i + 1, descriptions={"original": d, annotation: d}, values=np.zeros(N_CHANNELS))
            for i, d in enumerate(descriptions)
        )
        script = Script(script_id="request", actor="unknown", background=background, emotion=emotion, keyframes=kfs)
        e = self.config["eval"]
        gen = torch.Generator().manual_seed(self.config["train"]["seed"] if seed is None else seed)
        values = self.model.sample([script], annotation, e["sampling_steps"], e["guidance_scale"], gen, should_stop)[0]
        return [
            ParseResult(values=v, valid=True, n_missing=0, n_unknown=0, n_clipped=0, error=None, keyframe=i + 1)
            for i, v in enumerate(values)
        ]


def load_servable_mdm(
    weights: dict[str, Tensor], config: dict, device: str = "cpu", where: str = "checkpoint"
) -> ServableKeyframeMDM:
    """Rebuild a :class:`ServableKeyframeMDM` from checkpoint tensors and the resolved job
    (``config.json``); the frozen encoder is loaded from ``model.text_encoder``."""
    for name in ("feat_mean", "feat_std"):
        if name not in weights:
            raise ckpt.CheckpointError(f"{where}: no {name!r} buffer (the z-score statistics)")
    try:
        model = build_keyframe_mdm(
            config, weights["feat_mean"].float().cpu().numpy(), weights["feat_std"].float().cpu().numpy()
        )
    except (ValueError, KeyError, TypeError) as exc:  # MDMError and the config's ValidationError
        raise ckpt.CheckpointError(f"{where}: not a usable keyframe_mdm checkpoint ({exc})") from None
    load_mdm_weights(model, weights, where)
    return ServableKeyframeMDM(model.to(device).eval(), config)


def load_servable(dirpath, device: str = "cpu", root=None) -> ServableKeyframeMDM:
    """The family's loader (:class:`facelab.families.base.Family`): a checkpoint directory → servable."""
    from pathlib import Path

    return load_servable_mdm(
        ckpt.load_weights(dirpath), ckpt.load_config(dirpath), device, str(Path(dirpath) / ckpt.MODEL_FILE)
    )


def report_label(trial, annotation: str) -> str:
    """Its row in KeyframeFace Table 3: the method, the annotation type and the sampling steps."""
    return f"{trial.variant} (Express4D-MDM, {annotation}, {trial.params.get('eval.sampling_steps', '?')} steps)"
