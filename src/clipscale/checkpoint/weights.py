"""Loading for evaluation: a model with a checkpoint's weights (or its EMA), built from what the
checkpoint says it is (model name, context length, the model config folders it was trained with)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import ModelBundle, create_model, fit_scalar_shapes
from .export import consolidated_weights

log = logging.getLogger(__name__)


def model_from_checkpoint(
    checkpoint: str, model_name: str | None, device: torch.device, ema: bool = False, config_dirs: list | None = None
) -> tuple[ModelBundle, dict]:
    """(ModelBundle with the checkpoint's weights - or its EMA weights -, info) for any checkpoint path
    form (checkpoint/find.py) or an open_clip-format file (then `model_name` is needed). `config_dirs`:
    folders of model configs to know besides those the checkpoint was trained with."""
    state, info = consolidated_weights(checkpoint, ema)
    name = model_name or info["model_name"]
    if not name:
        raise CheckpointError(f"{checkpoint} does not say which model it holds: pass --model NAME")
    for folder in config_dirs or []:
        if not Path(folder).is_dir():
            raise CheckpointError(f"--config-dir {folder} is not a directory")
    saved = info.get("config_dirs") or []
    dirs = [*(str(d) for d in config_dirs or []), *(d for d in saved if Path(d).is_dir())]
    gone = [d for d in saved if not Path(d).is_dir()]
    if gone and not config_dirs:
        log.warning(
            "the checkpoint's model.config_dirs %s no longer exist: model %r must be known otherwise (--config-dir)",
            gone,
            name,
        )
    context_length = info.get("context_length") if name == info["model_name"] else None
    bundle = create_model(ModelConfig(name=name, context_length=context_length, config_dirs=dirs), device=device)
    bundle = _at_saved_input_size(bundle, state)
    try:
        bundle.model.load_state_dict(
            fit_scalar_shapes(state, {k: v.shape for k, v in bundle.model.state_dict().items()})
        )
    except RuntimeError as exn:
        lines = [line.strip() for line in str(exn).splitlines() if line.strip()]
        raise CheckpointError(
            f"{checkpoint} does not fit model {name!r}: {lines[1] if len(lines) > 1 else lines[0]}"[:400]
        ) from None
    return bundle, {**info, "model_name": name}


def _at_saved_input_size(bundle: ModelBundle, state: dict) -> ModelBundle:
    """The model at the input size its weights were saved at (a training stage's: schedule.stages), with the
    evaluation transform and the tokenizer to match."""
    import dataclasses
    import functools

    from ..model import transforms_for
    from ..model.input_size import image_size, resize_inputs, saved_input_size

    image, context = saved_input_size(state, bundle.model)
    if not resize_inputs(bundle.model, image, context):
        return bundle
    train, val = transforms_for(bundle.model)
    tokenizer = functools.partial(bundle.tokenizer, context_length=context) if context else bundle.tokenizer
    return dataclasses.replace(bundle, train_transform=train, val_transform=val, tokenizer=tokenizer,
                               image_size=image_size(bundle.model) or bundle.image_size)  # fmt: skip
