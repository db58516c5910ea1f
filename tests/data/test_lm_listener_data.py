"""The LM-Listener release importer (safe loading, windows, texts, speaker frames) and the synthetic
release-format corpus of the `lm_listener` DVC stage."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from facelab import cli
from facelab.data.emoava import DataError, load_split, load_stats, read_meta
from facelab.data.lm_listener_data import (
    SPEAKER_DIM,
    import_release,
    load_segment_file,
    load_speaker,
    read_release_segments,
    segment_windows,
    window_text,
)
from facelab.data.synth_lm_listener import CUES, build_lm_listener, generate_release

# --------------------------------------------------------------------------------------------
# A release written by the test, in the format of github.com/sanjayss34/lm-listener
# --------------------------------------------------------------------------------------------


def _segment(g: torch.Generator, fname: str, start: int, n: int, before=(), during=()) -> dict:
    return {
        "fname": fname,
        "split_start_frame": start,
        "split_end_frame": start + n,
        "p0_exp": torch.randn(n, 50, generator=g),
        "p0_pose": torch.randn(n, 6, generator=g),
        "p0_shape": torch.zeros(n, 100),
        "p0_detail": torch.zeros(n, 128),
        "p1_exp": torch.randn(n, 50, generator=g),
        "p1_pose": torch.randn(n, 6, generator=g),
        "p1_shape": torch.ones(n, 100),
        "before_words": [{"text": t, "start": e - 0.2, "end": e} for t, e in before],
        "during_words": [{"text": t, "start": e - 0.2, "end": e} for t, e in during],
    }


def _release(root: Path) -> dict[str, list[dict]]:
    """Two training videos (two segments, one segment) and one validation video; saved with torch.save."""
    g = torch.Generator().manual_seed(0)
    splits = {
        "train": [
            _segment(g, "show/ep1/ep1.mp4", 300, 400, before=[("b1", 9.0), ("b2", 11.0)], during=[("d1", 12.0)]),
            _segment(g, "show/ep1/ep1.mp4", 1000, 130),  # one window of 34 frames after the 96-frame delay
            _segment(g, "show/ep2/ep2.mp4", 0, 340),
        ],
        "val": [_segment(g, "show/ep9/ep9.mp4", 60, 500, during=[("hello", 5.5), ("there", 6.0)])],
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, segs in splits.items():
        torch.save(segs, root / f"segments_{name}.pth")
    np.save(root / "mean.npy", np.zeros(56, np.float32))
    np.save(root / "std.npy", np.ones(56, np.float32))
    return splits


def _expected_window(seg: dict, offset: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    exp = seg["p0_exp"][offset : offset + n].numpy()
    jaw = seg["p0_pose"][offset : offset + n, 3:6].numpy()
    speaker = torch.cat([seg["p1_exp"], seg["p1_pose"]], 1)[offset : offset + n].numpy()
    return np.concatenate([exp, jaw], 1), speaker


def test_import_round_trip(tmp_path):
    segs = _release(tmp_path / "release")
    summary = import_release(tmp_path / "release", tmp_path / "out", dev_fraction=0.5)
    out = tmp_path / "out"
    assert summary["dataset"] == "lm_listener" and summary["source"] == "release"

    # val -> test: windows at offsets 96 (240 frames) and 336 (164 frames) of the 500-frame segment
    test = load_split(out, "test")
    speaker = load_speaker(out, "test")
    assert [len(s) for s in test.sequences] == [240, 164]
    for i, (offset, n) in enumerate([(96, 240), (336, 164)]):
        expr, spk = _expected_window(segs["val"][0], offset, n)
        np.testing.assert_array_equal(test.sequences[i], expr)
        np.testing.assert_array_equal(speaker[i], spk)
        assert speaker[i].shape == (n, SPEAKER_DIM)
    clips = json.loads((out / "test.clips.json").read_text())
    assert clips == [["show/ep9/ep9.mp4", 156], ["show/ep9/ep9.mp4", 396]]
    assert test.texts[0] == "hello there"  # both words end inside the first window

    # dev holds out whole videos (the last of the two, sorted); train keeps the other
    train, dev = load_split(out, "train"), load_split(out, "dev")
    train_clips = json.loads((out / "train.clips.json").read_text())
    dev_clips = json.loads((out / "dev.clips.json").read_text())
    assert {c[0] for c in train_clips} == {"show/ep1/ep1.mp4"} and {c[0] for c in dev_clips} == {"show/ep2/ep2.mp4"}
    assert [len(s) for s in train.sequences] == [240, 64, 34] and [len(s) for s in dev.sequences] == [240]
    expr, _ = _expected_window(segs["train"][0], 336, 64)
    np.testing.assert_array_equal(train.sequences[1], expr)

    mean, std = load_stats(out)
    frames = np.concatenate(train.sequences).astype(np.float64)
    np.testing.assert_allclose(mean, frames.mean(0), atol=1e-5)
    np.testing.assert_allclose(std, frames.std(0), atol=1e-5)
    meta = read_meta(out)
    assert meta["counts"] == {"train": 3, "dev": 1, "test": 2}
    assert meta["windows"]["window"] == 240 and meta["windows"]["delay_start"] == 96
    assert set(meta["release_files_sha256"]) == {"segments_train.pth", "segments_val.pth"}


def test_window_text_follows_the_release_rule(tmp_path):
    _release(tmp_path / "release")
    seg = read_release_segments(tmp_path / "release" / "segments_train.pth")[0]
    # the first window starts at absolute frame 396 (13.2 s): 'b1' ended 4.2 s before (> 3 s) and is
    # dropped; 'b2' (2.2 s before) and the during-word 'd1' that ended before the window (1.2 s) are kept
    assert window_text(seg, 396, 636) == "b2 d1"
    assert window_text(seg, 396, 636, max_time_before=10.0) == "b1 b2 d1"
    words = segment_windows(seg)
    assert [w.start for w in words] == [396, 636] and [len(w.expression) for w in words] == [240, 64]
    # a during-word is in the window when it ends before (end - 1) / fps, and later words are not
    seg.during_words[0] = type(seg.during_words[0])("late", 30.0)
    assert window_text(seg, 396, 636) == "b2"


def test_min_frames_and_delay(tmp_path):
    _release(tmp_path / "release")
    segs = read_release_segments(tmp_path / "release" / "segments_train.pth")
    assert [len(w.expression) for w in segment_windows(segs[1])] == [34]
    assert segment_windows(segs[1], min_frames=35) == []
    assert [len(w.expression) for w in segment_windows(segs[1], delay_start=0, window=100)] == [100, 30]


def test_numpy_scalar_timestamps_are_accepted(tmp_path):
    g = torch.Generator().manual_seed(0)
    seg = _segment(g, "a.mp4", 0, 200)
    seg["during_words"] = [{"text": "hi", "start": np.float64(4.0), "end": np.float64(4.1)}]
    torch.save([seg], tmp_path / "s.pth")
    (parsed,) = read_release_segments(tmp_path / "s.pth")
    assert parsed.during_words[0].end == pytest.approx(4.1)


# --------------------------------------------------------------------------------------------
# Hostile and broken inputs
# --------------------------------------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _zip_like_torch(path: Path, data_pkl: bytes) -> None:
    """A zip with torch.save's member layout whose data.pkl is ``data_pkl``."""
    buf = io.BytesIO()
    torch.save([1], buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data_pkl if info.filename.endswith("data.pkl") else src.read(info))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "segments_train.pth"
    _zip_like_torch(path, pickle.dumps([_Evil()], protocol=2))
    with pytest.raises(DataError, match="refused by the allow-listed unpickler") as err:
        load_segment_file(path)
    assert str(path) in str(err.value)
    assert not (tmp_path / "PWNED").exists()


