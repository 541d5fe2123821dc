"""FSDP2 engine: torch.distributed.fsdp.fully_shard per transformer block and on the whole model.

Parameters, gradients and optimizer state are sharded over the ranks (DTensors); each block is
all-gathered for its forward and backward, gradients are reduce-scattered. Mixed precision comes
from `model.precision` (a MixedPrecisionPolicy: bf16 parameters for compute, fp32 reductions and
master weights). Feature-cache accumulation turns gradient synchronisation off on all but the last
micro-batch. `encode_image` / `encode_text` are registered as FSDP forward methods, so evaluation
calls them as on a plain model.

Checkpoints are torch.distributed.checkpoint folders (every rank writes its shards), keyed by
parameter name: they resume at any world size under FSDP2 and under DDP, and a DDP checkpoint
resumes here (engine/formats.py).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..checkpoint.compat import check_fits
from ..checkpoint.files import torch_save_synced
from ..checkpoint.formats import (
    DCP_TRAIN_STATE,
    checkpoint_format,
    dcp_shapes,
    full_state,
    has_dcp_entry,
    read_ema,
    read_train_state,
)
from ..job.distributed import DistEnv, broadcast_object, ensure_process_group
from ..model import block_lists, clamp_logit_scale, fit_scalar_shapes
from .base import Engine, EngineSpec, autocast_dtype, compiles, optimizer_state_by_name

FULL = StateDictOptions(full_state_dict=True)
log = logging.getLogger(__name__)
FORWARD_METHODS = ("encode_image", "encode_text")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The residual blocks of every tower: FSDP's units."""
    return [block for blocks in block_lists(model) for block in blocks]


class FSDP2Engine(Engine):
    checkpoint_suffix = ""  # a folder of DCP shards
    files_synced = True  # DCP's FileSystemWriter fsyncs each rank's files and its metadata; ours: torch_save_synced

    def __init__(self, model: nn.Module, spec: EngineSpec, env: DistEnv):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        self.spec, self.env, self.device = spec, env, env.device
        ensure_process_group(env)
        mesh = init_device_mesh(self.device.type, (dist.get_world_size(),))
        # transformer blocks compute in the low precision (parameters cast for the forward, gradients
        # reduced in fp32); the rest (embeddings, projections, the temperature) stays fp32 under autocast,
        # as with DDP: a bf16 logit_scale would round ln(100) to 4.594
        dtype = autocast_dtype(spec.precision, self.device)
        blocks_policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
        self.module = model.to(self.device)
        for block in transformer_blocks(self.module):
            fully_shard(block, mesh=mesh, mp_policy=blocks_policy)
        fully_shard(self.module, mesh=mesh)
        for method in FORWARD_METHODS:
            if hasattr(self.module, method):
                register_fsdp_forward_method(self.module, method)
        self.compiled = compiles(spec.compile, self.device)
        self.runner = torch.compile(self.module) if self.compiled else self.module
        self.optimizer = spec.optimization.optimizer(self.module, self.device)
        self.scheduler = spec.optimization.scheduler(self.optimizer)

    # ------------------------------------------------------------------ compute
    def backward(self, loss):
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self):
        self.module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def optimizer_step(self) -> dict:
        clip = self.spec.optimization.clip_norm
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        skipped = not torch.isfinite(norm)
        if not skipped:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clamp_logit_scale(self.module)
        return {"grad_norm": norm, "skipped": skipped}

    def skip_optimizer_step(self):
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    # ------------------------------------------------------------------ state
    def _sharded(self, ema: bool = True) -> dict:
        out = {
            "model": get_model_state_dict(self.module),
            "optim": get_optimizer_state_dict(self.module, self.optimizer),
        }
        if ema and self.ema is not None:
            out["ema"] = self.ema.state_dict()  # DTensors, sharded as the parameters
        return out

    def save(self, path: Path, train_state: dict) -> None:
        dcp.save(self._sharded(), checkpoint_id=str(path))
        if self.env.is_main:
            torch_save_synced(train_state, Path(path) / DCP_TRAIN_STATE)

    def load(self, path: Path) -> dict:
        """An FSDP2 checkpoint of any world size (re-sharded by DCP), or a DDP checkpoint file."""
        now = {k: v.shape for k, v in get_model_state_dict(self.module, options=StateDictOptions()).items()}
        if checkpoint_format(path) == "fsdp2":
            train_state = read_train_state(path)
            check_fits(path, train_state, self.spec.identity, now, dcp_shapes(path))
            with_ema = self.ema is not None and has_dcp_entry(path, "ema")
            state = self._sharded(ema=with_ema)
            # the moments by parameter name only: the groups are this run's (their hyperparameters come
            # from the current config), whatever groups the checkpoint was written with
            groups = state["optim"]["param_groups"]
            state["optim"] = {"state": state["optim"]["state"]}
            dcp.load(state, checkpoint_id=str(path))
            set_model_state_dict(self.module, state["model"])
            set_optimizer_state_dict(self.module, self.optimizer, {**state["optim"], "param_groups": groups})
            if self.ema is not None and not with_ema:
                self.load_ema(path, None)
            return train_state
        # a whole state (a DDP file): read by the first rank only and broadcast, shard by shard
        model_state, optim_state, train_state = full_state(path, weights=self.env.is_main)
        if self.env.is_main:
            check_fits(path, train_state, self.spec.identity, now, model_state)
            model_state = fit_scalar_shapes(model_state, now)
        broadcast = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.module, model_state, options=broadcast)
        if optim_state is not None:
            set_optimizer_state_dict(self.module, self.optimizer, optim_state, options=broadcast)
        else:
            log.warning(
                "%s holds the optimizer state of clipscale <= 0.1 (by position, not by name): the AdamW "
                "moments start from zero",
                path,
            )
        if self.ema is not None:
            self._load_whole_ema(path)
        return train_state

    def _load_whole_ema(self, path: Path) -> None:
        """The EMA of a whole-state (DDP) checkpoint: read on the first rank, scattered as shards."""
        from torch.distributed.tensor import distribute_tensor

        whole = read_ema(path) if self.env.is_main else None
        present = broadcast_object(whole is not None)
        if not present:
            self.load_ema(path, None)
            return
        sharded = {}
        for name, shard in self.ema.shadow.items():
            full = whole[name].reshape(shard.shape).float() if whole is not None else torch.empty(shard.shape)
            sharded[name] = distribute_tensor(
                full.to(self.device), shard.device_mesh, shard.placements, src_data_rank=0
            )
        self.ema.load_state_dict(sharded)

    def full_optimizer_state(self) -> dict:
        return optimizer_state_by_name(get_optimizer_state_dict(self.module, self.optimizer, options=FULL))
