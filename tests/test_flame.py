"""FLAME avatars (facelab.viewer.flame): loading a user's FLAME file without executing anything, the
posed mesh (expression blendshapes, jaw through the skinning weights) and the 24 fps GIF.

FLAME is licensed and never shipped: every test builds a synthetic FLAME-format file -- the same keys,
shapes and pickle structure as FLAME 2020's ``generic_model.pkl`` (a dict; chumpy ``Ch`` objects whose
state holds the array under ``'x'``; ``J_regressor`` a scipy csc matrix), with random bases. chumpy is
not installed: stand-in classes named ``chumpy.ch.Ch`` exist in ``sys.modules`` only while a test
*writes* the pickle.
"""

from __future__ import annotations

import contextlib
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from facelab.viewer import flame
from facelab.viewer.flame import FlameError, flame_vertices, load_flame, render_gif

N_V, N_F = 5023, 9976  # FLAME 2020


# --------------------------------------------------------------------------------------------
# Synthetic FLAME files
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_chumpy():
    """Classes pickled as ``chumpy.ch.Ch`` / ``chumpy.reordering.Select`` (state: chumpy's __dict__
    without its weak caches), registered only while writing."""

    class Ch:
        def __init__(self, x):
            self.__dict__.update(
                {
                    "_dirty_vars": set(),
                    "_itr": None,
                    "_depends_on_deps": {},
                    "_make_dense": False,
                    "_make_sparse": False,
                    "x": x,
                }
            )

    class Select:  # a chumpy expression: no 'x' of its own
        def __init__(self, a, idxs):
            self.__dict__.update({"_dirty_vars": {"a"}, "_itr": None, "a": a, "idxs": idxs})

    mods = {"chumpy": types.ModuleType("chumpy"), "chumpy.ch": types.ModuleType("chumpy.ch")}
    mods["chumpy.reordering"] = types.ModuleType("chumpy.reordering")
    for cls, mod in ((Ch, "chumpy.ch"), (Select, "chumpy.reordering")):
        cls.__module__, cls.__qualname__ = mod, cls.__name__
        setattr(mods[mod], cls.__name__, cls)
    assert not any(m in sys.modules for m in mods)
    sys.modules.update(mods)
    try:
        yield types.SimpleNamespace(Ch=Ch, Select=Select)
    finally:
        for m in mods:
            sys.modules.pop(m, None)


