"""The LM-Listener dataset (Ng et al., "Can Language Models Learn to Listen?", ICCV 2023): its released
segment files, their safe import into the platform's expression-dataset format, and the speaker frames
that the paired Fréchet distance (P-FD) needs.

The CTEG paper (Appendix C, Q1, Table 5) trains CTEG and LM-Listener on this dataset and scores them
"following exactly the same evaluation settings" as the LM-Listener release. The import below turns
the release into the EmoAva-style directory of :mod:`facelab.data.emoava`, so both families train on it
unchanged, plus one pickle-free file per split with the speaker's frames.

**Release layout** (github.com/sanjayss34/lm-listener: README "Data Preparation"; read by
``dataset/dataset_tokenize.py``, ``dataset/dataset_TM_train.py`` and ``evaluate_listener.py``). One
directory per listener (``dataset/trevor`` ...) holds

``segments_train.pth``, ``segments_val.pth``
    ``torch.save`` of a list of segment dicts, one per continuous stretch of a conversation video:
    ``fname`` (str, the video), ``split_start_frame`` / ``split_end_frame`` (int, the segment is the
    video's frames ``[start, end)`` at 30 fps), per-frame EMOCA/FLAME codes of the listener (``p0_``)
    and of the speaker (``p1_``) as ``(T, .)`` tensors with ``T = end - start``: ``*_exp`` (50
    expression coefficients), ``*_pose`` (6: global head rotation, then jaw, axis-angle, DECA's
    layout), ``*_shape`` (100, identity), ``p0_detail``; and the speaker's transcript with word
    timestamps in seconds of the video, ``before_words`` / ``during_words``: lists of
    ``{'text': str, 'start': float, 'end': float}``.
``mean.npy``, ``std.npy`` (and ``p0_``/``p1_`` variants)
    Per-dimension statistics of the 56-d ``exp + pose`` vectors, used by the release to normalise
    its model inputs. Not needed here (``stats.json`` is computed from the imported training split).

**Reading it safely.** ``.pth`` files are pickles. They are read only with ``torch.load(...,
weights_only=True)`` -- PyTorch's allow-listed unpickler (tensors, storages, containers, strings and
numbers; no other global) -- widened by exactly one kind of global, numpy *scalars* of plain number
types (word timestamps written as ``np.float64``). Before unpickling, the file must be a zip-format
torch file (the legacy format, which allocates storages of a declared size before reading them, is
refused), at most :data:`MAX_RELEASE_BYTES`, and its zip members may not decompress to more than
:data:`DECODE_FACTOR` x the file size; the loaded object is then walked with the same budget (every
reference charged, so one tensor referenced a million times is refused) and a nesting limit. Every
failure is a :class:`~facelab.data.emoava.DataError` naming the file, and the segment and key at fault.

**From segments to (text, expression) pairs.** A segment is cut into the windows the release scores
(``dataset/dataset_tokenize.py``: starts ``delay_start, delay_start + window, ...`` within the
segment, each ``min(window, remaining)`` frames long, kept when at least ``min_frames`` long; the
README's commands use ``--max-motion-length 240 --delay-start-frames 96`` and the loader's minimum is
24 frames). A window's text is the speaker's words exactly as ``dataset/dataset_TM_train.py`` selects
them for a window starting at (absolute) frame ``s`` and ending at ``e``: the ``before_words`` whose
``end`` is less than ``max_time_before`` seconds (README: ``--max-time-before 3``) before ``s / fps``,
then every ``during_words`` entry ending before ``s / fps`` under the same rule, then those ending
before ``(e - 1) / fps``; joined with spaces. (The release interleaves the during-words with the
motion codes by timestamp; a text-to-expression model gets them as one utterance.)

A window gives one sample, so every text has one expression sequence, and the data has one listener:
the paper's two remarks on this dataset. The listener's frame becomes the platform's 53-d vector
(``p0_exp`` + the jaw part of ``p0_pose``, i.e. ``pose[:, 3:6]``; the global head rotation is not
part of what a text-to-expression model generates). The speaker's frame is kept whole (``p1_exp`` +
``p1_pose``, 56-d, the features ``evaluate_listener.py`` concatenates for P-FD).

**Splits.** ``val`` is the split the release evaluates (``evaluate_listener.py --segments_path
.../segments_val.pth``) and becomes ``test``. ``dev`` (model selection) is held out of ``train`` by
video: the last ``ceil(dev_fraction x videos)`` distinct ``fname`` values in sorted order, so no
video is in both.

**On disk** (besides the EmoAva files ``{split}.npz``, ``{split}.texts.json``, ``stats.json``,
``meta.json`` with ``"dataset": "lm_listener"``):

``{split}.speaker.npz``
    ``frames`` float32 ``[N, 56]`` and ``offsets`` int64 ``[n + 1]``, the same offsets as
    ``{split}.npz``: the speaker's frames of every window.
``{split}.clips.json``
    Where each window comes from: ``[fname, start_frame]`` (absolute video frame), in order.
"""

