"""The training loop. Read top to bottom: set up, resume, loop (step, log, checkpoint), finish.

Run with `clipscale train --config X.yaml [key=value ...]` or
`torchrun --nproc_per_node=N -m clipscale.train --config X.yaml [key=value ...]`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CheckpointManager, step_of, torch_save_synced
from .config import Config, add_config_arguments, load_config, save_config, to_dict
from .data.loader import TrainData
from .data.samples import draft_size
from .distributed import (
    DistEnv,
    all_gather_object,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    world_size,
)
from .ema import ModelEMA
from .engine import build_engine
from .errors import ConfigError, UserError, run_command
from .grad_cache import forward_backward
from .guard import SpikeGuard
from .loss import build_loss
from .metrics import MetricsLogger
from .model import count_parameters, create_model, describe_groups, param_groups
from .preempt import EXIT_PREEMPTED, PreemptionHandler
from .run_status import write_status
from .state import RNG, DataPosition, LRSchedule, Progress, RunMeta, TrainState, seed_everything
from .watchdog import EXIT_HUNG, HangWatchdog

log = logging.getLogger("clipscale")


class TrainingDiverged(UserError):
    """The loss stayed non-finite for train.max_nonfinite_steps consecutive steps, or kept spiking."""


def setup_logging(env: DistEnv) -> None:
    """clipscale's messages at INFO on rank 0 (WARNING elsewhere); other libraries at WARNING."""
    counts = [
        f"requeue{env.requeue_count}" if env.requeue_count else "",
        f"restart{env.restart_count}" if env.restart_count else "",
    ]
    prefix = "[" + " ".join([f"rank{env.rank}", *filter(None, counts)]) + "]"
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {prefix} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("clipscale").setLevel(logging.INFO if env.is_main else logging.WARNING)


