"""KeyframeFace's first stage, Input Standardization (Wu et al. 2025, arXiv 2512.11321, §4.1): an
instruction-following LM rewrites a user's free text into a *script* -- a background, an emotion and
one to five keyframe descriptions -- which the user can edit before the keyframe LM (§4, Algorithm 1)
turns it into ARKit values.

Served as ``POST /v1/scripts`` beside ``POST /v1/keyframes`` (:mod:`facelab.serve.app`); the script
it returns is always a valid ``/v1/keyframes`` request (the route checks it with that request's own
schema, :func:`facelab.serve.schemas.validate_script`; this layer may not import the server's).

The instruction (:data:`INSTRUCTION`) is written here: the paper describes the stage but its prompt
text is not part of this project.

Schema-constrained decoding (:meth:`ScriptWriter.write`). The answer is always ::

    {"background":"B","emotion":"E","keyframes":["K1","K2",...]}

The punctuation between the strings is *forced* (fed to the model in one chunk, never sampled); only
the strings' contents and two decisions are sampled from the model, under a mask over its vocabulary:

* **string contents**: a token may be used inside a string when its text is non-empty, printable
  (``str.isprintable``: no newline, tab or other control character, and no space but U+0020), holds no
  ``"`` or ``\\`` (so a string never needs JSON escapes and can never end by accident) and no U+FFFD (a
  token that is a fragment of a UTF-8 character), and is not a special or added token. The first token
  of a string may not start with a space, and a string may end only after a character that is not a
  space -- so every string is non-blank with no surrounding spaces, what the keyframes request's
  ``NON_BLANK`` pattern asks. A string never exceeds its character bound (:class:`ScriptBounds`): a
  token that would cross it is masked, and a token ending in a space needs room for one more character
  after it. Every string is non-empty, so the ``min_length`` of the request holds too;
* **ending a string**: the first token of each piece of punctuation that may follow (``","emotion":"``
  after the background; after a keyframe ``","`` -- another keyframe, while fewer than
  ``max_keyframes`` are written -- or ``"]}`` -- the end) joins the candidates once the string may
  end; choosing it ends the string. Such a token starts with ``"``, which no content token holds, so
  the choice is never ambiguous; where two pieces share their first token, the model chooses among
  their next tokens the same way. A string at its bound can only end.

So the decoder can only emit the schema with 1 to ``max_keyframes`` keyframes, and it always
terminates: every content token adds at least one character, and the bounds are finite (at most
``sum(bounds) + punctuation`` forward calls after the prompt, each with the KV cache).

Sampling: softmax of the allowed tokens' logits at ``temperature`` (default 0.7; 0 is greedy), drawn
with a ``torch.Generator`` seeded with the request's seed -- the same seed, text and model give the
same script. (The constrained decoder of :mod:`.generate` is greedy over finite sets of number strings,
which does not fit free text; this module reuses its per-tokenizer vocabulary table, piece
tokenisation and stop check.)

Models (:func:`load_script_writer`): by default the tiny random-init Qwen3-architecture model of
:mod:`.tiny`, built here offline in a second -- **untrained: its scripts are well-formed but not
meaningful**, and every answer says so (``writer.tiny``, ``writer.note``). A real writer is named with
``facelab serve --script-writer NAME_OR_DIR`` (or ``script_writer:`` in the serve config): a local
Hugging Face model directory, or an id already in the local cache (the paper's Qwen, e.g.
``Qwen/Qwen3-4B-Instruct-2507``), loaded with ``local_files_only=True`` -- never downloaded.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

MAX_SCRIPT_KEYFRAMES = 5
"""The KeyframeFace scripts hold 1-5 keyframes (§3); :data:`facelab.serve.schemas.MAX_KEYFRAMES`."""

DEFAULT_TEMPERATURE = 0.7

TINY_NOTE = "untrained test model: the script is not meaningful"
"""``writer.note`` of the default tiny writer."""

INSTRUCTION = (
    "You prepare scripts for a facial animation model. The user describes, in their own words, a "
    "moment in which a person's face shows a feeling. Rewrite it as a script: a JSON object with "
    'exactly three keys. "background": one short sentence on the situation the person is in. '
    '"emotion": a few words naming the emotion, which may be mixed (for example "nervous but '
    'hopeful"). "keyframes": a list of 1 to {max_keyframes} short descriptions of the face at '
    "successive moments, in order; each says what the brows, eyes, mouth, jaw and head visibly do, "
    "not what the person thinks. Keep the user's meaning, add nothing they did not imply, and answer "
    "with the JSON object only."
)
"""The instruction of §4.1's standardization step, in this project's words (the system message)."""


class ScriptError(ValueError):
    """A written script that is not a valid keyframes request, or bad arguments to the writer."""


class ScriptWriterError(ValueError):
    """The configured script writer cannot be loaded (the message names the option)."""


REQUEST_CAPS = {"background": 2000, "emotion": 2000, "keyframe": 1000}
"""The keyframes request's character caps per string (``facelab.serve.schemas``: ``MAX_TEXT_CHARS``,
``MAX_DESCRIPTION_CHARS``; repeated here because this layer may not import the server's schemas, and
``tests/test_scripts.py`` checks that they agree)."""


@dataclass(frozen=True)
class ScriptBounds:
    """The most characters of each string the decoder writes (each at least 1). The defaults keep a
    whole script under ~800 characters, far within the keyframes request's caps (2,000 / 1,000)."""

    background: int = 160
    emotion: int = 48
    keyframe: int = 120

    def __post_init__(self) -> None:
        caps = REQUEST_CAPS
        bad = [
            f"{k} must be an integer in 1..{cap}, got {getattr(self, k)!r}"
            for k, cap in caps.items()
            if isinstance(getattr(self, k), bool)
            or not isinstance(getattr(self, k), int)
            or not 1 <= getattr(self, k) <= cap
        ]
        if bad:
            raise ScriptError("ScriptBounds: " + "; ".join(bad))

    def answer_chars(self, max_keyframes: int) -> int:
        """The most characters of string content an answer can hold."""
        return self.background + self.emotion + max_keyframes * self.keyframe


