"""The LM-Listener per-worker training loop (Ray Train): two stages, one checkpointed epoch at a time.

Ng et al. 2023 ("Can Language Models Learn to Listen?", §3.2-3.3) train the motion VQ-VAE first and
the code language model on its frozen codes second. Here both are one Ray Train run:

* epochs ``0 .. vq_epochs−1`` are **stage 1**: AdamW (``optim.vq_lr``) on the VQ-VAE, objective
  ``recon_mse + β·commit`` (:meth:`LMListener.vq_losses`);
* epochs ``vq_epochs .. vq_epochs+epochs−1`` are **stage 2**: a new AdamW (``optim.lr``) on the code
  LM only, objective the code cross-entropy (:meth:`LMListener.lm_losses`); the VQ-VAE is frozen
  and encodes each batch on the fly.

Every epoch reports ``stage``, ``epoch``, ``step``, ``train/loss`` and ``val/loss`` — the current
stage's objective, so a sweep's ``val/loss`` always exists — plus the stage's own terms: stage 1
``train/vq_loss``, ``val/vq_loss``, ``val/recon_mse``, ``val/commit``, ``val/codebook_perplexity``;
stage 2 ``val/code_ce``, ``val/code_perplexity`` (= exp code_ce), ``val/code_acc`` and ``val/cppl``
(Eq. 18 of the CTEG paper over the dev split, through :meth:`LMListener.teacher_forced_means`).
After the last epoch the test split is scored as for CTEG (:func:`facelab.families.cteg.loop.run_test_eval`).

The rest follows :mod:`facelab.families.cteg.loop`: DistributedSampler + DDP (``prepare_model``, wrapped
again at the stage change, when the trainable parameters change), all-reduced validation sums, rank 0
writes the checkpoint (safetensors without the frozen encoder; ``train_state.pt`` holds the
optimizer state and its stage, loadable with ``weights_only=True``) and then the MLflow record;
``meta.json`` carries epoch, step, stage and the metrics history; a restarted worker resumes from
the last checkpoint with the optimizer of the stage it is in.
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from facelab.core.distributed import allreduce, seed_everything
from facelab.tasks.expressions.data import collate, load_splits
from facelab.tasks.expressions.scoring import check_eval_data, run_test_eval, val_cppl_terms

TRAIN_TERMS = {1: ("loss", "recon_mse", "commit", "perplexity"), 2: ("loss", "code_ce", "code_acc")}
"""Per-batch terms averaged into ``train/*`` (and logged per step as ``step/*``)."""


def stage_of(epoch: int, train_cfg: dict) -> int:
    """1 during the VQ-VAE epochs, 2 after them."""
    return 1 if epoch < train_cfg["vq_epochs"] else 2


def make_optimizer(model, stage: int, optim_cfg: dict) -> tuple[torch.optim.Optimizer, list]:
    """A fresh AdamW over ``stage``'s parameters (``vq_lr`` in stage 1, ``lr`` in stage 2)."""
    params = model.stage_parameters(stage)
    lr = optim_cfg["vq_lr"] if stage == 1 else optim_cfg["lr"]
    return torch.optim.AdamW(params, lr=lr, weight_decay=optim_cfg["weight_decay"]), params


def _train_names(stage: int) -> dict[str, str]:
    """Batch term -> reported name: stage 1's loss is also ``train/vq_loss``; perplexity is the codebook's."""
    names = {k: f"train/{k}" for k in TRAIN_TERMS[stage]}
    if stage == 1:
        names["perplexity"] = "train/codebook_perplexity"
    return names


def validate_vq(model, loader, max_batches: int | None, device) -> list[float]:
    """Stage-1 dev sums: ``[loss, recon_mse, commit, perplexity]`` weighted by sequences, + count."""
    sums, n_seq = [0.0] * 4, 0
    for j, (texts, frames, lengths) in enumerate(loader):
        if max_batches and j >= max_batches:
            break
        out = model.vq_losses(frames.to(device), lengths.to(device))
        for i, k in enumerate(("loss", "recon_mse", "commit", "perplexity")):
            sums[i] += float(out[k]) * len(texts)
        n_seq += len(texts)
    return sums + [n_seq]


def validate_lm(model, loader, max_batches: int | None, device) -> list[float]:
    """Stage-2 dev sums: ``[ce·tokens, acc·tokens, tokens]``."""
    ce = acc = n_tok = 0.0
    for j, (texts, frames, lengths) in enumerate(loader):
        if max_batches and j >= max_batches:
            break
        out = model.lm_losses(texts, frames.to(device), lengths.to(device))
        ce += float(out["code_ce"]) * float(out["tokens"])
        acc += float(out["code_acc"]) * float(out["tokens"])
        n_tok += float(out["tokens"])
    return [ce, acc, n_tok]


def val_metrics_vq(model, dev_loader, train_cfg: dict, device) -> dict[str, float]:
    red = allreduce(validate_vq(model, dev_loader, train_cfg["max_val_batches"], device), device)
    n = max(red[-1], 1)
    loss, recon, commit, ppl = (v / n for v in red[:4])
    return {
        "val/loss": loss,
        "val/vq_loss": loss,
        "val/recon_mse": recon,
        "val/commit": commit,
        "val/codebook_perplexity": ppl,
    }


def val_metrics_lm(
    model, dev_loader, dev_ds, dev_idx, job: dict, per_worker: int, epoch: int, device
) -> dict[str, float]:
    train_cfg = job["train"]
    ce, acc, n_tok = validate_lm(model, dev_loader, train_cfg["max_val_batches"], device)
    nll_sum, n_items = val_cppl_terms(model, dev_ds, dev_idx, job, per_worker, epoch)
    red = allreduce([ce, acc, n_tok, nll_sum, n_items], device)
    code_ce = red[0] / max(red[2], 1)
    return {
        "val/loss": code_ce,
        "val/code_ce": code_ce,
        "val/code_perplexity": math.exp(code_ce),
        "val/code_acc": red[1] / max(red[2], 1),
        "val/cppl": math.exp(red[3] / max(red[4], 1)),
    }  # Eq. 18 over the dev split


def log_reconstructions(model, dev_ds, job: dict, client, run_id: str, n: int = 3) -> None:
    """Plot a few dev sequences next to their VQ-VAE reconstruction (after the last VQ epoch)."""
    from facelab.plots import trajectories

    device = model.mean_expression.device
    seqs = [dev_ds.sequences[i] for i in range(min(n, len(dev_ds)))]
    if not seqs:
        return
    texts, frames, lengths = collate([(dev_ds.texts[i], s) for i, s in enumerate(seqs)])
    recon = model.reconstruct(frames.to(device), lengths.to(device))
    with tempfile.TemporaryDirectory() as d:
        png = trajectories(
            [f"VQ-VAE: {t}" for t in texts],
            [r.float().cpu().numpy() for r in recon],
            [s.numpy() for s in seqs],
            Path(d) / "vq_reconstruction.png",
        )
        client.log_artifact(run_id, str(png), "plots")


def worker_loop(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. ``config`` keys: job (resolved ``lm_listener`` job
    dict), data_dir, root, tracking ({uri, run_id} or None)."""
    import ray.train
    import ray.train.torch

    from facelab.core import checkpoint as ckpt
    from facelab.families.lm_listener.model import build_lm_listener
    from facelab.runtime.worker import EpochRuntime

    job: dict = config["job"]
    if job["eval"].get("baseline"):
        raise ValueError(
            f"eval.baseline={job['eval']['baseline']!r}: the §5.3 baseline rows (gt, shuffle, random) "
            "belong to cteg jobs; an lm_listener job trains and scores the LM-Listener model"
        )
    optim_cfg, train_cfg = job["optim"], job["train"]
    rt = EpochRuntime.start(config)  # context, resume, history replay (facelab.runtime.worker)
    rank, world, device = rt.rank, rt.world, rt.device
    total_epochs = train_cfg["vq_epochs"] + train_cfg["epochs"]

    # ---- setup -------------------------------------------------------------------------------
    seed_everything(train_cfg["seed"])  # same initial weights on every rank
    train_ds, dev_ds, mean = load_splits(Path(config["data_dir"]), job["data"])
    check_eval_data(job, Path(config["data_dir"]))  # eval.protocol: listener: fail now, not after training
    model = build_lm_listener(job, mean).to(device)

    resume_state = None
    if rt.resumed is not None:
        resume_state = rt.resumed.state
        ckpt.load_into(model, rt.resumed.path, rt.resumed.weights)

    per_worker = max(1, optim_cfg["batch_size"] // world)
    sampler = DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=train_cfg["seed"], drop_last=True
    )
    loader = DataLoader(train_ds, batch_size=per_worker, sampler=sampler, collate_fn=collate, drop_last=True)
    dev_idx = list(range(rank, len(dev_ds), world))  # exact sharding: no duplicated samples
    dev_loader = DataLoader(Subset(dev_ds, dev_idx), batch_size=per_worker, collate_fn=collate)

    client, run_id = rt.client, rt.run_id
    # ---- train -------------------------------------------------------------------------------
    stage = opt = params = ddp_model = None
    for epoch in range(rt.start_epoch, total_epochs):
        if stage_of(epoch, train_cfg) != stage:  # first epoch of this run, or the stage change
            stage = stage_of(epoch, train_cfg)
            model.set_stage(stage)
            opt, params = make_optimizer(model, stage, optim_cfg)
            if resume_state is not None and resume_state.get("stage") == stage:
                opt.load_state_dict(resume_state["optimizer"])
            resume_state = None
            ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

        t0 = time.time()
        step_log: list[tuple[int, dict]] = []  # per-step terms, flushed once per epoch
        sampler.set_epoch(epoch)
        # Per-rank, per-epoch stream (codebook restarts, text dropout): resumable and rank-distinct.
        torch.manual_seed(train_cfg["seed"] * 1_000_003 + epoch * 1009 + rank)
        ddp_model.train()
        terms = TRAIN_TERMS[stage]
        sums = dict.fromkeys(terms, 0.0)
        n_batches = 0
        for i, (texts, frames, lengths) in enumerate(loader):
            if train_cfg["max_steps_per_epoch"] and i >= train_cfg["max_steps_per_epoch"]:
                break
            out = ddp_model(texts, frames.to(device), lengths.to(device), stage=stage)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            if optim_cfg["grad_clip"]:
                torch.nn.utils.clip_grad_norm_(params, optim_cfg["grad_clip"])
            opt.step()
            rt.step += 1
            n_batches += 1
            for k in terms:
                sums[k] += float(out[k].detach())
            if rank == 0 and rt.step % train_cfg["log_every_steps"] == 0:
                step_log.append(
                    (
                        rt.step,
                        {f"step/{k}": float(out[k].detach()) for k in terms}
                        | {"step/lr": opt.param_groups[0]["lr"], "step/stage": stage},
                    )
                )
        red = allreduce([sums[k] for k in terms] + [n_batches], device)
        names = _train_names(stage)
        train_metrics = {names[k]: red[j] / max(red[-1], 1) for j, k in enumerate(terms)}
        if stage == 1:
            train_metrics["train/vq_loss"] = train_metrics["train/loss"]

        # ---- validate ----------------------------------------------------------------------------
        model.eval()
        with torch.no_grad():
            if stage == 1:
                val_metrics = val_metrics_vq(model, dev_loader, train_cfg, device)
            else:
                val_metrics = val_metrics_lm(model, dev_loader, dev_ds, dev_idx, job, per_worker, epoch, device)

        # ---- test-split evaluation after the last epoch (CTEG Appendix D), rank 0 ---------------
        test_metrics: dict[str, float] = {}
        last = epoch == total_epochs - 1
        if last and job["eval"]["enabled"] and rank == 0:
            test_metrics = run_test_eval(model, job, Path(config["data_dir"]), device, client, run_id)

        metrics = {
            **train_metrics,
            **val_metrics,
            **test_metrics,
            "stage": stage,
            "lr": opt.param_groups[0]["lr"],
            "epoch_time_s": time.time() - t0,
        }

        def save(d: Path, meta: dict) -> None:
            ckpt.save(
                d,
                model,
                job,
                keep_encoder=False,
                meta={**meta, "stage": stage},
                train_state={"optimizer": opt.state_dict(), "stage": stage},
            )

        rt.end_epoch(epoch, metrics, save, step_log=step_log)
        if client and stage == 1 and epoch == train_cfg["vq_epochs"] - 1:
            log_reconstructions(model, dev_ds, job, client, run_id)
