"""Training stages as a run sees them (schedule.stages): what each stage asks of the model (image side, text
tokens), of the data (global batch, crops, tokenizer) and what it reports (metrics, status). The trainer
applies them at a boundary; everything here follows from the stage alone, so a resume at any step agrees."""

from __future__ import annotations

import functools
import logging
from dataclasses import replace

from ..config import BatchLayout, Config
from ..config.layout import Stage, stage_at
from ..data.samples import draft_size
from ..engine.base import training_stages
from ..errors import ConfigError
from ..model import ModelBundle, input_size, transforms_for

log = logging.getLogger(__name__)


class StagePlan:
    def __init__(self, cfg: Config, stages: list[Stage], bundle: ModelBundle, layout: BatchLayout):
        """`bundle`: the model as built (its own input size is what stages without one use); `layout`: the
        job's batch layout from the config (a stage's batch keeps its ranks and accumulation)."""
        self.cfg, self.stages, self.bundle, self.layout = cfg, stages, bundle, layout
        model = bundle.model
        self.base_inputs = (input_size.image_size(model), input_size.context_length(model))

    def first(self) -> Stage | None:
        """The first stage (None without stages), with the fresh model brought to its input size (before its
        engine exists: nothing else holds the parameters yet). Sizes the model cannot take stop here."""
        if not self.stages:
            return None
        model = self.bundle.model
        images, contexts = {s.image_size for s in self.stages}, {s.context_length for s in self.stages}
        why = input_size.check_sizes(model, images, contexts)
        if why:
            raise ConfigError(f"schedule.stages: {self.cfg.model.name}: {why}")
        first = stage_at(self.stages, 1)
        input_size.resize_inputs(model, *self.inputs_of(first))
        return first

    def keep_trained(self, trained: list[Stage], step: int) -> bool:
        """A resume at `step` of a checkpoint that `trained` with those stages: their boundaries up to `step`
        stand (in place: the schedule reads the same list), the rest follows from the samples trained so far.
        True when the boundaries moved."""
        resolved = training_stages(self.cfg, self.layout, trained, step)
        if resolved == self.stages:
            return False
        self.stages[:] = resolved
        log.info("stage boundaries from step %d: %s", step, ", ".join(f"stage {s.index + 1} to step "
                 f"{s.ends_after} at batch {s.global_batch}" for s in resolved if s.ends_after > step))  # fmt: skip
        return True

    @property
    def count(self) -> int:
        """Stages of the config (a resume at another batch may cut one into two pieces of the same index)."""
        return self.stages[-1].index + 1 if self.stages else 0

    def at_step(self, step: int) -> Stage | None:
        """The stage optimizer step `step` trains in (step 0: the first)."""
        return stage_at(self.stages, max(step, 1))

    def inputs_of(self, stage: Stage | None) -> tuple[int | None, int | None]:
        """(image side, text tokens) of a stage: its own, else the model's as built."""
        image, context = self.base_inputs
        return (stage.image_size or image, stage.context_length or context) if stage is not None else (image, context)

    def layout_of(self, stage: Stage | None) -> BatchLayout:
        """The batch layout of a stage: its global batch over the job's ranks and accumulation."""
        if stage is None or stage.global_batch == self.layout.global_batch:
            return self.layout
        return replace(self.layout, per_rank_batch=stage.global_batch // self.layout.micro_batches)

    def data_key_of(self, stage: Stage | None) -> tuple:
        """What the data stream depends on: a new key at a boundary means new data settings."""
        return (self.layout_of(stage).global_batch, *self.inputs_of(stage))

    def data_settings(self, stage: Stage | None) -> tuple:
        """(layout, training transform, tokenizer, JPEG draft size) of a stage, for the model as it is now."""
        cfg, bundle, (image, context) = self.cfg, self.bundle, self.inputs_of(stage)
        transform = bundle.train_transform
        if image != self.base_inputs[0]:
            transform = transforms_for(bundle.model, cfg.data.augment)[0]
        tokenizer = bundle.tokenizer
        if context != self.base_inputs[1]:
            tokenizer = functools.partial(tokenizer, context_length=context)
        draft = draft_size(image or bundle.image_size, cfg.data.augment) if cfg.data.jpeg_draft else None
        return self.layout_of(stage), transform, tokenizer, draft

    def eval_transform(self, stage: Stage | None):
        """The evaluation transform at a stage's image side."""
        resized = self.inputs_of(stage)[0] != self.base_inputs[0]
        return transforms_for(self.bundle.model)[1] if resized else self.bundle.val_transform

    def samples_through(self, step: int, global_batch: int) -> int:
        """Samples trained from the start of the run to the end of `step` (each stage at its own batch)."""
        stage = stage_at(self.stages, step)
        return stage.samples_through(step) if stage is not None else step * global_batch

    def fields(self, stage: Stage | None) -> dict:
        """The stage in a metrics record."""
        if stage is None:
            return {}
        image, context = self.inputs_of(stage)
        return {
            "stage": stage.index, "stage/patch_dropout": stage.patch_dropout, "stage/lr_scale": stage.lr_scale,
            "stage/image_size": image, "stage/context_length": context, "stage/global_batch": stage.global_batch,
        }  # fmt: skip

    def status(self, stage: Stage | None) -> dict:
        """The stage and the next boundary in status.json."""
        if stage is None:
            return {}
        image, context = self.inputs_of(stage)
        current = {"index": stage.index, "of": self.count, "patch_dropout": stage.patch_dropout,
                   "lr_scale": stage.lr_scale, "global_batch": stage.global_batch, "image_size": image,
                   "context_length": context, "ends_after": stage.ends_after}  # fmt: skip
        return {"stage": current, "next_boundary": stage.ends_after if stage.index + 1 < self.count else None}
