"""What a run reports as it goes: the metrics record every logging.every_n_steps (metrics.jsonl,
TensorBoard, W&B, the console line), the progress bar, the samples each step read
(sample_keys.jsonl), throughput and data wait over the steps since the last record, and where the
start-up went."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Callable

from ..metrics import MetricsLogger, WandbLogger

log = logging.getLogger("clipscale")
BATCH_FIELDS = ("keys", "passes", "sources")


class Window:
    """Steps, data wait and wall time since the last logged step."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.wait = time.perf_counter(), 0, 0.0

    def add(self, wait: float) -> None:
        self.steps += 1
        self.wait += wait

    def pause(self, seconds: float) -> None:
        """`seconds` spent on something else (an evaluation): not training time."""
        self.start += seconds

    def rates(self, global_batch: int) -> dict:
        """Seconds since the last record, samples per second, and the share of it spent waiting for data."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "seconds": elapsed,
            "samples_per_s": global_batch * self.steps / elapsed,
            "data_wait": self.wait / elapsed,
        }


def batch_fields(micro: list[dict]) -> tuple[list, list, list]:
    """(keys, data passes, sources) of every sample of a step's micro-batches, in order."""
    return tuple([x for mb in micro for x in mb[f]] for f in BATCH_FIELDS)


class StepTracker:
    """The run's reporting, on every rank (only rank 0 writes metrics and shows progress; every rank
    writes its own sample keys). `logging_cfg`: the logging section."""

    def __init__(self, run_dir: Path, logging_cfg, env, tracker: WandbLogger | None, global_batch: int):
        self.cfg, self.env, self.global_batch = logging_cfg, env, global_batch
        self.started = time.perf_counter()
        self.setup_seconds: dict[str, float] = {}  # model, data: logged with the first step ("start-up:")
        self.compiled = False  # the first step compiles the model (torch.compile): said with its time
        self.progress_bar = None
        self.window = Window()
        self.metrics = MetricsLogger(
            run_dir,
            env.is_main,
            env.rank,
            env.world_size,
            logging_cfg.tensorboard,
            logging_cfg.sample_keys,
            console=self.console,
            tracker=tracker,
        )

    def console(self, line: str) -> None:
        if self.progress_bar is not None:
            self.progress_bar.write(line)
        else:
            log.info(line)

    def start(self, step: int, total: int) -> None:
        """The loop starts at `step` of `total`: the progress bar (rank 0, logging.progress)."""
        if self.env.is_main and self.cfg.progress:
            from tqdm import tqdm

            self.progress_bar = tqdm(
                total=total, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0, file=sys.stderr
            )
        self.window.reset()
        self.loop_started = time.perf_counter()

    def resume_at(self, step: int, keep_events: bool = False) -> None:
        """Records after `step` are dropped: those steps will be trained again."""
        self.metrics.resume_at(step, keep_events)
        if self.progress_bar is not None:
            self.progress_bar.n = step
            self.progress_bar.refresh()
        self.window.reset()

    def stepped(self, step: int, wait: float) -> None:
        """An optimizer step finished (rolled back or not): its data wait counts."""
        if self.setup_seconds:
            self.log_startup(wait)
        self.window.add(wait)

    def step(
        self, step: int, loss: float, micro: list[dict], force_record: bool, record: Callable[[dict], dict]
    ) -> None:
        """A step that stands: its samples, the progress bar, and every logging.every_n_steps (or when
        `force_record`) the metrics record `record(rates)` makes of the window's rates."""
        self.metrics.sample_keys(step, *batch_fields(micro))
        if self.progress_bar is not None:
            self.progress_bar.update(1)
            self.progress_bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if force_record or step % self.cfg.every_n_steps == 0:
            self.metrics.log(step, record(self.window.rates(self.global_batch)))
            self.window.reset()

    def skipped(self, step: int, index: int, micro: list[dict]) -> None:
        """A global batch consumed without training (after a rollback), before the step `step`."""
        self.metrics.sample_keys(step, *batch_fields(micro), skipped=index)

    def log(self, step: int, record: dict) -> None:
        self.metrics.log(step, record)

    def log_startup(self, wait: float) -> None:
        """Once, after this process's first step: where its start-up went (benchmarks/startup.py reads it)."""
        took, self.setup_seconds = self.setup_seconds, {}
        now = time.perf_counter()
        log.info(
            "start-up: %.2f s from the trainer's start to the end of its first step (model %.2f s, data %.2f s, "
            "first batch wait %.2f s, first step %.2f s%s)",
            now - self.started,
            took.get("model", 0.0),
            took.get("data", 0.0),
            wait,
            now - getattr(self, "loop_started", now),
            " including torch.compile" if self.compiled else "",
        )

    def close(self) -> None:
        if self.progress_bar is not None:
            self.progress_bar.close()
            self.progress_bar = None
        self.metrics.close()
