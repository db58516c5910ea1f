"""CTEG on one GPU, side by side with the reference implementation (WalkerMitty/EmoAva ``src/``).

Both models are built in this process with the paper's configuration (the flags of the reference's
``train.sh`` / ``infer.sh``): a frozen BERT-base text encoder, d_model 768, 12 heads, FFN 2048, one
CVAD layer, EwA, LTA attention, the one-step (target-guided) loss, σ_out = 1. Weights are random
(no model hub here): the encoder is a random-init ``BertModel`` of bert-base shape, saved to a
temporary directory so that facelab loads it as a local encoder; the reference gets the same
``BertModel`` object. The tokenizer is a ``BertTokenizer(Fast)`` over ``--vocab`` (any BERT
``vocab.txt``).

The reference code is never copied: ``--reference DIR`` points at a checkout (its ``src/`` is put
on ``sys.path`` and its modules imported). Run-time adaptations, all outside its files:
``dill`` (imported by its ``train.py``, used only for checkpoints) is aliased to ``pickle`` when it
is not installed; its ``BertModel.from_pretrained`` / ``BertTokenizer.from_pretrained`` calls are
not used (the objects are passed in).

Measured, in one run:

1. training throughput: the reference's own ``train_epoch`` over batches built by its own
   ``TranslationDataset``/``collate_fn`` (padded to 128 text tokens and 256 frames; built before the
   clock starts, so its tokenizer time is *not* counted), anomaly detection on (as shipped: its
   ``train.py`` turns it on at import) and off; facelab's ``train_step`` over a full epoch of the
   ``BucketBatchSampler`` (the default path of ``facelab.families.cteg.loop``), plus ablation rows.
   Sequences: ``--n-train`` (12,000) with EmoAva's length model (``facelab.data.synth``: log-normal,
   mean ~52 frames, ~1.2 % over 256, longer texts -> longer sequences), cut to 256 frames; texts
   from ``--texts`` (the release's ``test_stage1_text.pkl``) cycled. MFU counts the useful FLOPs
   (real frames and text tokens only; see ``train_flops``) against ``--peak-tflops``.
2. decoding of 256 frames at batch 1 and 64: the reference's ``TranslatorContinue.serial_inference``
   (whole prefix re-run each step, a tokenizer call per step) against facelab's ``CTEG.generate``
   (on CUDA: static KV cache, the step compiled by TorchInductor, 16 steps per CUDA graph, the captured
   decoder kept across calls; the first call of a shape, which compiles and captures, is timed apart),
   with the stop threshold at 0 so every sequence runs the full length; facelab's output checked against
   its own full recomputation (``use_cache=False``) with the same noise; on CUDA the per-step time (graph
   replays timed alone with events), the encoder's time, the same graph without compiling the step, and
   with ``--compile-modes`` other ``torch.compile`` modes. ``--skip-train`` measures decoding only.

    python bench/bench_cteg_gpu.py --reference /path/to/EmoAva --vocab /path/to/vocab.txt \\
        --texts /path/to/test_stage1_text.pkl --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pickle
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def synth_lengths(texts: list[str], seed: int) -> np.ndarray:
    """EmoAva's length model (facelab.data.synth): log-normal, longer sentences -> longer sequences;
    the word count is normalised so that E[sqrt(words/c)] = 1: the mean length stays the release's ~52."""
    from facelab.data import synth

    rng = np.random.default_rng(seed)
    words = np.array([max(1, len(t.split())) for t in texts], dtype=np.float64)
    log_len = (
        np.log(synth._LEN_MEDIAN)
        + synth._LEN_WORD_EXP * np.log(words / np.mean(np.sqrt(words)) ** 2)
        + synth._LEN_SIGMA * rng.standard_normal(len(texts))
    )
    return np.clip(np.rint(np.exp(log_len)), synth._LEN_MIN, synth._LEN_MAX).astype(np.int64)


