"""The model: open_clip's factory, our small configs, gradient checkpointing, parameter groups.

clipscale keeps open_clip's module and state_dict layout, so any checkpoint we write loads
with `open_clip.create_model_and_transforms(name, pretrained=path)`.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from torch import nn

from .config import AugmentConfig, Config, ModelConfig, to_dict
from .errors import ConfigError
from .towers import count_layers, layer_id, load_tower, lock_towers, tower_of

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


def augmentation(augment: AugmentConfig | None) -> dict | None:
    """open_clip's AugmentationCfg of data.augment (None: the model's default)."""
    if augment is None:
        return None
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in to_dict(augment).items() if v is not None}
    if len(out.get("color_jitter", ())) == 1:
        strength = out["color_jitter"][0]
        out["color_jitter"] = (strength, strength, strength, strength / 4)
    if "color_jitter" in out and "color_jitter_prob" not in out:
        out["color_jitter_prob"] = 1.0  # open_clip applies a jitter only with a probability
    return out


def create_model(
    mcfg: ModelConfig,
    loss_name: str = "clip",
    device: str | torch.device = "cpu",
    augment: AugmentConfig | None = None,
) -> ModelBundle:
    """Build an open_clip model + transforms + tokenizer from the model section of the config
    (and the training augmentation of data.augment); load single towers and lock them as asked."""
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
    if mcfg.patch_dropout:
        kwargs["force_patch_dropout"] = mcfg.patch_dropout
    if mcfg.context_length:
        kwargs["force_context_length"] = mcfg.context_length
    pretrained = mcfg.pretrained
    if (
        pretrained
        and (Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors"))
        and not Path(pretrained).is_file()
    ):
        raise ConfigError(f"'model.pretrained': file not found: {pretrained}")
    with _quiet_open_clip(), warnings.catch_warnings():
        # open_clip 3.x lists colour jitter and grayscale as "unused" although it applies them
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        model, train_tf, val_tf = open_clip.create_model_and_transforms(
            mcfg.name, pretrained=pretrained, device=device, output_dict=True, aug_cfg=augmentation(augment), **kwargs
        )
    if mcfg.patch_dropout and not hasattr(getattr(model, "visual", None), "patch_dropout"):
        raise ConfigError(
            f"'model.patch_dropout' needs an open_clip ViT image tower; {mcfg.name}'s is "
            f"{type(getattr(model, 'visual', None)).__name__}"
        )
    for tower, path in (("image", mcfg.pretrained_image), ("text", mcfg.pretrained_text)):
        if path:
            load_tower(model, path, tower)
    lock_towers(model, mcfg)
    if mcfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    scalars_as_vectors(model)
    tokenizer = open_clip.get_tokenizer(mcfg.name, context_length=mcfg.context_length)
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


@dataclass(frozen=True)
class GroupKey:
    """What sets a parameter group's lr and weight decay: its tower, whether it decays, its layer."""

    tower: str  # image | text | shared (temperature, bias)
    decay: bool
    layer: int | None = None  # with optim.layer_decay
    layers: int = 0  # blocks of its tower

    @property
    def name(self) -> str:
        if self.tower == "all":
            return "decay" if self.decay else "no_decay"
        layer = f"/layer{self.layer:02d}" if self.layer is not None else ""
        return f"{self.tower}{layer}/{'decay' if self.decay else 'no_decay'}"


PER_TOWER = ("image_lr", "text_lr", "image_weight_decay", "text_weight_decay", "layer_decay")


def splits_towers(o) -> bool:
    """Groups per tower only when a per-tower or per-layer setting asks for them (else the two groups
    of decayed and not decayed parameters, as every clipscale checkpoint before them had)."""
    return any(getattr(o, k) is not None for k in PER_TOWER)


def group_key(name: str, param: torch.Tensor, layers: dict[str, int], o) -> GroupKey:
    decays = not no_weight_decay(name, param)
    if not splits_towers(o):
        return GroupKey("all", decays)
    tower = tower_of(name)
    if o.layer_decay is None or tower == "shared":
        return GroupKey(tower, decays)
    return GroupKey(tower, decays, layer_id(name, layers[tower]), layers[tower])


