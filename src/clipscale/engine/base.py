"""The engine interface: everything train.py needs from DDP or DeepSpeed, nothing more.

An engine owns the wrapped model, the optimizer, the LR schedule and mixed precision.
train.py only calls these methods, so it has no engine-specific branches.
"""

from __future__ import annotations

import abc
import contextlib
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

    @abc.abstractmethod
    def lr(self) -> float:
        """Current learning rate."""

    # ------------------------------------------------------------------ state
    checkpoint_suffix = ".pt"  # a file; DeepSpeed checkpoints are folders ("")
    supports_async_save = False

    def snapshot(self, extra: dict) -> dict | None:
        """A CPU copy of everything `save` writes, taken now (main rank; None elsewhere)."""
        raise NotImplementedError

    @abc.abstractmethod
    def save(self, path: Path, extra: dict) -> None:
        """Collective: write a checkpoint (model, optimizer, schedule + `extra`) at `path`."""

    @abc.abstractmethod
    def load(self, path: Path) -> dict:
        """Collective: restore from `path`; returns the `extra` dict that was saved with it."""
