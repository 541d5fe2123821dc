"""Running one training job on this rank: logging, the process group, the Trainer, and what a
failure leaves behind (status.json says failed, or hung when another rank's watchdog stopped it).

`clipscale train --config X.yaml [key=value ...]` and
`torchrun --nproc_per_node=N -m clipscale.train --config X.yaml [key=value ...]` both end here.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from ..config import Config, add_config_arguments, load_config
from ..errors import CheckpointUnreadable, UserError, one_line, run_command
from ..job import workers
from ..job.distributed import LaunchInfo, cleanup, detect_launch, init_distributed
from ..job.failfast import FailFast
from ..job.lease import RunFolderInUse
from ..job.preempt import EXIT_PREEMPTED
from ..job.proc import exit_when_parent_dies
from ..job.status import read_status, write_status
from ..job.watchdog import EXIT_HUNG
from .trainer import Trainer

log = logging.getLogger("clipscale")


def setup_logging(launch: LaunchInfo) -> None:
    """clipscale's messages at INFO on rank 0 (WARNING elsewhere); other libraries at WARNING."""
    counts = [
        f"requeue{launch.requeue_count}" if launch.requeue_count else "",
        f"restart{launch.restart_count}" if launch.restart_count else "",
    ]
    prefix = "[" + " ".join([f"rank{launch.rank}", *filter(None, counts)]) + "]"
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s {prefix} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    logging.getLogger("clipscale").setLevel(logging.INFO if launch.rank == 0 else logging.WARNING)


def train(cfg: Config) -> dict:
    setup_logging(detect_launch())
    if cfg.data.workers or cfg.eval.workers:
        workers.start_early()  # before any thread (process group, watchdog...): workers never fork a threaded process
    if cfg.train.deterministic:
        deterministic_kernels()
    env = init_distributed(cfg.train.device, cfg.engine.dist_timeout_s)
    if env.launcher != "none":  # a rank of torchrun or srun: it must not train on as an orphan
        exit_when_parent_dies(f"rank {env.rank}")
    fail_fast = FailFast(env.rank, env.world_size, Path(cfg.run.dir), env.restart_count)
    trainer = None
    started = time.time()
    try:
        trainer = Trainer(cfg, env)
        result = trainer.fit()
        fail_fast.close()  # every rank is past the run's last collective: rank 0 (maybe the store) may leave
        return result
    except UserError as exn:  # this rank's one line is every rank's, whatever collective they wait in
        fail_fast.announce(exn.exit_code, str(exn))
        if isinstance(exn, RunFolderInUse):  # the folder is another job's: write nothing into it
            raise
        if isinstance(exn, CheckpointUnreadable) and env.is_main:  # requeue: the checkpoint is tried again
            write_status(Path(cfg.run.dir), "unreadable", step=exn.step, error=str(exn)[:500])
        elif trainer is not None:
            trainer.write_status("failed", error=f"{type(exn).__name__}: {exn}"[:500])
        raise
    except Exception as exn:
        cause = fail_fast.cause()  # this rank's collective may have failed because another rank left
        if cause is not None:
            fail_fast.stop_as(*cause)
        if trainer is not None and trainer.preempt.requested:  # signalled, and a rank stuck in C left first
            return preempted_without_checkpoint(trainer, exn, fail_fast)
        fail_fast.announce(1, f"rank {env.rank}: {one_line(exn)}")
        if trainer is None:
            raise
        with trainer.watchdog.allow("failure"):  # a stuck file system here must not hang the job
            if hung_elsewhere(trainer.run_dir, started):
                # another rank's watchdog reported a hang and exited; this rank's collective failed with it
                log.error("%s: another rank was stopped as hung (status.json); exiting with code %d", exn, EXIT_HUNG)
                return {"step": trainer.step, "preempted": False, "exit_code": EXIT_HUNG}
            trainer.write_status("failed", error=f"{type(exn).__name__}: {exn}"[:500])
        raise
    except BaseException as exn:
        if trainer is not None:
            with trainer.watchdog.allow("failure"):
                trainer.write_status("failed", error=f"{type(exn).__name__}: {exn}"[:500])
        raise
    finally:
        fail_fast.close()
        if trainer is not None:
            with trainer.watchdog.allow("shutdown"):
                trainer.data.close()
                cleanup()
            trainer.close()
        else:
            cleanup()


def preempted_without_checkpoint(trainer: Trainer, exn: Exception, fail_fast: FailFast) -> dict:
    """This rank took a preemption signal, but a collective broke before the checkpoint: another rank,
    stuck in C, left on its own (job/preempt.py). Still preempted (requeue), from the last checkpoint."""
    signal = trainer.preempt.received
    line = (
        f"preempted by {signal} after step {trainer.step}, but another rank left before the checkpoint "
        f"({type(exn).__name__}); the requeued job resumes from the last one"
    )
    fail_fast.announce(EXIT_PREEMPTED, line)
    log.error("%s", line)
    with trainer.watchdog.allow("failure"):
        trainer.write_status("preempted", signal=signal, checkpointed=False, error=line[:500])
    return {"step": trainer.step, "preempted": True, "exit_code": EXIT_PREEMPTED}


def hung_elsewhere(run_dir: Path, since: float) -> bool:
    """Whether a watchdog of this run (another rank's) marked it hung since `since`."""
    status = read_status(run_dir, since=since)
    return bool(status and status["state"] == "hung")


def main(argv: list[str] | None = None) -> int:
    """Entry point for `python -m clipscale.train` / torchrun: the same as `clipscale train`."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m clipscale.train", description="Train a CLIP model.")
    add_config_arguments(parser)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(lambda: train(load_config(args.config, args.overrides))["exit_code"])


def deterministic_kernels() -> None:
    """train.deterministic: the same step computes the same bits on a GPU (cuBLAS with a fixed workspace,
    no atomics in backward kernels, attention through the math path), so a resumed run can be compared
    with an uninterrupted one. Set before the first CUDA call; costs speed. CPU runs are deterministic
    already."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


if __name__ == "__main__":
    sys.exit(main())
