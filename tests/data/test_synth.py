"""Synthetic EmoAva corpus: determinism, calibration to the release, and text -> expression."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from facelab.data.emoava import EXPR_DIM, SPLITS, load_split, load_stats, read_meta, summarize
from facelab.data.synth import EMOTIONS, INTENSITIES, RELEASE_MEAN, RELEASE_STD, generate_emoava, parse_text
from facelab.tasks.expressions.metrics import dot, fgd, variation

SHARED_EMOAVA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "emoava"

# Paper (EMNLP 2025), Table 2 ground-truth row on the EmoAva test set.
GT = {"dot": 9.24, "fgd": 1.26, "variation": 0.28}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few thousand sequences: enough for calibration checks, fast to build."""
    out = tmp_path_factory.mktemp("synth")
    generate_emoava(out, n_train=2000, n_dev=300, n_test=2500, seed=7)
    return out


def _all_frames(root: Path) -> np.ndarray:
    return np.concatenate([np.concatenate(load_split(root, s).sequences) for s in SPLITS])  # (N, 53)


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    kwargs = dict(n_train=120, n_dev=30, n_test=40)
    generate_emoava(tmp_path / "a", seed=3, **kwargs)
    generate_emoava(tmp_path / "b", seed=3, **kwargs)
    generate_emoava(tmp_path / "c", seed=4, **kwargs)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == sorted(
        [
            "train.npz",
            "train.texts.json",
            "dev.npz",
            "dev.texts.json",
            "test.npz",
            "test.texts.json",
            "stats.json",
            "meta.json",
        ]
    )
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "test.npz").read_bytes() != (tmp_path / "c" / "test.npz").read_bytes()


def test_values_are_rounded_to_four_decimals(corpus):
    frames = np.concatenate(load_split(corpus, "test").sequences).astype(np.float64)
    np.testing.assert_allclose(frames, np.round(frames, 4), atol=1e-6, rtol=0)


def test_calibration_matches_paper_ground_truth_row(corpus):
    seqs = load_split(corpus, "test").sequences
    got = {"dot": dot(seqs), "fgd": fgd(seqs), "variation": variation(seqs)}
    for key, target in GT.items():
        assert got[key] == pytest.approx(target, rel=0.10), (key, got)


def test_lengths_tail_and_one_to_many(corpus):
    summary = summarize(corpus)
    total = summary["total"]
    assert total["sequences"] == 4800
    assert total["mean_length"] == pytest.approx(52.0, abs=3.0)
    tail = total["over_256"] / total["sequences"]
    assert 0.004 <= tail <= 0.025  # paper: 184 / 15000 = 1.2 %
    assert total["one_to_many_instances"] / total["sequences"] == pytest.approx(0.15, abs=0.01)
    for split in SPLITS:
        counts = Counter(load_split(corpus, split).texts)
        shared = [c for c in counts.values() if c > 1]
        assert shared and min(shared) >= 2 and max(shared) <= 76
    # texts outside one-to-many groups are unique across the whole corpus
    assert total["one_to_many_instances"] == sum(s["one_to_many_instances"] for s in summary["splits"].values())
    assert 8 <= total["mean_words"] <= 14


def test_per_dimension_stats_match_release(corpus):
    frames = _all_frames(corpus).astype(np.float64)
    mean, std = np.asarray(RELEASE_MEAN), np.asarray(RELEASE_STD)
    assert np.abs(frames.mean(axis=0) - mean).max() < 0.01 * std.min()
    np.testing.assert_allclose(frames.std(axis=0), std, rtol=0.01)
    saved_mean, saved_std = load_stats(corpus)  # the train split's own statistics
    np.testing.assert_allclose(saved_std, std, rtol=0.10)  # 2,000 sequences: sampling noise
    assert (np.abs(saved_mean - mean) < 0.1 * std).all()


