"""Where training numbers go: metrics.jsonl, TensorBoard, the console, the sample-key log
(sample_keys/rank-NNNNN.jsonl, a file per rank), and Weights & Biases (logging.wandb, rank 0).

The W&B run id is part of the checkpoint (checkpoint/state.py RunMeta), so a resumed or requeued job
continues the same W&B run (`resume="allow"`); `mode: offline` writes RUN_DIR/wandb/ with no network
(`wandb sync` uploads it later)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from .fsutil import atomic_write_bytes

log = logging.getLogger("clipscale")

METRICS_FILE = "metrics.jsonl"
SAMPLE_KEYS_DIR = "sample_keys"
LEGACY_SAMPLE_KEYS_FILE = "sample_keys.jsonl"  # one file for all ranks, before per-rank files


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable
    return v


def append_line(path: Path, record: dict) -> None:
    """One write() per line with O_APPEND, so several ranks can share the file."""
    line = (json.dumps({k: _clean(v) for k, v in record.items()}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def truncate_after(path: Path, step: int, keep_events: bool = False) -> None:
    """Drop records of steps after `step` (work that a resume redoes) from a jsonl file; with
    `keep_events`, records of events (a rollback) stay: they happened, whatever is redone."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
            if record.get("step", 0) <= step or (keep_events and "event" in record):
                kept.append(line)
        except ValueError:
            continue  # a line torn by a kill
    atomic_write_bytes(path, "".join(k + "\n" for k in kept).encode())


def sample_keys_path(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / SAMPLE_KEYS_DIR / f"rank-{rank:05d}.jsonl"


def _step_of_line(line: bytes) -> float:
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf  # a line torn by a kill (the last one): it goes


def cut_log_after(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` from an append-only jsonl log whose steps never
    decrease (a rank's sample-key log: truncated at each resume, then appended), in place: a binary
    search over byte offsets, a few reads and one truncate, whatever the log's length."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return
    with f:
        size = f.seek(0, os.SEEK_END)
        lo, hi = 0, size  # the cut is at a line start in [lo, hi]: lines before lo are kept
        while lo < hi:
            mid = (lo + hi) // 2
            start = _line_start_at_or_after(f, mid)
            if start >= hi:  # no line starts in [mid, hi): the line at lo (lo is always a line start)
                start = lo
            f.seek(start)
            line = f.readline()
            if _step_of_line(line) <= step and line.endswith(b"\n"):
                lo = start + len(line)
            else:
                hi = start
        if hi < size:
            f.truncate(hi)


def _line_start_at_or_after(f, offset: int) -> int:
    """The offset of the first line that starts at or after `offset`."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    if f.read(1) == b"\n":
        return offset
    f.readline()
    return f.tell()


def read_sample_keys(run_dir: Path) -> list[dict]:
    """Every record of a run's sample-key log: rank by rank, each in the order written (and a log
    from before per-rank files first)."""
    run_dir = Path(run_dir)
    records = read_jsonl(run_dir / LEGACY_SAMPLE_KEYS_FILE) if (run_dir / LEGACY_SAMPLE_KEYS_FILE).is_file() else []
    folder = run_dir / SAMPLE_KEYS_DIR
    for path in sorted(folder.glob("rank-*.jsonl")) if folder.is_dir() else []:
        records += read_jsonl(path)
    return records


def read_jsonl(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        is_main: bool,
        rank: int,
        world_size: int = 1,
        tensorboard: bool = False,
        sample_keys: bool = False,
        console=None,
        tracker=None,
    ):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.rank, self.world_size = rank, world_size
        self.sample_keys_enabled = sample_keys
        self._keys_folder_made = False
        self.console = console or log.info
        self.tracker = tracker if is_main else None  # e.g. tracking.WandbLogger
        self.tb = None
        if is_main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("logging.tensorboard=true but tensorboard is not installed; pip install tensorboard")
            else:
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def resume_at(self, step: int, keep_events: bool = False) -> None:
        """Forget records past `step`: those steps will be trained again (`keep_events`: but not the
        events, e.g. an earlier rollback to the same checkpoint)."""
        if self.is_main:
            truncate_after(self.run_dir / METRICS_FILE, step, keep_events)
            truncate_after(self.run_dir / LEGACY_SAMPLE_KEYS_FILE, step)
        # each rank cuts its own log; the main rank those of ranks a job at a larger world left
        cut_log_after(sample_keys_path(self.run_dir, self.rank), step)
        folder = self.run_dir / SAMPLE_KEYS_DIR
        if self.is_main and folder.is_dir():
            for path in folder.glob("rank-*.jsonl"):
                number = path.stem.removeprefix("rank-")
                if number.isdigit() and int(number) >= self.world_size:
                    cut_log_after(path, step)

    def log(self, step: int, metrics: dict, console: bool = True) -> None:
        if not self.is_main:
            return
        record = {"step": step, **metrics}
        append_line(self.run_dir / METRICS_FILE, record)
        if self.tracker is not None:
            self.tracker.log(step, metrics)
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)
        if console:
            self.console(format_metrics(record))

    def sample_keys(
        self, step: int, keys: list[str], passes: list[int], sources: list[str], skipped: int | None = None
    ) -> None:
        """One line per step in this rank's log: the keys of its samples, their data pass (the source's epoch)
        and source (keys of different sources may collide), in the same order. After a loss-spike
        rollback, one line per skipped global batch (`skipped`: its index) before the step they precede."""
        if self.sample_keys_enabled:
            record = {"step": step, "rank": self.rank, "keys": keys, "passes": passes, "sources": sources}
            if skipped is not None:
                record["skipped"] = skipped
            path = sample_keys_path(self.run_dir, self.rank)
            if not self._keys_folder_made:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._keys_folder_made = True
            append_line(path, record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


def format_metrics(record: dict) -> str:
    parts = []
    for k, v in record.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif isinstance(v, dict):
            continue
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


# --------------------------------------------------------------------------- Weights & Biases


def new_run_id() -> str:
    import secrets

    return secrets.token_hex(4)


class WandbLogger:
    def __init__(self, spec, run_dir: Path, run_id: str, config: dict):
        import wandb  # (installed: checked at load, config/validate.py)

        self.wandb = wandb
        self.run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            name=spec.name,
            tags=list(spec.tags) or None,
            mode=spec.mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            config=config,
            settings=wandb.Settings(silent=True, console="off"),
        )
        # the training step is a metric of its own: steps replayed after a resume are logged again (W&B
        # drops rows whose own step is not above its last one)
        self.run.define_metric("train/step")
        self.run.define_metric("*", step_metric="train/step")
        log.info("W&B run %s (%s) in %s", run_id, spec.mode, run_dir / "wandb")

    def log(self, step: int, metrics: dict) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if scalars:
            self.run.log({**scalars, "train/step": step})

    def close(self) -> None:
        self.run.finish()
