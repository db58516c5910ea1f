"""A CTEG trial on 1 and on 2 Ray Train (DDP) workers: scaling efficiency and agreeing loss curves.

Issue 5's multi-GPU item: "a CTEG sweep trial with 2 workers on a 2-GPU machine through Ray Train
(DDP): the scaling efficiency against 1 worker, and loss curves that agree".

Each run is ``facelab train JOB --num-workers N`` (``facelab.cli.main``, in this process): a
one-trial sweep through ``facelab.runtime.sweep.run_sweep`` -> Ray Tune -> ``run_trial`` -> a
``TorchTrainer`` over ``facelab.families.cteg.loop.worker_loop`` (``ScalingConfig(num_workers=N,
use_gpu=...)``), rank 0 logging the trial's MLflow run. Same job, data, seed and epochs for every
worker count. Everything lives in a temporary project directory:

* data: ``facelab.data.synth.generate_emoava`` writes an EmoAva-format corpus to ``data/emoava``
  (``--n-train`` / ``--n-dev`` sequences with the release's length model: log-normal, mean ~52
  frames, ~1.2 % past 256), which is what the worker loop reads;
* text encoder: a random-init BERT (bert-base shapes, or tiny with ``--small``) saved to
  ``encoder/`` by ``bench_cteg_gpu.build_encoder_dir`` over ``--vocab`` (any BERT vocab.txt);
  no model hub, no MiniLM package;
* job: ``jobs/cteg.yaml`` (the paper's CTEG; ``--small``: ``jobs/cteg_tiny.yaml``'s tiny shapes)
  with ``model.text_encoder`` set to that directory, full epochs and the whole dev split, no
  test-split evaluation (a rank-0 step after training, not part of the scaling) and no restarts;
* MLflow: the embedded sqlite store ``mlruns.db`` + ``mlartifacts/`` of the project (as a sweep
  without ``MLFLOW_TRACKING_URI``); Ray Tune/Train state under ``ray_results/``.

One thing differs from a user's ``facelab train``: there is no DVC here, so
``facelab.core.lineage.verify_data`` (which asks DVC whether the data matches ``dvc.lock``) is
replaced by a stand-in that tags the run with an md5 of the generated files. The training phase of
every epoch is timed inside the workers through the worker runtime's public hooks
(``FACELAB_WORKER_HOOKS=bench_ddp_gpu:install``, :func:`facelab.runtime.worker.add_hook`): the CTEG
loop's ``train`` phase ends after its own host sync of the loss sums (the all-reduce) and reports the
sequences and frames it trained. The loop's own ``epoch_time_s`` (training + validation) is reported
too. Epoch 0 (warm-up: kernel selection per bucket shape) is reported apart from the steady state
(epochs 1..; hence the default of 4 epochs).

NCCL's NVLink multicast (NVLS) is left off (``NCCL_NVLS_ENABLE=0`` unless set otherwise; the Ray
workers inherit it), as the shared GPU hosts require.

Batch convention (``facelab.families.cteg.loop.worker_loop``): ``optim.batch_size`` is the *global* batch,
sequences per optimizer step over all workers; each of N workers trains ``batch_size // N``. So the
runs take the same optimizer steps over the same global batches (``BucketBatchSampler`` cuts
identical global batches for any N; rank r takes the r-th slice), and throughput is global
sequences per second.

    PYTHONPATH=platform python bench/bench_ddp_gpu.py --vocab /path/to/bert/vocab.txt --json ddp.json
    PYTHONPATH=platform python bench/bench_ddp_gpu.py --vocab vocab.txt --small --epochs 2 --n-train 400  # CPU smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform as _platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

CONVENTION = (
    "optim.batch_size is the global batch (sequences per optimizer step summed over workers); each of N "
    "workers trains batch_size // N (facelab.families.cteg.loop.worker_loop). BucketBatchSampler cuts the same "
    "global batches for every N (same seed+epoch shuffle and length pools; rank r takes slice r), so every "
    "run takes the same optimizer steps over the same batches. The loss is a per-sequence mean and DDP "
    "averages the ranks' gradients, so a 2-worker step equals a 1-worker step on the whole batch in "
    "expectation, not bit for bit: each rank draws its own CVAE/dropout noise (seeded by seed, epoch and "
    "rank), and bf16 autocast and the all-reduce change rounding. Validation is the whole dev split, "
    "sharded over the ranks and all-reduced: the same sequences in every run."
)

CURVE_KEYS = ("train/loss", "val/loss")
HISTORY_KEYS = ("train/loss", "train/mse", "train/kl", "train/lg", "val/loss", "val/cppl", "epoch_time_s", "step", "lr")


# ------------------------------------------------------------------------------------------------
# Worker side. These functions run inside Ray (the Tune trial actor and the Train workers); Ray
# ships them by value (they live in __main__), so they import what they need themselves.
# ------------------------------------------------------------------------------------------------


def install(rt) -> None:
    """Worker hook (``FACELAB_WORKER_HOOKS=bench_ddp_gpu:install``): record each epoch's training
    phase as the worker runtime reports it (:func:`facelab.runtime.worker.add_hook`) -- its seconds
    and the sequences/frames the loop counted -- into ``<root>/bench_timing/<run id>/rank<r>.json``."""
    import json as _json
    from pathlib import Path as _Path

    import torch

    from facelab.runtime.worker import add_hook

    cuda = torch.cuda.is_available()
    out = (
        _Path(rt.config["root"])
        / "bench_timing"
        / str(rt.run_id or (rt.config.get("tracking") or {}).get("run_id", "run"))
    )
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": rt.rank,
        "world": rt.world,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "epochs": [],
    }

    def on_phase(name: str, seconds: float, epoch: int, info: dict) -> None:
        if name != "train":
            return
        record["epochs"].append(
            {
                "epoch": epoch,
                "steps": info.get("steps", 0),
                "seqs": info.get("sequences", 0),
                "frames": info.get("frames", 0),
                "padded_frames": info.get("padded_frames", 0),
                "train_s": seconds,
            }
        )
        (out / f"rank{rt.rank}.json").write_text(_json.dumps(record))

    add_hook("phase", on_phase)


# ------------------------------------------------------------------------------------------------
# Driver: project setup
# ------------------------------------------------------------------------------------------------


def build_project(root: Path, args) -> dict:
    """Data, encoder and job file of a throw-away facelab project in ``root``."""
    from facelab.data.synth import generate_emoava

    sys.path.insert(0, str(HERE))
    from bench_cteg_gpu import build_encoder_dir

    t0 = time.perf_counter()
    summary = generate_emoava(
        root / "data" / "emoava", n_train=args.n_train, n_dev=args.n_dev, n_test=16, seed=args.data_seed
    )
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _enc_dir, enc_cfg = build_encoder_dir(args.vocab, root / "encoder", args.small)
    enc_s = time.perf_counter() - t0
    (root / "jobs").mkdir()
    job_name = "cteg_tiny.yaml" if args.small else "cteg.yaml"
    shutil.copy(REPO / "jobs" / job_name, root / "jobs" / job_name)
    tr, dev = summary["splits"]["train"], summary["splits"]["dev"]
    print(
        f"data: {tr['sequences']} train / {dev['sequences']} dev sequences (facelab.data.synth), train mean "
        f"{tr['mean_length']:.1f} frames, {tr['over_256']} over 256, built in {data_s:.1f} s; encoder: random-init "
        f"BERT {enc_cfg.num_hidden_layers}x{enc_cfg.hidden_size} saved in {enc_s:.1f} s",
        flush=True,
    )
    return {
        "job": f"jobs/{job_name}",
        "train": tr,
        "dev": dev,
        "encoder": {"layers": enc_cfg.num_hidden_layers, "hidden": enc_cfg.hidden_size, "vocab": enc_cfg.vocab_size},
    }


def data_digest(data_dir: Path) -> tuple[str, int, int]:
    h, size, n = hashlib.md5(), 0, 0
    for f in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        b = f.read_bytes()
        h.update(f.relative_to(data_dir).as_posix().encode())
        h.update(b)
        size, n = size + len(b), n + 1
    return h.hexdigest(), size, n


def patch_driver(root: Path) -> None:
    """No DVC on the benchmark machine: the data's lineage is an md5 of the generated files (the one
    stand-in; nothing of the training path is replaced). Train workers time their epochs through the
    worker runtime's public hooks (:func:`install`, named in ``FACELAB_WORKER_HOOKS``)."""
    import facelab.core.lineage as lineage

    md5, size, nfiles = data_digest(root / "data" / "emoava")

    def verify_data(_root, data_path):
        return lineage.LockedOutput(
            stage="bench_ddp_gpu (synthetic, no DVC)", path=str(data_path), md5=md5, size=size, nfiles=nfiles
        )

    lineage.verify_data = verify_data
    os.environ["FACELAB_WORKER_HOOKS"] = "bench_ddp_gpu:install"
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(HERE), os.environ.get("PYTHONPATH")) if x)


