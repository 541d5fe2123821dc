"""DistributedDataParallel engine (also the single-process engine: no wrapper at world size 1).

Features are gathered by the loss (all_gather with grad); DDP all-reduces parameter
gradients only, once per optimizer step (no_sync on the other micro-batches).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint import load_checkpoint_file, torch_save_synced
from ..config import Config
from ..distributed import DistEnv
from ..errors import CheckpointError
from ..model import build_optimizer, clamp_logit_scale
from ..schedule import build_scheduler
from .base import Engine


def check_state_dict_compatible(model: nn.Module, state_dict: dict, source: str) -> None:
    """One clear error listing missing/unexpected/mis-shaped weights (another model's checkpoint)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]} (checkpoint vs model)")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts))


class DDPEngine(Engine):
    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv):
        self.cfg, self.env, self.device = cfg, env, env.device
        self.module = model.to(self.device)
        if env.world_size > 1:
            self.wrapped = DistributedDataParallel(
                self.module,
                device_ids=[env.local_rank] if self.device.type == "cuda" else None,
                broadcast_buffers=False,
                gradient_as_bucket_view=True,
            )
        else:
            self.wrapped = self.module
        self.runner = torch.compile(self.wrapped) if cfg.model.compile else self.wrapped
        self.optimizer = build_optimizer(self.module, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.schedule, cfg.train.steps, cfg.optim.lr)
        fp16 = cfg.model.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16) if fp16 else None

    # ------------------------------------------------------------------ compute
    def forward(self, images, texts) -> dict:
        with self.autocast():
            return self.runner(image=images, text=texts)

    def backward(self, loss):
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def no_sync(self):
        return self.wrapped.no_sync() if isinstance(self.wrapped, DistributedDataParallel) \
            else contextlib.nullcontext()

    def step(self) -> dict:
        clip = self.cfg.optim.grad_clip_norm
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.module)
        return {"grad_norm": norm}

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ state
    def save(self, path: Path, extra: dict) -> None:
        if not self.env.is_main:
            return
        state = {
            "state_dict": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **extra,
        }
        torch_save_synced(state, path)

    def load(self, path: Path) -> dict:
        state = load_checkpoint_file(path)
        check_state_dict_compatible(self.module, state["state_dict"], str(path))
        self.module.load_state_dict(state["state_dict"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        return {k: v for k, v in state.items() if k not in ("state_dict", "optimizer", "scheduler", "scaler")}
