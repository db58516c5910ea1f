"""Sweeps that fill a GPU: sweeps/cteg_depth.yaml (5 trials, N_c = 1..5, paper-size CTEG) on one GPU, run
one trial at a time (``resources.gpus_per_worker`` 1, ``max_concurrent_trials`` 1) and packed (0.2 of the GPU
each, 5 at once), side by side in one run, through the real ``facelab sweep`` (DVC's data check, Ray Tune +
Train, MLflow). Prints the wall time of each, the ratio packed / serial (the goal: <= 0.4), each trial's
time and metrics in both modes and their differences, and the GPU's mean utilisation and peak memory per mode
(nvidia-smi, sampled every 0.5 s). ``--json`` writes it all.

On the GPU machine (the bundle of bench/gpu_site.sh on PYTHONPATH, see bench/gpu_e2e.py):

    python3 bench/bench_packed_sweep.py --json packed.json

Both modes use the same project, data (the repo's params.yaml: 12,000 / 1,500 / 1,500 EmoAva pairs, built
by ``dvc repro emoava``), encoder (bench/gpu_encoder.py), ``--epochs`` epochs of ``--steps`` steps at batch
256, the same shortened test evaluation as bench/gpu_e2e.py and ``--cpus-per-worker`` CPUs per trial: only
the GPU share and the concurrency differ. The packed mode runs first, so warm file caches favour the
serial one.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_e2e  # noqa: E402
from gpu_encoder import encoder_for  # noqa: E402

METRICS = ("train/loss", "val/loss", "val/cppl", "test/cppl", "test/fgd", "test/diversity")


class GpuSampler(threading.Thread):
    """nvidia-smi every ``period`` s: utilisation (%) and memory used (MiB) of GPU 0."""

    def __init__(self, period: float = 0.5):
        super().__init__(daemon=True)
        self.period, self.samples, self._halt = period, [], threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                out = subprocess.run(
                    [
                        "nvidia-smi",
                        "--query-gpu=utilization.gpu,memory.used",
                        "--format=csv,noheader,nounits",
                        "-i",
                        "0",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                ).stdout.strip()
                util, mem = (float(x) for x in out.split(","))
                self.samples.append((time.monotonic(), util, mem))
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self._halt.wait(self.period)

    def stop(self) -> dict:
        self._halt.set()
        self.join(timeout=10)
        if not self.samples:
            return {}
        utils = [u for _, u, _ in self.samples]
        return {
            "samples": len(self.samples),
            "mean_util_pct": sum(utils) / len(utils),
            "busy_pct": 100 * sum(u > 0 for u in utils) / len(utils),
            "peak_mem_gib": max(m for _, _, m in self.samples) / 1024,
        }


def trials_of(project: Path, sweep: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{project / 'mlruns.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name(sweep)
    out = []
    for r in c.search_runs([exp.experiment_id], filter_string="tags.`facelab.role` = 'trial'"):
        gpu = json.loads(r.data.tags.get("facelab.gpu", "{}") or "{}")
        out.append(
            {
                "variant": r.data.tags.get("facelab.variant"),
                "status": r.info.status,
                "start": r.info.start_time / 1000,
                "end": (r.info.end_time or r.info.start_time) / 1000,
                "seconds": ((r.info.end_time or r.info.start_time) - r.info.start_time) / 1000,
                "gpu_free_at_start_gib": gpu.get("free_gib"),
                "gpu_share": gpu.get("gpus_per_worker"),
                "metrics": {k: r.data.metrics[k] for k in METRICS if k in r.data.metrics},
            }
        )
    return sorted(out, key=lambda t: t["variant"])


def max_overlap(trials: list[dict]) -> int:
    ev = sorted([(t["start"], 1) for t in trials] + [(t["end"], -1) for t in trials], key=lambda e: (e[0], e[1]))
    n = best = 0
    for _, d in ev:
        n += d
        best = max(best, n)
    return best


def run_mode(p: gpu_e2e.Project, name: str, base: list[str], gpus: float, concurrent: int) -> dict:
    sets = [f"name={name}", *base, f"resources.gpus_per_worker={gpus:g}", f"max_concurrent_trials={concurrent}"]
    cmd = "facelab sweep sweeps/cteg_depth.yaml " + " ".join(f"--set {s}" for s in sets)
    sampler = GpuSampler()
    sampler.start()
    t0 = time.monotonic()
    p.run("facelab", "sweep", "sweeps/cteg_depth.yaml", *[x for s in sets for x in ("--set", s)])
    wall = time.monotonic() - t0
    gpu = sampler.stop()
    trials = trials_of(p.root, name)
    bad = [t["variant"] for t in trials if t["status"] != "FINISHED"]
    if len(trials) != 5 or bad:
        raise RuntimeError(f"{name}: trials {[(t['variant'], t['status']) for t in trials]}")
    span = max(t["end"] for t in trials) - min(t["start"] for t in trials)
    gpu_e2e.log(
        f"{name}: wall {wall:.1f} s, trials span {span:.1f} s, at most {max_overlap(trials)} at once; "
        + "; ".join(f"{t['variant']} {t['seconds']:.1f} s {t['metrics']}" for t in trials)
        + f"; GPU {gpu}"
    )
    return {
        "command": cmd,
        "wall_s": wall,
        "trials_span_s": span,
        "trial_seconds_sum": sum(t["seconds"] for t in trials),
        "max_trials_at_once": max_overlap(trials),
        "gpu": gpu,
        "trials": trials,
    }


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--project", type=Path, default=Path("/tmp/facelab-packed"), help="where the project is made (emptied)"
    )
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40, help="train.max_steps_per_epoch (a full epoch is 47 steps)")
    ap.add_argument("--cpus-per-worker", type=float, default=3.0)
    ap.add_argument("--share", type=float, default=0.2, help="gpus_per_worker of the packed mode")
    ap.add_argument("--concurrent", type=int, default=5, help="max_concurrent_trials of the packed mode")
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="another override, both modes"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    vers = gpu_e2e.versions()
    gpu_e2e.log(f"versions: {vers}")
    t = time.monotonic()
    p = gpu_e2e.make_project(args.project)
    encoder = encoder_for(p.root / "models" / "encoder-minilm-random")
    p.run("dvc", "repro", "emoava")
    setup_s = time.monotonic() - t
    base = [
        f"model.text_encoder={encoder}",
        f"train.epochs={args.epochs}",
        f"train.max_steps_per_epoch={args.steps}",
        f"resources.cpus_per_worker={args.cpus_per_worker:g}",
        *gpu_e2e.PAPER_EVAL,
        *args.sets,
    ]
    packed = run_mode(p, "cteg-depth-packed", base, args.share, args.concurrent)
    serial = run_mode(p, "cteg-depth-serial", base, 1.0, 1)
    ratio = packed["wall_s"] / serial["wall_s"]

    diffs = {}
    for ts, tp in zip(serial["trials"], packed["trials"], strict=True):
        assert ts["variant"] == tp["variant"]
        for k in METRICS:
            if k in ts["metrics"] and k in tp["metrics"]:
                diffs.setdefault(k, []).append(rel(ts["metrics"][k], tp["metrics"][k]))
    spread = {}  # how much the metric moves between variants (N_c), for scale
    for k in METRICS:
        vals = [t["metrics"][k] for t in serial["trials"] if k in t["metrics"]]
        if len(vals) > 1:
            spread[k] = (max(vals) - min(vals)) / max(abs(sum(vals) / len(vals)), 1e-12)
    out = {
        "versions": vers,
        "encoder": "minilm" if encoder == "minilm" else "random-init all-MiniLM-L6-v2 shape",
        "setup_s": setup_s,
        "serial": serial,
        "packed": packed,
        "ratio_packed_over_serial": ratio,
        "max_rel_diff": {k: max(v) for k, v in diffs.items()},
        "rel_spread_between_variants": spread,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))

    print("\n==== bench_packed_sweep ====")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"encoder: {out['encoder']}; setup (project, encoder, dvc repro emoava): {setup_s:.1f} s")
    for mode, r in (("serial", serial), ("packed", packed)):
        g = r["gpu"]
        print(f"{mode}: {r['command']}")
        print(
            f"  wall {r['wall_s']:.1f} s (trials span {r['trials_span_s']:.1f} s, sum of trial times "
            f"{r['trial_seconds_sum']:.1f} s, at most {r['max_trials_at_once']} at once); GPU mean util "
            f"{g.get('mean_util_pct', math.nan):.1f} %, busy {g.get('busy_pct', math.nan):.0f} % of samples, "
            f"peak memory {g.get('peak_mem_gib', math.nan):.1f} GiB"
        )
    print(
        "| trial | serial s | packed s | free GiB at start (packed) | "
        + " | ".join(f"{k} serial / packed" for k in METRICS)
        + " |"
    )
    print("|---" * (4 + len(METRICS)) + "|")
    for ts, tp in zip(serial["trials"], packed["trials"], strict=True):
        cells = [f"{ts['metrics'].get(k, math.nan):.4g} / {tp['metrics'].get(k, math.nan):.4g}" for k in METRICS]
        print(
            f"| {ts['variant']} | {ts['seconds']:.1f} | {tp['seconds']:.1f} | {tp['gpu_free_at_start_gib']} | "
            + " | ".join(cells)
            + " |"
        )
    print(
        "max relative difference serial vs packed: " + ", ".join(f"{k} {v:.2e}" for k, v in out["max_rel_diff"].items())
    )
    print("relative spread between variants (serial): " + ", ".join(f"{k} {v:.2e}" for k, v in spread.items()))
    verdict = "met" if ratio <= 0.4 else "MISSED"
    print(
        f"RATIO packed / serial = {packed['wall_s']:.1f} / {serial['wall_s']:.1f} = {ratio:.3f} (goal <= 0.4: {verdict})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
