"""The training data of one rank: plan + DataLoader + the consumed position of every stream."""

from __future__ import annotations

import atexit
import functools
import logging
import signal
import threading
import time
from typing import Callable

from torch.utils.data import DataLoader

from ..config import Config
from ..distributed import DistEnv, all_gather_object
from ..preempt import ignore_signals
from ..wds.shardlist import resolve_shards
from .plan import StreamPlan, StreamPosition
from .relayout import relayout, remaining_samples
from .samples import SampleDecoder
from .stream import StreamDataset

log = logging.getLogger(__name__)


_WORKERS: list = []  # every DataLoader worker process our loaders started


def _stop_workers(iterator=None) -> None:
    """Shut a loader's workers down, then kill any worker still alive. Workers ignore SIGTERM (see
    preempt.ignore_signals), so multiprocessing's own exit hook, which terminates and then joins
    them, would wait forever on one that missed the loader's shutdown."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    elif threading.current_thread() is threading.main_thread():
        # at exit, with a loader still open: torch's SIGCHLD handler would raise at the first kill
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for worker in list(_WORKERS):
        if worker.is_alive() and (iterator is None or worker in getattr(iterator, "_workers", ())):
            worker.kill()
            worker.join(timeout=5)
        if not worker.is_alive():
            _WORKERS.remove(worker)


atexit.register(_stop_workers)  # runs before multiprocessing's hook (registered earlier, run later)


def build_plan(cfg: Config, world_size: int) -> StreamPlan:
    shards = resolve_shards(cfg.data.train_shards, cfg.data.manifest)
    return StreamPlan(
        shards,
        seed=cfg.seed,
        num_streams=world_size * max(1, cfg.data.workers),
        shuffle=cfg.data.shuffle,
        block_shards=cfg.data.shuffle_block_shards,
        shuffle_buffer=cfg.data.shuffle_buffer,
    )


def _sum_skipped(positions) -> dict[str, int]:
    total: dict[str, int] = {}
    for pos in positions:
        for reason, n in pos.skipped.items():
            total[reason] = total.get(reason, 0) + n
    return total


class TrainData:
    """Yields this rank's micro-batches; `state()` is what a checkpoint needs to resume exactly."""

    def __init__(
        self,
        cfg: Config,
        transform: Callable,
        tokenizer: Callable,
        env: DistEnv,
        resume_state: dict | None = None,
        draft_size: int | None = None,
    ):
        self.cfg = cfg
        self.env = env
        self.workers = max(1, cfg.data.workers)
        self.plan = build_plan(cfg, env.world_size)
        self.batches = 0  # micro-batches this rank has consumed
        self.skipped_before: dict[str, int] = {}  # skip counts of streams that a relayout retired
        saved_positions: dict[int, StreamPosition] = {}
        if resume_state:
            self.plan, saved_positions, self.batches = self._restore(resume_state)
        first = env.rank * self.workers
        self.positions = {s: saved_positions.get(s, StreamPosition()) for s in range(first, first + self.workers)}
        self.num_samples = cfg.data.train_num_samples or self.plan.total_samples
        self.decoder = SampleDecoder(
            transform, cfg.data.image_keys, cfg.data.caption_key, cfg.data.caption_json_field, draft_size
        )
        self.dataset = StreamDataset(
            self.plan,
            env.rank,
            self.workers,
            dict(self.positions),
            self.batches % self.workers,
            self.decoder,
            tokenizer,
            cfg.data.batch_size,
            cfg.seed,
            cfg.data.max_decode_errors_logged,
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=cfg.data.workers,
            prefetch_factor=cfg.data.prefetch_factor if cfg.data.workers > 0 else None,
            pin_memory=env.device.type == "cuda",
            worker_init_fn=functools.partial(ignore_signals, tuple(cfg.train.preempt_signals)),
        )
        self._iter = None

    def _restore(self, state: dict):
        """(plan, stream positions, batches taken) to continue from a checkpoint's data state."""
        saved = StreamPlan.from_layout(state["layout"])
        positions = {int(k): StreamPosition.from_state(v) for k, v in state["streams"].items()}
        if saved.same_streams_as(self.plan):
            self.skipped_before = dict(state.get("skipped_before", {}))
            return saved.with_shards(self.plan.shards), positions, int(state["batches"][self.env.rank])
        if saved.same_shards_as(self.plan):
            plan = relayout(saved, positions, self.plan)
            log.warning(
                "resuming on a different data layout (%d streams -> %d streams = world size x workers, "
                "or other seed/shuffle settings): batch order is not reproduced, but the %d samples not "
                "yet consumed in the current data epoch are read first and none twice",
                saved.num_streams,
                plan.num_streams,
                remaining_samples(plan),
            )
            self.skipped_before = _sum_skipped(
                [*positions.values(), StreamPosition(skipped=state.get("skipped_before", {}))]
            )
            return plan, {}, 0
        log.warning(
            "the shard list differs from the checkpoint's (other files or sample counts); "
            "the data stream restarts from the beginning"
        )
        return self.plan, {}, 0

    def next(self) -> tuple[dict, float]:
        """The next micro-batch and the seconds spent waiting for it."""
        if self._iter is None:
            self._iter = iter(self.loader)
            _WORKERS.extend(getattr(self._iter, "_workers", []))
        t0 = time.perf_counter()
        batch = next(self._iter)
        wait = time.perf_counter() - t0
        self.positions[batch["stream"]] = batch.pop("position")
        self.batches += 1
        return batch, wait

    def to_device(self, batch: dict, device) -> dict:
        """The batch with its images on `device` as the model's float input (workers send uint8
        pixels; the conversion and normalisation run here, on the GPU when there is one). The
        token ids are moved with the rest of the model input in step.forward_backward."""
        batch["images"] = self.decoder.to_model_input(batch["images"], device)
        return batch

    def close(self) -> None:
        """Stop the DataLoader workers now (they ignore SLURM's signals, so interpreter exit must
        not be the first to ask them: it would wait on them forever)."""
        it, self._iter = self._iter, None
        if it is not None:
            _stop_workers(it)

    def skipped(self) -> dict[str, int]:
        """Skip counts by reason over this rank's streams (and, after a relayout, before it)."""
        total = _sum_skipped(self.positions.values())
        if self.env.rank == 0:
            for reason, n in self.skipped_before.items():
                total[reason] = total.get(reason, 0) + n
        return total

    def state(self) -> dict:
        """Collective: the global data state (every rank's stream positions) for a checkpoint."""
        local = {
            "streams": {s: p.to_state() for s, p in self.positions.items()},
            "batches": self.batches,
            "skipped_before": self.skipped_before,
        }
        everyone = all_gather_object(local)
        streams: dict[int, dict] = {}
        for part in everyone:
            streams.update(part["streams"])
        return {
            "layout": self.plan.layout(),
            "streams": streams,
            "batches": [p["batches"] for p in everyone],
            "skipped_before": everyone[0]["skipped_before"],
        }
