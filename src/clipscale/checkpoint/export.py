"""`clipscale export`: any clipscale checkpoint → one open_clip-loadable fp32 state_dict.

DDP checkpoints hold the full state_dict already. ZeRO-1/2/3 checkpoints hold the fp32
weights in per-rank optimizer shards; DeepSpeed's zero_to_fp32 consolidates them (on CPU, no
process group). ZeRO-0 checkpoints (which zero_to_fp32 does not handle) keep the full module in
the model-states file. The result loads with
`open_clip.create_model_and_transforms(name, pretrained=path)`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError
from ..fsutil import atomic_write
from ..model import to_open_clip_layout
from .files import load_checkpoint_file
from .find import locate
from .formats import DS_TAG, checkpoint_format, deepspeed_model_states, read_dcp_full, read_ema, read_train_state
from .state import from_legacy


def _deepspeed_state_dict(folder: Path) -> tuple[dict, dict]:
    meta = deepspeed_model_states(folder)
    train_state = meta.get("train_state") or from_legacy(meta.get("clipscale") or {})
    if any((folder / DS_TAG).glob("*optim_states.pt")) and meta.get("zero_stage", 0) >= 1:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    else:  # ZeRO-0: the model-states file has the whole module
        state = meta["module"]
    return dict(state), train_state


def consolidated_weights(checkpoint: str | Path, ema: bool = False) -> tuple[dict, dict]:
    """(open_clip state_dict, info {model_name, context_length, step, source}) of a clipscale checkpoint
    (any path form of find.locate: step file or folder, `latest`, checkpoints or run folder, in a bucket
    too) or of an open_clip-format file (a bare
    state_dict, or open_clip_train's {"state_dict": ...}; these carry no model name). With `ema`, the
    EMA weights in place of the trained ones (locked, untrained parameters are their own average)."""
    source = locate(checkpoint)
    if source.is_file():
        try:
            full = load_checkpoint_file(source)
        except CheckpointError:
            full = {"state_dict": _bare_state_dict(source)}
        state, train_state = full["state_dict"], full.get("train_state") or from_legacy(full)
    elif checkpoint_format(source) == "fsdp2":
        state, train_state = read_dcp_full(source)["model"], read_train_state(source)
    else:
        state, train_state = _deepspeed_state_dict(source)
    if ema:
        averaged = read_ema(source) if not source.is_file() or "train_state" in full else None
        if averaged is None:
            raise CheckpointError(f"{source} holds no EMA weights (it was trained without ema.decay)")
        state = {**to_open_clip_layout(state), **averaged}
    meta = train_state.get("meta") or {}
    model_cfg = (meta.get("config") or {}).get("model") or {}
    model_name: str | None = meta.get("model_name") or model_cfg.get("name")
    step = (train_state.get("progress") or {}).get("step")
    info = {"model_name": model_name, "context_length": model_cfg.get("context_length"), "step": step,
            "config_dirs": model_cfg.get("config_dirs") or []}  # fmt: skip
    return to_open_clip_layout(state), {**info, "source": str(source), "ema": ema}


def _bare_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exn:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exn).__name__}") from None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} is neither a clipscale checkpoint nor an open_clip state_dict")
    return state


def export_checkpoint(checkpoint: str | Path, output: str | Path, ema: bool = False) -> dict:
    """Write the consolidated state_dict (or its EMA) to `output`; returns {model_name, step, tensors, source}."""
    state, info = consolidated_weights(checkpoint, ema)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(output, lambda f: torch.save(state, f))
    return {**info, "tensors": len(state)}
