"""The model: open_clip's factory, our small configs, gradient checkpointing, and the two towers (which
parameter belongs to which, their layer numbers, locking them for LiT, loading one from its own file).

clipscale keeps open_clip's module and state_dict layout, so any checkpoint we write loads
with `open_clip.create_model_and_transforms(name, pretrained=path)`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def _import_open_clip():
    """open_clip without wandb: open_clip imports timm, and timm.utils.summary imports wandb when it is
    installed (0.4 s of every process's start-up) for a logging helper clipscale never calls. The import
    is refused for that moment only; logging.wandb imports wandb as usual later."""
    blocked = "wandb" not in sys.modules
    if blocked:
        sys.modules["wandb"] = None  # `import wandb` raises ImportError, which timm expects and passes
    try:
        import open_clip
    finally:
        if blocked and sys.modules.get("wandb", False) is None:
            del sys.modules["wandb"]
    return open_clip


open_clip = _import_open_clip()

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from ..config import AugmentConfig, ModelConfig, to_dict  # noqa: E402
from ..config.losses import loss_spec  # noqa: E402
from ..errors import ConfigError  # noqa: E402

BUNDLED_CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "models"
MAX_LOGIT_SCALE = math.log(100.0)
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
    """Build an open_clip model + transforms + tokenizer from the model section of the config (checked
    at load: config/validate.py), what the loss needs of it (the registry's model_init), and the
    training augmentation of data.augment; load single towers and lock them as asked."""
    register_model_configs(mcfg.config_dirs)
    _check_known(mcfg.name)
    kwargs = _architecture(mcfg, loss_name)
    with _quiet_open_clip():
        model = open_clip.create_model(
            mcfg.name, pretrained=mcfg.pretrained, device=device, output_dict=True, **kwargs
        )  # fmt: skip
    train_tf, val_tf = transforms_for(model, augment)
    for tower, path in (("image", mcfg.pretrained_image), ("text", mcfg.pretrained_text)):
        if path:
            load_tower(model, path, tower)
    lock_towers(model, mcfg)
    set_grad_checkpointing(model, mcfg.grad_checkpointing)
    scalars_as_vectors(model)
    tokenizer = open_clip.get_tokenizer(mcfg.name, context_length=mcfg.context_length)
    return ModelBundle(model, train_tf, val_tf, tokenizer, _image_size(model))


def transforms_for(model: nn.Module, augment: AugmentConfig | None = None) -> tuple[Callable, Callable]:
    """open_clip's training and evaluation transforms for the model as it is now (its image size after a training
    stage changed it), made as open_clip.create_model_and_transforms makes them."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    config = PreprocessCfg(**model.visual.preprocess_cfg)
    with warnings.catch_warnings():
        # open_clip 3.x lists colour jitter and grayscale as "unused" although it applies them
        warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
        train = image_transform_v2(config, is_train=True, aug_cfg=augmentation(augment))
    return train, image_transform_v2(config, is_train=False)


def _check_known(name: str) -> None:
    if name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ConfigError(f"unknown model 'model.name={name}'{hint}; see `clipscale models`")


def _architecture(mcfg: ModelConfig, loss_name: str) -> dict:
    """open_clip's create_model arguments that shape the network: what the loss needs (SigLIP's
    learnable bias, unless the model config initialises one), patch dropout, context length."""
    cfg = open_clip.get_model_config(mcfg.name) or {}
    loss = loss_spec(loss_name)
    kwargs = dict(loss.model_init) if loss.uses_bias and "init_logit_bias" not in cfg else {}
    if mcfg.patch_dropout:
        kwargs["force_patch_dropout"] = mcfg.patch_dropout
    if mcfg.context_length:
        kwargs["force_context_length"] = mcfg.context_length
    return kwargs


def meta_model(mcfg: ModelConfig, loss_name: str = "clip", image_size: int | None = None) -> nn.Module:
    """The run's network on the meta device (shapes, no memory, no weights read): what FLOP counting
    runs through. Locked towers are locked as in training (no gradient work for them); no activation
    checkpointing (model FLOPs count no recomputation)."""
    register_model_configs(mcfg.config_dirs)
    _check_known(mcfg.name)
    with _quiet_open_clip(), torch.device("meta"):
        kwargs = _architecture(mcfg, loss_name) | ({"force_image_size": image_size} if image_size else {})
        model = open_clip.create_model(mcfg.name, device="meta", output_dict=True, **kwargs)
    lock_towers(model, mcfg)
    return model


# --------------------------------------------------------------------------- activation checkpointing


BLOCK_LISTS = ("resblocks", "blocks", "layer", "layers")  # open_clip, timm, Hugging Face text towers


def block_lists(model: nn.Module) -> list[nn.Module]:
    """The residual block lists of the model's towers (open_clip's `resblocks`, timm's `blocks`, Hugging
    Face's `encoder.layer`): FSDP2's units and what selective checkpointing chooses from."""
    return [
        module
        for name, module in model.named_modules()
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and name.rsplit(".", 1)[-1] in BLOCK_LISTS
    ]


def set_grad_checkpointing(model: nn.Module, setting: bool | float) -> None:
    """model.grad_checkpointing: true (or 1.0) is open_clip's own, every block of both towers; a share
    in (0, 1) recomputes that share of each tower's blocks (the first ones; every block of a ViT keeps
    activations of the same size), so memory and compute trade off per block."""
    share = float(setting)
    if share >= 1.0:
        model.set_grad_checkpointing(True)
        return
    if share <= 0.0:
        return
    lists = block_lists(model)
    if not lists:
        raise ConfigError(
            f"model.grad_checkpointing={setting}: {type(model).__name__} has no transformer blocks to choose from; "
            "use true (every stage) or false"
        )
    for blocks in lists:
        for block in list(blocks)[: math.ceil(share * len(blocks))]:
            block.forward = functools.partial(_recomputed, block.forward)


def _recomputed(forward: Callable, *args, **kwargs):
    """A block's forward whose activations are recomputed in the backward (torch's non-reentrant
    checkpoint: works with autocast, FSDP2 and torch.compile)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


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


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """Keep the learnable temperature at most 100 (ln 100 = 4.6052), as CLIP does."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.clamp_(0, MAX_LOGIT_SCALE)


def count_parameters(model: nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 partitions


# --------------------------------------------------------------------------- the two towers

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
    key = f"model.pretrained_{tower}"  # (that it is a file was checked at load: config/validate.py)
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


def set_patch_dropout(model: nn.Module, share: float) -> int:
    """The share of image patches every patch-dropout module of the model drops in training (a training
    stage's); returns the modules set. The model must have been built with patch dropout (any share > 0)."""
    modules = [m for m in model.modules() if type(m).__name__ == "PatchDropout" and hasattr(m, "prob")]
    for m in modules:
        m.prob = share
    return len(modules)