def test_legacy_and_plain_pickles_are_refused(tmp_path):
    path = tmp_path / "segments_train.pth"
    path.write_bytes(pickle.dumps([_Evil()]))
    with pytest.raises(DataError, match="not a zip-format torch file"):
        load_segment_file(path)


def test_zip_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps([1], protocol=2))
        zf.writestr("archive/data/0", b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(DataError, match="unpack to"):
        load_segment_file(path)


def test_shared_reference_bomb_is_refused(tmp_path):
    path = tmp_path / "refs.pth"
    t = torch.zeros(20_000)
    torch.save([t] * 50_000, path)  # one 80 kB storage, referenced 50,000 times (~4 GB if copied)
    assert path.stat().st_size < 1 << 20
    with pytest.raises(DataError, match="memory bomb"):
        load_segment_file(path)


def test_oversized_file_is_refused(tmp_path):
    _release(tmp_path)
    with pytest.raises(DataError, match="more than the 1,000 an import reads"):
        load_segment_file(tmp_path / "segments_val.pth", max_bytes=1000)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (
            lambda s: s.update(p0_exp=torch.zeros(400, 49)),
            r"segment\[1\]\['p0_exp'\]: shape \(400, 49\), expected \(400, 50\)",
        ),
        (lambda s: s.update(p1_pose=torch.zeros(399, 6)), r"segment\[1\]\['p1_pose'\]: shape \(399, 6\)"),
        (lambda s: s.update(p0_pose=torch.zeros(400, 6, dtype=torch.int64)), r"\['p0_pose'\]: dtype torch.int64"),
        (lambda s: s.pop("during_words"), r"segment\[1\]: missing key\(s\) \['during_words'\]"),
        (lambda s: s.update(split_end_frame=100), r"split_start_frame 300 / split_end_frame 100"),
        (lambda s: s.update(fname=7), r"\['fname'\]: 7, expected a non-empty str"),
        (lambda s: s["p0_exp"].__setitem__((5, 2), float("nan")), r"\['p0_exp'\]: non-finite value at frame 5, dim 2"),
        (lambda s: s.update(before_words=[{"text": "x"}]), r"\['before_words'\]\[0\]: missing key 'end'"),
        (lambda s: s.update(before_words=[{"text": 3, "end": 1.0}]), r"\['before_words'\]\[0\]\['text'\]: int"),
    ],
)
def test_broken_segments_are_named(tmp_path, mutate, needle):
    g = torch.Generator().manual_seed(0)
    segs = [_segment(g, "a.mp4", 0, 200), _segment(g, "b.mp4", 300, 400)]
    mutate(segs[1])
    path = tmp_path / "segments_train.pth"
    torch.save(segs, path)
    with pytest.raises(DataError, match=needle) as err:
        read_release_segments(path)
    assert str(path) in str(err.value)


