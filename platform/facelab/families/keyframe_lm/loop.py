"""The KeyframeFace per-worker training loop (Ray Train): setup → (resume) → train/validate → test → checkpoint.

KeyframeFace §5.2: a causal LM is fine-tuned with LoRA (r = 8, α = 32, every linear layer of the
attention and MLP blocks) to answer one request per keyframe (Algorithm 1) with that keyframe's 61
ARKit values; the loss is the next-token cross-entropy on the answer tokens only. Plain PyTorch
plus ``ray.train.report``: DDP through ``ray.train.torch.prepare_model``, a DistributedSampler over
the (request, answer) examples, validation sums all-reduced so every rank reports the same numbers;
rank 0 alone writes checkpoints and the MLflow record, and runs the test-split generation and the
metrics of §5.3 after the last epoch.

``train.finetune: false`` evaluates the base model as is (the tables' "Base" rows);
``eval.baseline: gt`` scores the ground truth against another sample of ground truth (the "GT" row:
``eval.gt_reference``, by default the val split, so FID and W-Dist are > 0 as in Table 3).

A training step (:func:`train_step`) runs its batch one example at a time, unpadded, accumulating
gradients: no padding tokens are computed, attention takes the causal fast path (no mask), and the
LM head runs only at the positions that predict an answer token (``logits_to_keep``), so the
full-vocabulary logits of the ~2k request tokens are never formed. The loss is the batch's summed
answer-token cross-entropy over its number of answer tokens -- exactly the mean that the padded
batch's ``model(..., labels=...).loss`` gives. On CUDA, AdamW is the fused kernel.
"""

from __future__ import annotations

import contextlib
import math
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


class ExampleDataset(Dataset):
    """Tokenised (request, answer) examples: one per keyframe of every script (Algorithm 1)."""

    def __init__(self, examples: list[tuple[list[int], list[int]]]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i]


def prompt_config(job: dict):
    from facelab.families.keyframe_lm.prompts import PromptConfig

    p = job["prompt"]
    return PromptConfig(
        format=p["format"],
        annotation=job["data"]["annotation"],
        glossary=p["glossary"],
        target_frame_instruction=p["target_frame_instruction"],
    )


def build_examples(tokenizer, scripts, job: dict, split: str) -> ExampleDataset:
    """Every keyframe of every script as one training example; over-long ones are refused by name."""
    from facelab.families.keyframe_lm.data import encode_example
    from facelab.families.keyframe_lm.prompts import answer_text, build_messages

    cfg, limit = prompt_config(job), job["prompt"]["max_tokens"]
    out = []
    for s in scripts:
        for kf in s.keyframes:
            ids, labels = encode_example(
                tokenizer, build_messages(s, kf.index, cfg), answer_text(kf.values, kf.index, cfg)
            )
            if len(ids) > limit:
                raise ValueError(
                    f"{split} script {s.script_id!r} keyframe {kf.index}: {len(ids)} tokens exceed "
                    f"prompt.max_tokens={limit}"
                )
            out.append((list(ids), list(labels)))
    return ExampleDataset(out)


def answer_nll(model, batch: dict, device) -> tuple[float, int]:
    """Sum of answer-token cross-entropies and the number of answer tokens (teacher-forced)."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    return float(nll), int((labels[:, 1:] != -100).sum())


def answer_targets(labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, targets): the positions whose next token is an answer token, and those tokens."""
    from facelab.families.keyframe_lm.data import IGNORE_INDEX

    lab = torch.as_tensor(list(labels), dtype=torch.long)
    pos = (lab[1:] != IGNORE_INDEX).nonzero().flatten()
    return pos, lab[1:][pos]


def make_optimizer(params, optim_cfg: dict, device) -> torch.optim.Optimizer:
    """AdamW (lr, weight decay from the job); the fused kernel on CUDA."""
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=optim_cfg["lr"], weight_decay=optim_cfg["weight_decay"], fused=fused or None)