def job_overrides(args, encoder_dir: Path) -> list[str]:
    sets = {
        "model.text_encoder": str(encoder_dir),
        "train.epochs": args.epochs,
        "train.seed": args.seed,
        "optim.batch_size": args.batch_size,
        "data.train_subset": "null",
        "data.dev_subset": "null",
        "train.max_steps_per_epoch": "null",
        "train.max_val_batches": "null",
        "eval.enabled": "false",
        "train.max_failures": 0,
    }
    return [f"{k}={v}" for k, v in sets.items()]


# ------------------------------------------------------------------------------------------------
# Driver: one run, and the summary
# ------------------------------------------------------------------------------------------------


def run_one(root: Path, job: str, n_workers: int, args, sets: list[str]) -> dict:
    from facelab import cli
    from facelab.core import tracking

    name = f"bench-ddp-{n_workers}w"
    argv = [
        "train",
        job,
        "--name",
        name,
        "--num-workers",
        str(n_workers),
        "--gpus-per-worker",
        "1" if args.gpu else "0",
        "--cpus-per-worker",
        f"{args.cpus_per_worker:g}",
    ]
    for s in sets:
        argv += ["--set", s]
    print(f"\n=== {n_workers} worker(s): facelab {' '.join(shlex.quote(a) for a in argv)}", flush=True)
    cwd = os.getcwd()
    os.chdir(root)  # facelab's project root is the working directory
    t0 = time.perf_counter()
    try:
        rc = cli.main(argv)
    finally:
        os.chdir(cwd)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"bench_ddp_gpu: `facelab train` with {n_workers} worker(s) exited {rc}")

    c = tracking.client(tracking.tracking_uri(root))
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_ROLE}` = 'trial'")
    if len(runs) != 1:
        raise SystemExit(f"bench_ddp_gpu: expected one trial run in experiment {name}, found {len(runs)}")
    run = runs[0]
    hist = {}
    for k in HISTORY_KEYS:
        pts = sorted(c.get_metric_history(run.info.run_id, k), key=lambda m: m.step)
        hist[k] = [m.value for m in pts]
    ranks = []
    for f in sorted((root / "bench_timing" / run.info.run_id).glob("rank*.json")):
        ranks.append(json.loads(f.read_text()))
    ranks.sort(key=lambda r: r["rank"])
    return {
        "workers": n_workers,
        "experiment": name,
        "run_id": run.info.run_id,
        "status": run.info.status,
        "worker_nodes": run.data.tags.get("facelab.worker_nodes"),
        "wall_s": wall,
        "history": hist,
        "ranks": ranks,
    }


def has_timing(r: dict) -> bool:
    n_epochs = len(r["history"]["epoch_time_s"])
    return len(r["ranks"]) == r["workers"] and all(len(x["epochs"]) == n_epochs for x in r["ranks"])


def epoch_figures(r: dict, batch_size: int, hooks: bool) -> dict:
    """Per-epoch training-phase time and global sequences/s (``hooks``), else the loop's epoch_time_s."""
    hist, n = r["history"], r["workers"]
    n_epochs = len(hist["epoch_time_s"])
    steps_cum = [int(s) for s in hist["step"]]
    steps = [b - a for a, b in zip([0] + steps_cum[:-1], steps_cum)]
    per_worker = max(1, batch_size // n)
    timed = hooks and has_timing(r)
    out = {
        "steps": steps,
        "per_worker_batch": per_worker,
        "global_batch": per_worker * n,
        "loop_epoch_s": hist["epoch_time_s"],
        "timed_train_phase": timed,
    }
    if timed:
        train_s = [max(x["epochs"][e]["train_s"] for x in r["ranks"]) for e in range(n_epochs)]
        seqs = [sum(x["epochs"][e]["seqs"] for x in r["ranks"]) for e in range(n_epochs)]
        frames = [[x["epochs"][e]["frames"] for x in r["ranks"]] for e in range(n_epochs)]
        padded = [[x["epochs"][e]["padded_frames"] for x in r["ranks"]] for e in range(n_epochs)]
        out.update(
            train_s=train_s,
            seqs=seqs,
            frames_per_rank=frames,
            padded_per_rank=padded,
            padded_per_real=[sum(p) / max(1, sum(f)) for p, f in zip(padded, frames)],
            device=r["ranks"][0]["device"],
            torch_threads=r["ranks"][0]["torch_threads"],
        )
    else:  # the loop's epoch clock: training + validation
        out.update(train_s=list(hist["epoch_time_s"]), seqs=[s * per_worker * n for s in steps])
    t, s = out["train_s"], out["seqs"]
    out["seq_per_s"] = [q / x for q, x in zip(s, t)]
    steady = range(1, n_epochs) if n_epochs > 1 else range(n_epochs)
    out["steady_epochs"] = list(steady)
    out["steady_train_s"] = sum(t[e] for e in steady) / len(steady)
    out["steady_seq_per_s"] = sum(s[e] for e in steady) / sum(t[e] for e in steady)
    out["steady_loop_epoch_s"] = sum(hist["epoch_time_s"][e] for e in steady) / len(steady)
    out["steady_loop_seq_per_s"] = sum(s[e] for e in steady) / sum(hist["epoch_time_s"][e] for e in steady)
    out["warmup_train_s"], out["warmup_seq_per_s"] = t[0], out["seq_per_s"][0]
    return out


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


def versions() -> dict:
    import mlflow
    import ray
    import torch
    import transformers

    return {
        "python": _platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
        "transformers": transformers.__version__,
    }


def device_label(gpu: bool, runs: list[dict]) -> str:
    """The workers' device (named by a worker: the driver never touches CUDA) and the machine's count."""
    import torch

    if gpu:
        name = next((r["ranks"][0]["device"] for r in runs if r["ranks"]), "CUDA GPU")
        return f"{name} ({torch.cuda.device_count()} on the machine)"
    return f"CPU ({os.cpu_count()} cores, {_platform.machine()})"


def command_line(args) -> str:
    argv = list(sys.argv[1:])
    for i, a in enumerate(argv):
        if a == "--vocab" and i + 1 < len(argv):
            argv[i + 1] = "<bert vocab.txt>"
        elif a.startswith("--vocab="):
            argv[i] = "--vocab=<bert vocab.txt>"
    return "PYTHONPATH=platform python bench/bench_ddp_gpu.py " + " ".join(
        a if a.startswith("<") else shlex.quote(a) for a in argv
    )


def print_summary(results: dict) -> None:
    runs, figs = results["runs"], results["figures"]
    ns = [r["workers"] for r in runs]
    base = figs[0]
    v = results["versions"]
    cfg = results["config"]
    print(
        "\n## CTEG trial on Ray Train DDP: "
        + " vs ".join(f"{n} worker{'s' if n > 1 else ''}" for n in ns)
        + " (`bench/bench_ddp_gpu.py`)\n"
    )
    print(
        f"Device: {results['device']}; Python {v['python']}, torch {v['torch']}, ray {v['ray']}, "
        f"mlflow {v['mlflow']}, transformers {v['transformers']}; each worker {'1 GPU (NCCL)' if cfg['gpu'] else 'on the CPU (gloo)'} "
        f"+ {cfg['cpus_per_worker']:g} CPU reserved."
    )
    print(
        f"Job: `{cfg['job']}` ({cfg['model']}), random-init BERT encoder {cfg['encoder']} (frozen, states cached), "
        f"{cfg['n_train']:,} train / {cfg['n_dev']:,} dev synthetic EmoAva sequences (mean "
        f"{cfg['mean_len']:.1f} frames, MSL {cfg['max_frames']}), global batch {cfg['batch_size']}, "
        f"{cfg['epochs']} epochs, seed {cfg['seed']}; each run is `facelab train --num-workers N` "
        f"(Tune -> TorchTrainer -> facelab.families.cteg.loop.worker_loop)."
    )
    print(f"Command: `{results['command']}`\n")
    print(f"Batch convention: {CONVENTION}\n")
    timed = all(f["timed_train_phase"] for f in figs)
    clock = "training phase (hooks)" if timed else "loop epoch_time_s (train + val)"
    print(
        "| workers | batch per worker | steps/epoch | epoch 0 s (warm-up) | steady s/epoch | steady seq/s "
        "| loop epoch s (train+val) | speed-up | scaling efficiency |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r, f in zip(runs, figs):
        n = r["workers"]
        speed = f["steady_seq_per_s"] / base["steady_seq_per_s"]
        eff = speed * runs[0]["workers"] / n
        print(
            f"| {n} | {f['per_worker_batch']} | {f['steps'][0]} | {f['warmup_train_s']:.2f} | "
            f"{f['steady_train_s']:.2f} | {f['steady_seq_per_s']:,.0f} | {f['steady_loop_epoch_s']:.2f} | "
            f"{speed:.2f}x | **{100 * eff:.0f} %** |"
        )
    steady = figs[0]["steady_epochs"]
    print(
        f"\nTimes: {clock}; steady state = epoch{'s' if len(steady) > 1 else ''} "
        f"{', '.join(map(str, steady))}; seq/s = global training sequences per second; scaling efficiency = "
        f"throughput(N) / (N x throughput({runs[0]['workers']}))."
    )
    if "padded_per_rank" in base:  # a rank's batch is padded to its own longest sequence
        total = sum(base["padded_per_rank"][-1])  # the baseline's padded frames in its last epoch
        for r, f in zip(runs, figs):
            pr = f["padded_per_rank"][-1]
            share = ", ".join(f"{x * r['workers'] / total:.3f}" for x in pr)
            print(
                f"{r['workers']} worker(s), last epoch: padded frames per rank {pr} = [{share}] x "
                f"(baseline's padded frames / {r['workers']}); padded/real frames {f['padded_per_real'][-1]:.3f}"
            )
    print(
        "`facelab train` wall time (Ray Tune + Train start-up, encoder-cache warm-up, validation, checkpoints "
        "and MLflow included): " + ", ".join(f"{r['workers']} worker(s) {r['wall_s']:.0f} s" for r in runs)
    )
    print("\n### Loss curves (per epoch, from each trial's MLflow run)\n")
    head = "| epoch |"
    for key in CURVE_KEYS:
        head += "".join(f" {key} {n}w |" for n in ns)
        head += "".join(f" rel. diff {n}w |" for n in ns[1:])
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    n_epochs = min(len(r["history"]["train/loss"]) for r in runs)
    for e in range(n_epochs):
        row = f"| {e} |"
        for key in CURVE_KEYS:
            vals = [r["history"][key][e] for r in runs]
            row += "".join(f" {x:.4f} |" for x in vals)
            row += "".join(f" {100 * rel_diff(vals[0], x):.2f} % |" for x in vals[1:])
        print(row)
    for key, d in results["agreement"].items():
        change = d["baseline_change"]
        print(
            f"{key}: max relative difference {100 * d['max_rel_diff']:.2f} % (baseline moved "
            f"{100 * change:.1f} % from epoch 0 to {n_epochs - 1})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", required=True, help="a BERT vocab.txt for the random-init encoder's tokenizer")
    ap.add_argument(
        "--small", action="store_true", help="tiny shapes (jobs/cteg_tiny.yaml, 2x64 encoder), for a CPU smoke run"
    )
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run; epoch 0 is the warm-up (default 4)")
    ap.add_argument("--n-train", type=int, default=12000, help="training sequences (default 12,000, the release's)")
    ap.add_argument("--n-dev", type=int, default=None, help="dev sequences (default n_train / 8, the release's ratio)")
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch, sequences per step over all workers (default: the job's, 256; --small 32)",
    )
    ap.add_argument("--workers", default="1,2", help="worker counts to run; the first is the baseline (default 1,2)")
    ap.add_argument(
        "--cpus-per-worker", type=float, default=None, help="CPUs reserved per worker (default 4 on GPU, 0.5 on CPU)"
    )
    ap.add_argument("--cpu", action="store_true", help="CPU workers (gloo) even if CUDA is available")
    ap.add_argument("--seed", type=int, default=0, help="train.seed (weights, batches, noise)")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--json", help="write every figure and curve here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary project (data, MLflow store, checkpoints)")
    args = ap.parse_args()
    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)  # no NVLink multicast on shared GPU hosts; Ray's workers inherit these

    try:
        import facelab  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO / "platform"))
    import torch
    import yaml

    workers = [int(x) for x in args.workers.split(",") if x.strip()]
    if not workers or min(workers) < 1:
        raise SystemExit("--workers: a comma-separated list of worker counts >= 1")
    args.gpu = torch.cuda.is_available() and not args.cpu
    if args.gpu and max(workers) > torch.cuda.device_count():
        raise SystemExit(f"--workers {args.workers}: only {torch.cuda.device_count()} GPU(s) here")
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 4.0 if args.gpu else 0.5
    job_file = REPO / "jobs" / ("cteg_tiny.yaml" if args.small else "cteg.yaml")
    job_yaml = yaml.safe_load(job_file.read_text())
    if args.batch_size is None:
        args.batch_size = int(job_yaml["optim"]["batch_size"])
    if args.n_dev is None:
        args.n_dev = max(32, args.n_train // 8)
    bad = [n for n in workers if args.batch_size % n]
    if bad:
        raise SystemExit(
            f"--batch-size {args.batch_size} is not divisible by {bad} workers: the global batch would "
            "shrink (the loop trains batch_size // N per worker) and the runs would not compare"
        )
    if args.n_train < args.batch_size:
        raise SystemExit("--n-train must hold at least one global batch")
    for k in ("MLFLOW_TRACKING_URI", "FACELAB_STORAGE", "RAY_ADDRESS"):  # the project's own store, a local Ray
        os.environ.pop(k, None)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    root = Path(tempfile.mkdtemp(prefix="facelab_ddp_bench_"))
    print(f"project: {root}", flush=True)
    try:
        setup = build_project(root, args)
        patch_driver(root)
        sets = job_overrides(args, root / "encoder")
        runs = [run_one(root, setup["job"], n, args, sets) for n in workers]
        hooks = all(has_timing(r) for r in runs)  # one clock for every run
        if not hooks:
            print("WARNING: no training-phase timings from the workers; using the loop's epoch_time_s (train + val)")
        figs = [epoch_figures(r, args.batch_size, hooks) for r in runs]
        if len({tuple(f["steps"]) for f in figs}) != 1:
            print(f"WARNING: the runs took different steps per epoch: {[f['steps'] for f in figs]}", flush=True)
        agreement = {}
        for key in CURVE_KEYS:
            curves = [r["history"][key] for r in runs]
            n_ep = min(len(c) for c in curves)
            agreement[key] = {
                "max_rel_diff": max(
                    (rel_diff(curves[0][e], c[e]) for c in curves[1:] for e in range(n_ep)), default=0.0
                ),
                "baseline_change": rel_diff(curves[0][0], curves[0][n_ep - 1]),
            }
        m = job_yaml["model"]
        model = (
            f"d_model {m['d_model']}, {m['n_heads']} heads, FFN {m['ff_dim']}, {m['cvad_layers']} CVAD layer(s), "
            f"latent {m['latent_dim']}, EwA {m['ewa']}, LTA {m['lta']}, L_g {m['target_guided']}"
        )
        enc = setup["encoder"]
        results = {
            "device": device_label(args.gpu, runs),
            "versions": versions(),
            "command": command_line(args),
            "argv": sys.argv[1:],
            "convention": CONVENTION,
            "config": {
                "job": setup["job"],
                "model": model,
                "encoder": f"{enc['layers']}x{enc['hidden']}",
                "n_train": setup["train"]["sequences"],
                "n_dev": setup["dev"]["sequences"],
                "mean_len": setup["train"]["mean_length"],
                "max_frames": job_yaml["data"]["max_frames"],
                "batch_size": args.batch_size,
                "epochs": args.epochs,
                "seed": args.seed,
                "gpu": args.gpu,
                "cpus_per_worker": args.cpus_per_worker,
                "workers": workers,
            },
            "runs": runs,
            "figures": figs,
            "agreement": agreement,
        }
        base = figs[0]
        results["scaling"] = {
            str(r["workers"]): {
                "speedup": f["steady_seq_per_s"] / base["steady_seq_per_s"],
                "efficiency": f["steady_seq_per_s"] / base["steady_seq_per_s"] * runs[0]["workers"] / r["workers"],
                "efficiency_loop_epoch": f["steady_loop_seq_per_s"]
                / base["steady_loop_seq_per_s"]
                * runs[0]["workers"]
                / r["workers"],
            }
            for r, f in zip(runs, figs)
        }
        print_summary(results)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
            print(f"\nwrote {args.json}")
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        if args.keep:
            print(f"kept the project (data, MLflow store mlruns.db, ray_results/): {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
