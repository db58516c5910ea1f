"""The Express4D-MDM per-worker training loop (Ray Train): setup → (resume) → train/validate → test → checkpoint.

The KeyframeFace Table 3 baseline (:mod:`facelab.families.keyframe_mdm.model`): a transformer denoiser
trained with the DDPM objective (the paper's baseline: predict ε; ``model.prediction: x0`` is MDM's
clean-sample objective; MSE, condition dropped with probability ``model.cond_drop``) on one example
per keyframe with its own prompt (``model.unit: keyframe``; ``script``: one script's 1–5 keyframes
denoised jointly). The loop mirrors :mod:`facelab.families.keyframe_lm.loop` (the LoRA worker): plain PyTorch plus
``ray.train.report``; DDP through ``ray.train.torch.prepare_model`` when there is more than one
worker; a DistributedSampler over the training scripts; validation sums all-reduced so every rank
reports the same numbers; rank 0 alone writes checkpoints (safetensors, the frozen text encoder
left out) and the MLflow record, and samples the test split after the last epoch and scores it
with the metrics of KeyframeFace §5.3 (the same ``test/*`` keys as ``keyframe`` jobs).

Choices (MDM §4 where it applies):

* AdamW at a constant learning rate (MDM: 1e-4, no schedule), optional gradient-norm clipping.
* Diffusion noise, timesteps and condition drops come from a CPU generator re-seeded at every
  epoch from ``(train.seed, epoch, rank)``, so a resumed run draws what the uninterrupted one
  would have (dropout uses the global RNG, seeded once by ``seed_everything``).
* ``val/loss`` — the mean per-script denoising loss on the val split, conditional (no drops),
  with timesteps and noise from a generator seeded by :data:`VAL_SEED` (and the rank): every
  epoch, and every trial of a sweep, is scored on the same noisy inputs.
* Test keyframes are sampled with ``eval.sampling_steps`` steps (the paper's baseline: all 1000;
  fewer are respaced) and guidance ``eval.guidance_scale`` (MDM: 2.5), ``eval.batch_size`` examples
  at a time, noise from a generator seeded by ``train.seed``; a diffusion sample is always a valid
  vector, so ``test/validity`` is 1. Diversity is measured in ``eval.diversity_space``. The evaluator texts are
  :func:`facelab.data.keyframeface.keyframe_text` with the ``original`` annotation, as the
  ``keyframe`` loop scores them, so the two families' rows are comparable.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from facelab.core.distributed import allreduce, seed_everything
from facelab.families.registry import load_registered
from facelab.tasks.keyframes.scoring import load_scripts, log_eval_artifacts

VAL_SEED = 0
"""Seed of the validation noise (see the module docstring)."""


class ScriptDataset(Dataset):
    """The training examples: one-keyframe scripts (``model.unit: keyframe``) or whole scripts."""

    def __init__(self, scripts):
        self.scripts = list(scripts)

    def __len__(self) -> int:
        return len(self.scripts)

    def __getitem__(self, i: int):
        return self.scripts[i]


def _as_list(batch):
    return list(batch)


def epoch_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The CPU generator of an epoch's diffusion noise on one rank (independent of resumption)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 1_009 + rank) % 2**63)


def feature_stats_of(scripts) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel z-score statistics of every training keyframe (the evaluator's, std floored)."""
    from facelab.tasks.keyframes.metrics import feature_stats

    return feature_stats(np.concatenate([s.values for s in scripts]))


def validation_loss(
    model, scripts, annotation: str, batch_size: int, max_batches: int | None, rank: int
) -> tuple[float, int]:
    """Sum of per-script denoising losses and the number of scripts (fixed noise, eval mode, no drops)."""
    gen = torch.Generator().manual_seed(VAL_SEED + rank)
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    try:
        with torch.no_grad():
            for j in range(0, len(scripts), batch_size):
                if max_batches and j // batch_size >= max_batches:
                    break
                per_script = model.losses(scripts[j : j + batch_size], annotation, generator=gen)["per_script"]
                total, n = total + float(per_script.sum()), n + len(per_script)
    finally:
        model.train(was_training)
    return total, n


# ------------------------------------------------------------------------------------------------
# Test-split evaluation (KeyframeFace §5.3)
# ------------------------------------------------------------------------------------------------


def sample_split(model, scripts, job: dict) -> np.ndarray:
    """Sampled keyframes of every script, stacked in script/keyframe order: float32 (N, 61); batches of
    ``eval.batch_size`` examples (keyframes with ``model.unit: keyframe``)."""
    e = job["eval"]
    gen = torch.Generator().manual_seed(job["train"]["seed"])
    scripts = model.examples(scripts)
    out = []
    for i in range(0, len(scripts), e["batch_size"]):
        out += model.sample(
            scripts[i : i + e["batch_size"]], job["data"]["annotation"], e["sampling_steps"], e["guidance_scale"], gen
        )
    return np.concatenate(out).astype(np.float32)


