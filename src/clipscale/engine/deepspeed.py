"""DeepSpeed engine: ZeRO stages 0-3 behind the same interface as DDP.

The DeepSpeed config is generated from clipscale's (engine/ds_config.py). Accumulation is
clipscale's feature cache: DeepSpeed is told the accumulation boundary explicitly (`no_sync`
sets it to False for all but the last micro-batch) and never rescales the loss, because the
cached feature gradients are already the gradients of the whole global batch. The LR schedule
is clipscale's LambdaLR on DeepSpeed's base optimizer, stepped here, so it is the same as DDP's.

Checkpoints are DeepSpeed checkpoint folders (`save_checkpoint` with clipscale's train state as
client state) written under the checkpoint manager's temporary name, so the atomic rename,
checksums, `latest` and retention are the same as for DDP. A ZeRO-1/2/3 checkpoint of another
world size is converted to DeepSpeed's universal checkpoint (one fp32 tensor and its Adam moments
per parameter: deepspeed.checkpoint.ds_to_universal) and loaded with `load_universal_checkpoint`,
which re-partitions it over the ranks of this run.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import sys
import time
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint.compat import check_fits
from ..checkpoint.formats import DS_TAG as TAG
from ..checkpoint.formats import deepspeed_model_states
from ..checkpoint.state import from_legacy
from ..errors import CheckpointError, CheckpointMismatch
from ..fsutil import remove_path
from ..job.distributed import DistEnv, barrier, broadcast_object, ensure_process_group
from ..job.proc import run_with_deadline
from ..model import MAX_LOGIT_SCALE
from .base import Engine, EngineSpec
from .ds_config import build_ds_config

log = logging.getLogger(__name__)


def _forget_stale_groups() -> None:
    """DeepSpeed caches its world group in a module global; a second engine in the same process
    (after the first run's process group was destroyed) must not reuse the dead one."""
    from deepspeed.utils import groups

    cached = getattr(groups, "_WORLD_GROUP", None)
    if cached is None:
        return
    try:
        dist.get_global_rank(cached, 0)
    except (ValueError, RuntimeError):
        groups._WORLD_GROUP = None


def _shape(p: torch.Tensor) -> tuple:
    return tuple(getattr(p, "ds_shape", p.shape))


class DeepSpeedEngine(Engine):
    checkpoint_suffix = ""  # checkpoints are folders; saved synchronously (no snapshot())

    def __init__(self, model: nn.Module, spec: EngineSpec, env: DistEnv):
        import deepspeed

        self.spec, self.env, self.device = spec, env, env.device
        self.ds_config = build_ds_config(spec, env.device)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        ensure_process_group(env)
        _forget_stale_groups()
        deepspeed.init_distributed(
            dist_backend="nccl" if env.device.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=spec.engine.dist_timeout_s),
        )
        self.module = model.to(self.device)
        self.ds, _, _, _ = deepspeed.initialize(
            model=self.module, config=self.ds_config, model_parameters=spec.optimization.param_groups(self.module)
        )
        self.base_optimizer = self.ds.basic_optimizer
        self.optimizer = self.base_optimizer  # its param groups hold the learning rate
        self.scheduler = spec.optimization.scheduler(self.base_optimizer)
        self.ds.set_gradient_accumulation_boundary(True)
        self.runner = self.ds

    # ------------------------------------------------------------------ compute
    def backward(self, loss):
        # the feature-cache surrogate already carries the whole batch's gradient: no 1/K scaling
        self.ds.backward(loss, scale_wrt_gas=False)

    @contextlib.contextmanager
    def no_sync(self):
        self.ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self.ds.set_gradient_accumulation_boundary(True)

    def _stage0_grads_finite(self) -> bool:
        """ZeRO-0 has no overflow check of its own in fp32: look before stepping."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        return bool(torch.isfinite(norm))

    def _ds_step(self, force_skip: bool = False) -> bool:
        """One DeepSpeed optimizer step; True if it was skipped (non-finite gradients)."""
        before = self.ds.skipped_steps
        if self.stage == 0 and (force_skip or not self._stage0_grads_finite()):
            self.ds.zero_grad()  # drop them; no DeepSpeed step (its counters only label checkpoints)
            return True
        self.ds.step()  # ZeRO 1-3 skip non-finite gradients themselves (and count it)
        return self.ds.skipped_steps > before

    def optimizer_step(self) -> dict:
        skipped = self._ds_step()
        self.scheduler.step()
        self._clamp_logit_scale()
        norm = self.ds.get_global_grad_norm()
        return {"grad_norm": float("nan") if norm is None or skipped else float(norm), "skipped": skipped}

    def skip_optimizer_step(self):
        skipped = self._ds_step(force_skip=True)
        if not skipped:
            log.warning("non-finite loss but finite gradients: DeepSpeed applied this step")
        self.scheduler.step()

    def _clamp_logit_scale(self) -> None:
        """Clamp the temperature in DeepSpeed's fp32 master copy too (the module's is a view)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        param = getattr(self.module, "logit_scale", None)
        if param is None:
            return
        master = safe_get_full_fp32_param(param)
        if master is None:  # ZeRO-0 in fp32: the module's parameter is the master
            with torch.no_grad():
                param.clamp_(0, MAX_LOGIT_SCALE)
            return
        if float(master.max()) > MAX_LOGIT_SCALE or float(master.min()) < 0:
            safe_set_full_fp32_param(param, master.clamp(0, MAX_LOGIT_SCALE))
            with torch.no_grad():
                param.data.clamp_(0, MAX_LOGIT_SCALE)

    # ------------------------------------------------------------------ state
    def save(self, path: Path, train_state: dict) -> None:
        from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY

        client = {
            "train_state": train_state,
            "zero_stage": self.stage,
            **({"ema": self.ema_state()} if self.ema is not None else {}),
            "format": 2,
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: 0.2},
        }  # convertible later
        self.ds.save_checkpoint(str(path), tag=TAG, client_state=client, save_latest=False)
        if self.env.is_main:
            (Path(path) / "ds_config.json").write_text(json.dumps(self.ds_config, indent=1) + "\n")

    def _check_compatible(self, path: Path) -> tuple[dict, int]:
        """(the checkpoint's train state, the world size that wrote it); CheckpointError if it cannot
        be resumed here."""
        if path.is_file() or not (path / TAG).is_dir():
            raise CheckpointMismatch(
                f"{path} was written by engine.name=ddp or fsdp2; resume it with that engine "
                f"(any world size), or start from its weights with model.pretrained=<exported file>"
            )
        meta = deepspeed_model_states(path)
        train_state = meta.get("train_state") or from_legacy(meta.get("clipscale") or {})
        saved = {}
        for group in meta.get("param_shapes") or []:
            saved.update({k: tuple(v) for k, v in group.items()})
        if not saved:
            saved = {k: tuple(v.shape) for k, v in (meta.get("module") or {}).items()}
        now = {n: _shape(p) for n, p in self.module.named_parameters()}
        check_fits(path, train_state, self.spec.identity, now, saved)
        stage = meta.get("zero_stage", 0)
        if stage != self.stage:
            raise CheckpointMismatch(
                f"{path} was written with ZeRO stage {stage}, this run uses {self.stage}; set engine.zero_stage={stage}"
            )
        return train_state, int((train_state.get("meta") or {}).get("world_size") or self.env.world_size)

    def load(self, path: Path) -> dict:
        path = Path(path)
        train_state, old_world = self._check_compatible(path)
        if self.stage >= 1 and old_world != self.env.world_size:
            self._load_universal(path, train_state, old_world)
        else:
            loaded, client = self.ds.load_checkpoint(
                str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False, load_module_strict=True
            )
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load {path}")
            self.ds.set_gradient_accumulation_boundary(True)
        if self.ema is not None:  # after the weights: an EMA missing from the checkpoint starts at them
            self.load_ema(path, deepspeed_model_states(path).get("ema"))
        return train_state

    def _load_universal(self, path: Path, train_state: dict, old_world: int) -> dict:
        """ZeRO shards of `old_world` ranks -> DeepSpeed's universal checkpoint (written by the main
        rank into a temporary folder of this run's checkpoints/, the other ranks waiting on a status
        file rather than a collective: converting a large model can outlast engine.dist_timeout_s)
        -> re-partitioned over this run's ranks."""
        token = broadcast_object(uuid.uuid4().hex[:8])  # this attempt's: no stale status file can answer
        universal = self.spec.scratch_dir / f".{path.name}.tmp.universal-{token}"
        status = universal.with_name(universal.name + ".status")
        if self.env.is_main:
            remove_path(universal)
            status.unlink(missing_ok=True)
            log.info(
                "converting %s (ZeRO-%d of %d ranks) to a universal checkpoint for %d ranks",
                path,
                self.stage,
                old_world,
                self.env.world_size,
            )
            try:
                convert_to_universal(path / TAG, universal / TAG, self.spec.convert_timeout_s)
                status.write_text("ok\n")
            except Exception as exn:  # noqa: BLE001 - every rank must hear of it
                status.write_text(f"failed: {type(exn).__name__}: {exn}"[:500] + "\n")
        while not status.is_file():  # the other ranks: wait for the main rank's verdict, however long
            time.sleep(1)
        verdict = status.read_text().strip()
        try:
            if verdict != "ok":
                raise CheckpointError(f"cannot convert {path} to a universal checkpoint: {verdict}")
            self.ds._config.load_universal_checkpoint = True
            loaded, _ = self.ds.load_checkpoint(
                str(universal),
                tag=TAG,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=True,
            )
            if loaded is None:
                raise CheckpointError(f"DeepSpeed could not load the universal checkpoint made of {path}")
        finally:
            self.ds._config.load_universal_checkpoint = False
            barrier()  # every rank has read it
            if self.env.is_main:
                remove_path(universal)
                status.unlink(missing_ok=True)
        self.ds.set_gradient_accumulation_boundary(True)
        return train_state

    def full_optimizer_state(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        link = getattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1/2 link the moments to the parameters at the first step; do it now
            link()
        out = {}
        for name, p in self.module.named_parameters():
            out[name] = {
                key: safe_get_full_optimizer_state(p, key).detach().cpu().reshape(_shape(p))
                for key in ("exp_avg", "exp_avg_sq")
            }
        return out


def convert_to_universal(source: Path, target: Path, timeout_s: float) -> None:
    """DeepSpeed's ds_to_universal, in an interpreter of its own (`python -m`): it runs process
    pools that fork, and forked from this threaded process (the watchdog, gloo, the intra-op pool)
    their children deadlocked on locks those threads held. The fresh process has no threads to
    inherit and default signal handlers, and is stopped at the deadline (job/proc.py)."""
    command = [
        sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
        "--input_folder", str(source), "--output_folder", str(target),
        "--num_extract_workers", "2", "--num_merge_workers", "1", "--inject_missing_state",
    ]  # fmt: skip
    output = Path(target).parent.with_name(Path(target).parent.name + ".log")
    try:
        code = run_with_deadline(command, timeout_s, output)
        if code != 0:
            last = [line for line in output.read_text(errors="replace").splitlines() if line.strip()][-1:]
            raise RuntimeError(f"ds_to_universal exited with code {code}: {last[0][:300] if last else ''}")
    finally:
        output.unlink(missing_ok=True)
