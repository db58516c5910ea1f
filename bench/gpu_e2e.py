"""The real path on a GPU, end to end, as a user runs it: a fresh project (git + DVC) → `dvc repro emoava` →
`facelab sweep` (DVC's data check against dvc.lock, Ray Tune + Train on the GPU, MLflow) → `facelab promote` →
`facelab serve --gpus-per-replica 1` → one HTTP request to POST /v1/expressions. Every step is the real CLI in
a subprocess; nothing is patched. Prints a timed log and a summary table; ``--json`` writes the summary.

On the GPU machine (the Ray/MLflow/DVC bundle of bench/gpu_site.sh carried as .gpusite/), from the repo root:

    mkdir -p /tmp/site && tar xJf .gpusite/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD/platform
    python3 bench/gpu_e2e.py --json e2e.json                 # paper-size CTEG (jobs/cteg.yaml), 2 trials
    python3 bench/gpu_e2e.py --size tiny                     # jobs/cteg_tiny.yaml on a small corpus (the test's size)

``--size paper``: the repo's params.yaml (12,000 / 1,500 / 1,500 EmoAva pairs), sweeps/quickstart.yaml's two
variants on jobs/cteg.yaml (d_model 768, 12 heads, FFN 2048), ``--epochs`` epochs of ``--steps`` steps at
batch 256, a shortened test evaluation; ``--size tiny``: the tests' small corpus and jobs/cteg_tiny.yaml. Both
on ``resources.gpus_per_worker`` 1 (``--gpus-per-worker`` to change). The text encoder is all-MiniLM-L6-v2 where
the package is installed, else a random-init copy of its shape (bench/gpu_encoder.py says why). Where
``facelab`` and ``dvc`` are not on PATH (the GPU machine), ``python -m facelab`` / ``python -m dvc`` are used
through small shims in the project's ``.bin/`` (the DVC stage's command is ``facelab data build-emoava``).
Without git on the machine, the project is made with ``dvc init --no-scm``.

tests/test_gpu_e2e.py runs :func:`run` at the tiny size.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_encoder import encoder_for  # noqa: E402

# The tests' small corpus (tests/conftest.TINY_PARAMS, emoava only).
TINY_EMOAVA = {"n_train": 240, "n_dev": 48, "n_test": 48, "seed": 0}

PAPER_EVAL = [  # a shortened test evaluation (the full one decodes 1,500 + 2 x 750 + 2 x 1,500 sequences)
    "eval.max_texts=256",
    "eval.n_diversity=128",
    "eval.n_mmodality=128",
    "eval.n_bootstrap=200",
]
TINY_FAST = [  # tests/test_e2e.py's FAST overrides
    "train.max_val_batches=2",
    "data.train_subset=160",
    "data.dev_subset=32",
    "data.max_frames=48",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for n in ("torch", "ray", "mlflow-skinny", "mlflow", "dvc", "transformers", "fastapi"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    try:
        import torch

        if torch.cuda.is_available():
            out["device"] = torch.cuda.get_device_name(0)
            out["cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return out


class Project:
    """A throw-away facelab project and how to run the real CLI in it."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / ".bin"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
            env.pop(k, None)
        env.update(
            {
                "PATH": f"{self.bin}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "FACELAB_STORAGE": str(self.root / "ray_results"),
                "RAY_DEDUP_LOGS": "0",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(extra)
        return env

    def cmd(self, tool: str) -> list[str]:
        return [str(self.bin / tool)]

    def run(self, tool: str, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``tool args`` in the project, its output streamed live to ours (the log; a run cut short
        keeps what it printed); the output is also returned."""
        log(f"$ {tool} {' '.join(args)}")
        proc = subprocess.Popen(
            [*self.cmd(tool), *args],
            cwd=self.root,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines: list[str] = []
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                lines.append(line)
            rc = proc.wait()
        finally:
            timer.cancel()
        sys.stdout.flush()
        out = "".join(lines)
        if check and rc != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({rc}):\n{out[-6000:]}")
        return subprocess.CompletedProcess(proc.args, rc, out, None)


def make_project(dst: Path, emoava_params: dict | None = None) -> Project:
    """Copy what a project needs (dvc.yaml, params, jobs, sweeps, the data-stage sources) and init git + DVC,
    as tests/conftest.make_project does; ``emoava_params`` replaces params.yaml's ``emoava`` section."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, dst / name)
    for d in ("jobs", "sweeps"):
        shutil.copytree(REPO / d, dst / d)
    for pkg in ("data", "families/keyframe_lm"):  # the sources the DVC stages depend on
        src = dst / "platform" / "facelab" / pkg
        src.mkdir(parents=True)
        for f in (REPO / "platform" / "facelab" / pkg).glob("*.py"):
            shutil.copy(f, src / f.name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if emoava_params:
        params["emoava"] = dict(emoava_params)
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dst / ".gitignore").write_text("/data/\n/models/\n/mlruns.db\n/mlartifacts/\n/ray_results/\n/.bin/\n/serve.log\n")
    p = Project(dst)
    p.bin.mkdir()
    for tool, module in (("facelab", "facelab"), ("dvc", "dvc")):
        found = shutil.which(tool, path=str(Path(sys.executable).parent))
        shim = p.bin / tool
        if found:
            shim.symlink_to(found)
        else:
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
            shim.chmod(0o755)
    env = p.env()

    def sh(*a: str) -> None:
        subprocess.run(a, cwd=dst, env=env, check=True, capture_output=True, text=True)

    if shutil.which("git"):
        sh("git", "init", "-q")
        sh("git", "-c", "user.email=e2e@facelab", "-c", "user.name=e2e", "add", "-A")
        sh("git", "-c", "user.email=e2e@facelab", "-c", "user.name=e2e", "commit", "-q", "-m", "project")
        sh(str(p.bin / "dvc"), "init", "-q")
    else:
        sh(str(p.bin / "dvc"), "init", "-q", "--no-scm")
    sh(str(p.bin / "dvc"), "config", "core.analytics", "false")
    return p


def sweep_overrides(size: str, encoder: str, gpus_per_worker: float, epochs: int, steps: int) -> list[str]:
    sets = [
        f"model.text_encoder={encoder}",
        f"resources.gpus_per_worker={gpus_per_worker:g}",
        f"train.epochs={epochs}",
        f"train.max_steps_per_epoch={steps}",
        "max_concurrent_trials=1",
    ]
    if size == "paper":
        return ["job=jobs/cteg.yaml", "resources.cpus_per_worker=4", *sets, *PAPER_EVAL]
    return ["resources.cpus_per_worker=1", *sets, *TINY_FAST]


def http(method: str, url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:  # e.g. 503 while the replica starts: its body need not be JSON
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"{}")
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")[:500]}


def serve_and_ask(p: Project, gpus_per_replica: float, text: str, max_frames: int, wait_s: float = 600) -> dict:
    """`facelab serve` in the background, wait until healthy, one request, then stop it (SIGTERM)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    args = ["serve", "--port", str(port), "--gpus-per-replica", f"{gpus_per_replica:g}", "--watch-champion", "0"]
    log(f"$ facelab {' '.join(args)}  (background; log in serve.log)")
    out = open(p.root / "serve.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*p.cmd("facelab"), *args],
        cwd=p.root,
        env=p.env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    result: dict = {}
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"facelab serve exited ({proc.returncode}):\n{(p.root / 'serve.log').read_text()[-6000:]}"
                )
            try:
                status, body = http("GET", base + "/healthz", timeout=5)
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - t0 > wait_s:
                raise RuntimeError(
                    f"facelab serve not healthy after {wait_s:g} s:\n{(p.root / 'serve.log').read_text()[-6000:]}"
                )
            time.sleep(0.5)
        result["ready_s"] = time.monotonic() - t0
        log(f"healthy after {result['ready_s']:.1f} s: GET /healthz -> {body}")
        status, models = http("GET", base + "/v1/models")
        result["model"] = models
        log(f"GET /v1/models -> {status} {json.dumps(models)[:400]}")
        req = {"text": text, "num_samples": 1, "max_frames": max_frames, "seed": 0}
        t1 = time.perf_counter()
        status, ans = http("POST", base + "/v1/expressions", req, timeout=300)
        result["request_s"] = time.perf_counter() - t1
        result["status"] = status
        frames = [len(s["frames"]) for s in ans.get("sequences", [])]
        result["frames"] = frames
        result["frame_width"] = sorted({len(f) for s in ans.get("sequences", []) for f in s["frames"]})
        result["served_model"] = ans.get("model")
        log(
            f"POST /v1/expressions {json.dumps(req)} -> {status} in {result['request_s'] * 1000:.1f} ms: "
            f"{len(frames)} sequence(s) of {frames} frames x {result['frame_width']} floats, fps {ans.get('fps')}"
        )
        if status != 200:
            raise RuntimeError(f"POST /v1/expressions -> {status}: {ans}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()
        sys.stdout.write("---- serve.log (tail) ----\n" + (p.root / "serve.log").read_text()[-3000:] + "\n")
    return result


def trial_summary(p: Project, sweep: str) -> list[dict]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{p.root / 'mlruns.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name(sweep)
    out = []
    for r in c.search_runs([exp.experiment_id], filter_string="tags.`facelab.role` = 'trial'"):
        out.append(
            {
                "variant": r.data.tags.get("facelab.variant"),
                "status": r.info.status,
                "seconds": (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time else None,
                "data_md5": r.data.tags.get("facelab.data.md5"),
                "git_sha": r.data.tags.get("facelab.git_sha"),
                **{k: v for k, v in r.data.metrics.items() if k in ("val/loss", "val/cppl", "test/cppl", "test/fgd")},
            }
        )
    return sorted(out, key=lambda t: t["variant"] or "")


def run(
    project_dir: Path,
    size: str = "paper",
    epochs: int = 2,
    steps: int = 20,
    gpus_per_worker: float = 1.0,
    gpus_per_replica: float = 1.0,
    sweep_name: str = "gpu-e2e",
) -> dict:
    """The whole path; returns the summary (timings, versions, trials, the answer's shape)."""
    t_all = time.monotonic()
    times: dict[str, float] = {}
    summary: dict = {"size": size, "versions": versions(), "times_s": times}
    log(f"versions: {summary['versions']}")

    t = time.monotonic()
    p = make_project(project_dir, None if size == "paper" else TINY_EMOAVA)
    encoder = encoder_for(p.root / "models" / "encoder-minilm-random")
    summary["encoder"] = "minilm" if encoder == "minilm" else "random-init all-MiniLM-L6-v2 shape"
    times["project + encoder"] = time.monotonic() - t
    log(f"project {p.root} ({'git' if (p.root / '.git').is_dir() else 'no git: dvc --no-scm'}); encoder {encoder}")

    t = time.monotonic()
    p.run("dvc", "repro", "emoava")
    times["dvc repro emoava"] = time.monotonic() - t
    lock = yaml.safe_load((p.root / "dvc.lock").read_text())
    summary["data_md5"] = lock["stages"]["emoava"]["outs"][0]["md5"]

    sets = [f"name={sweep_name}", *sweep_overrides(size, encoder, gpus_per_worker, epochs, steps)]
    summary["sweep_command"] = "facelab sweep sweeps/quickstart.yaml " + " ".join(f"--set {s}" for s in sets)
    t = time.monotonic()
    out = p.run("facelab", "sweep", "sweeps/quickstart.yaml", *[x for s in sets for x in ("--set", s)])
    times["facelab sweep"] = time.monotonic() - t
    summary["trials"] = trial_summary(p, sweep_name)
    bad = [tr for tr in summary["trials"] if tr["status"] != "FINISHED"]
    if len(summary["trials"]) != 2 or bad:
        raise RuntimeError(f"sweep trials: {summary['trials']}\n{out.stdout[-4000:]}")

    t = time.monotonic()
    out = p.run("facelab", "promote", sweep_name)
    times["facelab promote"] = time.monotonic() - t
    summary["promote"] = [ln for ln in out.stdout.splitlines() if "@champion" in ln][-1:]

    t = time.monotonic()
    summary["serve"] = serve_and_ask(
        p, gpus_per_replica, "I am so happy to see you again!", 64 if size == "paper" else 20
    )
    times["facelab serve → healthy → 1 request → stop"] = time.monotonic() - t
    times["total"] = time.monotonic() - t_all
    return summary


def print_summary(s: dict) -> None:
    print("\n==== gpu_e2e summary ====")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items()))
    print(f"encoder: {s['encoder']}; data md5 {s['data_md5']}")
    print(f"sweep: {s['sweep_command']}")
    print("| step | seconds |\n|---|---|")
    for k, v in s["times_s"].items():
        print(f"| {k} | {v:.1f} |")
    print("| trial | status | seconds | val/loss | val/cppl | test/cppl |\n|---|---|---|---|---|---|")
    for t in s["trials"]:
        print(
            f"| {t['variant']} | {t['status']} | {t['seconds']:.1f} | {t.get('val/loss', float('nan')):.2f} | "
            f"{t.get('val/cppl', float('nan')):.4f} | {t.get('test/cppl', float('nan')):.4f} |"
        )
    sv = s["serve"]
    print(f"promote: {s['promote']}")
    print(
        f"serve: healthy after {sv['ready_s']:.1f} s; POST /v1/expressions -> {sv['status']} in "
        f"{sv['request_s'] * 1000:.1f} ms, sequences of {sv['frames']} frames x {sv['frame_width']} floats; "
        f"model {sv['served_model']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--project", type=Path, default=Path("/tmp/facelab-gpu-e2e"), help="where the project is made (emptied)"
    )
    ap.add_argument("--size", choices=["paper", "tiny"], default="paper")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="train.max_steps_per_epoch")
    ap.add_argument("--gpus-per-worker", type=float, default=1.0)
    ap.add_argument("--gpus-per-replica", type=float, default=1.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    s = run(args.project, args.size, args.epochs, args.steps, args.gpus_per_worker, args.gpus_per_replica)
    print_summary(s)
    if args.json:
        args.json.write_text(json.dumps(s, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