def test_import_checks_before_writing(tmp_path):
    release = tmp_path / "release"
    _release(release)
    (release / "segments_val.pth").unlink()
    with pytest.raises(DataError, match="segments_val.pth: missing"):
        import_release(release, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _release(release)
    with pytest.raises(DataError, match="refusing to write an LM-Listener dataset"):
        import_release(release, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"


def test_speaker_file_must_match_the_split(tmp_path):
    _release(tmp_path / "release")
    out = tmp_path / "out"
    import_release(tmp_path / "release", out)
    (out / "test.speaker.npz").replace(out / "test.speaker.bak")
    (out / "dev.speaker.npz").replace(out / "test.speaker.npz")
    with pytest.raises(DataError, match="offsets do not match test.npz"):
        load_speaker(out, "test")
    (out / "test.speaker.npz").unlink()
    with pytest.raises(DataError, match="test.speaker.npz: missing.*build-lm-listener"):
        load_speaker(out, "test")


# --------------------------------------------------------------------------------------------
# The synthetic corpus (the DVC stage)
# --------------------------------------------------------------------------------------------

SMALL = dict(n_train=4, n_val=2, seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_build_is_deterministic(tmp_path):
    a = build_lm_listener(tmp_path / "a" / "lm", **SMALL)
    b = build_lm_listener(tmp_path / "b" / "lm", **SMALL)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # release files and imported dataset, byte for byte
    assert a["splits"] == b["splits"] and a["source"] == "synthetic"
    c = build_lm_listener(tmp_path / "c" / "lm", **{**SMALL, "seed": 1})
    assert _files(tmp_path / "a")["lm/test.npz"] != _files(tmp_path / "c")["lm/test.npz"] and c["splits"]
    assert build_lm_listener(tmp_path / "a" / "lm", **SMALL)["splits"] == a["splits"]  # re-run over its own output


def test_synthetic_release_is_in_the_release_format(tmp_path):
    generate_release(tmp_path / "rel", **SMALL)
    assert {p.name for p in (tmp_path / "rel").iterdir()} >= {
        "segments_train.pth",
        "segments_val.pth",
        "mean.npy",
        "std.npy",
    }
    raw = load_segment_file(tmp_path / "rel" / "segments_train.pth")
    assert len(raw) == 4 and len({s["fname"] for s in raw}) == 2  # two segments per episode video
    seg = raw[0]
    n = seg["split_end_frame"] - seg["split_start_frame"]
    for key, width in (
        ("p0_exp", 50),
        ("p0_pose", 6),
        ("p0_shape", 100),
        ("p1_exp", 50),
        ("p1_pose", 6),
        ("p1_shape", 100),
    ):
        assert isinstance(seg[key], torch.Tensor) and tuple(seg[key].shape) == (n, width), key
    assert all({"text", "start", "end"} <= set(w) for w in seg["during_words"]) and seg["during_words"]
    # a single listener and a single speaker throughout (fixed identity codes)
    assert all(torch.equal(s["p0_shape"][0], seg["p0_shape"][0]) for s in raw)
    assert np.load(tmp_path / "rel" / "mean.npy", allow_pickle=False).shape == (56,)


def test_synthetic_texts_drive_the_listener(tmp_path):
    """Windows whose text has a joke cue smile more (exp dim 0) than those with bad news: the text carries signal."""
    build_lm_listener(tmp_path / "lm", n_train=12, n_val=2, seed=0)
    train = load_split(tmp_path / "lm", "train")
    assert len(set(train.texts)) == len(train.texts)  # one sequence per text
    jokes = set(CUES["joke"].words)
    sad = set(CUES["bad_news"].words)
    smile = {True: [], False: []}
    for text, seq in zip(train.texts, train.sequences):
        words = set(text.split())
        if bool(words & jokes) != bool(words & sad):
            smile[bool(words & jokes)].append(float(seq[:, 0].mean()))
    assert smile[True] and smile[False]
    assert np.mean(smile[True]) > np.mean(smile[False])


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_build_validate_import(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"lm_listener": SMALL}))
    out, rel = tmp_path / "data" / "lm", tmp_path / "data" / "rel"
    argv = ["data", "build-lm-listener", "--params", str(params), "--out", str(out), "--release-out", str(rel)]
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out)["dataset"] == "lm_listener"
    assert cli.main(argv) == 0  # the DVC stage re-runs over its own outputs without --force
    capsys.readouterr()
    assert cli.main(["data", "validate", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["test"]["speaker_frames"] == summary["splits"]["test"]["frames"]
    assert cli.main(["data", "import-lm-listener", str(rel), "--out", str(tmp_path / "imp")]) == 0
    assert json.loads(capsys.readouterr().out)["source"] == "release"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("x")
    assert cli.main(["data", "import-lm-listener", str(rel), "--out", str(foreign)]) == 2
    assert "--force" in capsys.readouterr().err and (foreign / "keep.txt").exists()
    parser = cli.build_parser()
    assert parser.parse_args(["data", "build-lm-listener"]).out == "data/lm_listener"
    assert parser.parse_args(["data", "import-lm-listener", "R", "--force"]).force is True
