"""The job's life, below the training loop: the launcher's environment and process group
(`distributed`), preemption signals (`preempt`), the hang watchdog (`watchdog`), the loss-spike guard
(`guard`), the run's status file (`status`), child processes that die with their parent (`proc`),
and the two programs around a training step: `launch` (torchrun with one-line endings) and
`supervise` (the SLURM batch shell's side: forward signals, requeue).

Light on purpose: `clipscale supervise` and `clipscale status` run in a batch shell and load no torch.
"""
