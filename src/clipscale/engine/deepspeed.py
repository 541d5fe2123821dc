"""DeepSpeed engine: ZeRO stages 0-3 behind the same interface as DDP.

The DeepSpeed config is generated from clipscale's (engine/ds_config.py). Accumulation is
clipscale's feature cache: DeepSpeed is told the accumulation boundary explicitly (`no_sync`
sets it to False for all but the last micro-batch) and never rescales the loss, because the
cached feature gradients are already the gradients of the whole global batch. The LR schedule
is clipscale's LambdaLR on DeepSpeed's base optimizer, stepped here, so it is the same as DDP's.

Checkpoints are DeepSpeed checkpoint folders (`save_checkpoint` with clipscale's state as
client state) written under the checkpoint manager's temporary name, so the atomic rename,
checksums, `latest` and retention are the same as for DDP.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import incompatibility
from ..config import Config, to_dict
from ..distributed import DistEnv, ensure_process_group
from ..errors import CheckpointError
from ..model import MAX_LOGIT_SCALE, param_groups
from ..schedule import build_scheduler
from .base import Engine
from .ds_checkpoint import DS_TAG as TAG
from .ds_checkpoint import deepspeed_model_states
from .ds_config import build_ds_config

log = logging.getLogger(__name__)


def _forget_stale_groups() -> None:
    """DeepSpeed caches its world group in a module global; a second engine in the same process
    (after the first run's process group was destroyed) must not reuse the dead one."""
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is None:
        return
    try:
        dist.get_global_rank(cached, 0)
    except (ValueError, RuntimeError):
        groups._WORLD_GROUP = None


def scalars_as_vectors(model: nn.Module) -> None:
    """Make 0-d parameters (CLIP's logit_scale, SigLIP's logit_bias) 1-d, in place.

    DeepSpeed views parameters as bytes and clips gradients in place, both of which fail on 0-d
    tensors. A [1]-shaped temperature computes the same numbers; `clipscale export` turns it back
    into open_clip's 0-d shape.
    """
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))


def _meta(shapes: dict) -> dict:
    """Shape-only stand-ins for weights (ZeRO-3 parameters are partitioned on the module)."""
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


def _shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


class DeepSpeedEngine(Engine):
    checkpoint_suffix = ""  # checkpoints are folders; saved synchronously (no snapshot())

    def __init__(self, model: nn.Module, cfg: Config, env: DistEnv):
        import deepspeed

        self.cfg, self.env, self.device = cfg, env, env.device
        self.ds_config = build_ds_config(cfg, env.world_size, env.device)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        ensure_process_group(env)
        _forget_stale_groups()
        deepspeed.init_distributed(
            dist_backend="nccl" if env.device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=cfg.engine.dist_timeout_s),
        )
        self.module = model.to(self.device)
        scalars_as_vectors(self.module)
        self.ds, _, _, _ = deepspeed.initialize(
            model=self.module, config=self.ds_config, model_parameters=param_groups(self.module, cfg.optim.weight_decay)
        )
        self.base_optimizer = self.ds.basic_optimizer
        self.scheduler = build_scheduler(self.base_optimizer, cfg.schedule, cfg.train.steps, cfg.optim.lr)
        self.ds.set_gradient_accumulation_boundary(True)
        self.runner = self.ds

    # ------------------------------------------------------------------ compute
    def backward(self, loss):
        # the feature-cache surrogate already carries the whole batch's gradient: no 1/K scaling
        self.ds.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def no_sync(self):
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def _stage0_grads_finite(self) -> bool:
        """ZeRO-0 has no overflow check of its own in fp32: look before stepping."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return bool(torch.isfinite(norm))

    def _ds_step(self, force_skip: bool = False) -> bool:
        """One DeepSpeed optimizer step; True if it was skipped (non-finite gradients)."""
        before = self.ds.skipped_steps
        if self.stage == 0 and (force_skip or not self._stage0_grads_finite()):
            self.ds.zero_grad()  # drop them; no DeepSpeed step (its counters only label checkpoints)
            return True
        self.ds.step()  # ZeRO 1-3 skip non-finite gradients themselves (and count it)
        return self.ds.skipped_steps > before

    def optimizer_step(self) -> dict:
        skipped = self._ds_step()
        self.scheduler.step()
        self._clamp_logit_scale()
        norm = self.ds.get_global_grad_norm()
        return {"grad_norm": float("nan") if norm is None or skipped else float(norm), "skipped": skipped}

    def skip_optimizer_step(self):
        skipped = self._ds_step(force_skip=True)
        if not skipped:
            log.warning("non-finite loss but finite gradients: DeepSpeed applied this step")
        self.scheduler.step()

    def _clamp_logit_scale(self) -> None:
        """Clamp the temperature in DeepSpeed's fp32 master copy too (the module's is a view)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        param = getattr(self.module, "logit_scale", None)
        if param is None:
            return
        master = safe_get_full_fp32_param(param)
        if master is None:  # ZeRO-0 in fp32: the module's parameter is the master
            with torch.no_grad():
                param.clamp_(0, MAX_LOGIT_SCALE)
            return
        if float(master.max()) > MAX_LOGIT_SCALE or float(master.min()) < 0:
            safe_set_full_fp32_param(param, master.clamp(0, MAX_LOGIT_SCALE))
            with torch.no_grad():
                param.data.clamp_(0, MAX_LOGIT_SCALE)

    def lr(self) -> float:
        return float(self.base_optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ state
    def save(self, path: Path, extra: dict) -> None:
        client = {"clipscale": extra, "scheduler": self.scheduler.state_dict(), "zero_stage": self.stage}
        self.ds.save_checkpoint(str(path), tag=TAG, client_state=client, save_latest=False)
        if self.env.is_main:
            (Path(path) / "ds_config.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")

    def _check_compatible(self, path: Path) -> None:
        if path.is_file():
            raise CheckpointError(
                f"{path} is a DDP checkpoint; resume it with engine.name=ddp, or start from its "
                f"weights with model.pretrained={path}"
            )
        meta = deepspeed_model_states(path)
        extra = meta.get("clipscale") or {}
        saved = {}
        for group in meta.get("param_shapes") or []:
            saved.update({k: tuple(v) for k, v in group.items()})
        if not saved:
            saved = {k: tuple(v.shape) for k, v in (meta.get("module") or {}).items()}
        now = {n: _shape(p) for n, p in self.module.named_parameters()}
        problem = incompatibility(str(path), extra.get("config"), to_dict(self.cfg), _meta(now), _meta(saved))
        if problem:
            raise CheckpointError(problem)
        stage = meta.get("zero_stage", 0)
        if stage != self.stage:
            raise CheckpointError(
                f"{path} was written with ZeRO stage {stage}, this run uses {self.stage}; "
                f"set engine.zero_stage={stage} (or convert it: clipscale export)"
            )
        old_world = extra.get("world_size", self.env.world_size)
        if stage >= 1 and old_world != self.env.world_size:
            raise CheckpointError(
                f"{path} holds ZeRO-{stage} optimizer shards of {old_world} ranks, this run has "
                f"{self.env.world_size}; resume with {old_world} ranks, or start from its "
                f"weights: clipscale export, then model.pretrained=<file>"
            )

    def load(self, path: Path) -> dict:
        path = Path(path)
        self._check_compatible(path)
        loaded, client = self.ds.load_checkpoint(
            str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
        )
        if loaded is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
        self.scheduler.load_state_dict(client["scheduler"])
        self.ds.set_gradient_accumulation_boundary(True)
        return client["clipscale"]
