"""FLAME avatars: the user's own FLAME model, loaded without executing anything, posed by a run's
53 coefficients per frame (50 expression + 3 jaw axis-angle) and drawn as an animated GIF (24 fps).

FLAME (Li, Bolkart, Black, Li, Romero, "Learning a model of facial shape and expression from 4D scans",
SIGGRAPH Asia 2017) is licensed and never shipped with facelab. A user points facelab at their copy:

* the FLAME 2020 ``generic_model.pkl`` (a dict pickled by Python 2 with protocol 2; most arrays are
  ``chumpy.ch.Ch`` objects whose state holds the array under ``'x'``, ``J_regressor`` is a
  ``scipy.sparse.csc_matrix``), or a later pickle of the same dict written by Python 3;
* an ``.npz`` with the same keys (what some distributions ship), read with ``allow_pickle=False``.

:func:`load_flame` reads a pickle through :class:`_FlameUnpickler`, an allow-listed unpickler built on
the EmoAva release reader's (:mod:`facelab.data.emoava`): numpy arrays only as numpy writes them,
``_codecs.encode`` only as ``(str, 'latin1')``, chumpy classes and scipy's csc/csr matrices only as
inert stand-ins that keep their state (chumpy is never imported; a ``Ch`` becomes its ``'x'`` array,
a sparse matrix is rebuilt densely with numpy from ``data``/``indices``/``indptr``/``shape``). Every
other global is refused with an error naming ``module.name`` and the file, and what a file may decode
to is capped at :data:`DECODE_FACTOR` times its size.

:func:`flame_vertices` evaluates the model (expression blendshapes, pose blendshapes, linear blend
skinning with only the jaw rotated); :func:`render_gif` draws the mesh from the front at 24 fps.
:func:`configured_model` is the configuration hook: the model named by ``FACELAB_FLAME_MODEL``.

Nothing here starts work at import time; Pillow is imported only by :func:`render_gif`.
"""

from __future__ import annotations

import functools
import io
import math
import os
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facelab.data.emoava import (
    DECODE_SLACK,
    DataError,
    _brief,
    _PendingArray,
    _ReleaseUnpickler,
)

N_EXPR = 50
"""Expression coefficients a facelab FLAME sequence carries (the first 50 of FLAME's 100)."""
N_JAW = 3
"""Jaw pose values (axis-angle, radians) after the expression coefficients."""
PARAM_DIM = N_EXPR + N_JAW
N_SHAPE = 300
"""Shape components before the expression components in ``shapedirs`` (FLAME 2020: 300 + 100)."""
N_JOINTS = 5
"""FLAME's joints: global (root), neck, jaw, left eye, right eye."""
JAW_JOINT = 2
FLAME_ENV = "FACELAB_FLAME_MODEL"
"""Environment variable naming the user's FLAME model file (``.pkl`` or ``.npz``)."""
FPS = 24

DECODE_FACTOR = 4
"""A FLAME file may decode to at most ``DECODE_FACTOR`` x its size (+ ``DECODE_SLACK``): a genuine
protocol-2 array is charged three times (the latin-1 text, the array, the result), so real files fit."""
NPZ_FACTOR = 64
"""An ``.npz`` may declare at most ``NPZ_FACTOR`` x its size of array data (a compressed zip of zeros
would otherwise expand without bound); real models compress by far less."""
MAX_VERTICES = 1_000_000

_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "kintree_table", "weights", "f")


