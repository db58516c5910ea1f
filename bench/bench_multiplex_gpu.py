"""Many KeyframeFace adapters on one GPU: one shared base (AdapterSet) against one model copy per adapter.

Issue #22, item 3. Model: the Qwen3-4B architecture with random weights in bf16 (as
``bench_keyframe_gpu.py``: hidden 2560, 36 layers, 32 query / 8 key-value heads of 128, MLP 9728,
vocabulary 151,936, tied embeddings; 4.02B parameters), and ``--adapters`` (8) LoRA adapters of the
paper's shape (r 8, α 32, the seven linear layers: 16.5M parameters each) with random, seeded weights
(peft's own init makes an adapter a no-op) — stand-ins for annotation type × format adapters.

Two ways to serve them, the same requests (``--requests`` scripts of 2 keyframes, round-robin over the
adapters, one request at a time, constrained decoding as served):

* separate: one model per adapter, the adapter merged into its copy of the base
  (``lora.merge_for_inference``, what ``facelab serve`` does for one model) — the memory of N replicas;
* shared: one :class:`~facelab.families.keyframe_lm.adapters.AdapterSet` — the base once, every adapter
  added to it unmerged; each request activates its adapter (``set_adapter``).

Reported: ``torch.cuda.memory_allocated`` after loading each way (and the peak), keyframes/s, and
whether each adapter's answers agree between the two ways (the float-rounding caveat of merging:
greedy decoding may differ at near-ties in bf16). One process runs both, so the separate way's
keyframes/s is that of one replica at a time; N real replicas would also contend for the same GPU.

    python bench/bench_multiplex_gpu.py --json out.json           # one H200 (the 8 copies need ~66 GB)
    python bench/bench_multiplex_gpu.py --small --adapters 3      # a CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_keyframe_gpu import qwen_like_tokenizer  # noqa: E402 - the bench tokenizer, shared

REPO = Path(__file__).resolve().parents[1]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def memory(device) -> dict:
    if device.type != "cuda":
        return {}
    sync(device)
    return {"allocated_gb": torch.cuda.memory_allocated() / 1e9, "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def serve(servables: dict, requests: list, device) -> tuple[dict, dict]:
    """Answer ``requests`` [(adapter, script)] one at a time; → (timings, {adapter: [values, ...]})."""
    answers: dict[str, list] = {name: [] for name in servables}

    def serve_one(name, s):
        return servables[name].keyframes(s.background, s.emotion, [k.descriptions["arkit"] for k in s.keyframes])

    serve_one(*requests[0])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    n = 0
    for name, script in requests:
        out = serve_one(name, script)
        answers[name].append(np.stack([r.values for r in out]))
        n += len(out)
    sync(device)
    t = time.perf_counter() - t0
    return {"s": t, "keyframes": n, "keyframes_per_s": n / t}, answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="scripts answered per way (2 keyframes each)")
    ap.add_argument("--vocab", type=int, default=440, help="BPE size of the bench tokenizer")
    ap.add_argument("--small", action="store_true", help="a tiny Qwen3 (CPU smoke run)")
    ap.add_argument(
        "--skip-separate", action="store_true", help="only the shared way (a GPU without room for N copies)"
    )
    ap.add_argument("--json")
    args = ap.parse_args()

    import yaml
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from facelab.core import checkpoint as ckpt
    from facelab.data.synth_keyframe import generate_scripts
    from facelab.families import registry
    from facelab.families.keyframe_lm.adapters import AdapterSet, adapter_memory_bytes
    from facelab.families.keyframe_lm.loop import prompt_config
    from facelab.families.keyframe_lm.lora import LoraSettings, apply_lora, merge_for_inference
    from facelab.families.keyframe_lm.prompts import answer_text, build_messages
    from facelab.families.keyframe_lm.servable import ServableKeyframeLM, keyframe_lm_state

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "argv": sys.argv[1:]}
    print(f"device {res['device']}, torch {torch.__version__}", flush=True)

    raw = yaml.safe_load((REPO / "jobs" / "keyframe.yaml").read_text())
    raw["model"]["base_model"] = "bench/random-qwen3-4b"  # built here from its config, never loaded by name
    raw["model"]["dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    raw["eval"]["serve_decode"] = "constrained"
    job = registry.get("keyframe").job.model_validate(raw).model_dump(mode="json")
    cfg = prompt_config(job)
    scripts = [s for s in generate_scripts(max(args.requests, 8) * 2, seed=0) if len(s.keyframes) >= 2]
    scripts = [s.__class__(**{**s.__dict__, "keyframes": s.keyframes[:2]}) for s in scripts][: args.requests]
    corpus = [m["content"] for s in scripts for kf in s.keyframes for m in build_messages(s, kf.index, cfg)]
    corpus += [answer_text(kf.values, kf.index, cfg) for s in scripts for kf in s.keyframes]
    tok = qwen_like_tokenizer(corpus, args.vocab)

    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16)
        if args.small
        else dict(
            hidden_size=2560,
            intermediate_size=9728,
            num_hidden_layers=36,
            num_attention_heads=32,
            head_dim=128,
            max_position_embeddings=40960,
            rope_theta=1_000_000.0,
        )
    )
    qcfg = Qwen3Config(
        vocab_size=151936, num_key_value_heads=8 if not args.small else 2, tie_word_embeddings=True, **size
    )
    qcfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        base = Qwen3ForCausalLM(qcfg).to(dtype).eval()
    res["n_params"] = sum(p.numel() for p in base.parameters())

    names = [f"keyframe-{i}/1" for i in range(args.adapters)]
    requests = [(names[i % len(names)], s) for i, s in enumerate(scripts)]
    tmp = Path(tempfile.mkdtemp(prefix="bench-multiplex-"))
    dirs = {}
    for i, name in enumerate(names):  # N random adapters of the paper's shape, as checkpoints
        lm = apply_lora(copy.deepcopy(base), LoraSettings(dropout=0.0))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in lm.named_parameters():
                if "lora_" in pname:
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.dtype))
        dirs[name] = tmp / name.replace("/", "-")
        ckpt.save_tensors(dirs[name], {k: v.float().cpu() for k, v in keyframe_lm_state(lm, job).items()}, job)
        del lm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"model {res['n_params'] / 1e9:.2f}B parameters; {len(names)} adapters; {len(requests)} requests", flush=True)

    # shared: one base, N adapters
    before = memory(device)
    shared = AdapterSet(job, None, str(device), max_adapters=len(names), base=(base, tok))
    servables = {name: shared.add(name, dirs[name]) for name in names}
    res["shared"] = {"memory": memory(device), "before": before, "bytes": adapter_memory_bytes(shared)}
    timing, shared_answers = serve(servables, requests, device)
    res["shared"].update(timing)
    print(f"shared: {res['shared']['memory']} {timing['keyframes_per_s']:.3f} keyframes/s", flush=True)
    base_cpu = copy.deepcopy(base).cpu() if not args.skip_separate else None
    del servables, shared, base
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    if not args.skip_separate:  # separate: N merged copies
        from peft import set_peft_model_state_dict

        before = memory(device)
        servables = {}
        for name in names:
            lm = apply_lora(copy.deepcopy(base_cpu).to(device), LoraSettings(dropout=0.0))
            weights = {k: v.to(device=device, dtype=dtype) for k, v in ckpt.load_weights(dirs[name]).items()}
            set_peft_model_state_dict(lm, weights)
            servables[name] = ServableKeyframeLM(merge_for_inference(lm).eval(), tok, job)
        res["separate"] = {"memory": memory(device), "before": before}
        timing, separate_answers = serve(servables, requests, device)
        res["separate"].update(timing)
        print(f"separate: {res['separate']['memory']} {timing['keyframes_per_s']:.3f} keyframes/s", flush=True)
        res["agree"] = {
            name: float(
                np.mean([np.allclose(a, b, atol=1e-3) for a, b in zip(shared_answers[name], separate_answers[name])])
            )
            for name in names
        }
        print(f"answers agree (share of requests per adapter): {res['agree']}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)  # the adapter checkpoints written above
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    main()