def evaluate_split(model, scripts, job: dict, evaluator) -> tuple[dict, dict]:
    """Sample every test script's keyframes and score them → (metrics, extras for the plots)."""
    from facelab.data.keyframeface import keyframe_text
    from facelab.tasks.keyframes.metrics import evaluate_keyframes, per_channel_errors

    e = job["eval"]
    gt = np.stack([kf.values for s in scripts for kf in s.keyframes]).astype(np.float32)  # (N, 61)
    texts = [keyframe_text(s, kf.index) for s in scripts for kf in s.keyframes]
    t0 = time.time()
    pred = sample_split(model, scripts, job)
    gen_time = time.time() - t0
    metrics = evaluate_keyframes(
        pred,
        gt,
        texts,
        evaluator,
        n_valid=len(gt),
        n_total=len(gt),
        seed=job["train"]["seed"],
        r_batch=e["r_precision_batch"],
        diversity_pairs=e["diversity_pairs"],
        diversity_space=e["diversity_space"],
    )
    out = {f"test/{k}": float(v) for k, v in metrics.items()}
    out["test/gen_time_s"] = gen_time
    out["test/keyframes_per_s"] = len(gt) / max(gen_time, 1e-9)
    return out, {"pred": pred, "gt": gt, "texts": texts, "per_channel": per_channel_errors(pred, gt)}


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def worker_loop(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. ``config`` keys: job, data_dir, root, tracking ({uri, run_id} or None)."""
    import ray.train
    import ray.train.torch

    from facelab.core import checkpoint as ckpt
    from facelab.families.keyframe_mdm.model import build_keyframe_mdm, load_mdm_weights
    from facelab.runtime.worker import EpochRuntime

    rt = EpochRuntime.start(config)  # context, resume, history replay (facelab.runtime.worker)
    job: dict = config["job"]
    optim_cfg, train_cfg, eval_cfg = job["optim"], job["train"], job["eval"]
    annotation = job["data"]["annotation"]
    rank, world, device, data_dir = rt.rank, rt.world, rt.device, rt.data_dir
    tr = config.get("tracking") or {}
    client, run_id = rt.client, rt.run_id

    seed_everything(train_cfg["seed"])
    train_scripts, val_scripts, test_scripts = load_scripts(data_dir, job)
    per_worker = max(1, optim_cfg["batch_size"] // world)
    unit = job["model"]["unit"]
    if unit == "keyframe":  # the paper's baseline: one example (and one prompt) per keyframe
        from facelab.families.keyframe_mdm.model import keyframe_units

        train_examples, val_examples = keyframe_units(train_scripts), keyframe_units(val_scripts)
    else:
        train_examples, val_examples = list(train_scripts), list(val_scripts)
    if len(train_examples) < per_worker * world:
        raise ValueError(
            f"optim.batch_size {optim_cfg['batch_size']} needs at least {per_worker * world} training "
            f"{unit}s; the train split has {len(train_examples)}"
        )

    # ---- setup -------------------------------------------------------------------------------
    mean, std = feature_stats_of(train_scripts)
    model = build_keyframe_mdm(job, mean, std).to(device)
    model.cache_texts(model.script_texts(train_scripts + val_scripts + test_scripts, annotation))  # encoder runs once
    params = [p for p in model.parameters() if p.requires_grad]
    if client:
        client.log_metric(run_id, "model/trainable_params", sum(p.numel() for p in params))
    steps_per_epoch = len(train_examples) // (per_worker * world)
    if train_cfg["max_steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, train_cfg["max_steps_per_epoch"])
    opt = torch.optim.AdamW(params, lr=optim_cfg["lr"], weight_decay=optim_cfg["weight_decay"])

    if rt.resumed is not None:
        load_mdm_weights(model, {k: v.to(device) for k, v in rt.resumed.weights.items()}, str(rt.resumed.path))
        opt.load_state_dict(rt.resumed.state["optimizer"])

    ddp_model = (
        ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        if world > 1
        else model
    )
    train_ds = ScriptDataset(train_examples)
    sampler = DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=train_cfg["seed"], drop_last=True
    )
    loader = DataLoader(train_ds, batch_size=per_worker, sampler=sampler, drop_last=True, collate_fn=_as_list)
    val_mine = val_examples[rank::world]

    epochs = train_cfg["epochs"]
    for epoch in range(rt.start_epoch, epochs):
        t0 = time.time()
        step_log: list[tuple[int, dict]] = []
        sampler.set_epoch(epoch)
        gen = epoch_generator(train_cfg["seed"], epoch, rank)
        ddp_model.train()
        loss_sum, n = 0.0, 0
        for i, batch in enumerate(loader):
            if i >= steps_per_epoch:
                break
            loss = ddp_model(batch, annotation, generator=gen)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if optim_cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, optim_cfg["grad_clip"])
            opt.step()
            rt.step += 1
            n += 1
            loss_sum += float(loss.detach())
            if rank == 0 and rt.step % train_cfg["log_every_steps"] == 0:
                step_log.append((rt.step, {"step/loss": float(loss.detach())}))
        red = allreduce([loss_sum, n], device)
        train_metrics = {"train/loss": red[0] / max(red[1], 1)}

        # ---- validate: denoising loss at fixed timesteps and noise ------------------------------
        red = allreduce(
            list(validation_loss(model, val_mine, annotation, per_worker, train_cfg["max_val_batches"], rank)), device
        )
        val_metrics = {"val/loss": red[0] / max(red[1], 1)}

        test_metrics: dict[str, float] = {}
        extras = None
        if epoch == epochs - 1 and eval_cfg["enabled"] and rank == 0:
            evaluator = load_registered(tr.get("uri"), eval_cfg["evaluator"], device)
            test_metrics, extras = evaluate_split(model, test_scripts, job, evaluator)

        metrics = {
            **train_metrics,
            **val_metrics,
            **test_metrics,
            "epoch_time_s": time.time() - t0,
            "lr": opt.param_groups[0]["lr"],
        }

        def save(d: Path, meta: dict) -> None:
            ckpt.save(d, model, job, keep_encoder=False, train_state={"optimizer": opt.state_dict()}, meta=meta)

        rt.end_epoch(epoch, metrics, save, step_log=step_log)
        if client and extras is not None:
            log_eval_artifacts(client, run_id, extras)
    if world > 1 and dist.is_initialized():
        dist.barrier()
