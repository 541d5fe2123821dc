"""Checkpoints on disk: when to save, atomic writes, checksums, retention, and resuming.

Layout of a run directory:
    checkpoints/step_00001000.pt          one checkpoint per saved step (a file for DDP, a folder for
                                          FSDP2 and DeepSpeed: engine/formats.py says what is inside)
    checkpoints/step_00001000.pt.sha256   sha256 of every file of that checkpoint (JSON)
    checkpoints/latest                    the name of the newest complete checkpoint
    checkpoints/abandoned/                checkpoints after the one a run resumed from (a rollback)

Saving: write under a temporary name (every file fsync'ed), write the checksums, rename into
place, then move `latest`; retention removes the oldest beyond `keep_last`, never the one just
written. A kill at any moment leaves the previous checkpoint intact and pointed at. Loading
(`resume: auto`): the checkpoint `latest` names, else the newest; one that is damaged or fails to
load is skipped with a warning in favour of the one before it. Resuming from a checkpoint older
than the newest (a rollback) moves the later ones to `abandoned/`: they belong to a future this
run will not have, and must neither be resumed from nor count against `keep_last`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import torch

from .checkpoint_names import CHECKSUM_SUFFIX, LATEST, NAME_RE, checkpoint_name
from .config import CheckpointConfig
from .distributed import all_gather_object, barrier, broadcast_object
from .errors import CheckpointError, CheckpointMismatch
from .fsutil import atomic_write_bytes, fsync_dir, remove_path, remove_temporaries, sha256_file, temp_path

log = logging.getLogger(__name__)


def step_of(path: Path) -> int:
    m = NAME_RE.match(path.name)
    return int(m.group(1)) if m else -1


def torch_save_synced(obj, path: Path) -> None:
    """torch.save + fsync: the bytes are on disk before anyone renames the file into place."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def checksums(path: Path) -> dict[str, str]:
    """sha256 of a checkpoint file ({"": hash}) or of every file of a checkpoint folder."""
    if path.is_file():
        return {"": sha256_file(path)}
    return {str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()}


def checksum_path(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + CHECKSUM_SUFFIX)


