"""The batch layout: how one optimizer step's samples are spread over ranks, micro-batches and
DataLoader workers. Computed once (BatchLayout.of) and handed to every component that needs it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    per_rank_batch: int
    """Samples in one rank's micro-batch (data.batch_size)."""
    world_size: int
    """Ranks (processes) of the job."""
    accum_steps: int
    """Micro-batches per rank in one optimizer step (optim.accum_steps)."""
    workers: int
    """Data streams per rank: DataLoader workers, at least 1 (0 workers read in the rank itself)."""

    @classmethod
    def of(cls, data_cfg, optim_cfg, world_size: int) -> BatchLayout:
        return cls(data_cfg.batch_size, world_size, optim_cfg.accum_steps, max(1, data_cfg.workers))

    @property
    def micro_batches(self) -> int:
        """Micro-batches in one optimizer step, over all ranks."""
        return self.world_size * self.accum_steps

    @property
    def global_batch(self) -> int:
        """Samples in one optimizer step: the batch the loss is computed over."""
        return self.per_rank_batch * self.micro_batches

    @property
    def streams(self) -> int:
        """Data streams of the job (world size x workers): the unit the data is dealt to."""
        return self.world_size * self.workers

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch} ({self.per_rank_batch} x {self.world_size} ranks x "
            f"{self.accum_steps} accum), {self.streams} data streams"
        )
