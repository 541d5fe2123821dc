"""Checkpoints: the manager (when to save, what to keep, what to resume from), their files and
names, the formats each engine writes, the bucket mirror, export to open_clip, loading a model for
evaluation, and the train state a checkpoint carries besides the model and optimizer.

    manager.py   CheckpointManager: atomic saves, retention, auto-resume, rollback targets
    files.py     durable writes, checksums, reading a checkpoint file
    names.py     step_N[.pt], latest, .sha256
    find.py      any path a user gives (step file/folder, latest, checkpoints/, run folder, bucket)
    formats.py   DDP file, FSDP2 DCP folder, DeepSpeed folder: read whole without a process group
    compat.py    does a checkpoint fit this run's model; which settings changed
    state.py     the train state: progress, schedule, data position, RNG, run meta
    remote.py    checkpoint.remote: the bucket mirror
    export.py    `clipscale export`: one open_clip state_dict
    weights.py   a model with a checkpoint's weights (`clipscale eval`, the demo's report)
"""

from .files import checksum_path, checksum_problem, load_checkpoint_file, step_of, torch_save_synced
from .find import locate
from .manager import CheckpointManager

__all__ = [
    "CheckpointManager",
    "checksum_path",
    "checksum_problem",
    "load_checkpoint_file",
    "locate",
    "step_of",
    "torch_save_synced",
]