def train_step(model, examples, opt, sched, params, grad_clip: float, device) -> torch.Tensor:
    """One optimizer step on ``examples`` [(input_ids, labels), ...] (see the module docstring).
    Returns the batch's mean answer-token loss, detached, on the device (no host sync)."""
    targets = [answer_targets(lab) for _, lab in examples]
    n_answer = max(1, sum(len(t) for _, t in targets))
    opt.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    sync_ctx = getattr(model, "no_sync", None)
    for i, ((ids, _lab), (pos, tgt)) in enumerate(zip(examples, targets)):
        last = i == len(examples) - 1
        ctx = sync_ctx() if sync_ctx is not None and not last else contextlib.nullcontext()
        with ctx:
            ids_t = torch.as_tensor(list(ids), dtype=torch.long)[None]
            pin = torch.device(device).type == "cuda"
            ids_t, pos, tgt = ((t.pin_memory() if pin else t).to(device, non_blocking=True) for t in (ids_t, pos, tgt))
            logits = model(input_ids=ids_t, logits_to_keep=pos).logits[0]  # (n_answer_i, V)
            loss = torch.nn.functional.cross_entropy(logits.float(), tgt, reduction="sum") / n_answer
            loss.backward()
        total += loss.detach()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    opt.step()
    if sched is not None:
        sched.step()
    return total


# ------------------------------------------------------------------------------------------------
# Test-split evaluation (§5.3)
# ------------------------------------------------------------------------------------------------


def evaluate_split(model, tokenizer, scripts, job: dict, evaluator, device) -> tuple[dict, dict]:
    """Generate every test keyframe (recursive, one request per keyframe) and score it.

    Each answer is scored as :func:`~.parsing.score_answer` reads it with ``eval.parse``: the values
    as the model wrote them, never clipped (plain decoding can write ``1.7``; constrained decoding
    cannot), and with ``release`` an unreadable answer is dropped -- its keyframe leaves every metric
    (prediction and ground truth) and ``test/validity`` is the scored fraction; ``test/n_scored``
    counts the scored keyframes. Returns (metrics, extras) where extras holds the arrays the plots
    need (the scored rows)."""
    from facelab.data.keyframeface import keyframe_text
    from facelab.families.keyframe_lm.generate import generate_keyframes
    from facelab.families.keyframe_lm.parsing import score_answer
    from facelab.tasks.keyframes.metrics import evaluate_keyframes, per_channel_errors, validity_rate

    e = job["eval"]
    cfg = prompt_config(job)
    gt = np.stack([kf.values for s in scripts for kf in s.keyframes]).astype(np.float32)  # (N, 61)
    texts = [keyframe_text(s, kf.index) for s in scripts for kf in s.keyframes]
    t0 = time.time()
    model.eval()
    with torch.no_grad():
        results = generate_keyframes(
            model,
            tokenizer,
            scripts,
            cfg,
            mode=e["decode"],
            max_new_tokens=e["max_new_tokens"],
            batch_size=e["batch_size"],
        )
    gen_time = time.time() - t0
    scored = [score_answer(r.text, cfg, e["parse"]) for per_script in results for r in per_script]
    keep = [i for i, (values, _valid) in enumerate(scored) if values is not None]
    valid = sum(bool(v) for _values, v in scored)
    out = {"test/n_scored": float(len(keep)), "test/validity": validity_rate(valid, len(gt))}
    out["test/gen_time_s"] = gen_time
    out["test/keyframes_per_s"] = len(gt) / max(gen_time, 1e-9)
    if not keep:  # nothing readable: only the validity (0) and the speed can be reported
        return out, None
    pred = np.stack([scored[i][0] for i in keep]).astype(np.float32)  # (n, 61), unclipped
    gt, texts = gt[keep], [texts[i] for i in keep]
    metrics = evaluate_keyframes(
        pred,
        gt,
        texts,
        evaluator,
        n_valid=valid,
        n_total=len(scored),
        seed=job["train"]["seed"],
        r_batch=e["r_precision_batch"],
        diversity_pairs=e["diversity_pairs"],
        diversity_space=e["diversity_space"],
    )
    out.update({f"test/{k}": float(v) for k, v in metrics.items()})
    per_channel = per_channel_errors(pred, gt)
    return out, {"pred": pred, "gt": gt, "texts": texts, "per_channel": per_channel}


