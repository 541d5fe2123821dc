"""The two towers of a CLIP model: which parameter belongs to which, their layer numbers, locking
them (LiT) and loading one from its own checkpoint.

open_clip's layout: the image tower is `visual.*`; the text tower is everything else
(`transformer.*`, `token_embedding`, ... in CLIP; `text.*` in CustomTextCLIP) except the shared
temperature `logit_scale` and SigLIP's `logit_bias`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError

SHARED = ("logit_scale", "logit_bias")
TOWERS = ("image", "text")
_BLOCK = re.compile(r"(?:^|\.)(?:resblocks|blocks|layers|layer)\.(\d+)\.")
_STAGED = re.compile(r"(?:^|\.)(?:stages|layer\d)\.")  # ConvNeXt / ResNet stages: no single block order
_EMBEDDING = re.compile(
    r"(?:^|\.)(?:conv1|class_embedding|positional_embedding|ln_pre|patch_embed|cls_token|pos_embed|"
    r"token_embedding|embeddings|reg_token)(?:\.|$)"
)


def tower_of(name: str) -> str:
    """'image', 'text' or 'shared' (the temperature and bias) for a parameter name of the model."""
    name = name.removeprefix("module.").removeprefix("_orig_mod.")
    if name in SHARED:
        return "shared"
    return "image" if name.startswith("visual.") else "text"


def count_layers(names: list[str]) -> int:
    """Transformer blocks of one tower (0 when its blocks cannot be numbered)."""
    if any(_STAGED.search(n) for n in names):
        return 0
    ids = {int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    return max(ids) + 1 if ids else 0


def layer_id(name: str, layers: int) -> int:
    """EVA-style layer number within a tower of `layers` blocks: embeddings 0, block i -> i + 1,
    everything after the blocks (final norm, projection, head) layers + 1."""
    if _EMBEDDING.search(name):
        return 0
    match = _BLOCK.search(name)
    return int(match.group(1)) + 1 if match else layers + 1


def tower_layers(model: nn.Module) -> dict[str, int]:
    """{tower: number of blocks} of the model's towers."""
    names: dict[str, list[str]] = {t: [] for t in TOWERS}
    for name, _ in model.named_parameters():
        tower = tower_of(name)
        if tower in names:
            names[tower].append(name)
    return {tower: count_layers(n) for tower, n in names.items()}


# --------------------------------------------------------------------------- locking (LiT)


def lock_towers(model: nn.Module, mcfg) -> None:
    """model.lock_image / model.lock_text: open_clip's own tower locks (requires_grad off, and for
    the image tower optionally frozen BatchNorm statistics)."""
    if mcfg.lock_image:
        model.lock_image_tower(
            unlocked_groups=mcfg.lock_image_unlocked_groups, freeze_bn_stats=mcfg.lock_image_freeze_bn_stats
        )
    if mcfg.lock_text:
        if not hasattr(model, "lock_text_tower"):
            raise ConfigError(f"model.lock_text: {type(model).__name__} has no lockable text tower")
        try:
            model.lock_text_tower(
                unlocked_layers=mcfg.lock_text_unlocked_layers, freeze_layer_norm=mcfg.lock_text_freeze_layer_norm
            )
        except (AssertionError, NotImplementedError) as exn:
            raise ConfigError(f"model.lock_text: {exn or 'not supported by this text tower'}") from None
    if not any(p.requires_grad for n, p in model.named_parameters() if tower_of(n) != "shared"):
        raise ConfigError("model.lock_image and model.lock_text leave no parameter to train but the temperature")


# --------------------------------------------------------------------------- one tower from a file


def _unwrap(state) -> dict:
    """The tensor dict of an open_clip, clipscale or timm checkpoint file."""
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not any(torch.is_tensor(v) for v in state.values()):
        raise ValueError("no state_dict of tensors in it")
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items() if torch.is_tensor(v)}


def _tower_keys(state: dict, tower: str) -> dict:
    """The entries of `state` that belong to `tower`, named as the tower's own module names them."""
    if tower == "image":
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    return {k: v for k, v in state.items() if tower_of(k) == "text"}


def load_tower(model: nn.Module, path: str, tower: str) -> int:
    """Load one tower's weights from `path`: a whole open_clip / clipscale model (its tower part is
    taken), or that tower alone (for the image tower also a bare timm state_dict of its trunk).
    Every weight of the tower must be found with its shape; returns the tensors loaded."""
    key = f"model.pretrained_{tower}"
    if Path(path).is_dir():
        raise ConfigError(
            f"{key}: {path} is a checkpoint folder (FSDP2 or DeepSpeed): write it as one file first with "
            f"clipscale export --checkpoint {path} --output tower.pt"
        )
    if not Path(path).is_file():
        raise ConfigError(f"{key}: file not found: {path}")
    try:
        state = _unwrap(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    except Exception as exn:  # noqa: BLE001 - a pickle, zip or format error: one line
        raise ConfigError(
            f"{key}: cannot read {path}: {type(exn).__name__}: {str(exn).splitlines()[0][:200]}"
        ) from None
    if tower == "image":
        target: nn.Module = model.visual
        own = _tower_keys(state, "image") or state
        trunk = getattr(model.visual, "trunk", None)
        if trunk is not None and not any(k.startswith("trunk.") for k in own):
            target = trunk  # a timm model's own state_dict
    else:
        own = _tower_keys(state, "text")
        target = model
    expected = {k: v for k, v in target.state_dict().items() if target is not model or tower_of(k) == "text"}
    missing = sorted(set(expected) - set(own))
    wrong = sorted(k for k in expected if k in own and tuple(own[k].shape) != tuple(expected[k].shape))
    if missing or wrong:
        detail = (f"{len(missing)} missing (e.g. {missing[0]})" if missing else "") + (
            f"{'; ' if missing else ''}{len(wrong)} of another shape (e.g. {wrong[0]}: "
            f"{tuple(own[wrong[0]].shape)} vs {tuple(expected[wrong[0]].shape)})"
            if wrong
            else ""
        )
        raise ConfigError(f"{key}: {path} does not fit this model's {tower} tower: {detail}")
    with torch.no_grad():
        for name, tensor in target.state_dict().items():
            if name in expected:
                tensor.copy_(own[name].to(tensor.dtype))
    return len(expected)
