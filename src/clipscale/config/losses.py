"""The losses, by name: one registry that says, for each, its implementations (the first is what
`loss.impl: auto` picks), the config checks that belong to it, what the model needs for it, and
where it is built.

Torch-free, so the config checks every loss setting at load (`clipscale config` and `data plan`
stay quick); clipscale.loss.build_loss builds the module named here. A new loss is one entry here
plus its module under clipscale/loss/.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import ConfigError


def _no_checks(cfg) -> None:
    pass


def _siglip_checks(cfg) -> None:
    if cfg.distill.model is not None:
        raise ConfigError("'distill' works with loss.name=clip (OpenCLIP's DistillClipLoss); set loss.name=clip")


@dataclass(frozen=True)
class LossSpec:
    name: str
    impls: tuple[str, ...]
    """Implementations (`loss.impl`); the first is the default."""
    builder: str
    """module:callable that takes (loss config section, implementation) and returns the nn.Module."""
    summary: str
    check: Callable[[Any], None] = _no_checks
    """Config checks of this loss (gets the whole config: a loss may rule out other settings)."""
    uses_bias: bool = False
    """The model must have (and the loss takes) a learnable logit bias."""
    model_init: dict = field(default_factory=dict)
    """open_clip model arguments this loss needs, given when the model config initialises no logit bias."""


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "clip",
            ("local", "full", "chunked"),
            "clipscale.loss.clip:build",
            "symmetric InfoNCE (softmax) over the global batch",
        ),
        LossSpec(
            "siglip",
            ("gather", "ring"),
            "clipscale.loss.siglip:build",
            "the sigmoid loss with a learnable bias",
            check=_siglip_checks,
            uses_bias=True,
            # the paper's initialisation (t' = log 10, b = -10)
            model_init={"init_logit_scale": math.log(10.0), "init_logit_bias": -10.0},
        ),
    )
}
IMPLS = ("auto", *dict.fromkeys(i for spec in LOSSES.values() for i in spec.impls))


def loss_spec(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ConfigError(f"'loss.name' must be one of {', '.join(LOSSES)}; got {name!r}")
    return LOSSES[name]


def resolved_impl(loss_cfg) -> str:
    """`loss.impl`, with auto replaced by the loss's default implementation."""
    spec = loss_spec(loss_cfg.name)
    return loss_cfg.impl if loss_cfg.impl != "auto" else spec.impls[0]


def check(cfg) -> None:
    """The loss settings of a config: an implementation of this loss, and the loss's own checks."""
    spec = loss_spec(cfg.loss.name)
    if cfg.loss.impl != "auto" and cfg.loss.impl not in spec.impls:
        raise ConfigError(
            f"'loss.impl' must be one of auto, {', '.join(spec.impls)} for loss.name={spec.name}; got {cfg.loss.impl!r}"
        )
    spec.check(cfg)


def builder(spec: LossSpec) -> Callable:
    module, _, attr = spec.builder.partition(":")
    return getattr(importlib.import_module(module), attr)