def _check_max_keyframes(max_keyframes: Any) -> int:
    if (
        isinstance(max_keyframes, bool)
        or not isinstance(max_keyframes, int)
        or not 1 <= max_keyframes <= MAX_SCRIPT_KEYFRAMES
    ):
        raise ScriptError(f"max_keyframes must be an integer in 1..{MAX_SCRIPT_KEYFRAMES}, got {max_keyframes!r}")
    return max_keyframes


def script_messages(text: str, max_keyframes: int = MAX_SCRIPT_KEYFRAMES) -> list[dict[str, str]]:
    """The chat request of §4.1: the instruction (system) and the user's free text (user)."""
    _check_max_keyframes(max_keyframes)
    return [
        {"role": "system", "content": INSTRUCTION.format(max_keyframes=max_keyframes)},
        {"role": "user", "content": text},
    ]


# --------------------------------------------------------------------------------------------
# The vocabulary mask
# --------------------------------------------------------------------------------------------


class _ContentVocab:
    """Per tokenizer, once: the tokens allowed inside a string, with their lengths and edge spaces."""

    def __init__(self, tokenizer: Any, vocab: list[str]):
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        keep = [
            (i, t)
            for i, t in enumerate(vocab)
            if i not in special and t and t.isprintable() and '"' not in t and "\\" not in t and "\ufffd" not in t
        ]
        if not keep:
            raise ScriptWriterError("the tokenizer has no token that can be written inside a JSON string")
        self.ids = torch.tensor([i for i, _ in keep], dtype=torch.long)  # (N,)
        self.texts = [t for _, t in keep]
        self.text_of = dict(keep)  # token id -> its text
        self.lens = torch.tensor([len(t) for t in self.texts], dtype=torch.long)  # (N,)
        self.lead = torch.tensor([t[0] == " " for t in self.texts])  # (N,) starts with a space
        self.trail = torch.tensor([t[-1] == " " for t in self.texts])  # (N,) ends with a space
        singles = {t for t in self.texts if len(t) == 1 and t != " "}
        if not singles:  # a string at room 1 after a space must still be able to end on a character
            raise ScriptWriterError("the tokenizer has no single-character token to end a JSON string with")

    def allowed(self, written: str, room: int) -> torch.Tensor:
        """Positions (into :attr:`ids`) of the tokens that may follow ``written`` with ``room`` characters left."""
        ok = self.lens <= room
        if not written:
            ok &= ~self.lead
        ok &= ~(self.trail & (self.lens >= room))  # a trailing space needs one more character after it
        return torch.nonzero(ok, as_tuple=False).flatten()


