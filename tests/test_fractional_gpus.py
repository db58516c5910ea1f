"""Fractional GPUs (several trials share one card): the sweep's resource checks and the worker's memory
headroom check, on the CPU. Only the GPU memory query is faked (free/total bytes of a card cannot be
produced without one); the decisions around it are the real code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from facelab.runtime import worker
from facelab.runtime.sweep import SweepError, check_gpu_share, check_resources, scaling_kwargs, trials_at_once
from facelab.spec.loading import load_sweep

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3
H200 = {"CPU": 16.0, "GPU": 1.0, "memory": 100 * GiB}


def depth(*sets: str):
    """sweeps/cteg_depth.yaml as the CLI loads it, with --set overrides."""
    return load_sweep(REPO / "sweeps" / "cteg_depth.yaml", list(sets), root=REPO).spec


# ---- the sweep: validation of the share, what fits, what Ray Train is given ----------------------------


def test_a_fractional_share_passes_validation_and_reaches_ray_train_as_a_fraction():
    spec = depth("resources.gpus_per_worker=0.2", "max_concurrent_trials=5", "resources.cpus_per_worker=3")
    assert spec.resources.gpus_per_worker == 0.2 and spec.max_concurrent_trials == 5
    kw = scaling_kwargs(spec.resources.model_dump())
    assert kw == {"num_workers": 1, "use_gpu": True, "resources_per_worker": {"CPU": 3.0, "GPU": 0.2}}
    from ray.train import ScalingConfig

    sc = ScalingConfig(**kw)  # Ray's own validation accepts it
    assert sc.total_resources == {"CPU": 3.0, "GPU": 0.2}


def test_no_gpu_share_trains_on_the_cpu():
    kw = scaling_kwargs({"num_workers": 2, "gpus_per_worker": 0, "cpus_per_worker": 0.5})
    assert kw == {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 0.5}}


@pytest.mark.parametrize(("workers", "gpus"), [(1, 0.2), (1, 0.5), (1, 1), (2, 1), (1, 2), (4, 2), (1, 0.0001)])
def test_shares_ray_and_ddp_can_honour(workers, gpus):
    check_gpu_share(workers, gpus)


@pytest.mark.parametrize(
    ("workers", "gpus", "says"),
    [
        (1, 1.5, "whole number"),
        (2, 0.5, "NCCL"),
        (1, 0.00001, "resolution"),
    ],
)
def test_shares_ray_or_ddp_cannot_honour_are_refused_with_the_fix(workers, gpus, says):
    with pytest.raises(SweepError, match=says):
        check_gpu_share(workers, gpus)
    with pytest.raises(SweepError, match=says):  # also where the trial builds its ScalingConfig
        scaling_kwargs({"num_workers": workers, "gpus_per_worker": gpus, "cpus_per_worker": 1})


def test_a_sweep_with_a_bad_share_is_refused_before_anything_starts():
    spec = depth("resources.gpus_per_worker=0.5", "resources.num_workers=2")
    with pytest.raises(SweepError, match="num_workers: 1 to pack"):
        check_resources(spec, total=H200)


def test_five_trials_of_a_fifth_fit_one_gpu_at_once():
    said = []
    spec = depth("resources.gpus_per_worker=0.2", "max_concurrent_trials=5", "resources.cpus_per_worker=3")
    assert check_resources(spec, total=H200, log=said.append) == 5
    assert said == []  # nothing to warn about
    assert trials_at_once(spec.resources.model_dump(), H200) == {"CPU": 5, "GPU": 5}


def test_whole_gpu_trials_run_one_at_a_time_and_the_sweep_says_how_to_pack():
    said = []
    spec = depth("max_concurrent_trials=5", "resources.cpus_per_worker=3")  # gpus_per_worker: 1 (the YAML's)
    assert check_resources(spec, total=H200, log=said.append) == 1
    assert len(said) == 1 and "runs 1 trial(s) of this size at once (CPU: 5, GPU: 1)" in said[0]
    assert "resources.gpus_per_worker=0.2" in said[0]


def test_cpus_can_be_the_limit_of_packing():
    said = []
    spec = depth("resources.gpus_per_worker=0.2", "max_concurrent_trials=5", "resources.cpus_per_worker=4")
    assert check_resources(spec, total=H200, log=said.append) == 3  # 16 CPUs // (4 + 0.01)
    assert "CPU: 3, GPU: 5" in said[0] and "gpus_per_worker=0.2" not in said[0]


def test_shares_pack_per_card():
    res = {"num_workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0.3}
    assert trials_at_once(res, {"CPU": 64, "GPU": 4})["GPU"] == 12  # 3 per card (0.9), not 13 (4 / 0.3)
    res = {"num_workers": 2, "cpus_per_worker": 1, "gpus_per_worker": 1}
    assert trials_at_once(res, {"CPU": 64, "GPU": 4})["GPU"] == 2


def test_a_share_on_a_cluster_without_gpus_does_not_fit():
    spec = depth("resources.gpus_per_worker=0.2")
    with pytest.raises(SweepError, match="GPU: needs 0.2, cluster has 0"):
        check_resources(spec, total={"CPU": 16.0})


def test_driver_resources_the_cluster_lacks_are_refused_before_anything_starts():
    """resources.driver_resources (where trial drivers may run) is checked like the workers' share."""
    spec = depth("resources.gpus_per_worker=0", "resources.driver_resources={stable: 0.01}")
    with pytest.raises(SweepError, match="stable: needs 0.01, cluster has 0"):
        check_resources(spec, total={"CPU": 16.0})
    assert check_resources(spec, total={"CPU": 16.0, "stable": 1.0}, log=lambda _: None) >= 1