from __future__ import annotations

import hashlib
import json
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facelab.data import emoava
from facelab.data.emoava import EXPR_DIM, DataError

FPS = 30
"""Frame rate of the release's EMOCA codes (``evaluate_listener.py --fps 30``)."""
EXP_DIM = 50
POSE_DIM = 6
JAW = slice(3, 6)
"""The jaw part of a DECA/EMOCA ``pose`` vector (the first three values are the global head rotation)."""
SPEAKER_DIM = EXP_DIM + POSE_DIM
"""Width of a speaker frame: ``p1_exp`` + ``p1_pose`` (``evaluate_listener.py`` uses ``[:, :56]``)."""
RELEASE_SPLITS = ("train", "val")
"""Segment files an import reads: ``segments_train.pth`` and ``segments_val.pth``."""
DATASET = "lm_listener"
"""``meta.json``'s ``dataset`` field for a directory written here."""

WINDOW = 240
"""Frames per window (README: ``--max-motion-length 240``)."""
DELAY_START = 96
"""First window's offset into a segment (README: ``--delay-start-frames 96``)."""
MIN_FRAMES = 24
"""Shortest window kept (``dataset_tokenize.py``: ``min_motion_len = 24`` for face data)."""
MAX_TIME_BEFORE = 3.0
"""Seconds of speech before a window that its text includes (README: ``--max-time-before 3``)."""

MAX_RELEASE_BYTES = 16 << 30
"""Largest segment file an import reads (16 GiB)."""
DECODE_FACTOR = 4
"""A segment file's zip members, and the object it loads to, may be at most this many times its size."""
DECODE_SLACK = 1 << 20
_MAX_NESTING = 6  # list > segment dict > word list > word dict > value is 5 deep

_NUMBER_DTYPES = tuple(
    f"{kind}{bits}DType"
    for kind, sizes in (("Float", (16, 32, 64)), ("Int", (8, 16, 32, 64)), ("UInt", (8, 16, 32, 64)))
    for bits in sizes
) + ("BoolDType",)
_REQUIRED = ("fname", "split_start_frame", "split_end_frame", "p0_exp", "p0_pose", "p1_exp", "p1_pose")
_WORD_LISTS = ("before_words", "during_words")


@dataclass(frozen=True)
class Word:
    """One transcribed word of the speaker: its text and the time it ends (seconds into the video)."""

    text: str
    end: float


@dataclass
class Segment:
    """One release segment, validated: frames ``[start, end)`` of video ``fname``."""

    fname: str
    start: int
    end: int
    listener: np.ndarray  # float32 (T, 56): p0_exp | p0_pose
    speaker: np.ndarray  # float32 (T, 56): p1_exp | p1_pose
    before_words: list[Word]
    during_words: list[Word]


@dataclass
class Window:
    """One (text, listener expression) pair cut from a segment, with the speaker's frames."""

    text: str
    expression: np.ndarray  # float32 (T, 53): exp | jaw
    speaker: np.ndarray  # float32 (T, 56)
    fname: str
    start: int  # absolute video frame of the first frame


