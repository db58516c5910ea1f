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
    numbers outside the channel's range (``[0, 1]`` blendshapes, ``[-1, 1]`` pose), clipped to it.
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


def _semantic(obj: Any, text: str) -> ParseResult:
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
    error = None
    if n_missing:
        first = next(c for c in CHANNELS if clean.get(c) is None)
        error = f"{n_missing} channel(s) missing or not finite numbers (first: {first})"
    return ParseResult(vec, n_missing == 0, n_missing, n_unknown, n_clipped, error, keyframe, text)


def _non_semantic(obj: Any, text: str) -> ParseResult:
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
        vec[i] = clipped
    problems = []
    if len(obj) != N_CHANNELS:
        problems.append(f"{len(obj)} values instead of {N_CHANNELS}")
    bad = sum(_float(v) is None for v in obj[:N_CHANNELS])
    if bad:
        problems.append(f"{bad} value(s) not finite numbers")
    error = "; ".join(problems) or None
    return ParseResult(vec.astype(np.float32), error is None, n_missing, n_unknown, n_clipped, error, None, text)


def parse_answer(text: Any, cfg: Any) -> ParseResult:
    """Parse one answer written in ``cfg.format`` (a :class:`~.prompts.PromptConfig`). Never raises."""
    try:
        if not isinstance(text, str):
            return _invalid(f"answer is {type(text).__name__}, not text", "")
        if getattr(cfg, "format", "semantic") == "non_semantic":
            return _non_semantic(extract_json(text, kind=list), text)
        return _semantic(extract_json(text, kind=dict), text)
    except Exception as exc:  # noqa: BLE001 -- a parser of model output must not take the caller down
        return _invalid(f"unparseable answer ({exc.__class__.__name__}: {exc})", text if isinstance(text, str) else "")
