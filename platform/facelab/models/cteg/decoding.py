"""Autoregressive sampling from CTEG (paper §3.4 inference, §3.6 start/stop).

Per step p, for a batch of texts:
  input ψ̂_p (ψ̂_0 = the training-set mean face) -> embedding at position p -> for each CVAD layer
  z_p ~ P_θ (the prior) and out_p = μ_g + σ·ε -> ψ̂_{p+1} = W_out · out_p of the last layer.
ψ̂_{p+1} is both the returned frame and the next input, and the stop test is applied to it: a
sequence ends at the first frame with ||ψ̂|| < stop_threshold (the L2 distance to the all-zero
"standard face" terminator), which is not returned. This is what the reference does: the
sampled output (``second_sample``) projected by ``trg_exp_prj`` is appended to the sequence
(``Translator.serial_inference``) and the same frames are truncated at the first one within 1.0 of
zero (``translate.truncate_mask``). Differences, on purpose:

* the first generated frame is never taken as the terminator, so every sequence has >= 1 frame;
  the reference returns the mean start frame too, and a sequence that stops at once is just it;
* with ``use_cache`` the per-layer keys/values of the causal self-attention and of LTA (or its
  running sum) and the text memory's keys/values are cached, so each step runs one position; the
  reference re-runs the whole prefix every step, redrawing all of its noise;
* sequences that stopped leave the batch (their cache rows are dropped);
* all noise is drawn per step for the full batch, in a fixed order (layer by layer: ε_z, then ε_out),
  from ``generator``; so a sequence's frames do not depend on when the others stop, and the
  full-recomputation path (``use_cache=False``, which replays the stored noise of the prefix) gives
  the same frames as the cached one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .model import CTEG


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype) -> Tensor:
    src = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=src, dtype=dtype).to(device)


def _select_kv(mem_kv, rows: Tensor):
    return [tuple((k[rows], v[rows]) for k, v in layer_kv) for layer_kv in mem_kv]


@torch.no_grad()
def generate(
    model: CTEG,
    texts: list[str],
    max_frames: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[Tensor]:
    """One (T_i, 53) tensor per text, 1 <= T_i <= max_frames (default ``cfg.max_frames``, the
    MSL), terminator not included. Empty texts are generated unconditionally. Runs in eval mode
    (no dropout) and restores the previous mode."""
    texts = list(texts)
    n_max = model.cfg.max_frames if max_frames is None else int(max_frames)
    if n_max < 1:
        raise ValueError(f"max_frames must be >= 1, got {n_max}")
    if not texts:
        return []
    was_training = model.training
    model.eval()
    try:
        return _sample(model, texts, n_max, generator, use_cache)
    finally:
        model.train(was_training)


def _sample(model: CTEG, texts: list[str], n_max: int, generator, use_cache: bool) -> list[Tensor]:
    cfg = model.cfg
    mean = model.mean_expression
    device, dtype = mean.device, mean.dtype
    b = len(texts)
    layers = list(model.layers)
    sigma_out = cfg.output_sigma > 0

    memory, pad = model.encode_text(texts)
    key_valid = ~pad
    mem_kv = [layer.memory_kv(memory) for layer in layers]

    frames = torch.zeros(b, n_max, cfg.expr_dim, device=device, dtype=dtype)
    lengths = torch.full((b,), n_max, dtype=torch.long)
    rows = torch.arange(b, device=device)  # batch rows still generating
    x = mean.expand(b, -1)  # current input frame of the active rows

    if use_cache:
        states = [layer.new_state(n_max) for layer in layers]
    else:  # full recomputation: keep the inputs and the noise of the whole prefix
        inputs = torch.zeros(b, n_max, cfg.expr_dim, device=device, dtype=dtype)
        inputs[:, 0] = mean
        noise_z = [torch.zeros(b, n_max, cfg.latent_dim, device=device, dtype=dtype) for _ in layers]
        noise_out = [torch.zeros(b, n_max, cfg.d_model, device=device, dtype=dtype) for _ in layers] if sigma_out else None

    for p in range(n_max):
        eps = []
        for _ in layers:
            e_z = _randn((b, cfg.latent_dim), generator, device, dtype)
            e_out = _randn((b, cfg.d_model), generator, device, dtype) if sigma_out else None
            eps.append((e_z, e_out))

        if use_cache:
            h = model.embed(x[:, None], start=p)
            for m, layer in enumerate(layers):
                e_z, e_out = eps[m]
                h = layer.forward_infer(
                    h,
                    mem_kv[m],
                    key_valid,
                    e_z[rows, None],
                    e_out[rows, None] if sigma_out else None,
                    state=states[m],
                )
            y = model.project_out(h[:, 0])
        else:
            for m in range(len(layers)):
                noise_z[m][:, p] = eps[m][0]
                if sigma_out:
                    noise_out[m][:, p] = eps[m][1]
            h = model.embed(inputs[rows, : p + 1])
            for m, layer in enumerate(layers):
                h = layer.forward_infer(
                    h,
                    mem_kv[m],
                    key_valid,
                    noise_z[m][rows, : p + 1],
                    noise_out[m][rows, : p + 1] if sigma_out else None,
                )
            y = model.project_out(h[:, -1])
            if p + 1 < n_max:
                inputs[rows, p + 1] = y

        frames[rows, p] = y
        if p == 0:  # the first frame is always kept (T_i >= 1)
            x = y
            continue
        stop = y.norm(dim=-1) < cfg.stop_threshold
        if bool(stop.any()):
            lengths[rows[stop].cpu()] = p
            keep = ~stop
            rows, y, key_valid = rows[keep], y[keep], key_valid[keep]
            if rows.numel() == 0:
                break
            mem_kv = _select_kv(mem_kv, keep)
            if use_cache:
                for state in states:
                    state.select(keep)
        x = y

    return [frames[i, : int(n)].clone() for i, n in enumerate(lengths.tolist())]
