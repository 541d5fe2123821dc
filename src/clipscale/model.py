"""The model: open_clip's factory, our small configs, gradient checkpointing, parameter groups.

clipscale keeps open_clip's module and state_dict layout, so any checkpoint we write loads
with `open_clip.create_model_and_transforms(name, pretrained=path)`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from torch import nn

from .config import Config, ModelConfig
from .errors import ConfigError

BUNDLED_CONFIGS = Path(__file__).parent / "configs" / "models"
MAX_LOGIT_SCALE = math.log(100.0)
FUSED_ADAMW_DEVICES = ("cuda", "cpu")
_registered: set[str] = set()


def register_model_configs(extra_dirs: list[str] | None = None) -> None:
    """Make configs/models/*.json (and any user folders) known to open_clip by name."""
    for d in [str(BUNDLED_CONFIGS), *(extra_dirs or [])]:
        if d in _registered:
            continue
        path = Path(d)
        if not path.is_dir():
            raise ConfigError(f"'model.config_dirs': {d} is not a directory")
        open_clip.add_model_config(path)
        _registered.add(d)


def available_models() -> list[str]:
    register_model_configs()
    return open_clip.list_models()


@dataclass
class ModelBundle:
    model: nn.Module
    train_transform: Callable
    val_transform: Callable
    tokenizer: Callable
    image_size: int


def _image_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def create_model(mcfg: ModelConfig, loss_name: str = "clip", device: str | torch.device = "cpu") -> ModelBundle:
    """Build an open_clip model + transforms + tokenizer from the model section of the config."""
    register_model_configs(mcfg.config_dirs)
    if mcfg.name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(mcfg.name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown model 'model.name={mcfg.name}'{hint}; see `clipscale models`")
    kwargs = {}
    cfg = open_clip.get_model_config(mcfg.name) or {}
    if loss_name == "siglip" and "init_logit_bias" not in cfg:
        # SigLIP needs a learnable bias; the paper's initialisation (t' = log 10, b = -10).
        kwargs.update(init_logit_scale=math.log(10.0), init_logit_bias=-10.0)
    pretrained = mcfg.pretrained
    if (
        pretrained
        and (Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"))
        and not Path(pretrained).is_file()
    ):
        raise ConfigError(f"'model.pretrained': file not found: {pretrained}")
    with _quiet_open_clip():
        model, train_tf, val_tf = open_clip.create_model_and_transforms(
            mcfg.name, pretrained=pretrained, device=device, output_dict=True, **kwargs
        )
    if mcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    scalars_as_vectors(model)
    tokenizer = open_clip.get_tokenizer(mcfg.name)
    return ModelBundle(model, train_tf, val_tf, tokenizer, _image_size(model))


class _quiet_open_clip:
    """open_clip warns 'No pretrained weights loaded' for every random init; that is our default."""

    def __enter__(self):
        self._logger = logging.getLogger()
        self._level = self._logger.level
        self._logger.setLevel(max(self._level, logging.ERROR))

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)


OPEN_CLIP_SCALARS = ("logit_scale", "logit_bias")  # 0-d in open_clip's state_dict layout


def scalars_as_vectors(model: nn.Module) -> None:
    """Make 0-d parameters (CLIP's logit_scale, SigLIP's logit_bias) 1-element vectors, in place.

    Every engine trains them so: DeepSpeed views parameters as bytes and clips gradients in place,
    FSDP2 shards every parameter on its first dimension, and both fail on 0-d tensors. A [1]-shaped
    temperature computes the same numbers; checkpoints and exports store open_clip's 0-d shape
    (`to_open_clip_layout`)."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, nn.Parameter(p.detach().reshape(1).clone(), requires_grad=p.requires_grad))


def to_open_clip_layout(state: dict) -> dict:
    """A state_dict as open_clip stores it: fp32 CPU tensors, no wrapper prefixes (DDP's `module.`,
    torch.compile's `_orig_mod.`), 0-d temperature and bias."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        value = value.detach().to("cpu")
        if value.is_floating_point():
            value = value.float()
        if key in OPEN_CLIP_SCALARS and value.numel() == 1:
            value = value.reshape(())
        out[key] = value.contiguous()
    return out


def fit_scalar_shapes(state: dict, shapes: dict) -> dict:
    """`state` with every 1-element tensor reshaped to the shape `shapes` has for its key (open_clip's
    0-d scalars <-> the 1-element vectors clipscale trains)."""
    out = dict(state)
    for key, value in state.items():
        shape = shapes.get(key)
        if (
            shape is not None
            and isinstance(value, torch.Tensor)
            and value.numel() == 1
            and tuple(value.shape) != tuple(shape)
        ):
            out[key] = value.reshape(shape)
    return out


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases (all 1-D), embeddings and the temperature are not decayed."""
    return param.ndim < 2 or "embedding" in name or "logit_scale" in name or "logit_bias" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """Set every parameter group's lr, weight decay, betas and eps from the config: after a resume
    the current config wins over the values the checkpoint's optimizer state carried."""
    o = cfg.optim
    for group in optimizer.param_groups:
        # the group of gains, biases, embeddings and the temperature: tagged, or (a checkpoint of
        # clipscale <= 0.1) the one that was saved without weight decay
        no_decay = group.get("group") == "no_decay" or ("group" not in group and group.get("weight_decay") == 0)
        group["group"] = "no_decay" if no_decay else "decay"
        group["lr"] = group["initial_lr"] = o.lr
        group["weight_decay"] = 0.0 if no_decay else o.weight_decay
        group["betas"] = (o.beta1, o.beta2)
        group["eps"] = o.eps
        for flag in ("fused", "foreach", "capturable"):  # how this run steps, not how the saved one did
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    # torch's default on CPU is a Python loop over tensors (8x slower than the fused kernel here)
    fused = bool(o.fused and device.type in FUSED_ADAMW_DEVICES)
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None
    )


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learnable temperature at most 100 (ln 100 = 4.6052), as CLIP does."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.clamp_(0, MAX_LOGIT_SCALE)


def count_parameters(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions
