"""Per-worker loop (Ray Train) of the contrastive text–motion evaluator (KeyframeFace Appendix C).

Pairs are (keyframe text, 61-d ARKit keyframe) from the KeyframeFace format. AdamW (lr 1e-4, the
same weight decay), a cosine schedule over the epoch budget, symmetric InfoNCE with τ = 0.07, and
early stopping on validation R-Precision@1 with patience 10; seed 42. Every epoch's checkpoint
carries the *best* weights so far as its servable ``model.safetensors`` (what the registry gets),
and the current weights in ``train_state.pt`` (what a resumed trial continues from). The trial ends
when patience runs out; the last report holds R-Precision on the test split's ground truth.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facelab.core.distributed import allreduce, seed_everything


def pairs(scripts) -> tuple[list[str], np.ndarray]:
    from facelab.data.keyframeface import keyframe_text

    texts = [keyframe_text(s, kf.index) for s in scripts for kf in s.keyframes]
    values = np.stack([kf.values for s in scripts for kf in s.keyframes]).astype(np.float32)  # (N, 61)
    return texts, values


def evaluator_config(job: dict):
    from facelab.families.keyframe_evaluator.model import EvaluatorConfig

    return EvaluatorConfig(**job["model"])


@torch.no_grad()
def r_precision_of(model, texts: list[str], values: np.ndarray, batch: int, seed: int, device) -> dict[int, float]:
    from facelab.tasks.keyframes.metrics import r_precision

    model.eval()
    t = model.encode_text(texts).float().cpu().numpy()
    m = model.encode_motion(torch.from_numpy(values).to(device)).float().cpu().numpy()
    return r_precision(t, m, batch=batch, top_k=(1, 2, 3), seed=seed)


def worker_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from facelab.core import checkpoint as ckpt
    from facelab.data.keyframeface import load_split
    from facelab.families.keyframe_evaluator.model import TextMotionEvaluator, evaluator_state, feature_stats
    from facelab.runtime.worker import EpochRuntime

    rt = EpochRuntime.start(config)  # context, resume, history replay (facelab.runtime.worker)
    job: dict = config["job"]
    o, t = job["optim"], job["train"]
    rank, world, device, data_dir = rt.rank, rt.world, rt.device, rt.data_dir

    seed_everything(t["seed"])
    train_texts, train_values = pairs(load_split(data_dir, "train")[: job["data"]["train_subset"]])
    val_texts, val_values = pairs(load_split(data_dir, "val"))
    test_texts, test_values = pairs(load_split(data_dir, "test"))
    cfg = evaluator_config(job)
    model = TextMotionEvaluator(cfg, *feature_stats(train_values)).to(device)  # z-score stats of the train split
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
    per_worker = max(2, o["batch_size"] // world)
    n_steps = len(train_texts) // (per_worker * world)
    if t["max_steps_per_epoch"]:
        n_steps = min(n_steps, t["max_steps_per_epoch"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, n_steps * t["epochs"]))
    ckpt_config = {**job, "evaluator": cfg.model_dump(mode="json")}

    best, best_epoch = -1.0, -1
    best_state = evaluator_state(model)
    if rt.resumed is not None:
        best_state = rt.resumed.weights  # servable weights = the best so far
        model.load_state_dict(rt.resumed.state["model"], strict=False)
        opt.load_state_dict(rt.resumed.state["optimizer"])
        sched.load_state_dict(rt.resumed.state["scheduler"])
        best, best_epoch = rt.resumed.meta["best"], rt.resumed.meta["best_epoch"]
    ddp = ray.train.torch.prepare_model(model) if world > 1 else model

    for epoch in range(rt.start_epoch, t["epochs"]):
        t0 = time.time()
        ddp.train()
        order = np.random.default_rng(t["seed"] * 7919 + epoch).permutation(len(train_texts))
        loss_sum, n = 0.0, 0
        for i in range(n_steps):
            idx = order[(i * world + rank) * per_worker : (i * world + rank + 1) * per_worker]
            loss = ddp([train_texts[j] for j in idx], torch.from_numpy(train_values[idx]).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            rt.step += 1
            loss_sum, n = loss_sum + float(loss.detach()), n + 1
        red = allreduce([loss_sum, n], device)
        metrics: dict[str, float] = {"train/loss": red[0] / max(red[1], 1), "lr": sched.get_last_lr()[0]}
        with torch.no_grad():
            model.eval()
            vloss = float(model(val_texts[:512], torch.from_numpy(val_values[:512]).to(device)))
        rp = r_precision_of(model, val_texts, val_values, 32, t["seed"], device)
        metrics.update({"val/loss": vloss, **{f"val/r_precision_{k}": v for k, v in rp.items()}})
        if rp[1] > best:
            best, best_epoch, best_state = rp[1], epoch, evaluator_state(model)
        stop = epoch - best_epoch >= t["patience"] or epoch == t["epochs"] - 1
        if stop:  # score the best weights on the test split's ground truth
            current = evaluator_state(model)
            model.load_state_dict(best_state, strict=False)
            rp = r_precision_of(model, test_texts, test_values, 32, t["seed"], device)
            metrics.update({f"test/r_precision_{k}": v for k, v in rp.items()})
            model.load_state_dict(current, strict=False)
        metrics.update({"best/val_r_precision_1": best, "best/epoch": best_epoch, "epoch_time_s": time.time() - t0})

        def save(d: Path, meta: dict) -> None:
            ckpt.save_tensors(
                d,
                best_state,
                ckpt_config,
                meta={**meta, "best": best, "best_epoch": best_epoch},
                train_state={
                    "model": evaluator_state(model),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                },
            )

        rt.end_epoch(epoch, metrics, save)
        if stop:
            break