def checksum_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` is damaged, or None if it matches its recorded checksums (or has none)."""
    sums = checksum_path(checkpoint)
    if not sums.is_file():
        return None
    try:
        expected = json.loads(sums.read_text())
    except ValueError:
        return f"unreadable checksum file {sums.name}"
    actual = checksums(checkpoint) if checkpoint.exists() else {}
    for rel, digest in expected.items():
        if actual.get(rel) != digest:
            return f"sha256 mismatch ({rel or checkpoint.name})" if rel in actual else f"missing file {rel}"
    return None


# --------------------------------------------------------------------------- compatibility


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "deepspeed_config":
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(dotted key, checkpoint value, current value) for every setting that differs."""
    a, b = flatten(saved or {}), flatten(current)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def incompatibility(
    source: str, saved_config: dict | None, current_config: dict, model_state: dict, saved_state: dict
) -> str | None:
    """One line listing why a checkpoint cannot be loaded into this run, or None if it can."""
    weights = []
    shapes = [
        f"{k} {tuple(saved_state[k].shape)} vs {tuple(v.shape)}"
        for k, v in model_state.items()
        if k in saved_state and tuple(saved_state[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in model_state if k not in saved_state]
    unexpected = [k for k in saved_state if k not in model_state]
    if shapes:
        weights.append(f"{len(shapes)} weight shape(s) differ, e.g. {'; '.join(shapes[:2])} (checkpoint vs now)")
    if missing:
        weights.append(f"{len(missing)} weight(s) missing from the checkpoint, e.g. {missing[0]}")
    if unexpected:
        weights.append(f"{len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
    settings = [
        f"{k}: {old!r} in the checkpoint, {new!r} now"
        for k, old, new in config_changes(saved_config or {}, current_config)
        if saved_config and k in ("model.name", "loss.name")
    ]
    if "text_projection" in saved_state and "text_projection" in model_state:
        a, b = saved_state["text_projection"].shape[-1], model_state["text_projection"].shape[-1]
        if a != b:
            settings.append(f"embedding size: {a} in the checkpoint, {b} now")
    if not weights and not any(s.startswith("model.name") for s in settings):
        return None
    return f"{source} does not fit this model: " + "; ".join(settings + weights)


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    """Save/find checkpoints of one run directory. Only the main rank touches the files."""

    def __init__(
        self, run_dir: str | Path, cfg: CheckpointConfig | None = None, is_main: bool = True, local_main: bool = True
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg or CheckpointConfig()
        self.keep_last = self.cfg.keep_last
        self.is_main = is_main
        self.local_main = local_main  # the first process of its node (downloads the remote latest)
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self.protected: Path | None = None  # never removed by retention (the spike guard's rollback target)
        self.mirror = None
        if self.cfg.remote:
            from .checkpoint_remote import RemoteMirror

            self.mirror = RemoteMirror(self.cfg.remote, self.keep_last, self.cfg.storage_options or {})
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.dir, "step_*")  # what saves killed mid-write left behind

    def path_for(self, step: int, suffix: str = ".pt") -> Path:
        """Where the checkpoint of `step` lives (once published)."""
        return self.dir / checkpoint_name(step, suffix)

    # ---------------------------------------------------------------- when
    def due(self, step: int, total: int) -> bool:
        """A checkpoint after this step, during the run (every checkpoint.every_n_steps)."""
        return step % self.cfg.every_n_steps == 0 and step < total

    def due_at_end(self, step: int, last_saved: int, preempted: bool) -> bool:
        """A checkpoint as the run stops: always when preempted, else the final one (save_final),
        unless this step was just saved."""
        return preempted or (self.cfg.save_final and last_saved != step)

    # ---------------------------------------------------------------- writing
    def save(self, step: int, write: Callable[[Path], None], suffix: str = ".pt") -> Path:
        """Collective: `write(tmp)` on every rank, then the main rank checksums the result,
        renames it into place and moves `latest`."""
        self.wait()
        final = self.path_for(step, suffix)
        tmp = temp_path(final)
        if self.is_main:
            remove_path(tmp)
        barrier()
        write(tmp)
        if tmp.is_dir():  # each rank makes the files it wrote durable (other nodes' writes included)
            fsync_tree(tmp)
        barrier()
        if self.is_main:
            self._publish(tmp, final)
        barrier()
        return final

    def save_async(self, step: int, write: Callable[[Path], None], suffix: str = ".pt") -> Path:
        """Main rank only, no collectives: write + publish in a background thread (the caller
        hands over a snapshot that training will not modify). Waits for the previous one first."""
        self.wait()
        final = self.path_for(step, suffix)
        tmp = temp_path(final)

        def run():
            try:
                remove_path(tmp)
                write(tmp)
                self._publish(tmp, final)
            except BaseException as exn:  # reported by the next wait()
                self._pending_error = exn

        self._pending = threading.Thread(target=run, name=f"checkpoint-{step}", daemon=False)
        self._pending.start()
        return final

    def wait(self) -> None:
        """Block until a background save has finished; raise if it failed."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._pending_error is not None:
            exn, self._pending_error = self._pending_error, None
            raise CheckpointError(f"background checkpoint save failed: {type(exn).__name__}: {exn}")

    def _publish(self, tmp: Path, final: Path) -> None:
        if tmp.is_dir():  # DeepSpeed / DCP wrote the files: make them durable before the rename
            fsync_tree(tmp)
        atomic_write_bytes(checksum_path(final), (json.dumps(checksums(tmp), indent=1) + "\n").encode())
        remove_path(final)
        os.replace(tmp, final)
        fsync_dir(self.dir)
        atomic_write_bytes(self.dir / LATEST, (final.name + "\n").encode())
        self._retain(keep=final)
        if self.mirror is not None:  # (in the background thread too, with checkpoint.async)
            try:
                self.mirror.upload(final, protected=self.protected)
            except Exception as exn:  # noqa: BLE001 - the local checkpoint stands; say so and go on
                log.warning("could not mirror %s to %s: %s: %s", final.name, self.cfg.remote, type(exn).__name__, exn)

    def all_checkpoints(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if NAME_RE.match(p.name)]
        return sorted(found, key=step_of)

    def _retain(self, keep: Path) -> None:
        """Remove the oldest checkpoints beyond keep_last, never `keep` (the one just written)."""
        if self.keep_last <= 0:
            return
        others = [p for p in self.all_checkpoints() if p not in (keep, self.protected)]
        for old in others[: max(0, len(others) - (self.keep_last - 1))]:
            try:
                remove_path(old)
                remove_path(checksum_path(old))
            except OSError as e:
                log.warning("could not remove old checkpoint %s: %s", old, e)

    # ---------------------------------------------------------------- finding
    def candidates(self) -> list[Path]:
        """Checkpoints to try, best first: the one `latest` names, then newest to oldest."""
        found = list(reversed(self.all_checkpoints()))
        pointer = self.dir / LATEST
        if pointer.is_file():
            name = pointer.read_text(errors="replace").strip()
            target = self.dir / name
            if NAME_RE.match(name) and target.exists():
                found.remove(target)
                found.insert(0, target)
            else:
                log.warning(
                    "checkpoints/latest names %r, which is not a checkpoint here; "
                    "trying the newest checkpoints instead",
                    name[:80],
                )
        return found

    def latest(self) -> Path | None:
        """The newest intact checkpoint (damaged ones are skipped with a warning)."""
        for path in self.candidates():
            problem = checksum_problem(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path.name, problem)
        return None

    def rollback_target(self, before_step: int, also: Path | None = None) -> Path | None:
        """The newest intact checkpoint from before `before_step` (the first step of a loss spike):
        this run's own, else `also` (the checkpoint the run resumed from, maybe another run's)."""
        found = [p for p in self.candidates() if 0 <= step_of(p) < before_step]
        if also is not None and also not in found and 0 <= step_of(also) < before_step:
            found.append(also)
        for path in sorted(found, key=step_of, reverse=True):
            problem = checksum_problem(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s); trying an older one", path.name, problem)
        return None

    def resolve(self, resume: str) -> Path | None:
        """`checkpoint.resume` → a path to load, or None to start fresh."""
        if resume in ("", "none", None):
            return None
        if resume == "auto":
            return self.latest()
        path = Path(resume)
        if path.is_dir() and path.name == "checkpoints":
            return CheckpointManager(path.parent, is_main=False).latest()
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume: no checkpoint at {resume}")
        problem = checksum_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume: {path} is damaged ({problem})")
        return path

    # ---------------------------------------------------------------- resuming
    RESUMED_FROM = "resumed_from"  # the explicit checkpoint.resume this run directory already applied

    def plan_resume(self, resume: str) -> tuple[list[Path], bool]:
        """(checkpoints to try in order, whether `resume` named exactly one). A run's `checkpoints/`
        folder means its newest; an explicit path this run directory already resumed from (the
        same command, requeued) means this run's own newest (else every requeue would roll back)."""
        if resume in ("", "none", None):
            return [], False
        if resume == "auto":
            return self.candidates(), False
        path = Path(resume)
        if path.is_dir() and path.name == "checkpoints":
            return CheckpointManager(path.parent, is_main=False).candidates(), False
        marker = self.dir / self.RESUMED_FROM
        if marker.is_file() and marker.read_text().strip() == str(path.resolve()) and self.all_checkpoints():
            log.info(
                "checkpoint.resume=%s was applied before in this run directory; continuing from its newest checkpoint",
                resume,
            )
            return self.candidates(), False
        return [self.resolve(resume)], True

    def load(self, engine, resume: str) -> tuple[Path, dict] | None:
        """Collective: restore the engine from the checkpoint `resume` says (none | auto | a path) and
        return (its path, its train state), or None to start fresh. Under resume=auto a damaged
        checkpoint, or one whose data fail to load, is skipped for the one before it, on every rank
        alike; a checkpoint of another model, or an I/O or memory error, stops the run instead."""
        self.fetch_remote(resume)
        plan = self.plan_resume(resume) if self.is_main else ([], False)
        candidates, explicit = broadcast_object(([str(p) for p in plan[0]], plan[1]))
        for i, name in enumerate(candidates):
            path = Path(name)
            problem = checksum_problem(path) if self.is_main and not explicit else None  # one at a time
            problem = broadcast_object(problem)
            if problem:
                log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path.name, problem)
                continue
            train_state, error = None, None
            try:
                train_state = engine.load(path)
            except CheckpointMismatch as exn:  # another model: no older checkpoint is better
                error = ("mismatch", str(exn))
            except (OSError, MemoryError) as exn:  # the storage or the machine, not the checkpoint
                error = ("stop", f"cannot load {path}: {type(exn).__name__}: {exn}")
            except Exception as exn:  # noqa: BLE001 - a damaged or incomplete checkpoint
                error = ("skip", f"{type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}")
            reports = [e for e in all_gather_object(error) if e]
            for kind, text in reports:
                if kind == "mismatch":
                    raise CheckpointMismatch(text)
                if kind == "stop":
                    raise CheckpointError(text[:600])
            if not reports:
                if self.is_main:
                    self.abandon_after(path)
                    if explicit:
                        atomic_write_bytes(self.dir / self.RESUMED_FROM, (str(path.resolve()) + "\n").encode())
                return path, train_state
            if explicit:
                raise CheckpointError(f"checkpoint.resume: cannot load {path}: {reports[0][1]}"[:600])
            log.warning(
                "checkpoint %s could not be loaded (%s)%s",
                path.name,
                reports[0][1][:300],
                "; falling back to the previous one" if i + 1 < len(candidates) else "",
            )
        if candidates:
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoint(s) in {self.dir} could be loaded; "
                f"set checkpoint.resume=none to start over (the old ones stay)"
            )
        return None

    def fetch_remote(self, resume: str) -> None:
        """Collective: under resume=auto with no local checkpoint, bring checkpoint.remote's latest into
        checkpoints/: the main rank first, then the first process of every node that does not see it
        (node-local run directories). A failure anywhere stops every rank with the same error."""
        if self.mirror is None or resume != "auto":
            return
        found: tuple[str | None, str | None] = (None, None)
        if self.is_main and not self.all_checkpoints():
            try:
                found = (self.mirror.latest(), None)
            except Exception as exn:  # noqa: BLE001 - every rank must hear of it
                found = (None, f"{type(exn).__name__}: {exn}")
        name, error = broadcast_object(found)
        if error is None and name is not None:
            for turn in ("main", "others"):
                mine = self.is_main if turn == "main" else (self.local_main and not self.is_main)
                error = None
                if mine and not (self.dir / name).exists():
                    try:
                        log.info("no checkpoint in %s: downloading %s from %s", self.dir, name, self.cfg.remote)
                        path = self.mirror.download(name, self.dir)
                        atomic_write_bytes(self.dir / LATEST, (path.name + "\n").encode())
                    except Exception as exn:  # noqa: BLE001
                        error = f"{type(exn).__name__}: {exn}"
                error = next((e for e in all_gather_object(error) if e), None)
                if error:
                    break
        if error:
            raise CheckpointError(f"cannot bring the latest checkpoint from {self.cfg.remote}: {error}"[:600])

    def abandon_after(self, resumed: Path) -> None:
        """Move this run's checkpoints after `resumed` to checkpoints/abandoned/ (a rollback): `latest`,
        resume=auto and retention then only see the checkpoints of the history this run continues."""
        step = step_of(resumed)
        if step < 0:
            return
        later = [p for p in self.all_checkpoints() if step_of(p) > step]
        if not later:
            return
        aside = self.dir / "abandoned"
        aside.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for path in later:
            for item in (path, checksum_path(path)):
                if item.exists():
                    os.replace(item, aside / f"{item.name}.{stamp}")
        if resumed.parent.resolve() == self.dir.resolve():
            atomic_write_bytes(self.dir / LATEST, (resumed.name + "\n").encode())
        log.warning(
            "resumed from %s, older than the newest checkpoint of %s: moved %d later checkpoint(s) (%s) to %s",
            resumed.name,
            self.dir,
            len(later),
            ", ".join(p.name for p in later),
            aside,
        )


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder` (files another library wrote)."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(path)


def load_checkpoint_file(path: Path, mmap: bool = False) -> dict:
    """Load a clipscale checkpoint file, with a one-line error for unreadable files (`mmap`: tensors
    stay in the file until touched)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exn:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {type(exn).__name__}: {str(exn).splitlines()[0] if str(exn) else ''}"
        ) from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a clipscale checkpoint (no 'state_dict')")
    return state