def test_embedded_constants_equal_the_release_files():
    mean_path, std_path = SHARED_EMOAVA / "stage1_mean.npy", SHARED_EMOAVA / "stage1_std.npy"
    if not (mean_path.is_file() and std_path.is_file()):
        pytest.skip(f"reference data not present: {SHARED_EMOAVA}")
    np.testing.assert_array_equal(np.asarray(RELEASE_MEAN, dtype=np.float32), np.load(mean_path))
    np.testing.assert_array_equal(np.asarray(RELEASE_STD, dtype=np.float32), np.load(std_path))


def test_every_text_encodes_an_emotion(corpus):
    texts = load_split(corpus, "train").texts
    parsed = [parse_text(t) for t in texts]
    assert all(p is not None for p in parsed)
    assert {p[0] for p in parsed} == set(EMOTIONS)
    assert {p[1] for p in parsed} == set(INTENSITIES.values())


def test_text_determines_expression(corpus):
    """Happy sentences sit on the happy side of the happy-sad axis; adverbs scale the offset."""
    split = load_split(corpus, "train")
    mean, std = np.asarray(RELEASE_MEAN), np.asarray(RELEASE_STD)
    z = np.stack([(s.astype(np.float64).mean(axis=0) - mean) / std for s in split.sequences])  # (n, 53)
    parsed = [parse_text(t) for t in split.texts]
    emotion = np.array([p[0] for p in parsed])
    intensity = np.array([p[1] for p in parsed])

    axis = EMOTIONS["happy"].direction() - EMOTIONS["sad"].direction()
    axis /= np.linalg.norm(axis)
    proj = z @ axis
    gap = proj[emotion == "happy"].mean() - proj[emotion == "sad"].mean()
    pooled = np.sqrt(0.5 * (proj[emotion == "happy"].var() + proj[emotion == "sad"].var()))
    assert gap > 1.0 and gap / pooled > 1.5

    # the same gap along a direction unrelated to either emotion is small
    rng = np.random.default_rng(0)
    other = rng.normal(size=EXPR_DIM)
    other -= (other @ axis) * axis
    other /= np.linalg.norm(other)
    assert abs((z[emotion == "happy"] - z[emotion == "sad"].mean(axis=0)).mean(axis=0) @ other) < 0.3 * gap

    # intensity: "extremely angry" moves further along the angry direction than "slightly angry"
    u = EMOTIONS["angry"].direction()
    angry = emotion == "angry"
    strong = (z[angry & (intensity == INTENSITIES["extremely"])] @ u).mean()
    weak = (z[angry & (intensity == INTENSITIES["slightly"])] @ u).mean()
    assert strong - weak > 0.8


def test_one_to_many_sequences_are_different_realisations(corpus):
    split = load_split(corpus, "test")
    counts = Counter(split.texts)
    text = max(counts, key=counts.get)
    group = [s for t, s in zip(split.texts, split.sequences) if t == text]
    assert len(group) >= 2
    assert not np.array_equal(group[0][: min(len(g) for g in group)], group[1][: min(len(g) for g in group)])


def test_meta_and_stats_dir_override(tmp_path):
    stats = tmp_path / "stats"
    stats.mkdir()
    np.save(stats / "stage1_mean.npy", np.zeros(EXPR_DIM, np.float32))
    np.save(stats / "stage1_std.npy", np.full(EXPR_DIM, 0.5, np.float32))
    out = tmp_path / "data"
    summary = generate_emoava(out, n_train=300, n_dev=20, n_test=20, seed=1, stats_dir=stats)
    frames = _all_frames(out).astype(np.float64)
    assert np.abs(frames.mean(axis=0)).max() < 1e-3
    np.testing.assert_allclose(frames.std(axis=0), 0.5, rtol=1e-3)
    meta = read_meta(out)
    assert meta["source"] == "synthetic"
    assert meta["counts"] == {"train": 300, "dev": 20, "test": 20}
    assert meta["params"]["seed"] == 1 and meta["params"]["stats_source"] == "stats_dir:release-npy"
    assert str(tmp_path) not in (out / "meta.json").read_text()  # no machine paths
    assert summary["total"]["sequences"] == 340


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError):
        generate_emoava(tmp_path, n_train=-1)
    with pytest.raises(ValueError):
        generate_emoava(tmp_path, one_to_many_frac=1.5)
