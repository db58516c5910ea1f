"""The retrieval model: frozen-encoder text embeddings (mean-pooled, L2-normalised) of every training
text, and the training sequences they index. ``generate`` returns the sequence of the most similar
training text (or samples among the ``top_k`` most similar); ``teacher_forced_means`` predicts
frame p+1 as the retrieved sequence's frame p+1 (the zero face past its end), so Cppl (CTEG Eq. 18)
scores how well retrieval alone explains a test sequence."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from facelab.core import checkpoint as ckpt
from facelab.core.text_encoder import load_text_encoder


@dataclass
class NearestConfig:
    max_frames: int
    top_k: int = 1
    temperature: float = 0.05


class NearestNeighbour(nn.Module):
    def __init__(self, job: dict, keys: Tensor, sequences: Tensor, lengths: Tensor, mean_expression: Tensor):
        super().__init__()
        m = job["model"]
        self.cfg = NearestConfig(max_frames=job["data"]["max_frames"], top_k=m["top_k"], temperature=m["temperature"])
        self.max_text_tokens = m["max_text_tokens"]
        self.text_encoder, self.tokenizer = load_text_encoder(m["text_encoder"])
        self.text_encoder.requires_grad_(False).eval()
        self.register_buffer("keys", keys)  # (N, D) unit vectors
        self.register_buffer("sequences", sequences)  # (N, T, 53), zero-padded
        self.register_buffer("lengths", lengths)  # (N,)
        self.register_buffer("mean_expression", mean_expression)  # (53,)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> Tensor:
        """(B, D) L2-normalised mean-pooled encoder states."""
        dev = self.mean_expression.device
        tok = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_tokens, return_tensors="pt"
        ).to(dev)
        states = self.text_encoder(**tok).last_hidden_state  # (B, L, D)
        mask = tok["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, L, 1)
        pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def pick(self, texts: list[str], generator: torch.Generator | None = None) -> Tensor:
        """Index of the retrieved training sequence per text: the nearest, or a softmax sample among
        the ``top_k`` nearest."""
        sim = self.embed(texts) @ self.keys.T  # (B, N)
        k = min(self.cfg.top_k, sim.shape[1])
        if k == 1:
            return sim.argmax(dim=1)
        top, idx = sim.topk(k, dim=1)
        probs = torch.softmax(top / self.cfg.temperature, dim=1).cpu()
        choice = torch.multinomial(probs, 1, generator=generator).to(idx.device)
        return idx.gather(1, choice).squeeze(1)

    @torch.no_grad()
    def generate(self, texts: list[str], max_frames: int | None = None, generator=None) -> list[Tensor]:
        limit = min(max_frames or self.cfg.max_frames, self.cfg.max_frames)
        idx = self.pick(texts, generator)
        return [self.sequences[i, : min(int(self.lengths[i]), limit)].clone() for i in idx.tolist()]

    @torch.no_grad()
    def teacher_forced_means(
        self, texts: list[str], frames: Tensor, lengths: Tensor, generator=None, latent: str = "mean"
    ) -> tuple[Tensor, Tensor]:
        """``(means (B, T+1, 53), mask (B, T+1))``: ``means[:, p]`` predicts frame p+1 (the terminator
        at step ``lengths[b]``): the retrieved sequence's frame p+1, the zero face past its end."""
        b, t, d = frames.shape
        idx = self.pick(texts, generator)
        means = torch.zeros(b, t + 1, d, dtype=frames.dtype, device=frames.device)
        for row, i in enumerate(idx.tolist()):
            n = min(int(self.lengths[i]), t + 1)
            means[row, :n] = self.sequences[i, :n].to(frames.dtype)
        steps = torch.arange(t + 1, device=frames.device)
        mask = steps[None, :] <= lengths.to(frames.device)[:, None]
        return means * mask[..., None], mask


def load(dirpath: Path, device: str = "cpu", root: Path | None = None) -> NearestNeighbour:
    """The family's loader: a checkpoint directory (safetensors + config.json) → the model."""
    config, weights = ckpt.load_config(dirpath), ckpt.load_weights(dirpath)
    names = ("keys", "sequences", "lengths", "mean_expression")
    missing = [n for n in names if n not in weights]
    if missing:
        raise ckpt.CheckpointError(f"{Path(dirpath) / ckpt.MODEL_FILE}: missing {missing}")
    model = NearestNeighbour(config, *(weights[n] for n in names))
    return model.to(device).eval()
