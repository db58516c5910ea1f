"""Serving CTEG on a GPU: latency and throughput of `POST /v1/expressions` through Ray Serve, with
request batching off and on (issue 5's serving item).

What runs is the real serving path: a CTEG model of the paper's shape (jobs/cteg.yaml: d_model 768,
12 heads, one CVAD layer, EwA, LTA; random weights -- no model hub -- and a random-init BERT-base
encoder, as in bench_cteg_gpu.py) is saved as a facelab checkpoint, logged to a fresh sqlite MLflow
store, registered and made champion with `tracking.promote`, then served by
`facelab.serve.app.build_app` (the app `facelab serve` runs) with each replica holding a GPU. Clients on
loopback (bench/load_serve.py's `run_load`: one thread and one keep-alive connection each) send
`{"text": ..., "num_samples": 1, "max_frames": 128}` back to back. The model's stop threshold is 1e-9, so
every answer is exactly 128 frames (a trained model stops at its own length; this fixes the work per
request). Each server setting is measured at every client count after a warm-up.

Settings compared, in one run on one GPU: `max_batch_size` 1 (no request batching: one request on the
device at a time) against larger batches (the default 8, and 32). Same replica count (1), same
`max_ongoing_requests` (the largest client count), so only batching differs.

    PYTHONPATH=platform python bench/bench_serve_gpu.py --vocab <bert vocab.txt> --json serve.json
    PYTHONPATH=platform python bench/bench_serve_gpu.py --vocab <bert vocab.txt> --small --clients 1,4 \\
        --duration 5 --batch-sizes 1,4      # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import platform as pyplatform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_cteg_gpu import build_encoder_dir  # noqa: E402
from load_serve import run_load, wait_healthy  # noqa: E402

TEXTS = "I am so happy to see you again, it has been far too long!"


def make_champion(tmp: Path, vocab: str, small: bool, max_frames: int) -> tuple[str, str, dict]:
    """A paper-shaped CTEG checkpoint registered as ``cteg-bench@champion`` in a sqlite store under
    ``tmp`` → (tracking URI, model name, resolved job)."""
    from facelab.core import checkpoint as ckpt
    from facelab.core import tracking
    from facelab.families.cteg.servable import build_cteg
    from facelab.spec.loading import load_job

    enc_dir, _ = build_encoder_dir(vocab, tmp / "encoder", small)
    sets = [
        f"model.text_encoder={enc_dir}",
        "model.stop_threshold=1.0e-9",
        f"data.max_frames={max(256, max_frames)}",
        "name=cteg-bench",
    ]
    if small:
        sets += ["model.d_model=64", "model.n_heads=4", "model.ff_dim=128", "model.latent_dim=16", "model.ewa_dim=16"]
    _, job = load_job(HERE.parent / "jobs" / "cteg.yaml", sets)
    torch.manual_seed(0)
    model = build_cteg(job, torch.zeros(53))
    ckpt.save(tmp / "checkpoint", model, job, keep_encoder=False)

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, "bench-serve", tmp)
    run = c.create_run(exp, run_name="bench-serve", tags={tracking.TAG_JOB_KIND: "cteg"})
    c.log_artifacts(run.info.run_id, str(tmp / "checkpoint"), "checkpoint")
    c.log_metric(run.info.run_id, "val/loss", 0.0)
    c.set_terminated(run.info.run_id)
    trial = tracking.TrialRun(
        run.info.run_id, "CTEG", 0, "FINISHED", {"val/loss": 0.0}, {}, {tracking.TAG_JOB_KIND: "cteg"}, "bench-serve"
    )
    tracking.promote(c, trial, job["name"], "val/loss", "minimize")
    return uri, job["name"], job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", required=True, help="a BERT vocab.txt for the random BERT-base encoder's tokenizer")
    ap.add_argument("--small", action="store_true", help="tiny shapes, for a CPU smoke run")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--batch-sizes", default="1,8,32", help="max_batch_size settings; 1 = no request batching")
    ap.add_argument("--max-frames", type=int, default=128)
    ap.add_argument("--duration", type=float, default=15.0, help="measured seconds per (setting, clients)")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--json")
    args = ap.parse_args()
    clients = [int(x) for x in args.clients.split(",")]
    batch_sizes = [int(x) for x in args.batch_sizes.split(",")]

    import ray
    from ray import serve

    from facelab.serve.app import build_app

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else pyplatform.processor() or "CPU"
    out: dict = {
        "device": device,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": pyplatform.python_version(),
        "max_frames": args.max_frames,
        "duration_s": args.duration,
        "results": [],
    }
    body = {"text": TEXTS, "num_samples": 1, "max_frames": args.max_frames}
    url = f"http://127.0.0.1:{args.port}"
    with tempfile.TemporaryDirectory(prefix="facelab-bench-serve-") as d:
        tmp = Path(d)
        uri, name, _ = make_champion(tmp, args.vocab, args.small, args.max_frames)
        ray.init(num_cpus=8 if cuda else 2, num_gpus=1 if cuda else 0, include_dashboard=False)
        serve.start(http_options={"host": "127.0.0.1", "port": args.port, "request_timeout_s": 300})
        for bs in batch_sizes:
            t0 = time.perf_counter()
            serve.run(
                build_app(
                    name,
                    uri,
                    max_ongoing_requests=max(clients + [bs]),
                    max_queued_requests=256,
                    max_batch_size=bs,
                    gpus_per_replica=1 if cuda else 0,
                ),
                name="facelab",
                route_prefix="/",
                blocking=False,
            )
            wait_healthy(url, None, timeout=600)
            print(f"max_batch_size {bs}: replica ready in {time.perf_counter() - t0:.1f}s", flush=True)
            for n in clients:
                run_load(url, n, args.warmup, body, {}, 300)
                row = {"max_batch_size": bs, **run_load(url, n, args.duration, body, {}, 300)}
                out["results"].append(row)
                print(json.dumps(row), flush=True)
            serve.delete("facelab")
        serve.shutdown()
        ray.shutdown()

    print(
        f"\ndevice: {device}; torch {torch.__version__}, ray {out['ray']}, Python {out['python']}; "
        f"{args.max_frames} frames per request, {args.duration:g} s per cell\n"
    )
    print("| max_batch_size | clients | requests | req/s | frames/s | p50 | p99 | failed |")
    print("|---|---|---|---|---|---|---|---|")
    base = {row["clients"]: row for row in out["results"] if row["max_batch_size"] == 1}
    for row in out["results"]:
        print(
            f"| {row['max_batch_size']} | {row['clients']} | {row['ok']} | {row['ok_rps']:.1f} | "
            f"{row['ok_rps'] * args.max_frames:,.0f} | {row['p50_ms']:.1f} ms | {row['p99_ms']:.1f} ms | "
            f"{row['failed']} |"
        )
    if base:
        print("\nthroughput gain of request batching (req/s against max_batch_size 1, same clients):")
        for row in out["results"]:
            b = base.get(row["clients"])
            if row["max_batch_size"] != 1 and b and b["ok_rps"] > 0:
                row["gain"] = row["ok_rps"] / b["ok_rps"]
                print(f"  max_batch_size {row['max_batch_size']}, {row['clients']} clients: {row['gain']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