_VOCABS: dict[int, tuple[Any, _ContentVocab]] = {}
_VOCABS_LOCK = threading.Lock()


def _content_vocab(tokenizer: Any) -> _ContentVocab:
    from facelab.families.keyframe_lm.generate import _tables

    with _VOCABS_LOCK:
        hit = _VOCABS.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
        vocab = _ContentVocab(tokenizer, _tables(tokenizer).vocab)
        _VOCABS[id(tokenizer)] = (tokenizer, vocab)
        return vocab


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


def _prompt_ids(tokenizer: Any, text: str, max_keyframes: int) -> list[int]:
    """The request's token ids up to the assistant turn (the chat template, without a thinking block for
    models that have one); a tokenizer without a chat template gets the messages as plain text."""
    messages = script_messages(text, max_keyframes)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
    else:
        rendered = f"{messages[0]['content']}\n\nText: {text}\n\nJSON: "
    return list(tokenizer(rendered, add_special_tokens=False)["input_ids"])


class ScriptWriter:
    """A loaded causal LM that writes scripts (§4.1) with the schema-constrained decoder of this module."""

    def __init__(self, model: Any, tokenizer: Any, *, name: str, tiny: bool, note: str | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.tiny, self.note = name, bool(tiny), note
        self.bounds = ScriptBounds()
        self.temperature = DEFAULT_TEMPERATURE
        self._takes_keep = "logits_to_keep" in _forward_params(model)
        self._cache_arg = "cache" if "cache" in _forward_params(model) else "past_key_values"  # transformers 5: cache

    @property
    def info(self) -> dict:
        """What every answer says about the writer: ``{"model", "tiny", "note"}``."""
        return {"model": self.name, "tiny": self.tiny, "note": self.note}

    def _max_length(self) -> int:
        cfg = getattr(self.model, "config", None)
        n = int(getattr(cfg, "max_position_embeddings", 0) or 0)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < 10**7:
            n = min(n, tok_max) if n else tok_max
        return n or 4096

    def answer_tokens(self, max_keyframes: int = MAX_SCRIPT_KEYFRAMES) -> int:
        """The most tokens an answer can take: one per character of string content (every content token
        has at least one) plus the punctuation."""
        punct = sum(len(self._piece(p)) for p in ('{"background":"', '","emotion":"', '","keyframes":["', '"]}'))
        return self.bounds.answer_chars(max_keyframes) + punct + (max_keyframes - 1) * len(self._piece('","'))

    def prompt_tokens(self, request: dict) -> dict:
        """How long the request's prompt is against what the writer takes (the shape ``check_tokens`` of
        :mod:`facelab.serve.app` reads): ``{"prompt", "limit", "why", "fields": {"text": n}}``; the limit
        is the model's maximum length less the longest answer (:meth:`answer_tokens`)."""
        k = _check_max_keyframes(request.get("max_keyframes", MAX_SCRIPT_KEYFRAMES))
        text = request["text"]
        prompt = len(_prompt_ids(self.tokenizer, text, k))
        answer, total = self.answer_tokens(k), self._max_length()
        return {
            "prompt": prompt,
            "limit": total - answer,
            "why": f"the script writer's maximum length {total}, less {answer} answer tokens",
            "fields": {"text": len(self.tokenizer(text, add_special_tokens=False)["input_ids"])},
        }

    def _piece(self, text: str) -> tuple[int, ...]:
        from facelab.families.keyframe_lm.generate import _tables

        return _tables(self.tokenizer).piece(text)

    def write(
        self,
        text: str,
        *,
        max_keyframes: int = MAX_SCRIPT_KEYFRAMES,
        seed: int = 0,
        temperature: float | None = None,
        bounds: ScriptBounds | None = None,
        should_stop=None,
        stats: dict | None = None,
    ) -> dict:
        """The script of ``text`` (§4.1): ``{"background", "emotion", "keyframes": [1..max_keyframes]}``,
        checked by the route with :func:`facelab.serve.schemas.validate_script`. ``seed`` fixes the sampling; ``should_stop`` (optional, no
        arguments) is asked before every forward call and stops with
        :class:`~.generate.GenerationStopped` (a ``TimeoutError``). ``stats`` receives ``forward_calls``."""
        from facelab.families.keyframe_lm.generate import _check_stop, _device

        if not isinstance(text, str) or not text.strip():
            raise ScriptError("text must be a non-blank string")
        k_max = _check_max_keyframes(max_keyframes)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ScriptError(f"seed must be an integer >= 0, got {seed!r}")
        temp = self.temperature if temperature is None else temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not (math.isfinite(temp) and temp >= 0):
            raise ScriptError(f"temperature must be a number >= 0, got {temp!r}")
        b = bounds or self.bounds
        stats = {} if stats is None else stats
        stats.setdefault("forward_calls", 0)
        vocab = _content_vocab(self.tokenizer)
        gen = torch.Generator().manual_seed(int(seed) % 2**63)
        device = _device(self.model)

        # The answer as a list of strings; what follows string j is one of ``alternatives(j)``.
        fields = ["background", "emotion"] + [f"keyframes.{i}" for i in range(k_max)]
        limit = [b.background, b.emotion] + [b.keyframe] * k_max
        strings: list[str] = []

        def alternatives(j: int) -> list[tuple[tuple[int, ...], int | None]]:
            """(token ids of the piece, the next string's index or None = the end) after string ``j``."""
            if j == 0:
                return [(self._piece('","emotion":"'), 1)]
            if j == 1:
                return [(self._piece('","keyframes":["'), 2)]
            out = [(self._piece('"]}'), None)]
            if j + 1 < len(fields):
                out.insert(0, (self._piece('","'), j + 1))
            return out

        chunk = _prompt_ids(self.tokenizer, text, k_max) + list(self._piece('{"background":"'))
        cache = None
        j, written = 0, ""
        max_calls = sum(limit) + 16 * len(fields) + 8  # generous: never reached
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                while True:
                    if stats["forward_calls"] > max_calls:
                        raise ScriptError("script decoding did not terminate (bug)")
                    _check_stop(should_stop, stats)
                    logits, cache = self._forward(chunk, cache, device)
                    stats["forward_calls"] += 1
                    room = limit[j] - len(written)
                    pos = vocab.allowed(written, room)
                    content_ids = vocab.ids[pos]
                    may_end = bool(written) and written[-1] != " "
                    alts = alternatives(j) if may_end else []
                    ends = sorted({a[0][0] for a in alts})
                    cand = torch.cat([content_ids, torch.tensor(ends, dtype=torch.long)])  # (C,)
                    if cand.numel() == 0:
                        raise ScriptError(f"no token can continue the script's {fields[j]} (tokenizer problem)")
                    t = int(cand[_sample(logits[cand], temp, gen)])
                    if t not in ends:  # a content token: the string goes on
                        written += vocab.text_of[t]
                        chunk = [t]
                        continue
                    # The string ends; the model chooses among the pieces that start with ``t``.
                    alts = [a for a in alts if a[0][0] == t]
                    fed, depth = [t], 1
                    while len(alts) > 1:
                        _check_stop(should_stop, stats)
                        logits, cache = self._forward(fed, cache, device)
                        stats["forward_calls"] += 1
                        nexts = torch.tensor(sorted({a[0][depth] for a in alts}), dtype=torch.long)
                        u = int(nexts[_sample(logits[nexts], temp, gen)])
                        alts = [a for a in alts if a[0][depth] == u]
                        fed, depth = [u], depth + 1
                    ((piece, nxt),) = alts
                    strings.append(written)
                    if nxt is None:
                        break
                    chunk = fed + list(piece[depth:])
                    j, written = nxt, ""
        finally:
            self.model.train(was_training)

        return {"background": strings[0], "emotion": strings[1], "keyframes": strings[2:]}

    def _forward(self, ids: list[int], cache: Any, device) -> tuple[torch.Tensor, Any]:
        """One forward call feeding ``ids`` after ``cache``: (the last position's logits (V,), the cache)."""
        x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, L)
        extra = {"logits_to_keep": 1} if self._takes_keep else {}
        out = self.model(input_ids=x, use_cache=True, **{self._cache_arg: cache}, **extra)
        return out.logits[0, -1].float().cpu(), getattr(out, self._cache_arg)


