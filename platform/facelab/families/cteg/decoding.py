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
* all noise is drawn for the full batch in chunks of :data:`NOISE_CHUNK` steps, in a fixed order
  (per chunk, layer by layer: ε_z for the chunk's steps, then ε_out), from ``generator``; so a
  sequence's frames do not depend on when the others stop, and every path -- the full recomputation
  (``use_cache=False``, which replays the stored noise of the prefix), the eager cached one and the
  static one below -- gives the same frames.
* ``generator`` may also be a list with one generator per text: consecutive rows that share one
  generator object form a *group* whose noise that generator draws on its own, exactly as it would
  for those rows alone. This is what request batching in the server uses: a seeded request decoded
  in a batch with others gets the noise -- and, up to float rounding of the batched kernels, the
  frames -- it gets alone (:func:`generate_groups`).

On CUDA the cached path is *static* by default: the KV caches are fixed-shape buffers written at a
device-side step counter (:class:`~.layers.StaticKVCache`), the text masks are prepared once, and
one decoding step is captured as a CUDA graph and replayed, so a step costs its kernels' run time
instead of a Python pass over ~80 launches. All rows run every step (a stopped row's later frames
are computed and dropped; its own frames are unaffected); whether every row has stopped is checked
every :data:`STOP_CHECK_EVERY` steps. On the CPU the eager cached path (stopped rows leave the
batch) stays the default.

``should_stop`` (optional, every path): a callable asked before each decoding step; when it answers
True, decoding raises ``TimeoutError`` and returns nothing. A server passes its request deadline this
way, so abandoned work stops within one step instead of holding the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from facelab.core.layers import KeyMask

if TYPE_CHECKING:
    from .model import CTEG


def _check_stop(should_stop, step: int) -> None:
    if should_stop is not None and should_stop():
        raise TimeoutError(f"CTEG decoding stopped at step {step}: should_stop() said so (a deadline passed)")


NOISE_CHUNK = 16
"""Steps of noise drawn per call of the generator (see the module docstring)."""
STOP_CHECK_EVERY = 16
"""Static decoding: steps between two checks (one device sync) of whether every row has stopped."""


def _randn(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
) -> Tensor:
    src = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=src, dtype=dtype).to(device)


def _groups(generator, b: int) -> list[tuple[torch.Generator | None, int]]:
    """(generator, rows) per group of consecutive rows drawing from one generator (module docstring)."""
    if generator is None or isinstance(generator, torch.Generator):
        return [(generator, b)]
    gens = list(generator)
    if len(gens) != b:
        raise ValueError(f"generator: a list needs one generator per text ({b}), got {len(gens)}")
    groups: list[list] = []
    for g in gens:
        if groups and groups[-1][0] is g:
            groups[-1][1] += 1
        else:
            groups.append([g, 1])
    return [(g, n) for g, n in groups]


def _select_kv(mem_kv, rows: Tensor):
    return [tuple((k[rows], v[rows]) for k, v in layer_kv) for layer_kv in mem_kv]


class _Noise:
    """The sampling noise of one ``generate`` call: per layer, ε_z (steps, B, latent) and, with
    σ_out > 0, ε_out (steps, B, d_model), drawn chunk by chunk (see the module docstring)."""

    def __init__(self, model: CTEG, b: int, n_max: int, generator, device, dtype):
        cfg = model.cfg
        self.n_layers, self.b, self.n_max = len(model.layers), b, n_max
        self.latent, self.d, self.sigma_out = cfg.latent_dim, cfg.d_model, cfg.output_sigma > 0
        self.groups = _groups(generator, b)
        self.device, self.dtype = device, dtype
        self.z: list[list[Tensor]] = [[] for _ in range(self.n_layers)]
        self.out: list[list[Tensor]] = [[] for _ in range(self.n_layers)]

    def _draw(self, n: int, width: int) -> Tensor:
        parts = [_randn((n, rows, width), g, self.device, self.dtype) for g, rows in self.groups]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _draw_until(self, step: int) -> None:
        while len(self.z[0]) * NOISE_CHUNK <= step:
            # Always a whole chunk, also past n_max: a step's noise then depends on the generator and
            # the step alone, not on n_max, so a request decoded in a batch with a larger max_frames
            # gets the noise it gets alone.
            for m in range(self.n_layers):
                self.z[m].append(self._draw(NOISE_CHUNK, self.latent))
                if self.sigma_out:
                    self.out[m].append(self._draw(NOISE_CHUNK, self.d))

    def step(self, p: int) -> list[tuple[Tensor, Tensor | None]]:
        """Per layer (ε_z (B, latent), ε_out (B, d) or None) of step ``p``."""
        self._draw_until(p)
        c, i = divmod(p, NOISE_CHUNK)
        return [(self.z[m][c][i], self.out[m][c][i] if self.sigma_out else None) for m in range(self.n_layers)]

    def all(self) -> list[tuple[Tensor, Tensor | None]]:
        """Per layer (ε_z (n_max, B, latent), ε_out (n_max, B, d) or None): every step's noise."""
        self._draw_until(self.n_max - 1)
        return [
            (torch.cat(self.z[m])[: self.n_max], torch.cat(self.out[m])[: self.n_max] if self.sigma_out else None)
            for m in range(self.n_layers)
        ]


