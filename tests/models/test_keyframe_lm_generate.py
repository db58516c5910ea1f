"""KeyframeFace LM generation: the constrained fast path equals plain greedy decoding, always parses,
and batching does not change it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from facelab.data.arkit import HIGH, LOW
from facelab.data.keyframeface import Keyframe, Script
from facelab.families.keyframe_lm.data import end_of_turn_id, prompt_ids
from facelab.families.keyframe_lm.generate import GenerationError, generate_keyframes, number_strings
from facelab.families.keyframe_lm.parsing import parse_answer
from facelab.families.keyframe_lm.prompts import (
    PromptConfig,
    answer_skeleton,
    answer_text,
    build_messages,
    examples_for_script,
    format_value,
)
from facelab.families.keyframe_lm.tiny import build_tiny_lm

SEM = PromptConfig(format="semantic", annotation="original", glossary=False)
NON = PromptConfig(format="non_semantic", annotation="original")
SEM_NO_TFI = PromptConfig(format="semantic", annotation="original", glossary=False, target_frame_instruction=False)
CONFIGS = {"semantic": SEM, "non_semantic": NON, "semantic_no_tfi": SEM_NO_TFI}


def _script(n: int, seed: int, words: int = 3) -> Script:
    rng = np.random.default_rng(seed)
    kfs = []
    for i in range(n):
        v = np.round(rng.uniform(LOW, HIGH), 2) * (rng.random(61) < 0.4)
        text = " ".join(["the brows lift"] * (words + i))
        kfs.append(Keyframe(i + 1, {"original": f"{text} {seed}"}, v.astype(np.float32)))
    return Script(f"s{seed}", "actor", f"Background {seed}.", "Nervous joy.", tuple(kfs))


SCRIPTS = [_script(2, 0), _script(1, 1, words=9), _script(3, 2, words=1)]  # different prompt lengths


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = [
        m["content"]
        for s in SCRIPTS
        for cfg in (SEM, NON)
        for msgs, a in examples_for_script(s, cfg)
        for m in msgs + [{"content": a}]
    ]
    out = tmp_path_factory.mktemp("tiny") / "lm"
    build_tiny_lm(out, texts, vocab_size=1024, hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1)
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def test_number_grammar():
    blend, pose = number_strings(0.0, 1.0), number_strings(-1.0, 1.0)
    assert len(blend) == 1 + 10 + 100 + 3  # "0", "0.d", "0.dd", and "1", "1.0", "1.00"
    assert {"0", "0.25", "0.5", "1", "1.0", "1.00"} <= blend and not {"1.5", "-0.1", "1.01", "0.255"} & blend
    assert len(pose) == 2 * len(blend) and {"-1.0", "-0.99", "-0.05"} <= pose and "-1.01" not in pose
    assert all(LOW[-1] <= float(s) <= HIGH[-1] for s in pose)


# --------------------------------------------------------------------------------------------
# A deterministic stand-in LM: its greedy continuation of any prefix of a target is the target
# --------------------------------------------------------------------------------------------


class OracleLM(torch.nn.Module):
    """Logits from a lookup table instead of a network. After a history (the tokens the attention mask
    keeps, in order) that is a prefix of one of ``targets``, the next target token scores 10; every
    other token scores a fixed pseudo-random value in [0, 1) -- so the greedy continuation of a
    target's prompt is exactly the target. The ``past_key_values`` it returns are the fed ids, and
    it checks every call: position ids must count the kept tokens, i.e. the cache bookkeeping of the
    decoder (padding, rejected speculation) must hand it the same history a plain decoder would."""

    def __init__(self, vocab_size: int, targets: list[list[int]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.vocab_size, self.targets = vocab_size, [list(t) for t in targets]
        self.noise = torch.rand(vocab_size, generator=torch.Generator().manual_seed(0))
        self.calls, self.off_target = 0, 0

    def next_logits(self, history: list[int]) -> torch.Tensor:
        logits = self.noise.roll(len(history) % self.vocab_size).clone()  # (V,)
        for t in self.targets:
            if len(history) < len(t) and t[: len(history)] == history:
                logits[t[len(history)]] = 10.0
                return logits
        self.off_target += 1
        return logits

    def forward(
        self, input_ids, attention_mask, position_ids=None, past_key_values=None, use_cache=True, logits_to_keep=0, **kw
    ):
        self.calls += 1
        past = past_key_values if past_key_values is not None else input_ids[:, :0]
        ids = torch.cat([past, input_ids], dim=1)  # (B, T)
        B, L = input_ids.shape
        start = past.shape[1]
        logits = torch.zeros(B, L, self.vocab_size)
        for b in range(B):
            for i in range(L):
                if not attention_mask[b, start + i]:
                    continue
                keep = attention_mask[b, : start + i + 1].bool()
                history = ids[b, : start + i + 1][keep].tolist()
                assert position_ids[b, i] == len(history) - 1, "position ids do not count the kept tokens"
                logits[b, i] = self.next_logits(history)
        # The LM head only at the kept positions, as transformers' causal LMs do: an int keeps the last
        # ``logits_to_keep`` positions (0 = all), a tensor lists them.
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep.cpu()
        return SimpleNamespace(logits=logits[:, keep], past_key_values=ids)


def plain_greedy(model: OracleLM, prompt: list[int], eos: int, limit: int = 2000) -> list[int]:
    """Greedy decoding by full recomputation (no cache): the reference."""
    out = []
    while len(out) < limit:
        t = int(torch.argmax(model.next_logits(prompt + out)))
        if t == eos:
            break
        out.append(t)
    return out


def _split_numbers(tokenizer, pieces, values, split: set[int]) -> list[int]:
    """Answer tokens: canonical, except values with index in ``split`` are written as two tokens
    "0.2" + "5" -- a complete number the model then extends (the decoder must reject its guess)."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    ids = []
    for i, (piece, v) in enumerate(zip(pieces, values)):
        ids += enc(piece)
        text = format_value(v)
        ids += enc(text[:-1]) + enc(text[-1]) if i in split else enc(text)
    return ids + enc(pieces[-1])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_constrained_equals_plain_greedy_on_a_deterministic_model(tiny, name):
    _model, tok = tiny
    cfg = CONFIGS[name]
    enc = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = end_of_turn_id(tok)
    prompts, targets, expected, expected_calls, speculated = [], [], [], 0, 0
    for s in SCRIPTS:
        for k in range(1, len(s.keyframes) + 1):
            # without the Target Frame Instruction the K requests are identical, so the model's answer
            # is too: here it always writes the script's last keyframe (its own choice of key word)
            answer_k = len(s.keyframes) if name == "semantic_no_tfi" else k
            v = np.round(np.random.default_rng([7, int(s.script_id[1:]), answer_k]).uniform(LOW, HIGH), 2)
            v[:3] = [0.25, 0.4, 0.0]  # first values: extended (0.2 -> 0.25), then single tokens
            v[55:58] = [-0.35, -0.5, -1.0]  # negative pose values, the first one extended
            split = {i for i in range(61) if len(format_value(v[i])) == 4 + (v[i] < 0) and i % 3 == 0} | {0, 55}
            pieces = answer_skeleton(answer_k, cfg)
            prompt = prompt_ids(tok, build_messages(s, k, cfg))
            prompts.append(prompt)
            targets.append(prompt + _split_numbers(tok, pieces, v, split) + [eos])
            expected.append(answer_text(v, answer_k, cfg))
            # calls, unbatched: 1 prefill + every value token (and key-word token), except that the
            # last token of the last value is only fed when that value could still be extended
            texts = [format_value(x) for x in v]
            n_tokens = [len(enc(t[:-1]) + enc(t[-1])) if i in split else len(enc(t)) for i, t in enumerate(texts)]
            last_extendable = len(texts[60].lstrip("-")) == 3  # "0.3", "1.0": a second decimal may follow
            n_word = len(enc(["one", "two", "three"][answer_k - 1])) if name == "semantic_no_tfi" else 0
            expected_calls += 1 + n_word + sum(n_tokens) - 1 + last_extendable
            # a value token that leaves a number which may end or go on ("0.2" of "0.25") is fed with
            # the skeleton piece after it; when the model goes on, those piece positions were a guess
            for i, t in enumerate(texts[:60]):
                tokens = [enc(t[:-1]), enc(t[-1])] if i in split else [[x] for x in enc(t)]
                grammar = number_strings(float(LOW[i]), float(HIGH[i]))
                written = ""
                for token in tokens[:-1]:
                    written += tok.decode(token)
                    if written in grammar and any(o.startswith(written) and o != written for o in grammar):
                        speculated += len(enc(pieces[i + 1]))
    model = OracleLM(len(tok), targets)
    plain = [plain_greedy(model, p, eos) for p in prompts]
    assert [tok.decode(p) for p in plain] == expected  # the reference writes the targets
    for batch_size in (1, 4):
        model.calls = model.off_target = 0
        stats = {}
        results = generate_keyframes(model, tok, SCRIPTS, cfg, batch_size=batch_size, stats=stats)
        flat = [r for per in results for r in per]
        assert [r.text for r in flat] == expected
        for r, text in zip(flat, expected):
            assert r.valid and np.array_equal(r.values, parse_answer(text, cfg).values)
        # every history fed was a prefix of what plain decoding writes, except the speculated pieces
        assert model.off_target == speculated > 0
        assert stats["forward_calls"] == model.calls
        if batch_size == 1:
            assert stats["forward_calls"] == expected_calls
            assert stats["forward_calls"] * 2 < sum(len(p) + 1 for p in plain)  # plain: one call per token


