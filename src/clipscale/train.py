"""The training loop. Read top to bottom: set up, resume, loop (step, log, checkpoint), finish.

Run with `clipscale train --config X.yaml [key=value ...]` or
`torchrun --nproc_per_node=N -m clipscale.train --config X.yaml [key=value ...]`.
"""

from __future__ import annotations

import logging
import math
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import __version__
from .checkpoint import CheckpointManager, config_changes, rng_state, set_rng_state, torch_save_synced
from .config import Config, add_config_arguments, load_config, save_config, to_dict
from .data.loader import TrainData
from .distributed import DistEnv, all_gather_object, broadcast_object, cleanup, init_distributed, world_size
from .engine import build_engine
from .errors import UserError, run_command
from .grad_cache import forward_backward
from .loss import build_loss
from .metrics import MetricsLogger
from .model import count_parameters, create_model
from .preempt import EXIT_PREEMPTED, PreemptionHandler
from .run_status import write_status

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


def global_loss_and_stop(loss: torch.Tensor, stop_requested: bool) -> tuple[float, bool]:
    """One all-reduce per step: the global loss (mean over ranks) and whether any rank was signalled."""
    t = torch.stack([loss.detach().float().reshape(()), loss.new_tensor(1.0 if stop_requested else 0.0).float()])
    if world_size() > 1:
        dist.all_reduce(t)
    total, stops = t.tolist()
    return total / world_size(), stops > 0


