"""The KeyframeFace paper's protocol as the sweeps run it (docs/fidelity.md, "KeyframeFace"): the paper's
settings in the shipped jobs and sweeps, plain decoding scored unclipped with the release's handling of
unreadable answers, the GT row against a disjoint sample of ground truth, Diversity on raw ARKit values,
the evaluator's trainable text encoder, the Express4D-MDM baseline's defaults, and Tables 2 and 5."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from facelab.data.arkit import CHANNELS, HIGH, INDEX, LOW, N_CHANNELS
from facelab.data.keyframeface import Keyframe, Script
from facelab.families.keyframe_lm.job import KeyframeJob
from facelab.families.keyframe_lm.parsing import release_mapping, release_object, score_answer
from facelab.families.keyframe_lm.prompts import PromptConfig
from facelab.spec.loading import load_job, load_sweep
from facelab.tasks.keyframes.metrics import diversity, evaluate_keyframes, evaluate_reference

REPO = Path(__file__).resolve().parents[1]
PAPER_MODELS = ["Qwen/Qwen3-4B-Instruct-2507", "Qwen/Qwen3-14B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"]
SEM = PromptConfig(format="semantic", annotation="original", glossary=False)
NON = PromptConfig(format="non_semantic", annotation="original")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops on a shared 2-core machine: intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _values(seed: int, scale: float = 0.6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.0, scale, N_CHANNELS) * (rng.random(N_CHANNELS) < 0.4)
    v[52:] = rng.uniform(-0.3, 0.3, N_CHANNELS - 52)
    return np.clip(v, LOW, HIGH).astype(np.float32)


def _script(i: int, n: int = 2, seed: int = 0) -> Script:
    kfs = tuple(
        Keyframe(
            k + 1, {"original": f"the brows lift {i} {k}", "arkit": f"BrowInnerUp {i} {k}"}, _values(seed + 10 * i + k)
        )
        for k in range(n)
    )
    return Script(f"s{i}", "actor", f"Background {i}.", "Nervous joy.", kfs)


class Embedder:
    """A stand-in evaluator: keyframes embed as their own values, each text as a fixed random vector."""

    def embed_texts(self, texts):
        return np.stack([np.random.default_rng(abs(hash(t)) % 2**32).normal(size=N_CHANNELS) for t in texts])

    def embed_motions(self, motions):
        return np.asarray(motions, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# the paper's settings in the shipped jobs and sweeps
# --------------------------------------------------------------------------------------------


def test_the_keyframe_job_trains_90_epochs_and_decodes_as_the_release():
    _, j = load_job(REPO / "jobs" / "keyframe.yaml")
    assert j["train"]["epochs"] == 90 and j["train"]["finetune"]
    assert j["model"]["base_model"] == PAPER_MODELS[0]
    assert (j["model"]["lora"], j["model"]["lora_r"], j["model"]["lora_alpha"]) == (True, 8, 32)
    e = j["eval"]
    assert (e["decode"], e["max_new_tokens"], e["parse"]) == ("plain", 1024, "release")  # infer.sh, jsonl2csv.py
    assert e["serve_decode"] == "constrained"  # the serving default stays the constrained decoder
    assert (e["gt_reference"], e["diversity_space"]) == ("val", "arkit")
    defaults = KeyframeJob().model_dump()  # the schema's defaults are the paper's too
    assert defaults["train"]["epochs"] == 90
    assert {k: defaults["eval"][k] for k in ("decode", "serve_decode", "parse", "gt_reference", "diversity_space")} == {
        "decode": "plain",
        "serve_decode": "constrained",
        "parse": "release",
        "gt_reference": "val",
        "diversity_space": "arkit",
    }
    _, tiny = load_job(REPO / "jobs" / "keyframe_tiny.yaml")
    assert tiny["train"]["epochs"] <= 3 and tiny["model"]["base_model"] == "models/tiny-qwen3"


def test_table3_sweep_has_the_papers_rows():
    loaded = load_sweep(REPO / "sweeps" / "keyframe_table3.yaml", root=REPO)
    assert [t.variant for t in loaded.trials] == [
        "GT",
        "Base",
        "LoRA-Tuned (non-semantic)",
        "LoRA-Tuned",
        "LoRA-Tuned (14B)",
        "LoRA-Tuned (constrained decoding)",
        "Express4D-MDM",
    ]
    from facelab.spec.loading import apply_overrides

    jobs = {
        t.variant: apply_overrides(loaded.job_for(t.variant), t.overrides(loaded.spec.variants)) for t in loaded.trials
    }
    assert {j["eval"]["evaluator"] for j in jobs.values()} == {"keyframe-evaluator@champion"}  # one evaluator
    lm = {v: j for v, j in jobs.items() if j["kind"] == "keyframe"}
    assert {v: j["model"]["base_model"] for v, j in lm.items() if v != "GT"} == {
        "Base": PAPER_MODELS[0],
        "LoRA-Tuned (non-semantic)": PAPER_MODELS[0],
        "LoRA-Tuned": PAPER_MODELS[0],
        "LoRA-Tuned (14B)": PAPER_MODELS[1],
        "LoRA-Tuned (constrained decoding)": PAPER_MODELS[0],
    }
    assert not lm["Base"]["train"]["finetune"] and lm["LoRA-Tuned"]["train"]["finetune"]
    assert lm["LoRA-Tuned (non-semantic)"]["prompt"]["format"] == "non_semantic"
    assert lm["GT"]["eval"]["baseline"] == "gt" and lm["GT"]["eval"]["gt_reference"] == "val"
    assert {v: j["eval"]["decode"] for v, j in lm.items()} == {
        **{v: "plain" for v in lm},
        "LoRA-Tuned (constrained decoding)": "constrained",
    }
    assert all(j["train"]["epochs"] == 90 for j in lm.values())
    mdm = jobs["Express4D-MDM"]
    assert (mdm["kind"], mdm["model"]["prediction"], mdm["model"]["unit"], mdm["eval"]["sampling_steps"]) == (
        "keyframe_mdm",
        "eps",
        "keyframe",
        1000,
    )


def test_lora_sweep_covers_tables_2_4_and_5_with_the_papers_base_models():
    loaded = load_sweep(REPO / "sweeps" / "keyframe_lora.yaml", root=REPO)
    grid = {
        (t.variant, t.params["data.annotation"], t.params["prompt.format"], t.params["model.base_model"])
        for t in loaded.trials
    }
    assert grid == {
        (v, a, f, m)
        for v in ("Base", "Tuned")
        for a in ("original", "arkit", "image")
        for f in ("semantic", "non_semantic")
        for m in PAPER_MODELS
    }
    assert all(v["eval.evaluator"] == "keyframe-evaluator@champion" for v in loaded.spec.variants.values())  # Table 4
    assert loaded.job_dict["train"]["epochs"] == 90 and loaded.job_dict["eval"]["decode"] == "plain"
    tiny = load_sweep(REPO / "sweeps" / "keyframe_lora_tiny.yaml", root=REPO)
    assert tiny.job_dict["model"]["base_model"] == "models/tiny-qwen3"  # the CPU grid keeps the tiny model
    assert "model.base_model" not in tiny.spec.parameters


def test_an_absent_paper_model_fails_naming_what_to_download(tmp_path, monkeypatch):
    from facelab.core.checkpoint import CheckpointError
    from facelab.families.keyframe_lm.servable import build_keyframe_lm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    job = KeyframeJob(model={"base_model": "Qwen/Qwen3-14B"}).model_dump()
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache.*`hf download Qwen/Qwen3-14B`"):
        build_keyframe_lm(job, tmp_path, "cpu")


# --------------------------------------------------------------------------------------------
# decoding and parsing: the release's reading, unclipped
# --------------------------------------------------------------------------------------------


def test_the_release_converter_rules():
    full = {name: 0.0 for name in CHANNELS}
    # the last balanced object; a bare mapping counts only with all 61 names
    assert release_mapping(release_object("Sure: " + json.dumps(full) + " done")) == full
    assert release_mapping(release_object('{"EyeBlinkLeft": 0.3}')) is None
    # otherwise the first Keyframe_* object (any case), partial or not
    assert release_mapping(release_object('{"KEYFRAME_two": {"JawOpen": 0.5}}')) == {"JawOpen": 0.5}
    # only the last "}" is looked at: a trailing brace pair that is not JSON hides an earlier answer
    assert release_object('{"Keyframe_one": {"JawOpen": 0.5}} (see {note})') is None
    for text in ("", "no json here", "{unbalanced", '{"Keyframe_one": 3}', None):
        assert release_mapping(release_object(text)) is None

    values, valid = score_answer('{"Keyframe_one": {"JawOpen": 1.5, "HeadYaw": -2, "EyeBlinkLeft": "x"}}', SEM)
    assert valid and values.dtype == np.float32 and values.shape == (N_CHANNELS,)
    assert values[INDEX["JawOpen"]] == 1.5 and values[INDEX["HeadYaw"]] == -2.0  # unclipped
    assert values[INDEX["EyeBlinkLeft"]] == 0.0 and np.count_nonzero(values) == 2  # a non-number / missing: 0
    assert score_answer("I cannot answer that.", SEM) == (None, False)  # dropped
    assert score_answer('{"EyeBlinkLeft": 0.3}', SEM) == (None, False)
    # the lenient reading keeps it (the zero keyframe elsewhere), also unclipped
    values, valid = score_answer('{"EyeBlinkLeft": 1.3}', SEM, "facelab")
    assert not valid and values[INDEX["EyeBlinkLeft"]] == pytest.approx(1.3)
    values, valid = score_answer("garbage", SEM, "facelab")
    assert not valid and not values.any()
    # non-semantic: a 61-number array, unclipped; another length is dropped
    values, valid = score_answer(json.dumps([1.5] + [0.0] * 60), NON)
    assert valid and values[0] == 1.5
    assert score_answer(json.dumps([0.0] * 60), NON) == (None, False)
    assert score_answer("[1e400" + ", 0" * 60 + "]", NON)[0][0] == 0.0  # not a finite number: 0


class ScriptedLM(torch.nn.Module):
    """Plain decoding's stand-in: ``generate`` writes a fixed answer for each request (the keyframe its
    Target Frame Instruction names), then the end-of-turn token."""

    def __init__(self, tokenizer, answers: dict[str, str], eos: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.tok, self.answers, self.eos = tokenizer, answers, eos

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()].tolist())
            word = next(w for w in self.answers if f"for Keyframe {w}." in prompt)
            rows.append(self.tok(self.answers[word], add_special_tokens=False)["input_ids"] + [self.eos])
        new = torch.full((len(rows), max(map(len, rows))), self.eos, dtype=torch.long)
        for b, r in enumerate(rows):
            new[b, : len(r)] = torch.tensor(r)
        return torch.cat([input_ids, new], dim=1)


ANSWERS = {
    "One": '{"Keyframe_one":{"EyeBlinkLeft":1.7,"JawOpen":0.5,"HeadYaw":-2.5}}',  # out of range, partial
    "Two": "I am sorry, I cannot write that keyframe.",  # unreadable
    "Three": '{"EyeBlinkLeft":0.3}',  # a bare partial mapping: the release refuses it
}


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from transformers import AutoTokenizer

    from facelab.families.keyframe_lm.data import end_of_turn_id
    from facelab.families.keyframe_lm.tiny import build_tiny_lm

    script = _script(0, n=3)
    out = tmp_path_factory.mktemp("tiny") / "lm"
    texts = [kf.descriptions["original"] for kf in script.keyframes] + list(ANSWERS.values())
    build_tiny_lm(out, texts, vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    tok = AutoTokenizer.from_pretrained(out)
    return script, tok, ScriptedLM(tok, ANSWERS, end_of_turn_id(tok))


def _lm_job(**eval_overrides) -> dict:
    return KeyframeJob(
        data={"annotation": "original"},
        prompt={"glossary": False},
        eval={"decode": "plain", "max_new_tokens": 64, "diversity_pairs": 10, **eval_overrides},
    ).model_dump(mode="json")


def test_plain_decoding_is_scored_unclipped_and_unreadable_answers_are_dropped(scripted):
    """The metrics see what the model wrote (1.7, -2.5), not the served answer's clipped values; the
    release's converter drops the two answers it cannot read (validity 1/3, one keyframe scored)."""
    from facelab.families.keyframe_lm.generate import generate_keyframes
    from facelab.families.keyframe_lm.loop import evaluate_split, prompt_config

    script, tok, model = scripted
    job = _lm_job()
    served = generate_keyframes(model, tok, [script], prompt_config(job), mode="plain", max_new_tokens=64)[0]
    assert served[0].values[INDEX["EyeBlinkLeft"]] == 1.0 and served[0].n_clipped == 2  # a server clips

    metrics, extras = evaluate_split(model, tok, [script], job, None, "cpu")
    pred = np.zeros(N_CHANNELS, np.float32)
    pred[[INDEX["EyeBlinkLeft"], INDEX["JawOpen"], INDEX["HeadYaw"]]] = [1.7, 0.5, -2.5]
    gt = script.keyframes[0].values
    assert metrics["test/n_scored"] == 1 and metrics["test/validity"] == pytest.approx(1 / 3)
    assert metrics["test/mse"] == pytest.approx(float(np.mean((pred - gt) ** 2)), rel=1e-6)
    assert metrics["test/mae"] == pytest.approx(float(np.mean(np.abs(pred - gt))), rel=1e-6)
    np.testing.assert_array_equal(extras["pred"], pred[None])
    clipped = np.clip(pred, LOW, HIGH)
    assert metrics["test/mse"] > float(np.mean((clipped - gt) ** 2)) + 0.01

    # facelab's lenient reading: nothing dropped, unreadable answers are zero keyframes -- still unclipped
    lenient, _ = evaluate_split(model, tok, [script], _lm_job(parse="facelab"), None, "cpu")
    assert lenient["test/n_scored"] == 3 and lenient["test/validity"] == 0.0  # every answer lacks channels
    assert float(np.max(extras["pred"])) == pytest.approx(1.7)


