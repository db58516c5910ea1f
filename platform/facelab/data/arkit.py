"""The 61 ARKit channels of KeyframeFace: names, ranges, regions, the Live Link Face CSV, interpolation.

KeyframeFace (Wu et al., "KeyframeFace: From Text to Expressive Facial Keyframes", 2025,
arXiv 2512.11321) represents one facial keyframe as 61 ARKit coefficients captured at 60 Hz
(dataset section): the 52 ARKit blendshapes in ``[0, 1]`` followed by 9 head / eye pose values in ``[-1, 1]``
(HeadYaw, HeadPitch, HeadRoll, then yaw / pitch / roll of the left and the right eye). The
channel order is the release's (``jsonl2csv.py``'s ``ARKIT_KEYS``, the column order of
``example_result.csv``); every array in the platform uses it.

The Live Link Face (LLF) CSV is the layout MetaHuman / Unreal import
(``Timecode,BlendshapeCount,<61 names>``). :func:`write_llf_csv` writes exactly the bytes of the
release's converter: ``\\n`` line endings, values as Python ``str(float)`` (``0.0``, ``0.2``,
``-0.1``), ``BlendshapeCount`` 61, and the timecode of row ``k`` (0-based)
``00:00:{k:02d}:00.000`` -- one keyframe per second. :func:`read_llf_csv` reads it back with
validation; :func:`interpolate_keyframes` turns keyframes into a 60 Hz animation.

Vectors are float32 ``(61,)``. Errors raise :class:`ArkitError`, a
:class:`facelab.data.emoava.DataError` (so the CLI reports it as a user error), whose message
names the file, line (1-based) and channel at fault. Nothing happens at import time beyond
building these constant tables.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from facelab.data.emoava import DataError

CHANNELS: tuple[str, ...] = (
    # 52 blendshapes, [0, 1]
    "EyeBlinkLeft",
    "EyeLookDownLeft",
    "EyeLookInLeft",
    "EyeLookOutLeft",
    "EyeLookUpLeft",
    "EyeSquintLeft",
    "EyeWideLeft",
    "EyeBlinkRight",
    "EyeLookDownRight",
    "EyeLookInRight",
    "EyeLookOutRight",
    "EyeLookUpRight",
    "EyeSquintRight",
    "EyeWideRight",
    "JawForward",
    "JawRight",
    "JawLeft",
    "JawOpen",
    "MouthClose",
    "MouthFunnel",
    "MouthPucker",
    "MouthRight",
    "MouthLeft",
    "MouthSmileLeft",
    "MouthSmileRight",
    "MouthFrownLeft",
    "MouthFrownRight",
    "MouthDimpleLeft",
    "MouthDimpleRight",
    "MouthStretchLeft",
    "MouthStretchRight",
    "MouthRollLower",
    "MouthRollUpper",
    "MouthShrugLower",
    "MouthShrugUpper",
    "MouthPressLeft",
    "MouthPressRight",
    "MouthLowerDownLeft",
    "MouthLowerDownRight",
    "MouthUpperUpLeft",
    "MouthUpperUpRight",
    "BrowDownLeft",
    "BrowDownRight",
    "BrowInnerUp",
    "BrowOuterUpLeft",
    "BrowOuterUpRight",
    "CheekPuff",
    "CheekSquintLeft",
    "CheekSquintRight",
    "NoseSneerLeft",
    "NoseSneerRight",
    "TongueOut",
    # 9 pose values, [-1, 1]
    "HeadYaw",
    "HeadPitch",
    "HeadRoll",
    "LeftEyeYaw",
    "LeftEyePitch",
    "LeftEyeRoll",
    "RightEyeYaw",
    "RightEyePitch",
    "RightEyeRoll",
)
"""The 61 channel names in the release order (52 blendshapes, then head and eye pose)."""

N_CHANNELS = 61
N_BLENDSHAPES = 52

INDEX: dict[str, int] = {name: i for i, name in enumerate(CHANNELS)}
"""Channel name -> position in :data:`CHANNELS`."""


def _frozen(values: list[float]) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    arr.setflags(write=False)
    return arr


LOW: np.ndarray = _frozen([0.0] * N_BLENDSHAPES + [-1.0] * (N_CHANNELS - N_BLENDSHAPES))
"""Lower bound per channel, float32 ``(61,)``: 0 for blendshapes, -1 for pose (read-only)."""
HIGH: np.ndarray = _frozen([1.0] * N_CHANNELS)
"""Upper bound per channel, float32 ``(61,)``: 1 everywhere (read-only)."""

REGIONS: dict[str, list[str]] = {
    "eyes": list(CHANNELS[:14]),  # blink, look, squint, wide (L, R)
    "brows": ["BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight"],
    "jaw": ["JawForward", "JawRight", "JawLeft", "JawOpen"],
    "mouth": list(CHANNELS[INDEX["MouthClose"] : INDEX["MouthUpperUpRight"] + 1]),
    "cheeks_nose": ["CheekPuff", "CheekSquintLeft", "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight"],
    "tongue": ["TongueOut"],
    "head": ["HeadYaw", "HeadPitch", "HeadRoll"],
    "eye_pose": ["LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyePitch", "RightEyeRoll"],
}
"""Channel groups for plots and per-region errors; a partition of :data:`CHANNELS` (each channel in
exactly one region). ``eyes`` are the eye blendshapes, ``eye_pose`` the eyeball rotations."""

LLF_HEADER: tuple[str, ...] = ("Timecode", "BlendshapeCount", *CHANNELS)
"""Header of a Live Link Face CSV as written by the release (``example_result.csv``)."""

_HEADER_ALIASES = {"BlendShapeCount": "BlendshapeCount"}  # spelling of the Live Link Face app itself


class ArkitError(DataError):
    """Invalid ARKit data (a mapping, vector or LLF CSV); the message names where and which channel."""


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (Real, np.floating, np.integer)) and not isinstance(value, (bool, np.bool_))


# --------------------------------------------------------------------------------------------
# Mappings <-> vectors
# --------------------------------------------------------------------------------------------


def vector_from_mapping(d: Mapping[str, Any], *, where: str = "", strict: bool = True) -> np.ndarray:
    """``{channel name: value}`` with all 61 names -> float32 ``(61,)`` in release order.

    Strict (the default, for ground truth and release files): the mapping must hold exactly the 61
    names, each an int or float (not bool), finite and inside ``[LOW, HIGH]``; otherwise
    :class:`ArkitError` names ``where`` and the channel. ``strict=False`` is
    :func:`parse_mapping` without the counts.
    """
    if not strict:
        return parse_mapping(d)[0]
    pre = _prefix(where)
    if not isinstance(d, Mapping):
        raise ArkitError(f"{pre}expected an object of {N_CHANNELS} channel values, got {type(d).__name__}")
    unknown = [k for k in d if k not in INDEX]
    if unknown:
        raise ArkitError(
            f"{pre}unknown channel {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
        )
    missing = [c for c in CHANNELS if c not in d]
    if missing:
        raise ArkitError(
            f"{pre}missing channel {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    vec = np.empty(N_CHANNELS, dtype=np.float64)
    for i, name in enumerate(CHANNELS):
        value = d[name]
        if not _is_number(value):
            raise ArkitError(f"{pre}channel {name!r}: expected a number, got {type(value).__name__} {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ArkitError(f"{pre}channel {name!r}: non-finite value {value!r}")
        if not LOW[i] <= value <= HIGH[i]:
            raise ArkitError(f"{pre}channel {name!r} = {value!r} is out of range [{float(LOW[i])}, {float(HIGH[i])}]")
        vec[i] = value
    return vec.astype(np.float32)


def parse_mapping(d: Any) -> tuple[np.ndarray, int, int, int]:
    """Lenient reading of model output: ``(vec float32 (61,), n_missing, n_unknown, n_clipped)``.

    Unknown names are ignored (counted in ``n_unknown``); missing names, and values that are not
    finite numbers (strings, bools, null, NaN, inf), become 0 and count as missing; numbers
    outside ``[LOW, HIGH]`` are clipped (``n_clipped``). A ``d`` that is not a mapping gives the zero
    vector with all 61 channels missing. Never raises.
    """
    vec = np.zeros(N_CHANNELS, dtype=np.float64)
    if not isinstance(d, Mapping):
        return vec.astype(np.float32), N_CHANNELS, 0, 0
    n_unknown = sum(1 for k in d if k not in INDEX)
    n_missing = n_clipped = 0
    for i, name in enumerate(CHANNELS):
        value = d.get(name)
        if not _is_number(value) or not _finite(value):
            n_missing += 1
            continue
        value = float(value)
        clipped = min(max(value, float(LOW[i])), float(HIGH[i]))
        n_clipped += clipped != value
        vec[i] = clipped
    return vec.astype(np.float32), n_missing, n_unknown, n_clipped


def _finite(value) -> bool:
    """Finite as a float; an int too large for a float (10**400) is not, instead of raising OverflowError."""
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _py_floats(values: np.ndarray) -> list[float]:
    """Python floats of a 1-d array. float32 values become the shortest decimal that round-trips in
    float32 (``np.float32(0.2)`` -> ``0.2``, not ``0.20000000298023224``); float64 values are exact."""
    if values.dtype == np.float32:
        return [float(str(v)) for v in values]
    return [float(v) for v in values.astype(np.float64, copy=False)]


def mapping_from_vector(v: Any) -> dict[str, float]:
    """float ``(61,)`` -> ``{channel name: value}`` in release order, Python floats.

    float32 input is converted through its shortest round-tripping decimal, so a vector read from
    JSON as float32 gives back the numbers that were written (``0.2``, not ``0.20000000298023224``).
    """
    arr = np.asarray(v)
    if arr.shape != (N_CHANNELS,) or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ArkitError(f"expected a numeric vector of shape ({N_CHANNELS},), got {arr.dtype} {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return dict(zip(CHANNELS, _py_floats(arr)))


# --------------------------------------------------------------------------------------------
# Live Link Face CSV
# --------------------------------------------------------------------------------------------


def _default_timecode(k: int) -> str:
    """Row ``k`` (0-based) at one keyframe per second: ``00:00:{k:02d}:00.000`` as the release's
    ``jsonl2csv.py``. (The release field is ``HH:MM:SS:FF.mmm``; from row 60 on the seconds roll
    over into minutes and hours here, where the release would print ``00:00:60:00.000``.)"""
    hours, rest = divmod(k, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}:00.000"


def llf_timecode(i: int, fps: float) -> str:
    """Live Link Face timecode ``HH:MM:SS:FF.mmm`` of frame ``i`` (0-based, starting at 0) at ``fps``.

    ``FF`` is the frame within the second and ``.mmm`` the fractional frame in thousandths (always
    ``.000`` for an integer ``fps``, where the arithmetic is exact integer arithmetic).
    """
    if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ArkitError(f"fps must be a positive number, got {fps!r}")
    if float(fps).is_integer():
        f = int(fps)
        total_s, frame = divmod(i, f)
        sub = 0
    else:
        t = i / fps
        total_s = int(math.floor(t + 1e-9))
        frames = max(t - total_s, 0.0) * fps
        frame = int(math.floor(frames + 1e-9))
        sub = min(int(round((frames - frame) * 1000)), 999)
    hours, rest = divmod(total_s, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours:02d}:{minutes:02d}:{seconds:02d}:{frame:02d}.{sub:03d}"


def _check_rows(rows: Any, where: str) -> np.ndarray:
    arr = np.asarray(rows)
    if arr.ndim != 2 or arr.shape[1] != N_CHANNELS:
        raise ArkitError(f"{where}: rows must have shape (K, {N_CHANNELS}), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        if not np.issubdtype(arr.dtype, np.integer):
            raise ArkitError(f"{where}: rows must be numeric, got dtype {arr.dtype}")
        arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        k, c = (int(x) for x in np.argwhere(bad)[0])
        raise ArkitError(f"{where}: row {k}, channel {CHANNELS[c]!r}: non-finite value")
    out = (arr < LOW) | (arr > HIGH)
    if out.any():
        k, c = (int(x) for x in np.argwhere(out)[0])
        raise ArkitError(
            f"{where}: row {k}, channel {CHANNELS[c]!r} = {float(arr[k, c])!r} is out of range "
            f"[{float(LOW[c])}, {float(HIGH[c])}]"
        )
    return arr


def format_llf_csv(rows: Any, *, timecodes: Sequence[str] | None = None, fps: float | None = None) -> str:
    """The text :func:`write_llf_csv` writes (see there)."""
    arr = _check_rows(rows, "write_llf_csv")
    if timecodes is not None and fps is not None:
        raise ArkitError("write_llf_csv: give timecodes or fps, not both")
    n = arr.shape[0]
    if timecodes is not None:
        timecodes = list(timecodes)
        if len(timecodes) != n:
            raise ArkitError(f"write_llf_csv: {len(timecodes)} timecodes for {n} rows")
        for i, tc in enumerate(timecodes):
            if not isinstance(tc, str) or any(ch in tc for ch in ',\r\n"'):
                raise ArkitError(
                    f"write_llf_csv: timecode {i} must be a string without commas, quotes or newlines, got {tc!r}"
                )
    elif fps is not None:
        timecodes = [llf_timecode(i, fps) for i in range(n)]
    else:
        timecodes = [_default_timecode(i) for i in range(n)]
    lines = [",".join(LLF_HEADER)]
    for tc, row in zip(timecodes, arr):
        lines.append(",".join([tc, str(N_CHANNELS), *(str(x) for x in _py_floats(row))]))
    return "\n".join(lines) + "\n"


def write_llf_csv(
    rows: Any,
    stream_or_path: TextIO | str | os.PathLike,
    *,
    timecodes: Sequence[str] | None = None,
    fps: float | None = None,
) -> None:
    """Write keyframes ``rows`` (K, 61) as a Live Link Face CSV, byte-identical to the release's.

    Header :data:`LLF_HEADER`; one line per row: timecode, ``61``, the 61 values as Python
    ``str(float)`` (float32 rows through their shortest round-tripping decimal, so 0.2 is written
    ``0.2``); ``"\\n"`` line endings, final newline. Timecodes: ``timecodes`` if given, else with
    ``fps`` the LLF frame timecodes of :func:`llf_timecode`, else the release's one keyframe per
    second ``00:00:{k:02d}:00.000``. Rows must be finite and in range. A path is written
    atomically (temporary file + rename); a text stream is written to as is (open files with
    ``newline=""`` to keep the ``\\n`` endings on every platform).
    """
    text = format_llf_csv(rows, timecodes=timecodes, fps=fps)
    if hasattr(stream_or_path, "write"):
        stream_or_path.write(text)
        return
    from facelab.data.emoava import _atomic_write

    _atomic_write(Path(stream_or_path), lambda fh: fh.write(text.encode("utf-8")))


def read_llf_csv(path: str | os.PathLike | TextIO) -> tuple[list[str], np.ndarray]:
    """Read a Live Link Face CSV: ``(timecodes, rows float32 (K, 61))``.

    Validation (each error names ``file:line`` and the column): the header must be
    :data:`LLF_HEADER` (``BlendShapeCount``, the LLF app's own spelling, is accepted; the first
    wrong column is named); every row has 63 fields; ``BlendshapeCount`` is 61; values are finite
    numbers inside the channel's range. Blank lines are skipped; ``\\r\\n`` endings are accepted.
    """
    if hasattr(path, "read"):
        text, name = path.read(), getattr(path, "name", "<stream>")
    else:
        name = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ArkitError(f"{name}: missing") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ArkitError(f"{name}: unreadable: {exc}") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ArkitError(f"{name}:1: empty file, expected the header {','.join(LLF_HEADER[:3])},...")
    header = [_HEADER_ALIASES.get(h.strip(), h.strip()) for h in lines[0].split(",")]
    for col, (got, want) in enumerate(zip(header, LLF_HEADER), start=1):
        if got != want:
            raise ArkitError(f"{name}:1: header column {col} is {got!r}, expected {want!r}")
    if len(header) != len(LLF_HEADER):
        raise ArkitError(f"{name}:1: header has {len(header) - 2} channels, expected {N_CHANNELS}")

    timecodes: list[str] = []
    rows: list[list[float]] = []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != len(LLF_HEADER):
            raise ArkitError(f"{name}:{lineno}: {len(fields) - 2} channel values, expected {N_CHANNELS}")
        count = fields[1].strip()
        if count != str(N_CHANNELS):
            raise ArkitError(f"{name}:{lineno}: BlendshapeCount is {count!r}, expected {N_CHANNELS}")
        row = []
        for c, field in enumerate(fields[2:]):
            col = CHANNELS[c]
            try:
                value = float(field)
            except ValueError:
                raise ArkitError(f"{name}:{lineno}: {col}: not a number: {field!r}") from None
            if not math.isfinite(value):
                raise ArkitError(f"{name}:{lineno}: {col}: non-finite value {field!r}")
            if not LOW[c] <= value <= HIGH[c]:
                raise ArkitError(
                    f"{name}:{lineno}: {col} = {value!r} is out of range [{float(LOW[c])}, {float(HIGH[c])}]"
                )
            row.append(value)
        timecodes.append(fields[0].strip())
        rows.append(row)
    arr = np.asarray(rows, dtype=np.float32).reshape(len(rows), N_CHANNELS)  # (K, 61)
    return timecodes, arr


# --------------------------------------------------------------------------------------------
# Keyframes -> animation
# --------------------------------------------------------------------------------------------


def interpolate_keyframes(rows: Any, key_times_s: Sequence[float], fps: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """Animate keyframes ``rows`` (K, 61) placed at ``key_times_s``: ``(times (N,), frames (N, 61))``.

    The paper renders generated keyframes as animation in MetaHuman, which interpolates between
    them; the capture rate is 60 Hz (dataset section). The paper does not name the curve, so we choose a
    monotone cubic: scipy's ``PchipInterpolator`` per channel. It passes through every keyframe, has
    a continuous first derivative, and never overshoots -- between two keyframes each channel stays
    between their values, so ranges hold by construction (the result is still clipped to
    ``[LOW, HIGH]`` against rounding). With two keyframes it is linear.

    Frames lie on the uniform grid ``t0 + i / fps`` from the first key time up to (and including,
    when it is on the grid) the last. ``K = 1`` gives a single held frame at ``t0``. Key times must
    be finite and strictly increasing. ``times`` is float64, ``frames`` float32.
    """
    arr = _check_rows(rows, "interpolate_keyframes").astype(np.float64)  # (K, 61)
    times_k = np.asarray(key_times_s, dtype=np.float64)
    if times_k.shape != (arr.shape[0],):
        raise ArkitError(f"interpolate_keyframes: {times_k.size} key times for {arr.shape[0]} keyframes")
    if arr.shape[0] == 0:
        raise ArkitError("interpolate_keyframes: need at least one keyframe")
    if not np.isfinite(times_k).all() or (np.diff(times_k) <= 0).any():
        raise ArkitError(
            f"interpolate_keyframes: key times must be finite and strictly increasing, got {times_k.tolist()}"
        )
    if not (math.isfinite(fps) and fps > 0):
        raise ArkitError(f"interpolate_keyframes: fps must be > 0, got {fps!r}")
    if arr.shape[0] == 1:
        return times_k.copy(), arr.astype(np.float32)
    from scipy.interpolate import PchipInterpolator

    n = int(math.floor((times_k[-1] - times_k[0]) * fps + 1e-9)) + 1
    times = times_k[0] + np.arange(n, dtype=np.float64) / fps  # (N,)
    frames = PchipInterpolator(times_k, arr, axis=0)(times)  # (N, 61)
    np.clip(frames, LOW, HIGH, out=frames)
    return times, frames.astype(np.float32)


__all__ = [
    "CHANNELS",
    "N_CHANNELS",
    "N_BLENDSHAPES",
    "LOW",
    "HIGH",
    "INDEX",
    "REGIONS",
    "LLF_HEADER",
    "ArkitError",
    "vector_from_mapping",
    "parse_mapping",
    "mapping_from_vector",
    "llf_timecode",
    "format_llf_csv",
    "write_llf_csv",
    "read_llf_csv",
    "interpolate_keyframes",
]
