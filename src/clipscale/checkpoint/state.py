"""The training state, as parts with `state_dict()` / `load_state_dict()` (the protocol of
`torch.distributed.checkpoint.stateful.Stateful`), and the one place that says what a checkpoint
holds besides the model and optimizer (which are the engine's: engine/*.py):

    progress   step, non-finite steps skipped in total            (every rank the same)
    schedule   the LR schedule's position; its shape comes from the current config
    data       every stream's position in every source, the mixture schedule (data/loader.py)
    rng        python, numpy, torch CPU and the current CUDA device's generator, per rank
    meta       the resolved config, software versions, model name, world size

Loading applies the current config where a setting may change between runs (learning rate,
weight decay, schedule: the current config wins) and logs what changed.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from .. import __version__
from ..config import Config, to_dict
from ..job.distributed import DistEnv, all_gather_object

log = logging.getLogger("clipscale")

FORMAT = 2  # of the checkpoint's train state; 1 = the flat dict of clipscale <= 0.1 (DDP files)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    """Every RNG of this process, as plain tensors/ints (loadable with weights_only=True); of CUDA,
    the current device's only (another job may see another number of GPUs)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np_state[1].astype(np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # clipscale <= 0.1 saved every visible device's
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = cuda[device] if device < len(cuda) else None
    if isinstance(cuda, torch.Tensor) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def software_versions() -> dict:
    import open_clip
    import webdataset

    return {
        "clipscale": __version__,
        "torch": str(torch.__version__),
        "open_clip": open_clip.__version__,
        "webdataset": getattr(webdataset, "__version__", "unknown"),
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------- parts


@dataclass
class Progress:
    step: int = 0
    nonfinite_total: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "nonfinite_total": self.nonfinite_total}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.nonfinite_total = int(state["step"]), int(state.get("nonfinite_total", 0))


class LRSchedule:
    """The learning-rate schedule's position (its step); the schedule itself (warm-up, decay, base
    lr) is rebuilt from the current config, so a changed optim.lr or schedule.* takes effect."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        return {"step": self.engine.schedule_step()}

    def load_state_dict(self, state: dict) -> None:
        self.engine.restart_schedule(int(state["step"]))

    def load_missing(self, progress: Progress) -> None:
        self.engine.restart_schedule(progress.step)


class RNG:
    """Every rank's RNG states (collective to save). Restored only at the same world size; on
    another one every rank is re-seeded from (seed, rank, step)."""

    def __init__(self, env: DistEnv, seed: int, progress: Progress):
        self.env, self.seed, self.progress = env, seed, progress

    def state_dict(self) -> dict:
        return {"ranks": all_gather_object(rng_state())}

    def load_state_dict(self, state: dict) -> None:
        ranks = state.get("ranks") or []
        if len(ranks) == self.env.world_size:
            set_rng_state(ranks[self.env.rank])
        else:
            self.reseed()

    def reseed(self) -> None:
        seed_everything(self.seed + 1000 * self.env.rank + self.progress.step)

    def load_missing(self, progress: Progress) -> None:
        self.reseed()


class DataPosition:
    """The data stream's position (TrainData's state; collective to save)."""

    def __init__(self, data, progress: Progress, settle=None):
        """`settle(step)`, if given, brings the data to the settings it was saved with at that step (a training
        stage's batch size, crops, text length) before it continues."""
        self.data, self.progress, self.settle = data, progress, settle

    def state_dict(self) -> dict:
        return self.data.state()

    def load_state_dict(self, state: dict) -> None:
        if self.settle is not None:
            self.settle(self.progress.step)
        self.data.restore(state, self.progress.step)


class RunMeta:
    """What ran: the config (changes against the checkpoint's are logged), versions, world size."""

    def __init__(self, cfg: Config, env: DistEnv, stages: list | None = None):
        """`stages`: the run's resolved schedule.stages (saved: a resume at another world size keeps the
        boundaries of the steps trained)."""
        self.cfg, self.env, self.stages = cfg, env, stages or []
        self.saved: dict = {}
        self.wandb_run_id: str | None = None  # kept across resumes: a requeued job continues the W&B run

    def state_dict(self) -> dict:
        return {
            "wandb_run_id": self.wandb_run_id,
            "run_dir": str(Path(self.cfg.run.dir).resolve()),
            "config": to_dict(self.cfg),
            "versions": software_versions(),
            "model_name": self.cfg.model.name,
            "world_size": self.env.world_size,
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }

    def load_state_dict(self, state: dict) -> None:
        from .compat import config_changes

        self.saved = dict(state)
        if state.get("run_dir") == str(Path(self.cfg.run.dir).resolve()):  # not another run's W&B run
            self.wandb_run_id = state.get("wandb_run_id") or self.wandb_run_id
        changes = [
            f"{k}: {a!r} -> {b!r}"
            for k, a, b in config_changes(state.get("config", {}), to_dict(self.cfg))
            if k != "checkpoint.resume"
        ]
        if changes:
            log.info("settings changed since that checkpoint (the current ones apply): %s", "; ".join(changes))
        old_world = state.get("world_size", self.env.world_size)
        if old_world != self.env.world_size:
            log.warning(
                "world size changed %s -> %d: RNG states are re-seeded and the data stream is re-dealt "
                "(see README, 'Resuming and preemption')",
                old_world,
                self.env.world_size,
            )


class TrainState:
    """The parts, saved and loaded in this order (progress first: the others read its step)."""

    def __init__(self, **parts: Stateful):
        self.parts = parts

    def state_dict(self) -> dict:
        """Collective (the RNG and data parts gather from every rank)."""
        return {"format": FORMAT, **{name: part.state_dict() for name, part in self.parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Every part from `state`; a part the checkpoint lacks gets its default for the loaded step
        (RNGs re-seeded, the schedule at that step)."""
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])
            elif hasattr(part, "load_missing"):
                part.load_missing(self.parts["progress"])


def from_legacy(flat: dict) -> dict:
    """The train state of a format-1 checkpoint (clipscale <= 0.1 wrote a flat dict of extras)."""
    return {
        "format": 1,
        "progress": {"step": flat.get("step", 0), "nonfinite_total": flat.get("nonfinite_total", 0)},
        "schedule": {"step": flat.get("step", 0)},
        "data": flat.get("data") or {},
        "rng": {"ranks": flat.get("rng") or []},
        "meta": {
            "config": flat.get("config", {}),
            "versions": flat.get("versions", {}),
            "model_name": flat.get("model_name"),
            "world_size": flat.get("world_size"),
        },
    }