def gt_reference_values(test_scripts, val_scripts, job: dict) -> tuple[np.ndarray, list, np.ndarray]:
    """The GT row's two samples of real keyframes, ``(gt (N, 61), the scripts gt comes from, reference
    (M, 61))``, by ``eval.gt_reference``: ``val`` -- the test keyframes and the val split's (disjoint
    scripts); ``halves`` -- the test scripts shuffled (``train.seed``) and cut in two halves, the first
    half against the second; ``self`` -- the test keyframes against themselves."""
    mode = job["eval"]["gt_reference"]

    def stack(scripts) -> np.ndarray:
        return np.stack([kf.values for s in scripts for kf in s.keyframes]).astype(np.float32)

    if mode == "val":
        if not val_scripts:
            raise ValueError("eval.gt_reference=val needs a non-empty val split")
        return stack(test_scripts), list(test_scripts), stack(val_scripts)
    if mode == "halves":
        if len(test_scripts) < 2:
            raise ValueError("eval.gt_reference=halves needs at least 2 test scripts")
        order = np.random.default_rng(job["train"]["seed"]).permutation(len(test_scripts))
        half = len(order) // 2
        first = [test_scripts[i] for i in sorted(order[:half])]
        second = [test_scripts[i] for i in sorted(order[half:])]
        return stack(first), first, stack(second)
    return stack(test_scripts), list(test_scripts), stack(test_scripts)


def evaluate_gt_row(test_scripts, val_scripts, job: dict, evaluator) -> dict[str, float]:
    """The tables' GT row (``eval.baseline: gt``): ground truth scored against another sample of ground
    truth (:func:`gt_reference_values`, :func:`~facelab.tasks.keyframes.metrics.evaluate_reference`),
    or, with ``eval.gt_reference: self``, against itself (every error 0, as scoring ``pred = gt``)."""
    from facelab.data.keyframeface import keyframe_text
    from facelab.tasks.keyframes.metrics import evaluate_keyframes, evaluate_reference

    e = job["eval"]
    gt, scripts, reference = gt_reference_values(test_scripts, val_scripts, job)
    texts = [keyframe_text(s, kf.index) for s in scripts for kf in s.keyframes]
    common = dict(
        seed=job["train"]["seed"],
        r_batch=e["r_precision_batch"],
        diversity_pairs=e["diversity_pairs"],
        diversity_space=e["diversity_space"],
    )
    if e["gt_reference"] == "self":
        metrics = evaluate_keyframes(gt.copy(), gt, texts, evaluator, n_valid=len(gt), n_total=len(gt), **common)
    else:
        metrics = evaluate_reference(gt, reference, texts, evaluator, **common)
    out = {f"test/{k}": float(v) for k, v in metrics.items()}
    out["test/n_scored"] = float(len(gt))
    out["test/n_reference"] = float(len(reference))
    return out


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