class FlameError(DataError):
    """A FLAME file that is missing, refused or malformed; the message names the file (and key)."""


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FlameModel:
    """The arrays of a FLAME model (read-only numpy). ``V`` vertices, ``J`` = 5 joints, ``F`` faces.

    ``v_template`` (V, 3); ``shapedirs`` (V, 3, K) -- ``n_shape`` shape components then the expression
    components (FLAME 2020: 300 + 100); ``posedirs`` (V, 3, 9 (J - 1)); ``J_regressor`` (J, V), dense;
    ``kintree_table`` (2, J), row 0 the parent ids, row 1 the joint ids; ``weights`` (V, J) skinning
    weights; ``f`` (F, 3) triangles; ``parents`` (J,) the parent index of each joint (-1 for the root).
    """

    v_template: np.ndarray
    shapedirs: np.ndarray
    posedirs: np.ndarray
    J_regressor: np.ndarray
    kintree_table: np.ndarray
    weights: np.ndarray
    f: np.ndarray
    parents: np.ndarray
    n_shape: int = N_SHAPE
    source: str = ""

    @property
    def n_vertices(self) -> int:
        return int(self.v_template.shape[0])

    @property
    def exprdirs(self) -> np.ndarray:
        """The first :data:`N_EXPR` expression components, (V, 3, 50): ``shapedirs[..., n_shape:n_shape + 50]``."""
        return self.shapedirs[:, :, self.n_shape : self.n_shape + N_EXPR]


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _as_model(arrays: Mapping[str, Any], source: str, n_shape: int) -> FlameModel:
    """Check every key's type and shape (naming the bad key) and build the model."""

    def get(key: str) -> np.ndarray:
        if key not in arrays:
            raise FlameError(f"{source}: key {key!r} missing (a FLAME model has {', '.join(_KEYS)})")
        value = arrays[key]
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            raise FlameError(f"{source}: key {key!r} is {_describe(value)}, expected a numeric array")
        return value

    def bad(key: str, value: np.ndarray, want: str) -> FlameError:
        return FlameError(f"{source}: key {key!r} has shape {value.shape}, expected {want}")

    v_template = get("v_template")
    if v_template.ndim != 2 or v_template.shape[1] != 3 or not 3 <= v_template.shape[0] <= MAX_VERTICES:
        raise bad("v_template", v_template, f"(V, 3) with 3 <= V <= {MAX_VERTICES:,}")
    n_v = v_template.shape[0]
    shapedirs = get("shapedirs")
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (n_v, 3) or shapedirs.shape[2] < n_shape + N_EXPR:
        raise bad("shapedirs", shapedirs, f"({n_v}, 3, K) with K >= {n_shape} shape + {N_EXPR} expression components")
    J_regressor = get("J_regressor")
    if J_regressor.shape != (N_JOINTS, n_v):
        raise bad("J_regressor", J_regressor, f"({N_JOINTS}, {n_v})")
    posedirs = get("posedirs")
    if posedirs.shape != (n_v, 3, 9 * (N_JOINTS - 1)):
        raise bad("posedirs", posedirs, f"({n_v}, 3, {9 * (N_JOINTS - 1)})")
    weights = get("weights")
    if weights.shape != (n_v, N_JOINTS):
        raise bad("weights", weights, f"({n_v}, {N_JOINTS})")
    kintree = get("kintree_table")
    if kintree.shape != (2, N_JOINTS) or kintree.dtype.kind not in "biu":
        raise bad("kintree_table", kintree, f"(2, {N_JOINTS}) of integers")
    faces = get("f")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] < 1 or faces.dtype.kind not in "iu":
        raise bad("f", faces, "(F, 3) of integer vertex indices")
    if faces.min() < 0 or faces.max() >= n_v:
        raise FlameError(f"{source}: key 'f' indexes vertices outside 0..{n_v - 1}")

    floats = {}
    for key, value in (
        ("v_template", v_template),
        ("shapedirs", shapedirs),
        ("posedirs", posedirs),
        ("J_regressor", J_regressor),
        ("weights", weights),
    ):
        value = np.array(value, dtype=np.float64)  # a copy: native byte order, owned, contiguous
        if not np.isfinite(value).all():
            raise FlameError(f"{source}: key {key!r} holds NaN or infinite values")
        floats[key] = _readonly(value)

    ids = [int(i) for i in kintree[1]]
    if len(set(ids)) != N_JOINTS:
        raise FlameError(f"{source}: key 'kintree_table' row 1 repeats a joint id: {ids}")
    col = {joint: i for i, joint in enumerate(ids)}
    parents = [-1]
    for i in range(1, N_JOINTS):
        p = col.get(int(kintree[0, i]))
        if p is None or p >= i:
            raise FlameError(
                f"{source}: key 'kintree_table': joint {i}'s parent {int(kintree[0, i])} is not an earlier joint"
            )
        parents.append(p)
    return FlameModel(
        v_template=floats["v_template"],
        shapedirs=floats["shapedirs"],
        posedirs=floats["posedirs"],
        J_regressor=floats["J_regressor"],
        kintree_table=_readonly(np.array(kintree, dtype=np.int64)),
        weights=floats["weights"],
        f=_readonly(np.array(faces, dtype=np.int64)),
        parents=_readonly(np.array(parents, dtype=np.int64)),
        n_shape=n_shape,
        source=source,
    )


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}"
    if isinstance(value, _StandIn):
        return f"a {value.cls} without an array"
    return _brief(value)


# --------------------------------------------------------------------------------------------
# Loading: the allow-listed unpickler
# --------------------------------------------------------------------------------------------


