"""KeyframeFace on one GPU: LoRA training and keyframe generation, facelab against the common baseline.

Model: a Qwen3-4B-architecture causal LM with random weights in bf16 (hidden 2560, 36 layers, 32 query /
8 key-value heads of 128, MLP 9728, vocabulary 151,936, tied embeddings: 4.02B parameters), SDPA
attention, the paper's LoRA (r 8, α 32, dropout 0.05, the seven linear layers of every block: 16.5M
trainable parameters) through ``facelab.families.keyframe_lm.lora.apply_lora`` (plain peft).

Data: synthetic KeyframeFace scripts (``facelab.data.synth_keyframe``), written as the release's requests
and answers (semantic format, glossary, ARKit annotation) and tokenised by facelab's
``train.keyframe.build_examples``. No Qwen tokenizer is reachable here, so the bench trains a byte-level
BPE with Qwen2's pre-tokenizer (digits split one by one, punctuation runs) and a small vocabulary, which
gives requests of ~2.0-2.3k tokens and answers of ~540 tokens -- the lengths Qwen's tokenizer gives these
prompts (1.8k-2.6k). Token ids stay below the tokenizer's size; the model keeps Qwen3-4B's 151,936 rows.

Training, the same examples and batches for both:
* baseline: the plain peft loop -- random batches right-padded to their longest (``data.collate``),
  ``model(input_ids, attention_mask, labels).loss`` (full-vocabulary logits), AdamW (foreach);
* facelab: ``train.keyframe.train_step`` -- one unpadded example at a time with gradient accumulation
  (causal flash attention, no mask), the LM head only at answer positions, fused AdamW.
Throughput counts real (non-padding) tokens; MFU uses the 4·N-per-token convention of issue 5
(N = all 4.02B parameters: forward 2N + backward-to-inputs 2N; LoRA and attention FLOPs not counted)
against ``--peak-tflops``. Peak memory is ``torch.cuda.max_memory_allocated`` per path.

Generation: ``generate_keyframes`` at batch 1 and 32, ``mode="constrained"`` against ``mode="plain"``
(greedy ``model.generate`` of the named JSON) on the peft model as trained -- the common baseline -- and
then ``mode="constrained"`` on the model as facelab serves it (``lora.merge_for_inference``: the adapter
folded into the weights, what ``load_servable`` does). A random-weight model never writes the end-of-turn token,
so plain decoding gets ``max_new_tokens`` = the longest answer's token count + 1: the number of tokens a
trained model would emit. Keyframes/s and the parse rate are reported (plain decoding of a random model
does not parse; constrained decoding always does).

    python bench/bench_keyframe_gpu.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def qwen_like_tokenizer(texts: list[str], vocab_size: int):
    from transformers import PreTrainedTokenizerFast

    from facelab.families.keyframe_lm.tiny import CHAT_TEMPLATE, train_bpe_tokenizer

    tok = train_bpe_tokenizer(texts, vocab_size, pattern=QWEN2_PRETOKENIZE)
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    out.chat_template = CHAT_TEMPLATE
    return out


def sync():
    torch.cuda.synchronize()


def gen_timed(model, tok, chosen, cfg, mode: str, b: int, ans_len: int, device, label: str | None = None) -> dict:
    from facelab.families.keyframe_lm.generate import generate_keyframes

    stats: dict = {}
    sync() if device.type == "cuda" else None
    t0 = time.perf_counter()
    out = generate_keyframes(model, tok, chosen, cfg, mode=mode, batch_size=b, max_new_tokens=ans_len, stats=stats)
    sync() if device.type == "cuda" else None
    t = time.perf_counter() - t0
    flat = [r for per in out for r in per]
    valid = sum(bool(r.valid) for r in flat)
    print(
        f"generate b={b} {label or mode}: {len(flat)} keyframes in {t:.2f} s -> {len(flat) / t:.3f} keyframes/s, "
        f"parsed {valid}/{len(flat)}, {stats['forward_calls']} forward calls",
        flush=True,
    )
    return {
        "s": t,
        "keyframes_per_s": len(flat) / t,
        "parse_rate": valid / len(flat),
        "forward_calls": stats["forward_calls"],
        "fed_tokens": stats["fed_tokens"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scripts", type=int, default=160, help="synthetic scripts (one example per keyframe)")
    ap.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step (both paths)")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per path (after 1 warm-up step)")
    ap.add_argument("--vocab", type=int, default=440, help="BPE size of the bench tokenizer (sets the token lengths)")
    ap.add_argument("--gen-batches", default="1,32")
    ap.add_argument("--gen-requests-b1", type=int, default=2, help="requests generated at batch 1")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--small", action="store_true", help="a tiny Qwen3 (CPU smoke run)")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--skip-generate", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()

    import peft
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from facelab.data.synth_keyframe import generate_scripts
    from facelab.families.keyframe_lm.data import collate
    from facelab.families.keyframe_lm.generate import generate_keyframes
    from facelab.families.keyframe_lm.loop import build_examples, make_optimizer, prompt_config, train_step
    from facelab.families.keyframe_lm.lora import LoraSettings, apply_lora, count_trainable
    from facelab.families.keyframe_lm.prompts import answer_text, build_messages

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "argv": sys.argv[1:],
    }
    print(
        f"device {res['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}",
        flush=True,
    )

    job = {
        "prompt": {"format": "semantic", "glossary": True, "target_frame_instruction": True, "max_tokens": 8192},
        "data": {"annotation": "arkit"},
    }
    cfg = prompt_config(job)
    scripts = generate_scripts(args.scripts, seed=0)
    corpus = [m["content"] for s in scripts for kf in s.keyframes for m in build_messages(s, kf.index, cfg)]
    corpus += [answer_text(kf.values, kf.index, cfg) for s in scripts for kf in s.keyframes]
    tok = qwen_like_tokenizer(corpus, args.vocab)
    ds = build_examples(tok, scripts, job, "train")
    lens = np.array([len(ids) for ids, _ in ds.examples])
    ans = np.array([sum(x != -100 for x in lab) for _, lab in ds.examples])
    res["data"] = {
        "examples": len(lens),
        "len_min": int(lens.min()),
        "len_mean": float(lens.mean()),
        "len_max": int(lens.max()),
        "answer_mean": float(ans.mean()),
        "tokenizer_size": len(tok),
    }
    print(
        f"data: {len(lens)} examples, {lens.min()}-{lens.max()} tokens (mean {lens.mean():.0f}), "
        f"answers {ans.mean():.0f} tokens; tokenizer {len(tok)} tokens",
        flush=True,
    )

    if args.small:
        qcfg = Qwen3Config(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            tie_word_embeddings=True,
        )
    else:
        qcfg = Qwen3Config(
            vocab_size=151936,
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=True,
            max_position_embeddings=40960,
            rope_theta=1_000_000.0,
        )
    qcfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        base = Qwen3ForCausalLM(qcfg).to(dtype)
    n_params = sum(p.numel() for p in base.parameters())
    model = apply_lora(base, LoraSettings())
    params = [p for p in model.parameters() if p.requires_grad]
    res["n_params"], res["lora_params"] = n_params, count_trainable(model)
    print(f"model: {n_params / 1e9:.2f}B parameters, LoRA {count_trainable(model) / 1e6:.1f}M trainable", flush=True)
    flops_per_token = 4 * n_params

    rng = np.random.default_rng(0)
    order = rng.permutation(len(ds))
    B = args.batch_size
    batches = [[ds.examples[i] for i in order[j : j + B]] for j in range(0, (args.steps + 1) * B, B)]
    real_tokens = sum(len(ids) for b in batches[1:] for ids, _ in b)
    padded_tokens = sum(len(b) * max(len(ids) for ids, _ in b) for b in batches[1:])
    rows = []

    def run(name: str, step_fn, opt) -> None:
        model.train()
        step_fn(batches[0], opt)  # warm-up
        if device.type == "cuda":
            sync()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for b in batches[1:]:
            step_fn(b, opt)
        if device.type == "cuda":
            sync()
        t = time.perf_counter() - t0
        tps = real_tokens / t
        mfu = tps * flops_per_token / (args.peak_tflops * 1e12)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
        res.setdefault("train", {})[name] = {
            "s_per_step": t / len(batches[1:]),
            "tokens_per_s": tps,
            "mfu_4N": mfu,
            "peak_mem_GiB": peak,
        }
        rows.append((name, t / len(batches[1:]), tps, mfu, peak))
        print(
            f"{name}: {t / len(batches[1:]):.2f} s/step, {tps:,.0f} tokens/s, MFU(4N) {100 * mfu:.1f}%, "
            f"peak {peak:.1f} GiB",
            flush=True,
        )

    if not args.skip_train:

        def baseline_step(examples, opt):
            batch = {k: v.to(device) for k, v in collate(examples, tok.pad_token_id).items()}
            loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def facelab_step(examples, opt):
            train_step(model, examples, opt, None, params, 0.0, device)

        opt_base = torch.optim.AdamW(params, lr=1e-5)
        run(f"baseline: plain peft, padded batch of {B}", baseline_step, opt_base)
        del opt_base
        opt_fl = make_optimizer(params, {"lr": 1e-5, "weight_decay": 0.0}, device)
        run(f"facelab train_step, batch of {B}", facelab_step, opt_fl)
        del opt_fl
        res["train_tokens"] = {"real": real_tokens, "padded": padded_tokens}
        r = res["train"]
        names = list(r)
        res["train_speedup"] = r[names[1]]["tokens_per_s"] / r[names[0]]["tokens_per_s"]
        if device.type == "cuda":
            torch.cuda.empty_cache()

    gen_rows = []
    if not args.skip_generate:
        from facelab.families.keyframe_lm.lora import merge_for_inference

        model.eval()
        chosen_by_b = {}
        for b in [int(x) for x in args.gen_batches.split(",")]:
            want = args.gen_requests_b1 if b == 1 else b
            chosen, n = [], 0
            for s in scripts[::-1]:  # scripts not used for warm-up
                if n >= want:
                    break
                chosen.append(s)
                n += len(s.keyframes)
            ans_len = (
                max(
                    len(tok(answer_text(kf.values, kf.index, cfg), add_special_tokens=False)["input_ids"])
                    for s in chosen
                    for kf in s.keyframes
                )
                + 1
            )
            entry = {"requests": n, "max_new_tokens_plain": ans_len}
            chosen_by_b[b] = (chosen, ans_len, entry)
            generate_keyframes(model, tok, scripts[:1], cfg, mode="constrained", batch_size=b)  # warm-up
            for mode in ("constrained", "plain"):
                entry[mode] = gen_timed(model, tok, chosen, cfg, mode, b, ans_len, device)
            res.setdefault("generate", {})[b] = entry
            gen_rows.append((b, entry))
        model = merge_for_inference(model).eval()  # as served; the adapter is gone from here on
        for b, (chosen, ans_len, entry) in chosen_by_b.items():
            generate_keyframes(model, tok, scripts[:1], cfg, mode="constrained", batch_size=b)  # warm-up
            entry["served"] = gen_timed(model, tok, chosen, cfg, "constrained", b, ans_len, device, "served")
            entry["speedup"] = entry["served"]["keyframes_per_s"] / entry["plain"]["keyframes_per_s"]
            entry["speedup_unmerged"] = entry["constrained"]["keyframes_per_s"] / entry["plain"]["keyframes_per_s"]

    print(
        "\n## LoRA training (real tokens/s; MFU = tokens/s x 4N / %.0f TFLOP/s, N = %.2fB)"
        % (args.peak_tflops, n_params / 1e9)
    )
    print(f"| {'path':42} | {'s/step':>7} | {'tokens/s':>9} | {'MFU':>6} | {'peak GiB':>8} |")
    for name, sps, tps, mfu, peak in rows:
        print(f"| {name:42} | {sps:7.2f} | {tps:9,.0f} | {100 * mfu:5.1f}% | {peak:8.1f} |")
    if "train_speedup" in res:
        print(f"facelab / baseline: {res['train_speedup']:.2f}x")
    if gen_rows:
        print("\n## keyframe generation")
        print(
            f"| {'batch':>5} | {'requests':>8} | {'served kf/s':>11} | {'constrained kf/s':>16} | {'plain kf/s':>10} "
            f"| {'speed-up':>8} | {'unmerged':>8} | {'parsed (s / c / p)':>18} |"
        )
        for b, e in gen_rows:
            sv, c, p = e["served"], e["constrained"], e["plain"]
            print(
                f"| {b:5d} | {e['requests']:8d} | {sv['keyframes_per_s']:11.3f} | {c['keyframes_per_s']:16.3f} | "
                f"{p['keyframes_per_s']:10.3f} | {e['speedup']:7.2f}x | {e['speedup_unmerged']:7.2f}x | "
                f"{sv['parse_rate']:4.0%} / {c['parse_rate']:4.0%} / {p['parse_rate']:4.0%} |"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
