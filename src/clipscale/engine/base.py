"""The engine interface: everything the trainer needs from DDP, FSDP2 or DeepSpeed, nothing more.

An engine owns the wrapped model, the optimizer, the LR schedule and mixed precision. The trainer
only calls these methods, so it has no engine-specific branches. What an engine takes from the
config is one EngineSpec: its own section, the optimization, the model's precision and compilation,
and the batch layout.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager

import torch
from torch import nn

from ..config import BatchLayout, Config, EngineConfig
from ..job.distributed import DistEnv
from ..model import fit_scalar_shapes, to_open_clip_layout
from ..optim import Optimization


@dataclass
class EngineSpec:
    """What an engine takes from the config and the run, gathered once (EngineSpec.of)."""

    engine: EngineConfig
    optimization: Optimization
    precision: str
    """model.precision: the autocast dtype (and DeepSpeed's / FSDP2's mixed precision)."""
    compile: bool | str
    """model.compile: torch.compile the wrapped model (true, false, or auto: on CUDA GPUs; see `compiles`)."""
    layout: BatchLayout
    identity: dict
    """This run's model and loss name ({"model": {"name"}, "loss": {"name"}}): a checkpoint of another
    model is refused with one line."""
    scratch_dir: Path
    """Where a checkpoint is converted before loading (DeepSpeed's universal checkpoint)."""
    convert_timeout_s: float = 3000.0
    """The deadline of such a conversion: within train.hang_grace_s, what the watchdog allows a checkpoint load,
    so that the conversion's own one-line error comes first."""

    @classmethod
    def of(cls, cfg: Config, layout: BatchLayout, stages: list | None = None) -> EngineSpec:
        stages = stages if stages is not None else training_stages(cfg, layout)
        return cls(
            engine=cfg.engine,
            optimization=Optimization(cfg.optim, cfg.schedule, cfg.train.steps, stages),
            precision=cfg.model.precision,
            compile=cfg.model.compile,
            layout=layout,
            identity={"model": {"name": cfg.model.name}, "loss": {"name": cfg.loss.name}},
            scratch_dir=Path(cfg.run.dir) / "checkpoints",
            convert_timeout_s=0.9 * cfg.train.hang_grace_s,  # before the watchdog, which allows the load that
        )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `model.precision` on `device` (None = plain fp32)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def training_stages(cfg: Config, layout: BatchLayout, trained: list | None = None, step: int = 0) -> list:
    """schedule.stages at this job's global batch (config.layout.Stage), or a one-line ConfigError; a resumed
    run keeps the boundaries of the steps it `trained` (config.layout.resolve_stages)."""
    from ..config.layout import resolve_stages
    from ..errors import ConfigError

    try:
        return resolve_stages(
            cfg.schedule.stages, cfg.model.patch_dropout, layout.global_batch, cfg.train.steps, layout.micro_batches,
            trained, step,
        )  # fmt: skip
    except ValueError as exn:
        raise ConfigError(str(exn)) from None


def compiles(setting: bool | str, device: torch.device) -> bool:
    """Whether model.compile (true, false or auto) compiles on `device`: auto = on CUDA GPUs only, where it pays
    (+30-40 % on an H200), and only where a C compiler is there (Triton builds its launchers with one; an image
    without it runs eager, said once); on CPUs compiling takes minutes and needs a C++ compiler."""
    if setting != "auto":
        return bool(setting)
    if device.type != "cuda":
        return False
    import os
    import shutil

    if not any(shutil.which(cc) for cc in (os.environ.get("CC") or "cc", "gcc", "clang")):
        import logging

        logging.getLogger("clipscale").warning("model.compile=auto: no C compiler here (cc, gcc): the model runs eager")
        return False
    return True


def optimizer_state_by_name(optim_state: dict) -> dict:
    """{parameter name: {state key: CPU tensor}} of a parameter-name keyed optimizer state dict."""
    return {
        name: {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for k, v in state.items()}
        for name, state in optim_state["state"].items()
    }


class Engine(abc.ABC):
    """One training engine. `module` is the plain open_clip model (for eval and export)."""

    module: nn.Module
    device: torch.device
    env: DistEnv
    spec: EngineSpec

    # ------------------------------------------------------------------ compute
    def autocast(self) -> ContextManager:
        dtype = autocast_dtype(self.spec.precision, self.device)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    runner: nn.Module  # what forward() calls: the wrapped (and maybe compiled) model
    compiled = False  # runner is torch.compile'd (model.compile)

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict:
        """Model forward through the wrapper (dict with image_features, text_features, logit_scale)."""
        with self.autocast():
            return self.runner(image=images, text=texts)

    @abc.abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one micro-batch's (surrogate) loss."""

    @abc.abstractmethod
    def no_sync(self) -> ContextManager:
        """Context for micro-batches that are not the last of an optimizer step."""

    @abc.abstractmethod
    def optimizer_step(self) -> dict:
        """Clip, step the optimizer and the schedule, zero the gradients.

        Returns {'grad_norm': float, 'skipped': bool}; a non-finite gradient norm skips the update
        (the same decision on every rank, since gradients are already reduced)."""

    @abc.abstractmethod
    def skip_optimizer_step(self) -> None:
        """Drop this step's gradients and advance the schedule without updating the weights."""

    def lr(self) -> float:
        """Current learning rate of optim.lr (per-tower and per-layer groups are scaled from it)."""
        group = self.optimizer.param_groups[0]
        initial = group.get("initial_lr")
        base = self.spec.optimization.optim.lr
        if not initial or initial == base:
            return float(group["lr"])
        return float(group["lr"] / initial * base)

    ema = None  # an ema.ModelEMA of `module` when ema.decay is set (the trainer attaches it)

    def resize_inputs(self, image: int | None, context: int | None, seed: int = 0) -> list[str]:
        """A training stage's input size (input_size.resize_inputs): the model, its optimizer state and EMA;
        the names of the parameters that changed. Engines that shard parameters flat cannot (validated)."""
        raise NotImplementedError(f"{type(self).__name__} cannot change the model's input size within a run")

    def load_ema(self, path: Path, ema_state: dict | None) -> None:
        """Restore the EMA (open_clip names, whole tensors) or, from a checkpoint without one, restart
        it at the loaded weights."""
        if self.ema is None:
            return
        if ema_state is None:
            import logging

            logging.getLogger(__name__).warning(
                "%s has no EMA weights (written without ema.decay): the average starts at its weights", path
            )
            self.ema.reset()
            return
        self.ema.load_state_dict(fit_scalar_shapes(ema_state, {k: v.shape for k, v in self.ema.shadow.items()}))

    def logit_scale(self) -> float:
        """Collective: the temperature exp(logit_scale) (a sharded parameter is gathered)."""
        param = self.module.logit_scale.detach()
        return float((param.full_tensor() if hasattr(param, "full_tensor") else param).float().exp().reshape(-1)[0])

    # ------------------------------------------------------------------ schedule
    optimizer: torch.optim.Optimizer  # the one whose param groups hold the learning rate
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def schedule_step(self) -> int:
        """Optimizer steps the LR schedule has taken."""
        return int(self.scheduler.last_epoch)

    def restart_schedule(self, step: int) -> None:
        """The current config's hyperparameters and LR schedule, positioned at `step` (after a resume:
        a changed optim.lr, weight decay or schedule.* applies from the next step on)."""
        self.scheduler = self.spec.optimization.restart(self.optimizer, step)

    def ema_state(self) -> dict | None:
        """The EMA weights to store (open_clip layout, whole tensors), or None without EMA."""
        if self.ema is None:
            return None
        return to_open_clip_layout(self.ema.state_dict())

    # ------------------------------------------------------------------ state
    checkpoint_suffix = ".pt"  # a file; DeepSpeed and FSDP2 checkpoints are folders ("")
    supports_async_save = False
    files_synced = False  # True where the format's writer fsyncs every file it writes (DCP)

    def snapshot(self, train_state: dict) -> dict | None:
        """A CPU copy of everything `save` writes, taken now (main rank; None elsewhere)."""
        raise NotImplementedError

    @abc.abstractmethod
    def save(self, path: Path, train_state: dict) -> None:
        """Collective: write a checkpoint at `path`: the model and optimizer in this engine's format,
        and `train_state` (state.TrainState's dict)."""

    @abc.abstractmethod
    def load(self, path: Path) -> dict:
        """Collective: restore model and optimizer from the checkpoint at `path` (any format this
        engine can read, written at any world size); returns the train state saved with it."""

    @abc.abstractmethod
    def full_optimizer_state(self) -> dict:
        """Collective: {parameter name: {exp_avg, exp_avg_sq, step}} as full CPU tensors (the same
        on every rank): what the optimizer carries, whatever the sharding."""