class _Global:
    """What :meth:`_FlameUnpickler.find_class` gives for a chumpy class or a scipy sparse matrix: a
    name, never the class. It can only be instantiated by NEWOBJ (``cls.__new__(cls)``, no arguments)
    and then filled by its state (BUILD); calling it (REDUCE) is refused."""

    __slots__ = ("kind", "name", "unpickler")

    def __init__(self, kind: str, name: str, unpickler: _FlameUnpickler):
        self.kind = kind  # "chumpy" or "csc" / "csr"
        self.name = name
        self.unpickler = unpickler

    def __call__(self, *args: Any) -> Any:
        raise self.unpickler._refuse(
            f"calling {self.name}{_brief(args)}: a {self.name} is only rebuilt from its state (NEWOBJ + BUILD)"
        )


class _StandIn:
    """An inert chumpy object or sparse matrix: its class name and its state dict (checked later)."""

    __slots__ = ("cls", "kind", "state")

    def __init__(self, glob: _Global):
        self.cls = glob.name
        self.kind = glob.kind
        self.state: dict | None = None


_SPARSE = {
    (f"scipy.sparse.{mod}", f"{fmt}_{kind}"): fmt
    for mod in ("csc", "_csc", "csr", "_csr", "_arrays")
    for fmt in ("csc", "csr")
    for kind in ("matrix", "array")
}
_MAX_SET = 1 << 16


