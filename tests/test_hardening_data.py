"""Hardening of the data writers and readers (audit items 1, 2 and 5).

1. ``--out`` never destroys a directory its writer did not make: the writers accept a missing or
   empty directory or their own earlier output (what a DVC stage re-run finds) and refuse anything
   else, naming the path, unless ``force``; the ``facelab data`` writers take ``--force``.
2. The allow-listed EmoAva unpickler refuses memory bombs and garbage (hostile pickles are built
   here by hand, opcode by opcode) and still reads the real release file and genuine numpy pickles.
5. ``bench/bench_cteg_gpu.py --texts`` reads its pickle through that reader, never plain ``pickle``.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from facelab import cli
from facelab.data import emoava, keyframeface
from facelab.data.emoava import EXPR_DIM, DataError, read_release_exps, read_release_texts
from facelab.data.keyframeface import validate_dir, write_dataset
from facelab.data.synth import generate_emoava
from facelab.data.synth_keyframe import generate_keyframeface, generate_scripts

REPO = Path(__file__).resolve().parents[1]
RELEASE_TEXT = REPO.parent / "shared" / "data" / "emoava" / "test_stage1_text.pkl"


# --------------------------------------------------------------------------------------------
# 1. --out does not wipe what the writer did not write
# --------------------------------------------------------------------------------------------


def _foreign_dir(path: Path) -> Path:
    """A directory of someone's files, as `data/` would be: a file and a sub-dataset."""
    (path / "emoava").mkdir(parents=True)
    (path / "emoava" / "train.npz").write_bytes(b"precious")
    (path / "notes.txt").write_text("mine")
    return path


def _assert_intact(path: Path) -> None:
    assert (path / "notes.txt").read_text() == "mine"
    assert (path / "emoava" / "train.npz").read_bytes() == b"precious"


def _scripts(n: int = 4):
    return {"train": generate_scripts(n, seed=0, n_actors=2)}


def test_write_dataset_refuses_a_foreign_directory_unless_forced(tmp_path):
    out = _foreign_dir(tmp_path / "data")
    with pytest.raises(keyframeface.DataError) as err:
        write_dataset(out, _scripts(), {"source": "test"})
    msg = str(err.value)
    assert str(out) in msg and "refusing" in msg and "--force" in msg
    _assert_intact(out)

    write_dataset(out, _scripts(), {"source": "test"}, force=True)
    assert not (out / "notes.txt").exists()
    assert validate_dir(out)["splits"]["train"]["scripts"] == 4


def test_write_dataset_replaces_its_own_output_and_empty_dirs(tmp_path):
    out = tmp_path / "kf"
    out.mkdir()  # empty: fine
    write_dataset(out, _scripts(4), {"source": "v1"})
    write_dataset(out, _scripts(3), {"source": "v2"})  # its own previous output: the DVC re-run
    assert keyframeface.load_meta(out)["source"] == "v2"


def test_write_dataset_refuses_another_writers_dataset(tmp_path):
    """An EmoAva dataset also has a meta.json, but not of this format: not ours to replace."""
    out = tmp_path / "emoava"
    generate_emoava(out, n_train=4, n_dev=0, n_test=2, seed=0)
    with pytest.raises(keyframeface.DataError, match="facelab-keyframeface/1"):
        write_dataset(out, _scripts(), {})
    assert emoava.is_emoava_dir(out)


def test_write_dataset_refuses_a_file_even_with_force(tmp_path):
    out = tmp_path / "file"
    out.write_text("x")
    with pytest.raises(keyframeface.DataError, match="not a directory"):
        write_dataset(out, _scripts(), {}, force=True)
    assert out.read_text() == "x"


def test_generate_keyframeface_refuses_before_generating_and_reruns_over_its_output(tmp_path):
    out = _foreign_dir(tmp_path / "data")
    with pytest.raises(keyframeface.DataError, match=str(out)):
        generate_keyframeface(out, n_scripts=20, seed=0)
    _assert_intact(out)
    own = tmp_path / "kf"
    generate_keyframeface(own, n_scripts=20, seed=0)
    generate_keyframeface(own, n_scripts=20, seed=1)
    assert keyframeface.load_meta(own)["params"]["seed"] == 1