def load_texts(path: str | None, n: int) -> list[str]:
    """``n`` texts, cycled: from ``path`` (a release text pickle, read only through facelab's
    allow-listed EmoAva reader -- a pickle from elsewhere must not run code), else synthetic."""
    if path:
        from facelab.data.emoava import DataError, read_release_texts

        base = read_release_texts(Path(path))
        if not base:
            raise DataError(f"{path}: no texts in the pickle (--texts)")
    else:
        from facelab.data.synth import _draw_sentence

        rng = np.random.default_rng(0)
        base = [_draw_sentence(rng.random(7))[0] for _ in range(1500)]
    return [base[i % len(base)] for i in range(n)]


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------


def encoder_fwd_flops(L: np.ndarray, enc) -> np.ndarray:
    d, f, n = enc.hidden_size, enc.intermediate_size, enc.num_hidden_layers
    return n * (L * (8 * d * d + 4 * d * f) + 4 * L * L * d)


def decoder_fwd_flops(T: np.ndarray, L: np.ndarray, cfg) -> np.ndarray:
    """Forward FLOPs of facelab's decoder for T frames (S = T+2 positions) and L text tokens.
    Causal attention counts the half it needs."""
    d, f, lat, e = cfg.d_model, cfg.ff_dim, cfg.latent_dim, cfg.ewa_dim
    S = T + 2
    n_face, n_jaw = cfg.expr_dim - cfg.jaw_dim, cfg.jaw_dim
    ewa = (
        (2 * cfg.expr_dim * e + 2 * n_face * e * 2 * e + 2 * n_jaw * e * e * 2 + 4 * n_jaw * n_face * e + 2 * n_jaw * e)
        if cfg.ewa
        else 0
    )
    per_pos = ewa + 2 * cfg.expr_dim * d
    causal_attn = 8 * S * d * d + 2 * S * S * d  # q,k,v,o + half of QK^T and AV
    cross_attn = 4 * S * d * d + 4 * L * d * d + 4 * S * L * d
    total = (
        S * per_pos
        + cfg.cvad_layers
        * (
            causal_attn * (2 if cfg.lta == "attention" else 1)
            + 2 * cross_attn
            + 2 * 2 * (S - 1) * d * 2 * lat  # prior + recognition heads
            + 2 * S * 2 * d * f  # generation FFN
            + (2 * (S - 1) * 2 * d * f if cfg.target_guided else 0)
        )
        + 2 * (S - 1) * d * cfg.expr_dim * (2 if cfg.target_guided else 1)
    )
    return total


