"""EmoAva on-disk format, validation and the allow-listed release importer."""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from facelab.data.emoava import (
    EXPR_DIM,
    SPLITS,
    DataError,
    EmoAvaSplit,
    import_release,
    load_split,
    load_stats,
    read_meta,
    read_release_exps,
    read_release_texts,
    save_split,
    save_stats,
    summarize,
    validate_split,
    write_meta,
)

SHARED_EMOAVA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "emoava"


def _split(n: int = 4, seed: int = 0, dtype=np.float32) -> EmoAvaSplit:
    rng = np.random.default_rng(seed)
    lengths = [1, 3, 7, 2, 5, 11][:n]
    seqs = [rng.normal(size=(t, EXPR_DIM)).astype(dtype) for t in lengths]
    texts = [f"utterance {i} — ünïcödé 😀" for i in range(n)]
    return EmoAvaSplit(texts=texts, sequences=seqs)


class _Evil:
    """Pickles to a call of ``func(*args)``: what a poisoned release file would contain."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


# --------------------------------------------------------------------------------------------
# Safe unpickling
# --------------------------------------------------------------------------------------------


def test_real_release_text_pickle_loads_through_the_safe_unpickler():
    path = SHARED_EMOAVA / "test_stage1_text.pkl"
    if not path.is_file():
        pytest.skip(f"reference data not present: {path}")
    texts = read_release_texts(path)
    assert len(texts) == 1500
    assert all(isinstance(t, str) and t for t in texts)


@pytest.mark.parametrize("reader", [read_release_texts, read_release_exps])
def test_pickle_running_os_system_is_refused_and_never_runs(tmp_path, reader):
    marker = tmp_path / "pwned"
    payload = tmp_path / "test_stage1_text.pkl"
    payload.write_bytes(pickle.dumps(["hello", _Evil(os.system, f"touch {marker}")]))

    with pytest.raises(DataError) as err:
        reader(payload)
    msg = str(err.value)
    assert str(payload) in msg
    assert "system" in msg and "refused" in msg
    assert not marker.exists()


def test_pickle_writing_a_file_via_eval_is_refused(tmp_path):
    marker = tmp_path / "pwned2"
    payload = tmp_path / "train_stage1_exps.pkl"
    payload.write_bytes(pickle.dumps([_Evil(eval, f"open({str(marker)!r}, 'w').write('x')")]))
    with pytest.raises(DataError, match=r"builtins\.eval"):
        read_release_exps(payload)
    assert not marker.exists()


def test_import_release_refuses_poisoned_split_and_writes_nothing(tmp_path):
    release = _write_release(tmp_path / "release")
    marker = tmp_path / "pwned3"
    (release / "dev_stage1_exps.pkl").write_bytes(pickle.dumps([_Evil(os.system, f"touch {marker}")]))
    out = tmp_path / "out"
    with pytest.raises(DataError, match="dev_stage1_exps.pkl"):
        import_release(release, out)
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())


def test_corrupt_pickle_is_a_data_error_naming_the_file(tmp_path):
    path = tmp_path / "test_stage1_text.pkl"
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(DataError, match="test_stage1_text.pkl"):
        read_release_texts(path)


# --------------------------------------------------------------------------------------------
# Release import
# --------------------------------------------------------------------------------------------


def _write_release(root: Path, sizes=(5, 3, 4)) -> Path:
    """A miniature release: plain-pickled texts and numpy arrays, like the real files."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i, (split, n) in enumerate(zip(SPLITS, sizes)):
        texts = [f"{split} sentence {j}" for j in range(n)]
        if n > 1:
            texts[1] = texts[0]  # one-to-many: same text, different sequences
        # mixed dtypes and pickle protocols, as different exporters would write them
        exps = [
            rng.normal(size=(int(rng.integers(1, 40)), EXPR_DIM)).astype(np.float64 if j % 2 else np.float32)
            for j in range(n)
        ]
        (root / f"{split}_stage1_text.pkl").write_bytes(pickle.dumps(texts, protocol=2 + i))
        (root / f"{split}_stage1_exps.pkl").write_bytes(pickle.dumps(exps, protocol=2 + i))
    np.save(root / "stage1_mean.npy", rng.normal(size=EXPR_DIM).astype(np.float32))
    np.save(root / "stage1_std.npy", rng.uniform(0.1, 2.0, size=EXPR_DIM).astype(np.float32))
    return root