def test_nothing_readable_reports_validity_zero(scripted):
    from facelab.families.keyframe_lm.loop import evaluate_split

    script, tok, model = scripted
    mute = ScriptedLM(tok, {w: "no" for w in ("One", "Two", "Three")}, model.eos)
    metrics, extras = evaluate_split(mute, tok, [script], _lm_job(), None, "cpu")
    assert extras is None and metrics["test/validity"] == 0.0 and metrics["test/n_scored"] == 0
    assert "test/mse" not in metrics and all(np.isfinite(v) for v in metrics.values())


# --------------------------------------------------------------------------------------------
# the GT row and Diversity's space
# --------------------------------------------------------------------------------------------


def test_gt_row_compares_two_disjoint_samples_of_ground_truth():
    from facelab.families.keyframe_lm.loop import evaluate_gt_row, gt_reference_values

    test = [_script(i, n=2, seed=0) for i in range(12)]
    val = [_script(100 + i, n=2, seed=7) for i in range(12)]
    ev = Embedder()
    row = evaluate_gt_row(test, val, _lm_job(baseline="gt"), ev)
    assert row["test/fid"] > 0 and row["test/w_dist"] > 0  # two samples, not pred = gt (the paper: 0.0115, 0.0055)
    assert "test/mse" not in row and row["test/validity"] == 1.0
    assert row["test/n_scored"] == 24 and row["test/n_reference"] == 24
    gt = np.stack([kf.values for s in test for kf in s.keyframes])
    ref = np.stack([kf.values for s in val for kf in s.keyframes])
    direct = evaluate_reference(gt, ref, [f"t{i}" for i in range(24)], None, diversity_pairs=10)
    assert row["test/w_dist"] == pytest.approx(direct["w_dist"]) and row["test/diversity"] == pytest.approx(
        direct["diversity"]
    )

    a, scripts_a, b = gt_reference_values(test, val, _lm_job(baseline="gt", gt_reference="halves"))
    ids_a = {s.script_id for s in scripts_a}
    assert len(a) == len(b) == 12 and len(ids_a) == 6 and ids_a < {s.script_id for s in test}
    halves = evaluate_gt_row(test, val, _lm_job(baseline="gt", gt_reference="halves"), ev)
    assert halves["test/fid"] > 0 and halves["test/w_dist"] > 0

    itself = evaluate_gt_row(test, val, _lm_job(baseline="gt", gt_reference="self"), ev)  # the former protocol
    assert itself["test/fid"] == pytest.approx(0.0, abs=1e-6) and itself["test/w_dist"] == 0.0
    assert itself["test/mse"] == 0.0