# --------------------------------------------------------------------------------------------
# Reading a segment file safely
# --------------------------------------------------------------------------------------------


def _numpy_scalar_globals() -> list:
    """The globals a pickled numpy scalar of a plain number type needs, under both numpy module paths."""
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray
    allowed: list = [multiarray.scalar, np.dtype, (multiarray.scalar, "numpy.core.multiarray.scalar")]
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype through its DType class
    for name in _NUMBER_DTYPES:
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


class _Budget:
    """Charges what a loaded object holds against a byte budget; refuses the file when it runs out."""

    def __init__(self, source: Path, size: int):
        self.source = source
        self.limit = DECODE_FACTOR * size + DECODE_SLACK
        self.used = 0

    def spend(self, n: int, where: str) -> None:
        self.used += n
        if self.used > self.limit:
            raise DataError(
                f"{self.source}: refused {where}: the loaded data would exceed {self.limit:,} bytes "
                f"({DECODE_FACTOR}x the file size + {DECODE_SLACK:,}); a genuine segment file loads to about "
                "its own size, so this one is corrupt or a memory bomb"
            )


def _walk(obj: Any, budget: _Budget, where: str, depth: int = 0) -> None:
    """Charge every reference in ``obj`` to ``budget`` and refuse deep nesting (no copies are made)."""
    import torch

    if depth > _MAX_NESTING:
        raise DataError(f"{budget.source}: refused {where}: nested deeper than {_MAX_NESTING} levels")
    if isinstance(obj, torch.Tensor):
        budget.spend(max(1, obj.element_size() * obj.nelement()), where)
    elif isinstance(obj, np.ndarray):
        budget.spend(max(1, obj.nbytes), where)
    elif isinstance(obj, (str, bytes)):
        budget.spend(max(1, len(obj)), where)
    elif isinstance(obj, dict):
        budget.spend(len(obj) + 1, where)
        for k, v in obj.items():
            _walk(k, budget, where, depth + 1)
            _walk(v, budget, f"{where}[{k!r}]" if isinstance(k, str) and len(k) < 40 else where, depth + 1)
    elif isinstance(obj, (list, tuple)):
        budget.spend(len(obj) + 1, where)
        for i, v in enumerate(obj):
            _walk(v, budget, f"{where}[{i}]", depth + 1)
    else:
        budget.spend(1, where)


