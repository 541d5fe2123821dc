"""Training engines behind one small interface (see engine/base.py): DDP, FSDP2 and DeepSpeed."""

from __future__ import annotations

from ..config import Config
from ..distributed import DistEnv
from ..errors import ConfigError
from .base import Engine


def build_engine(cfg: Config, model, env: DistEnv) -> Engine:
    if cfg.engine.name == "ddp":
        from .ddp import DDPEngine

        return DDPEngine(model, cfg, env)
    if cfg.engine.name == "fsdp2":
        from .fsdp2 import FSDP2Engine

        return FSDP2Engine(model, cfg, env)
    try:
        from .deepspeed import DeepSpeedEngine
    except ImportError as exn:
        raise ConfigError(
            f"engine.name=deepspeed is unavailable ({exn}); install it with: pip install 'clipscale[deepspeed]'"
        ) from None
    return DeepSpeedEngine(model, cfg, env)


__all__ = ["Engine", "build_engine"]
