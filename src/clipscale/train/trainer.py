"""One training run, read top to bottom: build the components, resume, the loop, finish.

The loop only orders its components:
    data       TrainData: this rank's micro-batches and their exact position (data/loader.py)
    engine     DDP, FSDP2 or DeepSpeed: forward, backward, optimizer step, its checkpoint (engine/)
    ckpts      CheckpointManager: when to save, what to keep, what to resume from (checkpoint/)
    guard      SpikeGuard: notices a loss spike and plans the rollback (job/guard.py)
    evaluator  Evaluator: zero-shot and retrieval, when due (evaluate/)
    tracker    StepTracker: metrics, progress, the samples of every step (train/tracker.py)
and beside it the job's life: preemption signals and the hang watchdog (job/). Everything a
component takes from the config is its own section and the batch layout, computed once here.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

from ..checkpoint import CheckpointManager
from ..checkpoint.state import RNG, DataPosition, LRSchedule, Progress, RunMeta, TrainState, seed_everything
from ..config import BatchLayout, Config, save_config, to_dict
from ..config.layout import Stage, stage_at
from ..data.loader import TrainData
from ..engine import build_engine
from ..engine.base import training_stages
from ..engine.ema import ModelEMA
from ..errors import TrainingDiverged
from ..job.distributed import DistEnv, all_gather_object, barrier, broadcast_object, sum_over_ranks
from ..job.guard import SpikeGuard
from ..job.lease import RunFolderInUse, RunLease
from ..job.preempt import EXIT_PREEMPTED, PreemptionHandler
from ..job.status import write_status
from ..job.watchdog import HangWatchdog, report_and_exit
from ..loss import build_loss
from ..model import count_parameters, create_model, input_size, set_patch_dropout
from ..optim import describe_groups, param_groups
from ..wds.census import CACHE_NAME
from .flops import Utilisation
from .grad_cache import forward_backward, global_loss_and_stop
from .stages import StagePlan
from .tracker import StepTracker

log = logging.getLogger("clipscale")


@dataclass
class StepResult:
    loss: float  # the global loss (mean over ranks)
    stop: bool  # a rank was signalled: checkpoint and stop
    stats: dict  # the engine's: grad_norm, skipped
    wait: float  # seconds waiting for data
    micro: list  # the micro-batches (their keys, sources, passes)


class Trainer:
    """One run on this rank. A context manager: `close()` stops what runs beside the loop."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.started = time.perf_counter()
        self.cfg, self.env = cfg, env
        self.layout = BatchLayout.of(cfg.data, cfg.optim, env.world_size)
        self.run_dir = Path(cfg.run.dir)
        self.lease = take_run_folder(self.run_dir, env)  # before the run's first write
        try:
            if env.is_main:
                save_config(cfg, self.run_dir / "config.yaml")
        except BaseException:
            if self.lease is not None:
                self.lease.release()
            raise
        # before DataLoader workers fork
        self.preempt = PreemptionHandler(
            cfg.train.preempt_signals, cfg.train.preempt_grace_s, self._stuck_at_preemption
        )
        self.progress = Progress()
        self.nonfinite_run = 0  # consecutive skipped steps
        self.last_loss = float("nan")
        # set-up, resume and the first step run under the watchdog's grace period (job/watchdog.py)
        self.watchdog = HangWatchdog(
            self.run_dir, env.rank, cfg.train.hang_timeout_s, cfg.train.hang_grace_s, self._status_fields
        )
        self.data = None
        try:
            self._build()
            self._resume()
        except BaseException:
            self.close()
            raise
        self.watchdog.idle()  # until fit(): a built Trainer nobody runs must not stop the process later

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def total(self) -> int:
        """train.steps: the run ends after this optimizer step."""
        return self.cfg.train.steps

    # ------------------------------------------------------------------ set up
    def _build(self) -> None:
        """The components, in the order they depend on each other (the model before its engine, the
        engine before the EMA and the teacher, the data after the model's transforms)."""
        cfg, env = self.cfg, self.env
        if env.is_main:
            warn_about_timeouts(cfg)
        seed_everything(cfg.seed)  # identical initial weights on every rank
        t0 = time.perf_counter()
        self.stages, self.stage = training_stages(cfg, self.layout), None
        most = max([cfg.model.patch_dropout, *(st.patch_dropout for st in self.stages)])  # built with it; set per stage
        mcfg = replace(cfg.model, patch_dropout=most)
        self.bundle = create_model(mcfg, cfg.loss.name, env.device, augment=cfg.data.augment)
        self.plan = StagePlan(cfg, self.stages, self.bundle, self.layout)
        first = self.plan.first()
        log.info("parameter groups:\n%s", describe_groups(param_groups(self.bundle.model, cfg.optim)))
        self.engine = build_engine(cfg, self.bundle.model, env, self.layout, self.stages)
        self.setup_seconds = {"model": time.perf_counter() - t0}
        self.ema = self._ema()
        self.flops = Utilisation.of(cfg, env) if env.is_main else None
        self.loss_fn, self.teacher = self._objective()
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint, env.is_main, local_main=env.local_rank == 0)
        t0 = time.perf_counter()
        layout, transform, tokenizer, draft = self.plan.data_settings(first)
        self.data = TrainData(
            cfg.data, layout, env, cfg.seed, transform, tokenizer, draft,
            signals=tuple(cfg.train.preempt_signals), count_cache=self.run_dir / CACHE_NAME,
            beat=lambda: self.watchdog.watch("counting shards"), stored_teacher=cfg.distill.source == "shards",
        )  # fmt: skip
        self.data_key = self.plan.data_key_of(first)
        self.setup_seconds["data"] = time.perf_counter() - t0
        self.guard = SpikeGuard(cfg.train.spike_guard)
        self.rng = RNG(env, cfg.seed, self.progress)
        self.state = TrainState(
            progress=self.progress,
            schedule=LRSchedule(self.engine),
            meta=RunMeta(cfg, env, self.stages),  # before the data: settle_data reads its stages
            data=DataPosition(self.data, self.progress, settle=self.settle_data),
            rng=self.rng,
            **({"guard": self.guard} if self.guard.enabled else {}),
        )

    def settle_data(self, step: int) -> None:
        """Collective (a resume or a rollback to `step`): the data at the settings of the stage that step trained
        in, which its saved position belongs to."""
        self._keep_trained_stages(step)
        self._data_at(self.plan.at_step(step))

    def _keep_trained_stages(self, step: int) -> None:
        """The boundaries of the steps the checkpoint trained, as it trained them (its job's global batch may
        differ from this one's: a boundary in samples would move); the rest from the samples trained so far."""
        saved = self.state.parts["meta"].saved
        same = (saved.get("config") or {}).get("schedule", {}).get("stages") == to_dict(self.cfg.schedule)["stages"]
        trained = [Stage(**s) for s in saved.get("stages") or []] if same else []
        if self.stages and trained and self.plan.keep_trained(trained, step):
            self.engine.restart_schedule(self.engine.schedule_step())  # its next lr was set from the old list

    def _data_at(self, stage) -> None:
        """The data at a stage's batch, crops and text length (nothing to do when they are the same)."""
        key = self.plan.data_key_of(stage)
        if key != self.data_key:
            self.data.reconfigure(*self.plan.data_settings(stage))
            self.data_key = key

    def _ema(self) -> ModelEMA | None:
        """The EMA of the weights (ema.decay), attached before resuming: the checkpoint restores it."""
        e = self.cfg.ema
        if e.decay is None:
            return None
        self.engine.ema = ModelEMA(self.engine.module, e.decay, e.every_n_steps, e.warmup)
        return self.engine.ema

    def _objective(self):
        """(the loss, the distillation teacher or None)."""
        loss_fn, spec = build_loss(self.cfg.loss), self.cfg.distill
        if not spec.model and spec.source != "shards":
            return loss_fn, None
        from ..loss.distill import DistillLoss, StoredTeacher, Teacher

        if spec.source == "shards":
            teacher = StoredTeacher()
        else:
            teacher = Teacher(spec, self.cfg.model, self.bundle, self.env.device, self.engine.autocast)
        return DistillLoss(loss_fn, spec.weight), teacher

    def _resume(self) -> None:
        """Collective: the checkpoint checkpoint.resume names (if any), then what reports from this step."""
        loaded = self.ckpts.load(self.engine, self.cfg.checkpoint.resume)
        if loaded is not None:
            path, saved = loaded
            self.state.load_state_dict(saved)
            self.ckpts.holds(path, self.step)
            log.info("resumed from %s at step %d", path, self.step)
        else:
            self.rng.reseed()
        self.preempt.step_in_progress = self.step + 1  # a signal during set-up stops after the first step
        self.watchdog.resumed_at(self.step)
        self.tracker = StepTracker(self.run_dir, self.cfg.logging, self.env, self._wandb(), self.layout.global_batch)
        self.tracker.started, self.tracker.setup_seconds = self.started, self.setup_seconds
        self.tracker.compiled = self.engine.compiled
        self.tracker.resume_at(self.step)
        self.evaluator = self._evaluator()
        self._eval_inputs(self.plan.at_step(self.step))  # a job requeued at its last step evaluates at once

    def _eval_inputs(self, stage) -> None:
        """The evaluation at a stage's image side and text length (the model's as it is then)."""
        if self.evaluator is not None and stage is not None:
            self.evaluator.transform, self.evaluator.tokenizer = self.plan.eval_transform(stage), self.data.tokenizer

    def _wandb(self):
        """The W&B run of logging.wandb (rank 0), continuing the checkpoint's run id after a resume."""
        spec, meta = self.cfg.logging.wandb, self.state.parts["meta"]
        if spec is None:
            return None
        from ..metrics import WandbLogger, new_run_id

        meta.wandb_run_id = broadcast_object(meta.wandb_run_id or new_run_id() if self.env.is_main else None)
        if not self.env.is_main:
            return None
        return WandbLogger(spec, self.run_dir, meta.wandb_run_id, to_dict(self.cfg))

    def _evaluator(self):
        """Collective: the evaluation sets, read now (their errors show at start-up, not hours later)."""
        spec = self.cfg.eval
        if not (spec.zeroshot or spec.retrieval):
            if spec.every_n_steps:
                log.warning(
                    "eval.every_n_steps=%d, but no evaluation set is given (eval.zeroshot, eval.retrieval): "
                    "nothing will be evaluated",
                    spec.every_n_steps,
                )
            return None
        from ..evaluate import Evaluator

        b = self.bundle
        return Evaluator(spec, b.val_transform, b.tokenizer, self.env.device, self.cfg.train.preempt_signals)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        self.watchdog.watch("first step")
        try:
            return self._fit()
        finally:
            self.watchdog.idle()  # the loop is over: nothing to watch once fit() has returned

    def _fit(self) -> dict:
        """The loop: a step; then a rollback if the loss spiked, else its record, and a stop, a
        checkpoint or an evaluation when one is due; then the end of the run."""
        log.info(self.describe())
        self.write_status("running")
        self.tracker.start(self.step, self.total)
        if self.guard.due():  # saved (preempted) at the step that decided it: roll back first
            self.roll_back(self.guard.last_loss)
        stop = None
        while self.step < self.total and stop is None:
            self.enter_stage()
            self.skip_spiking_data()
            self.preempt.step_in_progress = self.step + 1
            result = self.train_step()
            self.last_loss = result.loss
            self.watchdog.beat(self.step)
            if self.lease is not None:
                self.lease.check()  # another job took the run folder while this one was stuck: write nothing more
            self.tracker.stepped(self.step, result.wait)
            if self.guard.spiked(result.loss) and not result.stop:  # when stopping, the checkpoint keeps the verdict
                self.roll_back(result.loss)
                continue
            last = result.stop or self.step == self.total
            self.tracker.step(self.step, result.loss, result.micro, last, functools.partial(self.record, result))
            if result.stop:
                stop = self.preemption()
                break
            if self.ckpts.due(self.step, self.total, spiking=self.guard.spiking):
                self.save(background=self.cfg.checkpoint.async_save)
            if self.evaluator is not None and self.evaluator.due(self.step):
                self.tracker.window.pause(self.evaluate()["eval/seconds"])  # not training time
        return self.finish(stop)

    def enter_stage(self) -> None:
        """Collective: the stage of the coming step (schedule.stages; from the step alone, so a resume at any
        step, or a rollback, is in the right one): its input size on the model (position embeddings
        interpolated, with their optimizer state and EMA), its batch, crops and text length on the data (the
        streams continue where training stopped), its patch dropout (its lr scale is in the schedule)."""
        stage = stage_at(self.stages, self.step + 1)
        if stage is None or stage == self.stage:
            return
        image, context = self.plan.inputs_of(stage)
        module = self.engine.module
        if (input_size.image_size(module), input_size.context_length(module)) != (image, context):
            changed = self.engine.resize_inputs(image, context, seed=self.cfg.seed + stage.index)
            log.info("input size from step %d: %s px, %s tokens (%s resized)", self.step + 1, image, context,
                     ", ".join(changed))  # fmt: skip
        self._data_at(stage)
        self._eval_inputs(stage)
        if self.step > 0 and self.plan.at_step(self.step).index != stage.index:
            self.guard.new_baseline()  # crossing a boundary (a resume inside a stage has its saved baseline)
        set_patch_dropout(module, stage.patch_dropout)
        self.layout = self.plan.layout_of(stage)
        self.tracker.global_batch = self.layout.global_batch
        if self.flops is not None:
            self.flops.at_stage(stage.patch_dropout, image, context)
        log.info("stage %d of %d from step %d to %d: patch_dropout %g, lr_scale %g, global batch %d, %s px, %s "
                 "tokens", stage.index + 1, self.plan.count, self.step + 1, stage.ends_after, stage.patch_dropout,
                 stage.lr_scale, stage.global_batch, image, context)  # fmt: skip
        self.stage = stage
        self.tracker.window.reset()  # per-stage throughput: no record mixes two stages' steps
        if self.env.is_main and self.step > 0:
            self.write_status("running")

    def train_step(self) -> StepResult:
        """One optimizer step over this rank's accum_steps micro-batches."""
        doing = self.watchdog.doing
        doing("waiting for data")
        micro, wait = [], 0.0
        for _ in range(self.layout.accum_steps):
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
        self.count_nonfinite(stats)
        return StepResult(global_loss, stop, stats, wait, micro)

    def count_nonfinite(self, stats: dict) -> None:
        """A skipped step (non-finite loss or gradients) is counted; too many in a row stop the run."""
        if not stats["skipped"]:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.progress.nonfinite_total += 1
        run, total = self.nonfinite_run, self.progress.nonfinite_total
        log.warning("step %d skipped: non-finite loss or gradients (%d in a row, %d in total)", self.step, run, total)
        if run >= self.cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"the loss or gradients were not finite for {run} consecutive steps (up to step {self.step}); "
                f"training stopped. Lower optim.lr, check the data, or resume from an earlier checkpoint"
            )

    def roll_back(self, loss: float) -> None:
        """Collective: the loss spiked (every rank sees the same global loss, so every rank is here at
        the same step): restore the checkpoint the guard picks and go on; the data that caused the spike
        is consumed without training when the replay reaches it (skip_spiking_data)."""
        with self.watchdog.allow("rollback"):  # a background save to wait for, checksums to verify: may take long
            self.ckpts.wait()
            plan = self.guard.plan(self.step, loss, self.ckpts, self.ckpts.current, self.env.is_main)
            log.warning(
                "loss spike: %.4g > %.3g x the median %.4g for %d steps (to step %d): rolling back to %s; the %d "
                "global batches of steps %s will be skipped",
                loss, self.guard.cfg.factor, plan.record["median"], self.guard.above, self.step, plan.target.name,
                plan.skip, "-".join(map(str, plan.record["skipped_steps"])) or "(none)",
            )  # fmt: skip
            self.data.close()
            self.state.load_state_dict(self.ckpts.restore(self.engine, plan.target))
            self.stage = None  # the checkpoint may be of another stage's input size: enter_stage sets it again
            self.ckpts.holds(plan.target, self.step)
            self.guard.rolled_back(plan)
            if self.evaluator is not None:
                self.evaluator.last_step = self.step
            self.tracker.resume_at(self.step, keep_events=True)
            barrier()  # the main rank has cut the logs back before any rank appends to them
            self.tracker.log(self.step + 1, plan.event(self.step, len(self.guard.rollbacks)))
            self.write_status("running", checkpoint=str(plan.target))

    def skip_spiking_data(self) -> None:
        """After a rollback, once the replay reaches them: the batches that led into the spike are
        consumed without training (recorded in the sample-key log before the step that follows)."""
        batches = self.guard.skip_due(self.step)
        for i in range(batches):
            self._data_at(self.plan.at_step(self.step + 1 + i))  # each at the batch and inputs it had
            self.tracker.skipped(self.step + 1, i, self.data.skip(1))
        if batches:
            self._data_at(self.stage)
            log.warning("skipped the %d global batches that led into the spike (after step %d)", batches, self.step)
            self.tracker.window.reset()  # (reading the skipped data is not training time)

    def save(self, background: bool = False) -> Path:
        """Collective: the engine's model and optimizer, and the train state."""
        with self.watchdog.allow("checkpoint"):
            train_state = self.state.state_dict()
            spike_start = self.guard.spike_start(self.step)
            return self.ckpts.save_engine(self.step, self.engine, train_state, background, spike_start)

    def evaluate(self) -> dict:
        """Collective: zero-shot / retrieval numbers into metrics.jsonl (the model is left as it was)."""
        t0 = time.perf_counter()
        with self.watchdog.allow("evaluation"), self.ema.swapped_in() if self.cfg.eval.use_ema else nullcontext():
            results = self.evaluator.run(self.engine.module, self.engine.autocast)
        results["eval/seconds"] = time.perf_counter() - t0
        self.tracker.log(self.step, results)
        self.evaluator.last_step = self.step
        return results

    def preemption(self) -> tuple[str, int | None]:
        """Collective: (the signal, the step it arrived in), of the rank signalled first."""
        received = [r for r in all_gather_object((self.preempt.received, self.preempt.received_during)) if r[0]]
        signal, during = min(received, key=lambda r: r[1]) if received else ("unknown signal", None)
        log.warning(
            "preemption requested (%s during step %s): saving at step %d and exiting with code %d",
            signal, during, self.step, EXIT_PREEMPTED,
        )  # fmt: skip
        return signal, during

    def finish(self, stop: tuple[str, int | None] | None) -> dict:
        """The last checkpoint and evaluation, the final status; the run's result."""
        preempted, signal_step = stop or (None, None)
        if self.ckpts.due_at_end(self.step, preempted=bool(preempted)):
            self.save()
        with self.watchdog.allow("checkpoint"):
            self.ckpts.wait()
        if self.evaluator is not None and self.evaluator.due_at_end(self.step, preempted=bool(preempted)):
            self.evaluate()
        self.tracker.close()
        skipped = self.data.skipped()
        if skipped:
            log.warning("skipped samples on rank %d: %s", self.env.rank, skipped)
        self.write_status(
            "preempted" if preempted else "finished",
            checkpoint=str(self.ckpts.current) if self.ckpts.current else None,
            skipped_samples=self.skipped_samples(),
            **({"signal": preempted, "signal_step": signal_step} if preempted else {}),
        )
        return {
            "step": self.step,
            "loss": self.last_loss,
            "run_dir": str(self.run_dir),
            "preempted": bool(preempted),
            "exit_code": EXIT_PREEMPTED if preempted else 0,
        }

    # ------------------------------------------------------------------ reporting
    def record(self, result: StepResult, rates: dict) -> dict:
        """The metrics record of a logged step."""
        return {
            "epoch": self.samples_trained() // self.data.num_samples,
            "loss": result.loss,
            "lr": self.engine.lr(),
            "logit_scale": self.engine.logit_scale(),
            "grad_norm": float(result.stats["grad_norm"]),
            "global_batch": self.layout.global_batch,
            "samples_per_s": rates["samples_per_s"],
            "data_wait": rates["data_wait"],
            "gather_frac": self.loss_fn.gather.timer.pop() / rates["seconds"],
            **(self.flops.record(rates["samples_per_s"]) if self.flops is not None else {}),
            "skipped_samples": self.skipped_samples(),
            "skipped_steps": self.progress.nonfinite_total,
            **self.data.source_metrics(),
            **self.stage_fields(),
        }

    def samples_trained(self) -> int:
        """Samples trained on from the start of the run to this step (global batches of every stage)."""
        return self.plan.samples_through(self.step, self.layout.global_batch)

    def stage_fields(self) -> dict:
        """The stage in a metrics record (schedule.stages)."""
        return self.plan.fields(self.stage)

    def skipped_samples(self) -> int:
        """Collective: the samples skipped so far on every rank (each rank counts its own streams)."""
        return sum_over_ranks(sum(self.data.skipped().values()), self.env.device)

    def describe(self) -> str:
        cfg, env = self.cfg, self.env
        return (
            f"model {cfg.model.name} ({count_parameters(self.engine.module) / 1e6:.2f}M params) | {env.world_size} "
            f"process(es) on {env.device} | engine {cfg.engine.name} | {self.layout.describe()} | "
            f"{self.data.num_samples} samples per epoch | steps {self.step} -> {self.total}"
            + (f" | {self.flops.describe()}" if self.flops is not None else "")
        )

    def _status_fields(self) -> dict:
        fields = {
            "total_steps": self.total,
            "world_size": self.env.world_size,
            "restart_count": self.env.restart_count,
            "requeue_count": self.env.requeue_count,
        }
        missing = {s.name: s.missing for s in (self.data.sources if self.data is not None else []) if s.missing}
        if missing:
            fields["missing_shards"] = missing  # skipped (missing_shards: skip): a download with gaps
        plan = getattr(self, "plan", None)
        if plan is not None:
            fields.update(plan.status(getattr(self, "stage", None)))
        guard = getattr(self, "guard", None)
        if guard is not None and guard.rollbacks:
            fields["rollbacks"] = guard.rollbacks[-20:]
        return fields

    def _stuck_at_preemption(self, signal_name: str, waited_s: float) -> bool:
        """The preemption watcher's thread: the main thread, in C, has not taken the signal for
        `waited_s`. During a step (train.preempt_grace_s) that means stuck (a hung read or collective):
        leave the stacks, say preempted (no checkpoint: the requeued job resumes from the last one)
        and exit. A checkpoint, an evaluation or the set-up may keep it in C for long for good reason
        (the others wait in a barrier while rank 0 writes): those get 4 x the grace period."""
        phase, grace = self.watchdog.watching, self.cfg.train.preempt_grace_s
        if phase is None or waited_s < (grace if phase == "step" else 4 * grace):
            return False
        rank, step, activity = self.env.rank, self.step, self.watchdog.activity
        headline = (
            f"rank {rank} (pid {os.getpid()}): {signal_name} not taken within {waited_s:.0f} s: the main thread is "
            f"stuck in C after step {step} ({phase})\nin: {activity}\n"
        )

        def status(folder: Path) -> dict:
            return dict(step=step, signal=signal_name, stuck_in=activity, checkpointed=False, hang_reports=str(folder),
                        **self._status_fields())  # fmt: skip

        ending = f"rank {rank} was stuck when {signal_name} came (after step {step}): no checkpoint"
        report_and_exit(self.run_dir, f"preempted-rank{rank}", headline, "preempted", status, ending, EXIT_PREEMPTED)
        return True

    def write_status(self, state: str, **fields) -> None:
        """RUN_DIR/status.json: running | finished | preempted | failed | hung (read by job scripts to
        decide on requeue)."""
        if self.env.is_main:
            write_status(self.run_dir, state, step=self.step, **self._status_fields(), **fields)

    def close(self) -> None:
        """Stop what runs beside the loop: DataLoader workers, signal handlers, the watchdog; give the
        run folder back."""
        if self.data is not None:
            self.data.close()
        self.preempt.restore()
        self.watchdog.stop()
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def take_run_folder(run_dir: Path, env: DistEnv) -> RunLease | None:
    """Collective: the main rank takes the run folder's lease (job/lease.py); every rank stops with
    the same one line when another live job owns it."""
    lease, error = None, None
    if env.is_main:
        lease = RunLease(run_dir)
        try:
            took_over = lease.acquire()
            if took_over:
                log.warning("%s", took_over)
        except RunFolderInUse as exn:
            lease, error = None, str(exn)
        except OSError as exn:  # every rank must hear of it, not wait in the broadcast
            lease, error = None, f"cannot take the run folder {run_dir}: {type(exn).__name__}: {exn}"
    error = broadcast_object(error)
    if error:
        raise RunFolderInUse(error)
    return lease


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
