"""The checkpoint formats the engines write, and reading them whole (for another engine or
world size, and for `clipscale export`).

    ddp        step_X.pt: one torch file {"state_dict": open_clip layout, "optimizer": torch's
               parameter-name keyed optimizer state (get_optimizer_state_dict, full), "train_state"}
    fsdp2      step_X/: a torch.distributed.checkpoint folder (one file per rank) of
               {"model": ..., "optim": ...} (sharded), and train_state.pt
    deepspeed  step_X/: DeepSpeed's save_checkpoint folder, read here without importing deepspeed:
                   state/mp_rank_00_model_states.pt               ZeRO 0-2: module + clipscale state
                   state/zero_pp_rank_0_mp_rank_00_model_states.pt  ZeRO-3 (rank 0's)
                   state/*optim_states.pt                          per-rank optimizer shards (ZeRO 1-3)
                   ds_config.json                                  the resolved DeepSpeed config

Model and optimizer states are keyed by parameter name everywhere, so any world size reads any
other's: DCP reshards a sharded save into whatever template it loads into, and a full state is
sharded by set_model_state_dict / set_optimizer_state_dict.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, CheckpointMismatch
from .files import load_checkpoint_file, read_error
from .names import DCP_METADATA, DS_TAG
from .state import from_legacy

DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, 3


def deepspeed_model_states(folder: Path) -> dict:
    """The rank-0 model-states file of a clipscale DeepSpeed checkpoint (holds clipscale's state)."""
    for name in DS_MODEL_STATES:
        states = Path(folder) / DS_TAG / name
        if states.is_file():
            try:
                return torch.load(states, map_location="cpu", weights_only=False)
            except Exception as exn:
                raise read_error(states, exn) from None
    raise CheckpointError(
        f"{folder} is not a clipscale DeepSpeed checkpoint (no {DS_TAG}/{DS_MODEL_STATES[0]}); "
        f"was it written with engine.name=ddp?"
    )


DCP_TRAIN_STATE = "train_state.pt"


def checkpoint_format(path: Path) -> str:
    """'ddp' (a file), 'fsdp2' (a DCP folder) or 'deepspeed' (a DeepSpeed folder)."""
    path = Path(path)
    if path.is_file():
        return "ddp"
    if (path / DCP_METADATA).is_file():
        return "fsdp2"
    if (path / DS_TAG).is_dir():
        return "deepspeed"
    raise CheckpointError(f"{path} is not a clipscale checkpoint (no file, DCP metadata or DeepSpeed folder)")


def read_dcp_full(path: Path, keys: set[str] | None = None) -> dict:
    """A DCP checkpoint folder read whole into this process (full tensors, no process group): what
    torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, without the file. `keys`:
    only these top-level entries (e.g. {"model"} for the weights alone)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    try:
        _load_state_dict(
            state,
            storage_reader=FileSystemReader(str(path)),
            planner=_EmptyStateDictLoadPlanner(keys=keys),
            no_dist=True,
        )
    except Exception as exn:
        raise read_error(path, exn, "the DCP checkpoint ") from None
    return state


def dcp_shapes(path: Path) -> dict[str, tuple]:
    """Parameter name -> shape of the model tensors a DCP checkpoint holds (from its metadata only)."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    return {
        key[len("model.") :]: tuple(meta.size)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }


def read_train_state(path: Path) -> dict:
    """The train state stored next to a DCP checkpoint's shards."""
    try:
        return torch.load(Path(path) / DCP_TRAIN_STATE, map_location="cpu", weights_only=True)
    except Exception as exn:
        raise read_error(Path(path) / DCP_TRAIN_STATE, exn) from None


def read_ema(path: Path) -> dict | None:
    """The EMA weights stored in a checkpoint of any format (open_clip names, whole CPU tensors), or
    None when it was written without ema.decay."""
    kind = checkpoint_format(path)
    if kind == "ddp":
        return load_checkpoint_file(path, mmap=True).get("ema")
    if kind == "fsdp2":
        return read_dcp_full(path, keys={"ema"}).get("ema") if has_dcp_entry(path, "ema") else None
    return deepspeed_model_states(path).get("ema")


def has_dcp_entry(path: Path, entry: str) -> bool:
    """Whether a DCP checkpoint holds the top-level entry (e.g. "ema")."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(str(path)).read_metadata()
    return any(key == entry or key.startswith(entry + ".") for key in metadata.state_dict_metadata)


def full_state(path: Path, weights: bool = True) -> tuple[dict, dict | None, dict]:
    """(model state_dict, parameter-name keyed optimizer state or None, train state) of a ddp or
    fsdp2 checkpoint, whole, on the CPU. With weights=False only the train state is read (the
    tensors of a DDP file are memory-mapped, not loaded): what every rank but the first needs when
    the first one broadcasts."""
    kind = checkpoint_format(path)
    if kind == "ddp":
        state = load_checkpoint_file(path, mmap=not weights)
        optim = state.get("optimizer")
        if optim is not None and not all(isinstance(k, str) for k in optim.get("state", {})):
            optim = None  # clipscale <= 0.1 kept torch's index-keyed optimizer state: no names to map
        train_state = state.get("train_state") or from_legacy(state)
        if not weights:
            return {}, ({} if optim is not None else None), train_state
        return state["state_dict"], optim, train_state
    if kind == "fsdp2":
        if not weights:
            return {}, {}, read_train_state(path)
        whole = read_dcp_full(path)
        return whole["model"], whole.get("optim"), read_train_state(path)
    raise CheckpointMismatch(
        f"{path} was written by engine.name=deepspeed; resume it with engine.name=deepspeed (any world size), "
        f"or start from its weights: clipscale export, then model.pretrained=<file>"
    )