def load_segment_file(path: Path, *, max_bytes: int = MAX_RELEASE_BYTES) -> list:
    """The raw list a release ``segments_*.pth`` holds, loaded with the allow-listed unpickler.

    See the module docstring for every check; each failure is a :class:`DataError` naming ``path``.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing")
    size = path.stat().st_size
    if size > max_bytes:
        raise DataError(f"{path}: {size:,} bytes, more than the {max_bytes:,} an import reads")
    if not zipfile.is_zipfile(path):
        raise DataError(
            f"{path}: not a zip-format torch file; the legacy torch.save format (before PyTorch 1.6) is not "
            "read, because it allocates tensors of a size the file declares before reading them. Re-save it "
            "with a current PyTorch in a trusted environment"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            unpacked = sum(info.file_size for info in zf.infolist())
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: unreadable zip: {exc}") from None
    if unpacked > DECODE_FACTOR * size + DECODE_SLACK:
        raise DataError(
            f"{path}: refused: its zip members unpack to {unpacked:,} bytes, more than {DECODE_FACTOR}x the "
            f"file's {size:,} (torch.save stores members uncompressed); corrupt or a zip bomb"
        )
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except Exception as exc:  # noqa: BLE001 - the unpickler raises many types on hostile or corrupt input
        msg = " ".join(str(exc).split())
        if "Weights only load failed" in msg or "Unsupported global" in msg or "Unsupported operand" in msg:
            detail = msg.split("Please file an issue")[0]
            detail = detail[detail.find("Unsupported") :] if "Unsupported" in detail else detail
            raise DataError(
                f"{path}: refused by the allow-listed unpickler (a segment file holds only tensors, lists, dicts, "
                f"strings and numbers): {detail[:300]}"
            ) from None
        raise DataError(f"{path}: not a readable torch file: {type(exc).__name__}: {msg[:300]}") from None
    _walk(obj, _Budget(path, size), "the loaded object")
    return obj


def _as_frames(value: Any, width: int, rows: int, where: str) -> np.ndarray:
    """float32 ``(rows, width)`` copy of a tensor / array, or DataError naming ``where``."""
    import torch

    if isinstance(value, torch.Tensor):
        if not value.is_floating_point():
            raise DataError(f"{where}: dtype {value.dtype}, expected floating point")
        arr = value.detach().to("cpu", torch.float32).numpy()
    elif isinstance(value, np.ndarray):
        if not np.issubdtype(value.dtype, np.floating):
            raise DataError(f"{where}: dtype {value.dtype}, expected floating point")
        arr = value.astype(np.float32)
    else:
        raise DataError(f"{where}: {type(value).__name__}, expected a tensor of shape ({rows}, {width})")
    if arr.shape != (rows, width):
        raise DataError(f"{where}: shape {tuple(arr.shape)}, expected ({rows}, {width}) (split_end - split_start rows)")
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise DataError(f"{where}: non-finite value at frame {bad[0]}, dim {bad[1]}")
    return np.ascontiguousarray(arr)


def _as_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{where}: {type(value).__name__} {value!r}, expected an int")
    return int(value)


def _as_time(value: Any, where: str) -> float:
    import torch

    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise DataError(f"{where}: {type(value).__name__}, expected a time in seconds")
    out = float(value)
    if not math.isfinite(out):
        raise DataError(f"{where}: {out} is not a finite time")
    return out


def _words(value: Any, where: str) -> list[Word]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: {type(value).__name__}, expected a list of {{'text', 'end'}} dicts")
    out = []
    for i, word in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(word, dict):
            raise DataError(f"{at}: {type(word).__name__}, expected a dict with 'text' and 'end'")
        for key in ("text", "end"):
            if key not in word:
                raise DataError(f"{at}: missing key {key!r} (has {sorted(map(str, word))})")
        if not isinstance(word["text"], str):
            raise DataError(f"{at}['text']: {type(word['text']).__name__}, expected str")
        out.append(Word(text=word["text"], end=_as_time(word["end"], f"{at}['end']")))
    return out


def parse_segments(obj: Any, source: Path | str) -> list[Segment]:
    """Validate what :func:`load_segment_file` returned; DataError naming ``source``, segment index and key."""
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{source}: expected a list of segment dicts, got {type(obj).__name__}")
    segments = []
    for i, seg in enumerate(obj):
        at = f"{source}: segment[{i}]"
        if not isinstance(seg, dict):
            raise DataError(f"{at}: {type(seg).__name__}, expected a dict")
        missing = [k for k in (*_REQUIRED, *_WORD_LISTS) if k not in seg]
        if missing:
            raise DataError(f"{at}: missing key(s) {missing}")
        fname = seg["fname"]
        if not isinstance(fname, str) or not fname:
            raise DataError(f"{at}['fname']: {fname!r}, expected a non-empty str")
        start = _as_int(seg["split_start_frame"], f"{at}['split_start_frame']")
        end = _as_int(seg["split_end_frame"], f"{at}['split_end_frame']")
        if start < 0 or end <= start:
            raise DataError(f"{at}: split_start_frame {start} / split_end_frame {end}: need 0 <= start < end")
        rows = end - start
        listener = np.concatenate(
            [
                _as_frames(seg["p0_exp"], EXP_DIM, rows, f"{at}['p0_exp']"),
                _as_frames(seg["p0_pose"], POSE_DIM, rows, f"{at}['p0_pose']"),
            ],
            axis=1,
        )
        speaker = np.concatenate(
            [
                _as_frames(seg["p1_exp"], EXP_DIM, rows, f"{at}['p1_exp']"),
                _as_frames(seg["p1_pose"], POSE_DIM, rows, f"{at}['p1_pose']"),
            ],
            axis=1,
        )
        segments.append(
            Segment(
                fname=fname,
                start=start,
                end=end,
                listener=listener,
                speaker=speaker,
                before_words=_words(seg["before_words"], f"{at}['before_words']"),
                during_words=_words(seg["during_words"], f"{at}['during_words']"),
            )
        )
    return segments


def read_release_segments(path: Path, *, max_bytes: int = MAX_RELEASE_BYTES) -> list[Segment]:
    """Safely load and validate a release ``segments_*.pth`` (see the module docstring)."""
    return parse_segments(load_segment_file(path, max_bytes=max_bytes), path)


# --------------------------------------------------------------------------------------------
# Segments -> windows (the release's evaluation units)
# --------------------------------------------------------------------------------------------


def window_text(seg: Segment, start: int, end: int, *, max_time_before: float = MAX_TIME_BEFORE, fps: int = FPS) -> str:
    """The speaker's words for the window of absolute frames ``[start, end)``, as the release picks them
    (``dataset/dataset_TM_train.py``, ``Text2MotionDataset.__init__``; see the module docstring)."""
    t0 = start / fps
    before = [w.text for w in seg.before_words if t0 - w.end < max_time_before]
    during = []
    for w in seg.during_words:
        if w.end < t0:
            if t0 - w.end < max_time_before:
                before.append(w.text)
        elif w.end < (end - 1) / fps:
            during.append(w.text)
    return " ".join(before + during)


def segment_windows(
    seg: Segment,
    *,
    window: int = WINDOW,
    delay_start: int = DELAY_START,
    min_frames: int = MIN_FRAMES,
    max_time_before: float = MAX_TIME_BEFORE,
    fps: int = FPS,
) -> list[Window]:
    """The windows of one segment, in order (``dataset/dataset_tokenize.py``'s loop over starts)."""
    out = []
    length = seg.end - seg.start
    for offset in range(delay_start, length, window):
        n = min(length - offset, window)
        if n < min_frames:
            continue
        frames = seg.listener[offset : offset + n]
        out.append(
            Window(
                text=window_text(
                    seg, seg.start + offset, seg.start + offset + n, max_time_before=max_time_before, fps=fps
                ),
                expression=np.ascontiguousarray(np.concatenate([frames[:, :EXP_DIM], frames[:, EXP_DIM:][:, JAW]], 1)),
                speaker=seg.speaker[offset : offset + n],
                fname=seg.fname,
                start=seg.start + offset,
            )
        )
    return out


def dev_videos(fnames: Sequence[str], dev_fraction: float) -> set[str]:
    """The videos held out of ``train`` for ``dev``: the last ``ceil(dev_fraction x n)`` distinct names,
    sorted (at least one when ``dev_fraction > 0``, never all of them when there are two or more)."""
    names = sorted(set(fnames))
    if dev_fraction <= 0 or not names:
        return set()
    k = min(max(1, math.ceil(dev_fraction * len(names))), max(1, len(names) - 1))
    return set(names[-k:])


# --------------------------------------------------------------------------------------------
# The platform format: EmoAva files + speaker frames
# --------------------------------------------------------------------------------------------


def speaker_paths(data_dir: Path, split: str) -> tuple[Path, Path]:
    """``({split}.speaker.npz, {split}.clips.json)`` inside ``data_dir``."""
    data_dir = Path(data_dir)
    return data_dir / f"{split}.speaker.npz", data_dir / f"{split}.clips.json"


def save_windows(windows: Sequence[Window], data_dir: Path, split: str) -> None:
    """Write a split: the EmoAva files (texts + 53-d expressions), the speaker frames and the clip index."""
    emoava.save_split(
        emoava.EmoAvaSplit(texts=[w.text for w in windows], sequences=[w.expression for w in windows]), data_dir, split
    )
    offsets = np.zeros(len(windows) + 1, dtype=np.int64)
    np.cumsum([len(w.speaker) for w in windows], out=offsets[1:])
    frames = (
        np.concatenate([w.speaker for w in windows]).astype(np.float32)
        if windows
        else np.zeros((0, SPEAKER_DIM), np.float32)
    )
    npz, clips = speaker_paths(data_dir, split)
    emoava._write_npz(npz, {"frames": frames, "offsets": offsets})
    emoava._write_json(clips, [[w.fname, int(w.start)] for w in windows])


def load_speaker(data_dir: Path, split: str) -> list[np.ndarray]:
    """The speaker's frames of every sample of ``split``: float32 ``(T_i, 56)`` views, the ``T_i`` of the
    split's expression sequences. DataError naming the file when missing, corrupt or misaligned."""
    data_dir = Path(data_dir)
    npz_path, _ = speaker_paths(data_dir, split)
    if not npz_path.is_file():
        raise DataError(
            f"{npz_path}: missing. The LM-Listener metrics (eval.protocol: listener) need the speaker's frames "
            "of every test sample: build the data with `facelab data build-lm-listener` or import the release "
            "with `facelab data import-lm-listener`"
        )
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            if not {"frames", "offsets"} <= set(npz.files):
                raise DataError(f"{npz_path}: expected arrays 'frames' and 'offsets', has {sorted(npz.files)}")
            frames, offsets = npz["frames"], npz["offsets"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{npz_path}: unreadable or corrupt: {exc}") from None
    if frames.dtype != np.float32 or frames.ndim != 2 or frames.shape[1] != SPEAKER_DIM:
        raise DataError(f"{npz_path}: frames must be float32 (N, {SPEAKER_DIM}), got {frames.dtype} {frames.shape}")
    if not np.isfinite(frames).all():
        raise DataError(
            f"{npz_path}: frames hold a non-finite value at row {int(np.argwhere(~np.isfinite(frames))[0][0])}"
        )
    split_npz = emoava.split_paths(data_dir, split)[0]
    try:
        with np.load(split_npz, allow_pickle=False) as npz:
            expected = npz["offsets"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{split_npz}: unreadable or corrupt: {exc}") from None
    if offsets.dtype != np.int64 or not np.array_equal(offsets, expected) or offsets[-1] != len(frames):
        raise DataError(
            f"{npz_path}: offsets do not match {split_npz.name} ({offsets.size - 1} vs {expected.size - 1} "
            "sequences, or different lengths); rebuild the directory"
        )
    return [frames[offsets[i] : offsets[i + 1]] for i in range(offsets.size - 1)]


def is_lm_listener_dir(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds an LM-Listener dataset written here (its ``meta.json``)."""
    meta = emoava.json_object_or_none(Path(data_dir) / emoava.META_FILE)
    return meta is not None and meta.get("dataset") == DATASET and meta.get("source") in emoava.SOURCES


def claim_lm_listener_output(out_dir: Path, force: bool) -> None:
    """:func:`~facelab.data.emoava.claim_output_dir` for the LM-Listener writers."""
    emoava.claim_output_dir(
        Path(out_dir),
        owned=is_lm_listener_dir,
        what="an LM-Listener dataset",
        marker=f"{emoava.META_FILE} with dataset {DATASET!r}",
        force=force,
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_release(
    release_dir: Path,
    out_dir: Path,
    *,
    window: int = WINDOW,
    delay_start: int = DELAY_START,
    min_frames: int = MIN_FRAMES,
    max_time_before: float = MAX_TIME_BEFORE,
    dev_fraction: float = 0.1,
    force: bool = False,
    source: str = "release",
    provenance: dict | None = None,
) -> dict:
    """Convert the LM-Listener release in ``release_dir`` (``segments_train.pth``, ``segments_val.pth``)
    into the platform format in ``out_dir`` (module docstring). Everything is read and validated before
    anything is written; ``out_dir`` must not exist, be empty or hold an LM-Listener dataset written
    here, unless ``force``. ``source`` / ``provenance`` describe the input in ``meta.json`` (the synthetic
    builder passes ``"synthetic"`` and its parameters). Returns :func:`summarize` of ``out_dir``.
    """
    release_dir, out_dir = Path(release_dir), Path(out_dir)
    problems = []
    if not (isinstance(window, int) and window >= 2):
        problems.append(f"window must be an int >= 2, got {window!r}")
    if not (isinstance(delay_start, int) and delay_start >= 0):
        problems.append(f"delay_start must be an int >= 0, got {delay_start!r}")
    if not (isinstance(min_frames, int) and isinstance(window, int) and 2 <= min_frames <= window):
        problems.append(f"min_frames must be an int in [2, window], got {min_frames!r}")
    if not (max_time_before >= 0):
        problems.append(f"max_time_before must be >= 0, got {max_time_before!r}")
    if not (0 <= dev_fraction < 1):
        problems.append(f"dev_fraction must be in [0, 1), got {dev_fraction!r}")
    if problems:
        raise DataError(f"{release_dir}: " + "; ".join(problems))
    claim_lm_listener_output(out_dir, force)  # before reading: a wrong --out fails at once
    paths = {s: release_dir / f"segments_{s}.pth" for s in RELEASE_SPLITS}
    for path in paths.values():
        if not path.is_file():
            raise DataError(f"{path}: missing from the release directory (an import needs {list(paths.values())})")

    cut = {"window": window, "delay_start": delay_start, "min_frames": min_frames, "max_time_before": max_time_before}
    windows = {}
    for split, path in paths.items():
        segs = read_release_segments(path)
        windows[split] = [w for seg in segs for w in segment_windows(seg, fps=FPS, **cut)]
        if not windows[split]:
            raise DataError(f"{path}: no window of at least {min_frames} frames after the first {delay_start}")
    held = dev_videos([w.fname for w in windows["train"]], dev_fraction)
    out = {
        "train": [w for w in windows["train"] if w.fname not in held],
        "dev": [w for w in windows["train"] if w.fname in held],
        "test": windows["val"],
    }
    if not out["train"]:
        raise DataError(f"{paths['train']}: every video went to dev; lower dev_fraction")

    train_frames = np.concatenate([w.expression for w in out["train"]]).astype(np.float64)
    std = train_frames.std(axis=0)
    std[std <= 1e-6] = 1.0  # a dimension constant in training (e.g. a synthetic corpus): unit scale
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, ws in out.items():
        save_windows(ws, out_dir, split)
    emoava.save_stats(out_dir, np.round(train_frames.mean(axis=0), 6), np.round(std, 6))
    meta = {
        "source": source,
        "dataset": DATASET,
        "format_version": 1,
        "expr_dim": EXPR_DIM,
        "speaker_dim": SPEAKER_DIM,
        "fps": FPS,
        "counts": {s: len(ws) for s, ws in out.items()},
        "windows": {**cut, "dev_fraction": dev_fraction, "dev_videos": sorted(held)},
        "release_split_of": {"train": "train", "dev": "train", "test": "val"},
        "release_files_sha256": {p.name: _sha256(p) for p in paths.values()},
    }
    if provenance:
        meta["params"] = provenance
    emoava.write_meta(out_dir, meta)
    return summarize(out_dir)


def summarize(data_dir: Path) -> dict:
    """:func:`facelab.data.emoava.summarize` plus the speaker frames' check and the source videos per split."""
    data_dir = Path(data_dir)
    out = emoava.summarize(data_dir)
    out["dataset"] = DATASET
    for split in emoava.available_splits(data_dir):
        speaker = load_speaker(data_dir, split)
        clips_path = speaker_paths(data_dir, split)[1]
        try:
            clips = json.loads(clips_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"{clips_path}: unreadable: {exc}") from None
        if not isinstance(clips, list) or len(clips) != len(speaker):
            raise DataError(f"{clips_path}: expected a list of {len(speaker)} [fname, start] pairs")
        out["splits"][split]["speaker_frames"] = int(sum(len(s) for s in speaker))
        out["splits"][split]["videos"] = len({c[0] for c in clips if isinstance(c, list) and c})
    return out
