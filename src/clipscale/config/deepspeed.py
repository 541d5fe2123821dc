"""engine.deepspeed_config, checked at load: the file or mapping is read, every key is one DeepSpeed
knows, the ZeRO stage is decided, and nothing contradicts what clipscale derives from its own
settings (batch geometry, optimizer, schedule, clipping, precision). What depends on the running job
(the world size in train_batch_size, bf16 under model.precision=auto) is checked again by
engine/ds_config.py when the engine starts.
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

import yaml

from ..errors import ConfigError

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
    try:
        import deepspeed
    except Exception as exn:  # noqa: BLE001 - installed but broken (a CUDA mismatch, a missing extra)
        raise ConfigError(
            f"engine.name=deepspeed: deepspeed does not import here: {type(exn).__name__}: {exn}"[:300]
        ) from None
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


def zero_stage(engine_cfg, user: dict) -> int:
    """engine.zero_stage if given, else the file's zero_optimization.stage, else 2."""
    from_file = (user.get("zero_optimization") or {}).get("stage")
    if engine_cfg.zero_stage is not None:
        if from_file is not None and from_file != engine_cfg.zero_stage:
            raise ConfigError(
                f"engine.zero_stage={engine_cfg.zero_stage} but engine.deepspeed_config sets "
                f"zero_optimization.stage={from_file}; keep one of them"
            )
        return engine_cfg.zero_stage
    if from_file is None:
        return 2
    if from_file not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {from_file!r}")
    return int(from_file)


def static_settings(o, per_rank_batch: int, stage: int) -> dict:
    """The settings clipscale decides whatever the world size and device (the user may repeat them,
    but not change them); `o` is the optim section."""
    return {
        "train_micro_batch_size_per_gpu": per_rank_batch,
        "gradient_accumulation_steps": o.accum_steps,
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
    }


def precision_section(dtype: str | None) -> dict:
    """DeepSpeed's precision section for a compute dtype ("bf16", "fp16" or None for fp32)."""
    if dtype == "bf16":
        return {"bf16": {"enabled": True}}
    if dtype == "fp16":
        return {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}
    return {}


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


def check_conflicts(user: dict, ours: dict, precision: str) -> None:
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


def check_known(user: dict) -> None:
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


def check(cfg, known_keys: bool = True) -> int:
    """Every check of engine.deepspeed_config that needs no running job; returns the ZeRO stage.
    `known_keys`: also against the keys the installed DeepSpeed knows (imports it)."""
    user = load_user_settings(cfg.engine.deepspeed_config)
    if known_keys:
        check_known(user)
    stage = zero_stage(cfg.engine, user)
    ours = static_settings(cfg.optim, cfg.data.batch_size, stage)
    checkable = {*ours, "optimizer", "scheduler"}
    if cfg.model.precision != "auto":  # (auto means bf16 on GPUs that have it: known when the engine starts)
        ours.update(precision_section(None if cfg.model.precision == "fp32" else cfg.model.precision))
        checkable |= {"bf16", "fp16"}
    check_conflicts({k: v for k, v in user.items() if k in checkable}, ours, cfg.model.precision)
    return stage
