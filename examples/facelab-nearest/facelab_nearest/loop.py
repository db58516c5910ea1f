"""The ``nearest`` worker loop: index the training split once, score the dev split, then the test
split after the last epoch -- through facelab's worker runtime, like every built-in family."""

from __future__ import annotations

import math
from typing import Any

import torch

from facelab.core import checkpoint as ckpt
from facelab.core.distributed import allreduce, seed_everything
from facelab.runtime.worker import EpochRuntime
from facelab.tasks.expressions.data import load_splits
from facelab.tasks.expressions.scoring import run_test_eval, val_cppl_terms


def build(job: dict, train_ds, mean) -> "NearestNeighbour":  # noqa: F821 - imported below
    from facelab_nearest.model import NearestNeighbour

    n, t = len(train_ds), max(len(s) for s in train_ds.sequences)
    seqs = torch.zeros(n, t, 53)
    for i, s in enumerate(train_ds.sequences):
        seqs[i, : len(s)] = s
    lengths = torch.tensor([len(s) for s in train_ds.sequences])
    model = NearestNeighbour(job, torch.zeros(n, 1), seqs, lengths, torch.as_tensor(mean, dtype=torch.float32))
    keys = torch.cat([model.embed(train_ds.texts[i : i + 256]) for i in range(0, n, 256)])
    model.keys = keys
    return model


def worker_loop(config: dict[str, Any]) -> None:
    rt = EpochRuntime.start(config)
    job = rt.job
    seed_everything(job["train"]["seed"])
    train_ds, dev_ds, mean = load_splits(rt.data_dir, job["data"])
    model = build(job, train_ds, mean).to(rt.device).eval()
    dev_idx = list(range(rt.rank, len(dev_ds), rt.world))
    for epoch in range(rt.start_epoch, job["train"]["epochs"]):
        with rt.phase("validate", epoch):
            nll_sum, n_items = val_cppl_terms(model, dev_ds, dev_idx, job, 64, epoch)
            mse_sum = 0.0
            for i in dev_idx:  # frame MSE of the retrieved sequence over the frames both have
                got = model.generate([dev_ds.texts[i]])[0].cpu()
                ref = dev_ds.sequences[i]
                n = min(len(got), len(ref))
                mse_sum += float(((got[:n] - ref[:n]) ** 2).mean()) if n else 0.0
            red = allreduce([nll_sum, n_items, mse_sum, len(dev_idx)], rt.device)
        metrics = {"val/cppl": math.exp(red[0] / max(red[1], 1)), "val/loss": red[2] / max(red[3], 1)}
        if epoch == job["train"]["epochs"] - 1 and job["eval"]["enabled"] and rt.rank == 0:
            with rt.phase("test", epoch):
                metrics.update(run_test_eval(model, job, rt.data_dir, rt.device, rt.client, rt.run_id))
        rt.end_epoch(epoch, metrics, lambda d, meta: ckpt.save(d, model, job, keep_encoder=False, meta=meta))