def _forward_params(model: Any) -> frozenset[str]:
    import inspect

    try:
        return frozenset(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> int:
    """An index into ``logits`` (C,): the argmax at temperature 0, else a draw from softmax(logits / T)."""
    if temperature == 0:
        return int(torch.argmax(logits))
    p = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(p, 1, generator=gen))


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

TINY_CORPUS = (
    INSTRUCTION,
    "A student waits outside the interview room, nervous but hopeful.",
    "She reads the letter, her brows rise, then a slow smile spreads and her eyes fill with tears.",
    "He hears the door slam, flinches, his jaw clenches and he narrows his eyes in anger.",
    '{"background":"A quiet office late at night.","emotion":"furious","keyframes":["narrows the eyes",'
    '"bares the teeth, jaw clenched"]}',
)
"""What the default tiny writer's tokenizer is trained on (besides :mod:`.tiny`'s fixed corpus)."""


@functools.lru_cache(maxsize=1)
def tiny_script_writer() -> ScriptWriter:
    """The default writer: :mod:`.tiny`'s random-init Qwen3-architecture model, built offline in a
    temporary directory (seeded: the same weights every time) and loaded from it. Untrained: its scripts
    are well-formed, not meaningful (``tiny=True``, :data:`TINY_NOTE`)."""
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from facelab.families.keyframe_lm.tiny import LABEL, build_tiny_lm

    with tempfile.TemporaryDirectory(prefix="facelab-script-writer-") as d:
        out = Path(d) / "tiny"
        build_tiny_lm(out, TINY_CORPUS, vocab_size=1024, seed=0, embedding_std=0.02)
        tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    return ScriptWriter(model, tokenizer, name=f"tiny ({LABEL})", tiny=True, note=TINY_NOTE)


