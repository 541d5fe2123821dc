"""DistributedDataParallel engine (also the single-process engine: no wrapper at world size 1).

Features are gathered by the loss (all_gather with grad); DDP all-reduces parameter
gradients only, once per optimizer step (no_sync on the other micro-batches).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import incompatibility, load_checkpoint_file, torch_save_synced
from ..config import Config, to_dict
from ..distributed import DistEnv
from ..errors import CheckpointError
from ..model import build_optimizer, clamp_logit_scale
from ..schedule import build_scheduler
from .base import Engine


def _to_cpu_copy(obj):
    """Deep copy with every tensor cloned to CPU, so training can go on while it is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu_copy(v) for v in obj)
    return obj


def _no_buffer_sync() -> dict:
    """Buffers (attention masks, position ids) are identical on every rank: skip per-forward syncs.

    Newer torch renamed `broadcast_buffers` to `forward_sync_buffers` and warns on the old name.
    """
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


class DDPEngine(Engine):
    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.module = model.to(self.device)
        if env.world_size > 1:
            self.wrapped = DistributedDataParallel(
                self.module,
                device_ids=[env.local_rank] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
                **_no_buffer_sync(),
            )
        else:
            self.wrapped = self.module
        self.runner = torch.compile(self.wrapped) if cfg.model.compile else self.wrapped
        self.optimizer = build_optimizer(self.module, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.steps, cfg.optim.lr)
        fp16 = cfg.model.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16) if fp16 else None

    # ------------------------------------------------------------------ compute
    def backward(self, loss):
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def no_sync(self):
        return self.wrapped.no_sync() if isinstance(self.wrapped, DistributedDataParallel) else contextlib.nullcontext()

    def optimizer_step(self) -> dict:
        clip = self.cfg.optim.grad_clip_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        if self.scaler is not None:  # the scaler skips inf/NaN steps itself and adapts its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = False
        elif not torch.isfinite(norm):
            skipped = True
        else:
            self.optimizer.step()
            skipped = False
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.module)
        return {"grad_norm": norm, "skipped": skipped}

    def skip_optimizer_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ state
    supports_async_save = True

    def _state(self, extra: dict) -> dict:
        return {
            "state_dict": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **extra,
        }

    def snapshot(self, extra: dict) -> dict | None:
        if not self.env.is_main:
            return None
        return _to_cpu_copy(self._state(extra))

    def save(self, path: Path, extra: dict) -> None:
        if self.env.is_main:
            torch_save_synced(self._state(extra), path)

    def load(self, path: Path) -> dict:
        state = load_checkpoint_file(path)
        problem = incompatibility(
            str(path), state.get("config"), to_dict(self.cfg), self.module.state_dict(), state["state_dict"]
        )
        if problem:
            raise CheckpointError(problem)
        self.module.load_state_dict(state["state_dict"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return {k: v for k, v in state.items() if k not in ("state_dict", "optimizer", "scheduler", "scaler")}