def test_gt_row_of_the_worker_loop_uses_the_val_split(monkeypatch, tmp_path):
    import ray.train
    import ray.train.torch

    from facelab.data.synth_keyframe import generate_keyframeface
    from facelab.families.keyframe_lm import loop

    data = tmp_path / "kf"
    generate_keyframeface(data, n_scripts=80, seed=1)
    job = KeyframeJob(eval={"baseline": "gt", "diversity_pairs": 20}).model_dump(mode="json")
    reports = []

    class Ctx:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    monkeypatch.setattr(ray.train, "get_context", lambda: Ctx())
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: None)
    monkeypatch.setattr(ray.train, "report", lambda metrics, checkpoint=None: reports.append(dict(metrics)))
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cpu"))
    loop.worker_loop({"job": job, "data_dir": str(data), "root": str(tmp_path), "tracking": None})
    (m,) = reports
    from facelab.data.keyframeface import load_split

    n_val = sum(len(s.keyframes) for s in load_split(data, "val"))
    assert m["test/n_reference"] == n_val and m["test/w_dist"] > 0 and "test/mse" not in m


def test_diversity_defaults_to_raw_arkit_values_where_the_papers_295_is_possible():
    rng = np.random.default_rng(0)
    gt = rng.uniform(LOW, HIGH, size=(40, N_CHANNELS)).astype(np.float32)
    texts = [f"text {i}" for i in range(40)]

    class UnitEmbedder(Embedder):
        def embed_motions(self, motions):
            m = np.asarray(motions, dtype=np.float64)
            return m / np.linalg.norm(m, axis=1, keepdims=True)

    ev = UnitEmbedder()
    raw = evaluate_keyframes(gt, gt, texts, ev, n_valid=40, n_total=40, diversity_pairs=300)
    unit = evaluate_keyframes(
        gt, gt, texts, ev, n_valid=40, n_total=40, diversity_pairs=300, diversity_space="embedding"
    )
    assert raw["diversity"] == pytest.approx(diversity(gt, n_pairs=300)) and raw["diversity"] > 2.95
    assert unit["diversity"] <= 2.0  # unit vectors: never more than 2 apart
    assert raw["fid"] == unit["fid"]  # only Diversity's space changes
    without = evaluate_keyframes(gt, gt, texts, None, n_valid=40, n_total=40)
    assert without["diversity"] == raw["diversity"]  # in ARKit space it needs no evaluator
    ref = evaluate_reference(gt[:20], gt[20:], texts[:20], ev, diversity_space="embedding")
    assert ref["diversity"] <= 2.0


