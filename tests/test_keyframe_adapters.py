"""Many LoRA adapters on one base model (issue #22, item 2): an AdapterSet holds the tiny base LM once,
and each of two adapters answers through it exactly as it answers served alone — interleaved, after an
eviction and a reload. Fast: a 1-layer random Qwen3-architecture model built in the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO

SCRIPT = ("A student waits outside the interview room.", "nervous", ["a tight smile", "eyes wide"])


def _adapter(d: Path, base: Path, seed: int, **model) -> Path:
    """A keyframe LoRA checkpoint on ``base`` whose adapter is random (seeded), not peft's no-op init."""
    import torch

    from facelab.core import checkpoint as ckpt
    from facelab.families import registry
    from facelab.families.keyframe_lm.servable import build_keyframe_lm, keyframe_lm_state

    raw = yaml.safe_load((REPO / "jobs" / "keyframe_tiny.yaml").read_text())
    raw["model"]["base_model"] = str(base)
    raw["model"].update(model)
    job = registry.get("keyframe").job.model_validate(raw).model_dump(mode="json")
    lm, _tok, _info = build_keyframe_lm(job, None, "cpu", trainable=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    ckpt.save_tensors(d, keyframe_lm_state(lm, job), job)
    return d


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from facelab.families.keyframe_lm.tiny import build_tiny_lm

    d = tmp_path_factory.mktemp("adapters")
    size = dict(vocab_size=400, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    build_tiny_lm(d / "lm", [" ".join(SCRIPT[:2] + tuple(SCRIPT[2]))], intermediate_size=32, **size)
    return {
        "lm": d / "lm",
        "a": _adapter(d / "a", d / "lm", 1),
        "b": _adapter(d / "b", d / "lm", 2, lora_r=4),  # another rank: adapters of one set may differ in r
    }


def _values(servable) -> np.ndarray:
    return np.stack([r.values for r in servable.keyframes(*SCRIPT)])


def test_two_adapters_share_one_base_and_answer_as_they_do_alone(tiny):
    import torch

    from facelab.core import checkpoint as ckpt
    from facelab.families import registry
    from facelab.families.keyframe_lm.adapters import AdapterSet, adapter_memory_bytes

    alone = {}
    for name in ("a", "b"):
        model, _config = registry.load_servable(tiny[name])  # as `facelab serve` loads one model
        alone[name] = _values(model)
    assert not np.allclose(alone["a"], alone["b"]), "the two adapters must answer differently for the test to test"

    job = ckpt.load_config(tiny["a"])
    adapters = AdapterSet(job, None, "cpu", max_adapters=2)
    a = adapters.add("kf-a/1", tiny["a"])
    b = adapters.add("kf-b/1", tiny["b"])
    base_ptrs = {p.data_ptr() for n, p in adapters.model.named_parameters() if "lora_" not in n}
    for name, servable in (("a", a), ("b", b), ("a", a), ("b", b)):  # interleaved: switching is exact
        np.testing.assert_allclose(_values(servable), alone[name], atol=1e-4, err_msg=name)
    assert {p.data_ptr() for n, p in adapters.model.named_parameters() if "lora_" not in n} == base_ptrs
    mem = adapter_memory_bytes(adapters)
    assert set(mem) == {"base", "adapter:kf-a/1", "adapter:kf-b/1"} and mem["base"] > mem["adapter:kf-a/1"] > 0
    assert mem["adapter:kf-a/1"] == 2 * mem["adapter:kf-b/1"]  # rank 8 vs rank 4

    # the LRU: a third adapter evicts the least recently used (a), whose servable then refuses
    assert adapters.get("kf-b/1") is b
    c = adapters.add("kf-a/2", tiny["a"])
    assert adapters.names == ["kf-b/1", "kf-a/2"] and "kf-a/1" not in adapters and a.evicted
    with pytest.raises(KeyError, match="kf-a/1"):
        a.keyframes(*SCRIPT)
    assert sorted(adapters.model.peft_config) == ["kf-a/2", "kf-b/1"]
    np.testing.assert_allclose(_values(c), alone["a"], atol=1e-4)
    np.testing.assert_allclose(_values(b), alone["b"], atol=1e-4)
    assert torch.is_grad_enabled()  # generation left the caller's autograd state alone


def test_an_adapter_of_another_base_is_refused_naming_the_key(tiny, tmp_path):
    from facelab.core import checkpoint as ckpt
    from facelab.families.keyframe_lm.adapters import AdapterSet

    adapters = AdapterSet(ckpt.load_config(tiny["a"]), None, "cpu")
    other = _adapter(tmp_path / "other", tiny["lm"], 3, dtype="bfloat16")
    with pytest.raises(ckpt.CheckpointError, match=r"model\.dtype is 'bfloat16'.*same base"):
        adapters.add("other/1", other)
    with pytest.raises(ValueError, match="max_adapters"):
        AdapterSet(ckpt.load_config(tiny["a"]), None, "cpu", max_adapters=0)
