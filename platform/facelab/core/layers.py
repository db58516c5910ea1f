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
from torch.nn.attention import SDPBackend, sdpa_kernel

LN_EPS = 1e-6

SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""Kernels SDPA may pick here. cuDNN's is left out: on an H200 (torch 2.11) its backward failed
(``mha_graph.execute ... is_good()``) on these shapes; flash / memory-efficient cover them."""


def sinusoidal_encoding(n_positions: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """The fixed sine/cosine positional encodings of "Attention Is All You Need" (§3.3 adds them
    to the projected expressions): row p, column 2i is sin(p / 10000^(2i/dim)), column 2i+1 cos."""
    pos = torch.arange(n_positions, device=device, dtype=torch.float64)[:, None]
    pair = torch.arange(dim, device=device) // 2
    angle = pos / torch.pow(10000.0, (2 * pair).to(torch.float64) / dim)
    table = torch.where(torch.arange(dim, device=device) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(dtype)


class KeyMask:
    """A key-padding mask prepared once for many attention calls (e.g. every decoding step).

    ``key_valid`` (B, Lk) bool, True = a real key. ``mask`` (B, 1, 1, Lk) is what SDPA gets: a row
    with no valid key at all (an empty text) attends to every key instead, and ``has_key`` (B,)
    zeroes that row's output afterwards (see :meth:`Attention.forward`).
    """

    def __init__(self, key_valid: Tensor):
        self.has_key = key_valid.any(dim=-1)  # (B,)
        self.mask = (key_valid | ~self.has_key[:, None])[:, None, None, :]


class Attention(nn.Module):
    """Multi-head attention sub-layer ``LN(x + Dropout(W_o · Concat_h softmax(QK^T/√d_h) V))``.

    Keys/values are projected separately (:meth:`keys_values`) so callers can cache them: the
    text memory once per generation, the causal self-attention history step by step.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *, fused: bool = True):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        # fused=False: plain matmul/softmax (SDPA's math), for many tiny attentions (EwA runs one per
        # frame: batch x heads can pass the 65,535 grid limit of the fused CUDA kernels)
        self.fused = fused
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
        key_valid: Tensor | KeyMask | None = None,
        causal: bool = False,
        attn_mask: Tensor | None = None,
        one_query: bool = False,
    ) -> Tensor:
        """Attend from queries ``x`` (..., Lq, D) to ``k``/``v`` (..., H, Lk, D/H).

        ``key_valid`` (B, Lk) bool, True = a real key (or a :class:`KeyMask` prepared from it). A
        row with no valid key at all (an empty text) gets a zero attention output instead of NaN,
        i.e. the block passes ``x`` through. ``causal`` applies the autoregressive mask (query i
        sees keys <= i; needs Lq == Lk). ``attn_mask`` (bool, broadcastable to (B, H, Lq, Lk)) is
        passed to SDPA as is (the filled slots of a preallocated decoding cache). ``one_query``
        (inference, Lq = 1, a mask of shape (B|1, 1, 1, Lk)): the same softmax(q·Kᵀ/√d_h)·V written as
        elementwise products and sums instead of SDPA, which TorchInductor fuses into a few kernels
        (compiled CUDA decoding: ``decoding._GraphDecoder``); equal up to float rounding.
        """
        q = self._heads(self.w_q(x))
        mask = attn_mask
        has_key = None
        if key_valid is not None:
            km = key_valid if isinstance(key_valid, KeyMask) else KeyMask(key_valid)
            mask, has_key = km.mask, km.has_key
        p_drop = self.attn_dropout if self.training else 0.0
        if one_query:
            if causal or x.shape[-2] != 1 or p_drop > 0:
                raise ValueError("one_query attention takes one query, no causal flag and no dropout")
            scores = (q * self.head_dim**-0.5 * k).sum(-1)  # (B, H, Lk)
            if mask is not None:
                scores = scores.masked_fill(~mask[..., 0, :], float("-inf"))
            y = (torch.softmax(scores, dim=-1).unsqueeze(-1) * v).sum(-2).unsqueeze(-2)  # (B, H, 1, d_h)
        elif self.fused:
            with sdpa_kernel(SDPA_BACKENDS):
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop, is_causal=causal)
        else:
            if causal or mask is not None:
                raise ValueError("the unfused attention takes neither masks nor causal")
            w = torch.softmax((q * self.head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
            y = F.dropout(w, p_drop, training=p_drop > 0) @ v
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


class StaticKVCache:
    """Keys/values of one causal attention in fixed-shape buffers (B, H, max_len, d), written at
    the device-side step counter ``position`` (a (1,) long tensor): every decoding step runs the
    same kernels on the same addresses, so a step can be captured once as a CUDA graph and
    replayed. Attention reads all ``max_len`` slots; the slots not yet written are masked out
    (:meth:`filled`) and hold zeros, so they contribute exactly nothing."""

    def __init__(self, batch: int, n_heads: int, max_len: int, head_dim: int, position: Tensor, *, dtype, device):
        self.k = torch.zeros(batch, n_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.position = position
        self.slots = torch.arange(max_len, device=device)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the step's ``k``/``v`` (B, H, 1, d) at ``position``; return the whole buffers."""
        self.k.index_copy_(2, self.position, k)
        self.v.index_copy_(2, self.position, v)
        return self.k, self.v

    def filled(self) -> Tensor:
        """(1, 1, 1, max_len) bool: the slots written so far (this step's included)."""
        return (self.slots <= self.position)[None, None, None, :]


def xavier_init_(module: nn.Module) -> None:
    """Xavier-uniform init of every matrix in ``module`` (the reference's init; it must never be
    applied to the pretrained text encoder)."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def scaled(x: Tensor, scale: bool) -> Tensor:
    return x * math.sqrt(x.shape[-1]) if scale else x