# --------------------------------------------------------------------------------------------
# the evaluator: a trainable text encoder by default
# --------------------------------------------------------------------------------------------


def test_the_evaluators_text_encoder_is_trainable_by_default():
    from facelab.families.keyframe_evaluator.model import (
        EvaluatorConfig,
        TextMotionEvaluator,
        evaluator_state,
        feature_stats,
        load_evaluator,
    )

    _, j = load_job(REPO / "jobs" / "keyframe_evaluator.yaml")
    assert j["model"]["finetune_encoder"] is True and j["train"]["epochs"] == 1000 and j["train"]["patience"] == 10
    assert EvaluatorConfig().finetune_encoder is True

    x = np.stack([_values(i) for i in range(6)])
    texts = [f"a face {i} with the brows raised" for i in range(6)]
    torch.manual_seed(0)
    model = TextMotionEvaluator(EvaluatorConfig(embed_dim=16, hidden=32), *feature_stats(x)).train()
    trainable = {n: p for n, p in model.text_encoder.named_parameters() if p.requires_grad}
    frozen_names = {n for n, _ in model.text_encoder.named_parameters()} - set(trainable)
    assert model.text_encoder.training and all(n.startswith("pooler.") for n in frozen_names)  # the unused pooler
    assert any(n.startswith("embeddings.") for n in trainable) and any(n.startswith("encoder.") for n in trainable)
    assert model.cache_texts(texts) == 0  # nothing cached: its features change with training
    model(texts, torch.as_tensor(x)).backward()
    grads = [p.grad for p in trainable.values()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)  # none unused (DDP)

    state = evaluator_state(model)  # the trained encoder travels with the checkpoint
    assert any(k.startswith("text_encoder.") for k in state)
    with torch.no_grad():
        for p in model.text_encoder.parameters():
            p.add_(0.01)
    state = evaluator_state(model)
    loaded = load_evaluator(state, json.loads(json.dumps(model.cfg.model_dump())))
    np.testing.assert_allclose(loaded.embed_texts(texts), model.embed_texts(texts), atol=1e-6)

    frozen = TextMotionEvaluator(EvaluatorConfig(embed_dim=16, hidden=32, finetune_encoder=False), *feature_stats(x))
    assert (
        not any(p.requires_grad for p in frozen.text_encoder.parameters()) and not frozen.train().text_encoder.training
    )
    legacy = {k: v for k, v in frozen.cfg.model_dump().items() if k != "finetune_encoder"}  # saved before the key
    assert not load_evaluator(evaluator_state(frozen), legacy).cfg.finetune_encoder


