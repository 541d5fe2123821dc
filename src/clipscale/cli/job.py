"""Commands of the job's life, run by a batch shell (no torch): supervise and status."""

from __future__ import annotations

import argparse

from ..errors import UserError


def cmd_supervise(args) -> int:
    import os

    from ..config import signal_name
    from ..job.supervise import Supervisor, slurm_job_key

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UserError(
            "supervise needs the training command after '--', e.g. "
            "clipscale supervise --run-dir runs/x -- srun python -m clipscale.train ..."
        )
    signals = [signal_name(s, "--requeue-on") for s in args.requeue_on.split(",") if s.strip()]
    return Supervisor(
        command,
        args.run_dir,
        job_key=slurm_job_key(os.environ),
        requeue_count=int(os.environ.get("SLURM_RESTART_COUNT") or 0),
        requeue=not args.no_requeue,
        requeue_signals=signals,
        max_hang_requeues=args.max_hang_requeues,
    ).run()


def add_supervise(sub) -> None:
    """clipscale supervise --run-dir DIR -- srun ... (the SLURM batch shell's side)"""
    p = sub.add_parser(
        "supervise",
        help="run a training step inside a SLURM batch script; requeue on preemption",
        description="Run COMMAND (srun/torchrun ... clipscale.train), pass SIGUSR1/SIGUSR2/SIGTERM "
        "on to it, and when the run was preempted by a requeue signal, or stopped by the hang "
        "watchdog, requeue the SLURM job with scontrol (see slurm/README.md).",
    )
    p.add_argument("--run-dir", required=True, help="the run directory (its status.json says how the run ended)")
    p.add_argument(
        "--requeue-on",
        default="SIGUSR1,SIGUSR2",
        help="signals that mean 'checkpoint and requeue' (default SIGUSR1,SIGUSR2; SIGTERM never "
        "requeues: it is scancel, or SLURM preemption that requeues by itself)",
    )
    p.add_argument("--no-requeue", action="store_true", help="checkpoint and stop, but do not requeue")
    p.add_argument(
        "--max-hang-requeues",
        type=int,
        default=3,
        help="requeue a run the hang watchdog stopped (status hung) at most this many times in a row "
        "without progress past the step of the previous hang; then the job fails (default 3)",
    )
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(func=cmd_supervise)


def cmd_status(args) -> int:
    import json

    from ..job.status import read_status

    status = read_status(args.run_dir)
    if status is None:
        raise UserError(f"{args.run_dir} has no readable status.json (has the run started?)")
    if args.field:
        print(status.get(args.field, ""))
    else:
        print(json.dumps(status, indent=1))
    return 0


def add_status(sub) -> None:
    """clipscale status RUN_DIR [--field F]"""
    p = sub.add_parser(
        "status",
        help="print a run's status.json (state, step, restarts)",
        description="Print RUN_DIR/status.json: running | finished | preempted | failed, the step, "
        "the signal and the restart/requeue counts.",
    )
    p.add_argument("run_dir", help="run directory")
    p.add_argument("--field", help="print only this field (e.g. state, step)")
    p.set_defaults(func=cmd_status)
