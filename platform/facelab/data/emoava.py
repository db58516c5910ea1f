"""EmoAva on disk: the platform's split format, its validation, and the importer for the release.

EmoAva (Xu et al., "When Words Smile", EMNLP 2025) pairs an utterance with a sequence of 53-d
FLAME expression codes (50 expression coefficients + 3 jaw pose values) sampled at 25 fps.

The release ships pickles (``{split}_stage1_text.pkl``: ``list[str]``; ``{split}_stage1_exps.pkl``:
a list of ``[T_i, 53]`` float arrays) and two ``.npy`` statistics files. Pickles execute code on
load, so this module reads them only through :class:`_ReleaseUnpickler`, an allow-listed unpickler
that can rebuild numpy arrays of plain numbers (only as numpy writes them: checked arguments and
state), lists and strings, refuses every other global, and caps what a file may decode to at
:data:`DECODE_FACTOR` times its size.

The platform's own format (one directory per dataset) is pickle-free:

``{name}.npz``
    ``frames``: float32 ``[N, 53]``, all sequences of the split concatenated in order;
    ``offsets``: int64 ``[n + 1]``, sequence ``i`` is ``frames[offsets[i]:offsets[i + 1]]``.
    Written with fixed zip timestamps and no compression, so equal data gives equal bytes.
``{name}.texts.json``
    JSON list of the ``n`` utterances, in the same order.
``stats.json``
    Per-dimension ``mean`` and ``std`` (float32 ``[53]``) used to normalise expressions.
``meta.json``
    Provenance: ``source`` (``"synthetic"`` or ``"release"``), per-split counts, generator
    parameters or hashes of the imported release files.

Every reader validates what it returns and raises :class:`DataError` whose message names the file
(and the index, field or key) at fault.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import pickletools
import shutil
import struct
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EXPR_DIM = 53
"""Width of one expression frame: 50 FLAME expression coefficients + 3 jaw pose values."""

SPLITS = ("train", "dev", "test")
"""Split names, identical in the release (``dev_stage1_*.pkl``) and on disk here."""

SOURCES = ("synthetic", "release")
"""Allowed values of ``meta.json``'s ``source``."""

STATS_FILE = "stats.json"
META_FILE = "meta.json"
LONG_SEQUENCE_FRAMES = 256
"""The paper's maximum sequence length; :func:`summarize` counts sequences longer than this."""

_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed timestamp inside .npz files -> byte-stable output


class DataError(ValueError):
    """Dataset file missing, unreadable or invalid. The message names the file and the item at fault."""


@dataclass
class EmoAvaSplit:
    """One split: utterances and their expression sequences, index-aligned."""

    texts: list[str]
    sequences: list[np.ndarray]  # each float32 (T_i, 53), T_i >= 1

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> np.ndarray:
        """Frame count of every sequence, int64 ``(n,)``."""
        return np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_split(split: EmoAvaSplit, source: str) -> None:
    """Check a split; raise :class:`DataError` naming ``source`` and the first offending index.

    Checks: ``texts`` and ``sequences`` are lists of equal length; every text is a ``str``; every
    sequence is a 2-d floating-point ``np.ndarray`` of shape ``(T, 53)`` with ``T >= 1`` and only
    finite values. (float64 arrays are accepted; :func:`save_split` stores float32.)
    """
    texts, seqs = split.texts, split.sequences
    if not isinstance(texts, list):
        raise DataError(f"{source}: texts must be a list, got {type(texts).__name__}")
    if not isinstance(seqs, list):
        raise DataError(f"{source}: sequences must be a list, got {type(seqs).__name__}")
    if len(texts) != len(seqs):
        raise DataError(f"{source}: length mismatch: {len(texts)} texts but {len(seqs)} sequences")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{source}: text[{i}] is {type(text).__name__}, expected str")
    for i, seq in enumerate(seqs):
        _check_sequence(seq, f"{source}: sequence[{i}]")


def _check_sequence(seq: Any, where: str) -> None:
    if not isinstance(seq, np.ndarray):
        raise DataError(f"{where} is {type(seq).__name__}, expected a numpy array")
    if not np.issubdtype(seq.dtype, np.floating):
        raise DataError(f"{where} has dtype {seq.dtype}, expected floating point")
    if seq.ndim != 2 or seq.shape[1] != EXPR_DIM:
        raise DataError(f"{where} has shape {seq.shape}, expected (T, {EXPR_DIM})")
    if seq.shape[0] < 1:
        raise DataError(f"{where} is empty (0 frames)")
    if not np.isfinite(seq).all():
        bad = np.argwhere(~np.isfinite(seq))[0]
        raise DataError(f"{where} has a non-finite value at frame {bad[0]}, dim {bad[1]}")


