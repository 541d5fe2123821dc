"""A chaos run: a real 2-rank torchrun job (gloo, CPU) under mixed faults injected at the boundary,
at seeded random steps; then a check that nothing was lost.

Faults (processes and signals are real; file-system faults come from tests/faults/sitecustomize.py,
a hook on `open`, never a patch of clipscale):
    kill-rank      SIGKILL of one rank                   stop-rank   SIGSTOP of one rank (a hang)
    kill-launcher  SIGKILL of torchrun (orphaned ranks)  preempt     SIGUSR1 to every process of the job
    eio-read       the restart's first read of its newest checkpoint fails with EIO
    enospc-save    the disk fills while a checkpoint is written (ENOSPC past a byte budget)
    spike          a stretch of poisoned data (captions naming the wrong colour) spikes the loss
    corrupt-shard  512 bytes of a shard overwritten      truncated-shard   a shard cut at 60 %
A job that stops is started again with checkpoint.resume=auto, as SLURM's requeue would (a fresh
launch after the whole process group is gone). Every launch has a deadline: past it, a hang.

Checks, per seed: the run finishes; every sample is seen once in its epoch (trained, or consumed
by the spike guard's skip) except the samples of the damaged shards, which a fault-free run on the
same shards misses too and which the run counts as skipped; every checkpoint of the schedule is
there and verifies, none moved aside as damaged; the status tells the story (preempted, hung,
failed with the full disk's line, rollbacks); no launch hit its deadline; and for the seed with
only kills, stops and preemptions, the final weights equal a fault-free run's bitwise.

    python benchmarks/chaos.py [--seeds 0 1 2] [--kills-only 2] [--steps 200] [--dir .bench/chaos]

Each seed gets every kind of fault (9), but the --kills-only seeds (default: the last of several)
get only kills, stops and preemptions. Prints, per seed, a table: fault, step, what the job did,
seconds to recover (from the fault until the job trained past that step again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

PROCESS_FAULTS = ["kill-rank", "kill-launcher", "stop-rank", "preempt", "eio-read", "enospc-save"]
DATA_FAULTS = ["spike", "corrupt-shard", "truncated-shard"]
KILLS_ONLY = ["kill-rank", "kill-launcher", "stop-rank", "preempt"]
EVERY = 5  # checkpoint.every_n_steps
PER_RANK, PER_SHARD = 8, 32  # global batch 16 over 2 ranks
HANG_S = 12
DEADLINE = -1000  # a launch's "exit code" when it was killed at its deadline (a hang)


def settings(run_dir: Path, shards: str, steps: int) -> list[str]:
    return [
        f"run.dir={run_dir}", f"data.train_shards={shards}", "model.name=clip-tiny", "model.precision=fp32",
        "train.device=cpu", f"data.batch_size={PER_RANK}", "data.workers=1", "data.shuffle_buffer=64",
        f"train.steps={steps}", f"checkpoint.every_n_steps={EVERY}", "checkpoint.keep_last=0",
        "checkpoint.resume=auto", "checkpoint.load_retry_wait_s=0.5", "logging.every_n_steps=1",
        "logging.progress=false", "logging.sample_keys=true", "schedule.warmup_steps=2", "optim.lr=2e-3",
        f"train.hang_timeout_s={HANG_S}", "train.spike_guard.factor=3.0", "train.spike_guard.window=10",
        "train.spike_guard.patience=3", "train.spike_guard.skip_batches=3", "train.spike_guard.max_rollbacks=3",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------- data
def shard_count(steps: int) -> int:
    """Two shards fewer than the run takes: it finishes its first epoch and starts the second."""
    return (steps * 2 * PER_RANK) // PER_SHARD - 2


def write_data(folder: Path, steps: int, poison: set[str], damage: dict) -> str:
    """A little less than steps x 16 colour/shape pairs in shards of PER_SHARD; the
    captions of `poison` name the wrong colour; then the damage (shard index -> "corrupt" or
    "truncated") is done to the files. Returns the brace pattern."""
    from clipscale.shards import write_shards

    from helpers import color_samples, with_wrong_colour

    n_shards = shard_count(steps)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    samples = (with_wrong_colour(s) if s["__key__"] in poison else s for s in color_samples(n_shards * PER_SHARD, 16))
    write_shards(samples, folder, "chaos", PER_SHARD)
    for index, how in damage.items():
        path = folder / f"chaos-{index:06d}.tar"
        data = bytearray(path.read_bytes())
        if how == "truncated":
            path.write_bytes(bytes(data[: int(len(data) * 0.6)]))
        else:  # corrupt: 512 bytes of noise in the middle (a header or an image, as it falls)
            middle = len(data) // 2
            data[middle : middle + 512] = random.Random(index).randbytes(512)
            path.write_bytes(bytes(data))
    return str(folder / f"chaos-{{000000..{n_shards - 1:06d}}}.tar")


def final_history(run_dir: Path) -> dict:
    """{(step, rank, skipped index or None): record} of the history that stands: a step trained again
    after a restart or a rollback replaces its earlier record."""
    from clipscale.metrics import read_sample_keys

    return {(r["step"], r["rank"], r.get("skipped")): r for r in read_sample_keys(run_dir)}


def delivered(run_dir: Path) -> dict[int, list[str]]:
    """{pass: every key delivered in it (trained or skipped by the guard)} of the standing history."""
    out: dict[int, list[str]] = {}
    for record in final_history(run_dir).values():
        for key, p in zip(record["keys"], record["passes"]):
            out.setdefault(p, []).append(key)
    return out


# ---------------------------------------------------------------------------------------------- job
@dataclass
class Launch:
    """One launch of the 2-rank job (torchrun, --max-restarts 0), in a process group of its own."""

    run_dir: Path
    args: list[str]
    faults: list[dict] = field(default_factory=list)

    def start(self, log: Path) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        if self.faults:
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests" / "faults"), env.get("PYTHONPATH", "")])
            env["CLIPSCALE_FAULTS"] = json.dumps(self.faults)
        cmd = [
            sys.executable, "-m", "clipscale.launch", "--nnodes=1", "--nproc-per-node=2", "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0", "--max-restarts=0", "--shutdown-timeout=60", "-m", "clipscale.train",
            *self.args,
        ]  # fmt: skip
        self.log = open(log, "a")  # noqa: SIM115
        self.started, self.wall_started, self.known = time.monotonic(), time.time(), set()
        self.proc = subprocess.Popen(
            cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT, env=env
        )

    def ranks(self) -> dict[int, int]:
        """{rank: pid} of the ranks (the launcher's children that run clipscale.train)."""
        import psutil

        out = {}
        for child in psutil.Process(self.proc.pid).children():
            try:
                if "clipscale.train" in " ".join(child.cmdline()):
                    out[int(child.environ().get("RANK", -1))] = child.pid
            except psutil.Error:
                continue
        return out

    def wait(self, deadline_s: float) -> int:
        """The launcher's exit code (DEADLINE: killed at the deadline); then nothing of the job is left."""
        try:
            code = self.proc.wait(timeout=max(1.0, deadline_s - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            code = DEADLINE
        self.reap()
        self.log.close()
        return code

    def tree(self) -> set[int]:
        """Every process of the job seen so far: torchrun starts each rank in a session of its own, so
        no process group holds them all (the launcher's, ranks, fork servers, workers)."""
        import psutil

        with contextlib.suppress(psutil.Error):
            self.known |= {self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))}
        return self.known

    def signal_all(self, sig: int) -> None:
        """What SLURM does: the signal to every process of the job."""
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def reap(self, grace_s: float = 10.0) -> None:
        """What a scheduler does when a job ends: whatever is left of its processes is killed."""
        end = time.monotonic() + grace_s
        while time.monotonic() < end and _alive(self.known):
            time.sleep(0.2)
        for pid in _alive(self.known):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()


def _alive(pids: set[int]) -> list[int]:
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
    return out


class Progress:
    """The step the job last logged (metrics.jsonl, read whole each time: a resumed job cuts the file
    back to its checkpoint's step before it appends)."""

    def __init__(self, run_dir: Path):
        self.path, self.step, self.written = run_dir / "metrics.jsonl", 0, 0.0

    def poll(self) -> int:
        try:
            self.written = self.path.stat().st_mtime
            lines = self.path.read_text().splitlines()
        except OSError:
            return self.step
        for line in reversed(lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # being written, or what a killed writer left
            if "loss" in record:
                self.step = int(record["step"])
                break
        return self.step


# ---------------------------------------------------------------------------------------------- plan
@dataclass
class Fault:
    kind: str
    step: int
    did: str = ""
    at: float | None = None  # when it struck (monotonic)
    recover_s: float | None = None


def plan(seed: int, steps: int, kinds: list[str], spike_at: int | None) -> list[Fault]:
    """The process faults at seeded steps, at least a checkpoint apart, clear of the spike's stretch."""
    rng = random.Random(seed)
    free = [s for s in range(12, steps - 6) if spike_at is None or not spike_at - 2 <= s <= spike_at + 8]
    for _ in range(1000):
        chosen = sorted(rng.sample(free, len(kinds)))
        if all(b - a > EVERY for a, b in zip(chosen, chosen[1:])):
            break
    else:
        raise SystemExit(f"{len(kinds)} faults do not fit in {steps} steps: give more --steps")
    order = kinds[:]
    rng.shuffle(order)
    return [Fault(kind, step) for kind, step in zip(order, chosen)]


# ---------------------------------------------------------------------------------------------- run
class Chaos:
    """The job run to its end through the planned process faults, restarted after each stop."""

    def __init__(self, run_dir: Path, shards: str, steps: int, faults: list[Fault], deadline_s: float):
        self.run_dir, self.shards, self.steps, self.deadline_s = run_dir, shards, steps, deadline_s
        self.todo = [f for f in faults if f.kind in PROCESS_FAULTS]
        self.progress, self.seen, self.launches, self.starts, self.floor = Progress(run_dir), [], [], [], 0
        self.log = run_dir.parent / f"{run_dir.name}.log"

    def run(self) -> None:
        armed: list[dict] = []
        while True:
            launch = Launch(self.run_dir, settings(self.run_dir, self.shards, self.steps), armed)
            fault = self.todo.pop(0) if self.todo else None
            if fault is not None and fault.kind == "enospc-save":
                target = -(-fault.step // EVERY) * EVERY
                fault.step = target
                launch.faults = [
                    *armed,
                    {"glob": f".step_{target:08d}.pt.tmp", "write_budget": 200_000, "error": "ENOSPC"},
                ]
            start_offset = self.log.stat().st_size if self.log.exists() else 0
            launch.start(self.log)
            self.starts.append((time.monotonic(), _step_of_latest(self.run_dir)))
            armed = self.strike(launch, fault)
            code = self.wait(launch)
            status = _read_json(self.run_dir / "status.json")
            text = self.log.read_text(errors="replace")[start_offset:]
            self.launches.append(
                {"code": code, "status": status, "log": text, "fault": fault, "eio": _reads_fail(launch.faults)}
            )
            if fault is not None:
                fault.did = _what_it_did(fault, code, status)
                if fault.at is None:  # (the full disk struck when the save failed: the launch's end)
                    fault.at = time.monotonic()
            if (
                code == DEADLINE
                or status.get("state") == "finished"
                or len(self.launches) > 3 * len(PROCESS_FAULTS) + 5
            ):
                return

    def strike(self, launch: Launch, fault: Fault | None) -> list[dict]:
        """Wait for the fault's step and inject it; the file-system rules the next launch gets."""
        if fault is None or fault.kind == "enospc-save":
            return []
        # in training, not start-up; and after the last fault's recovery (each gets its own)
        resumed = _step_of_latest(self.run_dir)
        if not self.follow(launch, max(fault.step, resumed + 2, self.floor)):
            return []
        fault.step, fault.at = self.progress.step, time.monotonic()
        self.floor = fault.step + 2
        launch.tree()  # (the orphans of a killed launcher must be known to be waited for)
        ranks = launch.ranks()
        victim = ranks.get(random.Random(fault.step).choice(sorted(ranks)), launch.proc.pid) if ranks else None
        if fault.kind == "kill-rank" and victim:
            os.kill(victim, signal.SIGKILL)
        elif fault.kind == "stop-rank" and victim:
            os.kill(victim, signal.SIGSTOP)
        elif fault.kind == "kill-launcher":
            os.kill(launch.proc.pid, signal.SIGKILL)
        elif fault.kind in ("preempt", "eio-read"):
            launch.signal_all(signal.SIGUSR1)
        if fault.kind != "eio-read":
            return []
        self.wait(launch)
        latest = (self.run_dir / "checkpoints" / "latest").read_text().strip()
        fault.did = f"preempted, then the restart's first read of {latest} failed with EIO"
        return [{"name": latest, "opens": [1], "error": "EIO"}]

    def follow(self, launch: Launch, step: int) -> bool:
        """Watch the job's steps (and their times) until `step`; False when it ended first."""
        end, last_tree = launch.started + self.deadline_s, 0.0
        while time.monotonic() < end:
            before = self.progress.step
            now = self.progress.poll()
            if now != before:
                self.seen.append((time.monotonic(), now))
            if now >= step and self.progress.written > launch.wall_started:  # (not what the last one left)
                return True
            if launch.proc.poll() is not None:
                return False
            if time.monotonic() - last_tree > 0.5:
                launch.tree()
                last_tree = time.monotonic()
            time.sleep(0.02)
        return False

    def wait(self, launch: Launch) -> int:
        if launch.proc.poll() is None:
            self.follow(launch, 10**9)
        return launch.wait(self.deadline_s)

    def recoveries(self, faults: list[Fault]) -> None:
        """Seconds from each fault until the job stood past its step again (a spike: from the rollback)."""
        for fault in faults:
            if fault.at is None:
                continue
            restart = next(((t, r) for t, r in self.starts if t > fault.at), None)  # what was logged after it
            past = None if restart is None else max(fault.step, restart[1])  # (a step it trained, not resumed at)
            later = [t for t, s in self.seen if restart is not None and t > restart[0] and s > past]
            fault.recover_s = (later[0] - fault.at) if later else None


def _step_of_latest(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip()[5:13])
    except (OSError, ValueError):
        return 0


def _reads_fail(rules: list[dict]) -> bool:
    return any(rule.get("error") == "EIO" for rule in rules)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _what_it_did(fault: Fault, code: int, status: dict) -> str:
    state = status.get("state", "?")
    said = {
        "kill-rank": "the other rank stopped",
        "kill-launcher": "the orphaned ranks stopped",
        "stop-rank": "the hang watchdog reported and stopped the job",
        "preempt": f"checkpointed at step {status.get('step')} and stopped",
        "enospc-save": f"the save failed with one line: {str(status.get('error', ''))[:70]}",
    }.get(fault.kind, "")
    prefix = f"{fault.did}; " if fault.did else ""
    return f"{prefix}{said}{'; ' if said else ''}exit {code}, status {state}"


# ---------------------------------------------------------------------------------------------- checks
def check(chaos: Chaos, faults: list[Fault], reference: Path, damaged_shards: list[int], bitwise: bool) -> list[str]:
    """What the run lost or got wrong (empty: nothing)."""
    run_dir, steps, problems = chaos.run_dir, chaos.steps, []
    status = _read_json(run_dir / "status.json")
    if (status.get("state"), status.get("step")) != ("finished", steps):
        problems.append(f"the run did not finish: status {status.get('state')} at step {status.get('step')}")
    problems += [f"launch {i} hit its deadline (a hang)" for i, x in enumerate(chaos.launches) if x["code"] == DEADLINE]
    problems += [f"{f.kind} at step {f.step} never struck" for f in faults if f.kind in PROCESS_FAULTS and f.at is None]
    problems += _check_samples(run_dir, reference, damaged_shards)
    problems += _check_checkpoints(run_dir, steps)
    problems += _check_story(chaos, faults, status)
    if bitwise and not problems:
        problems += _check_same_weights(run_dir, reference, steps)
    return problems


def _check_samples(run_dir: Path, reference: Path, damaged_shards: list[int]) -> list[str]:
    """Once per epoch each: the first epoch (which both runs finish) holds the fault-free run's samples,
    and those it lacks are the damaged shards', counted as skipped."""
    got, want = delivered(run_dir), delivered(reference)
    problems = [f"pass {p}: {len(k) - len(set(k))} samples seen twice" for p, k in got.items() if len(k) != len(set(k))]
    if 1 not in want:
        return [*problems, "the fault-free run did not finish its first epoch: give more --steps"]
    if set(got.get(0, [])) != set(want[0]):
        missing, extra = set(want[0]) - set(got.get(0, [])), set(got.get(0, [])) - set(want[0])
        problems.append(
            f"epoch 0: {len(missing)} samples missing, {len(extra)} unexpected (e.g. {sorted(missing)[:3]})"
        )
    lost = {f"s{i:06d}" for i in range(_samples_in(run_dir))} - set(want[0])
    outside = {k for k in lost if int(k[1:]) // PER_SHARD not in damaged_shards}
    if outside:
        problems.append(f"{len(outside)} samples of undamaged shards never seen (e.g. {sorted(outside)[:3]})")
    counted = _last_metric(run_dir, "skipped_samples") or 0
    if not lost or counted < len(lost):
        problems.append(f"the damaged shards: {len(lost)} samples unseen in epoch 0, {counted} counted as skipped")
    return problems


def _samples_in(run_dir: Path) -> int:
    config = (run_dir / "config.yaml").read_text()
    pattern = next(line for line in config.splitlines() if "chaos-{" in line)
    last = int(pattern.rsplit("..", 1)[1][:6])
    return (last + 1) * PER_SHARD


def _last_metric(run_dir: Path, key: str):
    from clipscale.metrics import read_jsonl

    values = [r[key] for r in read_jsonl(run_dir / "metrics.jsonl") if key in r]
    return values[-1] if values else None


def _check_checkpoints(run_dir: Path, steps: int) -> list[str]:
    from clipscale.checkpoint import checksum_problem

    folder, problems = run_dir / "checkpoints", []
    for step in range(EVERY, steps + 1, EVERY):
        path = folder / f"step_{step:08d}.pt"
        if not path.is_file():
            problems.append(f"checkpoint {path.name} is missing")
        elif checksum_problem(path):
            problems.append(f"checkpoint {path.name}: {checksum_problem(path)}")
    for why in (folder / "abandoned").glob("*.why") if (folder / "abandoned").is_dir() else []:
        if "damaged" in why.read_text() or "could not be loaded" in why.read_text():
            problems.append(f"a checkpoint was moved aside: {why.name}: {why.read_text().strip()[:200]}")
    if (folder / "latest").read_text().strip() != f"step_{steps:08d}.pt":
        problems.append(f"latest names {(folder / 'latest').read_text().strip()}")
    return problems


def _check_story(chaos: Chaos, faults: list[Fault], status: dict) -> list[str]:
    """Each stop ended with the state its fault calls for; the load retried after EIO; the spike's
    rollback is in the status with the steps it skipped."""
    expect = {"preempt": "preempted", "stop-rank": "hung", "enospc-save": "failed", "eio-read": "preempted"}
    problems = []
    for i, launch in enumerate(chaos.launches):
        fault = launch["fault"]
        state = launch["status"].get("state")
        if fault is not None and fault.kind in expect and state != expect[fault.kind]:
            problems.append(f"{fault.kind} at step {fault.step}: status {state}, expected {expect[fault.kind]}")
        if (
            fault is not None
            and fault.kind == "enospc-save"
            and "No space left" not in launch["status"].get("error", "")
        ):
            problems.append(f"the full disk's status does not say so: {launch['status'].get('error')}")
        if launch["eio"] and "could not be read" not in launch["log"]:
            problems.append(f"launch {i}: the EIO was not retried")
        if launch["eio"] and ("damaged" in launch["log"] or "falling back" in launch["log"]):
            problems.append(f"launch {i}: the EIO was taken for damage")
    spike = next((f for f in faults if f.kind == "spike"), None)
    if spike is not None:
        rolled = status.get("rollbacks") or []
        if not rolled:
            problems.append("the poisoned data caused no rollback")
        else:
            spike.step = rolled[0].get("step", spike.step)
            first = rolled[0]
            spike.did = (
                f"loss {first.get('loss', 0):.3g} > 3 x median {first.get('median', 0):.3g}: rolled back to step "
                f"{first.get('to_step')}, skipped the batches of steps {first.get('skipped_steps')}"
            )
    return problems


def _check_same_weights(run_dir: Path, reference: Path, steps: int) -> list[str]:
    """The final checkpoint's weights and optimizer moments, tensor by tensor, bitwise."""
    import torch

    name = f"checkpoints/step_{steps:08d}.pt"
    got, want = (torch.load(d / name, map_location="cpu", weights_only=False) for d in (run_dir, reference))
    differ = [
        path
        for part in ("state_dict", "optimizer")
        for path, (a, b) in _paired_tensors(got[part], want[part], part)
        if a.shape != b.shape or not torch.equal(a, b)
    ]
    return [f"final weights or moments differ from the fault-free run's: {differ[:3]}"] if differ else []


def _paired_tensors(a, b, path: str):
    """(path, (tensor, tensor)) of every tensor at the same place in two nested states."""
    import torch

    if isinstance(a, torch.Tensor):
        yield path, (a, b if isinstance(b, torch.Tensor) else torch.empty(0))
    elif isinstance(a, dict):
        for key in a:
            yield from _paired_tensors(a[key], b.get(key) if isinstance(b, dict) else None, f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        for k, item in enumerate(a):
            other = b[k] if isinstance(b, (list, tuple)) and k < len(b) else None
            yield from _paired_tensors(item, other, f"{path}[{k}]")


# ---------------------------------------------------------------------------------------------- seeds
@dataclass
class Outcome:
    seed: int
    faults: list[Fault]
    problems: list[str]
    launches: int
    seconds: float


def damage_plan(steps: int) -> dict[int, str]:
    """Which shards are damaged, and how: the same for every seed (their fault-free run is shared)."""
    n_shards = shard_count(steps)
    corrupt, truncated = random.Random(1234).sample(range(2, n_shards - 3), 2)
    return {corrupt: "corrupt", truncated: "truncated"}


def run_seed(seed: int, kinds: list[str], steps: int, folder: Path, reference: Path, deadline_s: float) -> Outcome:
    started = time.monotonic()
    damage = damage_plan(steps)
    spike_at, shards = None, _base_shards(folder, steps)
    if "spike" in kinds:
        spike_at = random.Random(seed).randrange(max(25, steps // 3), steps - 25)
        history = final_history(reference)
        poison = {k for (s, _, skipped), r in history.items() if spike_at <= s < spike_at + 3 and skipped is None
                  for k in r["keys"] if int(k[1:]) // PER_SHARD not in damage}  # fmt: skip
        shards = write_data(folder / f"seed{seed}-shards", steps, poison, damage)
    faults = plan(seed, steps, [k for k in kinds if k in PROCESS_FAULTS], spike_at)
    faults += _data_faults(kinds, reference, damage, spike_at)
    run_dir = folder / f"seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    chaos = Chaos(run_dir, shards, steps, faults, deadline_s)
    chaos.run()
    problems = check(chaos, faults, reference, list(damage), bitwise="spike" not in kinds)
    chaos.recoveries([f for f in faults if f.kind in PROCESS_FAULTS])
    _spike_recovery(chaos, faults)
    faults.sort(key=lambda f: f.step)
    return Outcome(seed, faults, problems, len(chaos.launches), time.monotonic() - started)


def _base_shards(folder: Path, steps: int) -> str:
    done = folder / f"base-shards-{steps}" / ".complete"
    if not done.is_file():
        pattern = write_data(done.parent, steps, set(), damage_plan(steps))
        done.write_text(pattern)
    return done.read_text()


def _data_faults(kinds: list[str], reference: Path, damage: dict[int, str], spike_at: int | None) -> list[Fault]:
    """The data's own faults, at the step where the fault-free run first read the damaged shard."""
    out = []
    history = final_history(reference)
    seen = delivered(reference).get(0, [])
    for index, how in damage.items():
        kind = f"{how}-shard"
        if kind not in kinds:
            continue
        steps = [s for (s, _, _), r in history.items() if any(int(k[1:]) // PER_SHARD == index for k in r["keys"])]
        unseen = PER_SHARD - sum(1 for k in seen if int(k[1:]) // PER_SHARD == index)
        out.append(
            Fault(
                kind,
                min(steps) if steps else 0,
                f"shard {index}: {unseen} samples skipped and counted; training went on",
                recover_s=0.0,
            )
        )
    if spike_at is not None:
        out.append(Fault("spike", spike_at + 2, "no rollback"))
    return out


def _spike_recovery(chaos: Chaos, faults: list[Fault]) -> None:
    """From the rollback (the step count falling back) until the job stood past the spike's step."""
    spike = next((f for f in faults if f.kind == "spike"), None)
    if spike is None:
        return
    for (_, s0), (t1, s1) in zip(chaos.seen, chaos.seen[1:]):
        if s0 >= spike.step - 2 and s1 < s0 - 1:  # (the step that tripped the guard is not logged)
            later = [t for t, s in chaos.seen if t > t1 and s > s0]
            spike.recover_s = (later[0] - t1) if later else None
            return


def reference_run(folder: Path, steps: int, deadline_s: float) -> Path:
    """The fault-free run on the damaged shards (what every sample check compares with), made once."""
    run_dir = folder / f"reference-{steps}"
    if _read_json(run_dir / "status.json").get("state") != "finished":
        shutil.rmtree(run_dir, ignore_errors=True)
        chaos = Chaos(run_dir, _base_shards(folder, steps), steps, [], deadline_s)
        chaos.run()
        if chaos.launches[-1]["status"].get("state") != "finished":
            raise SystemExit(f"the fault-free run failed: see {chaos.log}")
    return run_dir


def table(outcome: Outcome) -> str:
    lines = [
        f"seed {outcome.seed}: {len(outcome.faults)} faults, {outcome.launches} launches, {outcome.seconds:.0f} s; "
        + ("nothing lost" if not outcome.problems else "PROBLEMS: " + "; ".join(outcome.problems)),
        f"  {'fault':<16} {'step':>5}  {'recovered in':>12}  what the job did",
    ]
    for f in outcome.faults:
        took = "-" if f.recover_s is None else f"{f.recover_s:.1f} s"
        lines.append(f"  {f.kind:<16} {f.step:>5}  {took:>12}  {f.did}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--deadline-s", type=float, default=600, help="per launch: past it, a hang")
    parser.add_argument("--dir", type=Path, default=ROOT / ".bench" / "chaos")
    parser.add_argument(
        "--kills-only",
        type=int,
        nargs="*",
        help="seeds with only kills, stops and preemptions "
        "(compared bitwise with the fault-free run); default: the last of several --seeds",
    )
    args = parser.parse_args()
    if args.kills_only is None:
        args.kills_only = args.seeds[-1:] if len(args.seeds) > 1 else []
    args.dir.mkdir(parents=True, exist_ok=True)
    reference = reference_run(args.dir, args.steps, args.deadline_s)
    outcomes = []
    for seed in args.seeds:
        kills = seed in args.kills_only
        kinds = KILLS_ONLY + ["kill-rank", "preempt"] if kills else PROCESS_FAULTS + DATA_FAULTS
        outcomes.append(run_seed(seed, kinds, args.steps, args.dir, reference, args.deadline_s))
        same = "\n  final weights and optimizer moments bitwise equal to the fault-free run's"
        print(table(outcomes[-1]) + (same if kills and not outcomes[-1].problems else ""), flush=True)
    sys.exit(1 if any(o.problems for o in outcomes) else 0)


if __name__ == "__main__":
    main()
