"""The training data of one rank: sources + mixture schedule + DataLoader, and the consumed
position of every stream in every source (what a checkpoint needs to resume exactly)."""

from __future__ import annotations

import atexit
import functools
import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import DataLoader

from ..config import BatchLayout, DataConfig
from ..job import workers as worker_processes
from ..job.distributed import DistEnv, all_gather_object, broadcast_object
from ..job.distributed import rank as dist_rank
from ..job.distributed import world_size as dist_world
from ..job.preempt import ignore_signals, signals_blocked
from ..wds.remote import configure as configure_storage
from .mixture import MixtureSchedule, ScheduleState, weight_units
from .plan import StreamPlan, StreamPosition
from .relayout import relayout, remaining_samples
from .samples import SampleDecoder
from .sources import Source, build_sources, epoch_samples
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


STATE_FORMAT = 2


def _sum_skipped(positions) -> dict[str, int]:
    total: Counter = Counter()
    for pos in positions:
        total.update(pos.skipped)
    return dict(total)


def describe_source(source: Source) -> str:
    """One start-up line per source: its shards, the missing ones skipped, where the counts came from."""
    origin = source.found.by_origin() if source.found is not None else {}
    counted = ", ".join(f"{n} from {how}" for how, n in origin.items() if n and how != "left")
    missing = f", {source.missing} missing shard(s) skipped" if source.missing else ""
    shards = f"{source.plan.num_shards} shards, {source.samples} samples"
    return f"source {source.name!r}: {shards}{missing} (counts: {counted})"


