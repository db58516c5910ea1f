"""Smoke check of the Ray / MLflow bundle built by ``bench/gpu_site.sh``: run this first on the GPU machine.

    mkdir -p /tmp/site && tar xJf .gpusite/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD/platform
    python bench/gpu_site_check.py            # add --gpu to also run a TorchTrainer on the GPU(s) (NCCL)

One line ``OK <item> (seconds)`` per step, in this order: ray and mlflow import; a local Ray starts
(no dashboard, facelab's runtime_env shape); a TorchTrainer with 2 CPU workers does an all-reduce
and reports a checkpoint to a temporary ``storage_path``; a 2-trial Tuner (OptunaSearch +
ASHAScheduler, the search and scheduler facelab's sweeps use) over a trivial function; one Tune
trial that runs a TorchTrainer through ``TuneReportCallback`` (how ``facelab.runtime.sweep`` nests Train in
Tune); an MLflow sqlite store in a temporary directory (a run with metrics and artifacts, a
registered model version with alias ``champion``, downloaded back by its source and as
``models:/...@champion``); Ray Serve on a free port with a FastAPI ingress and ``@serve.batch``,
asked over HTTP with httpx; facelab's modules import; matplotlib draws a PNG when it is installed
(the bundle leaves it out). The first failure prints ``FAIL <item>`` with its traceback and exits 1;
a step that hangs is stopped after ``--step-timeout`` seconds (every thread's traceback is printed,
exit 1). Everything it writes lives in one temporary directory, removed at the end. ``--no-torch``
skips the steps that need torch, to check a bundle under a Python that has none.
"""

import argparse
import faulthandler
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

# As facelab.runtime.sweep.init_ray: Train V2 (the Train/Tune API facelab is written against).
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

PLATFORM = str(Path(__file__).resolve().parents[1] / "platform")
STEP_TIMEOUT = 240.0


def step(name: str, fn, *args):
    faulthandler.dump_traceback_later(STEP_TIMEOUT, exit=True)
    t0 = time.monotonic()
    try:
        out = fn(*args)
    except BaseException:  # noqa: BLE001 - report anything, then stop
        faulthandler.cancel_dump_traceback_later()
        print(f"FAIL {name} ({time.monotonic() - t0:.1f} s)", flush=True)
        traceback.print_exc()
        sys.stdout.flush()
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001
            pass
        os._exit(1)
    faulthandler.cancel_dump_traceback_later()
    print(f"OK {name} ({time.monotonic() - t0:.1f} s)", flush=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------


def versions() -> None:
    import importlib.metadata as md

    import mlflow  # noqa: F401 - the whole client package imports here
    import ray
    from mlflow.tracking import MlflowClient  # noqa: F401

    names = [
        "ray",
        "mlflow-skinny",
        "mlflow",
        "pyarrow",
        "fastapi",
        "starlette",
        "uvicorn",
        "pydantic",
        "httpx",
        "optuna",
        "sqlalchemy",
        "alembic",
        "grpcio",
        "protobuf",
        "typing_extensions",
        "packaging",
        "matplotlib",
        "torch",
        "numpy",
        "pandas",
    ]
    got = []
    for n in names:
        try:
            got.append(f"{n}={md.version(n)}")
        except md.PackageNotFoundError:
            got.append(f"{n}=-")
    print(f"   python {sys.version.split()[0]}; ray from {Path(ray.__file__).parent.parent}", flush=True)
    print("   " + " ".join(got), flush=True)


def ray_init(num_cpus: int, num_gpus: int | None):
    import ray

    # The same runtime_env shape as facelab.runtime.sweep.init_ray (goes through Ray's runtime-env agent).
    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join(x for x in (PLATFORM, os.environ.get("PYTHONPATH")) if x),
            "RAY_TRAIN_V2_ENABLED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    }
    kw = {} if num_gpus is None else {"num_gpus": num_gpus}
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env=env,
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        **kw,
    )
    res = ray.cluster_resources()
    assert res.get("CPU", 0) >= num_cpus, res

    @ray.remote(num_cpus=0)
    def ping(x):
        import facelab  # noqa: F401 - workers find facelab and the bundle through PYTHONPATH

        return x + 1

    assert ray.get(ping.remote(1)) == 2


def _allreduce_loop(config):
    import tempfile as tf

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    t = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(t)
    want = world * (world + 1) / 2
    assert abs(t.item() - want) < 1e-6, (t.item(), want)
    model = ray.train.torch.prepare_model(torch.nn.Linear(4, 2))
    loss = model(torch.ones(3, 4, device=device)).sum()
    loss.backward()
    metrics = {"allreduce": t.item(), "world": world, "loss": float(loss.item())}
    with tf.TemporaryDirectory() as d:
        if rank == 0:
            sd = (model.module if hasattr(model, "module") else model).state_dict()
            torch.save(sd, Path(d) / "model.pt")
            (Path(d) / "meta.txt").write_text(f"allreduce={t.item()}\n")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)


