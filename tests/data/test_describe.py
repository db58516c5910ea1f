"""`facelab data describe`: the KeyframeFace paper's dataset figures (8-11) and summary tables."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from facelab import cli
from facelab.data.arkit import INDEX
from facelab.data.describe import (
    EMOTION_LABELS,
    FIGURES,
    FORMAT,
    MARKDOWN_FILE,
    SUMMARY_FILE,
    describe,
    dominant_emotion,
    is_describe_dir,
    pca_2d,
)
from facelab.data.keyframeface import DataError, Keyframe, Script, import_chat_jsonl, write_dataset
from facelab.data.synth_keyframe import EMOTIONS, generate_keyframeface

from conftest import SHARED_DATA

RELEASE = SHARED_DATA / "keyframeface"
N_SCRIPTS, N_ACTORS = 40, 4


def _release(name: str) -> Path:
    path = RELEASE / name
    if not path.is_file():
        pytest.skip(f"reference data not present: {path}")
    return path


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("describe")
    data = root / "keyframeface"
    generate_keyframeface(data, n_scripts=N_SCRIPTS, n_actors=N_ACTORS, seed=0)
    out = root / "keyframeface-describe"
    return data, out, describe(data, out)


def _vec(**values: float) -> np.ndarray:
    v = np.zeros(61, dtype=np.float32)
    for name, x in values.items():
        v[INDEX[name]] = x
    return v


def _script(sid: str, actor: str, emotion: str, k: int) -> Script:
    kfs = tuple(
        Keyframe(index=i, descriptions={"original": f"keyframe {i}"}, values=_vec(JawOpen=i / 10, MouthSmileLeft=0.3))
        for i in range(1, k + 1)
    )
    return Script(script_id=sid, actor=actor, background="A room.", emotion=emotion, keyframes=kfs)


# --------------------------------------------------------------------------------------------
# The synthetic corpus (what the DVC stage describes)
# --------------------------------------------------------------------------------------------


def test_counts_equal_an_independent_count_of_the_files(synthetic):
    data, out, summary = synthetic
    assert json.loads((out / SUMMARY_FILE).read_text()) == summary
    assert summary["format"] == FORMAT and is_describe_dir(out)
    totals = Counter()
    all_actors = set()
    for split in ("train", "val", "test"):
        lines = _lines(data / f"{split}.jsonl")
        hist = Counter(str(len(obj["keyframes"])) for obj in lines)
        st = summary["splits"][split]
        assert st["clips"] == len(lines)
        assert st["keyframes"] == sum(len(obj["keyframes"]) for obj in lines)
        assert st["keyframes_per_clip"] == {str(k): hist[str(k)] for k in range(1, 6)}
        assert st["actors"] == len({obj["actor"] for obj in lines})
        totals.update(hist)
        all_actors |= {obj["actor"] for obj in lines}
    total = summary["total"]
    assert total["clips"] == N_SCRIPTS == sum(summary["splits"][s]["clips"] for s in ("train", "val", "test"))
    assert total["keyframes_per_clip"] == {str(k): totals[str(k)] for k in range(1, 6)}
    assert total["keyframes"] == sum(k * totals[str(k)] for k in range(1, 6))
    assert total["mean_keyframes_per_clip"] == round(total["keyframes"] / N_SCRIPTS, 4)
    assert total["actors"] == len(all_actors) == N_ACTORS and total["clips_without_actor"] == 0
    assert sum(total["dominant_emotions"].values()) == N_SCRIPTS
    assert list(total["dominant_emotions"]) == list(EMOTION_LABELS)
    # the synthetic corpus has no durations: Figures 9 and 10 are skipped, saying why
    assert total["clip_seconds"] is None and total["clips_without_duration"] == N_SCRIPTS
    assert summary["minutes_per_actor"] == {}
    for key in ("fig9", "fig10"):
        assert "file" not in summary["figures"][key]
        assert "no clip durations" in summary["figures"][key]["skipped"]
        assert "clip_seconds" in summary["figures"][key]["skipped"]
    # Figures 8 and 11 are drawn; every keyframe is embedded (fewer than the sample cap)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [SUMMARY_FILE, MARKDOWN_FILE, FIGURES["fig8"][1], FIGURES["fig11"][1]]
    )
    for key in ("fig8", "fig11"):
        assert summary["figures"][key]["file"] == FIGURES[key][1]
        assert (out / FIGURES[key][1]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["figures"]["fig11"].get("skipped_panels") is None
    assert summary["embedding"]["method"] == "t-SNE"
    assert summary["embedding"]["points"] == summary["embedding"]["keyframes"] == total["keyframes"]


def test_markdown_tables_hold_the_same_numbers(synthetic):
    _, out, summary = synthetic
    md = (out / MARKDOWN_FILE).read_text()
    t = summary["total"]
    hist = " | ".join(str(t["keyframes_per_clip"][str(k)]) for k in range(1, 6))
    row = (
        f"| **total** | {N_SCRIPTS} | {t['keyframes']} | {t['mean_keyframes_per_clip']:.2f} | {hist} | {N_ACTORS} | — |"
    )
    assert row in md
    assert "| Figure 9 | recording minutes per actor | skipped: no clip durations" in md
    assert f"| Figure 8 | keyframes per clip | `{FIGURES['fig8'][1]}` |" in md


def test_two_runs_give_identical_bytes(synthetic, tmp_path):
    data, out, _ = synthetic
    first = _files(out)
    again = tmp_path / "again"
    describe(data, again)
    assert _files(again) == first
    describe(data, again)  # over its own output (the DVC stage re-running): no --force needed
    assert _files(again) == first


def test_dominant_emotion_rule():
    expected = {
        "Anxiety concealed by a restrained smile.": "fear",  # the first keyword decides, not the mask
        "Overwhelming joy.": "happiness",
        "Quiet sadness.": "sadness",
        "Suppressed anger.": "anger",
        "Explosive rage.": "anger",
        "Shock turning into fear.": "surprise",
        "Disgust mixed with contempt.": "disgust",
        "Cold contempt.": "contempt",
        "Pleasant surprise.": "surprise",  # "pleasant" is a modifier, not a keyword
        "Embarrassment.": "other",
        "Grief held back.": "sadness",
        "Nervous anticipation.": "fear",
        "Smug satisfaction.": "happiness",
        "Confusion.": "other",
        "Skeptical doubt.": "other",
        "Tenderness.": "happiness",
        "Exhaustion.": "other",
        "Playful mischief.": "happiness",
        "Quiet determination.": "other",
        "Bitter disappointment.": "sadness",
        "Relief after tension.": "happiness",
    }
    assert {e.text for e in EMOTIONS} == set(expected)
    assert {text: dominant_emotion(text) for text in expected} == expected
    assert dominant_emotion("") == "other"
    assert dominant_emotion("ANGRY, then terrified") == "anger"
    assert dominant_emotion("a smile hides sorrow") == "happiness"


def test_pca_fallback_is_the_top_two_components():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([5.0, 2.0, 0.1, 0.1, 0.1])  # (N, D), variance along axes 0, 1
    y = pca_2d(x)  # (N, 2)
    xc = x - x.mean(axis=0)
    assert y.shape == (200, 2)
    np.testing.assert_allclose(np.abs(np.corrcoef(y[:, 0], xc[:, 0])[0, 1]), 1.0, atol=1e-2)
    np.testing.assert_allclose(np.abs(np.corrcoef(y[:, 1], xc[:, 1])[0, 1]), 1.0, atol=1e-2)


# --------------------------------------------------------------------------------------------
# The release sample: no actor ids, no durations, two keyframes
# --------------------------------------------------------------------------------------------


def test_release_sample_draws_what_it_supports_and_says_why_the_rest_is_skipped(tmp_path):
    requests, results = _release("example.jsonl"), _release("example_result.jsonl")
    data = tmp_path / "kf-release"
    write_dataset(data, {"test": import_chat_jsonl(requests, results)}, {"source": "release (chat JSONL)"})
    summary = describe(data, tmp_path / "out")
    n_requests = len(_lines(requests))  # one request per keyframe
    t = summary["total"]
    assert (t["clips"], t["keyframes"]) == (1, n_requests) == (1, 2)
    assert t["keyframes_per_clip"] == {"1": 0, "2": 1, "3": 0, "4": 0, "5": 0}
    assert t["actors"] == 0 and t["clips_without_actor"] == 1
    assert t["dominant_emotions"]["fear"] == 1  # "Anxiety concealed by a restrained smile."
    figs = summary["figures"]
    assert figs["fig8"]["file"] == FIGURES["fig8"][1]
    assert "no clip durations" in figs["fig9"]["skipped"] and "no actor ids" in figs["fig9"]["skipped"]
    assert "no clip durations" in figs["fig10"]["skipped"] and "actor" not in figs["fig10"]["skipped"]
    assert figs["fig11"]["file"] == FIGURES["fig11"][1]
    assert figs["fig11"]["skipped_panels"] == {"embedding": "only 2 keyframes; the 2-d embedding needs at least 10"}
    assert summary["embedding"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [SUMMARY_FILE, MARKDOWN_FILE, FIGURES["fig8"][1], FIGURES["fig11"][1]]
    )


# --------------------------------------------------------------------------------------------
# Durations from meta.json: Figures 9 and 10
# --------------------------------------------------------------------------------------------


def _timed_dataset(path: Path, clip_seconds) -> Path:
    scripts = [
        _script("a1", "alice", "Quiet sadness.", 2),
        _script("a2", "alice", "Overwhelming joy.", 3),
        _script("b1", "bob", "Cold contempt.", 1),
        _script("u1", "unknown", "Confusion.", 2),
        _script("n1", "bob", "Explosive rage.", 4),
    ]
    write_dataset(path, {"train": scripts[:4], "test": scripts[4:]}, {"clip_seconds": clip_seconds})
    return path


def test_clip_durations_draw_figures_9_and_10(tmp_path):
    data = _timed_dataset(tmp_path / "timed", {"a1": 30, "a2": 90, "b1": 60.0, "u1": 45})  # n1 has none
    out = tmp_path / "out"
    summary = describe(data, out)
    t = summary["total"]
    assert summary["minutes_per_actor"] == {"alice": 2.0, "bob": 1.0}  # u1: no actor; n1: no duration
    assert t["clip_seconds"] == {
        "clips": 4,
        "mean": 56.25,
        "median": 52.5,
        "min": 30.0,
        "max": 90.0,
        "total_minutes": 3.75,
    }
    assert t["clips_without_duration"] == 1 and t["actors"] == 2 and t["clips_without_actor"] == 1
    assert summary["splits"]["test"]["clip_seconds"] is None
    assert summary["splits"]["train"]["clip_seconds"]["total_minutes"] == 3.75
    figs = summary["figures"]
    assert figs["fig9"]["file"] == FIGURES["fig9"][1] and figs["fig10"]["file"] == FIGURES["fig10"][1]
    assert figs["fig9"]["left_out"] == "2 clips without a known actor or a duration"
    assert figs["fig10"]["left_out"] == "1 clips without a duration"
    assert all((out / FIGURES[k][1]).is_file() for k in FIGURES)
    assert "| **total** | 5 | 12 | 2.40 | 1 | 2 | 1 | 1 | 0 | 2 | 3.8 |" in (out / MARKDOWN_FILE).read_text()


@pytest.mark.parametrize(
    ("clip_seconds", "message"),
    [
        ({"a1": -3}, "field 'clip_seconds.a1': expected a duration in seconds > 0, got -3"),
        ({"zz": 3}, "field 'clip_seconds.zz': no script with this id in the dataset"),
        ([3, 4], "field 'clip_seconds' must be an object"),
    ],
)
def test_malformed_clip_seconds_name_the_field(tmp_path, clip_seconds, message):
    data = _timed_dataset(tmp_path / "timed", clip_seconds)
    with pytest.raises(DataError, match="meta.json") as err:
        describe(data, tmp_path / "out")
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# Errors and the --out rule
# --------------------------------------------------------------------------------------------


def test_a_malformed_line_is_reported_with_file_and_line(synthetic, tmp_path, capsys):
    data, _, _ = synthetic
    broken = tmp_path / "broken"
    broken.mkdir()
    for p in data.iterdir():
        (broken / p.name).write_bytes(p.read_bytes())
    lines = (broken / "val.jsonl").read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace('"keyframes":[', '"keyframes":[{"index":1},', 1)
    (broken / "val.jsonl").write_text("".join(lines))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"val\.jsonl:3: "):
        describe(broken, out)
    assert cli.main(["data", "describe", str(broken), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{broken / 'val.jsonl'}:3" in err and "Traceback" not in err
    assert not out.exists()


def test_out_dir_rule(synthetic, tmp_path):
    data, _, _ = synthetic
    foreign = tmp_path / "mine"
    (foreign / "sub").mkdir(parents=True)
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="refusing to write a dataset description there") as err:
        describe(data, foreign)
    assert "--force" in str(err.value) and SUMMARY_FILE in str(err.value)
    assert (foreign / "notes.txt").read_text() == "mine" and (foreign / "sub").is_dir()
    describe(data, foreign, force=True)
    assert not (foreign / "notes.txt").exists() and is_describe_dir(foreign)
    # never the dataset itself, a folder inside it or above it, even with force
    for bad in (data, data / "figs", data.parent):
        with pytest.raises(DataError, match="may not be the dataset directory"):
            describe(data, bad, force=True)
    assert (data / "meta.json").is_file() and not (data / "figs").exists()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        describe(data, a_file, force=True)


def test_cli_prints_the_summary_and_the_written_paths(synthetic, tmp_path, capsys):
    data, _, summary = synthetic
    out = tmp_path / "cli-out"
    assert cli.main(["data", "describe", str(data), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    t = summary["total"]
    assert f"{N_SCRIPTS} clips" in printed and f"{t['keyframes']} keyframes" in printed
    assert str(out / FIGURES["fig8"][1]) in printed and str(out / FIGURES["fig11"][1]) in printed
    assert "Figure 9" in printed and "skipped: no clip durations" in printed
    assert str(out / SUMMARY_FILE) in printed and str(out / MARKDOWN_FILE) in printed
    assert cli.main(["data", "describe", str(data), "--out", str(out)]) == 0  # re-run over its own output
    assert cli.build_parser().parse_args(["data", "describe", "D", "--out", "O", "--force"]).force is True


def test_a_dataset_without_clips_skips_every_figure(tmp_path):
    data = tmp_path / "empty"
    write_dataset(data, {"train": []})
    summary = describe(data, tmp_path / "out")
    assert summary["total"]["clips"] == 0
    assert {k: f.get("skipped") for k, f in summary["figures"].items()} == dict.fromkeys(
        FIGURES, "the dataset has no clips"
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([MARKDOWN_FILE, SUMMARY_FILE])
