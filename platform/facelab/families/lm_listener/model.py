"""LM-Listener — the text-to-expression baseline of Ng et al. 2023, "Can Language Models Learn to
Listen?" (ICCV 2023), used as a learned baseline row of the CTEG paper ("When Words Smile",
Xu et al., EMNLP 2025, Tables 2 and 5). Text -> a sequence of 53-d FLAME expression vectors, on the
same EmoAva data and with the same evaluation interface as CTEG (:mod:`facelab.tasks.expressions.evaluate`).

The method has two parts, trained one after the other (``facelab.families.lm_listener.loop``):

1. **Discretise the motion** (Ng et al. 2023 §3.2 "Discretizing Listener Motion"): a VQ-VAE maps
   every window of ``downsample`` frames to one entry of a codebook of ``codebook_size`` vectors
   (:class:`ExpressionVQVAE`). The idea comes from Learning2Listen (Ng et al., CVPR 2022), whose
   listener VQ-VAE downsamples with strided 1-D convolutions to 8 frames per token (then a
   transformer; codebook 200). The LM-Listener release (github.com/sanjayss34/lm-listener, built on
   T2M-GPT; "the reference" below) uses a purely convolutional VQ-VAE — stride-2 convolutions (``down_t`` 3: 8 frames per
   token), dilated residual blocks (depth 3, dilation growth 3), a 256-entry codebook with EMA
   updates (μ = 0.99) and reset of unused codes (``ema_reset``) — which this module follows.
2. **Language-model the codes** (§3.3): an autoregressive transformer predicts the code sequence
   ``[BOS, c_1..c_W, EOS]`` from the text; generation samples with nucleus (top-p) sampling
   (:class:`CodeLM`, :meth:`LMListener.generate`).

Choices made here, and why (each is restated where it is implemented):

* **Text conditioning.** The paper fine-tunes a pretrained text LM (GPT-2) whose vocabulary is
  extended by the motion tokens, the text being a prefix of the same sequence. The platform's job
  spec (``LMListenerModel``) instead pairs a *frozen* pretrained text encoder (``text_encoder``,
  offline MiniLM by default, as CTEG) with a small decoder-only code transformer that reads the
  encoder's token states through cross-attention. That keeps the pretrained language knowledge
  (the paper's point: initialising from a text-only LM helps) at a size that trains on the
  platform, and it gives the same unconditional mode as CTEG: the empty text masks the whole
  memory (as ``-uncondition`` of CTEG's reference code).
* **Causal VQ-VAE.** Every convolution is causal (left padding only): code ``c_w`` depends only on
  frames up to the end of window ``w``, and the frames of window ``w`` decode from codes ``<= w``.
  The LM-Listener code's convolutions are centred (symmetric padding). Causality is what makes the teacher-forced prediction
  for Cppl honest (:meth:`LMListener.teacher_forced_means`: no future frame leaks into the
  "history" codes or into the decoded window), and it lets padding and crops be exact.
* **Downsampling.** ``downsample`` is factored into stride-2 stages (the reference's scheme) plus
  one stage for an odd remainder (e.g. 12 = 2·2·3), so every value the spec allows (1..32) works.
  The default is 4 frames per code (160 ms at 25 fps, vs. the paper's 8 at 30 fps, Fig. 2): EmoAva
  sequences are short (~52 frames on average), and 4 keeps ~13 tokens per utterance.
* **Normalisation.** Inputs are centred on the training-set mean face (buffer ``mean_expression``)
  but not scaled: the reconstruction loss is then in the raw units in which CTEG's metrics (MSE,
  Cppl's δ and σ per coordinate) are computed. (The LM-Listener code z-scores with its data's
  mean/std.)
* **Lengths.** A code covers ``downsample`` frames, so a sequence of ``L`` frames has
  ``ceil(L / downsample)`` codes; the last window is padded by repeating the last frame and the
  padded frames are masked out of every loss. The code LM ends a sequence with EOS; generated
  sequences therefore have a multiple of ``downsample`` frames (cut at ``max_frames``).
* **Unconditional training.** With probability ``model.text_dropout`` (default 0.1) a training text is replaced by the empty text, so the unconditional mode that the
  Diversity metric samples is trained (as classifier-free-guidance models do); the paper has no
  such mode.

Weights named ``text_encoder.*`` are the frozen pretrained encoder; checkpoints drop them
(:func:`facelab.core.checkpoint.save` with ``keep_encoder=False``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.core.layers import Attention, FeedForward, KVCache, xavier_init_
from facelab.core.text_encoder import load_text_encoder
from facelab.families.lm_listener.job import LMListenerConfig

IGNORE = -100
"""Cross-entropy target of padding positions."""


def lm_listener_config(job: dict) -> LMListenerConfig:
    """The typed config from a resolved ``lm_listener`` job dict (``model`` + ``data.max_frames``)."""
    return LMListenerConfig(**job["model"], max_frames=job["data"]["max_frames"])


def build_lm_listener(job: dict, mean_expression) -> "LMListener":
    """A fresh :class:`LMListener` for a resolved job dict and the training-set mean face."""
    return LMListener(lm_listener_config(job), torch.as_tensor(mean_expression, dtype=torch.float32))


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Uniform [0, 1) numbers drawn on ``generator``'s device, then moved (as ``decoding._randn``),
    so a CPU generator gives the same draws whatever device the model is on."""
    src = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=src).to(device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _broadcast(t: Tensor) -> Tensor:
    if _distributed():
        dist.broadcast(t, src=0)
    return t


def nucleus_sample(logits: Tensor, top_p: float, u: Tensor) -> Tensor:
    """Nucleus (top-p) sampling, Holtzman et al. 2020, with the uniform draws ``u`` (B,).

    Keeps the most likely tokens up to and including the first one at which the cumulative
    probability reaches ``top_p`` (the reference's rule: a token is kept if the mass *before* it is
    below p, so the top token is always kept and a tiny p is greedy), renormalises, and inverts the
    CDF at ``u``. Ties are broken by index (stable sort), so draws are deterministic.
    """
    probs = logits.float().softmax(-1)
    sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
    keep = (sorted_p.cumsum(-1) - sorted_p) < top_p
    keep[..., 0] = True
    kept = sorted_p * keep
    cdf = kept.cumsum(-1) / kept.sum(-1, keepdim=True)
    j = (cdf < u[:, None].to(cdf.dtype)).sum(-1).clamp(max=kept.shape[-1] - 1)
    j = torch.minimum(j, keep.sum(-1) - 1)  # rounding at cdf's top must not pick a dropped token
    return order.gather(-1, j[:, None])[:, 0]


# ------------------------------------------------------------------------------------------------
# VQ-VAE (Learning2Listen §3 / LM-Listener §3.2, causal variant)
# ------------------------------------------------------------------------------------------------


def stride_factors(downsample: int) -> list[int]:
    """Strides of the downsampling stages: 2 for every factor 2 of ``downsample`` (the reference's
    stride-2 convolutions), then the odd remainder as one stage; [] for 1."""
    out, n = [], int(downsample)
    while n % 2 == 0:
        out.append(2)
        n //= 2
    return out + ([n] if n > 1 else [])


class CausalConv1d(nn.Conv1d):
    """``Conv1d`` over (B, C, T) that sees the present and the past only.

    Left zero padding of ``dilation·(kernel−1) − (stride−1)``: with ``kernel = 2·stride`` (the
    reference's ``filter_t = 2·stride_t``) output ``i`` reads inputs ``[(i−1)·s, (i+1)·s − 1]`` —
    its own window and the previous one — and ``T`` inputs give ``T / s`` outputs.
    """

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__(c_in, c_out, kernel, stride=stride, dilation=dilation)
        self.left = dilation * (kernel - 1) - (stride - 1)
        if self.left < 0:
            raise ValueError("kernel too small for the stride")

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.left, 0)))