def global_loss_and_stop(loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """One all-reduce per step: the global loss (mean over ranks) and whether any rank was signalled."""
    t = torch.stack([loss.detach().float().reshape(()), loss.new_tensor(1.0 if stop_requested else 0.0).float()])
    if world_size() > 1:
        dist.all_reduce(t)
    total, stops = t.tolist()
    return total / world_size(), stops > 0


def warn_about_timeouts(cfg: Config) -> None:
    """The timeouts work in order: a stalled read is abandoned, then a hung rank is stopped by the
    watchdog, and only then do collectives time out. Out of order, the later one never gets to act."""
    collective, hang, read = cfg.engine.dist_timeout_s, cfg.train.hang_timeout_s, cfg.data.read_timeout_s
    if hang and hang >= collective:
        log.warning(
            "train.hang_timeout_s=%s >= engine.dist_timeout_s=%s: a rank stuck in a collective fails the run with a "
            "timeout before the hang watchdog can leave its stacks and ask for a requeue",
            hang,
            collective,
        )
    if hang and cfg.train.hang_grace_s >= collective:
        log.warning(
            "train.hang_grace_s=%s >= engine.dist_timeout_s=%s: a rank stuck in the first step, a checkpoint or an "
            "evaluation fails the run with a collective timeout before the watchdog can report it",
            cfg.train.hang_grace_s,
            collective,
        )
    if read and read >= min(collective, hang or collective):
        log.warning(
            "data.read_timeout_s=%s is not below train.hang_timeout_s / engine.dist_timeout_s: a stalled shard "
            "read stops the run instead of costing one shard",
            read,
        )


class Trainer:
    """One run: set up, resume, the loop (step, log, maybe save, maybe evaluate), finish."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.preempt = PreemptionHandler(cfg.train.preempt_signals)  # before DataLoader workers fork
        self.progress = Progress()
        self.started = time.perf_counter()
        self.setup_seconds: dict[str, float] = {}  # model, data: logged with the first step ("start-up:")
        # set-up, resume and the first step run under the watchdog's grace period (see watchdog.py)
        self.watchdog = HangWatchdog(
            self.run_dir, env.rank, cfg.train.hang_timeout_s, cfg.train.hang_grace_s, self._status_fields
        )
        try:
            self._set_up(cfg, env)
        except BaseException:
            self.close()
            raise
        self.watchdog.idle()  # until fit(): a built Trainer nobody runs must not stop the process later

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _set_up(self, cfg: Config, env: DistEnv) -> None:
        if env.is_main:
            warn_about_timeouts(cfg)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        t0 = time.perf_counter()
        self.bundle = create_model(cfg.model, cfg.loss.name, env.device, augment=cfg.data.augment)
        log.info("parameter groups:\n%s", describe_groups(param_groups(self.bundle.model, cfg.optim)))
        self.engine = build_engine(cfg, self.bundle.model, env)
        self.setup_seconds["model"] = time.perf_counter() - t0
        self.ema = None
        if cfg.ema.decay is not None and getattr(self.engine, "stage", 0) == 3:  # (also from a DeepSpeed file)
            raise ConfigError("'ema.decay' is not supported with DeepSpeed ZeRO-3 (its parameters are partitioned); "
                              "use engine.name=fsdp2")  # fmt: skip
        if cfg.ema.decay is not None:  # before resuming: the checkpoint restores it
            self.ema = ModelEMA(self.engine.module, cfg.ema.decay, cfg.ema.every_n_steps, cfg.ema.warmup)
            self.engine.ema = self.ema
        self.loss_fn = build_loss(cfg)
        self.teacher = None
        if cfg.distill.model:
            from .distill import DistillLoss, Teacher

            self.teacher = Teacher(cfg, self.bundle, env.device, self.engine.autocast)
            self.loss_fn = DistillLoss(self.loss_fn, cfg.distill.weight)
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint, env.is_main, local_main=env.local_rank == 0)
        draft = draft_size(self.bundle.image_size, cfg.data.augment) if cfg.data.jpeg_draft else None
        t0 = time.perf_counter()
        self.data = TrainData(cfg, self.bundle.train_transform, self.bundle.tokenizer, env, draft_size=draft)
        self.setup_seconds["data"] = time.perf_counter() - t0
        self.rng = RNG(env, cfg.seed, self.progress)
        self.guard = SpikeGuard(cfg.train.spike_guard) if cfg.train.spike_guard else None
        self.state = TrainState(
            progress=self.progress,
            schedule=LRSchedule(self.engine),
            data=DataPosition(self.data, self.progress),
            rng=self.rng,
            meta=RunMeta(cfg, env),
            **({"guard": self.guard} if self.guard else {}),
        )
        loaded = self.ckpts.load(self.engine, cfg.checkpoint.resume)
        self.last_checkpoint: Path | None = None  # the newest checkpoint of this run (saved or resumed from)
        if loaded is not None:
            path, saved = loaded
            self.last_checkpoint = path
            self.state.load_state_dict(saved)
            log.info("resumed from %s at step %d", path, self.step)
        else:
            self.rng.reseed()
        self.preempt.step_in_progress = self.step + 1  # a signal during set-up stops after the first step
        self.watchdog.resumed_at(self.step)

        self.metrics = MetricsLogger(
            self.run_dir,
            env.is_main,
            env.rank,
            cfg.logging.tensorboard,
            cfg.logging.sample_keys,
            console=self._console,
            tracker=self._tracker(),
        )
        self.metrics.resume_at(self.step)
        self.global_batch = cfg.data.batch_size * env.world_size * cfg.optim.accum_steps
        self.nonfinite_run = 0  # consecutive skipped steps
        self.progress_bar = None
        self.evaluator = None
        if cfg.eval.zeroshot or cfg.eval.retrieval:  # read the evaluation sets now: errors at start-up
            from .evaluate import Evaluator

            self.evaluator = Evaluator(
                cfg.eval, self.bundle.val_transform, self.bundle.tokenizer, env.device, cfg.train.preempt_signals
            )
        elif cfg.eval.every_n_steps:
            log.warning(
                "eval.every_n_steps=%d, but no evaluation set is given (eval.zeroshot, eval.retrieval): "
                "nothing will be evaluated",
                cfg.eval.every_n_steps,
            )

    def _tracker(self):
        """The W&B run of logging.wandb (rank 0), continuing the checkpoint's run id after a resume."""
        spec, meta = self.cfg.logging.wandb, self.state.parts["meta"]
        if spec is None:
            return None
        from .tracking import WandbLogger, new_run_id

        meta.wandb_run_id = broadcast_object(meta.wandb_run_id or new_run_id() if self.env.is_main else None)
        if not self.env.is_main:
            return None
        return WandbLogger(spec, self.run_dir, meta.wandb_run_id, to_dict(self.cfg))

    @property
    def step(self) -> int:
        return self.progress.step

    def close(self) -> None:
        """Stop what runs beside the loop: DataLoader workers, signal handlers, the watchdog."""
        if getattr(self, "data", None) is not None:
            self.data.close()
        self.preempt.restore()
        self.watchdog.stop()

    # ------------------------------------------------------------------ helpers
    def _console(self, line: str) -> None:
        if self.progress_bar is not None:
            self.progress_bar.write(line)
        else:
            log.info(line)

    def _status_fields(self) -> dict:
        fields = {
            "total_steps": self.cfg.train.steps,
            "world_size": self.env.world_size,
            "restart_count": self.env.restart_count,
            "requeue_count": self.env.requeue_count,
        }
        guard = getattr(self, "guard", None)
        if guard is not None and guard.rollbacks:
            fields["rollbacks"] = guard.rollbacks[-20:]
        return fields

    def write_status(self, state: str, **fields) -> None:
        """RUN_DIR/status.json: running | finished | preempted | failed | hung (read by job scripts to
        decide on requeue)."""
        if self.env.is_main:
            write_status(self.run_dir, state, step=self.step, **self._status_fields(), **fields)

    def evaluate(self) -> dict:
        """Collective: zero-shot / retrieval numbers into metrics.jsonl (the model is left as it was)."""
        t0 = time.perf_counter()
        with self.watchdog.allow("evaluation"), self.ema.swapped_in() if self.cfg.eval.use_ema else nullcontext():
            results = self.evaluator.run(self.engine.module, self.engine.autocast)
        results["eval/seconds"] = time.perf_counter() - t0
        self.metrics.log(self.step, results)
        return results

    def epoch(self) -> int:
        return (self.step * self.global_batch) // self.data.num_samples

    def save(self, background: bool = False) -> Path:
        """Collective: the engine's model and optimizer, and the train state. In the background
        (checkpoint.async, DDP engine) the main rank writes a CPU snapshot while training goes on."""
        with self.watchdog.allow("checkpoint"):
            return self._save(background)

    def _save(self, background: bool) -> Path:
        # saved in the middle of a spike (a preemption): retention must keep what a rollback needs
        guard = self.guard
        if self.env.is_main:
            spiking = guard is not None and guard.above > 0
            first = self.step - guard.above + 1 if spiking else 0
            self.ckpts.protected = self.ckpts.rollback_target(first, self.last_checkpoint) if spiking else None
        train_state = self.state.state_dict()
        suffix = self.engine.checkpoint_suffix
        if background and self.engine.supports_async_save:
            snap = self.engine.snapshot(train_state)
            path = self.ckpts.path_for(self.step, suffix)
            if self.env.is_main:
                path = self.ckpts.save_async(self.step, lambda tmp: torch_save_synced(snap, tmp), suffix)
            log.info("saving checkpoint %s in the background", path)
            self.last_checkpoint = path
            return path
        path = self.ckpts.save(self.step, lambda tmp: self.engine.save(tmp, train_state), suffix)
        log.info("saved checkpoint %s", path)
        self.last_checkpoint = path
        return path

    def _after_update(self, stats: dict) -> None:
        if not stats["skipped"]:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.progress.nonfinite_total += 1
        log.warning(
            "step %d skipped: non-finite loss or gradients (%d in a row, %d in total)",
            self.step,
            self.nonfinite_run,
            self.progress.nonfinite_total,
        )
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"the loss or gradients were not finite for {self.nonfinite_run} consecutive "
                f"steps (up to step {self.step}); training stopped. Lower optim.lr, "
                f"check the data, or resume from an earlier checkpoint"
            )

    def train_step(self) -> tuple[float, bool, dict, float, list]:
        """One optimizer step: (global loss, stop requested by any rank, step stats, data wait, micro-batches)."""
        micro, wait = [], 0.0
        doing = self.watchdog.doing
        doing("waiting for data")
        for _ in range(self.cfg.optim.accum_steps):
            batch, w = self.data.next()
            micro.append(self.data.to_device(batch, self.engine.device))
            wait += w
        self.engine.module.train()
        doing("forward/backward (feature all-gathers, gradient all-reduce or reduce-scatter)")
        loss = forward_backward(self.engine, self.loss_fn, micro, self.teacher)
        doing("all-reduce of the loss and the stop flag")
        global_loss, stop = global_loss_and_stop(loss, self.preempt.requested)
        doing("optimizer step")
        if math.isfinite(global_loss):
            stats = self.engine.optimizer_step()
        else:
            self.engine.skip_optimizer_step()
            stats = {"grad_norm": float("nan"), "skipped": True}
        self.progress.step += 1
        if self.ema is not None and not stats["skipped"]:
            self.ema.update(self.step)
        self._after_update(stats)
        return global_loss, stop, stats, wait, micro

    def rollback(self, loss: float) -> int:
        """Collective: the loss spiked (every rank sees the same global loss, so every rank is here at
        the same step). Restore the newest checkpoint from before the spike, consume the next
        skip_batches global batches without training on them, and go on. Returns the step restored."""
        guard, spike_step = self.guard, self.step
        first_spiking = spike_step - guard.above + 1
        recent = guard.recent_rollbacks(spike_step)
        if recent >= guard.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"the loss spiked again at step {spike_step} ({loss:.4g}, {guard.cfg.factor} x the median "
                f"{guard.median():.4g} exceeded for {guard.above} steps) after {recent} rollback(s) within "
                f"{guard.cfg.within_steps} steps; training stopped. Lower optim.lr, raise "
                f"train.spike_guard.skip_batches, or check the data"
            )
        with self.watchdog.allow("rollback"):
            self._rollback_to(loss, spike_step, first_spiking)
        return self.step

    def _rollback_to(self, loss: float, spike_step: int, first_spiking: int) -> Path:
        guard = self.guard
        self.ckpts.wait()
        target = self.ckpts.rollback_target(first_spiking, self.last_checkpoint) if self.env.is_main else None
        target = broadcast_object(str(target) if target else None)
        if target is None:
            raise TrainingDiverged(
                f"the loss spiked at step {spike_step} ({loss:.4g} > {guard.cfg.factor} x the median "
                f"{guard.median():.4g} for {guard.above} steps) and there is no checkpoint from before step "
                f"{first_spiking} to roll back to; save checkpoints more often (checkpoint.every_n_steps)"
            )
        target = Path(target)
        # back to the same checkpoint again: skip further, or the same data would spike the same way
        again = sum(1 for r in guard.rollbacks if r.get("to_step") == step_of(target))
        skip = guard.cfg.skip_batches * (1 + again)
        record = {
            "step": spike_step,
            "to_step": step_of(target),
            "loss": loss,
            "median": guard.median(),
            "skipped_batches": skip,
        }
        rollbacks = [*guard.rollbacks, record]
        log.warning(
            "loss spike: %.4g > %.3g x the median %.4g for %d steps (to step %d): rolling back to %s and skipping "
            "%d global batches of data",
            loss,
            guard.cfg.factor,
            guard.median(),
            guard.above,
            spike_step,
            target.name,
            skip,
        )
        self.data.close()
        train_state = self.engine.load(target)
        self.state.load_state_dict(train_state)
        guard.rollbacks = rollbacks  # the history of rollbacks outlives the restored state
        guard.after_rollback()
        if self.env.is_main:
            self.ckpts.abandon_after(target)
        self.last_checkpoint = target
        self.metrics.resume_at(self.step, keep_events=True)
        barrier()  # the main rank has cut the logs back before any rank appends to them
        # the skipped samples count as consumed: recorded before the step that follows them
        for i in range(skip):
            micro = self.data.skip(1)
            self.metrics.sample_keys(
                self.step + 1,
                *([x for mb in micro for x in mb[f]] for f in ("keys", "passes", "sources")),
                skipped=i,
            )
        self.metrics.log(
            self.step + 1,
            {
                "event": "rollback",
                "rollback/from_step": spike_step,
                "rollback/to_step": self.step,
                "rollback/loss": loss,
                "rollback/median": record["median"],
                "rollback/skipped_batches": skip,
                "rollback/count": len(rollbacks),
            },
        )
        self.write_status("running", checkpoint=str(target))
        return target

    def preemption(self) -> tuple[str, int | None]:
        """Collective: (the signal, the step it arrived in), of the rank signalled first."""
        received = [r for r in all_gather_object((self.preempt.received, self.preempt.received_during)) if r[0]]
        return min(received, key=lambda r: r[1]) if received else ("unknown signal", None)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        self.watchdog.watch("first step")
        try:
            return self._fit()
        finally:
            self.watchdog.idle()  # the loop is over: nothing to watch once fit() has returned

    def _fit(self) -> dict:
        cfg, env, total = self.cfg, self.env, self.cfg.train.steps
        log.info(
            "model %s (%.2fM params) | %d process(es) on %s | engine %s | global batch %d (%d x %d ranks x %d "
            "accum) | %d samples per epoch | steps %d -> %d",
            cfg.model.name,
            count_parameters(self.engine.module) / 1e6,
            env.world_size,
            env.device,
            cfg.engine.name,
            self.global_batch,
            cfg.data.batch_size,
            env.world_size,
            cfg.optim.accum_steps,
            self.data.num_samples,
            self.step,
            total,
        )
        self.write_status("running")
        if env.is_main and cfg.logging.progress:
            from tqdm import tqdm

            self.progress_bar = tqdm(
                total=total, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0, file=sys.stderr
            )
        last_loss = float("nan")
        window = Window()
        last_saved = self.step if self.step > 0 else -1
        last_eval = -1
        save_pending = False  # a checkpoint that came due while the loss was spiking
        preempted = signal_step = None
        if self.guard is not None and self.guard.due():  # saved (preempted) at the step that decided it
            last_saved = last_eval = self.rollback(self.guard.last_loss)
        while self.step < total:
            self.preempt.step_in_progress = self.step + 1
            last_loss, stop, stats, wait, micro = self.train_step()
            if self.setup_seconds:
                self.log_startup(wait)
            self.watchdog.beat(self.step)
            window.add(wait)
            spiked = self.guard is not None and self.guard.spiked(last_loss)
            if spiked and not stop:  # when stopping, the checkpoint keeps the verdict: rolled back on resume
                last_saved = last_eval = self.rollback(last_loss)
                save_pending = False
                if self.progress_bar is not None:
                    self.progress_bar.n = self.step
                    self.progress_bar.refresh()
                window.reset()
                continue
            self.metrics.sample_keys(
                self.step, *([x for mb in micro for x in mb[f]] for f in ("keys", "passes", "sources"))
            )
            if self.progress_bar is not None:
                self.progress_bar.update(1)
                self.progress_bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
            if self.step % cfg.logging.every_n_steps == 0 or self.step == total or stop:
                self.log_step(last_loss, stats, window)
            if stop:
                preempted, signal_step = self.preemption()
                log.warning(
                    "preemption requested (%s during step %s): saving at step %d and exiting with code %d",
                    preempted,
                    signal_step,
                    self.step,
                    EXIT_PREEMPTED,
                )
                break
            save_pending = save_pending or self.ckpts.due(self.step, total)
            if save_pending and (self.guard is None or not self.guard.above) and self.step < total:
                # never while the loss is spiking: the checkpoint to roll back to must come from before
                self.save(background=cfg.checkpoint.async_save)
                last_saved, save_pending = self.step, False
            if self.evaluator and cfg.eval.every_n_steps and self.step % cfg.eval.every_n_steps == 0:
                window.start += self.evaluate()["eval/seconds"]  # not counted as training time
                last_eval = self.step

        if self.ckpts.due_at_end(self.step, last_saved, preempted=bool(preempted)):
            self.save()
        with self.watchdog.allow("checkpoint"):
            self.ckpts.wait()
        if self.evaluator and cfg.eval.at_end and not preempted and last_eval != self.step:
            self.evaluate()
        if self.progress_bar is not None:
            self.progress_bar.close()
        skipped = self.data.skipped()
        if skipped:
            log.warning("skipped samples on rank %d: %s", env.rank, skipped)
        self.metrics.close()
        self.write_status(
            "preempted" if preempted else "finished",
            checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None,
            **({"signal": preempted, "signal_step": signal_step} if preempted else {}),
        )
        return {
            "step": self.step,
            "loss": last_loss,
            "run_dir": str(self.run_dir),
            "preempted": bool(preempted),
            "exit_code": EXIT_PREEMPTED if preempted else 0,
        }

    def log_startup(self, wait: float) -> None:
        """Once, after this process's first step: where its start-up went (benchmarks/startup.py reads it)."""
        took, self.setup_seconds = self.setup_seconds, {}
        log.info(
            "start-up: %.2f s from the trainer's start to the end of its first step (model %.2f s, data %.2f s, "
            "first batch wait %.2f s)",
            time.perf_counter() - self.started,
            took["model"],
            took["data"],
            wait,
        )

    def log_step(self, loss: float, stats: dict, window: Window) -> None:
        elapsed = time.perf_counter() - window.start
        self.metrics.log(
            self.step,
            {
                "epoch": self.epoch(),
                "loss": loss,
                "lr": self.engine.lr(),
                "logit_scale": self.engine.logit_scale(),
                "grad_norm": float(stats["grad_norm"]),
                "global_batch": self.global_batch,
                "samples_per_s": self.global_batch * window.steps / max(elapsed, 1e-9),
                "data_wait": window.wait / max(elapsed, 1e-9),
                "gather_frac": self.loss_fn.gather.timer.pop() / max(elapsed, 1e-9),
                "skipped_samples": sum(self.data.skipped().values()),
                "skipped_steps": self.progress.nonfinite_total,
                **self.data.source_metrics(),
            },
        )
        window.reset()