class Py2Pickler(pickle._Pickler):
    """Writes protocol 2 the way Python 2 did: str and bytes as BINSTRING (read back as latin-1 text),
    numpy's reconstructor under its numpy 1 name ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)

    def save_str(self, obj):  # not memoized: each occurrence written in full, as simple as can be
        self.save_bytes(obj.encode("latin1"))

    def save_global(self, obj, name=None):
        if getattr(obj, "__name__", "") == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def flame_arrays(n_v=N_V, n_f=N_F, seed=0, n_dirs=400):
    rng = np.random.default_rng(seed)
    weights = rng.random((n_v, 5))
    weights /= weights.sum(axis=1, keepdims=True)
    jreg = np.zeros((5, n_v))
    for j in range(5):  # each joint the mean of a few vertices, as FLAME's sparse regressor
        idx = rng.choice(n_v, size=8, replace=False)
        jreg[j, idx] = 1 / 8
    return {
        "v_template": rng.normal(size=(n_v, 3)) * 0.1,
        "shapedirs": rng.normal(size=(n_v, 3, n_dirs)) * 1e-3,
        "posedirs": rng.normal(size=(n_v, 3, 36)) * 1e-3,
        "J_regressor": jreg,
        "kintree_table": np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "weights": weights,
        "f": rng.integers(0, n_v, size=(n_f, 3)).astype(np.uint32),
    }


def write_flame_pkl(path: Path, arrays: dict, *, py2=True, extra=None) -> Path:
    """A FLAME 2020-format pickle: protocol 2, Ch objects for the dense float arrays, J_regressor csc."""
    with fake_chumpy() as chumpy:
        model = {k: chumpy.Ch(v) for k, v in arrays.items() if k in ("v_template", "shapedirs", "posedirs", "weights")}
        model["J_regressor"] = sp.csc_matrix(arrays["J_regressor"])
        model["kintree_table"] = arrays["kintree_table"]
        model["f"] = arrays["f"]
        model["J"] = chumpy.Ch(arrays["J_regressor"] @ arrays["v_template"])
        model["bs_style"], model["bs_type"] = "lbs", "lrotmin"
        model.update(extra(chumpy) if extra else {})
        with path.open("wb") as fh:
            (Py2Pickler(fh, protocol=2) if py2 else pickle.Pickler(fh, protocol=2)).dump(model)
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small synthetic model: a 'head' sphere whose lower half is skinned to the jaw."""
    rng = np.random.default_rng(1)
    n_lat, n_lon = 14, 20
    lat = np.linspace(0.15, np.pi - 0.15, n_lat)
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    la, lo = np.meshgrid(lat, lon, indexing="ij")
    v = np.stack([np.sin(la) * np.sin(lo), np.cos(la), np.sin(la) * np.cos(lo)], -1).reshape(-1, 3) * 0.1
    faces = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
            c, d = a + n_lon, b + n_lon
            faces += [(a, c, b), (b, c, d)]
    arrays = flame_arrays(n_v=len(v), n_f=len(faces), seed=2)
    arrays["v_template"], arrays["f"] = v, np.array(faces, dtype=np.uint32)
    w = np.zeros((len(v), 5))
    w[:, 1] = 1.0
    w[v[:, 1] < -0.02, 1], w[v[:, 1] < -0.02, 2] = 0.0, 1.0
    arrays["weights"] = w
    arrays["shapedirs"] = rng.normal(size=(len(v), 3, 400)) * 2e-3
    path = write_flame_pkl(tmp_path_factory.mktemp("flame") / "generic_model.pkl", arrays)
    return arrays, path


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("py2", [True, False], ids=["python2-pickle", "python3-pickle"])
def test_a_flame_2020_format_pickle_loads_as_numpy_without_chumpy(tmp_path, py2):
    arrays = flame_arrays()
    path = write_flame_pkl(tmp_path / "generic_model.pkl", arrays, py2=py2)
    assert "chumpy" not in sys.modules
    raw = path.read_bytes()
    assert b"chumpy.ch\nCh" in raw and b"csc_matrix" in raw and (b"numpy.core.multiarray" in raw) == py2

    model = load_flame(path)

    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        got = getattr(model, key)
        assert type(got) is np.ndarray and got.dtype == np.float64 and not got.flags.writeable
        np.testing.assert_array_equal(got, arrays[key])
    assert model.v_template.shape == (N_V, 3) and model.f.shape == (N_F, 3)
    assert model.shapedirs.shape == (N_V, 3, 400) and model.posedirs.shape == (N_V, 3, 36)
    assert model.J_regressor.shape == (5, N_V) and model.weights.shape == (N_V, 5)
    np.testing.assert_array_equal(model.exprdirs, arrays["shapedirs"][:, :, 300:350])
    np.testing.assert_array_equal(model.f, arrays["f"])
    assert model.parents.tolist() == [-1, 0, 1, 1, 1]


def test_numpy_scalars_and_a_python3_sparse_array_load(tmp_path):
    """Values a FLAME dict may hold beside its arrays: numpy scalars (e.g. in an old sparse matrix's
    shape), a csr matrix, chumpy's sets; extra keys are read (inertly) and ignored."""
    arrays = flame_arrays(n_v=40, n_f=30)
    reg = sp.csr_matrix(arrays["J_regressor"])
    reg._shape = (np.int64(5), np.int64(40))
    path = write_flame_pkl(
        tmp_path / "m.pkl",
        arrays,
        py2=False,
        extra=lambda ch: {"J_regressor": reg, "n": np.float32(2.5), "tags": {"a", "b"}, "nested": {"k": [1, (2,)]}},
    )
    model = load_flame(path)
    np.testing.assert_array_equal(model.J_regressor, arrays["J_regressor"])


def test_an_npz_with_the_same_keys_loads(tmp_path):
    arrays = flame_arrays(n_v=50, n_f=60)
    path = tmp_path / "flame.npz"
    np.savez_compressed(path, **arrays)
    model = load_flame(path)
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "f", "kintree_table"):
        np.testing.assert_array_equal(getattr(model, key), arrays[key])