def test_generate_emoava_refuses_foreign_and_keyframeface_dirs_and_reruns_over_its_output(tmp_path):
    out = _foreign_dir(tmp_path / "data")
    with pytest.raises(DataError) as err:
        generate_emoava(out, n_train=4, n_dev=2, n_test=2)
    assert str(out) in str(err.value) and "--force" in str(err.value)
    _assert_intact(out)
    assert not (out / "meta.json").exists()

    kf = tmp_path / "kf"
    write_dataset(kf, _scripts(), {"source": "synthetic"})  # also source "synthetic", but no expr_dim
    with pytest.raises(DataError, match="EmoAva"):
        generate_emoava(kf, n_train=4, n_dev=2, n_test=2)
    assert validate_dir(kf)

    own = tmp_path / "emoava"
    generate_emoava(own, n_train=4, n_dev=2, n_test=2, seed=0)
    generate_emoava(own, n_train=6, n_dev=2, n_test=2, seed=1)  # the DVC re-run
    assert emoava.read_meta(own)["counts"]["train"] == 6

    generate_emoava(out, n_train=4, n_dev=2, n_test=2, force=True)  # forced: written into it
    assert emoava.read_meta(out)["counts"]["train"] == 4


def _mini_release(root: Path) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split in emoava.SPLITS:
        (root / f"{split}_stage1_text.pkl").write_bytes(pickle.dumps([f"{split} a", f"{split} b"], protocol=4))
        exps = [rng.normal(size=(3, EXPR_DIM)).astype(np.float32) for _ in range(2)]
        (root / f"{split}_stage1_exps.pkl").write_bytes(pickle.dumps(exps, protocol=4))
    np.save(root / "stage1_mean.npy", np.zeros(EXPR_DIM, np.float32))
    np.save(root / "stage1_std.npy", np.ones(EXPR_DIM, np.float32))
    return root


def test_import_release_refuses_a_foreign_directory_unless_forced(tmp_path):
    release = _mini_release(tmp_path / "release")
    out = _foreign_dir(tmp_path / "data")
    with pytest.raises(DataError, match=str(out)):
        emoava.import_release(release, out)
    _assert_intact(out)
    emoava.import_release(release, tmp_path / "emoava")
    emoava.import_release(release, tmp_path / "emoava")  # its own output again
    assert emoava.import_release(release, out, force=True)["total"]["sequences"] == 6


TINY_LM = dict(
    vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, intermediate_size=32
)


def test_build_tiny_lm_refuses_a_foreign_directory_before_any_work(tmp_path):
    from facelab.families.keyframe_lm.tiny import build_tiny_lm

    out = _foreign_dir(tmp_path / "models")

    def never():
        raise AssertionError("the corpus was read: the refusal came too late")
        yield ""

    with pytest.raises(DataError) as err:
        build_tiny_lm(out, never(), **TINY_LM)
    assert str(out) in str(err.value) and "--force" in str(err.value)
    _assert_intact(out)


def test_build_tiny_lm_replaces_its_own_output_and_a_forced_dir(tmp_path):
    from facelab.families.keyframe_lm.tiny import build_tiny_lm, is_tiny_lm_dir

    own = tmp_path / "tiny"
    build_tiny_lm(own, ["hello world"], **TINY_LM)
    assert is_tiny_lm_dir(own)
    build_tiny_lm(own, ["hello again"], **TINY_LM)  # the DVC stage re-run
    forced = _foreign_dir(tmp_path / "models")
    build_tiny_lm(forced, ["hello"], **TINY_LM, force=True)
    assert is_tiny_lm_dir(forced) and not (forced / "notes.txt").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["data", "build-emoava"],
        ["data", "build-keyframeface"],
        ["data", "build-tiny-lm"],
        ["data", "import-emoava", "REL"],
        ["data", "import-keyframeface", "REQ", "RES"],
    ],
)
def test_data_writers_take_force(argv):
    parser = cli.build_parser()
    assert parser.parse_args(argv).force is False
    assert parser.parse_args([*argv, "--force"]).force is True


