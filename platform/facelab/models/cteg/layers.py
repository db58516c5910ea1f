"""Transformer building blocks shared by the CTEG modules.

Sub-layers are post-LN residual blocks, as in the paper's Transformer backbone and the reference
code (``src/transformer/SubLayers.py``): ``LN(x + Dropout(sublayer(x)))``. Attention always goes
through :func:`torch.nn.functional.scaled_dot_product_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LN_EPS = 1e-6


def sinusoidal_encoding(n_positions: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """The fixed sine/cosine positional encodings of "Attention Is All You Need" (§3.3 adds them
    to the projected expressions): row p, column 2i is sin(p / 10000^(2i/dim)), column 2i+1 cos."""
    pos = torch.arange(n_positions, device=device, dtype=torch.float64)[:, None]
    pair = torch.arange(dim, device=device) // 2
    angle = pos / torch.pow(10000.0, (2 * pair).to(torch.float64) / dim)
    table = torch.where(torch.arange(dim, device=device) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(dtype)


class Attention(nn.Module):
    """Multi-head attention sub-layer ``LN(x + Dropout(W_o · Concat_h softmax(QK^T/√d_h) V))``.

    Keys/values are projected separately (:meth:`keys_values`) so callers can cache them: the
    text memory once per generation, the causal self-attention history step by step.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.attn_dropout = dropout
        # no biases, as the reference's MultiHeadAttention
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.w_o = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=LN_EPS)

    def _heads(self, x: Tensor) -> Tensor:  # (..., L, D) -> (..., H, L, D/H)
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(-3, -2)

    def keys_values(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-head keys and values of ``x`` (..., L, D), each (..., H, L, D/H)."""
        k, v = self.w_kv(x).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        key_valid: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """Attend from queries ``x`` (..., Lq, D) to ``k``/``v`` (..., H, Lk, D/H).

        ``key_valid`` (B, Lk) bool, True = a real key. A row with no valid key at all (an empty
        text) gets a zero attention output instead of NaN, i.e. the block passes ``x`` through.
        ``causal`` applies the autoregressive mask (query i sees keys <= i; needs Lq == Lk).
        """
        q = self._heads(self.w_q(x))
        mask = has_key = None
        if key_valid is not None:
            has_key = key_valid.any(dim=-1)  # (B,)
            mask = (key_valid | ~has_key[:, None])[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0, is_causal=causal
        )
        y = self.dropout(self.w_o(y.transpose(-3, -2).flatten(-2)))
        if has_key is not None:
            y = y * has_key[:, None, None].to(y.dtype)
        return self.norm(x + y)


class FeedForward(nn.Module):
    """Position-wise feed-forward sub-layer ``LN(x + Dropout(W_2 ReLU(W_1 x)))``."""

    def __init__(self, d_model: int, ff_dim: int, dropout: float = 0.0):
        super().__init__()
        self.w_1 = nn.Linear(d_model, ff_dim)
        self.w_2 = nn.Linear(ff_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.w_2(F.relu(self.w_1(x)))))


class KVCache:
    """Keys/values of one causal attention, preallocated for ``max_len`` positions."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.k: Tensor | None = None
        self.v: Tensor | None = None
        self.length = 0

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Add the new positions' ``k``/``v`` (B, H, n, d); return all cached ones so far."""
        n = k.shape[-2]
        if self.k is None:
            shape = (*k.shape[:-2], self.max_len, k.shape[-1])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        if self.length + n > self.max_len:
            raise RuntimeError(f"KV cache full ({self.max_len} positions)")
        self.k[..., self.length : self.length + n, :] = k
        self.v[..., self.length : self.length + n, :] = v
        self.length += n
        return self.k[..., : self.length, :], self.v[..., : self.length, :]

    def select(self, rows: Tensor) -> None:
        """Keep only batch ``rows`` (sequences that have not stopped)."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform init of every matrix in ``module`` (the reference's init; it must never be
    applied to the pretrained text encoder)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def scaled(x: Tensor, scale: bool) -> Tensor:
    return x * math.sqrt(x.shape[-1]) if scale else x
