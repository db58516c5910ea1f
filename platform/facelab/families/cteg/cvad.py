"""Conditional Variational Autoregressive Decoder layer (CVAD, paper §3.4, Eq. 1-7) with Latent
Temporal Attention (LTA) and the per-layer part of the target-guided loss (§3.5, Eq. 8).

Positions. The decoder input is ψ_0..ψ_{S-1} = [mean face, ψ_1..ψ_T, zero face] (§3.6). Position
p predicts ψ_{p+1}; "step p" below is that prediction. One layer, given its input h (B, S, D):

  s_p   = SelfAttn_causal(h)_p                       history of ψ_{<=p}          ("ψ<t")
  a_p   = CrossAttn(s_p, x)                          A(ψ, x), x = text memory
  o_p   = LTA(a)_p = f_ζ(a_{<=p})                    A_mask[A(ψ, x)]: masked MHA over the
                                                     history (variants: attention | pooling
                                                     = running mean | none = identity)
  P_θ(z_p | ψ_{<=p}, x)   = N(μ_p, σ_p²) = heads on o_p        prior
  Q_φ(z_p | ψ_{<=p+1}, x) = N(μ_q, σ_q²) = heads on o_{p+1}    recognition
  z_p   = μ + σ ⊙ ε  (reparameterised; from Q in training, from P at inference)
  μ_g,p = FFN(CrossAttn(s_p + z_p, x))               generation network: the concatenated
                                                     cross-attention heads, then an FFN
  out_p = μ_g,p + σ_out · ε                          output sampled from N(μ_g, σ_out²), σ_out = 1

(Eq. 1-7 of the paper; the training objective of this layer is Eq. 6: Σ_t MSE + Σ_t KL(Q||P).)

The recognition distribution of step p reads position p+1, the first position whose input is the
target ψ_{p+1}; this is exactly how the reference pairs them (``upper_mu[:, 1:]`` with
``down_mu[:, :-1]`` in ``Layers.py``). The last position has no recognition distribution; it
gets z = 0 (the reference leaves it without z as well). With stacked layers (N_c > 1) the next
layer's input is ``out`` (§3.4: layer m's input is sampled from N(μ_g^{m-1}, σ)). A consequence
of that stacking, shared with the reference: in training, layer m >= 2's recognition network for
step p reads layer m-1's output at p+1, which carries layer m-1's posterior sample for step p+1,
i.e. it sees up to m-1 frames past its own target. Inference (prior only) stays strictly causal;
with N_c = 1 (the paper's setting) training is too.

Target-guided loss, per layer i (§3.5): see below. Eq. 8 sums FFN_i(z^i) over the layers; the
reference instead chains them (FFN_i(z^i + previous sum)); both are the same for N_c = 1.

Target-guided loss, per layer i (§3.5): a separate reparameterised sample z̃^i from the *prior*
goes through FFN_i; the model sums FFN_i(z̃^i) over the layers and f_γ maps the sum to a frame,
which is regressed on ψ_{p+1} (Eq. 8). The reference also uses the prior sample
(``pri_z = sampling(down_mu, down_sigma)``), so the loss pushes the prior — the distribution used
at inference — to carry information about the next frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from facelab.core.layers import Attention, FeedForward, KVCache, StaticKVCache

LTA_MODES = ("attention", "pooling", "none")


def gaussian_kl(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Elementwise KL(N(μ_q, σ_q²) || N(μ_p, σ_p²)) of diagonal Gaussians (Eq. 6's KL term)."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q - logvar_p).exp() + (mu_q - mu_p).pow(2) * (-logvar_p).exp() - 1.0)


def reparameterise(mu: Tensor, logvar: Tensor, eps: Tensor) -> Tensor:
    """z = μ + σ ⊙ ε (the reparameterisation trick)."""
    return mu + (0.5 * logvar).exp() * eps


@dataclass
class LayerState:
    """What autoregressive decoding keeps for one CVAD layer between steps."""

    self_kv: KVCache | StaticKVCache
    lta_kv: KVCache | StaticKVCache | None = None
    lta_sum: Tensor | None = None  # running sum of a_{<=p} for LTA "pooling"
    steps: int = 0
    position: Tensor | None = None
    """Static (CUDA-graph) decoding only: the device-side step counter p, a (1,) long tensor that
    the caller advances after each step; the caches are :class:`StaticKVCache` and ``lta_sum`` a
    preallocated buffer, so a step reads and writes fixed addresses."""
    slot_mask: Tensor | None = None  # static: the filled cache slots of the current step
    one_query: bool = False
    """Static only: attention as elementwise products and sums (``Attention.forward``'s ``one_query``),
    for a step compiled with TorchInductor."""

    @property
    def static(self) -> bool:
        return self.position is not None

    def select(self, rows: Tensor) -> None:
        self.self_kv.select(rows)
        if self.lta_kv is not None:
            self.lta_kv.select(rows)
        if self.lta_sum is not None:
            self.lta_sum = self.lta_sum[rows]


class LatentTemporalAttention(nn.Module):
    """f_ζ (§3.4): aggregates a_{<=p} causally before the latent heads."""

    def __init__(self, mode: str, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if mode not in LTA_MODES:
            raise ValueError(f"lta must be one of {LTA_MODES}, got {mode!r}")
        self.mode = mode
        self.attn = Attention(d_model, n_heads, dropout) if mode == "attention" else None

    def forward(self, a: Tensor, state: LayerState | None = None) -> Tensor:
        if self.mode == "none":
            return a
        if self.mode == "attention":
            k, v = self.attn.keys_values(a)
            if state is None:
                return self.attn(a, k, v, causal=True)
            k, v = state.lta_kv.append(k, v)
            return self.attn(a, k, v, attn_mask=state.slot_mask, one_query=state.one_query)
        # pooling: running mean over the history
        if state is None:
            count = torch.arange(1, a.shape[1] + 1, device=a.device, dtype=a.dtype)[:, None]
            return a.cumsum(dim=1) / count
        if state.static:  # lta_sum starts at zero; 0 + a_0 == a_0 exactly, so this equals the branch below
            state.lta_sum.add_(a[:, 0])
            return (state.lta_sum / (state.position + 1).to(a.dtype)).unsqueeze(1)
        state.lta_sum = a[:, 0] if state.lta_sum is None else state.lta_sum + a[:, 0]
        return (state.lta_sum / (state.steps + 1)).unsqueeze(1)


class CVADLayer(nn.Module):
    """One CVAD layer (§3.4). See the module docstring for the equations."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        ff_dim: int,
        latent_dim: int,
        dropout: float,
        lta: str,
        target_guided: bool,
        output_sigma: float,
        kl_reduction: str = "sum",
    ):
        super().__init__()
        if kl_reduction not in ("sum", "mean"):
            raise ValueError(f"kl_reduction must be 'sum' or 'mean', got {kl_reduction!r}")
        self.latent_dim = latent_dim
        self.output_sigma = output_sigma
        self.kl_reduction = kl_reduction
        self.self_attn = Attention(d_model, n_heads, dropout)  # history of ψ
        self.text_attn = Attention(d_model, n_heads, dropout)  # A(ψ, x)
        self.lta = LatentTemporalAttention(lta, d_model, n_heads, dropout)  # f_ζ / A_mask
        self.recognition = nn.Linear(d_model, 2 * latent_dim)  # Q_φ: μ_q, log σ_q²
        self.prior = nn.Linear(d_model, 2 * latent_dim)  # P_θ: μ_p, log σ_p²
        # z is added to the d_model stream; the reference has latent = d_model and adds it as is
        self.z_proj = nn.Identity() if latent_dim == d_model else nn.Linear(latent_dim, d_model)
        self.gen_attn = Attention(d_model, n_heads, dropout)  # cross-attention heads of the generation network
        self.gen_ffn = FeedForward(d_model, ff_dim, dropout)  # μ_g = FFN(...)
        self.guide_ffn = FeedForward(d_model, ff_dim, dropout) if target_guided else None  # FFN_i, Eq. 8

    # -- pieces ---------------------------------------------------------------------------------

    def memory_kv(self, memory: Tensor) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        """Keys/values of the text memory for both cross-attentions (computed once per text)."""
        return self.text_attn.keys_values(memory), self.gen_attn.keys_values(memory)

    def new_state(self, max_len: int) -> LayerState:
        return LayerState(self_kv=KVCache(max_len), lta_kv=KVCache(max_len) if self.lta.mode == "attention" else None)

    def new_static_state(self, batch: int, max_len: int, position: Tensor, *, dtype, device) -> LayerState:
        """Fixed-shape decoding state for CUDA-graph capture (see :class:`LayerState`)."""
        attn = self.self_attn

        def cache() -> StaticKVCache:
            return StaticKVCache(batch, attn.n_heads, max_len, attn.head_dim, position, dtype=dtype, device=device)

        d = attn.n_heads * attn.head_dim
        return LayerState(
            self_kv=cache(),
            lta_kv=cache() if self.lta.mode == "attention" else None,
            lta_sum=torch.zeros(batch, d, dtype=dtype, device=device) if self.lta.mode == "pooling" else None,
            position=position,
        )

    def _context(self, h: Tensor, mem_kv, key_valid: Tensor, state: LayerState | None) -> tuple[Tensor, Tensor]:
        """s (history) and o (LTA output) for the positions in ``h``; with ``state``, ``h`` is
        the next single position and the causal history comes from the cache."""
        k, v = self.self_attn.keys_values(h)
        if state is None:
            s = self.self_attn(h, k, v, causal=True)
        else:
            if h.shape[1] != 1:
                raise ValueError("cached decoding takes one position at a time")
            if state.static:
                state.slot_mask = state.self_kv.filled()
            s = self.self_attn(h, *state.self_kv.append(k, v), attn_mask=state.slot_mask, one_query=state.one_query)
        one = state is not None and state.one_query
        a = self.text_attn(s, *mem_kv[0], key_valid=key_valid, one_query=one)
        o = self.lta(a, state)
        if state is not None and not state.static:
            state.steps += 1
        return s, o

    def _generate(
        self, s: Tensor, z: Tensor, mem_kv, key_valid: Tensor, eps_out: Tensor | None, one_query: bool = False
    ) -> Tensor:
        mu_g = self.gen_ffn(self.gen_attn(s + self.z_proj(z), *mem_kv[1], key_valid=key_valid, one_query=one_query))
        if self.output_sigma > 0:
            mu_g = mu_g + self.output_sigma * eps_out
        return mu_g

    def _reduce(self, kl: Tensor) -> Tensor:
        return kl.sum(-1) if self.kl_reduction == "sum" else kl.mean(-1)

    # -- the two modes --------------------------------------------------------------------------

    def forward_train(
        self, h: Tensor, mem_kv, key_valid: Tensor, step_valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Teacher-forced pass over all S positions (z from Q_φ).

        ``step_valid`` (B, S-1): True where step p is a real prediction (not padding).
        Returns ``out`` (B, S, D), the per-step KL (B, S-1) (zero on padding) and, with the
        target-guided loss, FFN_i(z̃) (B, S-1, D).
        """
        s, o = self._context(h, mem_kv, key_valid, None)
        # Gaussian parameters in float32 even under autocast (exp() of log-variances)
        mu_p, logvar_p = self.prior(o[:, :-1]).float().chunk(2, dim=-1)
        mu_q, logvar_q = self.recognition(o[:, 1:]).float().chunk(2, dim=-1)
        valid = step_valid.unsqueeze(-1)
        kl = torch.where(valid, gaussian_kl(mu_q, logvar_q, mu_p, logvar_p), 0.0)
        z = torch.where(valid, reparameterise(mu_q, logvar_q, torch.randn_like(mu_q)), 0.0)
        z = torch.cat([z, z.new_zeros(z.shape[0], 1, z.shape[2])], dim=1)  # last position: no z
        eps_out = torch.randn_like(s) if self.output_sigma > 0 else None
        out = self._generate(s, z, mem_kv, key_valid, eps_out)
        guide = None
        if self.guide_ffn is not None:
            z_prior = reparameterise(mu_p, logvar_p, torch.randn_like(mu_p))
            guide = self.guide_ffn(self.z_proj(z_prior))
        return out, self._reduce(kl), guide

    def forward_infer(
        self,
        h: Tensor,
        mem_kv,
        key_valid: Tensor,
        eps_z: Tensor,
        eps_out: Tensor | None,
        state: LayerState | None = None,
    ) -> Tensor:
        """Generation pass (z from P_θ) with given noise ``eps_z`` (B, S, latent) and ``eps_out``
        (B, S, D): the whole prefix when ``state`` is None, else one cached step."""
        s, o = self._context(h, mem_kv, key_valid, state)
        mu_p, logvar_p = self.prior(o).chunk(2, dim=-1)
        z = reparameterise(mu_p, logvar_p, eps_z)
        return self._generate(s, z, mem_kv, key_valid, eps_out, one_query=state is not None and state.one_query)
