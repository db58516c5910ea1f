"""EmoAva on disk: the platform's split format, its validation, and the importer for the release.

EmoAva (Xu et al., "When Words Smile", EMNLP 2025) pairs an utterance with a sequence of 53-d
FLAME expression codes (50 expression coefficients + 3 jaw pose values) sampled at 25 fps.

The release ships pickles (``{split}_stage1_text.pkl``: ``list[str]``; ``{split}_stage1_exps.pkl``:
a list of ``[T_i, 53]`` float arrays) and two ``.npy`` statistics files. Pickles execute code on
load, so this module reads them only through :class:`_ReleaseUnpickler`, an allow-listed unpickler
that can rebuild numpy arrays, lists and strings and refuses every other global.

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
import os
import pickle
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

# (module, name) -> resolver of the object to hand to the unpickler. Nothing else is importable.
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    # ndarray.__reduce__ (pickle protocols 0-4) and, for numpy < 2, the old module path
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    # ndarray.__reduce_ex__ with protocol 5 (contiguous arrays): frombuffer(...).reshape(...)
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # protocols 0-2 carry the raw array bytes as latin-1 text re-encoded with codecs.encode
    ("_codecs", "encode"): lambda: __import__("codecs").encode,
    # plain containers / scalars (protocols <= 2 written by Python 3 name the module __builtin__)
    **{
        (mod, name): (lambda obj=obj: obj)
        for mod in ("builtins", "__builtin__")
        for name, obj in (("list", list), ("str", str), ("float", float), ("bytes", bytes))
    },
}


class _ReleaseUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals in ``_ALLOWED_GLOBALS``; anything else is a DataError."""

    def __init__(self, file: io.BufferedReader, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        resolver = _ALLOWED_GLOBALS.get((module, name))
        if resolver is None:
            raise DataError(
                f"{self._source}: refused to unpickle global {module}.{name} "
                "(only numpy arrays, lists and strings are allowed in EmoAva release files)"
            )
        return resolver()

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._source}: refused persistent id {pid!r} in pickle")


def _safe_unpickle(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: missing")
    try:
        with open(path, "rb") as fh:
            return _ReleaseUnpickler(fh, str(path)).load()
    except DataError:
        raise
    except Exception as exc:  # pickle raises many types on corrupt input
        raise DataError(f"{path}: not a readable pickle: {type(exc).__name__}: {exc}") from None


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


def import_release(release_dir: Path, out_dir: Path, splits: Sequence[str] = SPLITS) -> dict:
    """Convert the EmoAva release in ``release_dir`` into the platform format in ``out_dir``.

    Needs, for every split in ``splits``, both ``{split}_stage1_text.pkl`` and
    ``{split}_stage1_exps.pkl`` (a text-only pickle can be read with :func:`read_release_texts`),
    plus ``stage1_mean.npy`` / ``stage1_std.npy``. Pickles are read only through the allow-listed
    unpickler. All inputs are read and validated before anything is written. Returns
    :func:`summarize` of ``out_dir`` plus the SHA-256 of every source file (also in ``meta.json``).
    """
    release_dir, out_dir = Path(release_dir), Path(out_dir)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise DataError(f"{release_dir}: splits must be a non-empty subset of {SPLITS}, got {list(splits)}")

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
