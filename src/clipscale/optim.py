"""The optimizer and its schedule: AdamW's parameter groups (weight decay or not, per tower, per
layer with EVA-style layer decay), their hyperparameters from the current config (also after a
resume), and the learning-rate schedule (linear warm-up, then cosine / linear decay or constant).

The schedule is a LambdaLR, so its state is the step count alone and resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .config.layout import stage_at
from .errors import ConfigError
from .model import count_layers, layer_id, tower_of

FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def lr_factor(step: int, total_steps: int, scfg, base_lr: float) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    if scfg.warmup_steps > 0 and step < scfg.warmup_steps:
        return (step + 1) / scfg.warmup_steps
    if scfg.name == "constant" or base_lr <= 0:
        return 1.0
    floor = min(scfg.min_lr / base_lr, 1.0)
    decay_steps = max(1, total_steps - scfg.warmup_steps)
    progress = min(1.0, (step - scfg.warmup_steps) / decay_steps)
    if scfg.name == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1.0 - progress
    return floor + (1.0 - floor) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer, scfg, total_steps: int, base_lr: float, step: int = 0, stages: list = ()
):
    """The schedule positioned after `step` optimizer steps (its lr is that of step `step`); with training
    stages (config.layout.Stage), each step's lr times its stage's lr_scale."""

    def factor(s: int) -> float:
        scale = stage_at(list(stages), s + 1).lr_scale if stages else 1.0
        return lr_factor(s, total_steps, scfg, base_lr) * scale

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=step - 1)


# --------------------------------------------------------------------------- parameter groups


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


def apply_hyperparameters(optimizer: torch.optim.Optimizer, o) -> None:
    """Set every parameter group's lr, weight decay, betas and eps from the optim section: after a
    resume the current config wins over the values the checkpoint's optimizer state carried."""
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


@dataclass
class Optimization:
    """What an engine needs of the config to build, step and restart its optimizer and schedule:
    the optim and schedule sections, and the run's length in optimizer steps."""

    optim: object  # config.OptimConfig
    schedule: object  # config.ScheduleConfig
    total_steps: int
    stages: list | tuple = ()  # config.layout.Stage of schedule.stages (the trainer's list, read at every step)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return param_groups(model, self.optim)

    def optimizer(self, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
        """AdamW over the model's parameter groups (torch's fused kernel where it exists: the default
        on CPU is a Python loop over tensors, 8x slower here)."""
        o = self.optim
        fused = bool(o.fused and device.type in FUSED_ADAMW_DEVICES)
        groups = self.param_groups(model)
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=fused or None)

    def scheduler(self, optimizer: torch.optim.Optimizer, step: int = 0):
        """The LR schedule positioned after `step` optimizer steps."""
        return build_scheduler(optimizer, self.schedule, self.total_steps, self.optim.lr, step=step, stages=self.stages)

    def restart(self, optimizer: torch.optim.Optimizer, step: int):
        """The current config's hyperparameters on every group and the schedule at `step` (after a
        resume: a changed optim.lr, weight decay or schedule.* applies from the next step on)."""
        apply_hyperparameters(optimizer, self.optim)
        return self.scheduler(optimizer, step)

    @property
    def clip_norm(self) -> float | None:
        return self.optim.grad_clip_norm
