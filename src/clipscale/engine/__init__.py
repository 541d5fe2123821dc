"""Training engines behind one small interface (base.py): DDP, FSDP2 and DeepSpeed, and the EMA of
the weights that lives with each engine's sharding (ema.py)."""

from __future__ import annotations

from ..config import BatchLayout, Config
from ..job.distributed import DistEnv
from .base import Engine, EngineSpec


def build_engine(cfg: Config, model, env: DistEnv, layout: BatchLayout | None = None, stages: list | None = None):
    """The engine engine.name names, with what it takes of `cfg` (EngineSpec.of); `stages`: the run's resolved
    schedule.stages, a list the trainer may update on resume (the schedule reads it at every step)."""
    layout = layout or BatchLayout.of(cfg.data, cfg.optim, env.world_size)
    spec = EngineSpec.of(cfg, layout, stages)
    if cfg.engine.name == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(model, spec, env)
    if cfg.engine.name == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(model, spec, env)
    from .deepspeed import DeepSpeedEngine  # (installed: checked at load, config/validate.py)

    return DeepSpeedEngine(model, spec, env)


__all__ = ["Engine", "EngineSpec", "build_engine"]
