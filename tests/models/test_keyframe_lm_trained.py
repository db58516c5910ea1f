"""KeyframeFace LM generation on a real (tiny) transformer trained to memorise its answers: plain
greedy decoding writes them, and the constrained fast path writes exactly the same, in ~4x fewer
forward calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from facelab.data.arkit import HIGH, LOW
from facelab.data.keyframeface import Keyframe, Script
from facelab.families.keyframe_lm.data import collate, encode_example
from facelab.families.keyframe_lm.generate import generate_keyframes
from facelab.families.keyframe_lm.prompts import PromptConfig, examples_for_script
from facelab.families.keyframe_lm.tiny import build_tiny_lm

SEM = PromptConfig(format="semantic", annotation="original", glossary=False)
NON = PromptConfig(format="non_semantic", annotation="original")


def _script(seed: int) -> Script:
    rng = np.random.default_rng(seed)
    kfs = []
    for i in range(2):
        v = np.round(rng.uniform(LOW, HIGH), 2) * (rng.random(61) < 0.4)  # sparse, negative pose values
        kfs.append(Keyframe(i + 1, {"original": f"the brows lift {i}"}, v.astype(np.float32)))
    return Script(f"s{seed}", "actor", "A student waits outside an interview room.", "Nervous joy.", tuple(kfs))


@pytest.mark.parametrize("cfg", [SEM, NON], ids=["semantic", "non_semantic"])
def test_constrained_equals_plain_on_a_model_that_memorised_its_answers(tmp_path, cfg):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    script = _script(11)
    assert (script.values < 0).any()  # negative pose values are part of what must match
    examples = examples_for_script(script, cfg)
    texts = [m["content"] for msgs, a in examples for m in msgs + [{"content": a}]]
    build_tiny_lm(tmp_path / "lm", texts, hidden_size=64, intermediate_size=192)
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    batch = collate([encode_example(tok, m, a) for m, a in examples], tok.pad_token_id)
    torch.manual_seed(0)
    steps = 400
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    model.train()
    for _ in range(steps):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    plain_stats, fast_stats = {}, {}
    plain = generate_keyframes(model, tok, [script], cfg, mode="plain", max_new_tokens=400, stats=plain_stats)[0]
    fast = generate_keyframes(model, tok, [script], cfg, stats=fast_stats)[0]
    for k, (p, c) in enumerate(zip(plain, fast)):
        assert p.valid, f"plain greedy output of keyframe {k + 1} is not a valid answer (training too short?)"
        assert c.valid and c.text == p.text and np.array_equal(c.values, p.values)
        assert np.array_equal(p.values, np.round(script.keyframes[k].values, 2).astype(np.float32))  # memorised
    assert fast_stats["forward_calls"] <= 62  # one batch: prefill + at most one call per value
    assert plain_stats["forward_calls"] > 2.5 * fast_stats["forward_calls"]  # one call per answer token
