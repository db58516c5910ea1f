"""The CTEG per-worker training loop (Ray Train): setup → (resume) → train/validate → checkpoint.

Plain PyTorch plus ``ray.train.report``. Every rank trains on its shard (:class:`BucketBatchSampler`,
DDP through ``ray.train.torch.prepare_model``); validation sums are all-reduced so every rank sees
the same metrics; rank 0 alone writes checkpoints and logs to MLflow, so a DDP trial is one MLflow run.

After each validation the checkpoint selection is updated (``train.select``,
:mod:`facelab.families.cteg.selection`); at the last epoch the selected weights are loaded before
the test-split evaluation, so the test metrics and the final checkpoint are the selected epoch's.

Speed (the same maths on every device):

* batches are *length-bucketed* (:class:`BucketBatchSampler`): sequences of similar length train
  together and a batch is padded to its own longest, so almost no frame is padding (EmoAva's
  lengths are log-normal, mean ~52 frames; a random batch of 256 is nearly always padded to the
  256-frame cap);
* on CUDA the forward/backward runs under bf16 autocast (:func:`autocast`; the Gaussian terms of
  the CVAD stay float32) and Adam is the fused kernel (:func:`make_optimizer`);
* the loss terms are summed on the device: the loop syncs with the host only at logging steps and
  at the end of the epoch;
* a frozen text encoder runs once per distinct text (:class:`~facelab.families.cteg.model.TextStateCache`):
  from the second epoch on, a step's text side is one gather instead of a tokenizer call and a BERT pass.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from facelab.core import tracking
from facelab.core.distributed import allreduce, seed_everything
from facelab.tasks.expressions.data import collate, load_splits
from facelab.tasks.expressions.scoring import check_eval_data, run_baseline_eval, run_test_eval, val_cppl_terms

LOSS_TERMS = ("loss", "mse", "kl", "lg")


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches, sharded over ``num_replicas`` ranks, reproducible per epoch.

    Per epoch (seed + epoch): shuffle all indices; cut them into pools of ``bucket_batches``
    global batches (``batch_size * num_replicas`` sequences); sort each pool by length and cut it
    into global batches; shuffle the order of the global batches; rank r takes the r-th slice of
    each. So every rank gets the same number of batches, and at a given step all ranks hold
    sequences of similar length (no rank waits for another's long batch). Incomplete global batches
    are dropped (as ``DistributedSampler(drop_last=True)`` with a ``drop_last`` loader).
    ``batch_size`` is per rank.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        bucket_batches: int = 32,
        shuffle: bool = True,
    ):
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or bucket_batches < 1:
            raise ValueError(
                "BucketBatchSampler: batch_size, num_replicas, bucket_batches >= 1 and 0 <= rank < num_replicas"
            )
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.num_replicas, self.rank = batch_size, num_replicas, rank
        self.seed, self.bucket_batches, self.shuffle = seed, bucket_batches, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths) // (self.batch_size * self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        g = np.random.default_rng(self.seed + self.epoch)
        n = len(self.lengths)
        order = g.permutation(n) if self.shuffle else np.arange(n)
        glob = self.batch_size * self.num_replicas
        order = order[: len(self) * glob]
        pool = glob * self.bucket_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + glob] for i in range(0, len(chunk), glob)]
        if self.shuffle:
            batches = [batches[i] for i in g.permutation(len(batches))]
        for gb in batches:
            yield gb[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()


def autocast(device, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere (the CPU path stays float32). ``enabled=False``
    turns it off (benchmarks' float32 rows)."""
    if torch.device(device).type == "cuda" and enabled is not False:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params, optim_cfg: dict, device) -> torch.optim.Optimizer:
    """The paper's Adam (β, ε from the job); the fused kernel on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.Adam(
        params, lr=optim_cfg["lr_mul"], betas=tuple(optim_cfg["betas"]), eps=optim_cfg["eps"], fused=fused or None
    )


def train_step(model, batch, opt, sched, params, grad_clip: float, device, amp: bool | None = None) -> torch.Tensor:
    """One optimizer step on ``batch`` = (texts, frames, lengths); returns the detached loss terms
    (len(LOSS_TERMS),) on the device, without a host sync. ``amp``: see :func:`autocast`."""
    texts, frames, lengths = batch
    with autocast(device, amp):
        out = model(texts, frames.to(device, non_blocking=True), lengths)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    opt.step()
    if sched is not None:
        sched.step()
    return torch.stack([out[k].detach().float() for k in LOSS_TERMS])


def warm_text_cache(model, texts: list[str], chunk: int = 256) -> None:
    """Fill the frozen-encoder cache for ``texts`` in one canonical order (sorted, fixed chunks).

    An encoder's output for a text differs in the last bits with the batch it is padded into; filling
    the cache from whatever batches training happens to draw would make a run resumed from a
    checkpoint (cold cache, different batches) drift from the undisturbed run. Filled this way, the
    states of a text are the same in every process, so a resumed run equals the undisturbed one."""
    unique = sorted(set(texts))
    with torch.no_grad():
        for i in range(0, len(unique), chunk):
            model.encode_text(unique[i : i + chunk])


def worker_loop(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. ``config`` keys: job (resolved job dict), data_dir,
    tracking ({uri, run_id} or None). The epoch protocol (resume, history replay, finite check,
    checkpoint → report → MLflow) is :class:`~facelab.runtime.worker.EpochRuntime`'s."""
    import ray.train
    import ray.train.torch

    from facelab.core import checkpoint as ckpt
    from facelab.families.cteg.model import TextStateCache, noam_lambda
    from facelab.families.cteg.selection import CheckpointSelector
    from facelab.families.cteg.servable import build_cteg
    from facelab.runtime.worker import EpochRuntime

    rt = EpochRuntime.start(config)
    job: dict = config["job"]
    optim_cfg, train_cfg = job["optim"], job["train"]
    rank, world, device = rt.rank, rt.world, rt.device

    if job["eval"]["baseline"]:  # a §5.3 baseline row: evaluate it, nothing to train
        metrics = {}
        if rank == 0:
            metrics = run_baseline_eval(job, rt.data_dir)
            if rt.client:
                tracking.log_metrics(rt.client, rt.run_id, metrics, step=0)
                rt.client.set_tag(rt.run_id, "facelab.baseline", job["eval"]["baseline"])
        ray.train.report({**metrics, "epoch": 0})
        return

    # ---- setup -------------------------------------------------------------------------------
    seed_everything(train_cfg["seed"])  # same initial weights on every rank
    train_ds, dev_ds, mean = load_splits(rt.data_dir, job["data"])
    check_eval_data(job, rt.data_dir)  # eval.protocol: listener needs speaker frames: fail now, not after training
    model = build_cteg(job, mean).to(device)
    keep_encoder = bool(job["model"]["finetune_encoder"])
    d_model = job["model"]["d_model"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim_cfg, device)
    noam = noam_lambda(d_model, optim_cfg["warmup"])  # Eq. 10
    # A plain lambda keeps the schedule out of the scheduler's state dict, which must stay
    # loadable with torch.load(weights_only=True).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: noam(s))
    selector = CheckpointSelector.from_job(job, keep_weights=rank == 0)  # train.select
    if rt.resumed is not None:
        ckpt.load_into(model, rt.resumed.path, rt.resumed.weights)
        opt.load_state_dict(rt.resumed.state["optimizer"])
        sched.load_state_dict(rt.resumed.state["scheduler"])
        with ray.train.get_checkpoint().as_directory() as d:
            selector.restore(Path(d), rt.resumed.meta)

    if not keep_encoder:  # frozen encoder: its states are computed once per text (TextStateCache)
        model.text_cache = TextStateCache()
        warm_text_cache(model, [*train_ds.texts, *dev_ds.texts])
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    per_worker = max(1, optim_cfg["batch_size"] // world)
    sampler = BucketBatchSampler(
        [len(s) for s in train_ds.sequences],
        per_worker,
        num_replicas=world,
        rank=rank,
        seed=train_cfg["seed"],
        bucket_batches=train_cfg["bucket_batches"],
    )
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, pin_memory=pin)
    dev_idx = list(range(rank, len(dev_ds), world))  # exact sharding: no duplicated samples
    # validation batches of similar lengths too (the sums do not depend on the order)
    dev_order = sorted(dev_idx, key=lambda i: len(dev_ds.sequences[i]))
    dev_loader = DataLoader(
        torch.utils.data.Subset(dev_ds, dev_order), batch_size=per_worker, collate_fn=collate, pin_memory=pin
    )

    # ---- train -------------------------------------------------------------------------------
    for epoch in range(rt.start_epoch, train_cfg["epochs"]):
        t0 = time.time()
        step_log: list[tuple[int, dict]] = []  # per-step terms (Figure 5), flushed once per epoch
        sampler.set_epoch(epoch)
        # Per-rank, per-epoch stream for the CVAE's sampling noise: resumable and rank-distinct.
        torch.manual_seed(train_cfg["seed"] * 1_000_003 + epoch * 1009 + rank)
        ddp_model.train()
        sums = torch.zeros(len(LOSS_TERMS), device=device)  # summed on the device: no per-step sync
        n_batches = 0
        with rt.phase("train", epoch) as counts:
            counts.update(steps=0, sequences=0, frames=0, padded_frames=0)
            for i, batch in enumerate(loader):
                if train_cfg["max_steps_per_epoch"] and i >= train_cfg["max_steps_per_epoch"]:
                    break
                _texts, frames, lengths = batch
                counts["steps"] += 1
                counts["sequences"] += len(lengths)
                counts["frames"] += int(lengths.sum())
                counts["padded_frames"] += int(frames.shape[0] * frames.shape[1])
                terms = train_step(ddp_model, batch, opt, sched, params, optim_cfg["grad_clip"], device)
                sums += terms
                rt.step += 1
                n_batches += 1
                if rank == 0 and rt.step % train_cfg["log_every_steps"] == 0:
                    step_log.append(
                        (
                            rt.step,
                            {f"step/{k}": v for k, v in zip(LOSS_TERMS, terms.tolist())}
                            | {"step/lr": sched.get_last_lr()[0]},
                        )
                    )
            red = allreduce(sums.tolist() + [n_batches], device)
        train_metrics = {f"train/{k}": red[j] / max(red[-1], 1) for j, k in enumerate(LOSS_TERMS)}

        # ---- validate (teacher-forced loss terms on the dev split) ----------------------------
        ddp_model.eval()
        n_seq = 0
        vsum = torch.zeros(len(LOSS_TERMS), device=device, dtype=torch.float64)
        with rt.phase("validate", epoch), torch.no_grad():
            for j, (texts, frames, lengths) in enumerate(dev_loader):
                if train_cfg["max_val_batches"] and j >= train_cfg["max_val_batches"]:
                    break
                with autocast(device):
                    out = model(texts, frames.to(device, non_blocking=True), lengths)
                vsum += torch.stack([out[k].double() for k in LOSS_TERMS]) * len(texts)
                n_seq += len(texts)
            nll_sum, n_items = val_cppl_terms(model, dev_ds, dev_idx, job, per_worker, epoch)
            vs = dict(zip(LOSS_TERMS, vsum.tolist()))
            red = allreduce([vs[k] for k in vs] + [nll_sum, n_items, n_seq], device)
        val_metrics = {f"val/{k}": red[j] / max(red[-1], 1) for j, k in enumerate(vs)}
        val_metrics["val/cppl"] = math.exp(red[len(vs)] / max(red[len(vs) + 1], 1))  # Eq. 18 over the dev split
        selector.update(epoch, val_metrics, model)  # train.select: is this epoch the selection now?

        # ---- last epoch: the selected weights, then the test-split evaluation (Appendix D), rank 0
        test_metrics: dict[str, float] = {}
        last = epoch == train_cfg["epochs"] - 1
        if last and rank == 0:
            selector.apply(model)  # the final checkpoint and the test metrics are the selected epoch's
            if rt.client:
                for k, v in selector.tags().items():
                    rt.client.set_tag(rt.run_id, k, v)
        if last and job["eval"]["enabled"] and rank == 0:
            with rt.phase("test", epoch):
                test_metrics = run_test_eval(model, job, rt.data_dir, device, rt.client, rt.run_id)

        metrics = {
            **train_metrics,
            **val_metrics,
            **test_metrics,
            **selector.metrics(),
            "lr": sched.get_last_lr()[0],
            "epoch_time_s": time.time() - t0,
        }

        def save(d: Path, meta: dict) -> None:
            ckpt.save(
                d,
                model,
                job,
                keep_encoder=keep_encoder,
                meta=meta,
                train_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
            )
            selector.save(d)

        rt.end_epoch(epoch, metrics, save, step_log=step_log, meta=selector.meta())