def test_constrained_output_always_parses_on_a_random_model_and_batching_does_not_change_it(tiny):
    model, tok = tiny
    for cfg in CONFIGS.values():
        stats = {}
        one = generate_keyframes(model, tok, SCRIPTS, cfg, batch_size=1)
        many = generate_keyframes(model, tok, SCRIPTS, cfg, batch_size=6, stats=stats)
        assert stats["batches"] == 1 and stats["requests"] == 6
        for per_one, per_many, s in zip(one, many, SCRIPTS):
            assert len(per_one) == len(per_many) == len(s.keyframes)
            for a, b in zip(per_one, per_many):
                assert a.valid and b.valid and a.error is None
                assert (a.n_missing, a.n_unknown, a.n_clipped) == (0, 0, 0)
                assert a.text == b.text and np.array_equal(a.values, b.values)
                assert np.all(a.values >= LOW) and np.all(a.values <= HIGH)
        if cfg is SEM_NO_TFI:
            assert all(r.keyframe in range(1, 6) for per in one for r in per)
        if cfg is SEM:
            assert [r.keyframe for per in one for r in per] == [1, 2, 1, 1, 2, 3]
    assert model.training is False


def test_a_lora_wrapped_model_generates_the_same(tiny):
    from facelab.families.keyframe_lm.lora import apply_lora

    model, tok = tiny
    base = generate_keyframes(model, tok, SCRIPTS[:1], SEM)
    wrapped = apply_lora(copy.deepcopy(model))  # a fresh adapter is the identity
    assert [r.text for r in generate_keyframes(wrapped, tok, SCRIPTS[:1], SEM)[0]] == [r.text for r in base[0]]


QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)  # Qwen2/Qwen3's pre-tokenizer: every digit on its own


def test_constrained_decoding_with_a_digit_splitting_tokenizer(tiny):
    """A Qwen-style tokenizer writes "0.25" as 0 . 2 5 and may glue a minus sign to the "\":" before it;
    the grammar works on token texts, so answers still always parse, batched or not."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    from facelab.families.keyframe_lm.tiny import CHAT_TEMPLATE

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    texts = [
        m["content"]
        for s in SCRIPTS
        for cfg in (SEM, NON)
        for msgs, a in examples_for_script(s, cfg)
        for m in msgs + [{"content": a}]
    ] + ['":-0.5,"HeadYaw":-0.25']
    raw.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=700,
            show_progress=False,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    assert tok.convert_ids_to_tokens(tok("0.25", add_special_tokens=False)["input_ids"]) == ["0", ".", "2", "5"]
    assert '":-' in tok.convert_ids_to_tokens(tok('"HeadYaw":-0.25', add_special_tokens=False)["input_ids"])
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    ).eval()
    for cfg in (SEM, NON, SEM_NO_TFI):
        one = generate_keyframes(model, tok, SCRIPTS, cfg, batch_size=1)
        many = generate_keyframes(model, tok, SCRIPTS, cfg, batch_size=6)
        for a, b in zip((r for per in one for r in per), (r for per in many for r in per)):
            assert a.valid and a.text == b.text and np.array_equal(a.values, b.values)


def test_plain_mode_on_a_random_model_returns_results(tiny):
    model, tok = tiny
    model.train()
    stats = {}
    results = generate_keyframes(
        model, tok, SCRIPTS[:2], SEM, mode="plain", max_new_tokens=12, batch_size=3, stats=stats
    )
    assert model.training  # the caller's mode is restored
    model.eval()
    assert [len(r) for r in results] == [2, 1]
    for r in (r for per in results for r in per):
        assert r.values.shape == (61,) and not r.valid  # 12 tokens cannot hold an answer
    assert stats["forward_calls"] <= 12 and stats["batches"] == 1
    with pytest.raises(GenerationError, match="mode"):
        generate_keyframes(model, tok, SCRIPTS, SEM, mode="beam")