def test_cli_build_keyframeface_refuses_data_dir_then_forces_and_reruns(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"keyframeface": {"n_scripts": 20, "seed": 0}}))
    out = _foreign_dir(tmp_path / "data")
    argv = ["data", "build-keyframeface", "--params", str(params), "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err
    _assert_intact(out)
    assert cli.main([*argv, "--force"]) == 0
    assert not (out / "notes.txt").exists()
    assert cli.main(argv) == 0  # now its own output: the DVC stage command re-runs without --force
    assert keyframeface.load_meta(out)["source"] == "synthetic"


def test_cli_import_keyframeface_refuses_before_reading_the_release(tmp_path, capsys):
    out = _foreign_dir(tmp_path / "data")
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["data", "import-keyframeface", str(missing), str(missing), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "refusing" in err
    _assert_intact(out)


# --------------------------------------------------------------------------------------------
# 2. The allow-listed unpickler: hostile pickles, built opcode by opcode
# --------------------------------------------------------------------------------------------

P = pickle


def _op_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return P.BINUNICODE + struct.pack("<I", len(b)) + b


def _op_bytes(b: bytes) -> bytes:
    return P.BINBYTES + struct.pack("<I", len(b)) + b


def _op_int(i: int) -> bytes:
    return P.BININT + struct.pack("<i", i)


def _op_global(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def _op_tuple(*items: bytes) -> bytes:
    return P.MARK + b"".join(items) + P.TUPLE


def _op_call(fn: bytes, *args: bytes) -> bytes:
    return fn + _op_tuple(*args) + P.REDUCE


def _op_list(*items: bytes) -> bytes:
    return P.EMPTY_LIST + (P.MARK + b"".join(items) + P.APPENDS if items else b"")


RECONSTRUCT = _op_global("numpy._core.multiarray", "_reconstruct")
NDARRAY = _op_global("numpy", "ndarray")
ENCODE = _op_global("_codecs", "encode")


def _op_dtype(code: str = "f4", order: str = "<") -> bytes:
    state = _op_tuple(_op_int(3), _op_str(order), P.NONE, P.NONE, P.NONE, _op_int(-1), _op_int(-1), _op_int(0))
    return _op_call(_op_global("numpy", "dtype"), _op_str(code), P.NEWFALSE, P.NEWTRUE) + state + P.BUILD


def _op_array(shape: tuple[int, ...], data: bytes, dtype: bytes | None = None) -> bytes:
    """numpy's own protocol-3 ndarray pickle: _reconstruct(ndarray, (0,), b'b') + its state (BUILD);
    ``data`` is the opcode(s) that push the array's bytes."""
    head = _op_call(RECONSTRUCT, NDARRAY, _op_tuple(_op_int(0)), _op_bytes(b"b"))
    state = _op_tuple(_op_int(1), _op_tuple(*map(_op_int, shape)), dtype or _op_dtype(), P.NEWFALSE, data)
    return head + state + P.BUILD


def _pickle(body: bytes, proto: int = 3) -> bytes:
    return P.PROTO + bytes([proto]) + body + P.STOP


def _write(tmp_path: Path, data: bytes, name: str = "train_stage1_exps.pkl") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_hand_built_array_pickle_is_what_numpy_writes(tmp_path):
    """The builder is right, so the hostile variants below differ from a genuine file only where meant."""
    arr = np.arange(2 * EXPR_DIM, dtype=np.float32).reshape(2, EXPR_DIM)
    data = _pickle(_op_list(_op_array(arr.shape, _op_bytes(arr.tobytes()))))
    np.testing.assert_array_equal(pickle.loads(data)[0], arr)  # our own bytes: trusted
    (got,) = read_release_exps(_write(tmp_path, data))
    np.testing.assert_array_equal(got, arr)


def test_reconstruct_with_a_shape_and_no_state_is_refused(tmp_path):
    """The audit's 92-byte pickle: _reconstruct(ndarray, (300000, 53), b'f') and no BUILD, which
    made 63.6 MB of uninitialised memory that was accepted as a sequence."""
    body = _op_list(_op_call(RECONSTRUCT, NDARRAY, _op_tuple(_op_int(300000), _op_int(EXPR_DIM)), _op_bytes(b"f")))
    path = _write(tmp_path, _pickle(body))
    assert path.stat().st_size < 120
    with pytest.raises(DataError) as err:
        read_release_exps(path)
    msg = str(err.value)
    assert str(path) in msg and "refused numpy _reconstruct" in msg and "(0,)" in msg


def test_reconstruct_without_its_state_step_is_refused(tmp_path):
    body = _op_list(_op_call(RECONSTRUCT, NDARRAY, _op_tuple(_op_int(0)), _op_bytes(b"b")))
    with pytest.raises(DataError, match=r"\[0\]: a numpy array without its state \(BUILD\) step"):
        read_release_exps(_write(tmp_path, _pickle(body)))


def test_array_state_whose_data_does_not_fill_its_shape_is_refused(tmp_path):
    body = _op_list(_op_array((100000, EXPR_DIM), _op_bytes(b"\0" * 4 * EXPR_DIM)))
    with pytest.raises(DataError, match=r"212 data bytes for shape \(100000, 53\)"):
        read_release_exps(_write(tmp_path, _pickle(body)))


def test_chained_codecs_encode_is_refused(tmp_path):
    """encode(…, 'hex') doubles its input; chained it turns bytes of file into megabytes."""
    inner = _op_call(ENCODE, _op_bytes(b"ab" * 64), _op_str("hex"))
    for _ in range(12):
        inner = _op_call(ENCODE, inner, _op_str("hex"))
    with pytest.raises(DataError) as err:
        read_release_texts(_write(tmp_path, _pickle(_op_list(inner)), "test_stage1_text.pkl"))
    assert "_codecs.encode" in str(err.value) and "(str, 'latin1')" in str(err.value)


def test_one_string_encoded_over_and_over_hits_the_decode_cap(tmp_path):
    """Each array's data is encode(<the same memoised 63 kB string>, 'latin1'): a ~180 kB file
    that decodes to 64 MB of plausible arrays."""
    frames = 300
    text = _op_str("x" * (frames * EXPR_DIM * 4)) + P.BINPUT + b"\x01"
    data = _op_call(ENCODE, P.BINGET + b"\x01", _op_str("latin1"))
    body = text + P.POP + _op_list(*[_op_array((frames, EXPR_DIM), data) for _ in range(1000)])
    path = _write(tmp_path, _pickle(body, proto=2))
    with pytest.raises(DataError) as err:
        read_release_exps(path)
    assert str(path) in str(err.value) and "decoded data would exceed" in str(err.value)


def test_one_array_referenced_many_times_hits_the_decode_cap(tmp_path):
    arr = np.ones((100, EXPR_DIM), np.float32)
    first = _op_array(arr.shape, _op_bytes(arr.tobytes())) + P.BINPUT + b"\x07"
    body = _op_list(first, *[P.BINGET + b"\x07"] * 20000)
    with pytest.raises(DataError, match=r"\[\d+\]: numpy array: the decoded data would exceed"):
        read_release_exps(_write(tmp_path, _pickle(body)))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        # numpy.ndarray(shape, dtype) allocates uninitialised memory of any shape
        (_op_list(_op_call(NDARRAY, _op_tuple(_op_int(1000), _op_int(EXPR_DIM)), _op_str("f4"))), r"numpy\.ndarray"),
        # object arrays hold arbitrary Python objects
        (_op_list(_op_array((1, EXPR_DIM), _op_list(), _op_dtype("O", "|"))), r"refused numpy\.dtype\('O'"),
        # a dtype state other than numpy's (here: a record dtype's field names)
        (
            _op_list(
                _op_call(_op_global("numpy", "dtype"), _op_str("f4"), P.NEWFALSE, P.NEWTRUE)
                + _op_tuple(_op_int(3), _op_str("<"), _op_list(), P.NONE, P.NONE, _op_int(-1), _op_int(-1), _op_int(0))
                + P.BUILD
            ),
            r"numpy\.dtype\('f4'\) state",
        ),
        # bytes(n): n zero bytes from a few bytes of file
        (_op_list(_op_call(_op_global("__builtin__", "bytes"), _op_int(10**6))), r"refused bytes\(1000000"),
        # a BUILD step on anything but a numpy array or dtype
        (_op_list() + _op_list() + P.BUILD, r"refused a state \(BUILD\) for \[\]"),
        # dicts are not in release files (and hash hostile keys)
        (P.EMPTY_DICT, r"opcode EMPTY_DICT"),
        # deeper than any release file
        (P.EMPTY_LIST * 20 + P.APPEND * 19, "nested deeper than 8"),
        # a BYTEARRAY8 that claims a terabyte
        (_op_list(P.BYTEARRAY8 + struct.pack("<Q", 1 << 40)), r"BYTEARRAY8 of 1,099,511,627,776 bytes"),
    ],
    ids=["ndarray-call", "object-dtype", "dtype-state", "bytes-n", "build-on-list", "dict", "nesting", "bytearray8"],
)
def test_hostile_pickles_are_refused_naming_the_file(tmp_path, body, match):
    path = _write(tmp_path, _pickle(body, proto=5))
    with pytest.raises(DataError, match=match) as err:
        read_release_exps(path)
    assert str(path) in str(err.value)


def test_a_huge_memo_index_allocates_nothing(tmp_path):
    """LONG_BINPUT 0xfffffff0 makes the C unpickler allocate and zero a 64 GiB memo table; the
    reader must load the (empty) list within a 1 GiB address-space allowance."""
    path = _write(tmp_path, _pickle(P.EMPTY_LIST + P.LONG_BINPUT + struct.pack("<I", 0xFFFFFFF0), proto=4))
    script = textwrap.dedent(
        f"""
        import resource
        from facelab.data.emoava import read_release_texts
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        limit = vm + (1 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        print(read_release_texts({str(path)!r}))
        """
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "platform")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_the_real_release_text_file_still_loads():
    if not RELEASE_TEXT.is_file():
        pytest.skip(f"reference data not present: {RELEASE_TEXT}")
    texts = read_release_texts(RELEASE_TEXT)  # read in place, never copied into the repository
    assert len(texts) == 1500 and all(isinstance(t, str) and t for t in texts)
    assert texts[0] == "the two aren't mutually exclusive!"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_genuine_numpy_pickles_still_load(tmp_path, protocol):
    rng = np.random.default_rng(protocol)
    seqs = [
        rng.normal(size=(5, EXPR_DIM)).astype(np.float32),
        np.asfortranarray(rng.normal(size=(4, EXPR_DIM))),
        rng.normal(size=(3, EXPR_DIM)).astype(">f8"),
        rng.normal(size=(10, EXPR_DIM))[::2],  # not contiguous
        rng.normal(size=(1, EXPR_DIM)).astype(np.float16),
    ]
    path = _write(tmp_path, pickle.dumps(seqs, protocol=protocol))
    got = read_release_exps(path)
    for g, want in zip(got, seqs, strict=True):
        np.testing.assert_array_equal(g, want.astype(np.float32))

    others = [np.arange(6, dtype=np.int64).reshape(2, 3), np.array([True, False]), np.zeros((0, EXPR_DIM)), "text"]
    path.write_bytes(pickle.dumps(others, protocol=protocol))
    loaded = emoava._safe_unpickle(path)
    reference = pickle.loads(path.read_bytes())  # our own bytes: trusted
    for g, want in zip(loaded[:3], reference[:3], strict=True):
        assert g.dtype == want.dtype and g.shape == want.shape
        np.testing.assert_array_equal(g, want)
    assert loaded[3] == "text"


def test_a_large_genuine_protocol_2_pickle_fits_the_decode_cap(tmp_path):
    """Protocol 2 carries array bytes as latin-1 text (counted three times): still under the cap."""
    seqs = [np.random.default_rng(i).normal(size=(52, EXPR_DIM)) for i in range(200)]
    path = _write(tmp_path, pickle.dumps(seqs, protocol=2))
    assert len(read_release_exps(path)) == 200


# --------------------------------------------------------------------------------------------
# 5. bench_cteg_gpu.py --texts goes through the safe reader
# --------------------------------------------------------------------------------------------


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_cteg_gpu", REPO / "bench" / "bench_cteg_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_texts_are_read_with_the_safe_reader(tmp_path):
    bench = _bench_module()
    marker = tmp_path / "pwned"
    payload = tmp_path / "texts.pkl"
    payload.write_bytes(pickle.dumps(["hello", _Evil(os.system, f"touch {marker}")]))
    with pytest.raises(DataError) as err:
        bench.load_texts(str(payload), 4)
    assert str(payload) in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()

    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(["a", "b"], protocol=4))
    assert bench.load_texts(str(good), 5) == ["a", "b", "a", "b", "a"]
    if RELEASE_TEXT.is_file():
        assert len(bench.load_texts(str(RELEASE_TEXT), 3000)) == 3000