# --------------------------------------------------------------------------------------------
# Express4D-MDM: eps, one prompt per keyframe, 1000 steps
# --------------------------------------------------------------------------------------------


def test_mdm_defaults_are_the_papers_baseline():
    from facelab.families.keyframe_mdm.job import KeyframeMDMJob

    for d in (KeyframeMDMJob().model_dump(), load_job(REPO / "jobs" / "keyframe_mdm.yaml")[1]):
        assert (d["model"]["prediction"], d["model"]["unit"], d["eval"]["sampling_steps"]) == ("eps", "keyframe", 1000)
        assert d["model"]["diffusion_steps"] == 1000 and d["eval"]["diversity_space"] == "arkit"
    _, tiny = load_job(REPO / "jobs" / "keyframe_mdm_tiny.yaml")
    assert (tiny["model"]["prediction"], tiny["model"]["unit"]) == ("eps", "keyframe")
    assert tiny["eval"]["sampling_steps"] < 1000  # CPU speed, and the file says so
    line = next(x for x in (REPO / "jobs" / "keyframe_mdm_tiny.yaml").read_text().splitlines() if "sampling_steps" in x)
    assert "1000" in line and "CPU" in line


def test_mdm_trains_and_samples_one_keyframe_at_a_time():
    from facelab.core.text_encoder import load_text_encoder
    from facelab.families.keyframe_mdm.job import KeyframeMDMJob
    from facelab.families.keyframe_mdm.loop import feature_stats_of
    from facelab.families.keyframe_mdm.model import build_keyframe_mdm, keyframe_units, mdm_config

    job = KeyframeMDMJob(
        data={"annotation": "arkit"},
        model={"d_model": 32, "n_heads": 2, "n_layers": 1, "ff_dim": 64, "diffusion_steps": 50},
    ).model_dump(mode="json")
    scripts = [_script(i, n=1 + i % 3) for i in range(6)]
    torch.manual_seed(0)
    model = build_keyframe_mdm(job, *feature_stats_of(scripts), text_encoder=load_text_encoder("minilm")).eval()
    assert model.cfg.prediction == "eps" and model.cfg.unit == "keyframe"
    legacy = {k: v for k, v in job["model"].items() if k != "unit"}  # a checkpoint saved before the key
    assert mdm_config({"model": legacy}).unit == "script"
    units = keyframe_units(scripts)
    assert len(units) == sum(len(s.keyframes) for s in scripts) and all(len(u.keyframes) == 1 for u in units)
    np.testing.assert_array_equal(np.stack([u.values[0] for u in units]), np.concatenate([s.values for s in scripts]))
    with torch.no_grad():
        per = model.losses(scripts, "arkit", generator=torch.Generator().manual_seed(0))["per_script"]
    assert per.shape == (len(units),)  # one example per keyframe

    script = scripts[2]  # three keyframes
    joint = model.sample([script], "arkit", 5, 2.5, torch.Generator().manual_seed(3))[0]
    alone = model.sample(keyframe_units([script]), "arkit", 5, 2.5, torch.Generator().manual_seed(3))
    assert joint.shape == (3, N_CHANNELS)
    np.testing.assert_allclose(joint, np.concatenate(alone), atol=1e-6)
    # a keyframe's sample does not depend on its neighbours' prompts
    other = Script(
        script.script_id,
        script.actor,
        script.background,
        script.emotion,
        (script.keyframes[0], Keyframe(2, {"original": "x", "arkit": "jaw wide open"}, script.keyframes[1].values))
        + script.keyframes[2:],
    )
    changed = model.sample([other], "arkit", 5, 2.5, torch.Generator().manual_seed(3))[0]
    np.testing.assert_allclose(changed[[0, 2]], joint[[0, 2]], atol=1e-6)
    assert not np.allclose(changed[1], joint[1])
    assert np.all(joint >= LOW) and np.all(joint <= HIGH)