def test_an_npz_with_a_pickled_array_or_a_bad_shape_is_refused(tmp_path):
    arrays = flame_arrays(n_v=50, n_f=60)
    bad = dict(arrays, J_regressor=np.array([sp.csc_matrix(arrays["J_regressor"])], dtype=object))
    np.savez(tmp_path / "obj.npz", **bad)
    with pytest.raises(FlameError, match=r"obj\.npz: key 'J_regressor' is an object array"):
        load_flame(tmp_path / "obj.npz")
    np.savez(tmp_path / "shape.npz", **dict(arrays, posedirs=np.zeros((50, 3, 35))))
    with pytest.raises(FlameError, match=r"shape\.npz: key 'posedirs' has shape \(50, 3, 35\), expected \(50, 3, 36\)"):
        load_flame(tmp_path / "shape.npz")
    zeros = dict(arrays, shapedirs=np.zeros((50, 3, 400_000)))  # 480 MB of zeros, compressed to ~0.5 MB
    np.savez_compressed(tmp_path / "bomb.npz", **zeros)
    with pytest.raises(FlameError, match=r"bomb\.npz: refused key 'shapedirs': the arrays would decode to more"):
        load_flame(tmp_path / "bomb.npz")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.pop("weights"), r"key 'weights' missing"),
        (lambda a: a.update(shapedirs=a["shapedirs"][:, :, :320]), r"key 'shapedirs' has shape \(40, 3, 320\)"),
        (lambda a: a.update(f=a["f"] + 40), r"key 'f' indexes vertices outside 0\.\.39"),
        (
            lambda a: a.update(kintree_table=np.array([[9, 0, 4, 1, 1], [0, 1, 2, 3, 4]])),
            r"key 'kintree_table': joint 2's parent 4 is not",
        ),
    ],
)
def test_a_malformed_model_names_the_bad_key(tmp_path, change, match):
    arrays = flame_arrays(n_v=40, n_f=30)
    change(arrays)
    path = tmp_path / "m.npz"
    np.savez(path, **arrays)
    with pytest.raises(FlameError, match=r"m\.npz: " + match):
        load_flame(path)


def test_a_chumpy_expression_where_an_array_is_needed_names_the_key(tmp_path):
    arrays = flame_arrays(n_v=40, n_f=30)
    path = write_flame_pkl(
        tmp_path / "m.pkl",
        arrays,
        extra=lambda ch: {"weights": ch.Select(ch.Ch(arrays["weights"]), np.arange(3)), "extra": ch.Select(1, 2)},
    )
    with pytest.raises(FlameError, match=r"m\.pkl: key 'weights' is a chumpy\.reordering\.Select without an array"):
        load_flame(path)
    assert "chumpy" not in sys.modules


class _System:
    def __reduce__(self):
        return (__import__("os").system, ("touch PWNED",))


class _Foreign:  # pickled as tests' own class: not allow-listed
    pass


def _huge_reconstruct():
    """numpy's _reconstruct asked for a 10^12-element array directly (no state step)."""
    p = pickle
    return (
        p.PROTO
        + b"\x02"
        + p.GLOBAL
        + b"numpy.core.multiarray\n_reconstruct\n"
        + p.GLOBAL
        + b"numpy\nndarray\n"
        + p.MARK
        + p.LONG1
        + b"\x05\x00\x10\xa5\xd4\xe8"
        + p.TUPLE
        + p.SHORT_BINSTRING
        + b"\x01b"
        + p.TUPLE3
        + p.REDUCE
        + p.STOP
    )


