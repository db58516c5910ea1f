"""Distributed helpers every worker loop shares: seeding, all-reduce of host floats, where ranks run.

The bottom layer: imports nothing of facelab. Safe to call without a process group (one worker,
or a test calling a loop's pieces directly): then they act on this process alone.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (same initial weights on every rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def allreduce(values: list[float], device) -> list[float]:
    """Sum ``values`` over all ranks (float64 on ``device``); the values themselves without a process group."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def worker_hosts() -> list[dict[str, str]]:
    """Where every rank runs, ordered by rank: ``{"node_id", "ip", "hostname"}`` (the Ray node id, the
    node's IP address and the host's name). A collective: every rank of the process group calls it."""
    import socket

    import ray

    node_id = ray.get_runtime_context().get_node_id()
    # The address the node registered with (`ray start --node-ip-address`), as `ray status` shows it.
    info = next((n for n in ray.nodes() if n.get("NodeID") == node_id), {})
    own = {
        "node_id": node_id,
        "ip": info.get("NodeManagerAddress") or ray.util.get_node_ip_address(),
        "hostname": info.get("NodeManagerHostname") or socket.gethostname(),
    }
    if not (dist.is_available() and dist.is_initialized()):
        return [own]
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, own)
    return hosts
