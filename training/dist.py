"""The distributed environment as torchrun or a PyTorchJob sets it, and the cores a rank may use."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def detect_dist() -> Dist:
    """torchrun sets LOCAL_RANK/LOCAL_WORLD_SIZE; a plain PyTorchJob pod sets only RANK and
    WORLD_SIZE (one process per pod), so the local values then default to 0 and 1."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return Dist(
        rank=int(env.get("RANK", 0)),
        world=world,
        local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world=int(env.get("LOCAL_WORLD_SIZE", 1 if "LOCAL_RANK" not in env else world)),
    )


def usable_cores() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota (pods)."""
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def pin_rank(d: Dist) -> None:
    """Each local rank, all its threads, on a core of its own, where this process may use
    exactly one CPU per local rank (this 2-core machine; a pod with a cpuset). There, two
    ranks of one thread each ran about 4% faster pinned (docs/BENCHMARKS.md, levers), and
    steadier: the scheduler moved them, and gloo's threads, between the cores. Not where more
    CPUs are visible than there are ranks (a pod under a CPU quota sees the node's cores):
    every such pod would crowd onto the first ones."""
    cores = sorted(os.sched_getaffinity(0))
    if d.local_world < 2 or len(cores) != d.local_world:
        return
    for task in os.listdir("/proc/self/task"):  # threads started already (torch's, ours)
        os.sched_setaffinity(int(task), {cores[d.local_rank]})


def place_rank(d: Dist) -> None:
    """A rank's CPU threads, as training and its throughput benchmark set them: its share of
    the cores this process may use, on a core of its own where pin_rank finds one per rank."""
    import torch

    threads = max(1, usable_cores() // d.local_world)  # before pinning narrows the affinity
    pin_rank(d)
    torch.set_num_threads(threads)


def init_process_group(d: Dist, backend: str, timeout_s: float = 600.0) -> None:
    """Join the group through a store prefixed by the torchrun restart count.

    torchrun keeps its agent's TCPStore across restarts, so without the prefix a restarted rank
    can read the address a dead peer published in the previous attempt and fail to connect
    (pytorch/pytorch#167288). Without torchrun (a plain PyTorchJob pod) rank 0 hosts the store.
    """
    from datetime import timedelta

    import torch.distributed as dist

    env = os.environ
    agent = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        env["MASTER_ADDR"],
        int(env["MASTER_PORT"]),
        world_size=d.world,
        is_master=not agent and d.rank == 0,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    attempt = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"mlops/attempt-{attempt}", store),
        rank=d.rank,
        world_size=d.world,
        timeout=timedelta(seconds=timeout_s),
    )


def wrap_ddp(model: Any, d: Dist) -> Any:
    """DDP for several ranks, the model itself for one. gradient_as_bucket_view saves a copy of
    every gradient per step; fp16-compressed all-reduce was measured too and bought nothing
    here (benchmarks/train_throughput), so the gradients stay exact."""
    if d.world == 1:
        return model
    # Imported here: the launcher imports this module and must not pay for torch.
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, gradient_as_bucket_view=True)
