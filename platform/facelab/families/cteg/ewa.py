"""Expression-wise Attention (EwA, paper §3.3) and the frame embedding it feeds.

An expression vector E (53-d EMOCA/FLAME code) is split into E^f (the 50 expression
coefficients) and E^j (the 3 jaw-pose coefficients). Every coefficient becomes a token in a
latent space (a scalar-to-vector projection shared by all coefficients, as in the reference's
``fea_proj = Linear(1, d)``); the 3 jaw tokens attend as queries over the 50 expression tokens
(keys/values); the attended jaw tokens are reduced back to one scalar each, giving E^j' (|E^j|
values), and

    E' = Concat(E^f, E^j + E^j')                                   (§3.3)

is projected to d_model and summed with sinusoidal positional encodings.

Deviation from the reference code, on purpose: ``Decoder.forward`` in
``src/transformer/Models.py`` averages E^f and E^j over the *whole sequence* (padding and future
frames included) before the attention and adds the same jaw correction to every frame. That leaks
future frames into every step under teacher forcing and makes training differ from
autoregressive inference. EwA here is computed per frame, as §3.3 describes it, so it is causal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from facelab.core.layers import LN_EPS, Attention, sinusoidal_encoding


class ExpressionWiseAttention(nn.Module):
    """Per-frame EwA: (..., 53) -> E' (..., 53) (§3.3)."""

    def __init__(self, expr_dim: int = 53, jaw_dim: int = 3, ewa_dim: int = 64, n_heads: int = 4, dropout: float = 0.0):
        super().__init__()
        if not 0 < jaw_dim < expr_dim:
            raise ValueError(f"jaw_dim ({jaw_dim}) must be in (0, expr_dim={expr_dim})")
        self.n_face = expr_dim - jaw_dim
        self.to_latent = nn.Linear(1, ewa_dim)  # coefficient -> token, shared by E^f and E^j
        self.cross = Attention(ewa_dim, n_heads, dropout, fused=False)  # E^j queries, E^f keys/values
        self.to_coef = nn.Linear(ewa_dim, 1)  # "reduce back to |E^j|"

    def forward(self, e: Tensor) -> Tensor:
        face, jaw = e[..., : self.n_face], e[..., self.n_face :]
        face_tok = self.to_latent(face.unsqueeze(-1))  # (..., 50, ewa_dim)
        jaw_tok = self.to_latent(jaw.unsqueeze(-1))  # (..., 3, ewa_dim)
        lead = e.shape[:-1]
        face_tok, jaw_tok = face_tok.flatten(0, -3), jaw_tok.flatten(0, -3)  # frames as batch
        k, v = self.cross.keys_values(face_tok)
        jaw_delta = self.to_coef(self.cross(jaw_tok, k, v)).squeeze(-1)  # E^j'
        return torch.cat([face, jaw + jaw_delta.reshape(*lead, -1)], dim=-1)


class FrameEmbedding(nn.Module):
    """Expression frames -> decoder inputs: ``LN(W_e E' · √d + PE)``.

    ``E'`` is the EwA output (or the raw frame when ``ewa=False``: the plain linear projection +
    PE ablation of Table 6). The √d_model scaling and the LayerNorm after the positional encoding
    follow the reference (``-scale_emb`` in ``train.sh``; ``Decoder.layer_norm``).
    """

    def __init__(
        self,
        expr_dim: int,
        d_model: int,
        *,
        ewa: bool,
        jaw_dim: int = 3,
        ewa_dim: int = 64,
        ewa_heads: int = 4,
        dropout: float = 0.0,
        scale: bool = True,
        n_positions: int = 258,
    ):
        super().__init__()
        self.ewa = ExpressionWiseAttention(expr_dim, jaw_dim, ewa_dim, ewa_heads, dropout) if ewa else None
        self.proj = nn.Linear(expr_dim, d_model)  # "project to d_model"; the tied weight of share_projection
        self.scale = math.sqrt(d_model) if scale else 1.0
        self.norm = nn.LayerNorm(d_model, eps=LN_EPS)
        self.register_buffer("pe", sinusoidal_encoding(n_positions, d_model), persistent=False)

    def positions(self, start: int, n: int) -> Tensor:
        if start + n > self.pe.shape[0]:  # longer than planned: grow the table
            self.pe = sinusoidal_encoding(2 * (start + n), self.pe.shape[1], device=self.pe.device, dtype=self.pe.dtype)
        return self.pe[start : start + n]

    def forward(self, frames: Tensor, start: int | Tensor = 0) -> Tensor:
        """``frames`` (B, S, 53) at positions ``start .. start+S-1`` -> (B, S, d_model).

        ``start`` may be a (1,) long tensor on the device (static decoding, S = 1): the table must
        then already hold that position (:meth:`positions` grows it)."""
        e = self.ewa(frames) if self.ewa is not None else frames
        if isinstance(start, Tensor):
            pe = self.pe.index_select(0, start)
        else:
            pe = self.positions(start, frames.shape[1])
        h = self.proj(e) * self.scale + pe.to(frames.dtype)
        return self.norm(h)