class _FlameUnpickler(_ReleaseUnpickler):
    """The EmoAva release unpickler (numpy arrays as numpy writes them, bytes, strings, lists, floats),
    widened to what a FLAME model file holds: dicts and sets of plain values, Python 2 strings (read
    as latin-1, as ``pickle.load(f, encoding='latin1')`` does, an array's raw data included), chumpy
    objects and scipy csc/csr matrices as :class:`_StandIn` s. Every failure is a :class:`FlameError`
    naming the file."""

    dispatch = dict(_ReleaseUnpickler.dispatch)
    # a FLAME file is a dict (and chumpy's state holds a set): the plain container opcodes are back
    for _op in (pickle.EMPTY_DICT, pickle.DICT, pickle.SETITEM, pickle.SETITEMS, pickle.EMPTY_SET):
        dispatch[_op[0]] = pickle._Unpickler.dispatch[_op[0]]
    for _op in (pickle.ADDITEMS, pickle.FROZENSET):
        dispatch[_op[0]] = pickle._Unpickler.dispatch[_op[0]]
    del _op
    error = FlameError
    decode_factor = DECODE_FACTOR
    genuine = "a genuine FLAME model decodes to about its own size"

    def __init__(self, file: io.BytesIO, source: str, size: int):
        super().__init__(file, source, size)
        self.encoding = "latin1"  # Python 2 str (keys, an array's data) -> str, as chumpy-era loaders read it
        for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
            self._globals[(mod, "scalar")] = self._scalar  # a numpy number, e.g. inside a sparse matrix's shape
        for mod in ("builtins", "__builtin__"):
            self._globals[(mod, "set")] = self._set
            self._globals[(mod, "frozenset")] = self._set

    def find_class(self, module: str, name: str) -> Any:
        fn = self._globals.get((module, name))
        if fn is not None:
            return fn
        if (module, name) in _SPARSE:
            return _Global(_SPARSE[(module, name)], f"{module}.{name}", self)
        if (module == "chumpy" or module.startswith("chumpy.")) and name.isidentifier():
            return _Global("chumpy", f"{module}.{name}", self)
        raise FlameError(
            f"{self._source}: refused to unpickle global {module}.{name} (a FLAME model file may hold only "
            "numpy arrays, chumpy arrays, scipy csc/csr matrices, dicts, lists, sets, strings and numbers)"
        )

    # ---- objects: NEWOBJ and BUILD ----------------------------------------------------------

    def _newobj(self, cls: Any, args: Any, kwargs: Any = None) -> None:
        if not isinstance(cls, _Global) or args != () or kwargs not in (None, {}):
            raise self._refuse(
                f"NEWOBJ of {_brief(cls)}{_brief(args)}: only a chumpy object or a scipy sparse matrix, "
                "made without arguments, is rebuilt (from its state)"
            )
        self.spend(64, cls.name)
        self.append(_StandIn(cls))

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._newobj(cls, args)

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._newobj(cls, args, kwargs)

    def _load_flame_build(self) -> None:
        inst = self.stack[-2] if len(self.stack) >= 2 else None
        if isinstance(inst, _StandIn):
            state = self.stack.pop()
            if inst.state is not None:
                raise self._refuse(f"a second state for a {inst.cls}")
            if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
                state = state[0]  # (dict, slots) of an object without slots
            if type(state) is not dict or not all(type(k) is str for k in state):
                raise self._refuse(f"the state of a {inst.cls}: {_brief(state)}, expected a dict with string keys")
            inst.state = state
            return
        if isinstance(inst, _PendingArray):
            state = self.stack[-1]
            # a Python 2 array: the raw data was a str, read as latin-1 text; numpy's own loader re-encodes it
            if type(state) is tuple and len(state) == 5 and type(state[4]) is str:
                self.spend(len(state[4]), "numpy array data (latin-1 text)")
                try:
                    self.stack[-1] = (*state[:4], state[4].encode("latin1"))
                except UnicodeEncodeError:
                    raise self._refuse("numpy array data: not latin-1 text") from None
        _ReleaseUnpickler._load_build(self)

    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex
    dispatch[pickle.BUILD[0]] = _load_flame_build

    # ---- numpy, sets --------------------------------------------------------------------------

    def _reconstruct(self, *args: Any) -> _PendingArray:
        if len(args) == 3 and args[2] == "b":  # Python 2 wrote the typecode as a str
            args = (args[0], args[1], b"b")
        return super()._reconstruct(*args)

    def _scalar(self, *args: Any) -> int | float | bool:
        """numpy's ``scalar(dtype, data)`` -> the Python number (data exactly one item of a plain dtype)."""
        what = f"numpy scalar{_brief(args)}"
        if len(args) != 2 or type(args[1]) not in (bytes, str):
            raise self._refuse(f"{what}: expected (dtype, data)")
        dt = self._checked_dtype(args[0], what)
        data = args[1]
        if type(data) is str:  # Python 2's raw str, read as latin-1 text
            try:
                data = data.encode("latin1")
            except UnicodeEncodeError:
                raise self._refuse(f"{what}: data is not latin-1 text") from None
        if len(data) != dt.itemsize:
            raise self._refuse(f"{what}: {len(data)} data bytes for one {dt}")
        return np.frombuffer(data, dtype=dt)[0].item()

    def _set(self, *args: Any) -> set:
        if not args:
            return set()
        if len(args) != 1 or type(args[0]) not in (list, tuple) or len(args[0]) > _MAX_SET:
            raise self._refuse(f"set{_brief(args)}: only set() or set(a list) is accepted")
        if not all(type(x) in (str, int) for x in args[0]):
            raise self._refuse(f"set{_brief(args)}: only sets of strings and integers are accepted")
        self.spend(len(args[0]), "set()")
        return set(args[0])

    # ---- the result ---------------------------------------------------------------------------

    def finish_model(self, obj: Any) -> dict[str, Any]:
        """The top-level dict with every value resolved: arrays, chumpy arrays (their ``'x'``), sparse
        matrices (dense), plain values; anything else is refused, naming its key."""
        if type(obj) is not dict:
            raise self._refuse(f"the top-level object {_brief(obj)}: a FLAME model file holds a dict")
        out = {}
        for key, value in obj.items():
            if type(key) is not str:
                raise self._refuse(f"key {_brief(key)}: a FLAME model's keys are strings")
            out[key] = self._resolve(value, repr(key), 0)
        return out

    def _resolve(self, obj: Any, where: str, depth: int) -> Any:
        if depth > 8:
            raise self._refuse(f"{where}: nested deeper than 8 levels")
        t = type(obj)
        if t is _PendingArray:
            if obj.array is None:
                raise self._refuse(f"{where}: a numpy array without its state (BUILD) step")
            self.spend(max(1, obj.array.nbytes), f"{where}: numpy array")
            return obj.array
        if t is _StandIn:
            if obj.state is None:
                raise self._refuse(f"{where}: a {obj.cls} without its state")
            if obj.kind == "chumpy":
                x = obj.state.get("x")
                if type(x) is _PendingArray:
                    return self._resolve(x, f"{where} ({obj.cls} 'x')", depth + 1)
                if type(x) is _StandIn and x.kind == "chumpy":  # a Ch wrapping a Ch
                    return self._resolve(x, f"{where} ({obj.cls} 'x')", depth + 1)
                return obj  # a chumpy expression: kept as a name; an error only if the key is needed
            return self._sparse(obj, where)
        if obj is None or t in (bool, int, float, str, bytes):
            self.spend(1 + (len(obj) if t in (str, bytes) else 0), f"{where}: {t.__name__}")
            return obj
        if t in (list, tuple, set, frozenset):
            self.spend(1 + len(obj), f"{where}: {t.__name__}")
            if t in (set, frozenset):
                if not all(type(x) in (str, int) for x in obj):
                    raise self._refuse(f"{where}: a set of {_brief(list(obj)[:6])}; only strings and integers")
                return obj
            return t(self._resolve(x, f"{where}[{i}]", depth + 1) for i, x in enumerate(obj))
        if t is dict:
            self.spend(1 + len(obj), f"{where}: dict")
            if not all(type(k) in (str, int) for k in obj):
                raise self._refuse(f"{where}: a dict whose keys are not all strings or integers")
            return {k: self._resolve(v, f"{where}[{k!r}]", depth + 1) for k, v in obj.items()}
        raise self._refuse(f"{where}: {_brief(obj)}")

    def _sparse(self, obj: _StandIn, where: str) -> np.ndarray:
        """A csc/csr matrix's state rebuilt as a dense array with numpy (no scipy call)."""
        st = obj.state
        what = f"{where} ({obj.cls})"
        shape = st.get("_shape", st.get("shape"))
        arrays = {}
        for name in ("data", "indices", "indptr"):
            a = st.get(name)
            if type(a) is not _PendingArray or a.array is None or a.array.ndim != 1:
                raise self._refuse(f"{what}: {name!r} is {_brief(a)}, expected a 1-d numpy array")
            arrays[name] = a.array
        if type(shape) is not tuple or len(shape) != 2 or any(type(d) is not int or d < 0 for d in shape):
            raise self._refuse(f"{what}: shape {_brief(shape)}, expected (rows, columns)")
        data, indices, indptr = arrays["data"], arrays["indices"], arrays["indptr"]
        rows, cols = shape
        major, minor = (cols, rows) if obj.kind == "csc" else (rows, cols)
        if data.dtype.kind not in "biuf" or indices.dtype.kind not in "iu" or indptr.dtype.kind not in "iu":
            raise self._refuse(f"{what}: data/indices/indptr dtypes {data.dtype}/{indices.dtype}/{indptr.dtype}")
        if (
            len(indptr) != major + 1
            or len(indices) != len(data)
            or indptr[0] != 0
            or indptr[-1] != len(data)
            or np.any(np.diff(indptr.astype(np.int64)) < 0)
            or (len(indices) and (indices.min() < 0 or indices.max() >= minor))
        ):
            raise self._refuse(f"{what}: inconsistent data/indices/indptr for shape {shape}")
        self.spend(rows * cols * 8, f"{what}: dense {shape}")
        dense = np.zeros((major, minor), dtype=np.float64)
        counts = np.diff(indptr.astype(np.int64))
        np.add.at(dense, (np.repeat(np.arange(major), counts), indices.astype(np.int64)), data.astype(np.float64))
        return dense.T.copy() if obj.kind == "csc" else dense