class Trainer:
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
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, env.is_main)

        resume = self.ckpts.resolve(cfg.checkpoint.resume) if env.is_main else None
        resume = broadcast_object(str(resume) if resume else None)
        extra = self.engine.load(Path(resume)) if resume else {}
        self.step = int(extra.get("step", 0))
        self.preempt.step_in_progress = self.step + 1  # a signal during set-up stops after the first step
        if resume:
            self._log_resume(resume, extra)
        rngs = extra.get("rng")
        if rngs is not None and len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:
            seed_everything(cfg.seed + 1000 * env.rank + self.step)

        draft = self.bundle.image_size if cfg.data.jpeg_draft else None
        self.data = TrainData(
            cfg, self.bundle.train_transform, self.bundle.tokenizer, env, extra.get("data"), draft, step=self.step
        )
        self.metrics = MetricsLogger(
            self.run_dir, env.is_main, env.rank, cfg.logging.tensorboard, cfg.logging.sample_keys, console=self._console
        )
        self.metrics.resume_at(self.step)
        self.global_batch = cfg.data.batch_size * env.world_size * cfg.optim.accum_steps
        self.nonfinite_run = 0  # consecutive skipped steps
        self.nonfinite_total = int(extra.get("nonfinite_total", 0))
        self.progress = None
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

    # ------------------------------------------------------------------ helpers
    def _console(self, line: str) -> None:
        if self.progress is not None:
            self.progress.write(line)
        else:
            log.info(line)

    def _log_resume(self, path: str, extra: dict) -> None:
        log.info("resumed from %s at step %d", path, self.step)
        changes = [
            f"{k}: {a!r} -> {b!r}"
            for k, a, b in config_changes(extra.get("config", {}), to_dict(self.cfg))
            if k != "checkpoint.resume"
        ]
        if changes:
            log.info("settings changed since that checkpoint: %s", "; ".join(changes))
        if extra.get("world_size", self.env.world_size) != self.env.world_size:
            log.warning(
                "world size changed %s -> %d: RNG states are re-seeded and the data stream is "
                "re-dealt (see README, 'Resuming and preemption')",
                extra.get("world_size"),
                self.env.world_size,
            )

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

    def save(self, final: bool = False) -> Path:
        """Collective. With checkpoint.async, the main rank writes a CPU snapshot in the background."""
        extra = {
            "step": self.step,
            "epoch": self.epoch(),
            "data": self.data.state(),
            "rng": all_gather_object(rng_state()),
            "config": to_dict(self.cfg),
            "versions": software_versions(),
            "model_name": self.cfg.model.name,
            "world_size": self.env.world_size,
            "nonfinite_total": self.nonfinite_total,
        }
        suffix = self.engine.checkpoint_suffix
        if self.cfg.checkpoint.async_save and self.engine.supports_async_save and not final:
            snap = self.engine.snapshot(extra)
            path = self.ckpts.path_for(self.step, suffix)
            if self.env.is_main:
                path = self.ckpts.save_async(self.step, lambda tmp: torch_save_synced(snap, tmp), suffix)
            log.info("saving checkpoint %s in the background", path)
            return path
        path = self.ckpts.save(self.step, lambda tmp: self.engine.save(tmp, extra), suffix)
        log.info("saved checkpoint %s", path)
        return path

    def _after_update(self, stats: dict) -> None:
        if not stats["skipped"]:
            self.nonfinite_run = 0
            return
        self.nonfinite_run += 1
        self.nonfinite_total += 1
        log.warning(
            "step %d skipped: non-finite loss or gradients (%d in a row, %d in total)",
            self.step,
            self.nonfinite_run,
            self.nonfinite_total,
        )
        if self.nonfinite_run >= self.cfg.train.max_nonfinite_steps:
            raise TrainingDiverged(
                f"the loss or gradients were not finite for {self.nonfinite_run} consecutive "
                f"steps (up to step {self.step}); training stopped. Lower optim.lr, "
                f"check the data, or resume from an earlier checkpoint"
            )

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        total = cfg.train.steps
        log.info(
            "model %s (%.2fM params) | %d process(es) on %s | global batch %d (%d x %d ranks x %d accum) "
            "| %d samples per epoch | steps %d -> %d",
            cfg.model.name,
            count_parameters(self.engine.module) / 1e6,
            env.world_size,
            env.device,
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

            self.progress = tqdm(
                total=total, initial=self.step, desc="train", dynamic_ncols=True, mininterval=1.0, file=sys.stderr
            )
        last_loss = float("nan")
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        last_saved = self.step if self.step > 0 else -1
        last_eval = -1
        preempted = None
        while self.step < total:
            self.preempt.step_in_progress = self.step + 1
            micro, wait = [], 0.0
            for _ in range(cfg.optim.accum_steps):
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
            self.step += 1
            self._after_update(stats)
            window_steps += 1
            window_wait += wait
            last_loss = global_loss
            self.metrics.sample_keys(
                self.step, *([x for mb in micro for x in mb[f]] for f in ("keys", "passes", "sources"))
            )
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(loss=f"{global_loss:.4f}", refresh=False)

            if self.step % cfg.logging.every_n_steps == 0 or self.step == total or stop:
                elapsed = time.perf_counter() - window_start
                self.metrics.log(
                    self.step,
                    {
                        "epoch": self.epoch(),
                        "loss": global_loss,
                        "lr": self.engine.lr(),
                        "logit_scale": self.engine.module.logit_scale.detach().exp().item(),
                        "grad_norm": float(stats["grad_norm"]),
                        "global_batch": self.global_batch,
                        "samples_per_s": self.global_batch * window_steps / max(elapsed, 1e-9),
                        "data_wait": window_wait / max(elapsed, 1e-9),
                        "gather_frac": self.loss_fn.gather.timer.pop() / max(elapsed, 1e-9),
                        "skipped_samples": sum(self.data.skipped().values()),
                        "skipped_steps": self.nonfinite_total,
                        **self.data.source_metrics(),
                    },
                )
                window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0

            if stop:
                received = [r for r in all_gather_object((self.preempt.received, self.preempt.received_during)) if r[0]]
                preempted, signal_step = min(received, key=lambda r: r[1]) if received else ("unknown signal", None)
                log.warning(
                    "preemption requested (%s during step %s): saving at step %d and exiting with code %d",
                    preempted,
                    signal_step,
                    self.step,
                    EXIT_PREEMPTED,
                )
                break
            if self.step % cfg.checkpoint.every_n_steps == 0 and self.step < total:
                self.save()
                last_saved = self.step
            if self.evaluator and cfg.eval.every_n_steps and self.step % cfg.eval.every_n_steps == 0:
                window_start += self.evaluate()["eval/seconds"]  # not counted as training time
                last_eval = self.step

        if preempted or (cfg.checkpoint.save_final and last_saved != self.step):
            path = self.save(final=True)
        else:
            path = self.ckpts.path_for(last_saved, self.engine.checkpoint_suffix)
        self.ckpts.wait()
        if self.evaluator and cfg.eval.at_end and not preempted and last_eval != self.step:
            self.evaluate()
        if self.progress is not None:
            self.progress.close()
        skipped = self.data.skipped()
        if skipped:
            log.warning("skipped samples on rank %d: %s", env.rank, skipped)
        self.metrics.close()
        self.write_status(
            "preempted" if preempted else "finished",
            checkpoint=str(path),
            **({"signal": preempted, "signal_step": signal_step} if preempted else {}),
        )
        return {
            "step": self.step,
            "loss": last_loss,
            "run_dir": str(self.run_dir),
            "preempted": bool(preempted),
            "exit_code": EXIT_PREEMPTED if preempted else 0,
        }


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