class TrainData:
    """Yields this rank's micro-batches; `state()` is what a checkpoint needs to resume exactly,
    `restore(state, step)` continues from it (before the first batch is taken).

    The rank's micro-batches are numbered from the start of training (step x accum_steps + micro),
    which fixes their stream and their mixture."""

    def __init__(
        self,
        data_cfg: DataConfig,
        layout: BatchLayout,
        env: DistEnv,
        seed: int,
        transform: Callable,
        tokenizer: Callable,
        draft_size: int | None = None,
        signals: tuple[str, ...] = (),
        count_cache: Path | None = None,
        beat: Callable[[], None] | None = None,
        stored_teacher: bool = False,
    ):
        """`data_cfg`: the data section; `seed`: the run's (the data order); `signals`: the preemption
        signals the DataLoader workers must ignore (the training process handles them); `count_cache`:
        the run's shard count cache; `beat`: told of every shard counted (the hang watchdog);
        `stored_teacher`: batches carry the teacher features stored in the samples (distill.source=shards)."""
        self.cfg, self.layout, self.env, self.seed, self.tokenizer = data_cfg, layout, env, seed, tokenizer
        self.signals = tuple(signals)
        self.storage = {"storage_options": data_cfg.storage_options, "retries": data_cfg.read_retries}
        configure_storage(**self.storage)  # remote listings and counts below; the workers get it too
        self.workers = layout.workers
        self.num_streams = layout.streams
        # counted once per job over the process group (a rank simulated without one counts alone)
        census = {
            "rank": dist_rank(),
            "world": dist_world(),
            "gather": all_gather_object,
            "broadcast": broadcast_object,
        }
        self.sources: list[Source] = build_sources(
            data_cfg, seed, self.num_streams, cache_path=count_cache, beat=beat, **census
        )
        if env.is_main:
            for source in self.sources:
                log.info("data: %s", describe_source(source))
        self.global_batch = layout.global_batch
        self.micro_batches = layout.micro_batches
        self.num_samples = data_cfg.train_num_samples or epoch_samples(self.sources)
        self.stored_teacher = stored_teacher
        self.decoder = self._decoder(transform, draft_size)
        self.skipped_before: dict[str, int] = {}  # skip counts of streams a relayout retired
        self._iter = None
        self._start(step=0, positions={}, origin=None)

    def _decoder(self, transform: Callable, draft_size: int | None) -> SampleDecoder:
        c = self.cfg
        return SampleDecoder(
            transform, c.image_keys, c.caption_key, c.caption_json_field, draft_size, fast_crop=c.fast_crop,
            gpu_decode=c.gpu_decode, stored_teacher=self.stored_teacher,
        )  # fmt: skip

    def reconfigure(self, layout: BatchLayout, transform: Callable, tokenizer: Callable, draft_size: int | None):
        """A training stage's batch layout, crops and text length from the current step on (every rank at the
        same step; no collective: each rank continues its own streams). The streams continue from the samples
        trained on, as in a resume (what the workers had prefetched at the
        old settings is dropped, never trained on, so nothing is lost or repeated); a new global batch starts
        a new mixture schedule from this step, the samples each source delivered carried over."""
        if layout.streams != self.layout.streams:
            raise ValueError("a stage cannot change the number of data streams (world size x workers)")
        state = self.state(every_rank=False)
        self.close()
        self.layout, self.global_batch, self.micro_batches = layout, layout.global_batch, layout.micro_batches
        self.tokenizer, self.decoder = tokenizer, self._decoder(transform, draft_size)
        self.restore(state, self.step)

    def restore(self, state: dict, step: int) -> None:
        """Continue from a checkpoint's data state. The data's own step (global batches it has
        delivered or skipped) is in the state; `step`, the optimizer's, stands in for old states."""
        if self._iter is not None:
            raise RuntimeError("restore() must come before the first batch (close() first)")
        self.step = int(state.get("step", step)) if state else step
        positions, origin = self._restore(state) if state else ({}, None)
        self._start(self.step, positions, origin)

    def skip(self, global_batches: int) -> list[dict]:
        """Consume this rank's share of the next `global_batches` global batches without training on
        them (after a loss-spike rollback): their samples count as consumed. Returns each skipped
        micro-batch's {keys, sources, passes}."""
        skipped = []
        for _ in range(global_batches * self.layout.accum_steps):
            batch, _ = self.next()
            skipped.append({k: batch[k] for k in ("keys", "sources", "passes")})
        return skipped

    def _start(self, step: int, positions: dict[int, dict[str, StreamPosition]], origin) -> None:
        cfg, env, layout = self.cfg, self.env, self.layout
        self.step = step
        self.batches = step * layout.accum_steps  # micro-batches this rank has consumed (from step 0)
        weights = [s.weight for s in self.sources]
        self.schedule = MixtureSchedule(weights, layout, origin=origin)  # for checkpoints and metrics
        stream_schedule = MixtureSchedule(weights, layout, origin=origin)  # the streams' own copy
        first = env.rank * self.workers
        self.positions = {s: positions.get(s, {}) for s in range(first, first + self.workers)}
        self.dataset = StreamDataset(
            [(s.name, s.plan) for s in self.sources],
            stream_schedule,
            env.rank,
            env.world_size,
            self.workers,
            layout.accum_steps,
            self.batches,
            dict(self.positions),
            self.decoder,
            self.tokenizer,
            self.seed,
            cfg.max_decode_errors_logged,
            cfg.read_timeout_s,
            self.storage,
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=cfg.workers,
            multiprocessing_context=worker_processes.context(cfg.workers),
            prefetch_factor=cfg.prefetch_factor if cfg.workers > 0 else None,
            pin_memory=env.device.type == "cuda",
            worker_init_fn=functools.partial(ignore_signals, self.signals),
            # its own generator: creating the iterator must not draw from the global RNG (a resumed run
            # with dropout would otherwise see other random numbers than the run it continues)
            generator=torch.Generator().manual_seed(self.seed + env.rank),
        )

    # ------------------------------------------------------------------ resume
    def _restore(self, state: dict) -> tuple[dict[int, dict[str, StreamPosition]], ScheduleState | None]:
        """Stream positions (by stream, by source) and the schedule's state to continue from a
        checkpoint's data state; each source continues as exactly as its layout allows."""
        if state.get("format") != STATE_FORMAT:
            log.warning(
                "the checkpoint's data position is from an older clipscale; the data stream restarts from the beginning"
            )
            return {}, None
        saved_streams = {
            int(s): {name: StreamPosition.from_state(p) for name, p in by_source.items()}
            for s, by_source in state["streams"].items()
        }
        self.skipped_before = dict(state.get("skipped_before", {}))
        positions: dict[int, dict[str, StreamPosition]] = {}
        current = {s.name for s in self.sources}
        for gone in sorted(set(state["sources"]) - current):
            log.warning("data source %r of the checkpoint is not in this run's data.sources: it is left out", gone)
            self._retire([by_source[gone] for by_source in saved_streams.values() if gone in by_source])
        for source in self.sources:
            layout = state["sources"].get(source.name)
            if layout is None:
                log.warning("data source %r is new: it starts at its first sample", source.name)
                continue
            old = {s: by_source[source.name] for s, by_source in saved_streams.items() if source.name in by_source}
            source.plan, kept = self._continue_source(source, layout, old)
            for s, pos in kept.items():
                positions.setdefault(s, {})[source.name] = pos
        return positions, self._schedule_origin(state.get("mixture") or {})

    def _continue_source(self, source: Source, layout: dict, old: dict[int, StreamPosition]):
        """(plan, positions) of one source after a checkpoint: the same streams as saved, a
        re-layout onto the new streams, or a fresh start when the shard list changed."""
        fresh = source.plan
        same_shards = layout["fingerprint"] == fresh.fingerprint() and int(layout["samples"]) == fresh.total_samples
        if not same_shards:
            log.warning(
                "data source %r: the shard list differs from the checkpoint's (other files or sample "
                "counts); it restarts from its beginning",
                source.name,
            )
            self._retire(old.values())
            return fresh, {}
        saved = StreamPlan.from_layout(layout, fresh.shards)
        if saved.settings() == fresh.settings():
            return saved, old
        plan = relayout(saved, old, fresh)
        self._retire(old.values())
        log.warning(
            "data source %r: resuming on another data layout (%d streams -> %d = world size x workers, or "
            "other seed/shuffle settings): the %d samples not yet read in its started data passes are "
            "dealt to the new streams and read first, none twice",
            source.name,
            saved.num_streams,
            plan.num_streams,
            remaining_samples(plan),
        )
        return plan, {}

    def _schedule_origin(self, saved: dict) -> ScheduleState:
        """Where the mixture schedule continues: the saved state when nothing changed; else a new
        schedule from this step, with the samples each source delivered carried over by name (and
        their credits, when the weights are the same)."""
        names = [s.name for s in self.sources]
        units = weight_units([s.weight for s in self.sources])
        now = {
            "names": names,
            "units": units,
            "global_batch": self.global_batch,
            "micro_batches": self.micro_batches,
            "num_streams": self.num_streams,
        }
        state = ScheduleState.from_state(saved["state"]) if "state" in saved else None
        if state is None:
            return ScheduleState(self.step, [0] * len(names))
        if all(saved.get(k) == v for k, v in now.items()) and state.step == self.step:
            return state
        same_mixture = saved.get("names") == names and saved.get("units") == units
        if not same_mixture:
            old = dict(zip(saved.get("names", []), saved.get("units", [])))
            total_old = sum(old.values()) or 1
            log.warning(
                "the data mixture changed since the checkpoint: from step %d, %s",
                self.step,
                ", ".join(
                    f"{n} {u / sum(units):.4f} (was {old[n] / total_old:.4f})"
                    if n in old
                    else f"{n} {u / sum(units):.4f} (new)"
                    for n, u in zip(names, units)
                ),
            )
        delivered = dict(zip(saved.get("names", []), state.delivered))
        credits = state.credits if same_mixture else []
        return ScheduleState(self.step, [delivered.get(n, 0) for n in names], credits)

    def _retire(self, positions) -> None:
        """Keep the skip counts of stream positions that will not be continued (skipped_samples
        counts every skip of the run, and never goes backwards)."""
        for reason, n in _sum_skipped(positions).items():
            self.skipped_before[reason] = self.skipped_before.get(reason, 0) + n

    # ------------------------------------------------------------------ batches
    def next(self) -> tuple[dict, float]:
        """The next micro-batch and the seconds spent waiting for it."""
        if self._iter is None:
            # the workers start here, from the fork server (job.workers), with the stop signals blocked until
            # they ignore them; blocked here too for platforms where they are spawned from this process
            with signals_blocked(self.signals):
                self._iter = iter(self.loader)
            _WORKERS.extend(getattr(self._iter, "_workers", []))
        t0 = time.perf_counter()
        batch = next(self._iter)
        wait = time.perf_counter() - t0
        if batch["batch_index"] != self.batches:
            raise RuntimeError(
                f"data stream out of order: got micro-batch {batch['batch_index']}, expected {self.batches}"
            )
        self.positions[batch["stream"]] = batch.pop("positions")
        self.batches += 1
        self.step = self.batches // self.layout.accum_steps
        return batch, wait

    def to_device(self, batch: dict, device) -> dict:
        """The batch with its images on `device` as the model's float input (workers send uint8
        pixels; the conversion and normalisation run here, on the GPU when there is one). The
        token ids are moved with the rest of the model input in grad_cache.forward_backward."""
        batch["images"] = self.decoder.to_model_input(batch["images"], device)
        return batch

    def close(self) -> None:
        """Stop the DataLoader workers now (they ignore SLURM's signals, so interpreter exit must
        not be the first to ask them: it would wait on them forever)."""
        it, self._iter = self._iter, None
        if it is not None:
            _stop_workers(it)

    # ------------------------------------------------------------------ reporting
    def skipped(self) -> dict[str, int]:
        """Skip counts by reason over this rank's streams (and, after a relayout, before it)."""
        total = Counter(_sum_skipped(p for by_source in self.positions.values() for p in by_source.values()))
        if self.env.rank == 0:
            total.update(self.skipped_before)
        return dict(total)

    def source_metrics(self) -> dict[str, float]:
        """Per source, at the current step: samples delivered so far (all ranks) and epochs (samples
        delivered / the source's samples)."""
        delivered = self.schedule.state_at(self.step).delivered
        out: dict[str, float] = {}
        for source, n in zip(self.sources, delivered):
            out[f"data/{source.name}/samples"] = n
            out[f"data/{source.name}/epoch"] = round(n / source.samples, 6)
        return out

    def state(self, every_rank: bool = True) -> dict:
        """Collective: the global data state (every rank's stream positions) for a checkpoint. With
        `every_rank` false, this rank's streams only, without a collective (what it needs to continue itself)."""
        local = {s: {name: p.to_state() for name, p in by_source.items()} for s, by_source in self.positions.items()}
        streams: dict[int, dict] = {}
        for part in all_gather_object(local) if every_rank else [local]:
            streams.update(part)
        return {
            "format": STATE_FORMAT,
            "step": self.step,
            "sources": {s.name: s.plan.layout() for s in self.sources},
            "streams": streams,
            "mixture": {
                "names": [s.name for s in self.sources],
                "units": weight_units([s.weight for s in self.sources]),
                "global_batch": self.global_batch,
                "micro_batches": self.micro_batches,
                "num_streams": self.num_streams,
                "state": self.schedule.state_at(self.step).to_state(),
            },
            "epochs": {
                s.name: n / s.samples for s, n in zip(self.sources, self.schedule.state_at(self.step).delivered)
            },
            "skipped_before": self.skipped_before,
            "world_size": self.env.world_size,
            "workers": self.workers,
        }