# --------------------------------------------------------------------------------------------
# report: Table 2's training loss and Table 5
# --------------------------------------------------------------------------------------------


def test_tables_2_and_5_report_the_training_and_eval_loss():
    from facelab.core.tracking import TrialRun
    from facelab.report import keyframe_tables

    def trial(i, variant, finetune, annotation, fmt, base, metrics):
        params = {
            "train.finetune": str(finetune),
            "data.annotation": annotation,
            "prompt.format": fmt,
            "model.base_model": base,
            "eval.baseline": "None",
        }
        return TrialRun(f"r{i}", variant, 0, "FINISHED", metrics, params, {}, f"t{i}")

    trials = []
    for i, (ann, fmt, base) in enumerate(
        [(a, f, b) for a in ("original", "arkit") for f in ("semantic", "non_semantic") for b in PAPER_MODELS[:2]]
    ):
        loss = 0.1 + i / 100
        trials.append(
            trial(2 * i, "Tuned", True, ann, fmt, base, {"test/mse": 0.01, "train/loss": loss, "val/loss": loss + 0.05})
        )
        trials.append(trial(2 * i + 1, "Base", False, ann, fmt, base, {"test/mse": 0.1, "val/loss": 2.0}))
    out = keyframe_tables(trials)
    t2 = out[out.index("Table 2") : out.index("Table 3")]
    assert "Tuned Train loss ↓" in t2 and "Base Train loss" not in t2
    t5 = out[out.index("Table 5") :]
    assert "| Base model | Annotation | Format | Train loss ↓ | Eval loss ↓ |" in t5
    assert "| Qwen/Qwen3-14B | ARKit-based | Non-semantic | 0.170 | 0.220 |" in t5
    assert t5.count("| Qwen/") == 8  # base model x annotation x format, tuned rows only
    csv_out = keyframe_tables(trials, "csv")
    assert "Tuned Train loss" in csv_out and "# Table 5" in csv_out
