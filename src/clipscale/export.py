"""`clipscale export`: any clipscale checkpoint → one open_clip-loadable fp32 state_dict.

DDP checkpoints hold the full state_dict already. ZeRO-1/2/3 checkpoints hold the fp32
weights in per-rank optimizer shards; DeepSpeed's zero_to_fp32 consolidates them (on CPU, no
process group). ZeRO-0 checkpoints (which zero_to_fp32 does not handle) keep the full module in
the model-states file. The result loads with
`open_clip.create_model_and_transforms(name, pretrained=path)`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointManager, checksum_problem, load_checkpoint_file
from .engine.ds_checkpoint import DS_TAG, deepspeed_model_states
from .engine.formats import checkpoint_format, read_dcp_full, read_ema, read_train_state
from .errors import CheckpointError
from .fsutil import atomic_write
from .model import to_open_clip_layout
from .state import from_legacy


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file/folder, a run's checkpoints/ folder, or a run directory → the checkpoint; the
    same in a bucket (s3://bucket/run, .../checkpoints/step_X.pt: downloaded, then checked)."""
    from .wds.remote import is_remote

    if is_remote(str(path)):
        path = download_checkpoint(str(path))
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.is_dir() and path.name == "checkpoints":
        found = CheckpointManager(path.parent, is_main=False).latest()
        if found is None:
            raise CheckpointError(f"no intact checkpoint in {path}")
        return found
    problem = checksum_problem(path)
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem})")
    return path


def download_checkpoint(url: str) -> Path:
    """A checkpoint in a bucket (checkpoint.remote's layout) into a local cache folder."""
    import hashlib
    import tempfile

    from .checkpoint_names import NAME_RE
    from .checkpoint_remote import RemoteMirror

    url = url.rstrip("/")
    head, _, last = url.rpartition("/")
    if NAME_RE.match(last):
        root, name = head.removesuffix("/checkpoints"), last
        mirror = RemoteMirror(root)
    else:
        root = url.removesuffix("/checkpoints")
        mirror = RemoteMirror(root)
        name = mirror.latest()
        if name is None:
            raise CheckpointError(f"no checkpoint in {root}/checkpoints (no remote latest)")
    user_cache = Path(tempfile.gettempdir()) / f"clipscale-checkpoints-{os.getuid()}"  # not shared between users
    cache = user_cache / hashlib.sha1(root.encode()).hexdigest()[:12]
    try:
        return mirror.download(name, cache)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint {name} in {root}/checkpoints") from None


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
    (DDP file, FSDP2 or DeepSpeed folder, run directory) or of an open_clip-format file (a bare
    state_dict, or open_clip_train's {"state_dict": ...}; these carry no model name). With `ema`, the
    EMA weights in place of the trained ones (locked, untrained parameters are their own average)."""
    source = find_checkpoint(checkpoint)
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
    info = {"model_name": model_name, "context_length": model_cfg.get("context_length"), "step": step}
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
