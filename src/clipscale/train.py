"""The training loop. Read top to bottom: set up, resume, loop (step, log, checkpoint), finish.

Run with `clipscale train --config X.yaml [key=value ...]` or
`torchrun --nproc_per_node=N -m clipscale.train --config X.yaml [key=value ...]`.
"""

from __future__ import annotations

import logging
import platform
import random
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import __version__
from .checkpoint import CheckpointManager, rng_state, set_rng_state
from .config import Config, save_config, to_dict
from .data import TrainData
from .distributed import DistEnv, all_gather_object, all_reduce_mean, broadcast_object, cleanup, init_distributed
from .engine import build_engine
from .errors import UserError
from .loss import build_loss
from .metrics import MetricsLogger
from .model import create_model, count_parameters
from .step import forward_backward

log = logging.getLogger("clipscale")


def setup_logging(env: DistEnv) -> None:
    """clipscale's messages at INFO on rank 0 (WARNING elsewhere); other libraries at WARNING."""
    prefix = f"[rank{env.rank}" + (f" restart{env.restart_count}" if env.restart_count else "") + "]"
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


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = Path(cfg.run.dir)
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        seed_everything(cfg.seed)  # identical initial weights on every rank
        self.bundle = create_model(cfg.model, cfg.loss.name, env.device)
        self.engine = build_engine(cfg, self.bundle.model, env)
        self.loss_fn = build_loss(cfg)
        self.ckpts = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, env.is_main)

        resume = self.ckpts.resolve(cfg.checkpoint.resume) if env.is_main else None
        resume = broadcast_object(str(resume) if resume else None)
        extra = self.engine.load(Path(resume)) if resume else {}
        self.step = int(extra.get("step", 0))
        if resume:
            log.info("resumed from %s at step %d", resume, self.step)
        rngs = extra.get("rng")
        if rngs is not None and len(rngs) == env.world_size:
            set_rng_state(rngs[env.rank])
        else:
            seed_everything(cfg.seed + 1000 * env.rank + self.step)

        self.data = TrainData(cfg, self.bundle.train_transform, self.bundle.tokenizer, env, extra.get("data"))
        self.metrics = MetricsLogger(self.run_dir, env.is_main, env.rank, cfg.logging.tensorboard,
                                     cfg.logging.sample_keys, console=self._console)
        self.metrics.resume_at(self.step)
        self.global_batch = cfg.data.batch_size * env.world_size * cfg.optim.accum_steps
        self.progress = None

    # ------------------------------------------------------------------ helpers
    def _console(self, line: str) -> None:
        if self.progress is not None:
            self.progress.write(line)
        else:
            log.info(line)

    def epoch(self, step: Optional[int] = None) -> int:
        return ((self.step if step is None else step) * self.global_batch) // self.data.num_samples

    def save(self) -> Path:
        extra = {
            "step": self.step,
            "epoch": self.epoch(),
            "data": self.data.state(),
            "rng": all_gather_object(rng_state()),
            "config": to_dict(self.cfg),
            "versions": software_versions(),
            "model_name": self.cfg.model.name,
            "world_size": self.env.world_size,
        }
        path = self.ckpts.save(self.step, lambda tmp: self.engine.save(tmp, extra))
        log.info("saved checkpoint %s", path)
        return path

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        cfg, env = self.cfg, self.env
        total = cfg.train.steps
        log.info("model %s (%.2fM params) | %d process(es) on %s | global batch %d (%d x %d ranks x %d accum) "
                 "| %d samples per epoch | steps %d -> %d",
                 cfg.model.name, count_parameters(self.engine.module) / 1e6, env.world_size, env.device,
                 self.global_batch, cfg.data.batch_size, env.world_size, cfg.optim.accum_steps,
                 self.data.num_samples, self.step, total)
        if env.is_main and cfg.logging.progress:
            from tqdm import tqdm

            self.progress = tqdm(total=total, initial=self.step, desc="train", dynamic_ncols=True,
                                 mininterval=1.0, file=sys.stderr)
        last_loss = float("nan")
        window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0
        last_saved = self.step if self.step > 0 else -1
        while self.step < total:
            micro, wait = [], 0.0
            for _ in range(cfg.optim.accum_steps):
                batch, w = self.data.next()
                micro.append(batch)
                wait += w
            self.engine.module.train()
            out = forward_backward(self.engine, self.loss_fn, micro)
            global_loss = all_reduce_mean(out.loss).item()
            stats = self.engine.step()
            self.step += 1
            window_steps += 1
            window_wait += wait
            last_loss = global_loss
            self.metrics.sample_keys(self.step, [k for mb in micro for k in mb["keys"]],
                                     [p for mb in micro for p in mb["passes"]])
            if self.progress is not None:
                self.progress.update(1)
                self.progress.set_postfix(loss=f"{global_loss:.4f}", refresh=False)

            if self.step % cfg.logging.every_n_steps == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                scale = self.engine.module.logit_scale.detach().exp().item()
                self.metrics.log(self.step, {
                    "epoch": self.epoch(),
                    "loss": global_loss,
                    "lr": self.engine.lr(),
                    "logit_scale": scale,
                    "grad_norm": float(stats["grad_norm"]),
                    "global_batch": self.global_batch,
                    "samples_per_s": self.global_batch * window_steps / max(elapsed, 1e-9),
                    "data_wait": window_wait / max(elapsed, 1e-9),
                    "gather_frac": self.loss_fn.gather.timer.pop() / max(elapsed, 1e-9),
                    "skipped": sum(self.data.skipped().values()),
                })
                window_start, window_steps, window_wait = time.perf_counter(), 0, 0.0

            if self.step % cfg.checkpoint.every_n_steps == 0:
                self.save()
                last_saved = self.step

        if cfg.checkpoint.save_final and last_saved != self.step:
            self.save()
        if self.progress is not None:
            self.progress.close()
        skipped = self.data.skipped()
        if skipped:
            log.warning("skipped samples on rank %d: %s", env.rank, skipped)
        self.metrics.close()
        return {"step": self.step, "loss": last_loss, "run_dir": str(self.run_dir)}


def train(cfg: Config) -> dict:
    env = init_distributed(cfg.train.device, cfg.engine.dist_timeout_s)
    setup_logging(env)
    try:
        return Trainer(cfg, env).fit()
    finally:
        cleanup()


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point for `python -m clipscale.train` / torchrun."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