def train_flops(T: np.ndarray, L: np.ndarray, cfg, enc) -> float:
    """Useful FLOPs of one training pass: frozen encoder forward + 3 x decoder forward (fwd + bwd)."""
    return float(np.sum(encoder_fwd_flops(L, enc) + 3 * decoder_fwd_flops(T, L, cfg)))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int = 1) -> list[float]:
    out = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def decode_breakdown(model, texts: list[str], n_frames: int, device) -> dict:
    """Per-step and fixed cost of the CUDA decoding path: the cached graph of this shape replayed
    alone (timed with events), and the text encoder alone."""
    from facelab.families.cteg import decoding

    cache = model.__dict__["_graph_decoders"]
    dec = next(
        d
        for k, d in reversed(cache.items())
        if k[0] == len(texts) and k[3] == decoding.COMPILE_MODE and k[4] == decoding.ONE_QUERY_ATTENTION
    )
    n_replays = -(-n_frames // decoding.GRAPH_STEPS)  # one whole decode: the graph's capacity is not exceeded
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = []
    for _ in range(6):
        dec.position.zero_()
        start.record()
        for _ in range(n_replays):
            dec.graph.replay()
        end.record()
        end.synchronize()
        reps.append(start.elapsed_time(end) / n_replays * 1e3)
    replay_us = statistics.median(reps)
    enc = statistics.median(timed(lambda: model.encode_text(texts), device, 7))
    return {
        "replay_us": replay_us,
        "graph_steps": decoding.GRAPH_STEPS,
        "per_step_us": replay_us / decoding.GRAPH_STEPS,
        "encode_ms": enc * 1e3,
        "capacity": dec.cap,
        "text_width": dec.width,
    }


def matmul_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t = statistics.median(timed(lambda: [a @ b for _ in range(10)], device, 3)) / 10
    return 2 * 8192**3 / t / 1e12


def build_encoder_dir(vocab: str, out: Path, small: bool) -> tuple[Path, object]:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    tok = BertTokenizerFast(vocab_file=vocab, do_lower_case=False)
    if small:
        cfg = BertConfig(
            vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
        )
    else:  # bert-base(-cased) shapes
        cfg = BertConfig(
            vocab_size=tok.vocab_size,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            max_position_embeddings=512,
        )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out, cfg


# --------------------------------------------------------------------------------------------
# the reference
# --------------------------------------------------------------------------------------------


def import_reference(ref: Path):
    src = ref / "src" if (ref / "src" / "transformer").is_dir() else ref
    if not (src / "transformer" / "Models.py").is_file():
        raise SystemExit(f"--reference {ref}: no src/transformer/Models.py there")
    sys.path.insert(0, str(src))
    adapted = []
    try:
        import dill  # noqa: F401
    except ImportError:
        sys.modules["dill"] = pickle  # its train.py imports dill only to pickle checkpoints
        adapted.append("dill aliased to pickle")
    import em_dataloader
    from transformer.Models import Transformer
    from transformer.Optim import ScheduledOptim
    from transformer.Translator import TranslatorContinue

    import train as ref_train

    mods = types.SimpleNamespace(
        train=ref_train,
        data=em_dataloader,
        Transformer=Transformer,
        ScheduledOptim=ScheduledOptim,
        Translator=TranslatorContinue,
    )
    return mods, adapted


class _RefEncoder(torch.nn.Module):
    """Run-time adaptation: the reference hands BertModel its (B, 1, L) source mask; transformers
    4.x broadcast that 3-d mask, transformers 5 indexes it as (B, L) and fails. Same maths with the
    (B, L) mask."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert
        self.config = bert.config

    def forward(self, input_ids, attention_mask):
        if attention_mask.dim() == 3:
            attention_mask = attention_mask[:, 0]
        return self.bert(input_ids=input_ids, attention_mask=attention_mask.long())


def build_reference(mods, encoder, d: dict, trg_len: int, src_len: int, device):
    """The reference Transformer with train.sh's flags (cvae, 1 layer, feature attention, scale_emb,
    casual_attention LTA, one-step loss, bert-base encoder fixed, second_sample one). ``encoder`` is
    copied (the reference re-initialises the pretrained encoder's matrices, a quirk kept here)."""
    import copy

    encoder = _RefEncoder(copy.deepcopy(encoder))
    torch.manual_seed(0)
    model = mods.Transformer(
        encoder.config.vocab_size,
        53,
        src_pad_idx=0,
        trg_pad_idx=0,
        trg_emb_prj_weight_sharing=False,
        d_k=d["d_model"] // d["n_heads"],
        d_v=d["d_model"] // d["n_heads"],
        d_model=d["d_model"],
        d_word_vec=d["d_model"],
        d_inner=d["ff_dim"],
        n_layers=1,
        n_head=d["n_heads"],
        dropout=0.1,
        scale_emb=True,
        cvae=True,
        flat_method="casual_attention",
        feature_attention=True,
        encoder_pretrained=encoder,
        one_step_loss=True,
        exp_only_dim=50,
        src_len=src_len,
        trg_len=trg_len,
        fix_encoder=True,
        second_sample="one",
    ).to(device)
    return model


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", required=True, help="checkout of WalkerMitty/EmoAva (its src/ is imported)")
    ap.add_argument("--vocab", required=True, help="a BERT vocab.txt for the tokenizer")
    ap.add_argument("--texts", help="pickled list of texts (the release's test_stage1_text.pkl); default: synthetic")
    ap.add_argument("--mean", help="stage1_mean.npy (default: the reference checkout's dataset/stage1_mean.npy)")
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--ref-steps", type=int, default=5, help="timed reference training steps per setting")
    ap.add_argument("--ablation-steps", type=int, default=8)
    ap.add_argument("--decode-frames", type=int, default=256)
    ap.add_argument("--decode-batches", default="1,64")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200 SXM: 989)")
    ap.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-train", action="store_true", help="decoding only (no training measurements)")
    ap.add_argument(
        "--compile-modes", default="", help="comma-separated torch.compile modes of the decoding step to time as well"
    )
    ap.add_argument(
        "--profile", action="store_true", help="print a profile of 4 training steps and a decoding breakdown"
    )
    ap.add_argument("--json")
    args = ap.parse_args()

    import transformers

    from facelab.families.cteg.loop import BucketBatchSampler, make_optimizer, train_step
    from facelab.families.cteg.model import CTEG, CTEGConfig, TextStateCache, noam_lambda
    from facelab.tasks.expressions.data import PairDataset, collate

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref_dir = Path(args.reference)
    results: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "argv": sys.argv[1:],
    }
    results["matmul_bf16_tflops"] = matmul_tflops(device)
    print(
        f"device {results['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"bf16 8192^3 matmul {results['matmul_bf16_tflops'] or 0:.0f} TFLOP/s",
        flush=True,
    )

    dims = dict(d_model=64, n_heads=4, ff_dim=128) if args.small else dict(d_model=768, n_heads=12, ff_dim=2048)
    trg_len, src_len = (64, 32) if args.small else (256, 128)
    mean_path = Path(args.mean) if args.mean else ref_dir / "dataset" / "stage1_mean.npy"
    mean = np.load(mean_path).astype(np.float32).reshape(53)

    texts = load_texts(args.texts, args.n_train)
    lengths = np.minimum(synth_lengths(texts, seed=0), trg_len)
    rng = np.random.default_rng(1)
    seqs = [(mean + 0.5 * rng.standard_normal((int(t), 53))).astype(np.float32) for t in lengths]
    results["data"] = {
        "n": len(seqs),
        "mean_len": float(lengths.mean()),
        "max_len": int(lengths.max()),
        "frac_at_cap": float((lengths >= trg_len).mean()),
    }
    print(
        f"data: {len(seqs)} sequences, mean {lengths.mean():.1f} frames (cut to {trg_len}), "
        f"{100 * (lengths >= trg_len).mean():.1f}% at the cap",
        flush=True,
    )

    tmp = Path(tempfile.mkdtemp(prefix="cteg_bench_"))
    enc_dir, enc_cfg = build_encoder_dir(args.vocab, tmp / "encoder", args.small)

    cfg = CTEGConfig(
        text_encoder=str(enc_dir),
        max_text_tokens=src_len,
        max_frames=trg_len,
        cvad_layers=1,
        latent_dim=dims["d_model"],
        lta="attention",
        ewa=True,
        target_guided=True,
        **dims,
    )
    torch.manual_seed(0)
    model = CTEG(cfg, torch.from_numpy(mean)).to(device)
    tok = model.tokenizer
    L = np.array([len(x) for x in tok(texts, truncation=True, max_length=src_len)["input_ids"]])
    flops_epoch = train_flops(lengths, L, cfg, enc_cfg)
    results["data"]["mean_text_tokens"] = float(L.mean())
    results["flops_per_seq_G"] = flops_epoch / len(seqs) / 1e9
    print(
        f"text tokens: mean {L.mean():.1f}; useful training FLOPs {flops_epoch / len(seqs) / 1e9:.2f} G/sequence",
        flush=True,
    )

    def mfu(seq_per_s: float) -> float:
        return seq_per_s * flops_epoch / len(seqs) / (args.peak_tflops * 1e12)

    rows: list[tuple] = []
    optim_cfg = {"lr_mul": 2.0, "betas": [0.9, 0.98], "eps": 1e-9}
    ds = PairDataset(texts, seqs, trg_len)
    params = [p for p in model.parameters() if p.requires_grad]

    # ---- facelab training: the default path of facelab.families.cteg.loop.worker_loop ---------
    if not args.skip_train:
        # (bucketed batches, bf16 autocast, fused Adam, frozen-encoder states cached per text)
        model.text_cache = TextStateCache()
        opt = make_optimizer(params, optim_cfg, device)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, noam_lambda(cfg.d_model, 4000))
        sampler = BucketBatchSampler([len(s) for s in ds.sequences], args.batch_size, seed=0)
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=collate, pin_memory=device.type == "cuda"
        )
        model.train()
        epoch_times, padded = [], []
        for epoch in range(2):  # epoch 0 warms up (kernel selection per shape); epoch 1 is reported
            sampler.set_epoch(epoch)
            sync(device)
            t0 = time.perf_counter()
            acc = torch.zeros(4, device=device)
            n_frames_padded = n_frames_real = 0
            for batch in loader:
                acc += train_step(model, batch, opt, sched, params, 0.0, device)
                n_frames_padded += batch[1].shape[0] * batch[1].shape[1]
                n_frames_real += int(batch[2].sum())
            loss = acc.tolist()
            sync(device)
            epoch_times.append(time.perf_counter() - t0)
            padded.append(n_frames_padded)
        steps = len(sampler)
        n_seq = steps * args.batch_size
        fl_sps = n_seq / epoch_times[1]
        results["facelab_train"] = {
            "epoch_s": epoch_times,
            "steps": steps,
            "seq": n_seq,
            "seq_per_s": fl_sps,
            "mfu": mfu(fl_sps),
            "padded_frames": padded[1],
            "real_frames": n_frames_real,
            "loss_sum_last_epoch": loss,
            "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        print(
            f"facelab train: epoch {epoch_times[1]:.2f} s ({steps} steps x {args.batch_size}) -> {fl_sps:,.0f} seq/s, "
            f"MFU {100 * mfu(fl_sps):.1f}%  (first epoch, text cache cold: {epoch_times[0]:.2f} s; padded/real frames "
            f"{padded[1] / n_frames_real:.2f})",
            flush=True,
        )
        rows.append(("facelab default (2nd epoch)", fl_sps, mfu(fl_sps), n_seq / fl_sps))
        sps0 = n_seq / epoch_times[0]
        rows.append(("facelab default (1st epoch: text cache cold, warm-up)", sps0, mfu(sps0), epoch_times[0]))

        if args.profile and device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            it = iter(loader)
            batches = [next(it) for _ in range(6)]
            for b in batches[:2]:
                train_step(model, b, opt, sched, params, 0.0, device)
            sync(device)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                for b in batches[2:]:
                    train_step(model, b, opt, sched, params, 0.0, device)
                sync(device)
                wall = time.perf_counter() - t0
            ev = prof.key_averages()
            gpu_us = sum(e.self_device_time_total for e in ev)
            n_kernels = sum(e.count for e in ev if e.device_type == torch.autograd.DeviceType.CUDA)
            print(
                f"profile: 4 training steps, wall {wall * 1e3:.0f} ms, GPU busy {gpu_us / 1e3:.0f} ms, "
                f"{n_kernels / 4:.0f} kernels/step",
                flush=True,
            )
            print(ev.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60), flush=True)
            print(ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60), flush=True)

        # ---- facelab ablations (same model, a few steps each) ------------------------------------
        def ablation(name: str, bucketed: bool, amp: bool, fused: bool):
            opt_a = torch.optim.Adam(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-9, fused=fused or None)
            if bucketed:
                idx_batches = list(BucketBatchSampler([len(s) for s in ds.sequences], args.batch_size, seed=5))
            else:  # random batches padded to their longest (facelab's loop before bucketing)
                perm = np.random.default_rng(5).permutation(len(ds))
                idx_batches = [
                    perm[i : i + args.batch_size].tolist()
                    for i in range(0, len(perm) - args.batch_size + 1, args.batch_size)
                ]
            batches = [collate([ds[i] for i in b]) for b in idx_batches[: args.ablation_steps + 2]]
            for b in batches[:2]:
                train_step(model, b, opt_a, None, params, 0.0, device, amp=amp)
            t = timed(
                lambda: [train_step(model, b, opt_a, None, params, 0.0, device, amp=amp) for b in batches[2:]], device
            )[0]
            per_seq = t / (len(batches[2:]) * args.batch_size)
            sps = 1 / per_seq
            print(
                f"  ablation {name}: {sps:,.0f} seq/s ({len(batches) - 2} steps, mean padded length "
                f"{np.mean([b[1].shape[1] for b in batches[2:]]):.0f})",
                flush=True,
            )
            rows.append((f"facelab ablation: {name}", sps, mfu(sps), args.n_train / sps))
            results.setdefault("ablations", {})[name] = {"seq_per_s": sps, "mfu": mfu(sps)}

        model.text_cache = None  # the ablations and the decoding below run the encoder every time
        if args.ablation_steps:
            ablation("random batches, fp32, unfused Adam (before)", False, False, False)
            ablation("bucketed, fp32, unfused Adam", True, False, False)
            ablation("bucketed, bf16, unfused Adam", True, True, False)
            ablation("random batches, bf16, fused Adam", False, True, True)

    # ---- the reference's training ------------------------------------------------------------
    ref_model = None
    if not args.skip_reference:
        mods, adapted = import_reference(ref_dir)
        results["reference_adaptations"] = adapted + ["BertModel gets the (B, L) source mask instead of (B, 1, L)"]
        ref_model = build_reference(mods, model.text_encoder, dims, trg_len, src_len, device)
        from transformers import BertTokenizer

        ref_tok = BertTokenizer(vocab_file=args.vocab, do_lower_case=False)
        if not args.skip_train:
            conf = {
                "tokenizer": ref_tok,
                "batch_size": args.batch_size,
                "src_len": src_len,
                "trg_len": trg_len,
                "trg_exp_dim": 53,
                "shuffle": False,
            }
            n_ref = (args.ref_steps + 1) * args.batch_size
            ref_exps = [np.concatenate([mean[None], s], axis=0) for s in seqs[:n_ref]]  # as load_dataset_split_batch
            ref_tgt_texts = [" ".join(["[UNK]"] * len(x)) for x in ref_exps]
            t0 = time.perf_counter()
            ref_loader = mods.data.get_dataloader(texts[:n_ref], ref_tgt_texts, ref_exps, conf)
            ref_batches = list(ref_loader)
            data_s = (time.perf_counter() - t0) / len(ref_batches)
            ref_opt = types.SimpleNamespace(cvae=True, one_step_loss=True)
            optimizer = mods.ScheduledOptim(
                torch.optim.Adam(ref_model.parameters(), betas=(0.9, 0.98), eps=1e-9), 2.0, dims["d_model"], 4000
            )
            ref_times = {}
            for anomaly in (True, False):
                torch.autograd.set_detect_anomaly(anomaly)
                mods.train.train_epoch(ref_model, ref_batches[:1], optimizer, ref_opt, device)  # warm-up step
                t = timed(
                    lambda: mods.train.train_epoch(ref_model, ref_batches[1:], optimizer, ref_opt, device), device
                )[0]
                ref_times[anomaly] = t / len(ref_batches[1:])
            torch.autograd.set_detect_anomaly(False)
            for anomaly, label in ((True, "as shipped, anomaly detection on"), (False, "anomaly detection off")):
                sps = args.batch_size / ref_times[anomaly]
                rows.append((f"reference train_epoch ({label})", sps, mfu(sps), args.n_train / sps))
            results["reference_train"] = {
                "s_per_step_anomaly_on": ref_times[True],
                "s_per_step_anomaly_off": ref_times[False],
                "data_pipeline_s_per_batch": data_s,
                "seq_per_s_on": args.batch_size / ref_times[True],
                "seq_per_s_off": args.batch_size / ref_times[False],
            }
            print(
                f"reference train: {ref_times[True]:.3f} s/step (anomaly on), {ref_times[False]:.3f} s/step (off); "
                f"its data pipeline (not timed above) {data_s:.2f} s/batch",
                flush=True,
            )
            del optimizer, ref_batches
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # ---- decoding ----------------------------------------------------------------------------
    n_frames = min(args.decode_frames, trg_len)
    model.cfg.stop_threshold = 0.0  # never stop: every sequence runs n_frames steps, as the reference's serial loop
    model.eval()
    dec_rows = []
    gen = lambda: torch.Generator(device=device).manual_seed(7)  # noqa: E731
    from facelab.families.cteg.decoding import generate as fl_generate

    if ref_model is not None:
        translator = mods.Translator(
            model=ref_model,
            max_seq_len=n_frames,
            device=device,
            tokenizer=ref_tok,
            threshold=1.0,
            cvae=True,
            data_source=str(mean_path.parent),
        ).to(device)
    for b in [int(x) for x in args.decode_batches.split(",")]:
        btexts = texts[:b]
        entry = {}
        # first call of this shape: compiles the step (once per process and shape) and captures the graph
        entry["facelab_first_call_s"] = timed(
            lambda: fl_generate(model, btexts, max_frames=n_frames, generator=gen()), device
        )[0]
        t = timed(lambda: model.generate(btexts, max_frames=n_frames, generator=gen()), device, 7)
        out = model.generate(btexts, max_frames=n_frames, generator=gen())
        entry["facelab_s"] = statistics.median(t)
        entry["facelab_runs_s"] = t
        entry["facelab_frames"] = sum(len(o) for o in out)
        print(
            f"decode b={b}: facelab {entry['facelab_s'] * 1e3:.2f} ms (runs {[round(x * 1e3, 2) for x in t]})",
            flush=True,
        )
        if device.type == "cuda":
            entry.update(decode_breakdown(model, btexts, n_frames, device))
            fl_generate(model, btexts, max_frames=n_frames, generator=gen(), compile=False)  # capture
            t_nc = timed(
                lambda: fl_generate(model, btexts, max_frames=n_frames, generator=gen(), compile=False), device, 5
            )
            entry["facelab_graph_not_compiled_s"] = statistics.median(t_nc)
            for mode in [m for m in args.compile_modes.split(",") if m]:
                t0 = time.perf_counter()
                other = fl_generate(model, btexts, max_frames=n_frames, generator=gen(), compile=mode)
                first = time.perf_counter() - t0
                t_m = timed(
                    lambda: fl_generate(model, btexts, max_frames=n_frames, generator=gen(), compile=mode), device, 5
                )
                d_m = max(float((x - y).abs().max()) for x, y in zip(other, out))
                entry.setdefault("compile_modes", {})[mode] = {
                    "first_call_s": first,
                    "s": statistics.median(t_m),
                    "max_abs_diff_vs_default": d_m,
                }
                print(
                    f"decode b={b}: compile mode {mode}: {statistics.median(t_m) * 1e3:.2f} ms (first call {first:.1f} s, max |diff| vs default {d_m:.1e})",
                    flush=True,
                )
            print(
                f"decode b={b}: first call {entry['facelab_first_call_s']:.1f} s (compile + capture); "
                f"{entry['per_step_us']:.1f} us per step ({entry['replay_us']:.0f} us per replay of "
                f"{entry['graph_steps']} steps), encode_text {entry['encode_ms']:.2f} ms, fixed "
                f"{entry['facelab_s'] * 1e3 - n_frames * entry['per_step_us'] / 1e3:.2f} ms; step not compiled "
                f"{entry['facelab_graph_not_compiled_s'] * 1e3:.1f} ms",
                flush=True,
            )
            if args.profile:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    model.generate(btexts, max_frames=n_frames, generator=gen())
                    sync(device)
                ev = prof.key_averages()
                print(ev.table(sort_by="self_device_time_total", row_limit=15, max_name_column_width=70), flush=True)
        t_eager = timed(
            lambda: fl_generate(model, btexts, max_frames=n_frames, generator=gen(), static=False), device, 2
        )
        entry["facelab_eager_cache_s"] = statistics.median(t_eager)
        t_full = timed(lambda: model.generate(btexts, max_frames=n_frames, generator=gen(), use_cache=False), device, 1)
        full = model.generate(btexts, max_frames=n_frames, generator=gen(), use_cache=False)
        entry["facelab_full_recompute_s"] = t_full[0]
        diff = max(float((x - y).abs().max()) for x, y in zip(out, full))
        rel = max(float((x - y).norm() / y.norm()) for x, y in zip(out, full))
        entry["equal_lengths"] = [len(x) for x in out] == [len(y) for y in full]
        entry["max_abs_diff_vs_recompute"] = diff
        entry["max_rel_diff_vs_recompute"] = rel
        if ref_model is not None:
            enc = ref_tok(btexts, max_length=src_len, padding="max_length", truncation=True, return_tensors="pt")
            src, src_mask = enc["input_ids"].to(device), enc["attention_mask"].bool().unsqueeze(-2).to(device)
            small = mods.Translator(
                model=ref_model,
                max_seq_len=8,
                device=device,
                tokenizer=ref_tok,
                threshold=1.0,
                cvae=True,
                data_source=str(mean_path.parent),
            )
            small.serial_inference(src, src_mask)  # warm-up
            reps = 2 if b <= 8 else 1
            t_ref = timed(lambda: translator.serial_inference(src, src_mask), device, reps)
            ref_out = translator.serial_inference(src, src_mask)
            entry["reference_s"] = statistics.median(t_ref)
            entry["reference_frames"] = int(ref_out.shape[0] * ref_out.shape[1])
        results.setdefault("decode", {})[b] = entry
        fps_fl = entry["facelab_frames"] / entry["facelab_s"]
        line = (
            f"decode b={b}: facelab {entry['facelab_s'] * 1e3:.1f} ms ({fps_fl:,.0f} frames/s; eager cache "
            f"{entry['facelab_eager_cache_s'] * 1e3:.0f} ms, full recompute {entry['facelab_full_recompute_s'] * 1e3:.0f} ms; "
            f"max |diff| vs recompute {diff:.2e}, rel {rel:.1e}, lengths equal {entry['equal_lengths']})"
        )
        if "reference_s" in entry:
            fps_ref = entry["reference_frames"] / entry["reference_s"]
            entry["speedup_frames_per_s"] = fps_fl / fps_ref
            line += (
                f"; reference {entry['reference_s'] * 1e3:.0f} ms ({fps_ref:,.0f} frames/s) -> {fps_fl / fps_ref:.1f}x"
            )
        print(line, flush=True)
        dec_rows.append((b, entry))

    # ---- stopping: rows that stop at different steps give the same frames as full recomputation --
    bs = texts[:16]
    free = model.generate(bs, max_frames=48, generator=gen())
    v = torch.stack([f.norm(dim=-1) for f in free])[:, 1:].flatten().sort().values
    model.cfg.stop_threshold = float(v[len(v) // 12] + v[len(v) // 12 + 1]) / 2
    a = model.generate(bs, max_frames=48, generator=gen())
    c = model.generate(bs, max_frames=48, generator=gen(), use_cache=False)
    stop_ok = [len(x) for x in a] == [len(y) for y in c]
    stop_diff = max(float((x - y).abs().max()) for x, y in zip(a, c))
    results["stop_check"] = {"lengths": [len(x) for x in a], "equal_lengths": stop_ok, "max_abs_diff": stop_diff}
    print(
        f"stopping check (16 texts, threshold {model.cfg.stop_threshold:.2f}): lengths {[len(x) for x in a]}, "
        f"equal to recomputation {stop_ok}, max |diff| {stop_diff:.1e}",
        flush=True,
    )

    # ---- table --------------------------------------------------------------------------------
    print(
        "\n## training (sequences/s, useful-FLOP MFU vs %.0f TFLOP/s, epoch of %d sequences)"
        % (args.peak_tflops, args.n_train)
    )
    print(f"| {'path':58} | {'seq/s':>9} | {'MFU':>6} | {'epoch s':>8} |")
    for name, sps, m, ep in rows:
        print(f"| {name:58} | {sps:9,.0f} | {100 * m:5.1f}% | {ep:8.1f} |")
    if "reference_train" in results:
        r = results["reference_train"]
        results["train_speedup_vs_ref_on"] = fl_sps / r["seq_per_s_on"]
        results["train_speedup_vs_ref_off"] = fl_sps / r["seq_per_s_off"]
        print(
            f"facelab / reference: {fl_sps / r['seq_per_s_on']:.1f}x (anomaly on), "
            f"{fl_sps / r['seq_per_s_off']:.1f}x (off)"
        )
    print(f"\n## decoding {n_frames} frames")
    print(
        f"| {'batch':>5} | {'facelab ms':>10} | {'eager-cache ms':>14} | {'recompute ms':>12} | {'reference ms':>12} "
        f"| {'speed-up':>8} | {'max|diff|':>9} |"
    )
    for b, e in dec_rows:
        print(
            f"| {b:5d} | {e['facelab_s'] * 1e3:10.1f} | {e['facelab_eager_cache_s'] * 1e3:14.1f} | "
            f"{e['facelab_full_recompute_s'] * 1e3:12.1f} | {e.get('reference_s', float('nan')) * 1e3:12.1f} | "
            f"{e.get('speedup_frames_per_s', float('nan')):7.1f}x | {e['max_abs_diff_vs_recompute']:9.1e} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