def _read_pickle(path: Path, data: bytes) -> dict[str, Any]:
    try:
        unpickler = _FlameUnpickler(io.BytesIO(data), str(path), len(data))
        return unpickler.finish_model(unpickler.load())
    except FlameError:
        raise
    except DataError as exc:
        raise FlameError(str(exc)) from None
    except Exception as exc:  # pickle raises many types on corrupt input
        raise FlameError(f"{path}: not a readable FLAME pickle: {type(exc).__name__}: {str(exc)[:200]}") from None


def _read_npz(path: Path, size: int) -> dict[str, Any]:
    limit = NPZ_FACTOR * size + DECODE_SLACK
    out: dict[str, Any] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            declared = 0
            for info in zf.infolist():
                key = info.filename.removesuffix(".npy")
                if key not in _KEYS:
                    continue  # other keys are not read
                with zf.open(info) as fh:
                    version = np.lib.format.read_magic(fh)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                    elif version == (2, 0):
                        shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
                    else:
                        raise FlameError(f"{path}: key {key!r}: unsupported .npy version {version}")
                if dtype.hasobject:
                    raise FlameError(f"{path}: key {key!r} is an object array (pickled); refused")
                declared += math.prod(shape) * dtype.itemsize
                if declared > limit:
                    raise FlameError(
                        f"{path}: refused key {key!r}: the arrays would decode to more than {limit:,} bytes "
                        f"({NPZ_FACTOR}x the file's {size:,} bytes)"
                    )
        with np.load(path, allow_pickle=False) as npz:
            for key in _KEYS:
                if key in npz.files:
                    try:
                        out[key] = npz[key]
                    except ValueError as exc:
                        raise FlameError(f"{path}: key {key!r}: {exc}") from None
    except FlameError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise FlameError(f"{path}: not a readable .npz: {type(exc).__name__}: {str(exc)[:200]}") from None
    return out