def torch_trainer(storage: Path, num_workers: int, use_gpu: bool, name: str):
    import torch
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _allreduce_loop,
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1, **({"GPU": 1} if use_gpu else {})}
        ),
        run_config=RunConfig(name=name, storage_path=str(storage), checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    assert result.error is None, result.error
    assert result.metrics["allreduce"] == num_workers * (num_workers + 1) / 2, result.metrics
    assert result.checkpoint is not None, "no checkpoint"
    ck = Path(result.checkpoint.path)
    assert str(ck).startswith(str(storage)), (ck, storage)
    assert (ck / "meta.txt").is_file() and (ck / "model.pt").is_file(), sorted(os.listdir(ck))
    torch.load(ck / "model.pt", weights_only=True, map_location="cpu")
    print(f"   checkpoint {ck.relative_to(storage)}; metrics {result.metrics}", flush=True)


def _trivial(config):
    from ray import tune

    for i in range(3):
        tune.report({"score": (config["x"] - 0.3) ** 2 + 0.01 * i, "step": i})


def tuner(storage: Path):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    t = tune.Tuner(
        tune.with_resources(_trivial, {"CPU": 0.5}),
        param_space={"x": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(
            metric="score",
            mode="min",
            num_samples=2,
            max_concurrent_trials=2,
            search_alg=OptunaSearch(seed=0),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=3, grace_period=1),
        ),
        run_config=tune.RunConfig(name="tune_smoke", storage_path=str(storage)),
    )
    grid = t.fit()
    assert len(grid) == 2 and not grid.errors, grid.errors
    best = grid.get_best_result()
    print(f"   best x={best.config['x']:.3f} score={best.metrics['score']:.4f}", flush=True)


def _tune_train_trial(config):
    from ray import tune
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trainer = TorchTrainer(
        _allreduce_loop,
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(
            name=f"train_{tune.get_context().get_trial_id()}",
            storage_path=config["storage"],
            callbacks=[TuneReportCallback()],
        ),
    )
    result = trainer.fit()
    assert result.checkpoint is not None


def tune_over_train(storage: Path):
    from ray import tune

    t = tune.Tuner(
        tune.with_resources(_tune_train_trial, {"CPU": 0.01}),
        param_space={"storage": str(storage / "train")},
        tune_config=tune.TuneConfig(num_samples=1),
        run_config=tune.RunConfig(name="tune_train_smoke", storage_path=str(storage / "tune")),
    )
    grid = t.fit()
    assert len(grid) == 1 and not grid.errors, grid.errors
    assert grid[0].metrics.get("allreduce") == 1.0, grid[0].metrics


def mlflow_registry(tmp: Path):
    import mlflow
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.create_experiment("gpu_site_check", artifact_location=(tmp / "mlartifacts").resolve().as_uri())
    run = c.create_run(exp, run_name="smoke", tags={"facelab.role": "trial"})
    rid = run.info.run_id
    c.log_param(rid, "lr", "0.001")
    for s in range(3):
        c.log_metric(rid, "val/loss", 1.0 / (s + 1), step=s)
    src = tmp / "ckpt"
    src.mkdir()
    (src / "config.json").write_text('{"d_model": 8}\n')
    (src / "model.safetensors").write_bytes(b"\0" * 64)
    c.log_artifacts(rid, str(src), "checkpoint")
    c.log_text(rid, "a: 1\n", "config.yaml")
    c.set_terminated(rid, "FINISHED")
    got = c.get_run(rid)
    assert got.data.metrics["val/loss"] == 1.0 / 3, got.data.metrics
    assert {a.path for a in c.list_artifacts(rid, "checkpoint")} == {
        "checkpoint/config.json",
        "checkpoint/model.safetensors",
    }
    c.create_registered_model("smoke_model")
    mv = c.create_model_version(
        "smoke_model",
        source=f"{got.info.artifact_uri.rstrip('/')}/checkpoint",
        run_id=rid,
        tags={"facelab.metric": "val/loss"},
    )
    c.set_registered_model_alias("smoke_model", "champion", mv.version)
    champ = c.get_model_version_by_alias("smoke_model", "champion")
    assert champ.version == mv.version and champ.run_id == rid
    dst = tmp / "download"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=champ.source, dst_path=str(dst), tracking_uri=uri))
    assert (local / "config.json").read_text() == '{"d_model": 8}\n', sorted(os.listdir(local))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    local2 = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri="models:/smoke_model@champion", dst_path=str(tmp / "download2"), tracking_uri=uri
        )
    )
    assert (local2 / "model.safetensors").stat().st_size == 64, sorted(os.listdir(local2))
    runs = c.search_runs([exp], filter_string="tags.`facelab.role` = 'trial'")
    assert [r.info.run_id for r in runs] == [rid]
    print(f"   {uri}: run {rid[:8]}, smoke_model v{mv.version} @champion", flush=True)