def _check_vector(vec: np.ndarray, where: str, *, positive: bool = False) -> np.ndarray:
    vec = np.asarray(vec)
    if not np.issubdtype(vec.dtype, np.floating) or vec.shape != (EXPR_DIM,):
        raise DataError(f"{where}: expected a float vector of shape ({EXPR_DIM},), got {vec.dtype} {vec.shape}")
    if not np.isfinite(vec).all():
        raise DataError(f"{where}: non-finite value at dim {int(np.argmax(~np.isfinite(vec)))}")
    if positive and (vec <= 0).any():
        raise DataError(f"{where}: std must be > 0, dim {int(np.argmax(vec <= 0))} is {vec[vec <= 0][0]}")
    return vec.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Atomic, byte-stable writers
# --------------------------------------------------------------------------------------------


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write ``path`` through a temporary file in the same directory, then ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_json(path: Path, obj: Any) -> None:
    data = (json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode("utf-8")
    _atomic_write(path, lambda fh: fh.write(data))


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` (uncompressed, no pickles) but with fixed zip metadata, so it is byte-stable."""

    def write(fh: io.BufferedWriter) -> None:
        with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED) as zf:
            for key in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())

    _atomic_write(path, write)


def json_object_or_none(path: Path, max_bytes: int = 1 << 20) -> dict | None:
    """``path``'s JSON object, or None when it is missing, too large, unreadable or not an object.

    For telling whose directory this is (:func:`claim_output_dir`), where a foreign or broken file
    simply means "not ours", never an error of its own."""
    try:
        if not path.is_file() or path.stat().st_size > max_bytes:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def claim_output_dir(
    out_dir: Path, *, owned: Callable[[Path], bool], what: str, marker: str, force: bool = False
) -> None:
    """Refuse to write ``what`` over a directory this writer did not make, unless ``force``.

    The dataset and model writers replace (or write into) their ``--out`` directory, so a slip such
    as ``--out data`` would wipe or litter a whole tree of someone's files. Accepted without
    ``force``: a path that does not exist, an empty directory, or one that ``owned`` recognises by
    the writer's own ``marker`` (e.g. its ``meta.json`` of the same format) -- which is what a DVC
    stage re-running over its previous output finds. A path that exists but is not a directory is
    refused even with ``force``: no writer replaces a file with a directory.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory; refusing to write {what} there")
    if force:
        return
    try:
        empty = next(out_dir.iterdir(), None) is None
    except OSError as exc:
        raise DataError(f"{out_dir}: cannot list the output directory: {exc}") from None
    if empty or owned(out_dir):
        return
    raise DataError(
        f"{out_dir}: refusing to write {what} there: the directory is not empty and was not written by "
        f"this command (no {marker}), so replacing it could destroy other files. Choose another --out, "
        "or pass --force (force=True) to replace it anyway"
    )


def replace_dir(out_dir: Path, fill: Callable[[Path], None]) -> None:
    """Write a whole output directory at once: ``fill`` writes into a temporary sibling, which then
    replaces ``out_dir``. If anything fails, the temporary directory goes and the previous
    ``out_dir`` (if any) is put back, so a reader never sees a half-written output."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o755)
        fill(tmp)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".old"))
            os.replace(out_dir, old / "previous")
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not out_dir.exists():
            os.replace(old / "previous", out_dir)  # put the previous output back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def is_emoava_dir(data_dir: Path) -> bool:
    """Whether ``data_dir`` holds an EmoAva dataset written here (its ``meta.json``: a known
    ``source`` and ``expr_dim`` 53) -- the directory :func:`claim_output_dir` lets these writers replace."""
    meta = json_object_or_none(Path(data_dir) / META_FILE)
    return meta is not None and meta.get("source") in SOURCES and meta.get("expr_dim") == EXPR_DIM


def claim_emoava_output(out_dir: Path, force: bool) -> None:
    """:func:`claim_output_dir` for the EmoAva writers (the generator and the release importer)."""
    claim_output_dir(
        out_dir,
        owned=is_emoava_dir,
        what="an EmoAva dataset",
        marker=f"{META_FILE} of an EmoAva dataset (source {' or '.join(SOURCES)}, expr_dim {EXPR_DIM})",
        force=force,
    )


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def split_paths(data_dir: Path, name: str) -> tuple[Path, Path]:
    """``({name}.npz, {name}.texts.json)`` inside ``data_dir``."""
    data_dir = Path(data_dir)
    return data_dir / f"{name}.npz", data_dir / f"{name}.texts.json"


def save_split(split: EmoAvaSplit, data_dir: Path, name: str) -> None:
    """Validate ``split`` and write ``{name}.npz`` + ``{name}.texts.json`` into ``data_dir`` atomically."""
    npz_path, texts_path = split_paths(data_dir, name)
    validate_split(split, f"split {name!r} (to be written to {npz_path})")
    lengths = split.lengths
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if split.sequences:
        frames = np.concatenate(split.sequences, axis=0).astype(np.float32, copy=False)  # (N, 53)
    else:
        frames = np.zeros((0, EXPR_DIM), dtype=np.float32)
    _write_npz(npz_path, {"frames": frames, "offsets": offsets})
    _write_json(texts_path, list(split.texts))


def load_split(data_dir: Path, name: str) -> EmoAvaSplit:
    """Read and validate split ``name`` from ``data_dir``; :class:`DataError` if missing or corrupt.

    The returned sequences are float32 views into one contiguous ``(N, 53)`` frame array.
    """
    npz_path, texts_path = split_paths(data_dir, name)
    if not npz_path.is_file():
        raise DataError(f"{npz_path}: missing (split {name!r} not found in {Path(data_dir)})")
    try:
        with np.load(npz_path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = {"frames", "offsets"} - keys
            if missing:
                raise DataError(f"{npz_path}: missing array(s) {sorted(missing)}; has {sorted(keys)}")
            frames = npz["frames"]
            offsets = npz["offsets"]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise DataError(f"{npz_path}: unreadable or corrupt: {exc}") from None

    if frames.dtype != np.float32 or frames.ndim != 2 or frames.shape[1] != EXPR_DIM:
        raise DataError(f"{npz_path}: frames must be float32 (N, {EXPR_DIM}), got {frames.dtype} {frames.shape}")
    if offsets.dtype != np.int64 or offsets.ndim != 1 or offsets.size < 1:
        raise DataError(f"{npz_path}: offsets must be int64 (n + 1,), got {offsets.dtype} {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != frames.shape[0]:
        raise DataError(
            f"{npz_path}: offsets must start at 0 and end at the frame count {frames.shape[0]}, "
            f"got {int(offsets[0])} .. {int(offsets[-1])}"
        )
    steps = np.diff(offsets)
    if (steps < 1).any():
        i = int(np.argmax(steps < 1))
        raise DataError(f"{npz_path}: sequence[{i}] is empty or has negative length ({int(steps[i])} frames)")

    texts = _read_json(texts_path)
    if not isinstance(texts, list):
        raise DataError(f"{texts_path}: expected a JSON list of strings, got {type(texts).__name__}")
    if len(texts) != offsets.size - 1:
        raise DataError(
            f"{texts_path}: length mismatch: {len(texts)} texts but {offsets.size - 1} sequences in {npz_path.name}"
        )
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise DataError(f"{texts_path}: text[{i}] is {type(text).__name__}, expected str")

    sequences = [frames[offsets[i] : offsets[i + 1]] for i in range(offsets.size - 1)]
    split = EmoAvaSplit(texts=texts, sequences=sequences)
    validate_split(split, str(npz_path))
    return split


def available_splits(data_dir: Path) -> list[str]:
    """The names in :data:`SPLITS` that have a ``.npz`` file in ``data_dir``, in canonical order."""
    return [s for s in SPLITS if split_paths(data_dir, s)[0].is_file()]


# --------------------------------------------------------------------------------------------
# Statistics and metadata
# --------------------------------------------------------------------------------------------


def save_stats(data_dir: Path, mean: np.ndarray, std: np.ndarray) -> None:
    """Write per-dimension ``mean`` / ``std`` (``[53]``, std > 0) to ``stats.json``."""
    path = Path(data_dir) / STATS_FILE
    mean32 = _check_vector(mean, f"{path}: mean")
    std32 = _check_vector(std, f"{path}: std", positive=True)
    # float32 -> Python float is exact, and JSON's shortest repr round-trips it exactly.
    _write_json(path, {"dim": EXPR_DIM, "mean": [float(v) for v in mean32], "std": [float(v) for v in std32]})


def load_stats(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``stats.json``: ``(mean, std)``, both float32 ``(53,)``."""
    path = Path(data_dir) / STATS_FILE
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object with 'mean' and 'std'")
    out = []
    for key in ("mean", "std"):
        if key not in doc:
            raise DataError(f"{path}: missing field {key!r}")
        try:
            vec = np.asarray(doc[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise DataError(f"{path}: field {key!r} is not a list of numbers") from None
        out.append(_check_vector(vec, f"{path}: field {key!r}", positive=(key == "std")))
    return out[0], out[1]


def write_meta(data_dir: Path, meta: dict) -> None:
    """Write ``meta.json`` (provenance). ``meta['source']`` must be ``'synthetic'`` or ``'release'``."""
    path = Path(data_dir) / META_FILE
    if not isinstance(meta, dict):
        raise DataError(f"{path}: meta must be a dict, got {type(meta).__name__}")
    if meta.get("source") not in SOURCES:
        raise DataError(f"{path}: field 'source' must be one of {SOURCES}, got {meta.get('source')!r}")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: meta is not JSON-serialisable: {exc}") from None
    _write_json(path, meta)


def read_meta(data_dir: Path) -> dict:
    """Read ``meta.json``; :class:`DataError` if missing, corrupt or without a valid ``source``."""
    path = Path(data_dir) / META_FILE
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise DataError(f"{path}: expected a JSON object")
    if doc.get("source") not in SOURCES:
        raise DataError(f"{path}: field 'source' must be one of {SOURCES}, got {doc.get('source')!r}")
    return doc


# --------------------------------------------------------------------------------------------
# Release import (allow-listed unpickling)
# --------------------------------------------------------------------------------------------

DECODE_FACTOR = 4
"""A release pickle may decode to at most ``DECODE_FACTOR`` x its file size (+ :data:`DECODE_SLACK`).

A genuine pickle of strings and numpy arrays decodes to about its own size (a protocol-2 array, whose
bytes travel as latin-1 text, is counted three times: the text's bytes, the array and the result),
so the cap never bites on real files; it stops a few hundred bytes from asking for gigabytes (an
array shape not backed by data, a string re-encoded over and over, one array referenced a million
times)."""

DECODE_SLACK = 1 << 16
_MAX_NESTING = 8  # list > sequence > frame > value is 4 deep; much deeper is not a release file
_MAX_NDIM = 8
_ARRAY_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8"})
"""``numpy.dtype`` codes an array of a release file may have: plain numbers (no objects, no records)."""
_DTYPE_STATE_TAIL = (None, None, None, -1, -1, 0)  # numpy's state of a plain dtype after the byte order
_NO_CONTAINERS = "EmoAva release files hold lists, strings and numpy arrays, no dicts or sets"
_REFUSED_OPCODES = {
    pickle.EMPTY_DICT: _NO_CONTAINERS,
    pickle.DICT: _NO_CONTAINERS,
    pickle.SETITEM: _NO_CONTAINERS,
    pickle.SETITEMS: _NO_CONTAINERS,
    pickle.EMPTY_SET: _NO_CONTAINERS,
    pickle.FROZENSET: _NO_CONTAINERS,
    pickle.ADDITEMS: _NO_CONTAINERS,
    pickle.NEWOBJ: "no object of a release file is made with cls.__new__",
    pickle.NEWOBJ_EX: "no object of a release file is made with cls.__new__",
}


def _numpy_global(modules: Iterable[str], attr: str) -> Callable[[], Any]:
    def resolve() -> Any:
        import importlib

        for mod in modules:
            try:
                return getattr(importlib.import_module(mod), attr)
            except (ImportError, AttributeError):
                continue
        raise AttributeError(attr)

    return resolve


_RECONSTRUCT = _numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
_FROMBUFFER = _numpy_global(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")


def _brief(obj: Any, depth: int = 0) -> str:
    """A short description of an unpickled value for an error message (never a huge or recursive repr)."""
    if obj is None or isinstance(obj, (bool, float)):
        return repr(obj)
    if isinstance(obj, int):
        return repr(obj) if obj.bit_length() <= 64 else f"<{obj.bit_length()}-bit int>"
    if isinstance(obj, (str, bytes, bytearray)):
        return repr(obj[:24]) + ("…" if len(obj) > 24 else "")
    if isinstance(obj, (tuple, list)) and depth < 2:
        inner = ", ".join(_brief(x, depth + 1) for x in obj[:6]) + (", …" if len(obj) > 6 else "")
        return f"({inner}{',' if len(obj) == 1 else ''})" if isinstance(obj, tuple) else f"[{inner}]"
    if isinstance(obj, _PendingDtype):
        return f"numpy.dtype({obj.code!r})"
    if isinstance(obj, _PendingArray):
        return "<numpy array>"
    return f"<{type(obj).__name__}>"


class _PendingDtype:
    """What ``numpy.dtype(code, False, True)`` gives the unpickler. The real dtype is made only from a
    checked state (byte order), so no state from the file ever reaches numpy's ``__setstate__``."""

    __slots__ = ("code", "dtype")

    def __init__(self, code: str):
        self.code = code
        self.dtype: np.dtype | None = None


class _PendingArray:
    """What numpy's ``_reconstruct`` / ``_frombuffer`` give the unpickler. The array is made only from
    a checked state whose data fills its shape exactly; one left without a state is refused at the end."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray | None = None):
        self.array = array


def _refusing(code: bytes, why: str) -> Callable[[Any], None]:
    """An opcode handler that refuses ``code`` with a message naming it."""

    def load(self: _ReleaseUnpickler) -> None:
        name = next((op.name for op in pickletools.opcodes if op.code == code.decode("latin-1")), repr(code))
        raise self._refuse(f"opcode {name}: {why}")

    return load


class _ReleaseUnpickler(pickle._Unpickler):
    """Allow-listed unpickler for the EmoAva release: numpy arrays of plain numbers, lists and strings.

    It is the pure-Python unpickler on purpose: the C one sizes its memo table from an index in the
    file (ten bytes can make it allocate and zero tens of gigabytes) and pre-allocates ``BYTEARRAY8``
    buffers of their declared length; here the memo is a dict and every length is checked.

    Every global is a checking stand-in (see :meth:`find_class`): numpy's ``_reconstruct`` only with
    the arguments numpy itself writes, ``(ndarray, (0,), b'b')``, after which the array is made by its
    state (BUILD) step, whose data must fill its shape exactly -- a ``_reconstruct`` without a state
    would be uninitialised memory of any size and is refused; ``_codecs.encode`` only as
    ``(str, 'latin1')``, how protocols 0-2 carry bytes. What the stand-ins decode, and the final
    result (every reference counted), is charged to a budget of :data:`DECODE_FACTOR` x the file
    size. Every refusal is a :class:`DataError` naming the file.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    # What a subclass for another kind of file changes: its error type, budget and the refusal's wording.
    error: type[DataError] = DataError
    decode_factor = DECODE_FACTOR
    genuine = "a genuine release pickle decodes to about its own size, so this one is corrupt or a memory bomb"

    def __init__(self, file: io.BytesIO, source: str, size: int):
        super().__init__(file)
        self._source = source
        self._size = size
        self._limit = self.decode_factor * size + DECODE_SLACK
        self._used = 0
        self._ndarray = self._ndarray_called  # kept once: _reconstruct checks its first argument is this
        simple = {"list": self._list, "str": self._str, "float": self._float, "bytes": self._bytes}
        self._globals: dict[tuple[str, str], Callable[..., Any]] = {
            # ndarray.__reduce__ (protocols 0-4, and 5 for non-contiguous arrays); numpy < 2 says numpy.core
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,
            # ndarray.__reduce_ex__(5) of a contiguous array: frombuffer(buf, dtype).reshape(shape, order)
            ("numpy._core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy.core.numeric", "_frombuffer"): self._frombuffer,
            ("numpy", "ndarray"): self._ndarray,
            ("numpy", "dtype"): self._dtype,
            # protocols 0-2 carry bytes as latin-1 text re-encoded with codecs.encode
            ("_codecs", "encode"): self._encode,
            # plain scalars / containers (protocols <= 2 written by Python 3 name the module __builtin__)
            **{(mod, name): fn for mod in ("builtins", "__builtin__") for name, fn in simple.items()},
        }

    # ---- refusals and the budget ------------------------------------------------------------

    def _refuse(self, what: str) -> DataError:
        return self.error(f"{self._source}: refused {what}")

    def spend(self, n: int, what: str) -> None:
        """Charge ``n`` decoded bytes for ``what``; refuse the file once the budget is exceeded."""
        self._used += n
        if self._used > self._limit:
            raise self._refuse(
                f"{what}: the decoded data would exceed {self._limit:,} bytes ({self.decode_factor}x the file's "
                f"{self._size:,} bytes + {DECODE_SLACK:,}); {self.genuine}"
            )

    # ---- the unpickler's hooks --------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        fn = self._globals.get((module, name))
        if fn is None:
            raise DataError(
                f"{self._source}: refused to unpickle global {module}.{name} "
                "(only numpy arrays, lists and strings are allowed in EmoAva release files)"
            )
        return fn

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._source}: refused persistent id {_brief(pid)} in pickle")

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, _PendingArray):
            self._build_array(inst, state)
        elif isinstance(inst, _PendingDtype):
            self._build_dtype(inst, state)
        else:
            raise self._refuse(
                f"a state (BUILD) for {_brief(inst)}: in release files only numpy arrays and dtypes have one"
            )

    def _load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        if n > self._size:
            raise self._refuse(f"BYTEARRAY8 of {n:,} bytes in a file of {self._size:,} bytes")
        data = self.read(n)
        if len(data) != n:
            raise DataError(f"{self._source}: pickle data was truncated (BYTEARRAY8)")
        self.append(bytearray(data))

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
    dispatch.update({code[0]: _refusing(code, why) for code, why in _REFUSED_OPCODES.items()})

    # ---- numpy ------------------------------------------------------------------------------

    def _ndarray_called(self, *args: Any) -> Any:
        raise self._refuse(
            f"numpy.ndarray{_brief(args)}: an array is made only by _reconstruct and its state, "
            "never by calling ndarray (that allocates uninitialised memory of any shape)"
        )

    def _reconstruct(self, *args: Any) -> _PendingArray:
        if len(args) != 3 or args[0] is not self._ndarray or args[1] != (0,) or args[2] != b"b":
            raise self._refuse(
                f"numpy _reconstruct{_brief(args)}: only numpy's own call _reconstruct(ndarray, (0,), b'b') "
                "is accepted; an array's shape and data come from its state (BUILD) step"
            )
        return _PendingArray()

    def _shape(self, shape: Any, what: str) -> tuple[int, ...]:
        if (
            type(shape) is not tuple
            or len(shape) > _MAX_NDIM
            or any(type(d) is not int or not 0 <= d < 1 << 62 for d in shape)
        ):
            raise self._refuse(f"{what}: shape {_brief(shape)} is not a tuple of at most {_MAX_NDIM} sizes")
        return shape

    def _checked_dtype(self, dtype: Any, what: str) -> np.dtype:
        if not isinstance(dtype, _PendingDtype) or dtype.dtype is None:
            raise self._refuse(f"{what}: dtype {_brief(dtype)} is not a numpy.dtype with its state")
        return dtype.dtype

    def _check_data(self, data: Any, shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
        need = math.prod(shape) * dtype.itemsize
        if len(data) != need:
            raise self._refuse(f"{what}: {len(data):,} data bytes for shape {shape} of {dtype} (which needs {need:,})")
        self.spend(need, f"{what} of shape {shape}")

    def _build_array(self, pending: _PendingArray, state: Any) -> None:
        what = "numpy array state"
        if pending.array is not None:
            raise self._refuse(f"a second {what} for the same array")
        if type(state) is not tuple or len(state) != 5:
            raise self._refuse(f"{what} {_brief(state)}: expected (1, shape, dtype, is_fortran, data)")
        version, shape, dtype, fortran, data = state
        if type(version) is not int or version != 1:
            raise self._refuse(f"{what}: version {_brief(version)}, numpy writes 1")
        shape = self._shape(shape, what)
        dt = self._checked_dtype(dtype, what)
        if type(fortran) is not bool:
            raise self._refuse(f"{what}: is_fortran is {_brief(fortran)}, expected True or False")
        if type(data) is not bytes:
            raise self._refuse(f"{what}: data is {_brief(data)}, expected bytes")
        self._check_data(data, shape, dt, what)
        array = _RECONSTRUCT()(np.ndarray, (0,), b"b")
        array.__setstate__((1, shape, dt, fortran, data))
        pending.array = array

    def _frombuffer(self, *args: Any) -> _PendingArray:
        what = "numpy _frombuffer"
        if len(args) != 4:
            raise self._refuse(f"{what}{_brief(args)}: expected (buffer, dtype, shape, order)")
        buf, dtype, shape, order = args
        if type(buf) not in (bytes, bytearray):
            raise self._refuse(f"{what}: buffer is {_brief(buf)}, expected bytes")
        dt = self._checked_dtype(dtype, what)
        shape = self._shape(shape, what)
        if type(order) is not str or order not in ("C", "F"):
            raise self._refuse(f"{what}: order {_brief(order)}, expected 'C' or 'F'")
        self._check_data(buf, shape, dt, what)
        return _PendingArray(_FROMBUFFER()(buf, dt, shape, order))

    def _dtype(self, *args: Any) -> _PendingDtype:
        code = args[0] if args else None
        if (
            len(args) != 3
            or type(code) is not str
            or code not in _ARRAY_DTYPES
            or type(args[1]) not in (bool, int)
            or args[1] != 0
            or type(args[2]) not in (bool, int)
            or args[2] != 1
        ):
            raise self._refuse(
                f"numpy.dtype{_brief(args)}: only numpy's own dtype(code, False, True) of a plain number "
                f"type ({', '.join(sorted(_ARRAY_DTYPES))}) is accepted"
            )
        return _PendingDtype(code)

    def _build_dtype(self, pending: _PendingDtype, state: Any) -> None:
        what = f"numpy.dtype({pending.code!r}) state {_brief(state)}"
        if pending.dtype is not None:
            raise self._refuse(f"a second {what}")
        if (
            type(state) is not tuple
            or len(state) != 8
            or type(state[0]) is not int
            or state[0] != 3
            or type(state[1]) is not str
            or state[1] not in ("<", ">", "|", "=")
            or any(type(a) is not type(b) or a != b for a, b in zip(state[2:], _DTYPE_STATE_TAIL))
        ):
            raise self._refuse(f"{what}: expected numpy's (3, byteorder, None, None, None, -1, -1, 0)")
        dt = np.dtype(pending.code)
        pending.dtype = dt.newbyteorder(state[1]) if state[1] in ("<", ">") and dt.itemsize > 1 else dt

    # ---- bytes and builtins -----------------------------------------------------------------

    def _encode(self, *args: Any) -> bytes:
        if len(args) != 2 or type(args[0]) is not str or type(args[1]) is not str or args[1] != "latin1":
            raise self._refuse(
                f"_codecs.encode{_brief(args)}: only encode(str, 'latin1') is accepted (how pickle carries bytes)"
            )
        self.spend(len(args[0]), "_codecs.encode")
        try:
            return args[0].encode("latin1")
        except UnicodeEncodeError:
            raise self._refuse(f"_codecs.encode({_brief(args[0])}, 'latin1'): not latin-1 text") from None

    def _bytes(self, *args: Any) -> bytes:
        if args:
            raise self._refuse(f"bytes{_brief(args)}: only bytes() (the empty bytes of protocols 0-2) is accepted")
        return b""

    def _str(self, *args: Any) -> str:
        if not args:
            return ""
        if len(args) != 1 or type(args[0]) is not str:
            raise self._refuse(f"str{_brief(args)}: only str() or str(a string) is accepted")
        self.spend(len(args[0]), "str()")
        return args[0]

    def _list(self, *args: Any) -> list:
        if not args:
            return []
        if len(args) != 1 or type(args[0]) not in (list, tuple):
            raise self._refuse(f"list{_brief(args)}: only list() or list(a list or tuple) is accepted")
        self.spend(len(args[0]), "list()")
        return list(args[0])

    def _float(self, *args: Any) -> float:
        ok = len(args) == 1 and (type(args[0]) in (int, float) or (type(args[0]) is str and len(args[0]) <= 64))
        try:
            if ok:
                return float(args[0])
        except (ValueError, OverflowError):
            pass
        raise self._refuse(f"float{_brief(args)}: only float(a number or a short numeric string) is accepted")

    # ---- the result -------------------------------------------------------------------------

    def finish(self, obj: Any) -> Any:
        """The loaded object with every pending array replaced by its array; refuses arrays without a
        state, stray dtypes or globals, nesting deeper than :data:`_MAX_NESTING`, and charges every
        reference to the budget (shared references cost each time: the readers copy them)."""
        path: list[int] = []
        return self._finish(obj, path)

    def _finish(self, obj: Any, path: list[int]) -> Any:
        where = "".join(f"[{i}]" for i in path) or "the top-level object"
        t = type(obj)
        if t is _PendingArray:
            if obj.array is None:
                raise self._refuse(
                    f"{where}: a numpy array without its state (BUILD) step (numpy always writes one; "
                    "without it the array would be uninitialised memory)"
                )
            self.spend(max(1, obj.array.nbytes), f"{where}: numpy array")
            return obj.array
        if t is str or t is bytes or t is bytearray:
            self.spend(max(1, len(obj)), f"{where}: {t.__name__}")
            return obj
        if obj is None or t is bool or t is int or t is float:
            self.spend(1, f"{where}: {t.__name__}")
            return obj
        if t is list or t is tuple:
            if len(path) >= _MAX_NESTING:
                raise self._refuse(f"{where}: lists nested deeper than {_MAX_NESTING} levels")
            self.spend(1, f"{where}: {t.__name__}")
            out = []
            for i, item in enumerate(obj):
                path.append(i)
                out.append(self._finish(item, path))
                path.pop()
            return out if t is list else tuple(out)
        raise self._refuse(f"{where}: {_brief(obj)} (release files hold lists, strings and numpy arrays)")


def _safe_unpickle(path: Path) -> Any:
    """Load a release pickle through :class:`_ReleaseUnpickler`; every failure is a DataError naming ``path``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        data = path.read_bytes()  # in memory: no read can ask the file for more than it holds
    except OSError as exc:
        raise DataError(f"{path}: unreadable: {exc}") from None
    try:
        unpickler = _ReleaseUnpickler(io.BytesIO(data), str(path), len(data))
        return unpickler.finish(unpickler.load())
    except DataError:
        raise
    except Exception as exc:  # pickle raises many types on corrupt input
        raise DataError(f"{path}: not a readable pickle: {type(exc).__name__}: {str(exc)[:200]}") from None


def read_release_texts(path: Path) -> list[str]:
    """Safely read a release text pickle (``{split}_stage1_text.pkl``): a list of ``str``."""
    obj = _safe_unpickle(path)
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a pickled list of str, got {type(obj).__name__}")
    for i, text in enumerate(obj):
        if not isinstance(text, str):
            raise DataError(f"{path}: text[{i}] is {type(text).__name__}, expected str")
    return obj


def read_release_exps(path: Path) -> list[np.ndarray]:
    """Safely read a release expression pickle (``{split}_stage1_exps.pkl``) as float32 ``(T_i, 53)`` arrays."""
    obj = _safe_unpickle(path)
    if not isinstance(obj, (list, tuple)):
        raise DataError(f"{path}: expected a pickled list of arrays, got {type(obj).__name__}")
    seqs: list[np.ndarray] = []
    for i, item in enumerate(obj):
        if isinstance(item, np.ndarray) and not np.issubdtype(item.dtype, np.floating):
            raise DataError(f"{path}: sequence[{i}] has dtype {item.dtype}, expected floating point")
        try:
            arr = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError):
            raise DataError(f"{path}: sequence[{i}] is not a numeric array ({type(item).__name__})") from None
        _check_sequence(arr, f"{path}: sequence[{i}]")
        seqs.append(arr)
    return seqs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_release(release_dir: Path, out_dir: Path, splits: Sequence[str] = SPLITS, *, force: bool = False) -> dict:
    """Convert the EmoAva release in ``release_dir`` into the platform format in ``out_dir``.

    Needs, for every split in ``splits``, both ``{split}_stage1_text.pkl`` and
    ``{split}_stage1_exps.pkl`` (a text-only pickle can be read with :func:`read_release_texts`),
    plus ``stage1_mean.npy`` / ``stage1_std.npy``. Pickles are read only through the allow-listed
    unpickler. All inputs are read and validated before anything is written. ``out_dir`` must not
    exist, be empty or hold an EmoAva dataset written here (:func:`claim_output_dir`); ``force``
    writes into any directory. Returns :func:`summarize` of ``out_dir`` plus the SHA-256 of every
    source file (also in ``meta.json``).
    """
    release_dir, out_dir = Path(release_dir), Path(out_dir)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DataError(f"{release_dir}: splits must be a non-empty subset of {SPLITS}, got {list(splits)}")
    claim_emoava_output(out_dir, force)

    wanted = [release_dir / "stage1_mean.npy", release_dir / "stage1_std.npy"]
    for split in splits:
        wanted += [release_dir / f"{split}_stage1_text.pkl", release_dir / f"{split}_stage1_exps.pkl"]
    for path in wanted:
        if not path.is_file():
            raise DataError(f"{path}: missing from the release directory (needed to import {list(splits)})")

    loaded: dict[str, EmoAvaSplit] = {}
    for split in splits:
        text_path = release_dir / f"{split}_stage1_text.pkl"
        exps_path = release_dir / f"{split}_stage1_exps.pkl"
        texts = read_release_texts(text_path)
        seqs = read_release_exps(exps_path)
        if len(texts) != len(seqs):
            raise DataError(
                f"{exps_path}: length mismatch: {len(seqs)} sequences but {len(texts)} texts in {text_path.name}"
            )
        split_obj = EmoAvaSplit(texts=texts, sequences=seqs)
        validate_split(split_obj, str(exps_path))
        loaded[split] = split_obj

    stats = []
    for path in wanted[:2]:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(f"{path}: unreadable .npy: {exc}") from None
        if arr.size == EXPR_DIM:
            arr = arr.reshape(EXPR_DIM)  # tolerate (1, 53) as written by some exporters
        stats.append(_check_vector(arr, str(path), positive=path.name == "stage1_std.npy"))

    out_dir.mkdir(parents=True, exist_ok=True)
    for split, split_obj in loaded.items():
        save_split(split_obj, out_dir, split)
    save_stats(out_dir, stats[0], stats[1])
    files = {p.name: _sha256(p) for p in wanted}
    write_meta(
        out_dir,
        {
            "source": "release",
            "format_version": 1,
            "expr_dim": EXPR_DIM,
            "fps": 25,
            "counts": {s: len(loaded[s]) for s in splits},
            "release_files_sha256": files,
        },
    )
    summary = summarize(out_dir)
    summary["release_files_sha256"] = files
    return summary


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


def _split_summary(split: EmoAvaSplit) -> dict:
    lengths = split.lengths
    counts = Counter(split.texts)
    shared = {t: c for t, c in counts.items() if c >= 2}
    words = np.fromiter((len(t.split()) for t in split.texts), dtype=np.int64, count=len(split.texts))
    return {
        "sequences": int(len(split)),
        "frames": int(lengths.sum()),
        "mean_length": round(float(lengths.mean()), 4) if len(split) else 0.0,
        "max_length": int(lengths.max()) if len(split) else 0,
        f"over_{LONG_SEQUENCE_FRAMES}": int((lengths > LONG_SEQUENCE_FRAMES).sum()),
        "one_to_many_instances": int(sum(shared.values())),
        "one_to_many_texts": len(shared),
        "max_sequences_per_text": int(max(counts.values())) if counts else 0,
        "mean_words": round(float(words.mean()), 4) if len(split) else 0.0,
    }


def summarize(data_dir: Path) -> dict:
    """Counts per split and overall: sequences, frames, mean/max length, sequences longer than 256
    frames, one-to-many instances (sequences whose exact text occurs 2+ times) and texts, mean words.

    Within a split, one-to-many is counted inside that split; ``total`` counts it over all splits.
    """
    data_dir = Path(data_dir)
    names = available_splits(data_dir)
    if not names:
        raise DataError(f"{data_dir}: no split files ({', '.join(f'{s}.npz' for s in SPLITS)}) found")
    loaded = {name: load_split(data_dir, name) for name in names}
    out: dict[str, Any] = {"splits": {name: _split_summary(s) for name, s in loaded.items()}}
    everything = EmoAvaSplit(
        texts=[t for s in loaded.values() for t in s.texts],
        sequences=[q for s in loaded.values() for q in s.sequences],
    )
    out["total"] = _split_summary(everything)
    try:
        out["source"] = read_meta(data_dir)["source"]
    except DataError:
        out["source"] = None
    return out
