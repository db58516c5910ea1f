"""Synthetic KeyframeFace corpus: shape of the corpus, plausible values, text that determines the target."""

from __future__ import annotations

import re

import numpy as np
import pytest

from facelab.data.arkit import CHANNELS, INDEX, N_BLENDSHAPES
from facelab.data.keyframeface import keyframe_text, load_dataset, load_meta, validate_dir
from facelab.data.synth_keyframe import (
    ACTIONS,
    EMOTIONS,
    FINE_WORDS,
    compose,
    describe,
    fine_word,
    generate_keyframeface,
    generate_scripts,
    image_level,
    measure,
    split_sizes,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("kf") / "synthetic"
    summary = generate_keyframeface(out)
    return out, summary


def _all_keyframes(splits):
    return [(s, kf) for scripts in splits.values() for s in scripts for kf in s.keyframes]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def test_action_and_emotion_tables_are_consistent():
    for act in ACTIONS.values():
        assert all(ch in INDEX for ch, _ in act.weights), act.name
        assert act.primary and 0 < act.scale <= 1
    assert len({a.arkit for a in ACTIONS.values()}) == len(ACTIONS)  # arkit phrases identify the action
    assert 18 <= len(EMOTIONS) <= 24 and len({e.text for e in EMOTIONS}) == len(EMOTIONS)
    for emo in EMOTIONS:
        assert emo.text[0].isupper() and emo.text.endswith(".")
        for name, weight, lo, hi in emo.pool:
            assert name in ACTIONS and weight > 0 and 0 < lo < hi <= 1.0, (emo.text, name)


def test_compose_hand_computed():
    v = compose([("smile", 0.4), ("gaze_down", 0.5)])
    assert v[INDEX["MouthSmileLeft"]] == v[INDEX["MouthSmileRight"]] == 0.4
    assert (
        v[INDEX["CheekSquintLeft"]] == 0.14
        and v[INDEX["EyeSquintRight"]] == 0.06
        and v[INDEX["MouthDimpleLeft"]] == 0.06
    )
    assert v[INDEX["EyeLookDownLeft"]] == 0.3 and v[INDEX["LeftEyePitch"]] == -0.3 and v[INDEX["RightEyePitch"]] == -0.3
    assert np.count_nonzero(v) == 12
    # asymmetry: Left * (1 + s), Right * (1 - s); pose channels untouched
    w = compose([("frown", 0.5), ("head_turn_right", 0.8)], asymmetry=0.1)
    assert w[INDEX["MouthFrownLeft"]] == 0.55 and w[INDEX["MouthFrownRight"]] == 0.45
    assert w[INDEX["MouthShrugLower"]] == 0.15 and w[INDEX["HeadYaw"]] == -0.4
    # overlapping actions add up and are clipped to the range
    c = compose([("squint", 1.0), ("brow_furrow", 1.0)])
    assert c[INDEX["EyeSquintLeft"]] == 1.0 and c[INDEX["BrowDownLeft"]] == 1.0
    assert not np.signbit(compose([("head_down", 0.001)])).any()  # no -0.0


def test_intensity_words_and_levels():
    assert fine_word(0.05) == "faintly" and fine_word(0.1) == "faintly" and fine_word(0.11) == "slightly"
    assert fine_word(0.45) == "moderately" and fine_word(0.5) == "moderately" and fine_word(0.51) == "noticeably"
    assert fine_word(1.0) == "maximally" and len(FINE_WORDS) == 10
    assert image_level(0.24) is None and image_level(0.25) == 0 and image_level(0.5) == 1 and image_level(0.7) == 2
    v = compose([("gaze_up", 0.5), ("smirk_left", 0.4)], asymmetry=0.05)
    assert measure(v, "gaze_up") == pytest.approx(0.5) and measure(v, "smirk_left") == pytest.approx(0.42)


def test_describe_three_annotation_types():
    emo = EMOTIONS[0]
    v = compose([("inner_brow_raise", 0.55), ("lip_press", 0.8), ("gaze_down", 0.15)], asymmetry=0.08)
    d = describe(
        v, ["lip_press", "gaze_down", "inner_brow_raise"], emotion=emo, person="nurse", rng=np.random.default_rng(0)
    )
    assert set(d) == {"original", "arkit", "image"}
    # arkit: every action in face order with its fine intensity word, and the stronger side
    assert d["arkit"] == (
        "Inner brows raised noticeably; gaze lowered slightly; lips pressed together strongly, stronger on the left."
    )
    # image: the subtle gaze (0.15 < 0.25) is not visible; levels are coarse
    assert "worried, raised inner brows" in d["image"] and "lips pressed into a thin hard line" in d["image"]
    assert "eyes" not in d["image"]
    # original: the two strongest actions as plain verbs, no intensity, plus the emotion
    assert "presses the lips together" in d["original"] and "lifts the inner brows" in d["original"]
    assert "looks down" not in d["original"] and "nurse" in d["original"]
    assert any(tail in d["original"].lower() for tail in emo.tails)
    assert not set(FINE_WORDS) & set(re.findall(r"[a-z]+", d["original"]))


def _decode_arkit(text: str) -> list[tuple[str, float]]:
    """Read an arkit description back into (action, bin-centre intensity) pairs."""
    by_phrase = {a.arkit: name for name, a in ACTIONS.items()}
    words = sorted(FINE_WORDS, key=len, reverse=True)
    out = []
    for part in text.rstrip(".").split("; "):
        part = part.split(", stronger on the ")[0]
        part = part[0].lower() + part[1:]
        word = next(w for w in words if part.endswith(" " + w))
        out.append((by_phrase[part[: -len(word) - 1]], (FINE_WORDS.index(word) + 0.5) / 10))
    return out


def test_arkit_text_reconstructs_the_values():
    errors = []
    for s in generate_scripts(300, seed=5):
        for kf in s.keyframes:
            rebuilt = compose(_decode_arkit(kf.descriptions["arkit"]))
            errors.append((rebuilt - kf.values) ** 2)
    mse = float(np.mean(errors))
    assert mse < 4e-4  # intensity bins are 0.1 wide; overlapping actions and asymmetry add a little


# --------------------------------------------------------------------------------------------
# The default corpus
# --------------------------------------------------------------------------------------------


def test_default_corpus_shape(corpus):
    out, summary = corpus
    total = summary["total"]
    assert total["scripts"] == 2100 and total["actors"] == 21
    assert total["keyframes_per_script"] == {"1": 210, "2": 840, "3": 735, "4": 210, "5": 105}
    assert total["keyframes"] == 5460 and total["mean_keyframes"] == 2.6
    assert {k: v["scripts"] for k, v in summary["splits"].items()} == {"train": 1680, "val": 210, "test": 210}
    assert total["annotations"] == {"original": 5460, "arkit": 5460, "image": 5460}
    assert 5 <= total["mean_active_channels"] <= 15  # sparse
    meta = load_meta(out)
    assert meta["source"] == "synthetic" and meta["params"]["n_scripts"] == 2100
    assert meta["splits"] == {"train": 1680, "val": 210, "test": 210}
    assert meta["annotations"] == ["original", "arkit", "image"]
    summary_again = validate_dir(out)
    assert summary_again == {k: v for k, v in summary.items() if k != "params"}


def test_default_corpus_values_are_plausible(corpus):
    out, _ = corpus
    splits = load_dataset(out)
    values = np.stack([kf.values for _, kf in _all_keyframes(splits)]).astype(np.float64)  # (N, 61)
    assert (values[:, :N_BLENDSHAPES] >= 0).all() and (values[:, :N_BLENDSHAPES] <= 1).all()
    assert (np.abs(values[:, N_BLENDSHAPES:]) <= 1).all()
    assert np.allclose(values, np.round(values, 2), atol=1e-6)  # 2 decimals
    assert ((np.abs(values) >= 0.05).sum(axis=1) >= 1).all()  # every keyframe shows something
    assert (values[:, N_BLENDSHAPES:] < 0).any() and (values[:, N_BLENDSHAPES:] > 0).any()
    used = (np.abs(values) > 0).any(axis=0)
    assert used.sum() >= 55, [c for c, u in zip(CHANNELS, used) if not u]
    # consecutive keyframes of a script differ
    for scripts in splits.values():
        for s in scripts:
            for a, b in zip(s.keyframes, s.keyframes[1:]):
                assert not np.array_equal(a.values, b.values)
    ids = [s.script_id for scripts in splits.values() for s in scripts]
    assert len(set(ids)) == 2100 and len({s.emotion for scripts in splits.values() for s in scripts}) == len(EMOTIONS)


def test_generation_is_deterministic_and_byte_stable(tmp_path):
    a = generate_keyframeface(tmp_path / "a", n_scripts=120, seed=3)
    b = generate_keyframeface(tmp_path / "b", n_scripts=120, seed=3)
    generate_keyframeface(tmp_path / "c", n_scripts=120, seed=4)
    assert a == b
    for name in ("meta.json", "train.jsonl", "val.jsonl", "test.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()
    assert a["total"]["scripts"] == 120 and a["total"]["actors"] == 21
    assert a["total"]["keyframes_per_script"] == {"1": 12, "2": 48, "3": 42, "4": 12, "5": 6}


def test_split_sizes_and_argument_checks(tmp_path):
    assert split_sizes(2100, (0.8, 0.1, 0.1)) == {"train": 1680, "val": 210, "test": 210}
    assert split_sizes(7, (0.5, 0.25, 0.25)) == {"train": 3, "val": 2, "test": 2}
    with pytest.raises(ValueError, match="split"):
        generate_keyframeface(tmp_path / "x", n_scripts=10, split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="n_scripts"):
        generate_keyframeface(tmp_path / "x", n_scripts=0)
    with pytest.raises(ValueError, match="n_actors"):
        generate_keyframeface(tmp_path / "x", n_scripts=10, n_actors=0)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------------------------
# Text determines the target: arkit > image > original
# --------------------------------------------------------------------------------------------


def _grams(text: str) -> set[str]:
    toks = re.findall(r"[a-z]+", text.lower())
    return set(toks) | {" ".join(toks[i : i + n]) for n in (2, 3) for i in range(len(toks) - n + 1)}


def _probe_mse(train, test, annotation: str) -> float:
    """Held-out MSE of kernel ridge regression from word 1-3-grams of keyframe_text to the 61 values."""
    g_tr = [_grams(keyframe_text(s, kf.index, annotation)) for s in train for kf in s.keyframes]
    g_te = [_grams(keyframe_text(s, kf.index, annotation)) for s in test for kf in s.keyframes]
    vocab = {g: i for i, g in enumerate(sorted(set().union(*g_tr)))}

    def features(grams):
        x = np.zeros((len(grams), len(vocab)), dtype=np.float64)  # (N, V)
        for i, gs in enumerate(grams):
            x[i, [vocab[g] for g in gs if g in vocab]] = 1.0
        return x

    x_tr, x_te = features(g_tr), features(g_te)
    y_tr = np.stack([kf.values for s in train for kf in s.keyframes]).astype(np.float64)  # (N, 61)
    y_te = np.stack([kf.values for s in test for kf in s.keyframes]).astype(np.float64)
    mean = y_tr.mean(axis=0)
    alpha = np.linalg.solve(x_tr @ x_tr.T + np.eye(len(x_tr)), y_tr - mean)  # (N, 61)
    pred = x_te @ x_tr.T @ alpha + mean
    return float(np.mean((pred - y_te) ** 2))


def test_text_determines_target_arkit_most_informative():
    scripts = generate_scripts(700, seed=11)
    train, test = scripts[:500], scripts[500:]
    mse = {a: _probe_mse(train, test, a) for a in ("original", "image", "arkit")}
    y_tr = np.stack([kf.values for s in train for kf in s.keyframes]).astype(np.float64)
    y_te = np.stack([kf.values for s in test for kf in s.keyframes]).astype(np.float64)
    baseline = float(np.mean((y_te - y_tr.mean(axis=0)) ** 2))
    assert mse["arkit"] < 0.8 * mse["image"], mse  # fine intensities and subtle actions help
    assert mse["image"] < 0.5 * mse["original"], mse  # naming every visible action with a level helps
    assert mse["original"] < 0.5 * baseline, (mse, baseline)  # even the coarse text carries the target
