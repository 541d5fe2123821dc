"""An exponential moving average of the weights (SigLIP-style runs evaluate and ship it).

The average lives where the weights live: a copy of every trained parameter on the engine's device
with the engine's sharding (DDP and ZeRO-1/2 hold whole parameters, FSDP2 holds DTensor shards
and so does its average). It is updated after every `ema.every_n_steps`-th optimizer step:

    ema = d * ema + (1 - d) * w,   d = min(decay, (1 + k) / (10 + k)) with ema.warmup (k: updates so far)

The number of updates follows from the step, so the checkpoint holds the averaged tensors only
and a resume continues bitwise. Parameters that are not trained (a locked tower) are not copied:
their average is themselves.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class ModelEMA:
    def __init__(self, module: nn.Module, decay: float, every_n_steps: int = 1, warmup: bool = True):
        self.module, self.decay, self.every, self.warmup = module, decay, every_n_steps, warmup
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        with torch.no_grad():
            self.shadow = {n: p.detach().clone().float() for n, p in self.params.items()}

    def decay_at(self, updates: int) -> float:
        """The decay of update number `updates` (0-based)."""
        return min(self.decay, (1 + updates) / (10 + updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """After optimizer step `step` (1-based); True when this step updated the average."""
        if step % self.every:
            return False
        d = self.decay_at(step // self.every - 1)
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach().float(), 1.0 - d)
        return True

    @torch.no_grad()
    def reset(self) -> None:
        """Start the average at the current weights (a checkpoint without EMA was loaded)."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p.detach().float())

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Whole or (FSDP2) sharded tensors keyed by parameter name; every averaged one must be there."""
        missing = sorted(set(self.shadow) - set(state))
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {len(missing)} parameter(s), e.g. {missing[0]}")
        for name, tensor in self.shadow.items():
            source = state[name]
            if tensor is not source:  # (DCP loads into these very tensors)
                tensor.copy_(source if source.shape == tensor.shape else source.reshape(tensor.shape))

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the module for the duration (evaluation), the trained ones after."""
        with torch.no_grad():
            kept = {n: p.detach().clone() for n, p in self.params.items()}
            for name, p in self.params.items():
                p.copy_(self.shadow[name].to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    p.copy_(kept[name])
