"""The batch layout: how one optimizer step's samples are spread over ranks, micro-batches and
DataLoader workers. Computed once (BatchLayout.of) and handed to every component that needs it."""

from __future__ import annotations

from dataclasses import dataclass, replace


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


@dataclass(frozen=True)
class Stage:
    """One training stage as it runs: its index, the optimizer steps it covers, and its settings (every value
    carried over from the stage before when the config leaves it unset)."""

    index: int
    ends_after: int
    """The last optimizer step (1-based) of the stage."""
    patch_dropout: float
    lr_scale: float
    global_batch: int
    """Samples per optimizer step in this stage."""
    image_size: int | None = None
    """The image side (None: the model's own)."""
    context_length: int | None = None
    """Text tokens (None: the model's own)."""
    starts_after: int = 0
    """The last step of the stage before (0 for the first)."""
    samples_before: int = 0
    """Samples trained in the stages before."""

    def samples_through(self, step: int) -> int:
        """Samples trained from the start of the run to the end of optimizer step `step` (within this stage)."""
        return self.samples_before + (step - self.starts_after) * self.global_batch


def resolve_stages(
    stages: list,
    patch_dropout: float,
    global_batch: int,
    total_steps: int,
    micro_batches: int = 1,
    trained: list[Stage] | None = None,
    step: int = 0,
) -> list[Stage]:
    """schedule.stages as steps (an until_samples rounded up to whole global batches of its stage) with every
    value carried over; [] without stages. `micro_batches` (world size x accumulation) must divide every
    batch_size. A resumed run passes the list its checkpoint `trained` with and its `step`: the steps trained
    keep the boundaries and batches they had (a job at another world size has another global batch, which
    would move a boundary in samples), the rest is resolved from the samples trained so far. Raises
    ValueError with the one-line reason for a list that cannot run."""
    out, first, previous, samples = _trained_part(trained, step, len(stages)) if trained and step > 0 else ([], 0, 0, 0)
    if out and step >= total_steps:
        return out
    dropout, scale, batch, image, context = patch_dropout, 1.0, global_batch, None, None
    for i, st in enumerate(stages):
        where = f"schedule.stages[{i}]"
        if st.until_step is not None and st.until_samples is not None:
            raise ValueError(f"'{where}': give until_step or until_samples, not both")
        for key in ("batch_size", "image_size", "context_length"):
            if getattr(st, key) is not None and getattr(st, key) < 1:
                raise ValueError(f"'{where}.{key}' must be a positive number, got {getattr(st, key)}")
        batch = st.batch_size or batch
        if st.batch_size and batch % micro_batches:
            raise ValueError(f"'{where}': a global batch of {batch} does not split into the {micro_batches} "
                             "micro-batches of a step (world size x optim.accum_steps)")  # fmt: skip
        dropout = st.patch_dropout if st.patch_dropout is not None else dropout
        scale = st.lr_scale if st.lr_scale is not None else scale
        image, context = st.image_size or image, st.context_length or context
        if not 0 <= dropout < 1 or scale <= 0:
            raise ValueError(f"'{where}': patch_dropout must be in [0, 1) and lr_scale > 0 (got {dropout}, {scale})")
        if i < first:
            continue  # trained already, as `trained` says
        if st.until_samples is not None:
            end = previous + max(0, -(-(st.until_samples - samples) // batch))
        elif st.until_step is not None:
            end = st.until_step
        elif i == len(stages) - 1:
            end = total_steps
        else:
            raise ValueError(f"'{where}': a stage before the last needs until_step or until_samples")
        if end <= previous or end > total_steps:
            raise ValueError(f"'{where}' ends after step {end}: boundaries must increase, from above {previous} "
                             f"to at most train.steps={total_steps}")  # fmt: skip
        out.append(Stage(i, end, dropout, scale, batch, image, context, previous, samples))
        samples += (end - previous) * batch
        previous = end
    if out and out[-1].ends_after < total_steps:
        raise ValueError(f"schedule.stages end after step {out[-1].ends_after}, before train.steps={total_steps}: "
                         "let the last stage run to the end (no until_step)")  # fmt: skip
    return _joined(out)


def _joined(stages: list[Stage]) -> list[Stage]:
    """Pieces of one stage that a resume cut but that run alike (the same batch) as one stage again."""
    out: list[Stage] = []
    for s in stages:
        if out and replace(out[-1], ends_after=s.ends_after) == replace(
            s, starts_after=out[-1].starts_after, samples_before=out[-1].samples_before
        ):
            out[-1] = replace(out[-1], ends_after=s.ends_after)
        else:
            out.append(s)
    return out


def _trained_part(trained: list[Stage], step: int, count: int) -> tuple[list[Stage], int, int, int]:
    """(the stages up to `step` as trained, the piece in progress cut at `step`; the index of the first stage
    still to resolve; its first step's predecessor; the samples trained by then)."""
    done = [s for s in trained if s.starts_after < step]
    out = [replace(s, ends_after=min(s.ends_after, step)) for s in done]
    current = done[-1]
    last = current.index == count - 1  # runs to train.steps, which may have grown since
    first = current.index + (1 if current.ends_after <= step and not last else 0)
    return out, first, step, current.samples_through(step)


def stage_at(stages: list[Stage], step: int) -> Stage | None:
    """The stage optimizer step `step` (1-based) trains in; None without stages. Step 0 (nothing trained yet)
    is in the first stage."""
    return next((s for s in stages if step <= s.ends_after), stages[-1] if stages else None)
