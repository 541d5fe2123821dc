"""The layout of clipscale's DeepSpeed checkpoint folders (no deepspeed import, so `clipscale
export` and `eval` read them without loading DeepSpeed).

    step_XXXXXXXX/state/mp_rank_00_model_states.pt            ZeRO 0-2: module + clipscale state
    step_XXXXXXXX/state/zero_pp_rank_0_mp_rank_00_model_states.pt   ZeRO-3 (rank 0's)
    step_XXXXXXXX/state/*optim_states.pt                       per-rank optimizer shards (ZeRO 1-3)
    step_XXXXXXXX/ds_config.json                               the resolved DeepSpeed config
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError

DS_TAG = "state"  # the tag save_checkpoint writes under
DS_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, 3


def deepspeed_model_states(folder: Path) -> dict:
    """The rank-0 model-states file of a clipscale DeepSpeed checkpoint (holds clipscale's state)."""
    for name in DS_MODEL_STATES:
        states = Path(folder) / DS_TAG / name
        if states.is_file():
            try:
                return torch.load(states, map_location="cpu", weights_only=False)
            except Exception as exn:
                raise CheckpointError(f"cannot read {states}: {type(exn).__name__}") from None
    raise CheckpointError(
        f"{folder} is not a clipscale DeepSpeed checkpoint (no {DS_TAG}/{DS_MODEL_STATES[0]}); "
        f"was it written with engine.name=ddp?"
    )
