"""KeyframeFace on disk: scripts of ARKit keyframes, the platform's split format, release importers.

KeyframeFace (Wu et al., "KeyframeFace: From Text to Expressive Facial Keyframes", 2025,
arXiv 2512.11321, dataset section) pairs 2,100 performance *scripts* with ARKit coefficients. A
script has a contextual background, a (complex) emotion and 1 to 5 manually chosen keyframes;
every keyframe has one 61-channel ARKit vector (:mod:`facelab.data.arkit`) and descriptions from
the paper's three annotation perspectives, named here as in :data:`ANNOTATIONS`:

``original``  the manual keyframe description written with the script;
``arkit``     an LLM's description of the keyframe's ARKit coefficients;
``image``     a multimodal LLM's description of the rendered keyframe image.

The release ships its model's inference format: chat requests (``example.jsonl``, one request per
keyframe, the whole script in the user message) and answers (``example_result.jsonl``,
``{"response": "{\\"Keyframe_one\\": {61 named values}}"}``), plus the Live Link Face CSV
(``example_result.csv``). :func:`import_chat_jsonl` and :func:`import_llf_csv` turn those into
:class:`Script` objects.

The platform's format, one directory per dataset:

``meta.json``
    ``{"format": "facelab-keyframeface/1", "channels": [61 names], "splits": {"train": n, ...},
    "annotations": [types present], ...}`` plus the writer's ``extra_meta`` (provenance).
``train.jsonl``, ``val.jsonl``, ``test.jsonl``
    One script per line: ``{"actor", "background", "emotion", "keyframes": [{"descriptions":
    {...}, "index": 1, "values": [61 floats]}], "script_id"}``.

Files are byte-stable: sorted keys, compact separators, UTF-8, values rounded to 4 decimals,
``"\\n"`` line endings; :func:`write_dataset` writes a whole directory atomically. Every reader
validates and raises :class:`DataError` naming ``file:line`` (1-based) and the field at fault.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facelab.data import emoava
from facelab.data.arkit import CHANNELS, HIGH, LOW, N_CHANNELS, ArkitError, read_llf_csv, vector_from_mapping

FORMAT = "facelab-keyframeface/1"
"""Value of ``meta.json``'s ``format``; bump the suffix when the line schema changes."""

ANNOTATIONS = ("original", "arkit", "image")
"""The paper's three annotation types (manual; LLM from ARKit coefficients; MLLM from the image)."""

SPLITS = ("train", "val", "test")
"""Split names; one ``{split}.jsonl`` each."""

META_FILE = "meta.json"
MAX_KEYFRAMES = 5
"""Keyframes per script: 1 to 5 in the release (mostly 2-3)."""

NUMBER_WORDS = ("One", "Two", "Three", "Four", "Five")
"""How the release numbers keyframes in prompts ("Keyframe Two") and answers ("Keyframe_two")."""

ACTIVE_THRESHOLD = 0.05
"""A channel counts as active in summaries when ``|value| >= 0.05`` (release values have 1-2 decimals)."""

_RESERVED_META = ("format", "channels", "splits", "annotations")
_SCRIPT_KEYS = {"script_id", "actor", "background", "emotion", "keyframes"}
_KEYFRAME_KEYS = {"index", "descriptions", "values"}


class DataError(emoava.DataError):
    """KeyframeFace file missing, unreadable or invalid; the message names file:line and the field."""


def _pre(where: str) -> str:
    return f"{where}: " if where else ""


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def _check_values(values: Any, where: str) -> np.ndarray:
    """float32 (61,) copy of ``values``; DataError naming the channel if not finite / in range."""
    if isinstance(values, np.ndarray):
        arr = values
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise DataError(f"{where}: expected {N_CHANNELS} numbers, got dtype {arr.dtype}")
    else:
        if not isinstance(values, (list, tuple)):
            raise DataError(f"{where}: expected a list of {N_CHANNELS} numbers, got {type(values).__name__}")
        for i, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                name = f" ({CHANNELS[i]})" if i < N_CHANNELS else ""
                raise DataError(f"{where}[{i}]{name}: expected a number, got {type(v).__name__} {v!r}")
        arr = np.asarray(values, dtype=np.float64)
    if arr.shape != (N_CHANNELS,):
        raise DataError(f"{where}: expected {N_CHANNELS} channel values, got shape {arr.shape}")
    arr64 = arr.astype(np.float64)
    bad = ~np.isfinite(arr64)
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"{where}[{i}] ({CHANNELS[i]}): non-finite value {float(arr64[i])!r}")
    out = (arr64 < LOW) | (arr64 > HIGH)
    if out.any():
        i = int(np.argmax(out))
        raise DataError(
            f"{where}[{i}] ({CHANNELS[i]}) = {float(arr64[i])!r} is out of range [{float(LOW[i])}, {float(HIGH[i])}]"
        )
    vec = arr.astype(np.float32, copy=True)
    vec.setflags(write=False)
    return vec