def worker_loop(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker. ``config`` keys: job, data_dir, root, tracking ({uri, run_id} or None)."""
    import ray.train
    import ray.train.torch

    from facelab.core import checkpoint as ckpt
    from facelab.core import tracking
    from facelab.families.keyframe_lm.data import collate
    from facelab.families.keyframe_lm.servable import build_keyframe_lm, keyframe_lm_state, load_keyframe_lm_state
    from facelab.runtime.worker import EpochRuntime

    rt = EpochRuntime.start(config)  # context, resume, history replay (facelab.runtime.worker)
    job: dict = config["job"]
    optim_cfg, train_cfg, eval_cfg = job["optim"], job["train"], job["eval"]
    rank, world, device = rt.rank, rt.world, rt.device
    data_dir, root = rt.data_dir, Path(config.get("root") or ".")
    tr = config.get("tracking") or {}
    client, run_id = rt.client, rt.run_id

    seed_everything(train_cfg["seed"])
    train_scripts, val_scripts, test_scripts = load_scripts(data_dir, job)

    if eval_cfg["baseline"] == "gt":  # the GT row: nothing to train or generate
        metrics: dict[str, float] = {}
        if rank == 0:
            evaluator = load_registered(tr.get("uri"), eval_cfg["evaluator"], device)
            metrics = evaluate_gt_row(test_scripts, val_scripts, job, evaluator)
            if client:
                tracking.log_metrics(client, run_id, metrics, step=0)
                client.set_tag(run_id, "facelab.baseline", "gt")
                client.set_tag(run_id, "facelab.gt_reference", eval_cfg["gt_reference"])
        ray.train.report({**metrics, "epoch": 0})
        return

    # ---- setup -------------------------------------------------------------------------------
    model, tokenizer, info = build_keyframe_lm(job, root, device, trainable=train_cfg["finetune"])
    if client:
        client.set_tag(run_id, "facelab.base_model", info["base_model"])
        if info.get("label"):
            client.set_tag(run_id, "facelab.base_model_label", info["label"])
        client.log_metric(run_id, "model/trainable_params", info["trainable_params"])
    pad_id = tokenizer.pad_token_id
    train_ds = build_examples(tokenizer, train_scripts, job, "train")
    val_ds = build_examples(tokenizer, val_scripts, job, "val")
    params = [p for p in model.parameters() if p.requires_grad]
    per_worker = max(1, optim_cfg["batch_size"] // world)
    steps_per_epoch = len(train_ds) // (per_worker * world)
    if train_cfg["max_steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, train_cfg["max_steps_per_epoch"])
    epochs = train_cfg["epochs"] if train_cfg["finetune"] else 1
    total = max(1, steps_per_epoch * epochs)
    warmup = int(optim_cfg["warmup_ratio"] * total)

    def lr_lambda(step: int) -> float:  # linear warmup, then cosine decay to 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    opt = sched = None
    if train_cfg["finetune"]:
        opt = make_optimizer(params, optim_cfg, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)

    if rt.resumed is not None and train_cfg["finetune"]:
        load_keyframe_lm_state(model, rt.resumed.weights, job, str(rt.resumed.path))
        opt.load_state_dict(rt.resumed.state["optimizer"])
        sched.load_state_dict(rt.resumed.state["scheduler"])
    elif not train_cfg["finetune"]:  # a Base row has nothing to resume: it is evaluated again
        rt.start_epoch, rt.step, rt.history = 0, 0, []

    ddp_model = (
        ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        if train_cfg["finetune"] and world > 1
        else model
    )
    sampler = DistributedSampler(
        train_ds, num_replicas=world, rank=rank, shuffle=True, seed=train_cfg["seed"], drop_last=True
    )
    loader = DataLoader(train_ds, batch_size=per_worker, sampler=sampler, drop_last=True, collate_fn=list)
    val_idx = list(range(rank, len(val_ds), world))
    val_loader = DataLoader(
        torch.utils.data.Subset(val_ds, val_idx), batch_size=per_worker, collate_fn=lambda b: collate(b, pad_id)
    )

    for epoch in range(rt.start_epoch, epochs):
        t0 = time.time()
        step_log: list[tuple[int, dict]] = []
        train_metrics: dict[str, float] = {}
        if train_cfg["finetune"]:
            sampler.set_epoch(epoch)
            ddp_model.train()
            loss_sum, n = torch.zeros((), device=device), 0
            for i, examples in enumerate(loader):
                if i >= steps_per_epoch:
                    break
                loss = train_step(ddp_model, examples, opt, sched, params, optim_cfg["grad_clip"], device)
                rt.step += 1
                n += 1
                loss_sum += loss
                if rank == 0 and rt.step % train_cfg["log_every_steps"] == 0:
                    step_log.append((rt.step, {"step/loss": float(loss), "step/lr": sched.get_last_lr()[0]}))
            red = allreduce([float(loss_sum), n], device)
            train_metrics = {"train/loss": red[0] / max(red[1], 1)}

        # ---- validate: answer-token cross-entropy on the val split -----------------------------
        model.eval()
        nll, tokens = 0.0, 0
        with torch.no_grad():
            for j, batch in enumerate(val_loader):
                if train_cfg["max_val_batches"] and j >= train_cfg["max_val_batches"]:
                    break
                a, b = answer_nll(model, batch, device)
                nll, tokens = nll + a, tokens + b
        red = allreduce([nll, tokens], device)
        val_metrics = {"val/loss": red[0] / max(red[1], 1)}

        test_metrics: dict[str, float] = {}
        extras = None
        if epoch == epochs - 1 and eval_cfg["enabled"] and rank == 0:
            evaluator = load_registered(tr.get("uri"), eval_cfg["evaluator"], device)
            test_metrics, extras = evaluate_split(model, tokenizer, test_scripts, job, evaluator, device)

        metrics = {**train_metrics, **val_metrics, **test_metrics, "epoch_time_s": time.time() - t0}
        if sched is not None:
            metrics["lr"] = sched.get_last_lr()[0]

        def save(d: Path, meta: dict) -> None:
            ckpt.save_tensors(
                d,
                keyframe_lm_state(model, job),
                job,
                meta=meta,
                train_state={"optimizer": opt.state_dict(), "scheduler": sched.state_dict()} if opt else None,
            )

        rt.end_epoch(epoch, metrics, save, step_log=step_log)
        if client and extras is not None:
            log_eval_artifacts(client, run_id, extras)
    if world > 1 and dist.is_initialized():
        dist.barrier()
