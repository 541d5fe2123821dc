"""Process-group set-up from the launcher's environment (torchrun, SLURM srun, or none).

This is the one module (with cli/) that reads os.environ. torchrun's variables win when
present (torchrun inside an sbatch job); otherwise SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
with the master taken from the first host of SLURM_JOB_NODELIST; otherwise one process.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist

from ..errors import UserError

log = logging.getLogger(__name__)


class DistributedEnvError(UserError):
    """The launcher's environment is inconsistent (e.g. RANK >= WORLD_SIZE)."""


@dataclass
class LaunchInfo:
    launcher: str  # "torchrun" | "slurm" | "none"
    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None = None
    master_port: int | None = None
    restart_count: int = 0  # torchrun's elastic restarts (--max-restarts)
    requeue_count: int = 0  # SLURM requeues of the job (SLURM_RESTART_COUNT)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None
    launcher: str
    restart_count: int = 0
    requeue_count: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login1") → ["gpu01", "gpu02", ...]."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        m = re.match(r"^(.*?)\[([^\]]*)\](.*)$", part)
        if not m:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            if "-" in r:
                lo, hi = r.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{r}{suffix}")
    return hosts


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise DistributedEnvError(f"environment variable {key}={env[key]!r} is not an integer") from None


def detect_launch(env: Mapping[str, str] = os.environ) -> LaunchInfo:
    """Read rank/world/local rank and the rendezvous address from the launcher's variables."""
    restarts = _int(env, "TORCHELASTIC_RESTART_COUNT") if env.get("TORCHELASTIC_RESTART_COUNT") else 0
    requeues = _int(env, "SLURM_RESTART_COUNT") if env.get("SLURM_RESTART_COUNT") else 0
    if "RANK" in env or "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "WORLD_SIZE") if k not in env]
        if missing:
            raise DistributedEnvError(f"RANK and WORLD_SIZE must be set together; missing {', '.join(missing)}")
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        info = LaunchInfo(
            "torchrun",
            rank,
            world,
            local,
            env.get("MASTER_ADDR"),
            _int(env, "MASTER_PORT") if "MASTER_PORT" in env else None,
            restarts,
            requeues,
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
        hosts = expand_hostlist(nodelist) if nodelist else []
        addr = env.get("MASTER_ADDR") or (hosts[0] if hosts else None)
        if not addr:
            raise DistributedEnvError("SLURM job with several tasks but no SLURM_JOB_NODELIST or MASTER_ADDR")
        job = int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "0")) or 0)
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000
        info = LaunchInfo("slurm", rank, world, local, addr, port, 0, requeues)
    else:
        info = LaunchInfo("none", 0, 1, 0, restart_count=restarts, requeue_count=requeues)
    if info.world_size < 1:
        raise DistributedEnvError(f"world size must be >= 1, got {info.world_size}")
    if not 0 <= info.rank < info.world_size:
        raise DistributedEnvError(f"rank {info.rank} is outside world size {info.world_size}")
    if not 0 <= info.local_rank <= info.rank:
        raise DistributedEnvError(f"local rank {info.local_rank} is inconsistent with rank {info.rank}")
    return info


def pick_device(preference: str, local_rank: int, bound_per_task: bool = False) -> torch.device:
    """cuda:LOCAL_RANK, or cuda:0 when `bound_per_task` (srun --gpus-per-task / --gpu-bind leave each
    task exactly one visible GPU); otherwise the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise DistributedEnvError("train.device=cuda but no CUDA device is available")
        count = torch.cuda.device_count()
        index = 0 if bound_per_task and count == 1 else local_rank
        if index >= count:
            raise DistributedEnvError(f"local rank {local_rank} has no GPU: only {count} visible on this node")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def _store_for_elastic_restart(
    info: LaunchInfo, timeout: datetime.timedelta, env: Mapping[str, str]
) -> dist.Store | None:
    """A fresh key space in torchrun's shared store after an elastic restart (None: the default).

    torchrun keeps one TCPStore for all restart rounds and never clears it, so after
    `--max-restarts` the new workers read the dead workers' gloo/NCCL addresses and fail with
    "Connection refused" (pytorch/pytorch#135712). On one node every worker restarts together,
    so TORCHELASTIC_RESTART_COUNT is the same on all of them and makes a safe key prefix. Across
    nodes the counts can disagree; there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, exported before
    torchrun, gives each round its own store, and we say so.
    """
    if info.launcher != "torchrun" or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if env.get("GROUP_WORLD_SIZE", "1") != "1":
        if int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0 and info.rank == 0:
            log.warning(
                "torchrun --max-restarts across nodes: export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                "before torchrun, or restarted workers may connect to stale addresses"
            )
        return None
    if info.restart_count == 0:
        return None
    store = dist.TCPStore(info.master_addr, info.master_port, info.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"clipscale/restart{info.restart_count}", store)


def init_distributed(
    device_preference: str = "auto", timeout_s: int = 600, env: Mapping[str, str] = os.environ
) -> DistEnv:
    """Start the default process group when launched with several processes (NCCL on CUDA, gloo on CPU)."""
    info = detect_launch(env)
    device = pick_device(device_preference, info.local_rank, bound_per_task=info.launcher == "slurm")
    backend = None
    if info.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if info.launcher == "slurm":
            os.environ.setdefault("MASTER_ADDR", str(info.master_addr))
            os.environ.setdefault("MASTER_PORT", str(info.master_port))
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(
            backend=backend,
            rank=info.rank,
            world_size=info.world_size,
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            store=_store_for_elastic_restart(info, timeout, env),
        )
    elif dist.is_initialized():
        backend = dist.get_backend()
    return DistEnv(
        info.rank,
        info.world_size,
        info.local_rank,
        device,
        backend,
        info.launcher,
        info.restart_count,
        info.requeue_count,
    )


def ensure_process_group(env: DistEnv) -> None:
    """A private one-process group (and the LOCAL_RANK/RANK/WORLD_SIZE variables DeepSpeed insists
    on) when a library needs torch.distributed but the job has a single process."""
    if dist.is_initialized():
        return
    for key, value in (("LOCAL_RANK", env.local_rank), ("RANK", env.rank), ("WORLD_SIZE", env.world_size)):
        os.environ.setdefault(key, str(value))
    dist.init_process_group(
        "nccl" if env.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
    )


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def sum_over_ranks(value: int, device: torch.device) -> int:
    """Collective: the sum of every rank's `value` (one small all-reduce)."""
    if world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t)
    return int(t.item())


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (a one-element list without a process group)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def scatter_object(objs: list | None, src: int = 0):
    """`objs[rank]` on every rank (`objs` given on `src` only): each rank receives its own part, not
    the whole list."""
    if world_size() == 1:
        return objs[0]
    box = [None]
    dist.scatter_object_list(box, objs if rank() == src else None, src=src)
    return box[0]


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def child_env(defaults: Mapping[str, str]) -> dict[str, str]:
    """This process's environment for a child it launches, with `defaults` where it sets none (e.g.
    OMP_NUM_THREADS=1 for ranks that share the cores)."""
    return {**defaults, **os.environ}
