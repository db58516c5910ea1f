"""Recursive keyframe generation (KeyframeFace §4, Algorithm 1): plain greedy decoding and a
grammar-constrained fast path that always yields a parseable answer.

Algorithm 1 asks the LM once per keyframe, with the whole script in context and the Target Frame
Instruction naming the keyframe (:func:`~.prompts.requests_for_script`). The release's requests for
one script are independent (no generated keyframe is fed back), so all requests of all scripts are
batched together here, sorted by prompt length, with left padding.

``mode="plain"``
    ``model.generate`` greedy (the release infers at temperature 0), up to ``max_new_tokens``, stop at
    the end-of-turn token, then :func:`~.parsing.parse_answer`. One forward call per generated token.

``mode="constrained"`` (default)
    The answer's skeleton -- everything but the 61 values, :func:`~.prompts.answer_skeleton` -- is
    known in advance, so it is *forced*; only the values are decoded, greedily, under a grammar mask:

    * each value is a string of ``-?\\d(\\.\\d{1,2})?`` whose number lies in the channel's range
      (``[0, 1]`` blendshapes, ``[-1, 1]`` pose; a minus sign only where the range is negative). At
      each step the candidates are the tokens whose text keeps the value a prefix of such a string --
      computed once per tokenizer over its whole vocabulary, so a tokenizer that splits digits (Qwen)
      and one that has whole-number tokens (the tiny model's) both work;
    * once the value is a complete string that could still be extended (``0.2`` -> ``0.25``), the
      first token of the following skeleton piece joins the candidates: choosing it ends the value.
      The decoder *speculates* that the value ends and feeds ``[value token] + skeleton piece`` in one
      forward call: the logits at the value token decide (accept: the logits at the end of the piece
      already give the next value's first token; reject: the piece's cache slots are masked out and
      decoding continues from the value token). A value that cannot be extended is followed by its
      piece without a decision. The KV cache is reused throughout;
    * in the semantic format without the Target Frame Instruction the keyframe's number word in
      ``{"Keyframe_two":`` is *not* forced (that would leak the target the ablation removes): the model
      chooses it among ``one``..``five`` the same way.

    Forward calls per keyframe: 1 prefill + one per value token, less one when the last value cannot
    be extended (a rejected speculation costs no extra call) -- at most 62 when every value is a single
    token, as with the tiny tokenizer. Plain decoding needs one per answer token: about 4.4 per channel
    with the tiny tokenizer (name, ``":``, value, ``,"``), ~268 per keyframe against 62 measured in
    ``tests/models/test_keyframe_lm_trained.py``; with a digit-splitting tokenizer (Qwen) a value is
    up to 4 tokens and the skeleton's share, which the fast path feeds in one call, is about half.
    A batch shares its calls (one per step for all rows). The output always parses (``valid=True``);
    ``max_new_tokens`` does not apply (the length is fixed by the skeleton).

    Equivalence with plain greedy decoding: wherever plain greedy writes a valid answer in the
    canonical tokenisation (the tokenizer's encoding of the answer text, which is what training
    teaches), each plain argmax token is among the candidates, so the constrained argmax is the
    same token and the forced pieces are the tokens plain decoding would have chosen -- the values are
    identical. This needs a tokenizer whose pre-tokenizer splits at every value boundary, so that the
    canonical tokens of the answer are those of its pieces and values concatenated (true for the tiny
    tokenizer, checked in the tests). With a tokenizer that can glue a minus sign to the preceding
    ``":`` (Qwen's punctuation runs), a negative pose value is fed in a valid but non-canonical
    tokenisation; the output still always parses.

Batched == unbatched: rows of a batch advance in lockstep, one forward call per step; each row feeds
its own chunk (right-padded to the longest with masked pad slots), positions are per row (logical
positions skip padding and rejected speculation), so a request's tokens see exactly the tokens they
would see alone. In float32 the answers are identical (tested); in bfloat16 the rounding of a matrix
product depends on the batch's shape, so near-ties can break differently (on an H200 a random-init
model -- all near-ties -- gave the same text for 2 to 28 of 62 requests; a trained model's margins
are wider).

Stopping early: ``should_stop`` (a callable, optional) is asked before every forward call of both
modes (through a ``StoppingCriteria`` in plain mode); when it answers True, generation raises
:class:`GenerationStopped` (a ``TimeoutError``). A server passes a request's deadline this way, so
work nobody waits for any more stops within one decoding step instead of holding the model.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

MODES = ("constrained", "plain")
_KEY_PREFIX = "Keyframe_"
_WORD_HEAD = '{"' + _KEY_PREFIX


class GenerationError(ValueError):
    """The request cannot be generated (bad mode, or a tokenizer that cannot write the answer)."""


class GenerationStopped(TimeoutError):
    """``should_stop()`` said True between two decoding steps (a deadline passed); nothing is returned."""


def _check_stop(should_stop, stats: dict) -> None:
    if should_stop is not None and should_stop():
        raise GenerationStopped(
            f"keyframe generation stopped after {stats.get('forward_calls', 0)} forward calls: should_stop() said so"
        )


# --------------------------------------------------------------------------------------------
# Grammars of one value: finite sets of strings, as token-level automata
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def number_strings(lo: float, hi: float) -> frozenset[str]:
    """Every string of ``-?\\d(\\.\\d{1,2})?`` whose value lies in ``[lo, hi]``; the minus sign only
    where ``lo < 0``. ``number_strings(0, 1)`` = {"0", "1", "0.0" .. "0.99", "1.0", "1.00"}."""
    digits = "0123456789"
    fractions = ["", *(f".{a}" for a in digits), *(f".{a}{b}" for a in digits for b in digits)]
    out = {sign + d + f for sign in (("", "-") if lo < 0 else ("",)) for d in digits for f in fractions}
    return frozenset(s for s in out if lo <= float(s) <= hi)


class _Grammar:
    """A finite language as a token automaton: state = the prefix written so far."""

    def __init__(self, strings: frozenset[str], vocab: Sequence[str]):
        self.complete = strings
        prefixes = {s[:i] for s in strings for i in range(len(s) + 1)}
        chars = set("".join(strings))
        candidates = [(i, t) for i, t in enumerate(vocab) if t and set(t) <= chars]
        self.next: dict[str, dict[int, str]] = {}
        for p in prefixes:
            self.next[p] = {i: p + t for i, t in candidates if p + t in prefixes}
            if not self.next[p] and p not in strings:
                raise GenerationError(f"the tokenizer has no token to continue the value {p!r}")
        self.token_ids = frozenset(i for step in self.next.values() for i in step)
        """Every token that can occur in a value of this grammar."""
        self._ids: dict[tuple[str, int | None], torch.Tensor] = {}

    def extendable(self, p: str) -> bool:
        return bool(self.next[p])

    def candidates(self, p: str, term: int | None) -> torch.Tensor:
        """Sorted token ids allowed after prefix ``p`` (plus ``term``, the token that ends the value)."""
        key = (p, term)
        if key not in self._ids:
            ids = set(self.next[p])
            if term is not None:
                if term in ids:
                    raise GenerationError(f"token {term} both continues the value {p!r} and starts the skeleton")
                ids.add(term)
            self._ids[key] = torch.tensor(sorted(ids), dtype=torch.long)
        return self._ids[key]


class _TokenizerTables:
    """Per-tokenizer tables, computed once: every token's text, grammars, skeleton pieces' ids."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        n = len(tokenizer)
        self.vocab = tokenizer.batch_decode(
            [[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        self.grammars: dict[frozenset[str], _Grammar] = {}
        self.pieces: dict[str, tuple[int, ...]] = {}

    def grammar(self, strings: frozenset[str]) -> _Grammar:
        if strings not in self.grammars:
            self.grammars[strings] = _Grammar(strings, self.vocab)
        return self.grammars[strings]

    def piece(self, text: str) -> tuple[int, ...]:
        if text not in self.pieces:
            ids = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            back = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
            if not ids or back != text:
                raise GenerationError(f"the tokenizer does not reproduce the answer piece {text!r} (got {back!r})")
            self.pieces[text] = ids
        return self.pieces[text]


_TABLES: "weakref.WeakKeyDictionary[Any, _TokenizerTables]" = weakref.WeakKeyDictionary()


def _tables(tokenizer: Any) -> _TokenizerTables:
    try:
        tables = _TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable: no caching
        return _TokenizerTables(tokenizer)
    if tables is None or len(tables.vocab) != len(tokenizer):
        tables = _TABLES[tokenizer] = _TokenizerTables(tokenizer)
    return tables


@dataclass(frozen=True)
class _Program:
    """An answer as ``fixed[0] slot[0] fixed[1] ... slot[n-1] fixed[n]``."""

    fixed_text: tuple[str, ...]
    fixed: tuple[tuple[int, ...], ...]
    grammars: tuple[_Grammar, ...]


def _program(tables: _TokenizerTables, k: int, n_keyframes: int, cfg: Any) -> _Program:
    from facelab.data.arkit import HIGH, LOW
    from facelab.families.keyframe_lm.prompts import answer_skeleton, keyframe_key

    pieces = list(answer_skeleton(k, cfg))
    grammars = [tables.grammar(number_strings(float(lo), float(hi))) for lo, hi in zip(LOW, HIGH)]
    if cfg.semantic and not cfg.target_frame_instruction:
        word = keyframe_key(k)[len(_KEY_PREFIX) :]
        if not pieces[0].startswith(_WORD_HEAD + word):
            raise GenerationError(f"unexpected answer opening {pieces[0]!r}")
        options = frozenset(keyframe_key(i)[len(_KEY_PREFIX) :] for i in range(1, max(5, n_keyframes) + 1))
        pieces = [_WORD_HEAD, pieces[0][len(_WORD_HEAD) + len(word) :], *pieces[1:]]
        grammars = [tables.grammar(options), *grammars]
    return _Program(tuple(pieces), tuple(tables.piece(p) for p in pieces), tuple(grammars))


# --------------------------------------------------------------------------------------------
# One request's decoding state
# --------------------------------------------------------------------------------------------


class _Row:
    """Decoding state of one request: slot ``j``, its prefix ``p``, the next chunk to feed."""

    def __init__(self, program: _Program, prompt: Sequence[int], column: torch.Tensor):
        self.prog = program
        self.column = column  # token id -> its column in the gathered logits
        self.j, self.p, self.values = 0, "", []
        self.spec = 0  # length of the speculatively fed skeleton piece in the last chunk (0: none)
        self.done = False
        self.chunk: list[int] = list(prompt) + list(program.fixed[0])

    @property
    def _last_slot(self) -> bool:
        return self.j == len(self.prog.grammars) - 1

    @property
    def _piece(self) -> tuple[int, ...]:
        return self.prog.fixed[self.j + 1]  # the skeleton after the current slot

    def _pick(self, logits: torch.Tensor, allow_term: bool) -> int:
        """Greedy choice among the allowed tokens; ``logits`` (C,) are the gathered columns."""
        grammar = self.prog.grammars[self.j]
        cand = grammar.candidates(self.p, self._piece[0] if allow_term else None)  # sorted ids
        return int(cand[int(torch.argmax(logits[self.column[cand]]))])

    def _finish_slot(self) -> None:
        self.values.append(self.p)
        self.j, self.p = self.j + 1, ""

    def _take(self, t: int) -> None:
        """Append value token ``t`` and choose what to feed next."""
        grammar = self.prog.grammars[self.j]
        self.p = grammar.next[self.p][t]
        complete, piece, last = self.p in grammar.complete, list(self._piece), self._last_slot
        if complete and not grammar.extendable(self.p):  # the value must end here
            self._finish_slot()
            self.done, self.chunk = last, ([] if last else [t] + piece)
        elif complete and not last:  # may end: speculate that it does
            self.chunk, self.spec = [t] + piece, len(piece)
        else:
            self.chunk = [t]

    def _step(self, logits: torch.Tensor) -> None:
        complete = self.p in self.prog.grammars[self.j].complete
        t = self._pick(logits, allow_term=complete)
        if complete and t == self._piece[0]:  # the model ends the value
            piece, last = list(self._piece), self._last_slot
            self._finish_slot()
            self.done, self.chunk = last, ([] if last else piece)
        else:
            self._take(t)

    def on_logits(self, first: torch.Tensor, last: torch.Tensor) -> int:
        """Consume the logits at the first and last position of the fed chunk; returns how many of
        its trailing cache slots to mask out (a rejected speculation)."""
        if self.spec:
            spec, self.spec = self.spec, 0
            u = self._pick(first, allow_term=True)
            if u != self._piece[0]:
                self._take(u)
                return spec
            self._finish_slot()
        self._step(last)
        return 0

    def text(self) -> str:
        f = self.prog.fixed_text
        return "".join(piece + value for piece, value in zip(f, self.values)) + f[-1]


# --------------------------------------------------------------------------------------------
# Batched decoding loops
# --------------------------------------------------------------------------------------------


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, width - len(s) :] = 1
    return ids, mask


def _constrained_batch(
    model: Any,
    programs: Sequence[_Program],
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    stats: dict,
    should_stop=None,
) -> list[str]:
    device = _device(model)
    # Only the logits of tokens that can be chosen leave the device: values' tokens and skeleton starts.
    ids_used = {i for p in programs for g in p.grammars for i in g.token_ids}
    ids_used |= {piece[0] for p in programs for piece in p.fixed[1:]}
    cols = torch.tensor(sorted(ids_used), dtype=torch.long)  # (C,)
    column = torch.full((int(cols.max()) + 1,), -1, dtype=torch.long)
    column[cols] = torch.arange(len(cols))
    rows = [_Row(prog, prompt, column) for prog, prompt in zip(programs, prompts)]
    B = len(rows)
    ids, mask = _left_pad([r.chunk for r in rows], pad_id)  # (B, T)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
    n_real = mask.sum(-1).tolist()
    # The prefill needs the logits of its last position only (left padding: the same column for every
    # row); the LM head over the whole prompt would be a (B, T, vocabulary) tensor.
    _check_stop(should_stop, stats)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        logits_to_keep=1,
    )
    stats["forward_calls"] += 1
    stats["fed_tokens"] += int(mask.sum())
    cache = out.past_key_values
    cols_dev = cols.to(out.logits.device)
    last = out.logits[:, -1, cols_dev].float().cpu()  # (B, C)
    for b, r in enumerate(rows):
        r.on_logits(last[b], last[b])
    max_steps = sum(len(p.fixed) + 8 * len(p.grammars) for p in programs)  # generous bound, never reached
    while not all(r.done for r in rows):
        if max_steps <= 0:
            raise GenerationError("constrained decoding did not terminate (bug)")
        max_steps -= 1
        _check_stop(should_stop, stats)
        chunks = [[] if r.done else r.chunk for r in rows]
        width = max(len(c) for c in chunks)
        ids = torch.full((B, width), pad_id, dtype=torch.long)  # (B, L)
        new_mask = torch.zeros((B, width), dtype=torch.long)  # (B, L)
        positions = torch.zeros((B, width), dtype=torch.long)  # (B, L)
        for b, c in enumerate(chunks):
            ids[b, : len(c)] = torch.as_tensor(c, dtype=torch.long)
            new_mask[b, : len(c)] = 1
            positions[b] = n_real[b] + torch.arange(width)
        start = mask.shape[1]
        mask = torch.cat([mask, new_mask], dim=1)  # (B, T + L)
        lens = torch.tensor([max(len(c), 1) for c in chunks])
        # Only the chunk positions whose logits are read (the first, and each row's last) go through the
        # LM head: ``keep`` lists them, ``at`` maps a position to its row in the kept logits.
        keep = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long), lens - 1]))  # sorted
        at = torch.full((width,), -1, dtype=torch.long)
        at[keep] = torch.arange(len(keep))
        out = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep.to(device),
        )
        stats["forward_calls"] += 1
        stats["fed_tokens"] += int(new_mask.sum())
        cache = out.past_key_values
        logits = out.logits[:, :, cols_dev]  # (B, len(keep), C)
        firsts = logits[:, 0].float().cpu()  # (B, C)
        lasts = logits[torch.arange(B, device=logits.device), at[lens - 1].to(logits.device)].float().cpu()  # (B, C)
        for b, (r, c) in enumerate(zip(rows, chunks)):
            if not c:
                continue
            n_real[b] += len(c)
            rejected = r.on_logits(firsts[b], lasts[b])
            if rejected:
                mask[b, start + len(c) - rejected : start + len(c)] = 0
                n_real[b] -= rejected
    return [r.text() for r in rows]


