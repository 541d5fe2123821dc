"""The training loop. Read top to bottom: set up, resume, loop (step, log, checkpoint), finish.

Run with `clipscale train --config X.yaml [key=value ...]` or
`torchrun --nproc_per_node=N -m clipscale.train --config X.yaml [key=value ...]`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .checkpoint import CheckpointManager, torch_save_synced
from .config import Config, add_config_arguments, load_config, save_config
from .data.loader import TrainData
from .distributed import DistEnv, all_gather_object, cleanup, init_distributed, world_size
from .engine import build_engine
from .errors import UserError, run_command
from .grad_cache import forward_backward
from .loss import build_loss
from .metrics import MetricsLogger
from .model import count_parameters, create_model
from .preempt import EXIT_PREEMPTED, PreemptionHandler
from .run_status import write_status
from .state import RNG, DataPosition, LRSchedule, Progress, RunMeta, TrainState, seed_everything

log = logging.getLogger("clipscale")


class TrainingDiverged(UserError):
    """The loss stayed non-finite for train.max_nonfinite_steps consecutive steps."""


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


class Trainer:
    """One run: set up, resume, the loop (step, log, maybe save, maybe evaluate), finish."""

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.preempt = PreemptionHandler(cfg.train.preempt_signals)  # before DataLoader workers fork

        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.bundle = create_model(cfg.model, cfg.loss.name, env.device)
        self.engine = build_engine(cfg, self.bundle.model, env)
        self.loss_fn = build_loss(cfg)
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint, env.is_main)
        draft = self.bundle.image_size if cfg.data.jpeg_draft else None
        self.data = TrainData(cfg, self.bundle.train_transform, self.bundle.tokenizer, env, draft_size=draft)
        self.progress = Progress()
        self.rng = RNG(env, cfg.seed, self.progress)
        self.state = TrainState(
            progress=self.progress,
            schedule=LRSchedule(self.engine),
            data=DataPosition(self.data, self.progress),
            rng=self.rng,
            meta=RunMeta(cfg, env),
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

        self.metrics = MetricsLogger(
            self.run_dir, env.is_main, env.rank, cfg.logging.tensorboard, cfg.logging.sample_keys, console=self._console
        )
        self.metrics.resume_at(self.step)
        self.global_batch = cfg.data.batch_size * env.world_size * cfg.optim.accum_steps
        self.nonfinite_run = 0  # consecutive skipped steps
        self.progress_bar = None
        self.evaluator = None
        if cfg.eval.zeroshot or cfg.eval.retrieval:  # read the evaluation sets now: errors at start-up
            from .evaluate import Evaluator

            self.evaluator = Evaluator(cfg.eval, self.bundle.val_transform, self.bundle.tokenizer, env.device)
        elif cfg.eval.every_n_steps:
            log.warning(
                "eval.every_n_steps=%d, but no evaluation set is given (eval.zeroshot, eval.retrieval): "
                "nothing will be evaluated",
                cfg.eval.every_n_steps,
            )

    @property
    def step(self) -> int:
        return self.progress.step

    # ------------------------------------------------------------------ helpers
    def _console(self, line: str) -> None:
        if self.progress_bar is not None:
            self.progress_bar.write(line)
        else:
            log.info(line)

    def write_status(self, state: str, **fields) -> None:
        """RUN_DIR/status.json: running | finished | preempted | failed (read by job scripts to decide on requeue)."""
        if self.env.is_main:
            write_status(
                self.run_dir,
                state,
                step=self.step,
                total_steps=self.cfg.train.steps,
                world_size=self.env.world_size,
                restart_count=self.env.restart_count,
                requeue_count=self.env.requeue_count,
                **fields,
            )

    def evaluate(self) -> dict:
        """Collective: zero-shot / retrieval numbers into metrics.jsonl (the model is left as it was)."""
        t0 = time.perf_counter()
        results = self.evaluator.run(self.engine.module, self.engine.autocast)
        results["eval/seconds"] = time.perf_counter() - t0
        self.metrics.log(self.step, results)
        return results

    def epoch(self) -> int:
        return (self.step * self.global_batch) // self.data.num_samples

    def save(self, background: bool = False) -> Path:
        """Collective: the engine's model and optimizer, and the train state. In the background
        (checkpoint.async, DDP engine) the main rank writes a CPU snapshot while training goes on."""
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
        for _ in range(self.cfg.optim.accum_steps):
            batch, w = self.data.next()
            micro.append(self.data.to_device(batch, self.engine.device))
            wait += w
        self.engine.module.train()
        loss = forward_backward(self.engine, self.loss_fn, micro)
        global_loss, stop = global_loss_and_stop(loss, self.preempt.requested)
        if math.isfinite(global_loss):
            stats = self.engine.optimizer_step()
        else:
            self.engine.skip_optimizer_step()
            stats = {"grad_norm": float("nan"), "skipped": True}
        self.progress.step += 1
        self._after_update(stats)
        return global_loss, stop, stats, wait, micro

    def preemption(self) -> tuple[str, int | None]:
        """Collective: (the signal, the step it arrived in), of the rank signalled first."""
        received = [r for r in all_gather_object((self.preempt.received, self.preempt.received_during)) if r[0]]
        return min(received, key=lambda r: r[1]) if received else ("unknown signal", None)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
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
        preempted = signal_step = None
        while self.step < total:
            self.preempt.step_in_progress = self.step + 1
            last_loss, stop, stats, wait, micro = self.train_step()
            window.add(wait)
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
            if self.ckpts.due(self.step, total):
                self.save(background=cfg.checkpoint.async_save)
                last_saved = self.step
            if self.evaluator and cfg.eval.every_n_steps and self.step % cfg.eval.every_n_steps == 0:
                window.start += self.evaluate()["eval/seconds"]  # not counted as training time
                last_eval = self.step

        if self.ckpts.due_at_end(self.step, last_saved, preempted=bool(preempted)):
            self.save()
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
    try:
        trainer = Trainer(cfg, env)
        return trainer.fit()
    except BaseException as exn:
        if trainer is not None:
            trainer.write_status("failed", error=f"{type(exn).__name__}: {exn}"[:500])
        raise
    finally:
        if trainer is not None:
            trainer.data.close()
            trainer.preempt.restore()
        cleanup()


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m clipscale.train` / torchrun: the same as `clipscale train`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clipscale.train", description="Train a CLIP model.")
    add_config_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: train(load_config(args.config, args.overrides))["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