def _huge_state():
    """A well-formed _reconstruct whose state claims a (10^6, 10^6) float64 array backed by 8 bytes."""
    p = pickle
    dtype = (
        p.GLOBAL
        + b"numpy\ndtype\n"
        + p.SHORT_BINSTRING
        + b"\x02f8"
        + p.NEWFALSE
        + p.NEWTRUE
        + p.TUPLE3
        + p.REDUCE
        + p.MARK
        + p.BININT1
        + b"\x03"
        + p.SHORT_BINSTRING
        + b"\x01<"
        + p.NONE * 3
        + p.BININT
        + struct.pack("<i", -1)
        + p.BININT
        + struct.pack("<i", -1)
        + p.BININT1
        + b"\x00"
        + p.TUPLE
        + p.BUILD
    )
    return (
        p.PROTO
        + b"\x02"
        + p.EMPTY_DICT
        + p.SHORT_BINSTRING
        + b"\x0av_template"
        + p.GLOBAL
        + b"numpy.core.multiarray\n_reconstruct\n"
        + p.GLOBAL
        + b"numpy\nndarray\n"
        + p.BININT1
        + b"\x00"
        + p.TUPLE1
        + p.SHORT_BINSTRING
        + b"\x01b"
        + p.TUPLE3
        + p.REDUCE
        + p.MARK
        + p.BININT1
        + b"\x01"
        + p.BININT
        + struct.pack("<i", 10**6)
        + p.BININT
        + struct.pack("<i", 10**6)
        + p.TUPLE2
        + dtype
        + p.NEWFALSE
        + p.SHORT_BINSTRING
        + b"\x08"
        + b"\x00" * 8
        + p.TUPLE
        + p.BUILD
        + p.SETITEM
        + p.STOP
    )