def test_import_release_round_trips(tmp_path):
    release = _write_release(tmp_path / "release")
    out = tmp_path / "data"
    summary = import_release(release, out)

    for split in SPLITS:
        with open(release / f"{split}_stage1_text.pkl", "rb") as fh:
            texts = pickle.load(fh)  # our own test file: trusted
        with open(release / f"{split}_stage1_exps.pkl", "rb") as fh:
            exps = pickle.load(fh)
        loaded = load_split(out, split)
        assert loaded.texts == texts
        assert len(loaded.sequences) == len(exps)
        for got, want in zip(loaded.sequences, exps):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want.astype(np.float32))

    mean, std = load_stats(out)
    np.testing.assert_array_equal(mean, np.load(release / "stage1_mean.npy"))
    np.testing.assert_array_equal(std, np.load(release / "stage1_std.npy"))
    meta = read_meta(out)
    assert meta["source"] == "release"
    assert meta["counts"] == {"train": 5, "dev": 3, "test": 4}
    assert set(meta["release_files_sha256"]) == {p.name for p in release.iterdir()}
    assert summary["splits"]["train"]["sequences"] == 5
    assert summary["splits"]["train"]["one_to_many_instances"] == 2
    assert summary["total"]["sequences"] == 12
    assert "/" not in "".join(meta["release_files_sha256"])  # file names only, no machine paths


def test_import_release_requires_text_and_exps_for_each_split(tmp_path):
    release = _write_release(tmp_path / "release")
    (release / "test_stage1_exps.pkl").unlink()
    with pytest.raises(DataError, match="test_stage1_exps.pkl: missing"):
        import_release(release, tmp_path / "out")
    # a subset of splits can still be imported
    summary = import_release(release, tmp_path / "out", splits=("train", "dev"))
    assert set(summary["splits"]) == {"train", "dev"}


def test_import_release_length_mismatch_names_the_file(tmp_path):
    release = _write_release(tmp_path / "release")
    (release / "dev_stage1_text.pkl").write_bytes(pickle.dumps(["only one"]))
    with pytest.raises(DataError, match=r"dev_stage1_exps\.pkl: length mismatch"):
        import_release(release, tmp_path / "out")


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (
            lambda s: s.sequences.__setitem__(2, np.zeros((4, 52), np.float32)),
            r"SRC: sequence\[2\] has shape \(4, 52\)",
        ),
        (
            lambda s: s.sequences[1].__setitem__((0, 5), np.nan),
            r"SRC: sequence\[1\] has a non-finite value at frame 0, dim 5",
        ),
        (lambda s: s.sequences[3].__setitem__((1, 0), np.inf), r"SRC: sequence\[3\] has a non-finite"),
        (lambda s: s.sequences.__setitem__(0, np.zeros((0, EXPR_DIM), np.float32)), r"SRC: sequence\[0\] is empty"),
        (
            lambda s: s.sequences.__setitem__(1, np.zeros((2, EXPR_DIM), np.int64)),
            r"SRC: sequence\[1\] has dtype int64",
        ),
        (lambda s: s.texts.__setitem__(2, 7), r"SRC: text\[2\] is int, expected str"),
        (lambda s: s.texts.pop(), r"SRC: length mismatch: 3 texts but 4 sequences"),
    ],
)
def test_validation_errors_name_source_and_index(mutate, expected):
    split = _split()
    mutate(split)
    with pytest.raises(DataError, match=expected):
        validate_split(split, "SRC")


def test_valid_split_passes_and_float64_is_accepted():
    validate_split(_split(), "ok")
    validate_split(_split(dtype=np.float64), "ok")


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    split = _split(6)
    split.sequences[0][0, :3] = [np.finfo(np.float32).max, np.finfo(np.float32).tiny, -0.0]
    save_split(split, tmp_path, "train")
    loaded = load_split(tmp_path, "train")
    assert loaded.texts == split.texts
    assert [s.shape for s in loaded.sequences] == [s.shape for s in split.sequences]
    for got, want in zip(loaded.sequences, split.sequences):
        assert got.dtype == np.float32
        assert got.tobytes() == want.tobytes()
    with np.load(tmp_path / "train.npz", allow_pickle=False) as npz:
        assert npz["frames"].shape == (sum(len(s) for s in split.sequences), EXPR_DIM)
        np.testing.assert_array_equal(npz["offsets"], [0, 1, 4, 11, 13, 18, 29])
        assert npz["offsets"].dtype == np.int64
    assert json.loads((tmp_path / "train.texts.json").read_text(encoding="utf-8")) == split.texts


def test_save_is_byte_stable_and_leaves_no_temp_files(tmp_path):
    split = _split()
    save_split(split, tmp_path / "a", "dev")
    save_split(split, tmp_path / "b", "dev")
    for name in ("dev.npz", "dev.texts.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["dev.npz", "dev.texts.json"]


def test_invalid_split_is_not_written(tmp_path):
    split = _split()
    split.sequences[1][0, 0] = np.nan
    with pytest.raises(DataError, match=r"sequence\[1\]"):
        save_split(split, tmp_path, "test")
    assert list(tmp_path.iterdir()) == []


def test_load_missing_split_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"test\.npz: missing"):
        load_split(tmp_path, "test")