# ---- the worker: free memory headroom before it starts -------------------------------------------------


def card(free_gib: float, total_gib: float = 140.0):
    """The one fake: what torch.cuda.mem_get_info would say about the card."""
    calls = []

    def query(device):
        calls.append(str(device))
        return int(free_gib * GiB), int(total_gib * GiB)

    query.calls = calls
    return query


def test_a_worker_starts_when_its_share_is_free():
    q = card(free_gib=30)  # 0.2 x 140 GiB = 28 GiB promised, 90 % of it = 25.2 GiB wanted
    got = worker.check_gpu_headroom("cuda:0", 0.2, headroom=0.9, query=q)
    assert q.calls == ["cuda:0"]
    assert got["need_gib"] == pytest.approx(25.2, abs=0.01) and got["free_gib"] == 30.0
    assert got["gpus_per_worker"] == 0.2 and got["device"] == "cuda:0"
    json.dumps(got)  # logged as the trial's facelab.gpu tag


def test_a_worker_refuses_to_start_when_neighbours_hold_its_share():
    with pytest.raises(worker.GpuHeadroomError) as e:
        worker.check_gpu_headroom("cuda:0", 0.2, headroom=0.9, query=card(free_gib=20))
    msg = str(e.value)
    assert "20.0 GiB free of 140.0 GiB" in msg and "gpus_per_worker=0.2 is 28.0 GiB" in msg
    assert "(25.2 GiB)" in msg and "max_concurrent_trials" in msg and "FACELAB_GPU_HEADROOM" in msg


def test_the_boundary_is_the_share_times_the_headroom():
    total = 100.0
    need = worker.required_free_bytes(0.25, int(total * GiB), 0.8)  # 20 GiB
    assert need == int(0.25 * total * GiB * 0.8)
    worker.check_gpu_headroom("cuda:0", 0.25, headroom=0.8, query=lambda d: (need, int(total * GiB)))
    with pytest.raises(worker.GpuHeadroomError):
        worker.check_gpu_headroom("cuda:0", 0.25, headroom=0.8, query=lambda d: (need - 1, int(total * GiB)))


def test_whole_cards_want_the_card_and_more_cards_want_no_more_than_one():
    worker.check_gpu_headroom("cuda:0", 1, headroom=0.9, query=card(free_gib=139))
    with pytest.raises(worker.GpuHeadroomError):
        worker.check_gpu_headroom("cuda:0", 1, headroom=0.9, query=card(free_gib=100))  # a Serve replica holds 40
    got = worker.check_gpu_headroom("cuda:0", 2, headroom=0.9, query=card(free_gib=127))  # each worker sees one card
    assert got["need_gib"] == pytest.approx(126.0, abs=0.01)


@pytest.mark.parametrize(("device", "gpus"), [("cpu", 0.2), ("cuda:0", 0), ("cuda:0", None)])
def test_no_check_without_a_gpu_share(device, gpus):
    q = card(free_gib=0)
    assert worker.check_gpu_headroom(device, gpus, headroom=0.9, query=q) is None
    assert q.calls == []


def test_the_headroom_comes_from_the_environment_and_0_turns_the_check_off(monkeypatch):
    monkeypatch.delenv(worker.GPU_HEADROOM_ENV, raising=False)
    assert worker.gpu_headroom() == worker.DEFAULT_GPU_HEADROOM == 0.9
    monkeypatch.setenv(worker.GPU_HEADROOM_ENV, "0.5")
    worker.check_gpu_headroom("cuda:0", 0.2, query=card(free_gib=15))  # 14 GiB wanted
    monkeypatch.setenv(worker.GPU_HEADROOM_ENV, "0")
    q = card(free_gib=0)
    assert worker.check_gpu_headroom("cuda:0", 0.2, query=q) is None and q.calls == []
    for bad in ("lots", "1.5", "-0.1"):
        monkeypatch.setenv(worker.GPU_HEADROOM_ENV, bad)
        with pytest.raises(ValueError, match="between 0"):
            worker.gpu_headroom()