def _check_descriptions(desc: Any, where: str) -> dict[str, str]:
    if not isinstance(desc, Mapping):
        raise DataError(f"{where}: expected an object {{annotation: text}}, got {type(desc).__name__}")
    for key, text in desc.items():
        if key not in ANNOTATIONS:
            raise DataError(f"{where}: unknown annotation {key!r}, expected one of {ANNOTATIONS}")
        if not isinstance(text, str):
            raise DataError(f"{where}.{key}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise DataError(f"{where}.{key}: empty text")
    if "original" not in desc:
        raise DataError(f"{where}: missing the 'original' description")
    return {key: desc[key] for key in ANNOTATIONS if key in desc}


@dataclass(frozen=True, eq=False)
class Keyframe:
    """One keyframe of a script.

    ``index`` is 1-based; ``descriptions`` maps annotation types (a subset of :data:`ANNOTATIONS`
    that holds ``"original"``) to non-empty texts; ``values`` is the float32 ``(61,)`` ARKit vector
    (copied and made read-only). Equality compares values exactly.
    """

    index: int
    descriptions: dict[str, str]
    values: np.ndarray  # float32 (61,)

    def __post_init__(self) -> None:
        where = f"keyframe {self.index!r}"
        if isinstance(self.index, bool) or not isinstance(self.index, (int, np.integer)) or self.index < 1:
            raise DataError(f"{where}: index must be an integer >= 1")
        object.__setattr__(self, "index", int(self.index))
        object.__setattr__(self, "descriptions", _check_descriptions(self.descriptions, f"{where}: descriptions"))
        object.__setattr__(self, "values", _check_values(self.values, f"{where}: values"))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Keyframe):
            return NotImplemented
        return (
            self.index == other.index
            and self.descriptions == other.descriptions
            and bool(np.array_equal(self.values, other.values))
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Script:
    """A performance script: ``background`` and ``emotion`` (texts, may be empty), and 1 to 5
    :class:`Keyframe` with indices ``1..K`` in order. ``script_id`` and ``actor`` are non-empty."""

    script_id: str
    actor: str
    background: str
    emotion: str
    keyframes: tuple[Keyframe, ...]

    def __post_init__(self) -> None:
        where = f"script {self.script_id!r}"
        for name in ("script_id", "actor"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: {name} must be a non-empty string, got {value!r}")
        for name in ("background", "emotion"):
            if not isinstance(getattr(self, name), str):
                raise DataError(f"{where}: {name} must be a string, got {type(getattr(self, name)).__name__}")
        kfs = tuple(self.keyframes)
        if not 1 <= len(kfs) <= MAX_KEYFRAMES:
            raise DataError(f"{where}: keyframes: expected 1 to {MAX_KEYFRAMES} keyframes, got {len(kfs)}")
        for pos, kf in enumerate(kfs, start=1):
            if not isinstance(kf, Keyframe):
                raise DataError(f"{where}: keyframes[{pos - 1}] is {type(kf).__name__}, expected Keyframe")
            if kf.index != pos:
                raise DataError(
                    f"{where}: keyframes[{pos - 1}].index is {kf.index}, expected {pos} (indices must be 1..K in order)"
                )
        object.__setattr__(self, "keyframes", kfs)

    @property
    def values(self) -> np.ndarray:
        """All keyframe vectors stacked, float32 ``(K, 61)``."""
        return np.stack([kf.values for kf in self.keyframes])  # (K, 61)


def keyframe_text(script: Script, k: int, annotation: str = "original") -> str:
    """The text the evaluator (App. C) embeds for keyframe ``k`` (1-based): ``f"{emotion} {description}"``.

    The paper's evaluator pairs a keyframe's text with its ARKit vector. We include the script's
    emotion (it shapes every keyframe's intensity) and **exclude the background**: it describes the
    scene, not the face, is identical for all keyframes of a script (so it cannot tell them apart
    in R-Precision batches), and would use up the text encoder's token budget (64 tokens by
    default) before the description. Parts are stripped and joined by one space.
    """
    if annotation not in ANNOTATIONS:
        raise DataError(f"annotation must be one of {ANNOTATIONS}, got {annotation!r}")
    if not 1 <= k <= len(script.keyframes):
        raise DataError(f"script {script.script_id!r}: keyframe {k} out of range 1..{len(script.keyframes)}")
    desc = script.keyframes[k - 1].descriptions.get(annotation)
    if desc is None:
        raise DataError(f"script {script.script_id!r}: keyframe {k} has no {annotation!r} description")
    return " ".join(p for p in (script.emotion.strip(), desc.strip()) if p)


# --------------------------------------------------------------------------------------------
# JSON lines <-> scripts
# --------------------------------------------------------------------------------------------


def _round4(values: np.ndarray) -> list[float]:
    # float32 -> float64 -> 4 decimals; "+ 0.0" turns -0.0 into 0.0 so equal values give equal bytes
    return [round(float(v), 4) + 0.0 for v in values]


def script_to_json(script: Script) -> dict:
    """The JSON object of one line (values rounded to 4 decimals)."""
    return {
        "script_id": script.script_id,
        "actor": script.actor,
        "background": script.background,
        "emotion": script.emotion,
        "keyframes": [
            {"index": kf.index, "descriptions": dict(kf.descriptions), "values": _round4(kf.values)}
            for kf in script.keyframes
        ],
    }


def _dumps_line(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _check_fields(obj: dict, expected: set[str], where: str) -> None:
    """The object holds exactly ``expected``: the first missing, else the first unknown field is named."""
    missing, extra = sorted(expected - obj.keys()), sorted(obj.keys() - expected)
    if missing:
        raise DataError(f"{where}: missing field {missing[0]!r}")
    if extra:
        raise DataError(f"{where}: unknown field {extra[0]!r}")


def script_from_json(obj: Any, where: str) -> Script:
    """Validate one parsed line and build the :class:`Script`; errors are prefixed with ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    _check_fields(obj, _SCRIPT_KEYS, where)
    for name in ("script_id", "actor", "background", "emotion"):
        if not isinstance(obj[name], str):
            raise DataError(f"{where}: field {name!r} must be a string, got {type(obj[name]).__name__}")
    for name in ("script_id", "actor"):
        if not obj[name].strip():
            raise DataError(f"{where}: field {name!r} is empty")
    kfs = obj["keyframes"]
    if not isinstance(kfs, list):
        raise DataError(f"{where}: field 'keyframes' must be a list, got {type(kfs).__name__}")
    if not 1 <= len(kfs) <= MAX_KEYFRAMES:
        raise DataError(f"{where}: field 'keyframes': expected 1 to {MAX_KEYFRAMES} keyframes, got {len(kfs)}")
    keyframes = []
    for pos, kf in enumerate(kfs):
        at = f"{where}: keyframes[{pos}]"
        if not isinstance(kf, dict):
            raise DataError(f"{at}: expected an object, got {type(kf).__name__}")
        _check_fields(kf, _KEYFRAME_KEYS, at)
        index = kf["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index != pos + 1:
            raise DataError(f"{at}.index is {index!r}, expected {pos + 1} (indices must be 1..K in order)")
        desc = _check_descriptions(kf["descriptions"], f"{at}.descriptions")
        values = _check_values(kf["values"], f"{at}.values")
        keyframes.append(Keyframe(index=index, descriptions=desc, values=values))
    return Script(
        script_id=obj["script_id"],
        actor=obj["actor"],
        background=obj["background"],
        emotion=obj["emotion"],
        keyframes=tuple(keyframes),
    )


def _read_jsonl(path: Path) -> list[tuple[int, Any]]:
    """``(line number, parsed object)`` for every non-blank line; DataError names file:line."""
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None
    out = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    return out


# --------------------------------------------------------------------------------------------
# Dataset directories
# --------------------------------------------------------------------------------------------


def _active_channels(values: np.ndarray) -> int:
    return int((np.abs(values) >= ACTIVE_THRESHOLD).sum())


def summarize_scripts(scripts: Sequence[Script]) -> dict:
    """Counts of a list of scripts: scripts, keyframes, keyframes-per-script histogram (keys
    ``"1"``..``"5"``), mean keyframes per script, mean active channels per keyframe
    (``|v| >= ACTIVE_THRESHOLD``), keyframes per annotation type, mean words per annotation, actors."""
    hist = {str(k): 0 for k in range(1, MAX_KEYFRAMES + 1)}
    n_kf = active = 0
    ann_count = {a: 0 for a in ANNOTATIONS}
    ann_words = {a: 0 for a in ANNOTATIONS}
    for s in scripts:
        hist[str(len(s.keyframes))] += 1
        for kf in s.keyframes:
            n_kf += 1
            active += _active_channels(kf.values)
            for a, text in kf.descriptions.items():
                ann_count[a] += 1
                ann_words[a] += len(text.split())
    n = len(scripts)
    return {
        "scripts": n,
        "keyframes": n_kf,
        "keyframes_per_script": hist,
        "mean_keyframes": round(n_kf / n, 4) if n else 0.0,
        "mean_active_channels": round(active / n_kf, 4) if n_kf else 0.0,
        "annotations": {a: c for a, c in ann_count.items() if c},
        "mean_words": {a: round(ann_words[a] / c, 4) for a, c in ann_count.items() if c},
        "actors": len({s.actor for s in scripts}),
    }


def summarize(splits: Mapping[str, Sequence[Script]]) -> dict:
    """``{"format", "splits": {name: summarize_scripts}, "total": summarize_scripts(all)}``."""
    return {
        "format": FORMAT,
        "splits": {name: summarize_scripts(scripts) for name, scripts in splits.items()},
        "total": summarize_scripts([s for scripts in splits.values() for s in scripts]),
    }


def _check_splits(splits: Any, where: str) -> dict[str, list[Script]]:
    if not isinstance(splits, Mapping) or not splits:
        raise DataError(f"{where}: splits must be a non-empty mapping of {SPLITS} to lists of scripts")
    seen: dict[str, str] = {}
    out: dict[str, list[Script]] = {}
    for name in splits:
        if name not in SPLITS:
            raise DataError(f"{where}: unknown split {name!r}, expected one of {SPLITS}")
    for name in SPLITS:  # canonical order
        if name not in splits:
            continue
        scripts = list(splits[name])
        for i, s in enumerate(scripts):
            if not isinstance(s, Script):
                raise DataError(f"{where}: {name}[{i}] is {type(s).__name__}, expected Script")
            if s.script_id in seen:
                raise DataError(f"{where}: duplicate script_id {s.script_id!r} in {seen[s.script_id]} and {name}[{i}]")
            seen[s.script_id] = f"{name}[{i}]"
        out[name] = scripts
    return out


def is_keyframeface_dir(data_dir: str | os.PathLike) -> bool:
    """Whether ``data_dir`` holds a dataset :func:`write_dataset` wrote (``meta.json`` of :data:`FORMAT`)."""
    meta = emoava.json_object_or_none(Path(data_dir) / META_FILE)
    return meta is not None and meta.get("format") == FORMAT


def claim_output(out_dir: str | os.PathLike, force: bool = False) -> None:
    """Refuse ``out_dir`` unless it is absent, empty or a KeyframeFace dataset written here, or ``force``
    (:func:`facelab.data.emoava.claim_output_dir`): :func:`write_dataset` replaces the whole directory."""
    try:
        emoava.claim_output_dir(
            Path(out_dir),
            owned=is_keyframeface_dir,
            what="a KeyframeFace dataset",
            marker=f"{META_FILE} with format {FORMAT!r}",
            force=force,
        )
    except emoava.DataError as exc:  # this module's error type, as every other KeyframeFace refusal
        raise DataError(str(exc)) from None


def write_dataset(
    out_dir: str | os.PathLike,
    splits: Mapping[str, Sequence[Script]],
    extra_meta: Mapping[str, Any] | None = None,
    *,
    force: bool = False,
) -> dict:
    """Write ``splits`` ({"train": [...], "val": [...], "test": [...]}, any non-empty subset) and
    ``meta.json`` to ``out_dir``, atomically; return :func:`summarize` of what was written.

    Everything goes to a temporary sibling directory first, is read back and validated
    (:func:`validate_dir`), and only then renamed to ``out_dir``, so a crash never leaves a
    half-written dataset. An existing ``out_dir`` is replaced only when it is empty or a dataset
    written here (its ``meta.json`` of :data:`FORMAT`: e.g. the DVC stage's previous output), or
    with ``force``; any other directory is refused (:func:`claim_output`). ``extra_meta``
    (JSON-serialisable, e.g. provenance) is merged into ``meta.json`` and may not override
    ``format``, ``channels``, ``splits`` or ``annotations``. Script ids must be unique across splits.
    """
    out_dir = Path(out_dir)
    checked = _check_splits(splits, str(out_dir))
    extra = dict(extra_meta or {})
    clash = [k for k in _RESERVED_META if k in extra]
    if clash:
        raise DataError(f"{out_dir / META_FILE}: extra_meta may not set {clash[0]!r}")
    present = {a for scripts in checked.values() for s in scripts for kf in s.keyframes for a in kf.descriptions}
    meta = {
        **extra,
        "format": FORMAT,
        "channels": list(CHANNELS),
        "splits": {name: len(scripts) for name, scripts in checked.items()},
        "annotations": [a for a in ANNOTATIONS if a in present],
    }
    try:
        meta_text = json.dumps(meta, ensure_ascii=False, indent=1, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise DataError(f"{out_dir / META_FILE}: extra_meta is not JSON-serialisable: {exc}") from None

    claim_output(out_dir, force)

    def fill(tmp: Path) -> None:
        for name, scripts in checked.items():
            lines = "".join(_dumps_line(script_to_json(s)) + "\n" for s in scripts)
            (tmp / f"{name}.jsonl").write_bytes(lines.encode("utf-8"))
        (tmp / META_FILE).write_bytes(meta_text.encode("utf-8"))
        validate_dir(tmp)

    emoava.replace_dir(out_dir, fill)
    return summarize(checked)


def load_meta(data_dir: str | os.PathLike) -> dict:
    """Read and check ``meta.json``: format, the 61 channel names in order, split counts, annotations."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path}: field 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
    channels = meta.get("channels")
    if not isinstance(channels, list) or len(channels) != N_CHANNELS:
        n = len(channels) if isinstance(channels, list) else type(channels).__name__
        raise DataError(f"{path}: field 'channels' must list the {N_CHANNELS} channel names, got {n}")
    for i, (got, want) in enumerate(zip(channels, CHANNELS)):
        if got != want:
            raise DataError(f"{path}: field 'channels[{i}]' is {got!r}, expected {want!r}")
    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise DataError(f"{path}: field 'splits' must be a non-empty object {{split: count}}")
    for name, n in splits.items():
        if name not in SPLITS:
            raise DataError(f"{path}: field 'splits' has unknown split {name!r}, expected one of {SPLITS}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DataError(f"{path}: field 'splits.{name}' must be a count >= 0, got {n!r}")
    ann = meta.get("annotations")
    if not isinstance(ann, list) or any(a not in ANNOTATIONS for a in ann):
        raise DataError(f"{path}: field 'annotations' must be a list of {ANNOTATIONS}, got {ann!r}")
    return meta


def load_split(data_dir: str | os.PathLike, split: str) -> list[Script]:
    """Read and validate ``{split}.jsonl`` of ``data_dir`` (script ids unique within the split)."""
    if split not in SPLITS:
        raise DataError(f"{data_dir}: unknown split {split!r}, expected one of {SPLITS}")
    path = Path(data_dir) / f"{split}.jsonl"
    scripts: list[Script] = []
    seen: dict[str, int] = {}
    for lineno, obj in _read_jsonl(path):
        script = script_from_json(obj, f"{path}:{lineno}")
        if script.script_id in seen:
            raise DataError(
                f"{path}:{lineno}: field 'script_id': duplicate {script.script_id!r} (first on line {seen[script.script_id]})"
            )
        seen[script.script_id] = lineno
        scripts.append(script)
    return scripts


def load_dataset(data_dir: str | os.PathLike) -> dict[str, list[Script]]:
    """All splits listed in ``meta.json``, validated as by :func:`validate_dir`."""
    return _load_all(Path(data_dir))[1]


def _load_all(data_dir: Path) -> tuple[dict, dict[str, list[Script]]]:
    meta = load_meta(data_dir)
    loaded: dict[str, list[Script]] = {}
    first: dict[str, str] = {}
    allowed = set(meta["annotations"])
    for name in SPLITS:
        if name not in meta["splits"]:
            continue
        path = data_dir / f"{name}.jsonl"
        scripts = load_split(data_dir, name)
        if len(scripts) != meta["splits"][name]:
            raise DataError(
                f"{path}: {len(scripts)} scripts, but {META_FILE} field 'splits.{name}' says {meta['splits'][name]}"
            )
        for i, s in enumerate(scripts):
            if s.script_id in first:
                raise DataError(f"{path}: script {i + 1} ({s.script_id!r}) also appears in {first[s.script_id]}")
            first[s.script_id] = f"{name}.jsonl"
            for kf in s.keyframes:
                extra = set(kf.descriptions) - allowed
                if extra:
                    raise DataError(
                        f"{path}: script {s.script_id!r} keyframe {kf.index} has annotation "
                        f"{sorted(extra)[0]!r} not listed in {META_FILE} field 'annotations'"
                    )
        loaded[name] = scripts
    return meta, loaded


def validate_dir(data_dir: str | os.PathLike) -> dict:
    """Validate a dataset directory completely and return :func:`summarize` of it.

    Checks ``meta.json`` (:func:`load_meta`), every split it lists (each line: fields, types, 61
    finite in-range values, 1-5 keyframes indexed 1..K, string texts with an ``original``), split
    sizes against ``meta.json``, script ids unique across splits, annotation types listed.
    """
    _, loaded = _load_all(Path(data_dir))
    return summarize(loaded)


# --------------------------------------------------------------------------------------------
# Release importers
# --------------------------------------------------------------------------------------------

_NUMBER = {w.lower(): i for i, w in enumerate(NUMBER_WORDS, start=1)}
_KF_LINE = re.compile(r"^-\s*Keyframe\s+([A-Za-z]+|\d+)\s*:\s?(.*)$")
_TASK_KF = re.compile(r"\bKeyframe\s+([A-Za-z]+|\d+)\b")
_WRAPPER = re.compile(r"^keyframe[_ ]?([A-Za-z]+|\d+)$", re.IGNORECASE)


def _keyframe_number(token: str, where: str) -> int:
    if token.isdigit():
        n = int(token)
        if n >= 1:
            return n
    elif token.lower() in _NUMBER:
        return _NUMBER[token.lower()]
    raise DataError(f"{where}: unknown keyframe number {token!r} (expected {', '.join(NUMBER_WORDS)} or digits)")


def parse_request(messages: Sequence[Mapping[str, Any]], *, where: str = "") -> dict:
    """Parse a release chat request into ``{"system", "descriptions", "background", "emotion", "target"}``.

    The user message layout (``example.jsonl``)::

        Keyframe Description Sequence:
        - Keyframe One: <description>
        - Keyframe Two: <description>

        Background: <text>
        Emotion: <text>

        Task Instruction: Generate the facial expression parameters for Keyframe Two.

    Keyframes are numbered with :data:`NUMBER_WORDS` (any case) or digits and must run 1..K; a line
    in the sequence that does not start a keyframe continues the previous description (joined with
    ``"\\n"``). ``target`` is the 1-based keyframe of the task line, or ``None`` when the message
    has no task line (the Target Frame Instruction ablation). ``system`` is the system message's
    content or ``None``. Any other text is an error naming ``where`` and the message line.
    """
    pre = _pre(where)
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise DataError(f"{pre}messages must be a list of {{role, content}} objects")
    system = user = None
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{pre}messages[{i}] must be an object with string 'role' and 'content'")
        if m["role"] == "system" and system is None:
            system = m["content"]
        elif m["role"] == "user":
            user = m["content"]
    if user is None:
        raise DataError(f"{pre}no user message")

    descriptions: list[str] = []
    background = emotion = None
    target: int | None = None
    state = "start"
    for lineno, line in enumerate(user.split("\n"), start=1):
        at = f"{pre}user message line {lineno}"
        s = line.strip()
        if state == "start":
            if not s:
                continue
            if s != "Keyframe Description Sequence:":
                raise DataError(f"{at}: expected 'Keyframe Description Sequence:', got {s[:60]!r}")
            state = "sequence"
            continue
        m = _KF_LINE.match(s)
        if state == "sequence" and m:
            n = _keyframe_number(m.group(1), at)
            if n != len(descriptions) + 1:
                raise DataError(f"{at}: Keyframe {m.group(1)} out of order, expected keyframe {len(descriptions) + 1}")
            descriptions.append(m.group(2).strip())
            continue
        if s.startswith("Background:"):
            if background is not None:
                raise DataError(f"{at}: second 'Background:' line")
            background, state = s[len("Background:") :].strip(), "context"
        elif s.startswith("Emotion:"):
            if emotion is not None:
                raise DataError(f"{at}: second 'Emotion:' line")
            emotion, state = s[len("Emotion:") :].strip(), "context"
        elif s.startswith("Task Instruction:"):
            if target is not None:
                raise DataError(f"{at}: second 'Task Instruction:' line")
            tm = _TASK_KF.search(s)
            if tm is None:
                raise DataError(f"{at}: task instruction names no keyframe: {s[:80]!r}")
            target, state = _keyframe_number(tm.group(1), at), "done"
        elif not s:
            if state == "sequence" and descriptions:
                state = "context"
        elif state == "sequence" and descriptions:
            descriptions[-1] += "\n" + s
        else:
            raise DataError(f"{at}: unexpected text {s[:60]!r}")
    if state == "start":
        raise DataError(f"{pre}user message: missing 'Keyframe Description Sequence:'")
    if not descriptions:
        raise DataError(f"{pre}user message: no '- Keyframe One: ...' lines")
    for i, d in enumerate(descriptions):
        if not d:
            raise DataError(
                f"{pre}user message: Keyframe {NUMBER_WORDS[i] if i < len(NUMBER_WORDS) else i + 1} has an empty description"
            )
    if background is None:
        raise DataError(f"{pre}user message: missing 'Background:' line")
    if emotion is None:
        raise DataError(f"{pre}user message: missing 'Emotion:' line")
    if target is not None and not 1 <= target <= len(descriptions):
        raise DataError(
            f"{pre}user message: task instruction targets keyframe {target}, "
            f"but the sequence has {len(descriptions)} keyframes"
        )
    return {
        "system": system,
        "descriptions": descriptions,
        "background": background,
        "emotion": emotion,
        "target": target,
    }


def _last_json_object(text: str) -> Any:
    """The last balanced JSON object in ``text`` (the outermost one that ends at the last ``}``),
    or ``None``. Like the release's ``extract_json``, but braces inside JSON strings are handled
    because each candidate is decoded with the real JSON decoder."""
    end = text.rfind("}")
    if end < 0:
        return None
    decoder = json.JSONDecoder()
    start = text.find("{")
    while 0 <= start < end:
        try:
            obj, stop = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj, stop = None, -1
        if stop == end + 1 and isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def _answer_text(record: Any, where: str) -> str:
    """``record["response"]``, else the content of the last assistant message (as the release)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    response = record.get("response")
    if isinstance(response, str) and response:
        return response
    messages = record.get("messages")
    if isinstance(messages, list):
        for m in reversed(messages):
            if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str):
                return m["content"]
    raise DataError(f"{where}: no answer (expected a 'response' string or an assistant message)")


def _answer_mapping(obj: dict, target: int | None, where: str) -> tuple[dict, int | None]:
    """Unwrap ``{"Keyframe_two": {...}}`` (checking it against ``target``) or accept a bare mapping."""
    if all(name in obj for name in CHANNELS):
        return obj, target
    if len(obj) == 1:
        ((key, value),) = obj.items()
        m = _WRAPPER.match(key)
        if m and isinstance(value, dict):
            n = _keyframe_number(m.group(1), f"{where}: field {key!r}")
            if target is not None and n != target:
                raise DataError(
                    f"{where}: field {key!r} answers keyframe {n}, but the request asks for keyframe {target}"
                )
            return value, n
    raise DataError(
        f'{where}: expected {{"Keyframe_x": {{61 channels}}}} or a mapping of the 61 channels, got keys {list(obj)[:3]}'
    )


def _script_id(descriptions: Sequence[str], background: str, emotion: str) -> str:
    digest = hashlib.sha256(json.dumps([list(descriptions), background, emotion], ensure_ascii=False).encode("utf-8"))
    return f"kf-{digest.hexdigest()[:12]}"


def _descriptions_for(text: str | Mapping[str, str], annotation: str) -> dict[str, str]:
    if isinstance(text, Mapping):
        return dict(text)
    desc = {annotation: text}
    desc.setdefault("original", text)
    return desc


def import_chat_jsonl(
    requests_path: str | os.PathLike,
    results_path: str | os.PathLike,
    *,
    annotation: str = "original",
    actor: str = "unknown",
) -> list[Script]:
    """Import release chat requests + answers as scripts (values parsed strictly).

    Non-blank line ``i`` of ``requests_path`` (``{"messages": [...]}``, :func:`parse_request`) is
    paired with non-blank line ``i`` of ``results_path`` (``{"response": "<text>"}`` or a record whose
    last assistant message holds the answer; a file of full conversations can be passed as both).
    The answer's last JSON object must be ``{"Keyframe_<n>": {61 channels}}`` for the requested
    keyframe, or a bare mapping of all 61 channels; values are validated by
    :func:`facelab.data.arkit.vector_from_mapping` (every error names ``file:line``).

    Requests with the same description sequence, background and emotion form one script, in order
    of first appearance; it must have exactly one answer per keyframe. The descriptions are stored
    under ``annotation``; because every keyframe must carry an ``original`` text, they are stored as
    ``original`` too when ``annotation`` is another type (the release files carry one description
    per keyframe). ``script_id`` is ``kf-`` + 12 hex digits of a hash of the script's texts.
    """
    if annotation not in ANNOTATIONS:
        raise DataError(f"annotation must be one of {ANNOTATIONS}, got {annotation!r}")
    req_path, res_path = Path(requests_path), Path(results_path)
    requests = _read_jsonl(req_path)
    results = _read_jsonl(res_path)
    if len(requests) != len(results):
        raise DataError(f"{res_path}: {len(results)} answers for {len(requests)} requests in {req_path}")

    groups: dict[tuple, dict[int, tuple[np.ndarray, str]]] = {}
    for (q_line, q), (r_line, r) in zip(requests, results):
        q_at, r_at = f"{req_path}:{q_line}", f"{res_path}:{r_line}"
        if not isinstance(q, dict) or not isinstance(q.get("messages"), list):
            raise DataError(f"{q_at}: expected an object with a 'messages' list")
        req = parse_request(q["messages"], where=q_at)
        obj = _last_json_object(_answer_text(r, r_at))
        if obj is None:
            raise DataError(f"{r_at}: the answer contains no JSON object")
        mapping, target = _answer_mapping(obj, req["target"], r_at)
        if target is None:
            raise DataError(f"{q_at}: no task instruction, and the answer on {r_at} names no keyframe")
        if target > len(req["descriptions"]):
            raise DataError(f"{r_at}: answers keyframe {target}, but the script has {len(req['descriptions'])}")
        try:
            values = vector_from_mapping(mapping, where=r_at)
        except ArkitError as exc:
            raise DataError(str(exc)) from None
        key = (tuple(req["descriptions"]), req["background"], req["emotion"])
        answers = groups.setdefault(key, {})
        if target in answers:
            raise DataError(
                f"{r_at}: second answer for keyframe {target} of this script (first on {answers[target][1]})"
            )
        answers[target] = (values, r_at)

    scripts = []
    for (descs, background, emotion), answers in groups.items():
        missing = [k for k in range(1, len(descs) + 1) if k not in answers]
        if missing:
            raise DataError(
                f"{req_path}: script {descs[0][:40]!r}... has no answer for keyframe {missing[0]} "
                f"({len(answers)} of {len(descs)} answered)"
            )
        keyframes = tuple(
            Keyframe(index=k, descriptions=_descriptions_for(descs[k - 1], annotation), values=answers[k][0])
            for k in range(1, len(descs) + 1)
        )
        scripts.append(
            Script(
                script_id=_script_id(descs, background, emotion),
                actor=actor,
                background=background,
                emotion=emotion,
                keyframes=keyframes,
            )
        )
    return scripts


def import_llf_csv(
    path: str | os.PathLike,
    *,
    descriptions: Sequence[str | Mapping[str, str]],
    background: str = "",
    emotion: str = "",
    script_id: str | None = None,
    actor: str = "unknown",
    annotation: str = "original",
) -> Script:
    """One script from a Live Link Face CSV: row ``k`` (file order) becomes keyframe ``k + 1``.

    ``descriptions`` gives one entry per row: a text (stored under ``annotation``, and as
    ``original`` too, as in :func:`import_chat_jsonl`) or a full ``{annotation: text}`` mapping.
    The CSV is validated by :func:`facelab.data.arkit.read_llf_csv`; its timecodes are not kept.
    ``script_id`` defaults to the same text hash :func:`import_chat_jsonl` uses.
    """
    if annotation not in ANNOTATIONS:
        raise DataError(f"annotation must be one of {ANNOTATIONS}, got {annotation!r}")
    try:
        _, rows = read_llf_csv(path)  # (K, 61)
    except ArkitError as exc:
        raise DataError(str(exc)) from None
    descriptions = list(descriptions)
    if len(descriptions) != rows.shape[0]:
        raise DataError(f"{path}: {rows.shape[0]} keyframe rows but {len(descriptions)} descriptions")
    if not 1 <= rows.shape[0] <= MAX_KEYFRAMES:
        raise DataError(f"{path}: {rows.shape[0]} keyframe rows, expected 1 to {MAX_KEYFRAMES}")
    keyframes = []
    for k, (text, values) in enumerate(zip(descriptions, rows), start=1):
        desc = _check_descriptions(_descriptions_for(text, annotation), f"{path}: keyframe {k}: descriptions")
        keyframes.append(Keyframe(index=k, descriptions=desc, values=values))
    if script_id is None:
        originals = [kf.descriptions["original"] for kf in keyframes]
        script_id = _script_id(originals, background, emotion)
    return Script(script_id=script_id, actor=actor, background=background, emotion=emotion, keyframes=tuple(keyframes))


def iter_keyframe_texts(scripts: Iterable[Script], annotation: str = "original") -> Iterable[tuple[str, np.ndarray]]:
    """``(keyframe_text, values (61,))`` for every keyframe of ``scripts`` (evaluator pairs)."""
    for s in scripts:
        for kf in s.keyframes:
            yield keyframe_text(s, kf.index, annotation), kf.values


__all__ = [
    "FORMAT",
    "ANNOTATIONS",
    "SPLITS",
    "NUMBER_WORDS",
    "MAX_KEYFRAMES",
    "ACTIVE_THRESHOLD",
    "DataError",
    "Keyframe",
    "Script",
    "keyframe_text",
    "iter_keyframe_texts",
    "script_to_json",
    "script_from_json",
    "summarize",
    "summarize_scripts",
    "write_dataset",
    "claim_output",
    "is_keyframeface_dir",
    "load_meta",
    "load_split",
    "load_dataset",
    "validate_dir",
    "parse_request",
    "import_chat_jsonl",
    "import_llf_csv",
]
