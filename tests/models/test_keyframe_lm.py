"""KeyframeFace LM: prompts (release layout), answer parsing, training examples, LoRA size, tiny model."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from facelab.data.arkit import CHANNELS, HIGH, LOW
from facelab.data.keyframeface import Keyframe, Script
from facelab.families.keyframe_lm.data import IGNORE_INDEX, collate, encode_example, end_of_turn_id, prompt_ids
from facelab.families.keyframe_lm.lora import LoraSettings, apply_lora, count_trainable, lora_param_count
from facelab.families.keyframe_lm.parsing import extract_json, parse_answer
from facelab.families.keyframe_lm.prompts import (
    GLOSSARY,
    GLOSSARY_ENTRIES,
    SYSTEM_PROMPT,
    PromptConfig,
    PromptError,
    answer_skeleton,
    answer_text,
    build_messages,
    examples_for_script,
    format_value,
    requests_for_script,
)
from facelab.families.keyframe_lm.tiny import LABEL, build_tiny_lm

REPO = Path(__file__).resolve().parents[2]
SHARED_KF = REPO.parent / "shared" / "data" / "keyframeface"
SEM = PromptConfig(format="semantic", annotation="original", glossary=False)
NON = PromptConfig(format="non_semantic", annotation="original")


def _jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _release() -> tuple[list, list, np.ndarray]:
    if not (SHARED_KF / "example.jsonl").is_file():
        pytest.skip(f"reference data not present: {SHARED_KF}")
    with open(SHARED_KF / "example_result.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0][2:] == list(CHANNELS)
    values = np.array([[float(x) for x in r[2:]] for r in rows[1:]], dtype=np.float32)  # (2, 61)
    return _jsonl(SHARED_KF / "example.jsonl"), _jsonl(SHARED_KF / "example_result.jsonl"), values


def _release_script(requests: list, values: np.ndarray) -> Script:
    """The release's script, read from its first request's user message by this test (not by the
    code under test)."""
    user = requests[0]["messages"][1]["content"]
    descriptions = re.findall(r"^- Keyframe \w+: (.*)$", user, re.M)
    background = re.search(r"^Background: (.*)$", user, re.M).group(1)
    emotion = re.search(r"^Emotion: (.*)$", user, re.M).group(1)
    return Script(
        "release-example",
        "unknown",
        background,
        emotion,
        tuple(Keyframe(i + 1, {"original": d}, values[i]) for i, d in enumerate(descriptions)),
    )


def _script(n: int = 3, seed: int = 0) -> Script:
    rng = np.random.default_rng(seed)
    kfs = []
    for i in range(n):
        v = np.round(rng.uniform(LOW, HIGH), 2) * (rng.random(61) < 0.4)
        kfs.append(
            Keyframe(
                i + 1,
                {"original": f"plain words {i}", "arkit": f"JawOpen high {i}", "image": f"mouth open {i}"},
                v.astype(np.float32),
            )
        )
    return Script(f"s{seed}", "actor", "A quiet room.", "Calm relief.", tuple(kfs))


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_release_messages_and_answers_byte_for_byte():
    requests, results, values = _release()
    script = _release_script(requests, values)
    assert len(script.keyframes) == 2 == len(requests)
    for k in (1, 2):
        assert build_messages(script, k, SEM) == requests[k - 1]["messages"]
        assert answer_text(values[k - 1], k, SEM) == results[k - 1]["response"]
    assert requests_for_script(script, SEM) == [r["messages"] for r in requests]  # Algorithm 1
    assert SYSTEM_PROMPT == requests[0]["messages"][0]["content"]


def test_parse_release_results_gives_the_csv_rows():
    _requests, results, values = _release()
    for k, record in enumerate(results, start=1):
        r = parse_answer(record["response"], SEM)
        assert r.valid and r.error is None and (r.n_missing, r.n_unknown, r.n_clipped) == (0, 0, 0)
        assert r.keyframe == k
        assert r.values.dtype == np.float32 and np.array_equal(r.values, values[k - 1])


def test_user_message_layout_and_target_frame_instruction_ablation():
    s = _script(3)
    cfg = PromptConfig(format="semantic", annotation="arkit", glossary=False)
    user = build_messages(s, 3, cfg)[1]["content"]
    assert user == (
        "Keyframe Description Sequence:\n- Keyframe One: JawOpen high 0\n- Keyframe Two: JawOpen high 1\n"
        "- Keyframe Three: JawOpen high 2\n\nBackground: A quiet room.\nEmotion: Calm relief.\n\n"
        "Task Instruction: Generate the facial expression parameters for Keyframe Three."
    )
    off = PromptConfig(format="semantic", annotation="arkit", glossary=False, target_frame_instruction=False)
    requests = requests_for_script(s, off)
    assert requests[0] == requests[1] == requests[2]  # nothing tells the keyframes apart any more
    assert requests[0][1]["content"] == user.split("\n\nTask Instruction")[0]
    # the answer still names its keyframe
    assert answer_text(s.keyframes[1].values, 2, off).startswith('{"Keyframe_two":{"EyeBlinkLeft":')


def test_semantic_vs_non_semantic_and_glossary():
    s = _script(2)
    glossed = build_messages(s, 1, PromptConfig(format="semantic", annotation="image", glossary=True))
    assert glossed[0] == {"role": "system", "content": SYSTEM_PROMPT + "\n\n" + GLOSSARY}
    lines = GLOSSARY.splitlines()[1:]
    assert [line.split(":")[0] for line in lines] == list(CHANNELS) == [n for n, _ in GLOSSARY_ENTRIES]
    non = build_messages(s, 1, PromptConfig(format="non_semantic", annotation="image", glossary=True))
    assert [m["role"] for m in non] == ["user"] and non[0] == glossed[1]  # same user message, no names
    assert not any(name in non[0]["content"] for name in CHANNELS)
    v = np.zeros(61, dtype=np.float32)
    v[0], v[52], v[60] = 0.25, -0.1, 1.0
    text = answer_text(v, 2, NON)
    assert text == "[0.25, " + "0.0, " * 51 + "-0.1, " + "0.0, " * 7 + "1.0]"
    assert len(json.loads(text)) == 61
    r = parse_answer(text, NON)
    assert r.valid and np.array_equal(r.values, v)
    sem = answer_text(v, 2, SEM)
    assert json.loads(sem) == {"Keyframe_two": dict(zip(CHANNELS, [0.25] + [0.0] * 51 + [-0.1] + [0.0] * 7 + [1.0]))}
    assert sem == json.dumps(json.loads(sem), separators=(",", ":"))  # compact, release order


@pytest.mark.parametrize(
    "value, text",
    [
        (0.2, "0.2"),
        (np.float32(0.2), "0.2"),
        (0.25, "0.25"),
        (-0.0, "0.0"),
        (-0.004, "0.0"),
        (1, "1.0"),
        (0.999, "1.0"),
        (-0.15, "-0.15"),
        (0.1 + 0.2, "0.3"),
    ],
)
def test_format_value(value, text):
    assert format_value(value) == text


def test_answer_is_skeleton_interleaved_with_values():
    s = _script(1)
    for cfg in (SEM, NON):
        pieces = answer_skeleton(1, cfg)
        assert len(pieces) == 62
        expected = "".join(p + format_value(v) for p, v in zip(pieces, s.keyframes[0].values)) + pieces[-1]
        assert answer_text(s.keyframes[0].values, 1, cfg) == expected
    assert [m for m, _ in examples_for_script(s, SEM)] == requests_for_script(s, SEM)


def test_prompt_errors():
    with pytest.raises(PromptError) as exc:
        PromptConfig(format="vector", annotation="video", glossary="yes")
    assert "format" in str(exc.value) and "annotation" in str(exc.value) and "glossary" in str(exc.value)
    s = _script(2)
    with pytest.raises(PromptError, match="keyframe 3 is not in 1..2"):
        build_messages(s, 3, SEM)
    only_original = Script("x", "a", "b", "e", (Keyframe(1, {"original": "t"}, np.zeros(61, np.float32)),))
    with pytest.raises(PromptError, match="'arkit'"):
        build_messages(only_original, 1, PromptConfig(annotation="arkit"))
    with pytest.raises(PromptError, match="non-finite"):
        answer_text(np.full(61, np.nan), 1, SEM)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


def _check(r, valid: bool | None = None):
    assert r.values.shape == (61,) and r.values.dtype == np.float32
    assert np.all(np.isfinite(r.values)) and np.all(r.values >= LOW) and np.all(r.values <= HIGH)
    assert 0 <= r.n_missing <= 61 and r.n_unknown >= 0 and r.n_clipped >= 0
    assert (r.error is None) == r.valid
    if valid is not None:
        assert r.valid is valid


GARBAGE = [
    "",
    "garbage",
    "{",
    "}",
    "[",
    "]",
    "{}",
    "[]",
    "null",
    "0.5",
    '"x"',
    "{{{{}}}}",
    "[[[]]]",
    "{]",
    "[}",
    '{"Keyframe_one": {',
    '{"Keyframe_one": 5}',
    '{"Keyframe_one": [1, 2]}',
    '{"EyeBlinkLeft": "0.2"}',
    '{"EyeBlinkLeft": true}',
    '{"EyeBlinkLeft": null}',
    '{"EyeBlinkLeft": NaN}',
    '{"EyeBlinkLeft": Infinity}',
    '{"EyeBlinkLeft": -Infinity}',
    '{"EyeBlinkLeft": 1e400}',
    '{"EyeBlinkLeft": ' + "9" * 5000 + "}",
    '{"EyeBlinkLeft": [0.1]}',
    '{"EyeBlinkLeft": {"a": 1}}',
    "[" + "1e999, " * 61 + "1]",
    "\x00\ud800\uffff",
    '{"Keyframe_one": {"EyeBlinkLeft": 0.1}',
    '{"a": "}"}',
    "[" * 100_000,
    "{" * 100_000,
    "]" * 1000 + "[" * 1000,
]


@pytest.mark.parametrize("fmt", ["semantic", "non_semantic"])
def test_parse_answer_never_raises(fmt):
    cfg = PromptConfig(format=fmt, annotation="original")
    t0 = time.perf_counter()
    for text in GARBAGE + [None, 5, b"{}", ["x"], {"EyeBlinkLeft": 0.1}]:
        _check(parse_answer(text, cfg), valid=False)
    good = answer_text(_script(1).keyframes[0].values, 1, cfg)
    complete = len(good) - 1 if fmt == "semantic" else len(good)  # without the last "}" the inner mapping is whole
    for cut in range(complete):  # every truncation of a valid answer
        _check(parse_answer(good[:cut], cfg), valid=False)
    _check(parse_answer(good, cfg), valid=True)
    _check(parse_answer(good[:complete], cfg), valid=True)
    rng = random.Random(0)
    alphabet = '{}[]":,.-0123456789eE KeyframeNaInfitylu_' + "".join(CHANNELS[:3])
    for _ in range(300):  # seeded fuzz over JSON-ish characters and pieces of a valid answer
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        cut = rng.randint(0, len(good))
        _check(parse_answer(s + good[cut:] if rng.random() < 0.5 else good[:cut] + s, cfg))
    assert time.perf_counter() - t0 < 20


def test_parse_answer_counts_and_values():
    names = {c: 0.0 for c in CHANNELS}
    r = parse_answer(json.dumps({**names, "EyeBlinkLeft": 1.5, "HeadYaw": -3, "Smile": 0.3}), SEM)  # bare mapping
    _check(r, valid=True)
    assert (r.n_missing, r.n_unknown, r.n_clipped, r.keyframe) == (0, 1, 2, None)
    assert r.values[0] == 1.0 and r.values[CHANNELS.index("HeadYaw")] == -1.0
    partial = {c: 0.5 for c in CHANNELS[:59]}
    partial["JawOpen"] = "wide"
    r = parse_answer("Sure! " + json.dumps({"Keyframe_Three": partial}) + " Hope this helps {", SEM)
    _check(r, valid=False)
    assert (r.n_missing, r.keyframe) == (3, 3)  # RightEyePitch, RightEyeRoll absent, JawOpen not a number
    assert r.values[CHANNELS.index("JawOpen")] == 0.0 and r.values[0] == 0.5 and r.values[60] == 0.0
    assert "first: JawOpen" in r.error
    nan = parse_answer(json.dumps({"Keyframe_one": {**names, "MouthClose": float("nan")}}), SEM)
    _check(nan, valid=False)
    assert nan.n_missing == 1


def test_non_semantic_lengths():
    v = [0.1] * 61
    assert parse_answer(json.dumps(v), NON).valid
    short, long = parse_answer(json.dumps(v[:60]), NON), parse_answer(json.dumps(v + [0.2]), NON)
    _check(short, valid=False)
    _check(long, valid=False)
    assert (short.n_missing, short.n_unknown, long.n_missing, long.n_unknown) == (1, 0, 0, 1)
    assert short.values[60] == 0.0 and long.values[60] == np.float32(0.1)
    mixed = parse_answer("[" + ", ".join(["0.5"] * 60 + ['"x"']) + "]", NON)
    assert not mixed.valid and mixed.n_missing == 1 and mixed.values[0] == 0.5
    assert not parse_answer(json.dumps({"EyeBlinkLeft": 0.1}), NON).valid  # an object is not a vector


def test_extract_json():
    assert extract_json('a {"x": 1} b {"y": [1, 2]} c') == {"y": [1.0, 2.0]}
    assert extract_json('note {"s": "}{"} then {"z": "{"}') == {"z": "{"}  # braces inside strings
    assert extract_json('{"outer": {"inner": 1}}') == {"outer": {"inner": 1.0}}  # outermost, not the inner
    assert extract_json('{"a": 1} [1, 2]') == [1.0, 2.0]
    assert extract_json('{"a": 1} [1, 2]', kind=dict) == {"a": 1.0}
    assert extract_json('[3] {"a": [1]} tail', kind=list) == [1.0]  # only arrays are tried, also inside objects
    assert extract_json('[{"Keyframe_one": {"JawOpen": 1}}]', kind=dict) == {"Keyframe_one": {"JawOpen": 1.0}}
    assert extract_json('{"a": 1} {"b": ') == {"a": 1.0}
    assert extract_json("no json") is None and extract_json(None) is None
    big = extract_json('{"n": 123456789012345678901234567890}')
    assert isinstance(big["n"], float)


# --------------------------------------------------------------------------------------------
# Training examples
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    texts = [
        m["content"]
        for s in (_script(3, 0), _script(2, 1))
        for cfg in (SEM, NON)
        for msgs, answer in examples_for_script(s, cfg)
        for m in msgs + [{"content": answer}]
    ]
    out = tmp_path_factory.mktemp("tiny") / "tiny-qwen3"
    build_tiny_lm(out, texts, vocab_size=1024, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_encode_example_labels_only_the_answer(tokenizer):
    s = _script(2)
    messages, answer = examples_for_script(s, SEM)[1]
    ids, labels = encode_example(tokenizer, messages, answer)
    text = (
        "<|im_start|>system\n"
        + SYSTEM_PROMPT
        + "<|im_end|>\n<|im_start|>user\n"
        + messages[1]["content"]
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, messages) == prompt
    n = len(prompt)
    assert ids[:n] == prompt and labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]
    assert tokenizer.decode(ids[n:-1]) == answer
    assert ids[-1] == end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_collate_pads_right():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    with pytest.raises(ValueError, match="example 0"):
        collate([([1, 2], [1])], pad_id=0)


# --------------------------------------------------------------------------------------------
# LoRA (§5.2)
# --------------------------------------------------------------------------------------------


def test_lora_size_for_qwen3_4b_is_the_papers_16_5m():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=2560,
        intermediate_size=9728,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = apply_lora(Qwen3ForCausalLM(config), LoraSettings())
    # per layer r * (in + out): q 2560+4096, k 2560+1024, v 2560+1024, o 4096+2560, gate/up 2560+9728, down 9728+2560
    per_layer = 8 * ((2560 + 4096) * 2 + (2560 + 1024) * 2 + (2560 + 9728) * 3)
    assert per_layer * 36 == 16_515_072 == lora_param_count(config, LoraSettings())
    assert count_trainable(model) == 16_515_072  # "16.5M trainable parameters"
    assert count_trainable(model) < 0.005 * sum(p.numel() for p in model.parameters())


def test_fresh_adapter_is_the_identity_and_scales_alpha_over_r(tiny_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = torch.arange(3, 40).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    model = apply_lora(base, LoraSettings()).eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.equal(out, ref)  # B is zero-initialised
    trainable = [n.split(".") for n, p in model.named_parameters() if p.requires_grad]
    assert {parts[-3] for parts in trainable} == {"lora_A", "lora_B"}
    assert {parts[-4] for parts in trainable} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 32 / 8 and layer.r["default"] == 8
    cfg = base.config
    assert count_trainable(model) == lora_param_count(cfg, LoraSettings())
    with pytest.raises(ValueError, match="r must be"):
        LoraSettings(r=0)


def test_merged_adapter_gives_the_adapted_models_logits(tiny_dir):
    """Serving folds the adapter into the weights (merge_for_inference): same logits as the peft model
    with a non-zero adapter, and no LoRA module left."""
    from transformers import AutoModelForCausalLM

    from facelab.families.keyframe_lm.lora import merge_for_inference

    torch.manual_seed(0)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraSettings()).eval()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.arange(3, 40).unsqueeze(0)  # (1, T)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        base = model.get_base_model()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        assert (adapted - plain).abs().max() > 1e-3  # the adapter matters
        merged = merge_for_inference(model)
        assert not any("lora" in n for n, _ in merged.named_modules())
        assert merged is base or type(merged) is type(base)
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted, rtol=1e-4, atol=1e-5)
    assert merge_for_inference(merged) is merged  # a plain model is left alone


def test_unpadded_train_step_equals_the_padded_batch_loss(tiny_dir, tokenizer):
    """train.keyframe.train_step (one example at a time, LM head at the answer positions only) takes
    the same loss and gradients as ``model(padded batch, labels=...)``."""
    from transformers import AutoModelForCausalLM

    from facelab.families.keyframe_lm.loop import train_step

    examples = [
        encode_example(tokenizer, m, a) for s in (_script(3), _script(2, 1)) for m, a in examples_for_script(s, SEM)
    ]
    assert len({len(ids) for ids, _ in examples}) > 1  # the padded batch really has padding
    grads, losses = [], []
    for mode in ("padded", "step"):
        torch.manual_seed(0)
        model = apply_lora(AutoModelForCausalLM.from_pretrained(tiny_dir), LoraSettings(dropout=0.0))
        for n, p in model.named_parameters():  # a non-zero adapter, so that every LoRA weight gets a gradient
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.0)
        if mode == "padded":
            batch = collate(examples, tokenizer.pad_token_id)
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
        else:
            loss = train_step(model, examples, opt, None, params, 0.0, "cpu")
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in params]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# The tiny model
# --------------------------------------------------------------------------------------------


def _hashes(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def test_tiny_lm_is_byte_stable_and_loads(tmp_path, tiny_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    texts = ["The inner brows lift slightly.", "Emotion: Joy", '{"Keyframe_one":{"JawOpen":0.5}}'] * 3
    kw = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, seed=3)
    a = build_tiny_lm(tmp_path / "a", texts, **kw)
    code = (
        "import sys, json; from facelab.families.keyframe_lm.tiny import build_tiny_lm; "
        f"print(json.dumps(build_tiny_lm(sys.argv[1], {texts!r}, **{kw!r})['files']))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "b")],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO / "platform"), "PYTHONHASHSEED": "123", "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        json.loads(proc.stdout.strip().splitlines()[-1])
        == a["files"]
        == _hashes(tmp_path / "a")
        == _hashes(tmp_path / "b")
    )
    assert set(a["files"]) >= {"config.json", "model.safetensors", "tokenizer.json", "README.md"}
    c = build_tiny_lm(tmp_path / "c", texts, **{**kw, "seed": 4})
    assert c["files"]["model.safetensors"] != a["files"]["model.safetensors"]
    assert c["files"]["tokenizer.json"] == a["files"]["tokenizer.json"]
    for p in (tmp_path / "a").iterdir():
        assert str(tmp_path) not in p.read_text(encoding="utf-8", errors="ignore")  # no machine paths
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    assert model.config.facelab_label == LABEL and model.config.model_type == "qwen3"
    assert "not a pretrained LM" in (tmp_path / "a" / "README.md").read_text()
    assert model.config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_tokenizer_numbers_and_piecewise_tokenisation(tokenizer):
    """Every answer number is at most two tokens, and an answer's tokens are its skeleton pieces'
    tokens and its values' tokens concatenated (what constrained == plain decoding relies on)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    numbers = [format_value(i / 100) for i in range(-100, 101)]
    assert max(len(enc(n)) for n in numbers) <= 2
    assert sum(len(enc(n)) == 1 for n in numbers) >= 150
    rng = np.random.default_rng(1)
    for cfg in (SEM, NON):
        for k in (1, 2):
            v = np.round(rng.uniform(LOW, HIGH), 2)
            pieces = answer_skeleton(k, cfg)
            whole = enc(answer_text(v, k, cfg))
            parts = [t for p, x in zip(pieces, v) for t in enc(p) + enc(format_value(x))] + enc(pieces[-1])
            assert whole == parts
    head, word = '{"Keyframe_', "two"  # the opening also splits around the key word (no-TFI decoding)
    opening = answer_skeleton(2, SEM)[0]
    assert enc(opening) == enc(head) + enc(word) + enc(opening[len(head) + len(word) :])


def test_tiny_lm_rejects_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny_lm(tmp_path / "x", [], num_heads=3, num_kv_heads=2)
    assert not (tmp_path / "x").exists()