def load_flame(path: str | os.PathLike, *, n_shape: int = N_SHAPE) -> FlameModel:
    """Load a FLAME model (FLAME 2020 ``generic_model.pkl`` or an ``.npz`` with the same keys) without
    executing anything from the file. The format is told by the file's first bytes, not its name.

    ``n_shape``: how many shape components come before the expression ones in ``shapedirs`` (300 in
    FLAME 2020 and 2023). Raises :class:`FlameError` naming the file (and the key) on any problem.
    """
    path = Path(path)
    if not path.is_file():
        raise FlameError(f"{path}: missing (point {FLAME_ENV} at your FLAME generic_model.pkl or .npz)")
    try:
        data = path.read_bytes()  # in memory: no read can ask the file for more than it holds
        if data[:4] == b"PK\x03\x04":
            arrays = _read_npz(path, len(data))
        else:
            arrays = _read_pickle(path, data)
    except OSError as exc:
        raise FlameError(f"{path}: unreadable: {exc}") from None
    return _as_model(arrays, str(path), n_shape)


@functools.lru_cache(maxsize=2)
def _cached(path: str, mtime_ns: int, size: int) -> FlameModel:
    return load_flame(path)


def configured_model(environ: Mapping[str, str] | None = None) -> FlameModel | None:
    """The configuration hook: the FLAME model the user pointed facelab at with ``FACELAB_FLAME_MODEL``
    (a path to their own ``generic_model.pkl`` or ``.npz``), loaded once per file version; ``None``
    when the variable is unset or empty (FLAME is licensed: facelab never ships or downloads it).
    A set variable naming a bad file raises :class:`FlameError`, so a typo is not silently ignored.

    A run's per-run GIF and the page's 3-D view call this and skip the avatar when it returns None."""
    value = (os.environ if environ is None else environ).get(FLAME_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise FlameError(f"{path}: missing ({FLAME_ENV} names no file)")
    st = path.stat()
    return _cached(str(path), st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------------------------
# The mesh: M(beta, theta, psi) and linear blend skinning
# --------------------------------------------------------------------------------------------


def axis_angle_to_matrix(r: np.ndarray) -> np.ndarray:
    """Rodrigues' formula: (..., 3) axis-angle vectors (radians) -> (..., 3, 3) rotation matrices.

    ``R = I + a K + b K^2`` with ``K`` the cross-product matrix of ``r``, ``a = sin(t)/t`` and
    ``b = (1 - cos t)/t^2``, ``t = |r|`` (Taylor series near 0, so ``r = 0`` gives exactly ``I``)."""
    r = np.asarray(r, dtype=np.float64)
    t2 = np.sum(r * r, axis=-1)
    t = np.sqrt(t2)
    small = t2 < 1e-8
    safe_t = np.where(small, 1.0, t)
    a = np.where(small, 1.0 - t2 / 6.0, np.sin(safe_t) / safe_t)
    b = np.where(small, 0.5 - t2 / 24.0, (1.0 - np.cos(safe_t)) / (safe_t * safe_t))
    k = np.zeros(r.shape[:-1] + (3, 3))
    k[..., 0, 1], k[..., 0, 2] = -r[..., 2], r[..., 1]
    k[..., 1, 0], k[..., 1, 2] = r[..., 2], -r[..., 0]
    k[..., 2, 0], k[..., 2, 1] = -r[..., 1], r[..., 0]
    return np.eye(3) + a[..., None, None] * k + b[..., None, None] * (k @ k)


def joint_rotations(jaw: np.ndarray) -> np.ndarray:
    """(T, 3) jaw axis-angles -> (T, 5, 3, 3) local joint rotations: the jaw's, every other joint I."""
    jaw = np.asarray(jaw, dtype=np.float64)
    rot = np.broadcast_to(np.eye(3), (jaw.shape[0], N_JOINTS, 3, 3)).copy()
    rot[:, JAW_JOINT] = axis_angle_to_matrix(jaw)
    return rot


def flame_vertices(model: FlameModel, expr: np.ndarray, jaw: np.ndarray, shape: np.ndarray | None = None) -> np.ndarray:
    """The posed FLAME mesh for each frame: ``expr`` (T, 50) expression coefficients and ``jaw`` (T, 3)
    jaw axis-angles -> vertices (T, V, 3). Global, neck and eye rotations are identity; ``shape``
    (n_shape,) or (T, n_shape) optional identity coefficients (default: the template's identity).

    FLAME (Li et al. 2017, "Learning a model of facial shape and expression from 4D scans", Sec. 3):
    ``M(beta, theta, psi) = W(T_P(beta, theta, psi), J(beta), theta, W)`` with
    ``T_P = T + B_S(beta; S) + B_P(theta; P) + B_E(psi; E)`` (Eq. 2): the template plus the shape,
    pose and expression blendshapes. Here:

    * ``B_E`` + ``B_S``: ``shapedirs`` contracted with ``psi`` (and ``beta``), linear (Eqs. 3 and 5);
    * the joints ``J = J_regressor @ (T + B_S + B_E)`` (the regressor of Eq. 1, applied to the
      shaped and expressed mesh, as the released model does);
    * ``B_P(theta; P) = sum_k (R_k(theta) - R_k(theta*)) P_k`` (Eq. 4): ``posedirs`` (V, 3, 36) against
      the flattened ``R - I`` of the four non-root joints (neck, jaw, left eye, right eye; 4 x 9 = 36,
      the FLAME/SMPL convention);
    * ``W``: linear blend skinning (Eq. 1) along the kinematic tree ``kintree_table``:
      ``v' = sum_k w_k,v G'_k (v)``, ``G'_k`` the world transform of joint ``k`` with its rest
      transform removed -- so a vertex fully weighted to the jaw turns by ``R(jaw)`` about the jaw joint.
    """
    expr = np.asarray(expr, dtype=np.float64)
    jaw = np.asarray(jaw, dtype=np.float64)
    if expr.ndim != 2 or expr.shape[1] != N_EXPR:
        raise ValueError(f"expr has shape {expr.shape}, expected (T, {N_EXPR})")
    if jaw.shape != (expr.shape[0], N_JAW):
        raise ValueError(f"jaw has shape {jaw.shape}, expected ({expr.shape[0]}, {N_JAW})")
    n_t, n_v = expr.shape[0], model.n_vertices
    dirs = model.exprdirs.reshape(n_v * 3, N_EXPR)
    v_shaped = (expr @ dirs.T).reshape(n_t, n_v, 3) + model.v_template
    if shape is not None:
        beta = np.broadcast_to(np.asarray(shape, dtype=np.float64), (n_t, model.n_shape))
        v_shaped += (beta @ model.shapedirs[:, :, : model.n_shape].reshape(n_v * 3, model.n_shape).T).reshape(
            n_t, n_v, 3
        )
    joints = np.einsum("jv,tvc->tjc", model.J_regressor, v_shaped)  # (T, 5, 3)
    rot = joint_rotations(jaw)  # (T, 5, 3, 3) local
    pose_feature = (rot[:, 1:] - np.eye(3)).reshape(n_t, 9 * (N_JOINTS - 1))
    v_posed = v_shaped + (pose_feature @ model.posedirs.reshape(n_v * 3, -1).T).reshape(n_t, n_v, 3)

    # world rotations and translations along the tree (parents come first)
    world_r = np.empty_like(rot)
    world_t = np.empty((n_t, N_JOINTS, 3))
    for k, p in enumerate(model.parents):
        if p < 0:
            world_r[:, k], world_t[:, k] = rot[:, k], joints[:, k]
        else:
            world_r[:, k] = world_r[:, p] @ rot[:, k]
            world_t[:, k] = world_t[:, p] + np.einsum("tab,tb->ta", world_r[:, p], joints[:, k] - joints[:, p])
    # remove the rest pose: G'_k(v) = R_k v + (t_k - R_k J_k)
    offset = world_t - np.einsum("tkab,tkb->tka", world_r, joints)
    out = np.zeros_like(v_posed)
    for k in range(N_JOINTS):
        w = model.weights[:, k]
        if not w.any():
            continue
        moved = np.einsum("tvb,tab->tva", v_posed, world_r[:, k]) + offset[:, k, None, :]
        out += w[None, :, None] * moved
    return out


def split_params(params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 53) facelab FLAME parameters -> expression (T, 50) and jaw (T, 3)."""
    params = np.asarray(params, dtype=np.float64)
    if params.ndim != 2 or params.shape[1] != PARAM_DIM:
        raise ValueError(f"params has shape {params.shape}, expected (T, {PARAM_DIM})")
    return params[:, :N_EXPR], params[:, N_EXPR:]


# --------------------------------------------------------------------------------------------
# Drawing: a front view per frame, an animated GIF
# --------------------------------------------------------------------------------------------

_SKIN = np.array([0.86, 0.70, 0.60])
_LIGHT = np.array([0.35, 0.45, 1.0]) / np.linalg.norm([0.35, 0.45, 1.0])
_AMBIENT = 0.28


def _outward_faces(model: FlameModel) -> np.ndarray:
    """The faces, wound so their normals point out of the head (the template's signed volume > 0)."""
    tri = model.v_template[model.f]
    centre = model.v_template.mean(axis=0)
    vol = np.einsum("fa,fa->", tri[:, 0] - centre, np.cross(tri[:, 1] - centre, tri[:, 2] - centre))
    return model.f if vol >= 0 else model.f[:, ::-1]


def gif_durations(n_frames: int, fps: float = FPS) -> list[int]:
    """Per-frame GIF delays in ms. A GIF stores centiseconds, so 24 fps (41.67 ms) is written as
    40/40/50/40/40/40 ms: each frame ends at its true time rounded to 10 ms, so the average is exact."""
    ends = [math.floor(i * 100.0 / fps + 0.5) * 10 for i in range(n_frames + 1)]
    return [max(10, b - a) for a, b in zip(ends, ends[1:])]


def _frames(
    model: FlameModel,
    verts: np.ndarray,
    size: tuple[int, int],
    title: str,
    fps: float,
    supersample: int,
) -> Iterator[Any]:
    """One PIL image per frame of ``verts`` (T, V, 3): the front view, flat-shaded, painter's order."""
    from PIL import Image, ImageDraw

    faces = _outward_faces(model)
    width, height = size
    big_w, big_h = width * supersample, height * supersample
    lo = verts[..., :2].reshape(-1, 2).min(axis=0)
    hi = verts[..., :2].reshape(-1, 2).max(axis=0)
    centre = (lo + hi) / 2
    margin = 0.08  # of the image, around the face over the whole sequence
    scale = (1 - 2 * margin) * min(big_w / max(hi[0] - lo[0], 1e-12), big_h / max(hi[1] - lo[1], 1e-12))
    n_t = len(verts)
    for t in range(n_t):
        tri = verts[t][faces]  # (F, 3, 3)
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        front = normal[:, 2] > 0  # back faces culled
        tri, normal = tri[front], normal[front]
        normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-30
        order = np.argsort(tri[:, :, 2].mean(axis=1), kind="stable")  # far first (painter's algorithm)
        shade = _AMBIENT + (1 - _AMBIENT) * np.clip(normal[order] @ _LIGHT, 0.0, 1.0)
        colour = np.round(255 * np.clip(shade[:, None] * _SKIN, 0.0, 1.0)).astype(np.uint8)
        xy = np.empty((len(order), 3, 2))
        xy[..., 0] = big_w / 2 + (tri[order, :, 0] - centre[0]) * scale
        xy[..., 1] = big_h / 2 - (tri[order, :, 1] - centre[1]) * scale  # image y points down
        image = Image.new("RGB", (big_w, big_h), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for points, fill in zip(xy.reshape(-1, 6).tolist(), map(tuple, colour.tolist())):
            draw.polygon(points, fill=fill)
        if supersample > 1:
            image = image.resize((width, height), Image.Resampling.BOX)
        draw = ImageDraw.Draw(image)
        draw.text((4, height - 12), f"frame {t + 1}/{n_t}  {t / fps:5.2f} s", fill=(90, 90, 90))
        if title:
            draw.text((4, 2), title[:48], fill=(90, 90, 90))
        yield image


def render_gif(
    model: FlameModel,
    params: np.ndarray,
    out: str | os.PathLike,
    fps: float = FPS,
    *,
    size: tuple[int, int] = (240, 280),
    title: str = "",
    supersample: int = 2,
) -> Path:
    """Draw a (T, 53) FLAME parameter sequence (50 expression + 3 jaw) as an animated GIF at ``fps``.

    Each frame is the posed mesh (:func:`flame_vertices`) seen from the front (orthographic along -z,
    the subject's left on the image's right): back faces culled, the rest sorted far to near (painter's
    algorithm) and filled flat with a Lambert light from the upper front plus ambient. Triangles are
    filled by Pillow at ``supersample`` x ``size`` and box-filtered down (antialiasing); Pillow's
    polygon fill is several times faster than a matplotlib PolyCollection here. Every face is drawn,
    no decimation: about half of FLAME's 9976 survive culling, some 30 ms a frame at the default
    240 x 280 (128 frames in ~4 s on one core). The framing is fixed over the sequence; each frame
    carries its index and time, so no two consecutive frames are equal (Pillow would merge them) and
    the GIF keeps all T frames. Delays follow :func:`gif_durations` (24 fps: 41.67 ms on average).
    Returns ``out``."""
    expr, jaw = split_params(params)
    if len(expr) == 0:
        raise ValueError("params has no frames")
    verts = flame_vertices(model, expr, jaw)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frames = list(_frames(model, verts, size, title, fps, max(1, int(supersample))))
    frames[0].save(
        out,
        save_all=True,
        append_images=frames[1:],
        duration=gif_durations(len(frames), fps),
        loop=0,
        disposal=1,
    )
    return out
