"""all_gather WITH gradients across the default process group, timed: how every loss sees the global
batch from this rank's features (backward sums each slice's gradient over ranks)."""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist


class CommTimer:
    """Seconds spent in collectives (CUDA events on GPU, so timing does not force a sync)."""

    def __init__(self):
        self.seconds = 0.0
        self._events: list = []

    @contextlib.contextmanager
    def time(self, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0

    def pop(self) -> float:
        """Seconds since the last pop (synchronises pending CUDA events)."""
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherGrad(torch.autograd.Function):
    """Concatenate every rank's [b, d] tensor; backward sums the gradients of each slice over ranks
    (reduce-scatter on NCCL; all-reduce + slice on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, timer):
        rank, world = _world()
        ctx.rank, ctx.world, ctx.timer, ctx.b = rank, world, timer, x.shape[0]
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        with timer.time(x.device):
            dist.all_gather_into_tensor(out, x)  # one buffer, no per-rank tensors to concatenate
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # reduced in place below; autograd may share the input
        with ctx.timer.time(grad.device):
            if dist.get_backend() == "nccl":
                out = torch.empty((ctx.b, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
                dist.reduce_scatter_tensor(out, grad)
            else:
                dist.all_reduce(grad)
                out = grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]
        return out, None


class Gather:
    """all_gather with grad over the default group; `timer` accumulates the time it takes."""

    def __init__(self):
        self.timer = CommTimer()

    def rank_world(self) -> tuple[int, int]:
        return _world()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _world()[1] == 1:
            return x
        return _AllGatherGrad.apply(x, self.timer)

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather two [b, d] tensors in ONE collective each way (image and text features): half
        the latency-bound calls of gathering them one by one."""
        if self.rank_world()[1] == 1:
            return a, b
        fusable = a.ndim == b.ndim == 2 and a.shape[0] == b.shape[0] and a.dtype == b.dtype
        if not fusable:
            return self(a), self(b)
        both = self(torch.cat([a, b], dim=1))
        return both[:, : a.shape[1]], both[:, a.shape[1] :]