@torch.no_grad()
def generate(
    model: CTEG,
    texts: list[str],
    max_frames: int | None = None,
    generator: torch.Generator | list[torch.Generator | None] | None = None,
    use_cache: bool = True,
    static: bool | None = None,
    should_stop=None,
) -> list[Tensor]:
    """One (T_i, 53) tensor per text, 1 <= T_i <= max_frames (default ``cfg.max_frames``, the
    MSL), terminator not included. Empty texts are generated unconditionally. Runs in eval mode
    (no dropout) and restores the previous mode. ``should_stop``: see the module docstring.

    ``static`` (cached decoding only): fixed-shape caches with one step captured as a CUDA graph;
    None = on CUDA devices. ``static=True`` on the CPU runs the same fixed-shape step without a graph."""
    texts = list(texts)
    n_max = model.cfg.max_frames if max_frames is None else int(max_frames)
    if n_max < 1:
        raise ValueError(f"max_frames must be >= 1, got {n_max}")
    if not texts:
        return []
    device = model.mean_expression.device
    if static is None:
        static = device.type == "cuda"
    was_training = model.training
    model.eval()
    try:
        if use_cache and static:
            return _sample_static(model, texts, n_max, generator, graph=device.type == "cuda", should_stop=should_stop)
        return _sample(model, texts, n_max, generator, use_cache, should_stop=should_stop)
    finally:
        model.train(was_training)


def generate_groups(
    model: CTEG,
    requests: list[tuple[list[str], int, torch.Generator | None]],
    static: bool | None = None,
    should_stop=None,
) -> list[list[Tensor]]:
    """Decode several requests ``(texts, max_frames, generator)`` as one batch: one list of (T, 53)
        tensors per request. Each request's rows draw their noise from its own generator and are cut to
        its own ``max_frames``, so the answer is the one ``generate(model, texts, max_frames, generator)``
        gives for the request alone (same noise, same stop decisions; values equal up to the rounding of
        batched kernels and of padding the text batch). The batch runs ``max(max_frames)`` steps, ended
        early once every row has stopped. Used by the server's request batching (``should_stop``: the
    module docstring)."""
    if not requests:
        return []
    texts: list[str] = []
    gens: list[torch.Generator | None] = []
    for req_texts, _, gen in requests:
        texts += req_texts
        gens += [gen] * len(req_texts)
    n_max = max(int(n) for _, n, _ in requests)
    rows = generate(model, texts, max_frames=n_max, generator=gens, static=static, should_stop=should_stop)
    out, i = [], 0
    for req_texts, n, _ in requests:
        out.append([r[: int(n)] for r in rows[i : i + len(req_texts)]])
        i += len(req_texts)
    return out


def _sample(model: CTEG, texts: list[str], n_max: int, generator, use_cache: bool, should_stop=None) -> list[Tensor]:
    cfg = model.cfg
    mean = model.mean_expression
    device, dtype = mean.device, mean.dtype
    b = len(texts)
    layers = list(model.layers)
    sigma_out = cfg.output_sigma > 0

    memory, pad = model.encode_text(texts)
    key_valid = ~pad
    mem_kv = [layer.memory_kv(memory) for layer in layers]
    noise = _Noise(model, b, n_max, generator, device, dtype)

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
        noise_out = (
            [torch.zeros(b, n_max, cfg.d_model, device=device, dtype=dtype) for _ in layers] if sigma_out else None
        )

    for p in range(n_max):
        _check_stop(should_stop, p)
        eps = noise.step(p)

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


def _sample_static(model: CTEG, texts: list[str], n_max: int, generator, graph: bool, should_stop=None) -> list[Tensor]:
    """Cached decoding with fixed shapes: step 0 runs eagerly (it also warms the kernels up), the
    step is then captured once as a CUDA graph (``graph``) and replayed for steps 1..n_max-1."""
    cfg = model.cfg
    mean = model.mean_expression
    device, dtype = mean.device, mean.dtype
    b = len(texts)
    layers = list(model.layers)

    memory, pad = model.encode_text(texts)
    text_mask = KeyMask(~pad)  # prepared once for every step and both cross-attentions
    mem_kv = [layer.memory_kv(memory) for layer in layers]
    noise = _Noise(model, b, n_max, generator, device, dtype).all()  # per layer (n_max, B, ·)
    model.embed.positions(0, n_max)  # the PE table must hold every position before capture

    position = torch.zeros(1, dtype=torch.long, device=device)  # the step counter p, on the device
    states = [layer.new_static_state(b, n_max, position, dtype=dtype, device=device) for layer in layers]
    x = mean.expand(b, -1).clone()  # (B, 53) input frame of the step
    frames = torch.zeros(n_max, b, cfg.expr_dim, device=device, dtype=dtype)  # (n_max, B, 53)

    def step() -> None:
        h = model.embed(x[:, None], start=position)
        for m, layer in enumerate(layers):
            e_z, e_out = noise[m]
            h = layer.forward_infer(
                h,
                mem_kv[m],
                text_mask,
                e_z.index_select(0, position).transpose(0, 1),  # (B, 1, latent)
                e_out.index_select(0, position).transpose(0, 1) if e_out is not None else None,
                state=states[m],
            )
        y = model.project_out(h[:, 0])
        frames.index_copy_(0, position, y[None])
        x.copy_(y)
        position.add_(1)

    def all_stopped(done: int) -> bool:  # frame 0 is always kept; a row stops at its first small frame after it
        return bool((frames[1:done].norm(dim=-1) < cfg.stop_threshold).any(dim=0).all())

    if graph:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            step()  # step 0, for real: also loads every kernel before the capture
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()  # recorded, not run
        run = g.replay
    else:
        step()
        run = step
    done = 1
    while done < n_max:
        _check_stop(should_stop, done)
        run()
        done += 1
        if done % STOP_CHECK_EVERY == 0 and done < n_max and all_stopped(done):
            break

    out = frames[:done].transpose(0, 1)  # (B, done, 53)
    small = out[:, 1:].norm(dim=-1) < cfg.stop_threshold  # (B, done-1)
    first = torch.where(small.any(dim=1), small.float().argmax(dim=1) + 1, done)  # T_i
    return [out[i, :n].clone() for i, n in enumerate(first.tolist())]
