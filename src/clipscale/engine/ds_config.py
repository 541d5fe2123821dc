"""The DeepSpeed config, generated from clipscale's so the two can never disagree.

clipscale owns the batch geometry (micro-batch, accumulation, global batch), the optimizer,
the LR schedule, precision, gradient clipping and the ZeRO stage. Everything else DeepSpeed
knows (bucket sizes, overlap_comm, offload, activation checkpointing, ...) passes through from
`engine.deepspeed_config` (a JSON/YAML file or an inline mapping). What can be checked from the
config alone is checked at load (config/deepspeed.py); here the settings that need the running
job are added (the global batch of this world size, bf16 when model.precision=auto on this device)
and checked the same way.
"""

from __future__ import annotations

import copy

import torch

from ..config.deepspeed import check_conflicts, check_known, load_user_settings, precision_section, static_settings
from ..config.deepspeed import zero_stage as configured_stage
from .base import autocast_dtype

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def generated(spec, device: torch.device, stage: int) -> dict:
    """The settings clipscale decides (the user may repeat them, but not change them)."""
    dtype = autocast_dtype(spec.precision, device)
    return {
        **static_settings(spec.optimization.optim, spec.layout.per_rank_batch, stage),
        "train_batch_size": spec.layout.global_batch,
        **precision_section(_DTYPES.get(dtype)),
    }


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def zero_stage(engine_cfg) -> int:
    """The ZeRO stage of this run (engine.zero_stage, else the DeepSpeed file's, else 2)."""
    return configured_stage(engine_cfg, load_user_settings(engine_cfg.deepspeed_config))


def build_ds_config(spec, device: torch.device, user: dict | None = None) -> dict:
    """The complete DeepSpeed config for this run (an EngineSpec's; raises ConfigError on one line)."""
    user = load_user_settings(spec.engine.deepspeed_config) if user is None else user
    check_known(user)
    stage = configured_stage(spec.engine, user)
    ours = generated(spec, device, stage)
    check_conflicts(user, ours, spec.precision)
    merged = _merge(user, ours)
    merged.setdefault("steps_per_print", 10**9)  # clipscale logs; keep DeepSpeed quiet
    merged.setdefault("wall_clock_breakdown", False)
    return merged