def group_hyperparameters(key: GroupKey, o) -> tuple[float, float]:
    """(peak lr, weight decay) of a group under the optimizer settings `o` (the current config)."""
    lr = {"image": o.image_lr, "text": o.text_lr}.get(key.tower)
    lr = o.lr if lr is None else lr
    if key.layer is not None and o.layer_decay is not None:
        lr *= o.layer_decay ** (key.layers + 1 - key.layer)
    wd = {"image": o.image_weight_decay, "text": o.text_weight_decay}.get(key.tower)
    wd = o.weight_decay if wd is None else wd
    return lr, (wd if key.decay else 0.0)


def trained_tower_layers(model: nn.Module, layer_decay: float | None) -> dict[str, int]:
    """{tower: blocks}; with layer decay every tower that trains must have numbered blocks."""
    names: dict[str, list[str]] = {"image": [], "text": []}
    trained: set[str] = set()
    for name, p in model.named_parameters():
        tower = tower_of(name)
        if tower in names:
            names[tower].append(name)
            if p.requires_grad:
                trained.add(tower)
    layers = {tower: count_layers(n) for tower, n in names.items()}
    if layer_decay is not None:
        for tower in sorted(trained):
            if layers[tower] == 0:
                raise ConfigError(
                    f"'optim.layer_decay' needs a {tower} tower of numbered transformer blocks; this model's "
                    f"{tower} tower has none (e.g. a ResNet or ConvNeXt): set optim.layer_decay=null"
                )
    return layers


def param_groups(model: nn.Module, optim_cfg) -> list[dict]:
    """One AdamW group per (tower, decay or not, layer with optim.layer_decay), each tagged with its
    key so a resume can re-derive lr and weight decay from the current config. Frozen parameters
    (locked towers) are in no group: no optimizer state, no weight decay."""
    layers = trained_tower_layers(model, optim_cfg.layer_decay)
    groups: dict[GroupKey, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_key(name, p, layers, optim_cfg), []).append(p)
    out = []
    for key in sorted(groups, key=lambda k: (k.tower, -1 if k.layer is None else k.layer, not k.decay)):  # decay first
        lr, wd = group_hyperparameters(key, optim_cfg)
        out.append(
            {
                "params": groups[key],
                "lr": lr,
                "weight_decay": wd,
                "group": key.name,
                "tower": key.tower,
                "decay": key.decay,
                "layer": key.layer,
                "layers": key.layers,
            }
        )
    return out


def describe_groups(groups: list[dict]) -> str:
    """The parameter groups as a table for the start-up log."""
    rows = [("group", "tensors", "parameters", "lr", "weight_decay")]
    for g in groups:
        numel = sum(getattr(p, "ds_numel", p.numel()) for p in g["params"])
        rows.append((g["group"], str(len(g["params"])), f"{numel:,}", f"{g['lr']:.4g}", f"{g['weight_decay']:.4g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _key_of_group(group: dict) -> GroupKey:
    """The key of a saved or current group; checkpoints of clipscale <= 0.3 had two groups only
    ("decay" and "no_decay", tagged or told apart by their weight decay)."""
    if "tower" in group:
        return GroupKey(group["tower"], bool(group["decay"]), group.get("layer"), int(group.get("layers") or 0))
    no_decay = group.get("group") == "no_decay" or ("group" not in group and group.get("weight_decay") == 0)
    return GroupKey("all", not no_decay)


def apply_hyperparameters(optimizer: torch.optim.Optimizer, cfg: Config) -> None:
    """Set every parameter group's lr, weight decay, betas and eps from the config: after a resume
    the current config wins over the values the checkpoint's optimizer state carried."""
    o = cfg.optim
    for group in optimizer.param_groups:
        key = _key_of_group(group)
        group["group"] = key.name
        group["lr"], group["weight_decay"] = group_hyperparameters(key, o)
        group["initial_lr"] = group["lr"]
        group["betas"] = (o.beta1, o.beta2)
        group["eps"] = o.eps
        for flag in ("fused", "foreach", "capturable"):  # how this run steps, not how the saved one did
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]


def build_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optim
    # torch's default on CPU is a Python loop over tensors (8x slower than the fused kernel here)
    fused = bool(o.fused and device.type in FUSED_ADAMW_DEVICES)
    return torch.optim.AdamW(param_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learnable temperature at most 100 (ln 100 = 4.6052), as CLIP does."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.clamp_(0, MAX_LOGIT_SCALE)


def count_parameters(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions
