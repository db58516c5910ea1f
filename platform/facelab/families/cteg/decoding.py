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
:data:`GRAPH_STEPS` decoding steps are captured as one CUDA graph and replayed, so a step costs its
kernels' run time instead of a Python pass over ~80 launches. The step is compiled with TorchInductor
before the capture (``compile``; it fuses the elementwise work and LayerNorms; matrix products stay
float32), and the captured decoder -- buffers and graph -- is kept per (batch, capacity, text width)
and reused by later calls (:class:`_GraphDecoder`; capacity = ``max_frames`` rounded up to
``GRAPH_STEPS`` · 2^k, text width to :data:`TEXT_BUCKET` tokens, at most :data:`GRAPH_CACHE_SIZE` kept
per model; :func:`clear_graph_cache` drops them). All rows run every step (a stopped row's later frames
are computed and dropped; its own frames are unaffected); whether every row has stopped is checked
after every replay, i.e. every :data:`STOP_CHECK_EVERY` steps. On the CPU the eager cached path
(stopped rows leave the batch) stays the default; ``static=True`` there runs the fixed-shape step
without a graph.

``should_stop`` (optional, every path): a callable asked before each decoding step (on CUDA before each
graph replay of :data:`GRAPH_STEPS` steps); when it answers True, decoding raises ``TimeoutError`` and
returns nothing. A server passes its request deadline this way, so abandoned work stops within one
step (one replay) instead of holding the model.
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
    compile: bool | str | None = None,
) -> list[Tensor]:
    """One (T_i, 53) tensor per text, 1 <= T_i <= max_frames (default ``cfg.max_frames``, the
    MSL), terminator not included. Empty texts are generated unconditionally. Runs in eval mode
    (no dropout) and restores the previous mode. ``should_stop``: see the module docstring.

    ``static`` (cached decoding only): fixed-shape caches with one step captured as a CUDA graph;
    None = on CUDA devices. ``static=True`` on the CPU runs the same fixed-shape step without a graph.
    ``compile`` (CUDA static decoding only): the captured step is compiled with TorchInductor first
    (None/True = in :data:`COMPILE_MODE`, a string = in that mode, False = not compiled); the first call
    per shape then compiles and captures (seconds); see :class:`_GraphDecoder`."""
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
            return _sample_static(
                model, texts, n_max, generator, graph=device.type == "cuda", should_stop=should_stop, compile=compile
            )
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


def _sample_static(
    model: CTEG,
    texts: list[str],
    n_max: int,
    generator,
    graph: bool,
    should_stop=None,
    compile: bool | str | None = None,
) -> list[Tensor]:
    """Cached decoding with fixed shapes. On CUDA (``graph``) a cached :class:`_GraphDecoder` replays
    :data:`GRAPH_STEPS` steps per CUDA graph; elsewhere step 0 runs eagerly, then the same
    fixed-shape step runs for steps 1..n_max-1 without a graph."""
    cfg = model.cfg
    mean = model.mean_expression
    device, dtype = mean.device, mean.dtype
    b = len(texts)
    layers = list(model.layers)

    if graph:
        _, lock = _decoder_cache(model)
        with lock:  # the captured graphs' buffers are shared by the calls of one model
            memory, pad = model.encode_text(texts)
            mem_kv = [layer.memory_kv(memory) for layer in layers]
            noise = _Noise(model, b, n_max, generator, device, dtype).all()  # per layer (n_max, B, ·)
            return _decode_graph(model, ~pad, mem_kv, noise, n_max, should_stop, compile)

    memory, pad = model.encode_text(texts)
    mem_kv = [layer.memory_kv(memory) for layer in layers]
    noise = _Noise(model, b, n_max, generator, device, dtype).all()  # per layer (n_max, B, ·)

    text_mask = KeyMask(~pad)  # prepared once for every step and both cross-attentions
    model.embed.positions(0, n_max)  # the PE table must hold every position before capture
    position = torch.zeros(1, dtype=torch.long, device=device)  # the step counter p, on the device
    states = [layer.new_static_state(b, n_max, position, dtype=dtype, device=device) for layer in layers]
    x = mean.expand(b, -1).clone()  # (B, 53) input frame of the step
    frames = torch.zeros(n_max, b, cfg.expr_dim, device=device, dtype=dtype)  # (n_max, B, 53)

    def step() -> None:
        _decode_step(model, x, position, frames, noise, mem_kv, text_mask, states)

    step()
    done = 1
    while done < n_max:
        _check_stop(should_stop, done)
        step()
        done += 1
        if done % STOP_CHECK_EVERY == 0 and done < n_max and _all_stopped(frames, done, cfg.stop_threshold):
            break
    return _cut(frames, done, cfg.stop_threshold)