class Window:
    """Steps, data wait and wall time since the last logged step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def add(self, wait: float) -> None:
        self.steps += 1
        self.wait += wait


def train(cfg: Config) -> dict:
    env = init_distributed(cfg.train.device, cfg.engine.dist_timeout_s)
    setup_logging(env)
    trainer = None
    started = time.time()
    try:
        trainer = Trainer(cfg, env)
        return trainer.fit()
    except Exception as exn:
        if trainer is None:
            raise
        with trainer.watchdog.allow("failure"):  # a stuck file system here must not hang the job
            if hung_elsewhere(trainer.run_dir, started):
                # another rank's watchdog reported a hang and exited; this rank's collective failed with it
                log.error("%s: another rank was stopped as hung (status.json); exiting with code %d", exn, EXIT_HUNG)
                return {"step": trainer.step, "preempted": False, "exit_code": EXIT_HUNG}
            trainer.write_status("failed", error=f"{type(exn).__name__}: {exn}"[:500])
        raise
    except BaseException as exn:
        if trainer is not None:
            with trainer.watchdog.allow("failure"):
                trainer.write_status("failed", error=f"{type(exn).__name__}: {exn}"[:500])
        raise
    finally:
        if trainer is not None:
            with trainer.watchdog.allow("shutdown"):
                trainer.data.close()
                cleanup()
            trainer.close()
        else:
            cleanup()


def hung_elsewhere(run_dir: Path, since: float) -> bool:
    """Whether a watchdog of this run (another rank's) marked it hung since `since`."""
    from .run_status import read_status

    status = read_status(run_dir, since=since)
    return bool(status and status["state"] == "hung")


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m clipscale.train` / torchrun: the same as `clipscale train`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clipscale.train", description="Train a CLIP model.")
    add_config_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: train(load_config(args.config, args.overrides))["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
