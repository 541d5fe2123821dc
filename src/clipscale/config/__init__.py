"""The run configuration: one typed object, loaded once (YAML + dotted overrides), checked whole at
load, and passed down as sections.

    schema.py     the sections as dataclasses; each field's docstring is its documentation
    load.py       YAML + `key=value` overrides onto the sections (unknown keys, types, renamed keys)
    validate.py   every check the config alone allows, one line each
    losses.py     the loss registry: names, implementations, their checks, their builders
    models.py     model names and their JSON configs, without torch
    deepspeed.py  engine.deepspeed_config read and checked
    layout.py     the batch layout (per-rank batch, world, accumulation, workers, streams)
    reference.py  docs/config.md, generated from the field docstrings
"""

from .layout import BatchLayout
from .load import OVERRIDES_HELP, add_config_arguments, read_config, save_config, to_dict
from .schema import (
    AugmentConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DistillConfig,
    EMAConfig,
    EngineConfig,
    EvalConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    SourceConfig,
    SpikeGuardConfig,
    TrainConfig,
    WandbConfig,
)
from .validate import signal_name, validate


def load_config(path: str | None = None, overrides: list[str] | None = None, machine: bool = True) -> Config:
    """Load YAML `path` (optional), apply dotted overrides, check everything; ConfigError on any problem.
    `machine=False`: not what this machine must have (files, packages): for commands that do not train."""
    cfg = read_config(path, overrides)
    validate(cfg, machine)
    return cfg


__all__ = [
    "OVERRIDES_HELP",
    "AugmentConfig",
    "BatchLayout",
    "CheckpointConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EMAConfig",
    "EngineConfig",
    "EvalConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "ScheduleConfig",
    "SourceConfig",
    "SpikeGuardConfig",
    "TrainConfig",
    "WandbConfig",
    "add_config_arguments",
    "load_config",
    "read_config",
    "save_config",
    "signal_name",
    "to_dict",
    "validate",
]