def _decode_step(model: CTEG, x, position, frames, noise, mem_kv, text_mask, states) -> None:
    """One fixed-shape decoding step at the device-side counter ``position``: reads ``x`` (B, 53),
    writes frame p into ``frames`` (cap, B, 53) and into ``x``, advances ``position``."""
    h = model.embed(x[:, None], start=position)
    for m, layer in enumerate(model.layers):
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


def _all_stopped(frames: Tensor, done: int, threshold: float) -> bool:
    """Frame 0 is always kept; a row stops at its first small frame after it."""
    return bool((frames[1:done].norm(dim=-1) < threshold).any(dim=0).all())


def _cut(frames: Tensor, done: int, threshold: float) -> list[Tensor]:
    out = frames[:done].transpose(0, 1)  # (B, done, 53)
    small = out[:, 1:].norm(dim=-1) < threshold  # (B, done-1)
    first = torch.where(small.any(dim=1), small.float().argmax(dim=1) + 1, done)  # T_i
    return [out[i, :n].clone() for i, n in enumerate(first.tolist())]


# -- CUDA: cached multi-step graphs ------------------------------------------------------------

GRAPH_STEPS = STOP_CHECK_EVERY
"""CUDA: decoding steps captured in one CUDA graph (one replay = this many steps)."""
TEXT_BUCKET = 16
"""CUDA: the text memory is zero-padded (and masked) to a multiple of this many tokens, so texts
of similar length share one captured graph."""
GRAPH_CACHE_SIZE = 4
"""CUDA: captured decoders kept per model (least recently used dropped first); each holds its
buffers (KV caches, noise, padded text keys/values) and its graph's memory pool."""

COMPILE_MODE = "default"
"""CUDA: the ``torch.compile`` mode of the captured step (``compile=True``/None); ``compile`` may also
name a mode, e.g. ``"max-autotune-no-cudagraphs"`` (autotuned matrix products: a slower first call)."""

ONE_QUERY_ATTENTION = True
"""CUDA, compiled step: the attentions as elementwise products and sums (``Attention.forward``'s
``one_query``) instead of SDPA's memory-efficient kernel, which took 35-37 % of the step's GPU time in
the profile in bench/RESULTS.md; Inductor fuses them with the step's other work. On by default: on an
H100 it decodes 256 frames in 56 ms instead of 76 ms at batch 1 and 196 instead of 245 ms at batch 64
(bench/RESULTS.md), with the same frames up to float32 rounding (tests/models/test_cteg_decoding_fast.py)."""

_compiled_steps: dict[str, object] = {}


def _step_fn(mode: str | None):
    """The step function, compiled with TorchInductor in ``mode`` (it fuses the step's elementwise
    work, LayerNorms and single-query attentions into few kernels; float32 throughout), or as is
    when ``mode`` is None."""
    if mode is None:
        return _decode_step
    if mode not in _compiled_steps:
        _compiled_steps[mode] = torch.compile(_decode_step, mode=mode, dynamic=False)
    return _compiled_steps[mode]


def _bucket(n: int, unit: int) -> int:
    """``unit`` · the smallest power of two with ``unit`` · 2^k >= n."""
    c = unit
    while c < n:
        c *= 2
    return c