def test_load_corrupt_npz_names_the_file(tmp_path):
    save_split(_split(), tmp_path, "test")
    (tmp_path / "test.npz").write_bytes(b"PK\x03\x04 truncated garbage")
    with pytest.raises(DataError, match=r"test\.npz: unreadable or corrupt"):
        load_split(tmp_path, "test")


def test_load_rejects_empty_sequence_in_offsets(tmp_path):
    save_split(_split(), tmp_path, "test")
    frames = np.zeros((5, EXPR_DIM), np.float32)
    offsets = np.array([0, 2, 2, 3, 5], np.int64)  # sequence 1 has zero frames
    np.savez(tmp_path / "test.npz", frames=frames, offsets=offsets)
    with pytest.raises(DataError, match=r"test\.npz: sequence\[1\] is empty"):
        load_split(tmp_path, "test")


def test_load_rejects_object_arrays_without_unpickling(tmp_path):
    np.savez(tmp_path / "test.npz", frames=np.array([object()], dtype=object), offsets=np.array([0, 1]))
    with pytest.raises(DataError, match=r"test\.npz"):
        load_split(tmp_path, "test")


def test_load_texts_mismatch_names_the_texts_file(tmp_path):
    save_split(_split(), tmp_path, "dev")
    (tmp_path / "dev.texts.json").write_text(json.dumps(["a", "b"]), encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.texts\.json: length mismatch: 2 texts but 4 sequences"):
        load_split(tmp_path, "dev")
    (tmp_path / "dev.texts.json").write_text("[1, 2,", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.texts\.json: invalid JSON at line 1"):
        load_split(tmp_path, "dev")
    (tmp_path / "dev.texts.json").write_text(json.dumps(["a", "b", 3, "d"]), encoding="utf-8")
    with pytest.raises(DataError, match=r"dev\.texts\.json: text\[2\] is int"):
        load_split(tmp_path, "dev")


def test_npz_files_are_plain_zip_with_npy_members(tmp_path):
    save_split(_split(), tmp_path, "train")
    with zipfile.ZipFile(tmp_path / "train.npz") as zf:
        assert sorted(zf.namelist()) == ["frames.npy", "offsets.npy"]
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}


# --------------------------------------------------------------------------------------------
# Stats, meta, summary
# --------------------------------------------------------------------------------------------


def test_stats_round_trip_exact_and_validated(tmp_path):
    rng = np.random.default_rng(3)
    mean = rng.normal(size=EXPR_DIM).astype(np.float32)
    std = rng.uniform(0.01, 2, size=EXPR_DIM).astype(np.float32)
    save_stats(tmp_path, mean, std)
    got_mean, got_std = load_stats(tmp_path)
    assert got_mean.dtype == np.float32 and got_std.dtype == np.float32
    assert got_mean.tobytes() == mean.tobytes() and got_std.tobytes() == std.tobytes()

    bad = std.copy()
    bad[7] = 0.0
    with pytest.raises(DataError, match=r"stats\.json: std.*dim 7"):
        save_stats(tmp_path, mean, bad)
    with pytest.raises(DataError, match=r"shape \(53,\)"):
        save_stats(tmp_path, mean[:10], std[:10])
    (tmp_path / "stats.json").write_text(json.dumps({"mean": list(map(float, mean))}))
    with pytest.raises(DataError, match=r"stats\.json: missing field 'std'"):
        load_stats(tmp_path)


def test_meta_round_trip_and_source_check(tmp_path):
    meta = {"source": "synthetic", "counts": {"train": 3}, "params": {"seed": 0}}
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == meta
    with pytest.raises(DataError, match=r"meta\.json: field 'source'"):
        write_meta(tmp_path, {"source": "scraped"})
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(DataError, match=r"meta\.json: field 'source'"):
        read_meta(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(DataError, match=r"meta\.json: missing"):
        read_meta(tmp_path)


def test_summarize_counts(tmp_path):
    seqs = [np.zeros((t, EXPR_DIM), np.float32) for t in (10, 300, 20, 257, 256)]
    texts = ["a b c", "same text", "same text", "other", "same text"]
    save_split(EmoAvaSplit(texts=texts, sequences=seqs), tmp_path, "train")
    save_split(EmoAvaSplit(texts=["other", "x"], sequences=seqs[:2]), tmp_path, "test")
    summary = summarize(tmp_path)
    train = summary["splits"]["train"]
    assert train["sequences"] == 5 and train["frames"] == 843
    assert train["mean_length"] == pytest.approx(168.6)
    assert train["over_256"] == 2
    assert train["one_to_many_instances"] == 3 and train["one_to_many_texts"] == 1
    assert train["max_sequences_per_text"] == 3
    assert set(summary["splits"]) == {"train", "test"}
    assert summary["total"]["one_to_many_instances"] == 5  # "other" repeats across splits
    assert summary["source"] is None  # no meta.json written


def test_summarize_without_splits_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no split files"):
        summarize(tmp_path)
