"""The CTEG per-worker training loop (Ray Train): setup → (resume) → train/validate → checkpoint.

Plain PyTorch plus ``ray.train.report``. Every rank trains on its shard (:class:`BucketBatchSampler`,
DDP through ``ray.train.torch.prepare_model``); validation sums are all-reduced so every rank sees
the same metrics; rank 0 alone writes checkpoints and logs to MLflow, so a DDP trial is one MLflow run.

Speed (the same maths on every device):

* batches are *length-bucketed* (:class:`BucketBatchSampler`): sequences of similar length train
  together and a batch is padded to its own longest, so almost no frame is padding (EmoAva's
  lengths are log-normal, mean ~52 frames; a random batch of 256 is nearly always padded to the
  256-frame cap);
* on CUDA the forward/backward runs under bf16 autocast (:func:`autocast`; the Gaussian terms of
  the CVAD stay float32) and Adam is the fused kernel (:func:`make_optimizer`);
* the loss terms are summed on the device: the loop syncs with the host only at logging steps and
  at the end of the epoch;
* a frozen text encoder runs once per distinct text (:class:`~facelab.models.cteg.model.TextStateCache`):
  from the second epoch on, a step's text side is one gather instead of a tokenizer call and a BERT pass.
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

LOSS_TERMS = ("loss", "mse", "kl", "lg")


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

    def __init__(self, lengths: Sequence[int], batch_size: int, *, num_replicas: int = 1, rank: int = 0,
                 seed: int = 0, bucket_batches: int = 32, shuffle: bool = True):
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas or bucket_batches < 1:
            raise ValueError("BucketBatchSampler: batch_size, num_replicas, bucket_batches >= 1 and 0 <= rank < num_replicas")
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
            chunk = order[start:start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + glob] for i in range(0, len(chunk), glob)]
        if self.shuffle:
            batches = [batches[i] for i in g.permutation(len(batches))]
        for gb in batches:
            yield gb[self.rank * self.batch_size:(self.rank + 1) * self.batch_size].tolist()


def autocast(device, enabled: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing elsewhere (the CPU path stays float32). ``enabled=False``
    turns it off (benchmarks' float32 rows)."""
    if torch.device(device).type == "cuda" and enabled is not False:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def make_optimizer(params, optim_cfg: dict, device) -> torch.optim.Optimizer:
    """The paper's Adam (β, ε from the job); the fused kernel on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.Adam(params, lr=optim_cfg["lr_mul"], betas=tuple(optim_cfg["betas"]), eps=optim_cfg["eps"],
                            fused=fused or None)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_splits(data_dir: Path, data_cfg: dict):
    from facelab.data import emoava

    train = emoava.load_split(data_dir, "train")
    dev = emoava.load_split(data_dir, "dev")
    mean, _std = emoava.load_stats(data_dir)
    n_tr, n_dev = data_cfg.get("train_subset"), data_cfg.get("dev_subset")
    train_ds = PairDataset(train.texts[:n_tr], train.sequences[:n_tr], data_cfg["max_frames"])
    dev_ds = PairDataset(dev.texts[:n_dev], dev.sequences[:n_dev], data_cfg["max_frames"])
    return train_ds, dev_ds, mean


def eval_config(job: dict):
    from facelab.metrics.cteg_eval import EvalConfig

    e = job["eval"]
    return EvalConfig(n_diversity=e["n_diversity"], n_mmodality=e["n_mmodality"], n_bootstrap=e["n_bootstrap"],
                      max_frames=e["max_frames"], batch_size=e["batch_size"], seed=job["train"]["seed"],
                      delta=e["delta"], sigma=e["sigma"], max_texts=e["max_texts"], cppl_region=e["cppl_region"])


def val_cppl_terms(model, dev_ds: PairDataset, idx: list[int], job: dict, batch_size: int, epoch: int) -> tuple[float, int]:
    """This rank's sum of per-sequence Cppl cross-entropies (Eq. 18's inner mean) and their count."""
    from facelab.metrics.cteg_eval import model_cppl_inputs
    from facelab.metrics.expression import cppl_per_item

    n_max = job["train"]["max_val_batches"]
    idx = idx[: n_max * batch_size] if n_max else idx
    if not idx:
        return 0.0, 0
    cfg = eval_config(job)
    texts = [dev_ds.texts[i] for i in idx]
    seqs = [np.asarray(dev_ds.raw[i], dtype=np.float32) for i in idx]  # uncut: a cut sequence has no terminator step
    gen = torch.Generator(device=model.mean_expression.device).manual_seed(job["train"]["seed"] + epoch)
    means, targets = model_cppl_inputs(model, texts, seqs, cfg, model.cfg.max_frames, gen)
    nll = cppl_per_item(means, targets, cfg.delta, cfg.sigma, region=cfg.cppl_region, floor=cfg.cppl_floor)
    return float(nll.sum()), len(nll)


def _flatten_eval(results: dict[str, tuple[float, float]]) -> dict[str, float]:
    out = {}
    for name, (value, se) in results.items():
        out[f"test/{name}"] = value
        out[f"test/{name}_se"] = se
    return out


def run_test_eval(model, job: dict, data_dir: Path, device, client, run_id) -> dict[str, float]:
    """The six metrics on the test split (+ a trajectories plot logged to the run)."""
    from facelab.data import emoava
    from facelab.metrics.cteg_eval import evaluate_model

    test = emoava.load_split(data_dir, "test")
    cfg = eval_config(job)
    t0 = time.time()
    metrics = _flatten_eval(evaluate_model(model, test, cfg, device=device))
    metrics["test/eval_time_s"] = time.time() - t0
    if client:
        log_trajectories(model, test, job, client, run_id)
    return metrics


def log_trajectories(model, test, job: dict, client, run_id: str, n: int = 3) -> None:
    from facelab.plots import trajectories

    gen = torch.Generator(device=model.mean_expression.device).manual_seed(job["train"]["seed"])
    texts = test.texts[:n]
    out = model.generate(texts, max_frames=min(job["eval"]["max_frames"], model.cfg.max_frames), generator=gen)
    with tempfile.TemporaryDirectory() as d:
        png = trajectories(texts, [o.float().cpu().numpy() for o in out], test.sequences[:n],
                           Path(d) / "trajectories.png")
        client.log_artifact(run_id, str(png), "plots")


def run_baseline_eval(job: dict, data_dir: Path) -> dict[str, float]:
    from facelab.data import emoava
    from facelab.metrics.cteg_eval import evaluate_baseline

    test = emoava.load_split(data_dir, "test")
    train = emoava.load_split(data_dir, "train")
    return _flatten_eval(evaluate_baseline(job["eval"]["baseline"], test, train, eval_config(job)))


def _allreduce(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def worker_nodes() -> list[str]:
    """The Ray node id of every rank, ordered by rank (where a DDP trial's workers ran)."""
    import ray

    own = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    nodes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, own)
    return nodes