def _plain_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    stats: dict,
    should_stop=None,
) -> list[list[int]]:
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    device = _device(model)
    ids, mask = _left_pad(prompts, pad_id)  # (B, T)
    config = GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id
    )
    stopped = []

    class _Deadline(StoppingCriteria):  # asked after every generated token
        def __call__(self, input_ids, scores, **kwargs):
            if should_stop():
                stopped.append(True)
                return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    _check_stop(should_stop, stats)
    extra = {"stopping_criteria": StoppingCriteriaList([_Deadline()])} if should_stop is not None else {}
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config, **extra)
    if stopped:
        raise GenerationStopped(f"keyframe generation (plain) stopped after {out.shape[1] - ids.shape[1]} tokens")
    new = out[:, ids.shape[1] :].cpu()  # (B, N)
    stats["forward_calls"] += int(new.shape[1])
    answers = []
    for row in new.tolist():
        answers.append(row[: row.index(eos_id)] if eos_id in row else row)
    stats["fed_tokens"] += int(mask.sum()) + sum(len(a) for a in answers)
    return answers


def generate_keyframes(
    model: Any,
    tokenizer: Any,
    scripts: Sequence[Any],
    cfg: Any,
    *,
    mode: str = "constrained",
    max_new_tokens: int = 1024,
    batch_size: int = 16,
    stats: dict | None = None,
    should_stop=None,
) -> list[list[Any]]:
    """Generate every keyframe of every script (Algorithm 1) -> ``results[s][k - 1]``, a
    :class:`~.parsing.ParseResult` per keyframe. ``stats`` (a dict, optional) receives
    ``requests``, ``batches``, ``forward_calls`` and ``fed_tokens``. ``should_stop`` (optional, no
    arguments): asked before every forward call; True raises :class:`GenerationStopped`."""
    from facelab.families.keyframe_lm.data import end_of_turn_id, prompt_ids
    from facelab.families.keyframe_lm.parsing import parse_answer
    from facelab.families.keyframe_lm.prompts import build_messages

    if mode not in MODES:
        raise GenerationError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenerationError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    bad_limit = isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1
    if mode == "plain" and bad_limit:
        raise GenerationError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stats = {} if stats is None else stats
    for key in ("requests", "batches", "forward_calls", "fed_tokens"):
        stats.setdefault(key, 0)

    requests = [(s_i, k) for s_i, s in enumerate(scripts) for k in range(1, len(s.keyframes) + 1)]
    prompts = [prompt_ids(tokenizer, build_messages(scripts[s_i], k, cfg)) for s_i, k in requests]
    eos_id = end_of_turn_id(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    tables = _tables(tokenizer) if mode == "constrained" else None
    order = sorted(range(len(requests)), key=lambda i: (-len(prompts[i]), i))  # similar lengths together
    texts: list[str | None] = [None] * len(requests)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch_prompts = [prompts[i] for i in idx]
                if mode == "constrained":
                    programs = [
                        _program(tables, requests[i][1], len(scripts[requests[i][0]].keyframes), cfg) for i in idx
                    ]
                    outs = _constrained_batch(model, programs, batch_prompts, pad_id, stats, should_stop)
                else:
                    answers = _plain_batch(model, batch_prompts, pad_id, eos_id, max_new_tokens, stats, should_stop)
                    outs = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
                for i, text in zip(idx, outs):
                    texts[i] = text
                stats["batches"] += 1
    finally:
        model.train(was_training)
    stats["requests"] += len(requests)

    results: list[list[Any]] = [[] for _ in scripts]
    for (s_i, _k), text in zip(requests, texts):
        results[s_i].append(parse_answer(text, cfg))
    return results
