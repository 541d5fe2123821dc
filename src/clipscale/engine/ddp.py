"""DistributedDataParallel engine (also the single-process engine: no wrapper at world size 1).

Features are gathered by the loss (all_gather with grad); DDP all-reduces parameter
gradients only, once per optimizer step (no_sync on the other micro-batches). Checkpoints are
one file with the model in open_clip's layout and the optimizer state keyed by parameter name,
so they resume at any world size and under FSDP2 (engine/formats.py), and it resumes FSDP2's.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.compat import check_fits
from ..checkpoint.files import load_checkpoint_file, torch_save_synced
from ..checkpoint.formats import full_state, read_ema
from ..job.distributed import DistEnv
from ..model import clamp_logit_scale, fit_scalar_shapes, to_open_clip_layout
from ..model.input_size import resize_inputs, saved_input_size
from .base import Engine, EngineSpec, compiles, optimizer_state_by_name

FULL = StateDictOptions(full_state_dict=True)


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
    def __init__(self, model: nn.Module, spec: EngineSpec, env: DistEnv):
        self.spec, self.env, self.device = spec, env, env.device
        self.module = model.to(self.device)
        self.compiled = compiles(spec.compile, self.device)
        self._wrap()
        self.optimizer = spec.optimization.optimizer(self.module, self.device)
        self.scheduler = spec.optimization.scheduler(self.optimizer)
        fp16 = spec.precision == "fp16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16) if fp16 else None

    def _wrap(self) -> None:
        """DDP around the module (its buckets are views of the parameters as they are now), compiled if asked."""
        if self.env.world_size > 1:
            self.wrapped = DistributedDataParallel(
                self.module,
                device_ids=[self.env.local_rank] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,
                **_no_buffer_sync(),
            )
        else:
            self.wrapped = self.module
        self.runner = torch.compile(self.wrapped) if self.compiled else self.wrapped

    def resize_inputs(self, image: int | None, context: int | None, seed: int = 0) -> list[str]:
        """Collective at world size > 1 (DDP is built again around the new parameters)."""
        changed = resize_inputs(self.module, image, context, self.optimizer, self.ema, seed)
        if changed:
            if isinstance(self.wrapped, DistributedDataParallel):
                self.wrapped._remove_autograd_hooks()  # the old reducer must not all-reduce alongside the new one
                for hook in getattr(self.wrapped, "_accum_grad_hooks", []):  # (torch.compile's python reducer)
                    hook.remove()
            self.wrapped = self.runner = None
            self._wrap()
        return changed

    # ------------------------------------------------------------------ compute
    def backward(self, loss):
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    def no_sync(self):
        return self.wrapped.no_sync() if isinstance(self.wrapped, DistributedDataParallel) else contextlib.nullcontext()

    def optimizer_step(self) -> dict:
        clip = self.spec.optimization.clip_norm
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

    # ------------------------------------------------------------------ state
    supports_async_save = True

    def _state(self, train_state: dict) -> dict:
        return {
            "format": 2,
            "state_dict": to_open_clip_layout(self.module.state_dict()),
            "optimizer": get_optimizer_state_dict(self.module, self.optimizer, options=FULL),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
            **({"ema": self.ema_state()} if self.ema is not None else {}),
            "train_state": train_state,
        }

    def snapshot(self, train_state: dict) -> dict | None:
        if not self.env.is_main:
            return None
        return _to_cpu_copy(self._state(train_state))

    def save(self, path: Path, train_state: dict) -> None:
        if self.env.is_main:
            torch_save_synced(self._state(train_state), path)

    def load(self, path: Path) -> dict:
        """A DDP checkpoint file or an FSDP2 checkpoint folder, of any world size."""
        model_state, optim_state, train_state = full_state(path)
        self._take_input_size_of(model_state)
        now = self.module.state_dict()
        check_fits(path, train_state, self.spec.identity, now, model_state)
        self.module.load_state_dict(fit_scalar_shapes(model_state, {k: v.shape for k, v in now.items()}))
        if optim_state is not None:
            set_optimizer_state_dict(self.module, self.optimizer, optim_state, options=FULL)
        else:
            self._load_legacy_optimizer(path)
        if self.ema is not None:
            self.load_ema(path, read_ema(path))
        if self.scaler is not None:
            scaler = load_checkpoint_file(path).get("scaler") if Path(path).is_file() else None
            if scaler:
                self.scaler.load_state_dict(scaler)
        return train_state

    def _take_input_size_of(self, saved: dict) -> None:
        """A checkpoint written in another training stage (schedule.stages with image_size or context_length)
        holds position tables of that stage's size: the model takes that size before loading, so the weights
        and the optimizer state fit as saved (the trainer then moves on to the stage of the next step)."""
        if any(st.image_size or st.context_length for st in self.spec.optimization.stages):
            self.resize_inputs(*saved_input_size(saved, self.module))

    def _load_legacy_optimizer(self, path: Path) -> None:
        """clipscale <= 0.1 files hold torch's index-keyed optimizer state (same model, same groups)."""
        legacy = load_checkpoint_file(path).get("optimizer") if Path(path).is_file() else None
        if not legacy:
            return
        self.optimizer.load_state_dict(legacy)
        for group in self.optimizer.param_groups:  # 0-d temperature moments of those files -> [1]
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    if key != "step" and torch.is_tensor(value) and value.numel() == p.numel():
                        self.optimizer.state[p][key] = value.reshape(p.shape)

    def full_optimizer_state(self) -> dict:
        return optimizer_state_by_name(get_optimizer_state_dict(self.module, self.optimizer, options=FULL))
