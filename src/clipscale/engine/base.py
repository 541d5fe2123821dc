"""The engine interface: everything train.py needs from DDP or DeepSpeed, nothing more.

An engine owns the wrapped model, the optimizer, the LR schedule and mixed precision.
train.py only calls these methods, so it has no engine-specific branches.
"""

from __future__ import annotations

import abc
import contextlib
import math
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from ..config import Config
from ..distributed import DistEnv


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `model.precision` on `device` (None = plain fp32)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _shape_only(state: dict) -> dict:
    """Shape-only stand-ins for weights; a 1-element tensor counts as a scalar (open_clip stores the
    temperature 0-d, clipscale trains it as a 1-element vector)."""

    def meta(shape) -> torch.Tensor:
        shape = tuple(shape)
        return torch.empty(() if math.prod(shape) == 1 else shape, device="meta")

    return {k: meta(v.shape if hasattr(v, "shape") else v) for k, v in state.items()}


def check_fits(path, train_state: dict, cfg: Config, now: dict, saved: dict) -> None:
    """CheckpointError (one line) when the checkpoint's model is not this run's: other weights, shapes,
    model name, loss or embedding size. `now` and `saved` map names to tensors or shapes."""
    from ..checkpoint import incompatibility
    from ..config import to_dict
    from ..errors import CheckpointMismatch

    saved_config = (train_state.get("meta") or {}).get("config")
    problem = incompatibility(str(path), saved_config, to_dict(cfg), _shape_only(now), _shape_only(saved))
    if problem:
        raise CheckpointMismatch(problem)


def optimizer_state_by_name(optim_state: dict) -> dict:
    """{parameter name: {state key: CPU tensor}} of a parameter-name keyed optimizer state dict."""
    return {
        name: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in state.items()}
        for name, state in optim_state["state"].items()
    }


class Engine(abc.ABC):
    """One training engine. `module` is the plain open_clip model (for eval and export)."""

    module: nn.Module
    device: torch.device
    env: DistEnv
    cfg: Config

    # ------------------------------------------------------------------ compute
    def autocast(self) -> ContextManager:
        dtype = autocast_dtype(self.cfg.model.precision, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    runner: nn.Module  # what forward() calls: the wrapped (and maybe compiled) model

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        """Model forward through the wrapper (dict with image_features, text_features, logit_scale)."""
        with self.autocast():
            return self.runner(image=images, text=texts)

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's (surrogate) loss."""

    @abc.abstractmethod
    def no_sync(self) -> ContextManager:
        """Context for micro-batches that are not the last of an optimizer step."""

    @abc.abstractmethod
    def optimizer_step(self) -> dict:
        """Clip, step the optimizer and the schedule, zero the gradients.

        Returns {'grad_norm': float, 'skipped': bool}; a non-finite gradient norm skips the update
        (the same decision on every rank, since gradients are already reduced)."""

    @abc.abstractmethod
    def skip_optimizer_step(self) -> None:
        """Drop this step's gradients and advance the schedule without updating the weights."""

    def lr(self) -> float:
        """Current learning rate of optim.lr (per-tower and per-layer groups are scaled from it)."""
        group = self.optimizer.param_groups[0]
        initial = group.get("initial_lr")
        if not initial or initial == self.cfg.optim.lr:
            return float(group["lr"])
        return float(group["lr"] / initial * self.cfg.optim.lr)

    ema = None  # an ema.ModelEMA of `module` when ema.decay is set (the trainer attaches it)

    def load_ema(self, path: Path, ema_state: dict | None) -> None:
        """Restore the EMA (open_clip names, whole tensors) or, from a checkpoint without one, restart
        it at the loaded weights."""
        if self.ema is None:
            return
        if ema_state is None:
            import logging

            logging.getLogger(__name__).warning(
                "%s has no EMA weights (written without ema.decay): the average starts at its weights", path
            )
            self.ema.reset()
            return
        from ..model import fit_scalar_shapes

        self.ema.load_state_dict(fit_scalar_shapes(ema_state, {k: v.shape for k, v in self.ema.shadow.items()}))

    def logit_scale(self) -> float:
        """Collective: the temperature exp(logit_scale) (a sharded parameter is gathered)."""
        param = self.module.logit_scale.detach()
        return float((param.full_tensor() if hasattr(param, "full_tensor") else param).float().exp().reshape(-1)[0])

    # ------------------------------------------------------------------ schedule
    optimizer: torch.optim.Optimizer  # the one whose param groups hold the learning rate
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def schedule_step(self) -> int:
        """Optimizer steps the LR schedule has taken."""
        return int(self.scheduler.last_epoch)

    def restart_schedule(self, step: int) -> None:
        """The current config's hyperparameters and LR schedule, positioned at `step` (after a resume:
        a changed optim.lr, weight decay or schedule.* applies from the next step on)."""
        from ..model import apply_hyperparameters
        from ..schedule import build_scheduler

        apply_hyperparameters(self.optimizer, self.cfg)
        self.scheduler = build_scheduler(
            self.optimizer, self.cfg.schedule, self.cfg.train.steps, self.cfg.optim.lr, step=step
        )

    def ema_state(self) -> dict | None:
        """The EMA weights to store (open_clip layout, whole tensors), or None without EMA."""
        if self.ema is None:
            return None
        from ..model import to_open_clip_layout

        return to_open_clip_layout(self.ema.state_dict())

    # ------------------------------------------------------------------ state
    checkpoint_suffix = ".pt"  # a file; DeepSpeed and FSDP2 checkpoints are folders ("")
    supports_async_save = False

    def snapshot(self, train_state: dict) -> dict | None:
        """A CPU copy of everything `save` writes, taken now (main rank; None elsewhere)."""
        raise NotImplementedError

    @abc.abstractmethod
    def save(self, path: Path, train_state: dict) -> None:
        """Collective: write a checkpoint at `path`: the model and optimizer in this engine's format,
        and `train_state` (state.TrainState's dict)."""

    @abc.abstractmethod
    def load(self, path: Path) -> dict:
        """Collective: restore model and optimizer from the checkpoint at `path` (any format this
        engine can read, written at any world size); returns the train state saved with it."""

    @abc.abstractmethod
    def full_optimizer_state(self) -> dict:
        """Collective: {parameter name: {exp_avg, exp_avg_sq, step}} as full CPU tensors (the same
        on every rank): what the optimizer carries, whatever the sharding."""