def serve_http():
    import httpx
    from fastapi import FastAPI
    from pydantic import BaseModel
    from ray import serve

    api = FastAPI()

    class Req(BaseModel):
        x: float

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16)
    @serve.ingress(api)
    class Smoke:
        def __init__(self):
            self.batches: list[int] = []

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def double(self, xs: list[float]) -> list[float]:
            self.batches.append(len(xs))
            return [2 * x for x in xs]

        @api.post("/double")
        async def post(self, req: Req) -> dict:
            return {"y": await self.double(req.x)}

        @api.get("/healthz")
        def healthz(self) -> dict:
            return {"ok": True, "batches": self.batches}

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
    serve.run(Smoke.bind(), name="smoke", route_prefix="/")
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30, trust_env=False) as h:
            r = h.post("/double", json={"x": 21})
            assert r.status_code == 200 and r.json() == {"y": 42.0}, (r.status_code, r.text)
            bad = h.post("/double", json={"x": "nope"})
            assert bad.status_code == 422, (bad.status_code, bad.text)
            assert h.get("/healthz").json()["ok"] is True
    finally:
        serve.shutdown()
    print(f"   POST http://127.0.0.1:{port}/double -> 42.0", flush=True)


def facelab_imports(with_torch: bool):
    import importlib

    mods = ["facelab.serve.app", "facelab.runtime.sweep", "facelab.core.tracking"]
    if with_torch:
        mods.insert(2, "facelab.families.cteg.loop")
    for m in mods:
        importlib.import_module(m)


def matplotlib_png():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0], label="loss")
    ax.legend()
    with tempfile.TemporaryDirectory() as d:
        fig.savefig(Path(d) / "p.png")
        plt.close(fig)
        assert (Path(d) / "p.png").stat().st_size > 1000


def main() -> int:
    global STEP_TIMEOUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--gpu",
        action="store_true",
        help="also run a TorchTrainer with use_gpu=True (NCCL), one worker per visible GPU, at most 2",
    )
    ap.add_argument("--num-cpus", type=int, default=4, help="logical CPUs given to the local Ray (default 4)")
    ap.add_argument("--step-timeout", type=float, default=STEP_TIMEOUT)
    ap.add_argument(
        "--no-torch",
        action="store_true",
        help="skip what needs torch (the Train steps and "
        "facelab.families.cteg.loop): to check a bundle under a Python without torch",
    )
    args = ap.parse_args()
    STEP_TIMEOUT = args.step_timeout

    t0 = time.monotonic()
    step("import ray, mlflow", versions)
    num_gpus = None
    if args.gpu:
        import torch

        num_gpus = min(2, torch.cuda.device_count())
        if num_gpus == 0:
            print("FAIL --gpu: torch sees no CUDA device", flush=True)
            return 1
    with tempfile.TemporaryDirectory(prefix="gpu_site_check-") as d:
        tmp = Path(d)
        step(
            f"ray.init (num_cpus={args.num_cpus}, no dashboard)",
            ray_init,
            args.num_cpus,
            num_gpus if num_gpus is not None else 0,
        )
        if not args.no_torch:
            step(
                "Ray Train: TorchTrainer 2 CPU workers, all-reduce + checkpoint",
                torch_trainer,
                tmp / "train",
                2,
                False,
                "cpu_smoke",
            )
        if num_gpus:
            step(
                f"Ray Train: TorchTrainer {num_gpus} GPU worker(s), NCCL all-reduce + checkpoint",
                torch_trainer,
                tmp / "train_gpu",
                num_gpus,
                True,
                "gpu_smoke",
            )
        step("Ray Tune: 2 trials, OptunaSearch + ASHAScheduler", tuner, tmp / "tune")
        if not args.no_torch:
            step("Ray Tune + Train: TorchTrainer inside a trial, TuneReportCallback", tune_over_train, tmp / "nested")
        mdir = tmp / "mlflow"
        mdir.mkdir()
        step("MLflow sqlite: run, metric, artifacts, registry alias champion, download", mlflow_registry, mdir)
        step("Ray Serve: FastAPI ingress + @serve.batch over HTTP (httpx)", serve_http)
        import ray

        ray.shutdown()
        names = (
            "facelab.serve.app, facelab.runtime.sweep, "
            + ("" if args.no_torch else "facelab.families.cteg.loop, ")
            + "facelab.core.tracking"
        )
        step(f"{names} import", facelab_imports, not args.no_torch)
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            print(
                "-- matplotlib is not installed here: facelab's plots (sweep trials, facelab report) are off",
                flush=True,
            )
        else:
            step("matplotlib: a PNG through Agg (facelab.plots)", matplotlib_png)
    print(f"ALL OK ({time.monotonic() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
