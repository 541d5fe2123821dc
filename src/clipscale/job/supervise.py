"""The batch-shell side of a SLURM job: run the training step, forward preemption signals to it,
and requeue the job when the run was preempted rather than finished or failed.

`sbatch --signal=B:USR1@120` signals only the batch shell, never the srun/torchrun step, and a
shell that is waiting on a foreground command cannot act on it. So the sbatch scripts end with
`exec clipscale supervise --run-dir DIR -- srun ...`: this process becomes the batch shell, starts
the step, passes each signal on (srun forwards it to every task, torchrun to its workers, the
trainer checkpoints at the next step and writes status.json), waits, and then decides:

- the run finished or failed                          -> no requeue, exit with the step's code
- preempted by a requeue signal (SIGUSR1/SIGUSR2)     -> `scontrol requeue JOB`; the requeued job
  (also when we caught the signal and the step died      runs the same script and resumes with
  before writing status.json)                            checkpoint.resume=auto
- stopped by SIGTERM                                  -> no requeue: that is `scancel` (the user
                                                         means it) or SLURM's own preemption,
                                                         which requeues by itself (PreemptMode=REQUEUE)
- stopped by the hang watchdog (status `hung`)        -> requeue, unless the run hung
                                                         --max-hang-requeues times in a row without
                                                         getting past the step of the hang before
                                                         (RUN_DIR/hang/requeues.jsonl keeps count)
- a checkpoint could not be read (status `unreadable`: -> requeue (the same checkpoint is tried
  an I/O or memory error, not damage)                    again), bounded the same way
                                                         (RUN_DIR/hang/unreadable.jsonl)

torch-free, so the batch shell starts in a blink.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

from ..errors import EXIT_UNREADABLE
from ..metrics import append_line, read_jsonl
from .preempt import EXIT_PREEMPTED
from .status import read_status
from .watchdog import EXIT_HUNG, HANG_DIR

FORWARDED_SIGNALS = ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
# states that are requeued a bounded number of times in a row: (exit code, count file in RUN_DIR/hang/)
STUCK = {"hung": (EXIT_HUNG, "requeues.jsonl"), "unreadable": (EXIT_UNREADABLE, "unreadable.jsonl")}
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")


def slurm_job_key(env: Mapping[str, str]) -> str | None:
    """The id `scontrol requeue` takes: ARRAYID_TASKID for an array task, else the job id."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID") or None


def should_requeue(status: dict | None, caught: str | None, requeue_signals: Sequence[str]) -> bool:
    """The decision table of the module docstring."""
    state = status["state"] if status else None
    if state in ("finished", "failed"):
        return False
    if state in STUCK:
        return True  # bounded by Supervisor.hangs_in_a_row
    if state == "preempted":
        return (status.get("signal") or caught) in requeue_signals
    return caught in requeue_signals  # signalled, but the step ended before it could say so


