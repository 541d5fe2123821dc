"""Learning-rate schedules: linear warm-up, then cosine / linear decay or constant.

A `LambdaLR`, so its state is the step count alone and resumes exactly.
"""

from __future__ import annotations

import math

import torch

from .config import ScheduleConfig


def lr_factor(step: int, total_steps: int, scfg: ScheduleConfig, base_lr: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if scfg.warmup_steps > 0 and step < scfg.warmup_steps:
        return (step + 1) / scfg.warmup_steps
    if scfg.name == "constant" or base_lr <= 0:
        return 1.0
    floor = min(scfg.min_lr / base_lr, 1.0)
    decay_steps = max(1, total_steps - scfg.warmup_steps)
    progress = min(1.0, (step - scfg.warmup_steps) / decay_steps)
    if scfg.name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return floor + (1.0 - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, scfg: ScheduleConfig, total_steps: int, base_lr: float, step: int = 0
):
    """The schedule positioned after `step` optimizer steps (its lr is that of step `step`)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, scfg, base_lr), last_epoch=step - 1
    )