def _huge_sparse():
    """A csc matrix whose declared shape (10^6 x 10^6) would be a dense 8 TB array."""
    m = sp.csc_matrix(np.eye(2))
    m._shape = (10**6, 10**6)
    m.indptr = np.zeros(10**6 + 1, dtype=np.int32)  # consistent, but only 4 MB in the file
    m.indptr[-2:] = [0, 2]
    m.indptr[-1] = 2
    return pickle.dumps({"J_regressor": m}, protocol=2)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (lambda: pickle.dumps({"v_template": _System()}, protocol=2), r"refused to unpickle global posix\.system"),
        (lambda: pickle.dumps({"x": _Foreign()}, protocol=2), r"refused to unpickle global test_flame\._Foreign"),
        (lambda: pickle.dumps({"f": np.zeros(3, dtype=object)}, protocol=2), r"refused numpy\.dtype\('O8'"),
        (_huge_reconstruct, r"refused numpy _reconstruct"),
        (_huge_state, r"data bytes for shape \(1000000, 1000000\)"),
        (_huge_sparse, r"dense \(1000000, 1000000\): the decoded data would exceed"),
        (lambda: pickle.dumps([1, 2], protocol=2), r"the top-level object .*: a FLAME model file holds a dict"),
        (lambda: pickle.dumps({"s": {1.5}}, protocol=4), r"'s': a set of \[1\.5\]; only strings and integers"),
    ],
    ids=[
        "os.system",
        "foreign-class",
        "object-array",
        "huge-reconstruct",
        "huge-state",
        "huge-sparse",
        "not-a-dict",
        "set-of-floats",
    ],
)
def test_hostile_pickles_are_refused_naming_the_file_and_nothing_runs(tmp_path, monkeypatch, body, match):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(body())
    with pytest.raises(FlameError, match=r"generic_model\.pkl: .*" + match):
        load_flame(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_missing_file_says_how_to_point_facelab_at_flame(tmp_path):
    with pytest.raises(FlameError, match="FACELAB_FLAME_MODEL"):
        load_flame(tmp_path / "nope.pkl")


def test_configured_model_reads_the_environment(small, tmp_path):
    _, path = small
    assert flame.configured_model({}) is None
    assert flame.configured_model({"FACELAB_FLAME_MODEL": " "}) is None
    model = flame.configured_model({"FACELAB_FLAME_MODEL": str(path)})
    assert model is flame.configured_model({"FACELAB_FLAME_MODEL": str(path)})  # loaded once
    with pytest.raises(FlameError, match="names no file"):
        flame.configured_model({"FACELAB_FLAME_MODEL": str(tmp_path / "typo.pkl")})


# --------------------------------------------------------------------------------------------
# The mesh
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    arrays = flame_arrays(seed=3)
    return arrays, load_flame(write_flame_pkl(tmp_path_factory.mktemp("full") / "generic_model.pkl", arrays))


def test_zero_parameters_give_the_template(full):
    arrays, model = full
    v = flame_vertices(model, np.zeros((2, 50)), np.zeros((2, 3)))
    assert v.shape == (2, N_V, 3)
    np.testing.assert_allclose(v, np.broadcast_to(arrays["v_template"], v.shape), atol=1e-12)


def test_expression_moves_vertices_by_exactly_the_expression_blendshapes(full):
    arrays, model = full
    expr = np.random.default_rng(4).normal(size=(3, 50))
    v = flame_vertices(model, expr, np.zeros((3, 3)))
    want = arrays["v_template"] + np.einsum("vck,tk->tvc", arrays["shapedirs"][:, :, 300:350], expr)
    np.testing.assert_allclose(v, want, atol=1e-12)


def _model_with(model, **changes):
    import dataclasses

    return dataclasses.replace(model, **changes)


def test_the_jaw_rotates_jaw_weighted_vertices_about_the_jaw_joint(full):
    arrays, model = full
    w = np.zeros((N_V, 5))
    w[:100, 2] = 1.0  # fully the jaw's
    w[100:200, 1] = 1.0  # the neck's: no jaw weight
    w[200:300, 3] = 1.0  # an eye's
    w[300:, 2], w[300:, 0] = 0.25, 0.75  # partly the jaw's
    model = _model_with(model, weights=w, posedirs=np.zeros_like(model.posedirs))
    jaw = np.array([[0.3, 0.0, 0.0], [0.1, -0.2, 0.05]])
    expr = np.random.default_rng(5).normal(size=(2, 50))
    v = flame_vertices(model, expr, jaw)
    shaped = arrays["v_template"] + np.einsum("vck,tk->tvc", arrays["shapedirs"][:, :, 300:350], expr)
    for t in range(2):
        joint = arrays["J_regressor"][2] @ shaped[t]
        from scipy.spatial.transform import Rotation

        rot = Rotation.from_rotvec(jaw[t]).as_matrix()
        turned = (shaped[t] - joint) @ rot.T + joint
        np.testing.assert_allclose(v[t, :100], turned[:100], atol=1e-12)
        np.testing.assert_allclose(v[t, 100:300], shaped[t, 100:300], atol=1e-12)
        np.testing.assert_allclose(v[t, 300:], 0.25 * turned[300:] + 0.75 * shaped[t, 300:], atol=1e-12)
    assert np.abs(v[0, :100] - shaped[0, :100]).max() > 1e-3  # it did move


def test_pose_blendshapes_take_r_minus_i_of_the_four_non_root_joints(full):
    arrays, model = full
    w = np.zeros((N_V, 5))
    w[:, 1] = 1.0  # nothing skinned to the jaw: only the pose blendshapes move vertices
    model = _model_with(model, weights=w)
    jaw = np.array([[0.2, 0.1, -0.1]])
    from scipy.spatial.transform import Rotation

    feature = np.zeros(36)
    feature[9:18] = (Rotation.from_rotvec(jaw[0]).as_matrix() - np.eye(3)).ravel()  # joint 2 = the 2nd of 4
    v = flame_vertices(model, np.zeros((1, 50)), jaw)
    np.testing.assert_allclose(v[0], arrays["v_template"] + arrays["posedirs"] @ feature, atol=1e-12)


def test_rodrigues_matches_scipy_and_is_exact_at_zero():
    from scipy.spatial.transform import Rotation

    r = np.random.default_rng(6).normal(size=(20, 3))
    r[0] = 0
    r[1] = [1e-6, 0, 0]
    np.testing.assert_allclose(flame.axis_angle_to_matrix(r), Rotation.from_rotvec(r).as_matrix(), atol=1e-12)
    assert (flame.axis_angle_to_matrix(np.zeros(3)) == np.eye(3)).all()


# --------------------------------------------------------------------------------------------
# The GIF
# --------------------------------------------------------------------------------------------


def test_gif_durations_average_24_fps():
    d = flame.gif_durations(48)
    assert set(d) == {40, 50} and sum(d) == 2000
    assert flame.gif_durations(6) == [40, 40, 50, 40, 40, 40]


def test_render_gif_writes_t_frames_at_24_fps(small, tmp_path):
    from PIL import Image

    arrays, path = small
    model = load_flame(path)
    n_t = 12
    params = np.zeros((n_t, 53))
    params[:, 50] = np.linspace(0, 0.4, n_t)  # the jaw opens
    params[:, :3] = np.linspace(-2, 2, n_t)[:, None]
    out = render_gif(model, params, tmp_path / "run" / "flame.gif", title="test")
    with Image.open(out) as im:
        assert im.format == "GIF" and im.n_frames == n_t
        durations = []
        for i in range(n_t):
            im.seek(i)
            durations.append(im.info["duration"])
            if i == 0:
                first = np.asarray(im.convert("RGB"))
            if i == n_t - 1:
                last = np.asarray(im.convert("RGB"))
    assert np.mean(durations) == pytest.approx(1000 / 24, abs=0.01)  # 41.67 ms
    assert first.shape == (280, 240, 3)
    skin = (np.abs(first.astype(int) - [200, 160, 140]).sum(-1) < 120).mean()
    assert skin > 0.1  # the face is drawn
    assert np.abs(first.astype(int) - last.astype(int)).sum() > 0  # and it moves


def test_render_gif_refuses_wrong_params(small, tmp_path):
    _, path = small
    with pytest.raises(ValueError, match=r"expected \(T, 53\)"):
        render_gif(load_flame(path), np.zeros((4, 52)), tmp_path / "x.gif")


# --------------------------------------------------------------------------------------------
# Wired into a run: the expression scoring logs one avatar GIF per generated text
# --------------------------------------------------------------------------------------------


def test_an_expression_run_logs_flame_avatars_when_pointed_at_a_model(small, tmp_path, monkeypatch):
    """With ``FACELAB_FLAME_MODEL`` set, the trial's preview step (``log_trajectories``) logs
    ``viewer/flame_<i>.gif`` per test text: the generated sequence's frames at 24 fps, in a real MLflow
    store. A variable naming no file skips the avatars with a tagged reason instead of failing the run;
    unset, nothing is drawn."""
    import types

    import torch
    from mlflow.tracking import MlflowClient
    from PIL import Image

    from facelab.tasks.expressions.scoring import log_trajectories

    lengths = [12, 17, 9]

    class Model:
        mean_expression = torch.zeros(53)
        cfg = types.SimpleNamespace(max_frames=40)

        def generate(self, texts, max_frames, generator):
            return [0.5 * torch.randn(lengths[i], 53, generator=generator) for i in range(len(texts))]

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("flame", artifact_location=(tmp_path / "artifacts").as_uri())
    test = types.SimpleNamespace(texts=["a", "b", "c"], sequences=[np.zeros((30, 53), np.float32)] * 3)
    job = {"train": {"seed": 0}, "eval": {"max_frames": 64}}

    def viewer_files(run_id):
        return {a.path for a in c.list_artifacts(run_id, "viewer")}

    _, path = small
    monkeypatch.setenv("FACELAB_FLAME_MODEL", str(path))
    run = c.create_run(exp, run_name="with-flame").info.run_id
    log_trajectories(Model(), test, job, c, run)
    assert {f"viewer/flame_{i}.gif" for i in range(3)} <= viewer_files(run)
    for i, n in enumerate(lengths):
        gif = Image.open(c.download_artifacts(run, f"viewer/flame_{i}.gif", str(tmp_path / f"dl{i}")))
        assert gif.n_frames == n

    monkeypatch.setenv("FACELAB_FLAME_MODEL", str(tmp_path / "typo.pkl"))
    run = c.create_run(exp, run_name="typo").info.run_id
    log_trajectories(Model(), test, job, c, run)  # no exception: the run keeps its metrics and preview
    assert not any(p.endswith(".gif") for p in viewer_files(run)) and "viewer/preview.html" in viewer_files(run)
    assert "typo.pkl" in c.get_run(run).data.tags["facelab.flame_error"]

    monkeypatch.delenv("FACELAB_FLAME_MODEL")
    run = c.create_run(exp, run_name="without").info.run_id
    log_trajectories(Model(), test, job, c, run)
    assert not any(p.endswith(".gif") for p in viewer_files(run))