class ResBlock(nn.Module):
    """Pre-activation residual block ``x + W₁·ReLU(conv_k3,d(ReLU(x)))`` (T2M-GPT's ResConv1DBlock,
    causal). Dilations cycle 1, 3, 9 (the reference's dilation growth rate 3, depth 3)."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = CausalConv1d(channels, channels, 3, dilation=dilation)
        self.proj = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj(F.relu(self.conv(F.relu(x))))


def _dilation(i: int) -> int:
    return 3 ** (i % 3)


class VQEncoder(nn.Module):
    """(B, T, 53) centred frames -> (B, T/s, code_dim): conv, strided conv stages, residual blocks, conv."""

    def __init__(self, cfg: LMListenerConfig):
        super().__init__()
        h = cfg.vq_hidden
        layers: list[nn.Module] = [CausalConv1d(cfg.expr_dim, h, 3), nn.ReLU()]
        for f in stride_factors(cfg.downsample):
            layers += [CausalConv1d(h, h, 2 * f, stride=f), nn.ReLU()]
        layers += [ResBlock(h, _dilation(i)) for i in range(cfg.vq_layers)]
        layers.append(CausalConv1d(h, cfg.code_dim, 3))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.transpose(1, 2)).transpose(1, 2)


class VQDecoder(nn.Module):
    """(B, W, code_dim) -> (B, W·s, 53): conv, residual blocks (reversed dilations), then per
    stage nearest-neighbour upsampling + conv (the reference's Upsample + Conv1d), two output convs."""

    def __init__(self, cfg: LMListenerConfig):
        super().__init__()
        h, s = cfg.vq_hidden, cfg.downsample
        layers: list[nn.Module] = [CausalConv1d(cfg.code_dim, h, 3)]
        layers += [ResBlock(h, _dilation(i)) for i in reversed(range(cfg.vq_layers))]
        lookback = 2 * s + sum(2 * _dilation(i) * s for i in range(cfg.vq_layers))  # in frames
        rate = s  # frames per step at the current layer
        for f in reversed(stride_factors(s)):
            layers += [nn.Upsample(scale_factor=f, mode="nearest"), CausalConv1d(h, h, 3), nn.ReLU()]
            lookback += rate + 2 * (rate // f)  # rounding of the upsampling + the conv's 2 steps
            rate //= f
        layers += [CausalConv1d(h, h, 3), nn.ReLU(), CausalConv1d(h, cfg.expr_dim, 3)]
        lookback += 4
        self.net = nn.Sequential(*layers)
        self.context_codes = -(-lookback // s) + 1
        """How many codes before a window can affect that window's frames (an upper bound, with a
        code of slack): decoding the crop ``c[w − context_codes .. w]`` gives window ``w`` exactly."""

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.transpose(1, 2)).transpose(1, 2)


class Codebook(nn.Module):
    """Nearest-neighbour quantiser with EMA codebook updates and dead-code restarts.

    EMA (van den Oord et al. 2017, Appendix A.1; T2M-GPT's ``QuantizeEMAReset``, which the
    reference imports): per training batch, with ``n_k`` the windows assigned to code ``k`` and
    ``s_k`` the sum of their encoder outputs, ``N_k ← γN_k + (1−γ)n_k``, ``S_k ← γS_k + (1−γ)s_k``,
    ``e_k = S_k / N_k`` (both start at 0, so the ratio is the unbiased weighted mean; codes never
    used keep their initial vector). ``ema_decay = 0`` switches to a learned codebook (a Parameter)
    trained by the codebook loss ``||sg[z_e] − e||²``; ``N_k`` is then still tracked (γ = 0.99)
    for the restarts.

    Restarts (Jukebox's "random restarts for embeddings", Dhariwal et al. 2020; the "reset" of
    ``QuantizeEMAReset``, threshold 1): after the update, a code with ``N_k`` below
    ``dead_threshold`` is moved onto a random encoder output of the batch (and ``N_k = 1``,
    ``S_k = e_k``). With ``N`` starting at 0 the first training batch therefore initialises the
    whole codebook from data, as ``QuantizeEMAReset.init_codebook`` does.

    Under DDP the counts and sums are all-reduced and the restart vectors come from rank 0, so every
    rank keeps the same codebook.
    """

    def __init__(self, size: int, dim: int, ema_decay: float, dead_threshold: float):
        super().__init__()
        self.size, self.dim = size, dim
        self.ema = ema_decay > 0
        self.decay = ema_decay if self.ema else 0.99
        self.dead_threshold = dead_threshold
        init = torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size)
        if self.ema:
            self.register_buffer("codebook", init)
            self.register_buffer("ema_sum", torch.zeros(size, dim))
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("ema_count", torch.zeros(size))

    @torch.no_grad()
    def nearest(self, z: Tensor) -> Tensor:
        """Index of the closest code (L2) of every row of ``z`` (N, D)."""
        cb = self.codebook.detach()
        d = z.pow(2).sum(-1, keepdim=True) - 2 * z @ cb.t() + cb.pow(2).sum(-1)[None]
        return d.argmin(-1)

    @torch.no_grad()
    def update(self, z: Tensor, idx: Tensor) -> None:
        """One training update from the valid encoder outputs ``z`` (N, D) and their codes (N,)."""
        z = z.detach().float()
        counts = _all_reduce_sum(torch.bincount(idx, minlength=self.size).to(z.dtype))
        self.ema_count.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        if self.ema:
            sums = _all_reduce_sum(torch.zeros(self.size, self.dim, device=z.device).index_add_(0, idx, z))
            self.ema_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            live = self.ema_count > 1e-6
            self.codebook[live] = self.ema_sum[live] / self.ema_count[live, None]
        if self.dead_threshold > 0 and z.shape[0] > 0:
            self._restart(z)

    def _restart(self, z: Tensor) -> None:
        dead = self.ema_count < self.dead_threshold
        n = int(dead.sum())
        if n == 0:
            return
        new = _broadcast(z[torch.randint(0, z.shape[0], (n,), device=z.device)].contiguous())
        self.codebook.data[dead] = new
        self.ema_count[dead] = 1.0
        if self.ema:
            self.ema_sum[dead] = new


class ExpressionVQVAE(nn.Module):
    """The motion VQ-VAE: frames -> codes (one per ``downsample`` frames) -> frames.

    Works on frames centred on the mean face (the caller passes it). See the module docstring.
    """

    def __init__(self, cfg: LMListenerConfig):
        super().__init__()
        self.cfg = cfg
        self.s = cfg.downsample
        self.encoder = VQEncoder(cfg)
        self.decoder = VQDecoder(cfg)
        self.quantizer = Codebook(cfg.codebook_size, cfg.code_dim, cfg.ema_decay, cfg.dead_code_threshold)

    def prepare(self, frames: Tensor, lengths: Tensor, mean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Centred input padded to a multiple of ``s`` by repeating each sequence's last frame.

        Returns ``x`` (B, W·s, 53), ``frame_valid`` (B, W·s) (t < L) and ``window_valid`` (B, W)
        (w < ceil(L/s)). Whatever the padding held before, it is replaced: padding cannot matter.
        """
        b, t, _ = frames.shape
        w = -(-t // self.s)
        pos = torch.arange(w * self.s, device=frames.device)
        src = torch.minimum(pos[None, :], (lengths - 1).clamp(min=0)[:, None])  # repeat the last frame
        src = src.clamp(max=t - 1)
        x = frames.gather(1, src[..., None].expand(-1, -1, frames.shape[-1])) - mean
        frame_valid = pos[None, :] < lengths[:, None]
        window_valid = torch.arange(w, device=frames.device)[None, :] < (-(-lengths // self.s))[:, None]
        return x, frame_valid, window_valid

    def encode(self, frames: Tensor, lengths: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
        """``(codes (B, W) long, window_valid (B, W))``; codes of invalid windows are meaningless."""
        x, _, window_valid = self.prepare(frames, lengths, mean)
        z = self.encoder(x)
        idx = self.quantizer.nearest(z.reshape(-1, z.shape[-1])).view(z.shape[:2])
        return idx, window_valid

    def decode(self, codes: Tensor) -> Tensor:
        """Codes (B, W) -> centred frames (B, W·s, 53)."""
        return self.decoder(self.quantizer.codebook[codes])

    def losses(self, frames: Tensor, lengths: Tensor, mean: Tensor) -> dict[str, Tensor]:
        """Stage-1 objective: ``loss = recon_mse + β·commit (+ codebook loss without EMA)``.

        ``recon_mse``: squared error averaged over the 53 coordinates and all valid frames of the
        batch; ``commit``: ``||z_e − sg[e]||²`` averaged over the code dims and the valid windows;
        ``perplexity``: exp of the entropy of the batch's code usage (the reference's measure of
        codebook use; K is the most). The decoder gets ``z_e + sg[e − z_e]`` (straight-through
        estimator, van den Oord et al. 2017 §3.2). In training mode the codebook is updated.
        """
        x, frame_valid, window_valid = self.prepare(frames, lengths, mean)
        z = self.encoder(x)
        flat, valid = z.reshape(-1, z.shape[-1]), window_valid.reshape(-1)
        idx = self.quantizer.nearest(flat)
        e = self.quantizer.codebook[idx]  # a new tensor: later in-place codebook updates do not touch it
        wv = valid.to(z.dtype)
        n_win = wv.sum().clamp(min=1)
        commit = ((flat - e.detach()).pow(2).mean(-1) * wv).sum() / n_win
        out = {"commit": commit}
        if not self.quantizer.ema:
            out["codebook"] = ((flat.detach() - e).pow(2).mean(-1) * wv).sum() / n_win
        if self.training:
            self.quantizer.update(flat[valid], idx[valid])
        z_q = (flat + (e - flat).detach()).view_as(z)
        recon = self.decoder(z_q)
        fv = frame_valid.to(x.dtype)
        out["recon_mse"] = ((recon - x).pow(2).mean(-1) * fv).sum() / fv.sum().clamp(min=1)
        out["loss"] = out["recon_mse"] + self.cfg.commitment * commit + out.get("codebook", 0.0)
        usage = torch.bincount(idx[valid], minlength=self.quantizer.size).to(z.dtype)
        p = usage / usage.sum().clamp(min=1)
        out["perplexity"] = torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum()).detach()
        return out


# ------------------------------------------------------------------------------------------------
# code language model (LM-Listener §3.3, cross-attention variant)
# ------------------------------------------------------------------------------------------------


class CodeLMLayer(nn.Module):
    """Causal self-attention over the codes, cross-attention to the text, feed-forward (post-LN
    sub-layers shared with CTEG, :mod:`facelab.core.layers`)."""

    def __init__(self, d: int, n_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.self_attn = Attention(d, n_heads, dropout)
        self.cross_attn = Attention(d, n_heads, dropout)
        self.ff = FeedForward(d, ff_dim, dropout)

    def forward(
        self, x: Tensor, mem_kv: tuple[Tensor, Tensor], key_valid: Tensor, cache: KVCache | None = None
    ) -> Tensor:
        k, v = self.self_attn.keys_values(x)
        if cache is None:
            x = self.self_attn(x, k, v, causal=True)
        else:  # one new position: it may see every cached one
            x = self.self_attn(x, *cache.append(k, v))
        x = self.cross_attn(x, *mem_kv, key_valid=key_valid)
        return self.ff(x)


class CodeLM(nn.Module):
    """Decoder-only transformer over ``[BOS, c_1..c_W]`` predicting ``[c_1..c_W, EOS]``.

    Vocabulary: codes ``0..K−1``, ``EOS = K`` (output only), ``BOS = K + 1`` (input only); the
    output layer scores the K codes and EOS. Learned positional embeddings for
    ``ceil(max_frames / downsample) + 2`` positions (GPT-2-style, as the paper's LM).
    """

    def __init__(self, cfg: LMListenerConfig, text_dim: int):
        super().__init__()
        d, k = cfg.d_model, cfg.codebook_size
        self.tok = nn.Embedding(k + 2, d)
        self.pos = nn.Embedding(cfg.max_codes + 2, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.text_proj = nn.Identity() if text_dim == d else nn.Linear(text_dim, d)
        self.layers = nn.ModuleList(CodeLMLayer(d, cfg.n_heads, cfg.ff_dim, cfg.dropout) for _ in range(cfg.n_layers))
        self.head = nn.Linear(d, k + 1)

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per-layer keys/values of the projected text memory (computed once per batch)."""
        return [layer.cross_attn.keys_values(memory) for layer in self.layers]

    def forward(
        self, tokens: Tensor, mem_kv, key_valid: Tensor, start: int = 0, caches: list[KVCache] | None = None
    ) -> Tensor:
        """Logits (B, S, K+1) of the next token after each of ``tokens`` (B, S) at positions
        ``start..start+S−1``; with ``caches`` the earlier positions come from the KV caches."""
        pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
        h = self.drop(self.tok(tokens) + self.pos(pos)[None])
        for i, layer in enumerate(self.layers):
            h = layer(h, mem_kv[i], key_valid, None if caches is None else caches[i])
        return self.head(h)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------


class LMListener(nn.Module):
    """Text -> 53-d expression sequence through VQ codes (Ng et al. 2023). See the module docstring.

    ``stage`` selects what trains: 1 = the VQ-VAE (:meth:`vq_losses`), 2 = the code LM
    (:meth:`lm_losses`) with the VQ-VAE frozen (no grad, eval mode). :meth:`set_stage` sets the
    ``requires_grad`` flags so that DDP sees exactly the parameters the stage's loss uses.
    """

    def __init__(self, cfg: LMListenerConfig, mean_expression: Tensor):
        super().__init__()
        self.cfg = cfg
        mean = torch.as_tensor(mean_expression, dtype=torch.float32).reshape(-1)
        if mean.numel() != cfg.expr_dim:
            raise ValueError(f"mean_expression has {mean.numel()} values, expected {cfg.expr_dim}")
        self.register_buffer("mean_expression", mean.clone())  # saved with the weights
        self.eos, self.bos = cfg.codebook_size, cfg.codebook_size + 1

        self.vq = ExpressionVQVAE(cfg)
        encoder, tokenizer = load_text_encoder(cfg.text_encoder)
        text_dim = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "d_model")
        self.lm = CodeLM(cfg, text_dim)
        xavier_init_(self.lm)
        self.text_encoder = encoder  # frozen; the name makes checkpoints drop it
        self.tokenizer = tokenizer
        for p in encoder.parameters():
            p.requires_grad_(False)
        self.stage = 1
        self.set_stage(1)

    # ---------------------------------------------------------------------------------------
    # stages
    # ---------------------------------------------------------------------------------------

    def set_stage(self, stage: int) -> "LMListener":
        """Make ``stage``'s parameters (and only those) trainable."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.stage = stage
        for p in self.vq.parameters():
            p.requires_grad_(stage == 1)
        for p in self.lm.parameters():
            p.requires_grad_(stage == 2)
        return self.train(self.training)

    def stage_parameters(self, stage: int | None = None) -> list[nn.Parameter]:
        """The parameters an optimizer of ``stage`` (default: the current one) updates."""
        module = self.vq if (stage or self.stage) == 1 else self.lm
        return list(module.parameters())

    def train(self, mode: bool = True) -> "LMListener":
        super().train(mode)
        self.text_encoder.eval()  # a frozen feature extractor: no dropout
        if self.stage == 2:
            self.vq.eval()  # frozen in stage 2: codes are computed as at inference
        return self

    # ---------------------------------------------------------------------------------------
    # inputs
    # ---------------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(memory (B, L, d_model), key_valid (B, L) bool)``; an empty text (after ``strip``) has
        no valid key at all, so the cross-attentions contribute nothing (unconditional mode)."""
        texts = list(texts)
        device = self.mean_expression.device
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
        )
        ids = batch["input_ids"].to(device)
        valid = batch["attention_mask"].to(device).bool()
        with torch.no_grad():
            hidden = self.text_encoder(input_ids=ids, attention_mask=valid.long()).last_hidden_state
        memory = self.lm.text_proj(hidden.to(self.mean_expression.dtype))
        empty = torch.tensor([not t.strip() for t in texts], dtype=torch.bool, device=device)
        return memory, valid & ~empty[:, None]

    def _checked(self, frames: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        if frames.dim() != 3 or frames.shape[-1] != self.cfg.expr_dim:
            raise ValueError(f"frames must be (B, T, {self.cfg.expr_dim}), got {tuple(frames.shape)}")
        device = self.mean_expression.device
        frames = frames.to(device=device, dtype=self.mean_expression.dtype)
        lengths = torch.as_tensor(lengths, device=device).long().reshape(-1)
        if lengths.numel() != frames.shape[0]:
            raise ValueError(f"{lengths.numel()} lengths for {frames.shape[0]} sequences")
        if bool(((lengths < 1) | (lengths > frames.shape[1])).any()):
            raise ValueError(f"lengths must be in [1, {frames.shape[1]}], got {lengths.tolist()}")
        if -(-frames.shape[1] // self.cfg.downsample) > self.cfg.max_codes:
            raise ValueError(f"{frames.shape[1]} frames exceed max_frames={self.cfg.max_frames}")
        return frames, lengths

    def encode_codes(self, frames: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """The VQ codes of true sequences: ``(codes (B, W), n_codes (B,))``, n = ceil(L / s)."""
        frames, lengths = self._checked(frames, lengths)
        with torch.no_grad():
            codes, valid = self.vq.encode(frames, lengths, self.mean_expression)
        return codes, valid.sum(1)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """Codes (B, W) -> expression frames (B, W·s, 53) (mean face added back)."""
        return self.vq.decode(codes) + self.mean_expression

    @torch.no_grad()
    def reconstruct(self, frames: Tensor, lengths: Tensor) -> list[Tensor]:
        """The VQ-VAE's reconstruction of each sequence, cut to its length (for plots and tests)."""
        codes, _ = self.encode_codes(frames, lengths)
        out = self.decode_codes(codes)
        return [out[i, : int(n)] for i, n in enumerate(torch.as_tensor(lengths).tolist())]

    def code_logits(self, texts: list[str], codes: Tensor) -> Tensor:
        """Teacher-forced LM logits (B, W+1, K+1): row ``w`` scores code ``w`` (0-based) given the
        text and codes ``< w``; row ``n_codes`` scores EOS."""
        memory, key_valid = self.encode_text(texts)
        tokens = torch.cat([codes.new_full((codes.shape[0], 1), self.bos), codes], dim=1)
        return self.lm(tokens, self.lm.memory_kv(memory), key_valid)

    # ---------------------------------------------------------------------------------------
    # training objectives
    # ---------------------------------------------------------------------------------------

    def vq_losses(self, frames: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """Stage 1: ``{loss, recon_mse, commit, perplexity}`` (see :meth:`ExpressionVQVAE.losses`)."""
        frames, lengths = self._checked(frames, lengths)
        return self.vq.losses(frames, lengths, self.mean_expression)

    def lm_losses(self, texts: list[str], frames: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """Stage 2: ``loss`` = ``code_ce``, the cross-entropy of the codes and EOS averaged over all
        the batch's target tokens (so exp(code_ce) is the code perplexity); ``tokens`` is their
        count, ``code_acc`` the share of tokens predicted right by argmax. The codes come from the
        frozen VQ-VAE on the fly. In training mode each text is dropped to "" with probability
        ``text_dropout`` (trains the unconditional mode)."""
        texts = list(texts)
        codes, n_codes = self.encode_codes(frames, lengths)
        if self.training and self.cfg.text_dropout > 0:
            drop = (torch.rand(len(texts)) < self.cfg.text_dropout).tolist()
            texts = ["" if d else t for t, d in zip(texts, drop)]
        logits = self.code_logits(texts, codes)
        pos = torch.arange(codes.shape[1] + 1, device=codes.device)[None]
        targets = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
        targets = torch.where(pos < n_codes[:, None], targets, IGNORE)
        targets = torch.where(pos == n_codes[:, None], self.eos, targets)
        valid = targets != IGNORE
        n_tok = valid.sum().clamp(min=1)
        ce = (
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
            / n_tok
        )
        acc = ((logits.argmax(-1) == targets) & valid).sum() / n_tok
        return {"loss": ce, "code_ce": ce.detach(), "code_acc": acc.detach().float(), "tokens": n_tok.float()}

    def forward(self, texts: list[str], frames: Tensor, lengths: Tensor, stage: int | None = None) -> dict[str, Tensor]:
        """The objective of ``stage`` (default: the current one): :meth:`vq_losses` or :meth:`lm_losses`."""
        if (stage or self.stage) == 1:
            return self.vq_losses(frames, lengths)
        return self.lm_losses(texts, frames, lengths)

    # ---------------------------------------------------------------------------------------
    # Cppl (CTEG Appendix D) interface
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_forced_means(
        self, texts: list[str], frames: Tensor, lengths: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced predicted mean frames for the continuous perplexity (CTEG App. D, Eq. 16-18).

        Returns ``(means (B, T+1, 53), mask (B, T+1) bool)`` with the contract of
        :meth:`CTEG.teacher_forced_means`: ``means[:, p]`` predicts frame ``p+1`` (1-based) from the
        true history and the text, step ``lengths[b]`` predicts the zero-face terminator, ``mask``
        marks the ``L_b + 1`` valid steps (other rows are 0).

        The model predicts a window of ``s = downsample`` frames at a time, so the history is
        window-level: every frame of window ``w`` (frames ``w·s .. w·s+s−1``) is predicted from the
        true codes ``c_<w`` (which, the encoder being causal, only saw frames before the window).
        Its mean is the expectation of the decoded window over the LM's ``cppl_top_k`` most likely
        codes ``j`` at step ``w`` (EOS excluded, probabilities renormalised over the k):
        ``Σ_j q_j · Dec(c_<w, j)[window w] + mean face``. The decoder is causal, so window ``w``
        does not depend on later codes; it is computed from the crop of the last
        ``context_codes`` true codes + ``j``, which equals the full decode.

        Terminator step ``L``: ``(1 − p_end) · m_L + p_end · 0``, where ``p_end`` is the LM's EOS
        probability after the true codes ``c_1..c_n`` (n = ceil(L/s)) and ``m_L`` is the model's
        expected frame at index ``L``: the first frame of the next window when ``s`` divides ``L``,
        otherwise the frame past ``L`` in the last window's expectation (a code always decodes to
        ``s`` frames; the VQ-VAE has no shorter windows). ``generator`` is unused: the prediction
        is deterministic. Runs in eval mode and restores the previous mode.
        """
        was_training = self.training
        self.eval()
        try:
            frames, lengths = self._checked(frames, lengths)
            codes, n_codes = self.encode_codes(frames, lengths)
            logits = self.code_logits(texts, codes).float()  # (B, W+1, K+1)
            k = min(self.cfg.cppl_top_k, self.cfg.codebook_size)
            top, cand = logits[..., : self.eos].topk(k, dim=-1)
            q = top.softmax(-1)  # the k codes' probabilities renormalised (stable even if p(EOS) ≈ 1)
            probs = logits.softmax(-1)
            expected = self._expected_windows(codes, cand, q, lengths // self.cfg.downsample + 1)
            t = frames.shape[1]
            m = expected[:, : t + 1].to(frames.dtype) + self.mean_expression
            pos = torch.arange(t + 1, device=frames.device)[None]
            mask = pos <= lengths[:, None]
            p_end = probs[torch.arange(len(lengths), device=frames.device), n_codes, self.eos].to(m.dtype)
            scale = torch.where(pos == lengths[:, None], 1 - p_end[:, None], 1.0)
            means = torch.where(mask[..., None], m * scale[..., None], 0.0)
            return means, mask
        finally:
            self.train(was_training)

    def _expected_windows(self, codes: Tensor, cand: Tensor, q: Tensor, n_windows: Tensor) -> Tensor:
        """Centred expected frames (B, (W+1)·s, 53) of windows ``0..n_windows[b]−1``; zeros after.
        ``cand``/``q`` (B, W+1, k): candidate codes of each window and their weights."""
        b, n_pos, k = cand.shape
        s, e = self.cfg.downsample, self.cfg.expr_dim
        ctx_len = self.vq.decoder.context_codes
        out = torch.zeros(b, n_pos, s, e, device=codes.device, dtype=self.mean_expression.dtype)
        for w in range(int(n_windows.max())):
            rows = (n_windows > w).nonzero().squeeze(1)
            lo = max(0, w - ctx_len)
            ctx = codes[rows, lo:w][:, None].expand(-1, k, -1)  # true history, once per candidate
            crops = torch.cat([ctx, cand[rows, w][..., None]], dim=-1).reshape(len(rows) * k, w - lo + 1)
            win = self.vq.decode(crops)[:, -s:].reshape(len(rows), k, s, e)
            out[rows, w] = (q[rows, w][..., None, None].to(win.dtype) * win).sum(1)
        return out.reshape(b, n_pos * s, e)

    # ---------------------------------------------------------------------------------------
    # generation
    # ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        texts: list[str],
        max_frames: int | None = None,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> list[Tensor]:
        """Sample one expression sequence per text: (T_i, 53) tensors, 1 <= T_i <= max_frames.

        Codes are drawn one at a time with nucleus sampling (``cfg.top_p``; Ng et al. 2023 sample
        their LM the same way) until EOS or ``ceil(max_frames / s)`` codes; EOS is not allowed as
        the first token, so every sequence has at least one code (``s`` frames; cf. CTEG's decoder,
        which never stops at its first frame). The codes are then decoded by the VQ-VAE and cut to
        ``max_frames`` (default ``cfg.max_frames``, which is also the most allowed). The empty text
        generates unconditionally.

        One uniform number per text and step is drawn from ``generator`` (on its device, then
        moved), for the whole batch in a fixed order, so results are deterministic for a seed and a
        sequence does not depend on when the others stop. ``use_cache`` keeps the self-attention
        keys/values (one position per step); ``False`` recomputes the whole prefix each step and
        gives the same result. Runs in eval mode and restores the previous mode.
        """
        texts = list(texts)
        n_max = self.cfg.max_frames if max_frames is None else int(max_frames)
        if not 1 <= n_max <= self.cfg.max_frames:
            raise ValueError(f"max_frames must be in [1, {self.cfg.max_frames}], got {n_max}")
        if not texts:
            return []
        was_training = self.training
        self.eval()
        try:
            codes, n_codes = self._sample_codes(texts, -(-n_max // self.cfg.downsample), generator, use_cache)
            frames = self.decode_codes(codes)
        finally:
            self.train(was_training)
        s = self.cfg.downsample
        return [frames[i, : min(n * s, n_max)].clone() for i, n in enumerate(n_codes.tolist())]

    def _sample_codes(self, texts: list[str], n_steps: int, generator, use_cache: bool) -> tuple[Tensor, Tensor]:
        device = self.mean_expression.device
        b = len(texts)
        memory, key_valid = self.encode_text(texts)
        mem_kv = self.lm.memory_kv(memory)
        codes = torch.zeros(b, n_steps, dtype=torch.long, device=device)
        n_codes = torch.full((b,), n_steps, dtype=torch.long)
        rows = torch.arange(b, device=device)  # sequences still generating
        tokens = torch.full((b, 1), self.bos, dtype=torch.long, device=device)
        caches = [KVCache(n_steps) for _ in self.lm.layers] if use_cache else None
        for p in range(n_steps):
            u = _rand((b,), generator, device)
            if use_cache:
                logits = self.lm(tokens[:, -1:], mem_kv, key_valid, start=p, caches=caches)[:, -1]
            else:
                logits = self.lm(tokens, mem_kv, key_valid)[:, -1]
            if p == 0:
                logits[:, self.eos] = -math.inf
            nxt = nucleus_sample(logits, self.cfg.top_p, u[rows])
            stop = nxt == self.eos
            codes[rows[~stop], p] = nxt[~stop]
            if bool(stop.any()):
                n_codes[rows[stop].cpu()] = p
                keep = ~stop
                rows, nxt, tokens, key_valid = rows[keep], nxt[keep], tokens[keep], key_valid[keep]
                mem_kv = [(k[keep], v[keep]) for k, v in mem_kv]
                for cache in caches or []:
                    cache.select(keep)
                if rows.numel() == 0:
                    break
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        return codes, n_codes


# ------------------------------------------------------------------------------------------------
# serving
# ------------------------------------------------------------------------------------------------


def load_servable_lm_listener(weights: dict[str, Tensor], config: dict, device: str, where: str) -> LMListener:
    """Rebuild an :class:`LMListener` from a checkpoint's weights and resolved job ``config``.

    The frozen text encoder is rebuilt from ``model.text_encoder`` (checkpoints do not store it);
    every other weight must be present with its shape, and no unknown weight may be: anything else
    raises :class:`~facelab.core.checkpoint.CheckpointError` naming ``where``. Eval mode, on ``device``.
    """
    from facelab.core.checkpoint import CheckpointError, load_checked

    if "mean_expression" not in weights:
        raise CheckpointError(f"{where}: no 'mean_expression' buffer")
    try:
        model = build_lm_listener(config, weights["mean_expression"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: config does not describe an lm_listener model ({exc!r})") from None
    load_checked(model, weights, where)
    model.set_stage(2)
    return model.to(device).eval()


def load_servable(dirpath, device: str = "cpu", root=None) -> LMListener:
    """The family's loader (:class:`facelab.families.base.Family`): a checkpoint directory → model."""
    from pathlib import Path

    from facelab.core import checkpoint as ckpt

    return load_servable_lm_listener(
        ckpt.load_weights(dirpath), ckpt.load_config(dirpath), device, str(Path(dirpath) / ckpt.MODEL_FILE)
    )
