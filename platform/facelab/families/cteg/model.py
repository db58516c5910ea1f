"""CTEG — the Continuous Text-to-Expression Generator of "When Words Smile: Generating Diverse
Emotional Facial Expressions from Text" (Xu et al., EMNLP 2025), §3.

Map of the paper onto this package:

  §3    text encoder (pretrained, frozen by default)  -> ``CTEG.text_encoder`` / ``encode_text``
  §3.3  Expression-wise Attention (EwA) + PE           -> ``ewa.ExpressionWiseAttention``, ``ewa.FrameEmbedding``
  §3.4  CVAD, Eq. 1-7, LTA f_ζ, stacking N_c          -> ``cvad.CVADLayer``, ``cvad.LatentTemporalAttention``
  §3.5  target-guided loss L_g, Eq. 8                  -> ``CVADLayer.guide_ffn`` (FFN_i) + ``CTEG.guide_head`` (f_γ)
  Eq. 6, 9  L_total = Σ_t MSE + Σ_t KL + L_g           -> ``CTEG.step_losses`` / ``CTEG.forward``
  Eq. 10  Noam learning-rate schedule                  -> ``noam_lambda``
  §3.6  mean-face start, zero-face terminator          -> ``CTEG._teacher_inputs``; ``decoding.generate``

Reference code consulted for ambiguities: WalkerMitty/EmoAva ``src/`` (``transformer/Models.py``,
``Layers.py``, ``SubLayers.py``, ``Translator.py``, ``train.py``, ``train.sh``). Where this module
departs from it, the comment at that spot says how and why.

Loss normalisation (``forward``): per step, MSE is the mean over the 53 coordinates and KL is the
KL divergence of the diagonal Gaussians summed over the latent coordinates (``kl_reduction="sum"``,
the exact KL of Eq. 6; ``"mean"`` divides by latent_dim, which is how the reference weighs it)
and summed over the N_c layers; L_g's per-step term is an MSE like the first. Each term is summed
over the valid steps of a sequence (its T frames plus the terminator: T+1 steps), then averaged
over the sequences of the batch. Padding steps contribute nothing anywhere.

DDP: every parameter that requires grad is used by ``forward`` in every configuration (the
encoder's unused pooler is frozen; modules of switched-off components are not built), so
``find_unused_parameters=False`` works. A frozen encoder has ``requires_grad=False`` and stays in
eval mode; its weights are named ``text_encoder.*`` so checkpoint code can drop them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.core.layers import KeyMask, xavier_init_
from facelab.core.text_encoder import load_text_encoder
from facelab.families.cteg.job import CTEGConfig

from .cvad import LTA_MODES, CVADLayer  # noqa: F401 - LTA_MODES re-exported
from .ewa import FrameEmbedding


class TextStateCache:
    """The frozen text encoder's states per distinct text, kept on the device.

    A frozen encoder (``finetune_encoder=False``, always in eval mode) is a fixed function of the
    text, so its states can be computed once per text and reused in every later epoch: the cache
    turns the encoder pass (and the tokenizer call) of a training step into one gather. The
    training loop enables it (``model.text_cache = TextStateCache()``) after the weights are
    loaded; whoever changes the encoder's weights afterwards must drop it. Memory: one row of
    ``hidden_size`` floats per text token (12,000 EmoAva texts × ~15 tokens × 768: ~0.5 GB).
    """

    def __init__(self) -> None:
        self.index: dict[str, tuple[int, int]] = {}  # text -> (first row, number of tokens)
        self.buf: Tensor | None = None  # (capacity, hidden); row 0 stays zero (padding)
        self.rows = 1

    def __len__(self) -> int:
        return len(self.index)

    def add(self, texts: list[str], hidden: Tensor, lengths: list[int]) -> None:
        """Store ``hidden[i, :lengths[i]]`` (hidden (M, L, H)) for each of ``texts``."""
        flat = torch.tensor(
            [i * hidden.shape[1] + j for i, n in enumerate(lengths) for j in range(n)], dtype=torch.long
        )
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat.to(hidden.device, non_blocking=True))
        need = self.rows + rows.shape[0]
        if self.buf is None or need > self.buf.shape[0]:
            grown = hidden.new_zeros(
                max(need, 2 * (self.buf.shape[0] if self.buf is not None else 4096)), hidden.shape[-1]
            )
            if self.buf is not None:
                grown[: self.rows] = self.buf[: self.rows]
            self.buf = grown
        self.buf[self.rows : need] = rows
        for t, n in zip(texts, lengths):
            self.index[t] = (self.rows, n)
            self.rows += n

    def gather(self, texts: list[str], device) -> tuple[Tensor, Tensor]:
        """(hidden (B, L, H) zero-padded, valid (B, L) bool) for cached ``texts``."""
        spans = [self.index[t] for t in texts]
        width = max(n for _, n in spans)
        idx = torch.zeros(len(texts), width, dtype=torch.long)
        valid = torch.zeros(len(texts), width, dtype=torch.bool)
        for i, (start, n) in enumerate(spans):
            idx[i, :n] = torch.arange(start, start + n)
            valid[i, :n] = True
        if self.buf.is_cuda:
            idx, valid = idx.pin_memory(), valid.pin_memory()
        idx, valid = idx.to(device, non_blocking=True), valid.to(device, non_blocking=True)
        return self.buf.index_select(0, idx.flatten()).view(len(texts), width, -1), valid


class CTEG(nn.Module):
    """Text -> sequence of 53-d expression vectors (§3). See the module docstring."""

    def __init__(self, cfg: CTEGConfig, mean_expression: Tensor):
        super().__init__()
        self.cfg = cfg
        mean = torch.as_tensor(mean_expression, dtype=torch.float32).reshape(-1)
        if mean.numel() != cfg.expr_dim:
            raise ValueError(f"mean_expression has {mean.numel()} values, expected {cfg.expr_dim}")
        # §3.6: the training-set average expression starts every sequence. A buffer, so it is
        # saved with the weights and follows .to(device).
        self.register_buffer("mean_expression", mean.clone())

        d = cfg.d_model
        self.embed = FrameEmbedding(
            cfg.expr_dim,
            d,
            ewa=cfg.ewa,
            jaw_dim=cfg.jaw_dim,
            ewa_dim=cfg.ewa_dim,
            ewa_heads=cfg.ewa_heads,
            dropout=cfg.dropout,
            scale=cfg.scale_embedding,
            n_positions=cfg.max_frames + 2,
        )
        self.layers = nn.ModuleList(
            CVADLayer(
                d,
                cfg.n_heads,
                cfg.ff_dim,
                cfg.latent_dim,
                cfg.dropout,
                cfg.lta,
                cfg.target_guided,
                cfg.output_sigma,
                cfg.kl_reduction,
            )
            for _ in range(cfg.cvad_layers)
        )
        # Output projection d_model -> 53 (no bias, as the reference's trg_exp_prj). With
        # share_projection it is the transposed input projection (see project_out).
        self.out_proj = None if cfg.share_projection else nn.Linear(d, cfg.expr_dim, bias=False)
        # f_γ of Eq. 8 (the reference's trg_word_prj_one_step, also bias-free).
        self.guide_head = nn.Linear(d, cfg.expr_dim, bias=False) if cfg.target_guided else None

        encoder, tokenizer = load_text_encoder(cfg.text_encoder)
        enc_dim = getattr(encoder.config, "hidden_size", None) or getattr(encoder.config, "d_model")
        # Paper: BERT-base (768) = d_model, no projection. MiniLM is 384 wide -> a linear map.
        self.text_proj = nn.Identity() if enc_dim == d else nn.Linear(enc_dim, d)

        # Xavier init of the decoder only. (The reference re-initialises the pretrained BERT too:
        # its skip test looks for 'encoder_pretrained' in names that are 'encoder.*'.)
        for module in (self.embed, self.layers, self.out_proj, self.guide_head, self.text_proj):
            if module is not None:
                xavier_init_(module)

        self.text_encoder = encoder
        self.tokenizer = tokenizer
        self.text_cache: TextStateCache | None = None  # see TextStateCache; frozen encoders only
        pooler = getattr(encoder, "pooler", None)
        for name, p in encoder.named_parameters():
            # the pooler is never used (we read last_hidden_state); freezing it keeps DDP happy
            p.requires_grad_(cfg.finetune_encoder and not (pooler is not None and name.startswith("pooler.")))
        if not cfg.finetune_encoder:
            self.text_encoder.eval()

    def train(self, mode: bool = True) -> "CTEG":
        super().train(mode)
        if not self.cfg.finetune_encoder:
            self.text_encoder.eval()  # a frozen encoder is a fixed feature extractor: no dropout
        return self

    # ---------------------------------------------------------------------------------------
    # text
    # ---------------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Encode ``texts`` -> ``(memory, key_padding_mask)``.

        memory (B, L, d_model): encoder states after ``text_proj``. key_padding_mask (B, L) bool
        with PyTorch's convention, True = ignore (padding). An empty text (after ``strip``) gets
        an all-True row: the decoder's cross-attentions then contribute nothing, which is
        unconditional generation (the reference's ``-uncondition`` masks the whole source too).
        """
        texts = list(texts)
        device = self.mean_expression.device
        if self.text_cache is not None and not self.cfg.finetune_encoder:
            return self._encode_cached(texts, device)
        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
        )
        empty = torch.tensor([not t.strip() for t in texts], dtype=torch.bool)
        ids, mask, empty = batch["input_ids"], batch["attention_mask"], empty
        if device.type == "cuda":  # a copy from pageable memory would wait for the GPU to drain
            ids, mask, empty = ids.pin_memory(), mask.pin_memory(), empty.pin_memory()
        ids, mask, empty = (t.to(device, non_blocking=True) for t in (ids, mask, empty))
        valid = mask.bool()
        with torch.set_grad_enabled(self.cfg.finetune_encoder and torch.is_grad_enabled()):
            hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        memory = self.text_proj(hidden.to(self.mean_expression.dtype))
        return memory, ~(valid & ~empty[:, None])

    def _encode_cached(self, texts: list[str], device) -> tuple[Tensor, Tensor]:
        cache = self.text_cache
        missing = list(dict.fromkeys(t for t in texts if t not in cache.index))
        if missing:
            batch = self.tokenizer(
                missing, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
            )
            with torch.no_grad():
                hidden = self.text_encoder(
                    input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
                ).last_hidden_state
            cache.add(missing, hidden, batch["attention_mask"].sum(dim=1).tolist())
        hidden, valid = cache.gather(texts, device)
        empty = torch.tensor([not t.strip() for t in texts], dtype=torch.bool)
        empty = (empty.pin_memory() if device.type == "cuda" else empty).to(device, non_blocking=True)
        memory = self.text_proj(hidden.to(self.mean_expression.dtype))
        return memory, ~(valid & ~empty[:, None])

    # ---------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------

    def _teacher_inputs(self, frames: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """§3.6: x = [mean, ψ_1..ψ_T, 0, pad...] (B, T+2, 53); step p predicts x[p+1] and is
        valid for p <= length (T frames + the terminator)."""
        if frames.dim() != 3 or frames.shape[-1] != self.cfg.expr_dim:
            raise ValueError(f"frames must be (B, T, {self.cfg.expr_dim}), got {tuple(frames.shape)}")
        b, t, e = frames.shape
        device = self.mean_expression.device
        frames = frames.to(device=device, dtype=self.mean_expression.dtype)
        lengths = torch.as_tensor(lengths).long().reshape(-1)
        if lengths.numel() != b:
            raise ValueError(f"{lengths.numel()} lengths for {b} sequences")
        # checked where the lengths are (the training loop passes them on the CPU: no device sync)
        if bool(((lengths < 0) | (lengths > t)).any()):
            raise ValueError(f"lengths must be in [0, {t}], got {lengths.tolist()}")
        lengths = lengths.to(device, non_blocking=True)
        pos = torch.arange(t + 1, device=device)
        real = (pos[None, 1:] <= lengths[:, None]).unsqueeze(-1)  # frame i (1-based) exists
        x = torch.cat(
            [
                self.mean_expression.expand(b, 1, e),  # start: the training-set mean face
                torch.where(real, frames, 0.0),  # ψ_1..ψ_T; the zero after ψ_L is the terminator
                frames.new_zeros(b, 1, e),
            ],
            dim=1,
        )
        return x, pos[None, :] <= lengths[:, None]

    def project_out(self, h: Tensor) -> Tensor:
        """d_model -> expression vector. share_projection: W_out = W_in^T of the input projection
        (the reference's ``trg_emb_prj_weight_sharing``; it clones the transposed weight into a new
        Parameter, which only initialises it — here the two stay tied)."""
        if self.out_proj is None:
            return F.linear(h, self.embed.proj.weight.t())
        return self.out_proj(h)

    def step_losses(self, texts: list[str], frames: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """Teacher-forced per-step terms, each (B, T+1) and zero on padding steps: ``mse``,
        ``kl`` (summed over the N_c layers), ``lg``; plus ``mask`` (valid steps) and ``pred``
        (B, T+1, 53), the sampled outputs (step T+1's target is the zero-face terminator)."""
        memory, pad = self.encode_text(texts)
        key_valid = KeyMask(~pad)
        x, step_valid = self._teacher_inputs(frames, lengths)
        h = self.embed(x)
        kl = guide = None
        for layer in self.layers:
            h, kl_m, guide_m = layer.forward_train(h, layer.memory_kv(memory), key_valid, step_valid)
            kl = kl_m if kl is None else kl + kl_m
            if guide_m is not None:  # Σ_i FFN_i(z̃^i)  (Eq. 8)
                guide = guide_m if guide is None else guide + guide_m
        target = x[:, 1:]
        pred = self.project_out(h[:, :-1])
        mse = torch.where(step_valid, (pred - target).pow(2).mean(-1), 0.0)  # Eq. 6, first term
        if guide is not None:
            lg = torch.where(step_valid, (self.guide_head(guide) - target).pow(2).mean(-1), 0.0)  # Eq. 8
        else:
            lg = torch.zeros_like(mse)
        return {"mse": mse, "kl": kl, "lg": lg, "mask": step_valid, "pred": pred}

    def forward(self, texts: list[str], frames: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """Teacher-forced training loss (Eq. 9): ``loss = mse + kl + lg``.

        ``frames`` (B, T, 53) zero-padded raw sequences (no mean face, no terminator: the model
        adds both), ``lengths`` (B,). Each term is summed over a sequence's valid steps, then
        averaged over the batch (see the module docstring).
        """
        terms = self.step_losses(texts, frames, lengths)
        out = {k: terms[k].sum(dim=1).mean() for k in ("mse", "kl", "lg")}
        out["loss"] = out["mse"] + out["kl"] + out["lg"]
        return out

    @torch.no_grad()
    def teacher_forced_means(
        self,
        texts: list[str],
        frames: Tensor,
        lengths: Tensor,
        generator: torch.Generator | None = None,
        latent: str = "sample",
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced predicted mean frames for the continuous perplexity (Appendix D, Eq. 16-18).

        Returns ``(means, mask)``: ``means`` (B, T+1, 53), ``means[:, p]`` is the model's predicted
        mean of frame ψ_{p+1} given the true history ψ_0..ψ_p (ψ_0 = the mean face) and the text;
        step ``lengths[b]`` (the (T_b+1)-th) predicts the zero-face terminator. ``mask`` (B, T+1)
        bool is True on the T_b + 1 valid steps; padding steps are False and their means are 0.
        Inputs as for :meth:`forward`.

        What the prediction is. Every CVAD layer draws its latent z_p from the *prior* P_θ (as at
        inference, never the posterior, which sees the target) — ``latent="sample"``: z = μ_p + σ_p ε
        with ε from ``generator``; ``latent="mean"``: z = μ_p. The output is the generation
        network's mean μ_g projected to a frame, *without* the output noise σ_out·ε (with N_c > 1
        the next layer also gets the noiseless μ_g). Runs in eval mode (no dropout) and restores
        the previous mode.

        The reference evaluator (WalkerMitty/EmoAva ``src/evaluate.py`` on the output of
        ``translate.py -infer_mode p``) scores the model's teacher-forced ``'infer'``-mode pass:
        latents sampled from the prior as here, but its released setting (``-second_sample one``)
        also adds the output noise (log-variance 1) before the projection, i.e. it scores a sampled
        frame; here the mean is used, so the Gaussian of Eq. 16 is centred on μ rather than on a
        noisy draw around it.
        """
        if latent not in ("sample", "mean"):
            raise ValueError(f"latent must be 'sample' or 'mean', got {latent!r}")
        from .decoding import _randn

        was_training = self.training
        self.eval()
        try:
            memory, pad = self.encode_text(texts)
            key_valid = KeyMask(~pad)
            x, step_valid = self._teacher_inputs(frames, lengths)
            b, s, _ = x.shape
            device, dtype = x.device, x.dtype
            h = self.embed(x)
            for layer in self.layers:
                if latent == "sample":
                    eps_z = _randn((b, s, layer.latent_dim), generator, device, dtype)
                else:
                    eps_z = torch.zeros(b, s, layer.latent_dim, device=device, dtype=dtype)
                eps_out = torch.zeros(b, s, self.cfg.d_model, device=device, dtype=dtype)  # μ_g, no output noise
                h = layer.forward_infer(h, layer.memory_kv(memory), key_valid, eps_z, eps_out)
            means = self.project_out(h[:, :-1])
            means = torch.where(step_valid.unsqueeze(-1), means, 0.0)
            return means, step_valid
        finally:
            self.train(was_training)

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
        """Sample one expression sequence per text (§3.6); see :func:`decoding.generate`."""
        from .decoding import generate

        return generate(self, texts, max_frames=max_frames, generator=generator, use_cache=use_cache)

    @torch.no_grad()
    def generate_groups(self, requests: list[tuple[list[str], int, torch.Generator | None]]) -> list[list[Tensor]]:
        """Several requests ``(texts, max_frames, generator)`` decoded as one batch, each answer as it
        would be alone (the server's request batching); see :func:`decoding.generate_groups`."""
        from .decoding import generate_groups

        return generate_groups(self, requests)


@dataclass(frozen=True)
class NoamSchedule:
    """Eq. 10: lr factor d_model^-0.5 · min(n^-0.5, n · warmup^-1.5), n = step + 1."""

    d_model: int
    warmup: int

    def __call__(self, step: int) -> float:
        n = step + 1  # LambdaLR calls with 0 for the first optimizer step; the paper counts from 1
        return self.d_model**-0.5 * min(n**-0.5, n * self.warmup**-1.5)


def noam_lambda(d_model: int, warmup: int) -> NoamSchedule:
    """``lr_lambda`` for ``torch.optim.lr_scheduler.LambdaLR`` implementing Eq. 10.

    Give the optimizer ``lr = lr_mul`` (the reference uses lr_mul 2.0 with Adam(β=(0.9, 0.98),
    ε=1e-9), warmup 4000) and call ``scheduler.step()`` after every ``optimizer.step()``.
    A picklable callable object, so LambdaLR's state dict carries it.
    """
    if d_model < 1 or warmup < 1:
        raise ValueError("d_model and warmup must be >= 1")
    return NoamSchedule(d_model, warmup)
