"""Checkpoints on disk: when to save, atomic writes, checksums, retention, and resuming.

Layout of a run directory:
    checkpoints/step_00001000.pt          one checkpoint per saved step (a file for DDP, a folder for
                                          FSDP2 and DeepSpeed: formats.py says what is inside)
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

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from ..config import CheckpointConfig
from ..errors import CheckpointError, CheckpointMismatch, CheckpointUnreadable, one_line
from ..fsutil import atomic_write_bytes, fsync_dir, remove_path, remove_temporaries, temp_path
from ..job.distributed import all_gather_object, barrier, broadcast_object, scatter_object, world_size
from .files import (
    READ_FAILURES,
    checksum_path,
    checksum_problem,
    checksums,
    durability_shares,
    fsync_paths,
    is_read_failure,
    step_of,
    torch_save_synced,
)
from .names import FORMS, LATEST, NAME_RE, checkpoint_name, checkpoints_folder, is_checkpoint_folder, named_target

log = logging.getLogger(__name__)


class CheckpointManager:
    """The checkpoints of one run directory: when to save (every checkpoint.every_n_steps, never while
    the loss spikes, at the end), what to keep (retention, the rollback target), what to resume from.
    Only the main rank touches the files."""

    def __init__(
        self, run_dir: str | Path, cfg: CheckpointConfig | None = None, is_main: bool = True, local_main: bool = True
    ):
        self.dir = Path(run_dir) / "checkpoints"
        self.cfg = cfg or CheckpointConfig()
        self.current: Path | None = None  # the newest checkpoint of this run (saved, or resumed from)
        self.last_saved = -1  # the step `current` holds (-1: none yet)
        self._due = False  # a checkpoint came due (it waits while the loss spikes)
        self.keep_last = self.cfg.keep_last
        self.is_main = is_main
        self.local_main = local_main  # the first process of its node (downloads the remote latest)
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self.protected: Path | None = None  # never removed by retention (the spike guard's rollback target)
        self._from_bucket: str | None = None  # the rollback target rollback_target found only in the bucket
        self.mirror = None
        if self.cfg.remote:
            from .remote import RemoteMirror

            self.mirror = RemoteMirror(self.cfg.remote, self.keep_last, self.cfg.storage_options or {})
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            remove_temporaries(self.dir, "step_*")  # what saves killed mid-write left behind

    @classmethod
    def reader(cls, folder: Path) -> CheckpointManager:
        """A read-only manager of any folder of step checkpoints (another run's, a copy)."""
        manager = cls(Path(folder).parent, is_main=False)
        manager.dir = Path(folder)
        return manager

    def path_for(self, step: int, suffix: str = ".pt") -> Path:
        """Where the checkpoint of `step` lives (once published)."""
        return self.dir / checkpoint_name(step, suffix)

    @staticmethod
    def step_of(path: Path) -> int:
        return step_of(path)

    # ---------------------------------------------------------------- when
    def due(self, step: int, total: int, spiking: bool = False) -> bool:
        """A checkpoint after this step, during the run: every checkpoint.every_n_steps, and one that
        came due while the loss was spiking as soon as it stops (the checkpoint a rollback goes back
        to must come from before a spike)."""
        self._due = self._due or (step % self.cfg.every_n_steps == 0 and step < total)
        return self._due and not spiking and step < total

    def due_at_end(self, step: int, preempted: bool) -> bool:
        """A checkpoint as the run stops: always when preempted, else the final one (save_final),
        unless this step was just saved."""
        return preempted or (self.cfg.save_final and self.last_saved != step)

    def holds(self, path: Path | None, step: int) -> None:
        """`path`, which holds the train state of `step`, is now this run's newest checkpoint (saved,
        resumed from or rolled back to): nothing is due, and the end of the run saves only past `step`."""
        self.current, self.last_saved, self._due = path, step, False

    # ---------------------------------------------------------------- the engine's checkpoint
    def save_engine(self, step: int, engine, train_state: dict, background: bool, spike_start: int | None) -> Path:
        """Collective: the engine's model and optimizer and the train state at `step`. In the background
        (checkpoint.async, DDP engine) the main rank writes a CPU snapshot while training goes on.
        Saved in the middle of a spike (a preemption), retention keeps what a rollback needs: the
        newest checkpoint from before `spike_start`."""
        if self.is_main:
            try:
                self.protected = self.rollback_target(spike_start, self.current) if spike_start is not None else None
            except CheckpointUnreadable as exn:  # (main rank only, the others wait in save()): keep the current one
                log.warning("%s; keeping %s instead", exn, self.current)
                self.protected = self.current
        suffix = engine.checkpoint_suffix
        if background and engine.supports_async_save:
            snap = engine.snapshot(train_state)
            path = self.path_for(step, suffix)
            if self.is_main:
                self.save_async(step, lambda tmp: torch_save_synced(snap, tmp), suffix)
            log.info("saving checkpoint %s in the background", path)
        else:
            path = self.save(step, lambda tmp: engine.save(tmp, train_state), suffix, engine.files_synced)
            log.info("saved checkpoint %s", path)
        self.holds(path, step)
        return path

    def restore(self, engine, target: Path) -> dict:
        """Collective: load `target` into the engine (a rollback); this run's later checkpoints go to
        abandoned/. Returns the train state saved with it (the caller loads it, then calls holds())."""
        self.wait()
        from_bucket = broadcast_object(self.is_main and self._from_bucket == target.name and target.parent == self.dir)
        if from_bucket:  # a requeue into an empty folder has not got it, or has a damaged copy
            self.bring_from_bucket(target.name)
        train_state = engine.load(target)
        if self.is_main:
            self.abandon_after(target)
            if self.mirror is not None and target.parent == self.dir:
                try:
                    self.mirror.abandon_after(target.name)
                except Exception as exn:  # noqa: BLE001 - the local rollback stands; say so and go on
                    log.warning(
                        "could not move %s's later checkpoints aside: %s: %s", self.cfg.remote, type(exn).__name__, exn
                    )
        return train_state

    # ---------------------------------------------------------------- writing
    def save(self, step: int, write: Callable[[Path], None], suffix: str = ".pt", files_synced: bool = False) -> Path:
        """Collective: `write(tmp)` on every rank, then the main rank checksums the result,
        renames it into place and moves `latest`. `files_synced`: the writer fsynced its files (DCP)."""
        self.wait()
        final = self.path_for(step, suffix)
        tmp = temp_path(final)
        if self.is_main:
            remove_path(tmp)
        barrier()
        try:
            write(tmp)
        except Exception as exn:  # a full or failing disk: one line (every rank hears it: job/failfast.py)
            cause = _os_error_behind(exn)
            if cause is None:
                raise
            if suffix:
                with contextlib.suppress(OSError):
                    remove_path(tmp)  # the partial file: on a full disk its space is what the job needs most
            raise CheckpointError(
                f"cannot write checkpoint {final.name}: {type(cause).__name__}: {cause}; the earlier checkpoints "
                "are intact"
            ) from None
        barrier()
        if not suffix:  # a folder (every rank wrote into it): each rank makes its own files durable, once
            shares = durability_shares(tmp, world_size(), files_synced) if self.is_main else None
            fsync_paths(tmp, scatter_object(shares))
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
            if self._intact(path):
                return path
        return None

    def rollback_target(self, before_step: int, also: Path | None = None) -> Path | None:
        """The newest intact checkpoint from before `before_step` (the first step of a loss spike):
        this run's own, else `also` (the checkpoint the run resumed from, maybe another run's)."""
        found = [p for p in self.candidates() if 0 <= step_of(p) < before_step]
        if also is not None and also not in found and 0 <= step_of(also) < before_step:
            found.append(also)
        for path in sorted(found, key=step_of, reverse=True):
            if self._intact(path):
                return path
        return self._rollback_target_in_bucket(before_step)

    def _intact(self, path: Path) -> bool:
        """Whether `path` matches its checksums (False: damaged, said in a warning); CheckpointUnreadable
        when it cannot be read: a failed read is no reason to pick an older checkpoint."""
        verdict = self._verify(path)
        if verdict and verdict[0] == "unreadable":
            raise CheckpointUnreadable(f"cannot read {path}: {verdict[1]}"[:600])
        if verdict:
            log.warning("checkpoint %s is damaged (%s); trying an older one", path.name, verdict[1])
        return verdict is None

    def _rollback_target_in_bucket(self, before_step: int) -> Path | None:
        """The newest checkpoint from before `before_step` in checkpoint.remote (a job requeued into an
        empty folder has only the latest here); restore() brings it."""
        if self.mirror is None:
            return None
        try:
            names = self.mirror.checkpoint_names()
        except Exception as exn:  # noqa: BLE001 - no rollback target: the guard says so
            log.warning("cannot list %s for a rollback target: %s: %s", self.cfg.remote, type(exn).__name__, exn)
            return None
        older = [n for n in names if 0 <= step_of(Path(n)) < before_step]
        self._from_bucket = older[-1] if older else None
        return self.dir / older[-1] if older else None

    # ---------------------------------------------------------------- resuming
    RESUMED_FROM = "resumed_from"  # the checkpoint.resume path this run directory already applied

    def plan_resume(self, resume: str) -> tuple[list[Path], bool]:
        """(checkpoints to try in order, whether `resume` named exactly one). `resume` is none, auto
        or any path form (find.py): a run or checkpoints folder or its `latest` means that run's
        newest, falling back to older ones. A path this run directory already resumed from (the same
        command, requeued) means this run's own newest (else every requeue would start over)."""
        if resume in ("", "none", None):
            return [], False
        if resume == "auto":
            return self.candidates(), False
        path = Path(resume)
        marker = self.dir / self.RESUMED_FROM
        if marker.is_file() and marker.read_text().strip() == str(path.resolve()) and self.all_checkpoints():
            log.info(
                "checkpoint.resume=%s was applied before in this run directory; continuing from its newest checkpoint",
                resume,
            )
            return self.candidates(), False  # (whether the checkpoint it named still exists or not)
        if not path.exists():
            raise CheckpointError(f"checkpoint.resume: no checkpoint at {resume}: expected {FORMS}")
        folder = checkpoints_folder(path)
        if folder is not None:
            if path.name == LATEST:
                named_target(path)  # the pointer names a checkpoint that is there
            found = CheckpointManager.reader(folder).candidates()
            if not found and path.name != "checkpoints":  # (an empty checkpoints folder: a first run)
                raise CheckpointError(f"checkpoint.resume: no checkpoint in {folder}: expected {FORMS}")
            if not found:
                log.warning("checkpoint.resume: %s holds no checkpoint yet: starting from scratch", folder)
            return found, False
        if path.is_dir() and not is_checkpoint_folder(path):
            raise CheckpointError(f"checkpoint.resume: {path} holds no checkpoint: expected {FORMS}")
        return [path], True  # (verified when it is loaded)

    def load(self, engine, resume: str) -> tuple[Path, dict] | None:
        """Collective: restore the engine from the checkpoint `resume` says (none | auto | a path) and
        return (its path, its train state), or None to start fresh. Under resume=auto a checkpoint its
        checksums or its format prove damaged is skipped for the one before it, on every rank alike
        (and kept in abandoned/ with a file saying why). A read that fails for a reason outside the
        checkpoint (an I/O error, no memory) is not damage: it is tried again, checkpoint.load_attempts
        times in all, then the run stops with CheckpointUnreadable (exit 74: requeue) and the
        checkpoint stays. A checkpoint of another model stops the run too."""
        self.fetch_remote(resume)
        plan, error = ([], False), None
        if self.is_main:
            try:
                plan = self.plan_resume(resume)
            except CheckpointError as exn:  # every rank must hear of it, not wait in the broadcast below
                error = (type(exn).__name__, str(exn))
            except READ_FAILURES as exn:
                error = ("CheckpointUnreadable", f"cannot list the checkpoints to resume: {type(exn).__name__}: {exn}")
        candidates, explicit, error = broadcast_object(([str(p) for p in plan[0]], plan[1], error))
        if error:
            raise {"CheckpointUnreadable": CheckpointUnreadable}.get(error[0], CheckpointError)(error[1][:600])
        damaged: dict[Path, str] = {}
        for i, path in enumerate(map(Path, candidates)):
            outcome, train_state = self._load_with_retries(engine, path)
            if outcome is None:
                if self.is_main:
                    self.abandon_after(path, damaged)
                    if resume != "auto":
                        atomic_write_bytes(self.dir / self.RESUMED_FROM, (str(Path(resume).resolve()) + "\n").encode())
                return path, train_state
            kind, text = outcome
            if kind == "mismatch":
                raise CheckpointMismatch(text)
            if kind == "unreadable":
                raise CheckpointUnreadable(
                    f"cannot read {path} ({self.cfg.load_attempts} attempt(s)): {text[:300]}; it is kept and "
                    f"tried again when the job runs again (exit code {CheckpointUnreadable.exit_code}: requeue)",
                    step=max(step_of(path), 0),
                )
            said = f"is damaged ({text})" if kind == "damaged" else f"could not be loaded ({text})"
            if explicit:
                what = f"{path} is damaged ({text})" if kind == "damaged" else f"cannot load {path}: {text}"
                raise CheckpointError(f"checkpoint.resume: {what}"[:600])
            damaged[path] = said
            later = "; falling back to the previous one" if i + 1 < len(candidates) else ""
            log.warning("checkpoint %s %s%s", path.name, said[:400], later)
        if candidates:
            raise CheckpointError(
                f"none of the {len(candidates)} checkpoint(s) in {self.dir} could be loaded; "
                f"set checkpoint.resume=none to start over (the old ones stay)"
            )
        return None

    def _load_with_retries(self, engine, path: Path) -> tuple[tuple[str, str] | None, dict | None]:
        """Collective: _try_load until it loads or fails for another reason than a read that failed,
        at most checkpoint.load_attempts times, waiting load_retry_wait_s, then twice as long..."""
        attempts = self.cfg.load_attempts
        for attempt in range(1, attempts + 1):
            outcome, train_state = self._try_load(engine, path)
            if outcome is None or outcome[0] != "unreadable" or attempt == attempts:
                return outcome, train_state
            wait = self.cfg.load_retry_wait_s * 2 ** (attempt - 1)
            if self.is_main:  # the outcome is every rank's (gathered): said once
                log.warning(
                    "checkpoint %s could not be read (%s); trying again in %.3g s (attempt %d of %d)",
                    path.name, outcome[1][:300], wait, attempt + 1, attempts,
                )  # fmt: skip
            time.sleep(wait)
        raise AssertionError("unreachable")

    def _try_load(self, engine, path: Path) -> tuple[tuple[str, str] | None, dict | None]:
        """Collective: one try at `path`: (None, its train state), or ((kind, why), None) alike on every
        rank, kind damaged (its checksums say so) | unloadable (its format: no checksums to ask) |
        unreadable | mismatch. The main rank verifies the checksums first (one read of the files, not
        one per rank)."""
        verdict = broadcast_object(self._verify(path) if self.is_main else None)
        if verdict:
            return verdict, None
        outcome, train_state = None, None
        try:
            train_state = engine.load(path)
        except CheckpointMismatch as exn:  # another model: no older checkpoint is better
            outcome = ("mismatch", str(exn))
        except CheckpointUnreadable as exn:
            outcome = ("unreadable", str(exn))
        except READ_FAILURES as exn:  # the storage or the machine, not the checkpoint (a missing file: damage)
            outcome = ("unreadable" if is_read_failure(exn) else "failed", f"{type(exn).__name__}: {exn}")
        except Exception as exn:  # noqa: BLE001 - damage, or a read that torch/DeepSpeed report as their own error
            outcome = ("failed", one_line(exn))
        reports = [r for r in all_gather_object(outcome) if r]
        if not reports:
            return None, train_state
        outcome = min(reports, key=lambda r: ("mismatch", "unreadable", "failed").index(r[0]))
        if outcome[0] == "failed":  # the files tell damage from a read that failed
            outcome = broadcast_object(self._why_it_failed(path, outcome[1]) if self.is_main else None)
        return outcome, None

    def _verify(self, path: Path) -> tuple[str, str] | None:
        """("damaged", why) when the checksums prove damage, ("unreadable", why) when the files cannot be
        read, None when they match (or there are none)."""
        try:
            problem = checksum_problem(path)
        except READ_FAILURES as exn:
            return ("unreadable", f"{type(exn).__name__} while verifying its checksums: {exn}")
        return ("damaged", problem) if problem else None

    def _why_it_failed(self, path: Path, error: str) -> tuple[str, str]:
        """A load that failed with an error of the loader's own: damage, unless the files match the
        checksums written when it was saved (then the read failed, or the machine: not the checkpoint)."""
        verdict = self._verify(path)
        if verdict:
            return verdict[0], f"{error}; {verdict[1]}"
        if checksum_path(path).is_file():
            return "unreadable", f"{error} (its files match their checksums: not damage)"
        return "unloadable", error  # no checksums to tell: the format says it is damaged

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
            error = self._bring(name, point_latest=True)
        if error:
            raise CheckpointError(f"cannot bring the latest checkpoint from {self.cfg.remote}: {error}"[:600])

    def bring_from_bucket(self, name: str) -> None:
        """Collective: the checkpoint `name` of checkpoint.remote into checkpoints/ on every node that
        lacks it (verified against its checksum file as it comes); a local copy the rollback search
        found damaged goes to abandoned/ first. CheckpointError on every rank if it cannot."""
        if self.is_main and (self.dir / name).exists():
            self._move_aside([self.dir / name], "damaged")
        error = self._bring(name, point_latest=False)
        if error:
            raise CheckpointError(f"cannot bring {name} from {self.cfg.remote}: {error}"[:600])

    def _bring(self, name: str, point_latest: bool) -> str | None:
        """Collective: download `name` where it is missing: the main rank first, then the first process
        of every node that does not see it (node-local run directories). The first error, on every rank."""
        error = None
        for turn in ("main", "others"):
            mine = self.is_main if turn == "main" else (self.local_main and not self.is_main)
            error = None
            if mine and not (self.dir / name).exists():
                try:
                    log.info("no %s in %s: downloading it from %s", name, self.dir, self.cfg.remote)
                    path = self.mirror.download(name, self.dir)
                    if point_latest:
                        atomic_write_bytes(self.dir / LATEST, (path.name + "\n").encode())
                except Exception as exn:  # noqa: BLE001
                    error = f"{type(exn).__name__}: {exn}"
            error = next((e for e in all_gather_object(error) if e), None)
            if error:
                break
        return error

    def _move_aside(self, paths: list[Path], why: str = "", reasons: dict[Path, str] | None = None) -> Path:
        """`paths` and their checksum files into checkpoints/abandoned/, stamped (nothing is deleted);
        `reasons`: a path's NAME.STAMP.why file says why it was moved."""
        aside = self.dir / "abandoned"
        aside.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S") + (f".{why}" if why else "")
        for path in paths:
            for item in (path, checksum_path(path)):
                if item.exists():
                    os.replace(item, aside / f"{item.name}.{stamp}")
            if reasons and path in reasons:
                atomic_write_bytes(aside / f"{path.name}.{stamp}.why", (reasons[path] + "\n").encode())
        return aside

    def abandon_after(self, resumed: Path, damaged: dict[Path, str] | None = None) -> None:
        """Move this run's checkpoints after `resumed` to checkpoints/abandoned/ (a rollback): `latest`,
        resume=auto and retention then only see the checkpoints of the history this run continues.
        Each gets a file saying why: `damaged`'s reason for those the resume skipped as damaged."""
        step = step_of(resumed)
        if step < 0:
            return
        later = [p for p in self.all_checkpoints() if step_of(p) > step]
        if not later:
            return
        damaged = {Path(p).resolve(): why for p, why in (damaged or {}).items()}
        reasons = {
            p: damaged[p.resolve()]
            if p.resolve() in damaged
            else f"later than {resumed.name}, the checkpoint the run went back to"
            for p in later
        }
        aside = self._move_aside(later, reasons=reasons)
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


def _os_error_behind(exn: BaseException) -> OSError | None:
    """The OSError that `exn` is or that led to it: torch.save on a full disk raises the write's
    OSError inside its zip writer, whose clean-up then raises a RuntimeError ("unexpected pos")."""
    seen = set()
    while exn is not None and id(exn) not in seen:
        if isinstance(exn, OSError):
            return exn
        seen.add(id(exn))
        exn = exn.__cause__ or exn.__context__
    return None
