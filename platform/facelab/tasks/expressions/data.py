"""Expression-sequence datasets for the expressions task: (text, 53-d frames) pairs of an EmoAva split,
and the padded batch every expressions family trains on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


class PairDataset(Dataset):
    """(text, frames) pairs of one split, frames cut to ``max_frames``."""

    def __init__(self, texts: list[str], sequences: list[np.ndarray], max_frames: int):
        self.texts = texts
        self.raw = sequences  # uncut, for metrics that must know where a sequence really ends
        self.sequences = [torch.from_numpy(np.ascontiguousarray(s[:max_frames], dtype=np.float32)) for s in sequences]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int):
        return self.texts[i], self.sequences[i]


def collate(batch):
    """Pad to the longest sequence in the batch (no padding to a fixed MSL)."""
    texts = [t for t, _ in batch]
    lengths = torch.tensor([s.shape[0] for _, s in batch], dtype=torch.long)
    frames = torch.zeros(len(batch), int(lengths.max()), batch[0][1].shape[1])
    for i, (_, s) in enumerate(batch):
        frames[i, : s.shape[0]] = s  # (T_i, 53)
    return texts, frames, lengths


def load_splits(data_dir: Path, data_cfg: dict):
    from facelab.data import emoava

    train = emoava.load_split(data_dir, "train")
    dev = emoava.load_split(data_dir, "dev")
    mean, _std = emoava.load_stats(data_dir)
    n_tr, n_dev = data_cfg.get("train_subset"), data_cfg.get("dev_subset")
    train_ds = PairDataset(train.texts[:n_tr], train.sequences[:n_tr], data_cfg["max_frames"])
    dev_ds = PairDataset(dev.texts[:n_dev], dev.sequences[:n_dev], data_cfg["max_frames"])
    return train_ds, dev_ds, mean