class Supervisor:
    def __init__(
        self,
        command: Sequence[str],
        run_dir: Path,
        job_key: str | None = None,
        requeue_count: int = 0,
        requeue: bool = True,
        requeue_signals: Sequence[str] = REQUEUE_SIGNALS,
        requeue_command: Sequence[str] = ("scontrol", "requeue"),
        say: Callable[[str], None] = None,
        max_hang_requeues: int = 3,
    ):
        self.command, self.run_dir = list(command), Path(run_dir)
        self.job_key, self.requeue_count, self.requeue = job_key, requeue_count, requeue
        self.requeue_signals, self.requeue_command = tuple(requeue_signals), list(requeue_command)
        self._say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.max_hang_requeues = max_hang_requeues
        self.caught: str | None = None
        self.proc: subprocess.Popen | None = None
        self._pending: list[int] = []

    def say(self, message: str) -> None:
        prefix = f"job {self.job_key}" if self.job_key else "supervise"
        tag = f" requeue{self.requeue_count}" if self.requeue_count else ""
        self._say(f"{time.strftime('%H:%M:%S')} [{prefix}{tag}] clipscale supervise: {message}")

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.caught is None or name in self.requeue_signals:
            self.caught = name
        if self.proc is None:
            self._pending.append(signum)  # arrived before the step started: pass it on once it has
        elif self.proc.poll() is None:
            self.say(f"got {name}: passing it to the training step (it checkpoints and stops)")
            self.proc.send_signal(signum)

    def run(self) -> int:
        names = dict.fromkeys([*FORWARDED_SIGNALS, *self.requeue_signals])  # a requeue signal is forwarded too
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (getattr(signal, n) for n in names)}
        started = time.time()
        try:
            self.say(f"starting (run dir {self.run_dir}): {' '.join(self.command)}")
            try:
                self.proc = subprocess.Popen(self.command)
            except OSError as e:
                self.say(f"cannot start the training step: {e}")
                return 127
            for signum in self._pending:
                self.proc.send_signal(signum)
            code = self.proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        code = 128 - code if code < 0 else code  # killed by a signal: shell convention
        return self._after(code, read_status(self.run_dir, since=started))

    def _after(self, code: int, status: dict | None) -> int:
        where = f" at step {status.get('step')}" if status and "step" in status else ""
        state = status["state"] if status else "unknown (no fresh status.json)"
        self.say(f"training step exited with code {code}; run state: {state}{where}")
        if status and status["state"] == "finished":
            return 0
        if not should_requeue(status, self.caught, self.requeue_signals):
            return code or 1
        stuck = status["state"] if status and status["state"] in STUCK else None
        stopped, what = (STUCK[stuck][0], stuck) if stuck else (EXIT_PREEMPTED, "preempted")
        if stuck:
            times = self.hangs_in_a_row(int(status.get("step") or 0), STUCK[stuck][1])
            reports = self.run_dir / HANG_DIR
            said = "hung" if stuck == "hung" else "could not read its checkpoint"
            evidence = f"the stacks of each hang are in {reports}" if stuck == "hung" else status.get("error", "")
            if times > self.max_hang_requeues:
                self.say(
                    f"the run {said} {times} times in a row without getting past step {status.get('step')}: "
                    f"not requeued ({evidence})"
                )
                return stopped
            count = f"{times} in a row, at most {self.max_hang_requeues} are requeued"
            self.say(
                f"the hang watchdog stopped the run (hang {count}; stacks in {reports})"
                if stuck == "hung"
                else f"a checkpoint could not be read ({count})"
            )
        if not self.requeue or not self.job_key:
            self.say(
                f"{what}; not requeued (not a SLURM job or --no-requeue): run the "
                "same command again to resume from the latest checkpoint"
            )
            return stopped
        self.say(f"{what}{where}: requeueing job {self.job_key}")
        try:
            done = subprocess.run([*self.requeue_command, self.job_key], capture_output=True, text=True)
        except OSError as e:
            self.say(f"cannot requeue: {e} (is scontrol on PATH?); resubmit to resume")
            return stopped
        if done.returncode != 0:
            self.say(
                f"'{' '.join(self.requeue_command)} {self.job_key}' failed: "
                f"{(done.stderr or done.stdout).strip()}; resubmit to resume"
            )
            return stopped
        return 0

    def hangs_in_a_row(self, step: int, name: str = "requeues.jsonl") -> int:
        """Record this hang (or other stuck stop, counted in RUN_DIR/hang/`name`); the number of them
        since the run last got past the step of one."""
        log = self.run_dir / HANG_DIR / name
        log.parent.mkdir(parents=True, exist_ok=True)
        append_line(log, {"step": step, "time": time.time(), "job": self.job_key})
        streak, furthest = 0, -1
        for record in read_jsonl(log):
            streak = 1 if record["step"] > furthest else streak + 1
            furthest = max(furthest, record["step"])
        return streak