def warm_text_cache(model, texts: list[str], chunk: int = 256) -> None:
    """Fill the frozen-encoder cache for ``texts`` in one canonical order (sorted, fixed chunks).

    An encoder's output for a text differs in the last bits with the batch it is padded into; filling
    the cache from whatever batches training happens to draw would make a run resumed from a
    checkpoint (cold cache, different batches) drift from the undisturbed run. Filled this way, the
    states of a text are the same in every process, so a resumed run equals the undisturbed one."""
    unique = sorted(set(texts))
    with torch.no_grad():
        for i in range(0, len(unique), chunk):
            model.encode_text(unique[i:i + chunk])


def worker_loop(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. ``config`` keys: job (resolved job dict), data_dir,
    tracking ({uri, run_id} or None), trial (tags for the record)."""
    import ray.train
    import ray.train.torch

    from facelab import tracking
    from facelab.models.cteg.model import TextStateCache, noam_lambda
    from facelab.models.loading import build_cteg
    from facelab.train import checkpoint as ckpt

    job: dict = config["job"]
    optim_cfg, train_cfg = job["optim"], job["train"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    if job["eval"]["baseline"]:  # a §5.3 baseline row: evaluate it, nothing to train
        metrics = {}
        if rank == 0:
            client = tracking.client(config["tracking"]["uri"]) if config.get("tracking") else None
            metrics = run_baseline_eval(job, Path(config["data_dir"]))
            if client:
                tracking.log_metrics(client, config["tracking"]["run_id"], metrics, step=0)
                client.set_tag(config["tracking"]["run_id"], "facelab.baseline", job["eval"]["baseline"])
        ray.train.report({**metrics, "epoch": 0})
        return

    # ---- setup -------------------------------------------------------------------------------
    seed_everything(train_cfg["seed"])             # same initial weights on every rank
    train_ds, dev_ds, mean = load_splits(Path(config["data_dir"]), job["data"])
    model = build_cteg(job, mean).to(device)
    keep_encoder = bool(job["model"]["finetune_encoder"])
    d_model = job["model"]["d_model"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim_cfg, device)
    noam = noam_lambda(d_model, optim_cfg["warmup"])  # Eq. 10
    # A plain lambda keeps the schedule out of the scheduler's state dict, which must stay
    # loadable with torch.load(weights_only=True).
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: noam(s))

    start_epoch, step, history = 0, 0, []
    resume = ray.train.get_checkpoint()
    if resume is not None:
        weights, state, meta = ckpt.load_resume(resume)
        ckpt.load_into(model, Path(resume.path), weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step, history = meta["epoch"] + 1, meta["step"], meta.get("history", [])

    if not keep_encoder:  # frozen encoder: its states are computed once per text (TextStateCache)
        model.text_cache = TextStateCache()
        warm_text_cache(model, [*train_ds.texts, *dev_ds.texts])
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
    per_worker = max(1, optim_cfg["batch_size"] // world)
    sampler = BucketBatchSampler([len(s) for s in train_ds.sequences], per_worker, num_replicas=world, rank=rank,
                                 seed=train_cfg["seed"], bucket_batches=int(train_cfg.get("bucket_batches", 32)))
    pin = torch.device(device).type == "cuda"
    loader = DataLoader(train_ds, batch_sampler=sampler, collate_fn=collate, pin_memory=pin)
    dev_idx = list(range(rank, len(dev_ds), world))  # exact sharding: no duplicated samples
    # validation batches of similar lengths too (the sums do not depend on the order)
    dev_order = sorted(dev_idx, key=lambda i: len(dev_ds.sequences[i]))
    dev_loader = DataLoader(torch.utils.data.Subset(dev_ds, dev_order), batch_size=per_worker, collate_fn=collate,
                            pin_memory=pin)

    client = tracking.client(config["tracking"]["uri"]) if rank == 0 and config.get("tracking") else None
    run_id = config["tracking"]["run_id"] if client else None
    if client and history:  # resumed: make sure every finished epoch is on record exactly once
        tracking.log_missing_history(client, run_id, history)
    nodes = worker_nodes()  # collective: every rank takes part
    if client:
        client.set_tag(run_id, "facelab.worker_nodes", json.dumps(nodes))

    # ---- train -------------------------------------------------------------------------------
    for epoch in range(start_epoch, train_cfg["epochs"]):
        t0 = time.time()
        step_log: list[tuple[int, dict]] = []   # per-step terms (Figure 5), flushed once per epoch
        sampler.set_epoch(epoch)
        # Per-rank, per-epoch stream for the CVAE's sampling noise: resumable and rank-distinct.
        torch.manual_seed(train_cfg["seed"] * 1_000_003 + epoch * 1009 + rank)
        ddp_model.train()
        sums = torch.zeros(len(LOSS_TERMS), device=device)  # summed on the device: no per-step sync
        n_batches = 0
        for i, batch in enumerate(loader):
            if train_cfg["max_steps_per_epoch"] and i >= train_cfg["max_steps_per_epoch"]:
                break
            terms = train_step(ddp_model, batch, opt, sched, params, optim_cfg["grad_clip"], device)
            sums += terms
            step += 1
            n_batches += 1
            if rank == 0 and step % train_cfg["log_every_steps"] == 0:
                step_log.append((step, {f"step/{k}": v for k, v in zip(LOSS_TERMS, terms.tolist())}
                                 | {"step/lr": sched.get_last_lr()[0]}))
        red = _allreduce(sums.tolist() + [n_batches], device)
        train_metrics = {f"train/{k}": red[j] / max(red[-1], 1) for j, k in enumerate(LOSS_TERMS)}

        # ---- validate (teacher-forced loss terms on the dev split) ----------------------------
        ddp_model.eval()
        n_seq = 0
        vsum = torch.zeros(len(LOSS_TERMS), device=device, dtype=torch.float64)
        with torch.no_grad():
            for j, (texts, frames, lengths) in enumerate(dev_loader):
                if train_cfg["max_val_batches"] and j >= train_cfg["max_val_batches"]:
                    break
                with autocast(device):
                    out = model(texts, frames.to(device, non_blocking=True), lengths)
                vsum += torch.stack([out[k].double() for k in LOSS_TERMS]) * len(texts)
                n_seq += len(texts)
            nll_sum, n_items = val_cppl_terms(model, dev_ds, dev_idx, job, per_worker, epoch)
        vs = dict(zip(LOSS_TERMS, vsum.tolist()))
        red = _allreduce([vs[k] for k in vs] + [nll_sum, n_items, n_seq], device)
        val_metrics = {f"val/{k}": red[j] / max(red[-1], 1) for j, k in enumerate(vs)}
        val_metrics["val/cppl"] = math.exp(red[len(vs)] / max(red[len(vs) + 1], 1))  # Eq. 18 over the dev split

        # ---- test-split evaluation after the last epoch (Appendix D), rank 0 --------------------
        test_metrics: dict[str, float] = {}
        if epoch == train_cfg["epochs"] - 1 and job["eval"]["enabled"] and rank == 0:
            test_metrics = run_test_eval(model, job, Path(config["data_dir"]), device, client, run_id)

        metrics = {**train_metrics, **val_metrics, **test_metrics, "epoch": epoch, "step": step,
                   "lr": sched.get_last_lr()[0], "epoch_time_s": time.time() - t0}
        history.append({k: v for k, v in metrics.items()})
        if not all(math.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite metrics at epoch {epoch}: {metrics}")

        # ---- checkpoint + report, then the MLflow record --------------------------------------
        # The checkpoint (with the metrics history) lands first; if the process dies before the
        # MLflow write, the resumed run re-logs the missing epochs from that history.
        if rank == 0:
            with tempfile.TemporaryDirectory() as d:
                ckpt.save(Path(d), model, job, keep_encoder=keep_encoder,
                          train_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()},
                          meta={"epoch": epoch, "step": step, "history": history,
                                "mlflow_run_id": run_id})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
            if client:
                tracking.log_metrics(client, run_id, metrics, step=epoch)
                tracking.log_metric_steps(client, run_id, step_log)
        else:
            ray.train.report(metrics)
