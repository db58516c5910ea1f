"""Model answers back to ARKit vectors. Never raises: bad output is a result with ``valid=False``.

The release's converter (``jsonl2csv.py``) takes the last balanced JSON object of a response and
accepts either a bare ``{name: value}`` mapping or a ``{"Keyframe_x": {...}}`` wrapper; missing names
become 0. :func:`parse_answer` does the same for the semantic format (KeyframeFace, Wu et al. 2025,
§4) and reads a 61-number list for the non-semantic one (§5.1), and counts what went wrong:

``valid``
    a JSON value of the right shape was found and every one of the 61 channels has a finite number.
    Unknown names (ignored) and clipped values do not make an answer invalid; they are counted.
``n_missing``
    channels without a usable value (absent, not a number, bool, null, NaN, +-inf, or beyond the
    float range such as ``1e400``); they are set to 0.
``n_unknown``
    names that are not ARKit channels (semantic), or list entries after the 61st (non-semantic --
    a longer list is invalid because the alignment of its values is unknown).
``n_clipped``
    numbers outside the channel's range (``[0, 1]`` blendshapes, ``[-1, 1]`` pose), clipped to it
    (``clip=False`` counts them but keeps the numbers as written).

What the *metrics* score (:func:`score_answer`, ``eval.parse``) follows the paper's pipeline by
default: the release's converter (``release``: :func:`release_mapping` on :func:`release_object`;
an answer it cannot read is dropped from the metrics, as ``jsonl2csv.py`` skips its line) with the
values as the model wrote them, never clipped. ``facelab`` scores :func:`parse_answer`'s reading
instead (an unreadable answer as the zero keyframe), also unclipped.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from facelab.tasks.keyframes.answer import ParseResult  # noqa: F401 - re-exported: the parser's result type

_MAX_CHARS = 1_000_000  # only the tail of a longer text is searched
_MAX_FAILED_STARTS = 4096  # bound on failed decode attempts (pathological "[[[[..." inputs)
_WRAPPER = re.compile(r"^keyframe[_ ]?([a-z]+|\d+)$", re.IGNORECASE)


def _nan(_constant: str) -> float:
    return float("nan")


_DECODER = json.JSONDecoder(parse_int=float, parse_constant=_nan)  # ints as floats: no huge-int overflow


def extract_json(text: Any, *, kind: type | None = None) -> Any:
    """The last top-level JSON object or array in ``text`` (``None`` if there is none).

    Scans left to right: at every ``{`` / ``[`` not inside an already decoded value, try to decode a
    JSON value; the last one decoded wins (the release picks the last balanced object the same way,
    without being fooled by braces inside strings here). ``kind=dict`` / ``kind=list`` only tries
    objects / arrays -- also ones nested in a value of the other kind, so ``[{"Keyframe_one": ...}]``
    still yields the object. Integers decode as floats; ``NaN``/``Infinity`` as float NaN/inf.
    """
    if not isinstance(text, str):
        return None
    text = text[-_MAX_CHARS:]
    openers = "{" if kind is dict else "[" if kind is list else "{["
    found, pos, failures = None, 0, 0
    while failures < _MAX_FAILED_STARTS:
        starts = [i for i in (text.find(c, pos) for c in openers) if i >= 0]
        if not starts:
            break
        start = min(starts)
        try:
            obj, end = _DECODER.raw_decode(text, start)
        except (ValueError, RecursionError):
            failures += 1
            pos = start + 1
            continue
        if kind is None or isinstance(obj, kind):
            found = obj
        pos = end
    return found


def _float(value: Any) -> float | None:
    """A finite float, or None for anything else (bools, strings, null, NaN, inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        x = float(value)
    except OverflowError:
        return None
    return x if math.isfinite(x) else None


def _finite32(values) -> np.ndarray:
    """float32 ``(61,)`` of finite float64 numbers; one beyond float32's range (|x| > 3.4e38) is 0."""
    with np.errstate(over="ignore", invalid="ignore"):
        v = np.asarray(values, dtype=np.float64).astype(np.float32)
    return np.where(np.isfinite(v), v, np.float32(0.0)).astype(np.float32)


def _wrapper_number(key: str) -> int | None:
    from facelab.data.keyframeface import NUMBER_WORDS

    m = _WRAPPER.match(key.strip())
    if not m:
        return None
    token = m.group(1).lower()
    if token.isdigit():
        return int(token) if len(token) < 6 else None
    words = [w.lower() for w in NUMBER_WORDS]
    return words.index(token) + 1 if token in words else None


def _invalid(error: str, text: str, n_missing: int = 61) -> ParseResult:
    return ParseResult(np.zeros(61, dtype=np.float32), False, n_missing, 0, 0, error, None, text)


def _semantic(obj: Any, text: str, clip: bool = True) -> ParseResult:
    from facelab.data.arkit import CHANNELS, INDEX, parse_mapping

    if not isinstance(obj, dict):
        return _invalid("no JSON object in the answer", text)
    keyframe = None
    mapping = obj
    if not any(name in INDEX for name in obj):
        wrapped = [(k, v) for k, v in obj.items() if isinstance(v, dict) and _WRAPPER.match(k.strip())]
        if not wrapped:
            return _invalid('no ARKit names and no {"Keyframe_x": {...}} object in the answer', text)
        key, mapping = wrapped[0]
        keyframe = _wrapper_number(key)
    clean = {name: _float(value) for name, value in mapping.items()}  # None -> counted as missing
    vec, n_missing, n_unknown, n_clipped = parse_mapping(clean)
    if not clip:  # the numbers as written (parse_mapping clipped them)
        vec = _finite32([clean.get(c) or 0.0 for c in CHANNELS])
    error = None
    if n_missing:
        first = next(c for c in CHANNELS if clean.get(c) is None)
        error = f"{n_missing} channel(s) missing or not finite numbers (first: {first})"
    return ParseResult(vec, n_missing == 0, n_missing, n_unknown, n_clipped, error, keyframe, text)


def _non_semantic(obj: Any, text: str, clip: bool = True) -> ParseResult:
    from facelab.data.arkit import HIGH, LOW, N_CHANNELS

    if not isinstance(obj, list):
        return _invalid("no JSON array in the answer", text)
    vec = np.zeros(N_CHANNELS, dtype=np.float64)
    n_missing = max(0, N_CHANNELS - len(obj))
    n_unknown = max(0, len(obj) - N_CHANNELS)
    n_clipped = 0
    for i, value in enumerate(obj[:N_CHANNELS]):
        x = _float(value)
        if x is None:
            n_missing += 1
            continue
        clipped = min(max(x, float(LOW[i])), float(HIGH[i]))
        n_clipped += clipped != x
        vec[i] = clipped if clip else x
    problems = []
    if len(obj) != N_CHANNELS:
        problems.append(f"{len(obj)} values instead of {N_CHANNELS}")
    bad = sum(_float(v) is None for v in obj[:N_CHANNELS])
    if bad:
        problems.append(f"{bad} value(s) not finite numbers")
    error = "; ".join(problems) or None
    out = vec.astype(np.float32) if clip else _finite32(vec)
    return ParseResult(out, error is None, n_missing, n_unknown, n_clipped, error, None, text)


def parse_answer(text: Any, cfg: Any, *, clip: bool = True) -> ParseResult:
    """Parse one answer written in ``cfg.format`` (a :class:`~.prompts.PromptConfig`). Never raises.

    ``clip=False``: out-of-range numbers are kept as written (still counted in ``n_clipped``); the
    result's ``values`` are then not necessarily in range (what the metrics score, never a server)."""
    try:
        if not isinstance(text, str):
            return _invalid(f"answer is {type(text).__name__}, not text", "")
        if getattr(cfg, "format", "semantic") == "non_semantic":
            return _non_semantic(extract_json(text, kind=list), text, clip)
        return _semantic(extract_json(text, kind=dict), text, clip)
    except Exception as exc:  # noqa: BLE001 -- a parser of model output must not take the caller down
        return _invalid(f"unparseable answer ({exc.__class__.__name__}: {exc})", text if isinstance(text, str) else "")


# --------------------------------------------------------------------------------------------
# What the metrics score (eval.parse)
# --------------------------------------------------------------------------------------------

PARSE_MODES = ("release", "facelab")
"""``eval.parse``: ``release`` = the release's converter, unreadable answers dropped (the paper's
pipeline); ``facelab`` = :func:`parse_answer`, unreadable answers scored as zeros. Both unclipped."""


def release_object(text: Any) -> Any:
    """The JSON value the release's converter (``jsonl2csv.py``, ``extract_json``) reads from a response.

    It looks only at the *last* ``}`` of the text, walks back counting braces character by character
    (braces inside strings count too) to the ``{`` that balances it, and decodes that slice; anything
    else -- no ``}``, no balancing ``{``, a slice that is not JSON -- is ``None`` (no earlier object is
    tried). Never raises."""
    if not isinstance(text, str):
        return None
    end = text.rfind("}")
    depth = 0
    for i in range(end, -1, -1):
        if text[i] == "}":
            depth += 1
        elif text[i] == "{":
            depth -= 1
            if depth == 0:
                try:
                    return json.loads(text[i : end + 1])
                except (ValueError, RecursionError):
                    return None
    return None


def release_mapping(obj: Any) -> dict | None:
    """The ARKit mapping the release's converter (``extract_arkit``) takes from a decoded object: the
    object itself when it names all 61 channels, else the value of its first key that starts with
    ``keyframe_`` (any case) and holds an object, else ``None`` -- a partial bare mapping is refused."""
    from facelab.data.arkit import CHANNELS

    if not isinstance(obj, dict):
        return None
    if all(name in obj for name in CHANNELS):
        return obj
    for key, value in obj.items():
        if key.lower().startswith("keyframe_") and isinstance(value, dict):
            return value
    return None


def score_answer(text: Any, cfg: Any, mode: str = "release") -> tuple[np.ndarray | None, bool]:
    """``(values, valid)`` of one answer for the metrics: float32 ``(61,)`` values as the model wrote
    them (never clipped), or ``None`` when the answer is dropped from the metrics.

    ``release`` (the paper's, ``jsonl2csv.py``): semantic answers through :func:`release_object` and
    :func:`release_mapping`; a channel the mapping lacks is 0 (``params.get(key, 0.0)``), and so is a
    value that is not a finite number (the converter would write it into the CSV as it is; here it
    cannot be scored, nor one beyond float32's range); an answer with no mapping is dropped (``None``, ``valid=False``), as the
    converter prints ``cannot parse ARKit parameters`` and skips the line. The release has no
    non-semantic converter: the last JSON array (:func:`extract_json`) of exactly 61 entries is read
    the same way (non-numbers are 0), any other answer is dropped. ``valid``: the answer was scored.

    ``facelab``: :func:`parse_answer` with ``clip=False``; nothing is dropped (an unreadable answer
    is the zero keyframe), ``valid`` is its ``valid`` (all 61 channels present and numbers)."""
    from facelab.data.arkit import CHANNELS, N_CHANNELS

    if mode not in PARSE_MODES:
        raise ValueError(f"parse mode must be one of {PARSE_MODES}, got {mode!r}")
    if mode == "facelab":
        r = parse_answer(text, cfg, clip=False)
        return r.values, r.valid
    try:
        if getattr(cfg, "format", "semantic") == "non_semantic":
            obj = extract_json(text, kind=list)
            if not isinstance(obj, list) or len(obj) != N_CHANNELS:
                return None, False
            values = [_float(v) for v in obj]
        else:
            mapping = release_mapping(release_object(text))
            if mapping is None:
                return None, False
            values = [_float(mapping.get(name, 0.0)) for name in CHANNELS]
    except Exception:  # noqa: BLE001 -- model output must not take the caller down: unreadable = dropped
        return None, False
    return _finite32([0.0 if v is None else v for v in values]), True