OPTION = "--script-writer (serve config: script_writer)"


def _cannot_load(name: str, path: str, exc: BaseException) -> ScriptWriterError:
    hint = (
        f"`hf download {name}` fetches it into the local cache first"
        if "/" in name and not Path(path).exists()
        else "give a model directory or a Hugging Face id already in the local cache"
    )
    return ScriptWriterError(
        f"{OPTION} {name!r}: cannot load it offline ({exc.__class__.__name__}: {str(exc)[:300]}); models are "
        f"never downloaded: {hint}; leave the option out for the tiny test writer"
    )


def check_script_writer(name: str | None, root: Path | None = None) -> None:
    """Before anything starts: the configured writer's config and tokenizer load offline, or
    :class:`ScriptWriterError` naming the option (the weights are loaded by the replicas)."""
    if name is None:
        return
    from transformers import AutoConfig, AutoTokenizer

    from facelab.families.keyframe_lm.servable import resolve_base_model

    if not isinstance(name, str) or not name.strip():
        raise ScriptWriterError(f"{OPTION}: give a model directory or a Hugging Face id, got {name!r}")
    path = resolve_base_model(name, root)
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
        AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise _cannot_load(name, path, exc) from None


def load_script_writer(name: str | None = None, root: Path | None = None, device: str = "cpu") -> ScriptWriter:
    """The script writer named ``name`` (a model directory, relative to ``root`` or absolute, or a
    Hugging Face id in the local cache; offline only), or the tiny default when ``name`` is None.
    :class:`ScriptWriterError` naming the option when it cannot be loaded."""
    if name is None:
        return tiny_script_writer()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from facelab.families.keyframe_lm.servable import _dtype, resolve_base_model
    from facelab.families.keyframe_lm.tiny import LABEL

    check_script_writer(name, root)
    path = resolve_base_model(name, root)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_dtype("auto", device))
    except (OSError, ValueError, KeyError) as exc:
        raise _cannot_load(name, path, exc) from None
    model.to(device)
    try:
        _content_vocab(tokenizer)
    except ScriptWriterError as exc:
        raise ScriptWriterError(f"{OPTION} {name!r}: {exc}") from None
    tiny = getattr(model.config, "facelab_label", None) == LABEL
    return ScriptWriter(model, tokenizer, name=name, tiny=tiny, note=TINY_NOTE if tiny else None)


def script_writer(name: str | None = None, root: Path | None = None, device: str = "cpu", *, check_only=False):
    """This family's ``Family.script_writer`` hook: :func:`check_script_writer` (``check_only``) or
    :func:`load_script_writer`."""
    if check_only:
        return check_script_writer(name, root)
    return load_script_writer(name, root, device)
