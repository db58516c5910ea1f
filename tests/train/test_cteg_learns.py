"""A few hundred CPU steps on the embedded corpus: validation loss falls and the generations
respond to the text in the direction the synthetic corpus encodes (happy vs sad)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from facelab.data import emoava
from facelab.data.synth import EMOTIONS, generate_emoava, parse_text
from facelab.families.cteg.loop import warm_text_cache
from facelab.families.cteg.model import TextStateCache
from facelab.families.cteg.servable import build_cteg
from facelab.tasks.expressions.data import PairDataset, collate

pytestmark = pytest.mark.slow

STEPS = 300

JOB = {
    "kind": "cteg",
    "data": {"max_frames": 40},
    "model": {
        "text_encoder": "minilm",
        "finetune_encoder": False,
        "max_text_tokens": 24,
        "d_model": 64,
        "n_heads": 4,
        "ff_dim": 128,
        "cvad_layers": 1,
        "latent_dim": 16,
        "dropout": 0.0,
        "ewa": True,
        "ewa_dim": 16,
        "ewa_heads": 4,
        "lta": "attention",
        "target_guided": True,
        "share_projection": False,
        "stop_threshold": 1.0,
        "output_sigma": 1.0,
        "kl_reduction": "sum",
        "scale_embedding": True,
    },
}


def _val_loss(model, loader) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        torch.manual_seed(0)
        for texts, frames, lengths in loader:
            total += float(model(texts, frames, lengths)["mse"]) * len(texts)
            n += len(texts)
    model.train()
    return total / n


def test_training_reduces_val_loss_and_follows_the_text(tmp_path):
    torch.manual_seed(0)
    generate_emoava(tmp_path, n_train=1200, n_dev=64, n_test=64, seed=3)
    train = emoava.load_split(tmp_path, "train")
    dev = emoava.load_split(tmp_path, "dev")
    mean, std = emoava.load_stats(tmp_path)
    model = build_cteg(JOB, mean)
    # The frozen encoder runs once per text, as in the worker loop (TextStateCache): the same maths,
    # without a MiniLM pass per step.
    model.text_cache = TextStateCache()
    warm_text_cache(model, train.texts + dev.texts)
    loader = DataLoader(
        PairDataset(train.texts, train.sequences, 40),
        batch_size=16,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    dev_loader = DataLoader(PairDataset(dev.texts, dev.sequences, 40), batch_size=32, collate_fn=collate)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    before = _val_loss(model, dev_loader)
    steps = 0
    while steps < STEPS:
        for texts, frames, lengths in loader:
            loss = model(texts, frames, lengths)["loss"]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            if steps == STEPS:
                break
    after = _val_loss(model, dev_loader)
    assert after < 0.5 * before, (before, after)

    # Generations follow the text: project the mean offset (in std units) on happy − sad.
    axis = EMOTIONS["happy"].direction() - EMOTIONS["sad"].direction()
    model.eval()

    def score(emotion: str) -> float:
        texts = [t for t in dev.texts + train.texts[:400] if (parse_text(t) or ("",))[0] == emotion][:12]
        assert len(texts) >= 6
        seqs = model.generate(texts, max_frames=40, generator=torch.Generator().manual_seed(1))
        offs = [((s.numpy() - mean) / std).mean(0) for s in seqs]
        return float(np.mean([o @ axis for o in offs]))

    happy, sad = score("happy"), score("sad")
    print(f"val mse {before:.3f} -> {after:.3f}; happy {happy:.3f} sad {sad:.3f}")
    assert happy > sad + 0.5, (happy, sad)
