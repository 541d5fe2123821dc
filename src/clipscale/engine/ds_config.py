"""The DeepSpeed config, generated from clipscale's so the two can never disagree.

clipscale owns the batch geometry (micro-batch, accumulation, global batch), the optimizer,
the LR schedule, precision, gradient clipping and the ZeRO stage. Everything else DeepSpeed
knows (bucket sizes, overlap_comm, offload, activation checkpointing, ...) passes through from
`engine.deepspeed_config` (a JSON/YAML file or an inline mapping). A pass-through setting that
contradicts a generated one, or a key DeepSpeed does not know, is a start-up error.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import json
import pkgutil
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import yaml

from ..config import Config
from ..errors import ConfigError
from .base import autocast_dtype

BUNDLED = Path(__file__).resolve().parent.parent / "configs"

# Sections the DeepSpeed runtime reads by literal name (not through a constants module).
_LITERAL_SECTIONS = {
    "tensorboard",
    "wandb",
    "csv_monitor",
    "comet",
    "compile",
    "elasticity",
    "pipeline",
    "amp",
    "sparse_attention",
    "nebula",
    "compression_training",
    "hybrid_engine",
    "load_universal_checkpoint",
    "eigenvalue",
    "graph_harvesting",
    "sparse_gradients",
    "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer",
    "weight_quantization",
    "mics_shard_size",
    "mics_hierarchical_params_gather",
}


@lru_cache(maxsize=1)
def known_keys() -> frozenset[str]:
    """Every key name DeepSpeed's config modules define (lower-case string constants)."""
    import deepspeed

    names = set(_LITERAL_SECTIONS)
    for info in pkgutil.walk_packages(deepspeed.__path__, "deepspeed."):
        if not (info.name.endswith(".constants") or info.name.endswith("config")) or ".inference" in info.name:
            continue
        try:
            module = importlib.import_module(info.name)
        except Exception:  # optional ops and their extras are not importable everywhere
            continue
        for attr, value in vars(module).items():
            if attr.isupper() and isinstance(value, str) and value.islower() and value.replace("_", "").isalnum():
                names.add(value)
    return frozenset(names)


def load_user_settings(value: Any) -> dict:
    """engine.deepspeed_config → a mapping (a path to JSON/YAML, resolved against the CWD and then
    clipscale's bundled configs/, or an inline mapping)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return copy.deepcopy(value)
    if not isinstance(value, str):
        raise ConfigError(f"engine.deepspeed_config must be a file path or a mapping, got {type(value).__name__}")
    path = Path(value)
    if not path.is_file():
        bundled = BUNDLED / Path(value).relative_to("configs") if value.startswith("configs/") else BUNDLED / value
        if not bundled.is_file():
            raise ConfigError(f"engine.deepspeed_config: no such file {value}")
        path = bundled
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exn:
        first = str(exn).splitlines()[0] if str(exn) else type(exn).__name__
        raise ConfigError(f"engine.deepspeed_config: cannot read {path}: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"engine.deepspeed_config: {path} must hold a mapping, not {type(data).__name__}")
    return data


def zero_stage(cfg: Config, user: dict) -> int:
    """engine.zero_stage if given, else the file's zero_optimization.stage, else 2."""
    from_file = (user.get("zero_optimization") or {}).get("stage")
    if cfg.engine.zero_stage is not None:
        if from_file is not None and from_file != cfg.engine.zero_stage:
            raise ConfigError(
                f"engine.zero_stage={cfg.engine.zero_stage} but engine.deepspeed_config sets "
                f"zero_optimization.stage={from_file}; keep one of them"
            )
        return cfg.engine.zero_stage
    if from_file is None:
        return 2
    if from_file not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {from_file!r}")
    return int(from_file)


def precision_section(cfg: Config, device: torch.device) -> dict:
    dtype = autocast_dtype(cfg.model.precision, device)
    if dtype is torch.bfloat16:
        return {"bf16": {"enabled": True}}
    if dtype is torch.float16:
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    return {}


def generated(cfg: Config, world_size: int, device: torch.device, stage: int) -> dict:
    """The settings clipscale decides (the user may repeat them, but not change them)."""
    o = cfg.optim
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": o.accum_steps,
        "train_batch_size": cfg.data.batch_size * o.accum_steps * world_size,
        "gradient_clipping": float(o.grad_clip_norm or 0.0),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,
            },
        },
        "zero_optimization": {"stage": stage},
        **precision_section(cfg, device),
    }


OWNED = {  # generated key -> the clipscale setting to change instead
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.accum_steps",
    "train_batch_size": "data.batch_size x world size x optim.accum_steps",
    "gradient_clipping": "optim.grad_clip_norm",
    "optimizer": "optim.*",
    "scheduler": "schedule.*",
    "bf16": "model.precision",
    "fp16": "model.precision",
}


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _check_conflicts(user: dict, ours: dict, precision: str) -> None:
    for key, setting in OWNED.items():
        if key not in user:
            continue
        mine = ours.get(key)
        theirs = user[key]
        if key in ("bf16", "fp16"):
            theirs_on = bool(isinstance(theirs, dict) and theirs.get("enabled"))
            if theirs_on != bool(mine and mine.get("enabled")):
                raise ConfigError(
                    f"engine.deepspeed_config sets {key}.enabled={str(theirs_on).lower()}, which "
                    f"contradicts model.precision={precision}; set model.precision instead"
                )
            continue
        if key in ("optimizer", "scheduler") or theirs != mine:
            raise ConfigError(
                f"engine.deepspeed_config sets {key}={json.dumps(theirs)[:80]}, which clipscale "
                f"derives from {setting} (= {json.dumps(mine)[:80]}); change {setting} instead"
            )


def _check_known(user: dict) -> None:
    known = known_keys()
    for key in user:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"engine.deepspeed_config: unknown DeepSpeed setting '{key}'{hint}")
    zero = user.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, dict):
            raise ConfigError("engine.deepspeed_config: zero_optimization must be a mapping")
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        try:
            DeepSpeedZeroConfig(**zero)
        except Exception as exn:  # pydantic.ValidationError: report its first problem on one line
            errors = getattr(exn, "errors", None)
            if callable(errors) and errors():
                first = errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ()))
                raise ConfigError(f"engine.deepspeed_config: zero_optimization.{where}: {first.get('msg')}") from None
            raise ConfigError(f"engine.deepspeed_config: zero_optimization: {exn}") from None


def build_ds_config(cfg: Config, world_size: int, device: torch.device, user: dict | None = None) -> dict:
    """The complete DeepSpeed config for this run (validated; raises ConfigError on one line)."""
    user = load_user_settings(cfg.engine.deepspeed_config) if user is None else user
    _check_known(user)
    stage = zero_stage(cfg, user)
    ours = generated(cfg, world_size, device, stage)
    _check_conflicts(user, ours, cfg.model.precision)
    merged = _merge(user, ours)
    merged.setdefault("steps_per_print", 10**9)  # clipscale logs; keep DeepSpeed quiet
    merged.setdefault("wall_clock_breakdown", False)
    return merged