class _GraphDecoder:
    """Fixed buffers and a CUDA graph of :data:`GRAPH_STEPS` decoding steps for one (batch,
    capacity, text width): built (and the step compiled, then captured) on first use, kept across
    ``generate`` calls (:func:`_decode_graph`); a call copies its inputs into the buffers, resets
    the caches and replays. The buffers' unused parts (text keys past a text's length, cache slots
    not yet written) are masked in attention and hold finite values (zeros), so they contribute
    exactly nothing: a call's frames do not depend on earlier calls."""

    def __init__(self, model: CTEG, b: int, cap: int, width: int, mode: str | None):
        cfg = model.cfg
        mean = model.mean_expression
        device, dtype = mean.device, mean.dtype
        self.b, self.cap, self.width = b, cap, width
        self.model = model
        layers = list(model.layers)
        model.embed.positions(0, cap)  # the PE table must hold every position before capture
        self.pe = model.embed.pe  # kept alive: the graph reads it
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.states = [layer.new_static_state(b, cap, self.position, dtype=dtype, device=device) for layer in layers]
        for state in self.states:
            state.one_query = mode is not None and ONE_QUERY_ATTENTION
        self.x = torch.zeros(b, cfg.expr_dim, device=device, dtype=dtype)
        self.frames = torch.zeros(cap, b, cfg.expr_dim, device=device, dtype=dtype)
        self.noise = [
            (
                torch.zeros(cap, b, cfg.latent_dim, device=device, dtype=dtype),
                torch.zeros(cap, b, cfg.d_model, device=device, dtype=dtype) if cfg.output_sigma > 0 else None,
            )
            for _ in layers
        ]

        def kv(attn) -> tuple[Tensor, Tensor]:
            shape = (b, attn.n_heads, width, attn.head_dim)
            return torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype)

        self.mem_kv = [(kv(layer.text_attn), kv(layer.gen_attn)) for layer in layers]
        self.text_mask = KeyMask(torch.ones(b, width, dtype=torch.bool, device=device))
        self.mode = mode
        self.params = _fingerprint(model)
        self.graph = self._capture(mode)

    def _capture(self, mode: str | None) -> torch.cuda.CUDAGraph:
        device = self.x.device
        args = (self.model, self.x, self.position, self.frames, self.noise, self.mem_kv, self.text_mask, self.states)
        fn = _step_fn(mode)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # compiles (first time) and loads every kernel before the capture
                fn(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.position.zero_()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(GRAPH_STEPS):
                fn(*args)  # recorded, not run
        return g

    def load(self, key_valid: Tensor, mem_kv, noise, n_max: int) -> None:
        """Copy one call's inputs into the buffers and reset the decoding state."""
        length = key_valid.shape[1]
        valid = torch.zeros(self.b, self.width, dtype=torch.bool, device=key_valid.device)
        valid[:, :length] = key_valid
        mask = KeyMask(valid)
        self.text_mask.mask.copy_(mask.mask)
        self.text_mask.has_key.copy_(mask.has_key)
        for (dst_t, dst_g), (src_t, src_g) in zip(self.mem_kv, mem_kv):
            for dst, src in zip((*dst_t, *dst_g), (*src_t, *src_g)):
                dst[:, :, :length].copy_(src)
                dst[:, :, length:].zero_()
        for (dz, do), (sz, so) in zip(self.noise, noise):
            dz[:n_max].copy_(sz)
            if do is not None:
                do[:n_max].copy_(so)
        for state in self.states:
            state.self_kv.k.zero_()
            state.self_kv.v.zero_()
            if state.lta_kv is not None:
                state.lta_kv.k.zero_()
                state.lta_kv.v.zero_()
            if state.lta_sum is not None:
                state.lta_sum.zero_()
        self.x.copy_(self.model.mean_expression.expand(self.b, -1))
        self.position.zero_()


def _fingerprint(model: CTEG) -> tuple:
    """The decoder's parameter storage: a captured graph reads these addresses."""
    return tuple(p.data_ptr() for n, p in model.named_parameters() if not n.startswith("text_encoder."))


def _decoder_cache(model: CTEG):
    cache = model.__dict__.get("_graph_decoders")
    if cache is None:
        import collections
        import threading

        cache = model.__dict__["_graph_decoders"] = collections.OrderedDict()
        model.__dict__["_graph_lock"] = threading.RLock()
    return cache, model.__dict__["_graph_lock"]


def clear_graph_cache(model: CTEG) -> None:
    """Drop the captured decoders of ``model`` (their buffers and graph memory)."""
    cache, lock = _decoder_cache(model)
    with lock:
        cache.clear()


def _decode_graph(model: CTEG, key_valid: Tensor, mem_kv, noise, n_max: int, should_stop, compile) -> list[Tensor]:
    """CUDA: decode with the cached :class:`_GraphDecoder` of this (batch, capacity, text width),
    capturing one first; :data:`GRAPH_STEPS` steps per replay, the stop test between replays."""
    mode = COMPILE_MODE if compile is None or compile is True else (compile or None)
    cfg = model.cfg
    b = key_valid.shape[0]
    cap = _bucket(n_max, GRAPH_STEPS)
    width = TEXT_BUCKET * -(-key_valid.shape[1] // TEXT_BUCKET)
    key = (b, cap, width, mode, ONE_QUERY_ATTENTION, model.mean_expression.dtype, model.mean_expression.device)
    cache, lock = _decoder_cache(model)
    with lock:
        dec = cache.pop(key, None)
        if dec is not None and dec.params != _fingerprint(model):
            dec = None  # the parameters were replaced (not updated in place): capture again
        if dec is None:
            while len(cache) >= GRAPH_CACHE_SIZE:
                cache.popitem(last=False)
            try:
                dec = _GraphDecoder(model, b, cap, width, mode)
            except Exception as exc:  # noqa: BLE001 - no working compiler here: the eager step, still captured
                if mode is None:
                    raise
                import warnings

                warnings.warn(f"CTEG decoding: torch.compile of the step failed ({exc!r}); using the eager step")
                dec = _GraphDecoder(model, b, cap, width, None)
        cache[key] = dec
        dec.load(key_valid, mem_kv, noise, n_max)
        done = 0
        while done < n_max:
            _check_stop(should_stop, done)
            dec.graph.replay()
            done += GRAPH_STEPS
            if done < n_max and _all_stopped(dec.frames, done, cfg.stop_threshold):
                break
        return _cut(dec.frames, min(done, n_max), cfg.stop_threshold)
