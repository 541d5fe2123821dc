"""Distillation from a frozen teacher (OpenCLIP's `--distill-model`): its logits over the global
batch are soft targets for the student's.

    loss = contrastive + distill.weight x (CE(softmax(teacher image->text logits), student's)
                                          + CE(softmax(teacher text->image logits), student's)) / 2

as open_clip's DistillClipLoss. The teacher is any open_clip model from a local checkpoint, in eval
mode, frozen, run under the student's autocast; its features are gathered across ranks exactly as
the student's, and each rank takes its own rows of the [B, B] logits (the mean over ranks is the
loss of the global batch, as every clipscale loss). The teacher reads the student's token ids, so
both must share a tokenizer and context length; its embedding size may differ (only logits meet).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import DistillConfig, ModelConfig
from ..errors import ConfigError
from ..model import ModelBundle, create_model
from .gather import Gather

TEACHER_KEYS = ("teacher_image_features", "teacher_text_features", "teacher_logit_scale")


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """open_clip's DistillClipLoss.dist_loss: mean over rows of -sum softmax(teacher) log softmax(student)."""
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)


class DistillLoss(nn.Module):
    """The contrastive loss plus the weighted distillation term; takes the teacher's features after the student's."""

    uses_bias = False
    uses_teacher = True

    def __init__(self, contrastive: nn.Module, weight: float, gather: Gather | None = None):
        super().__init__()
        self.contrastive, self.weight = contrastive, weight
        self.gather = gather or Gather()

    def forward(self, image_features, text_features, logit_scale, t_image, t_text, t_scale):
        all_img, all_txt = self.gather.pair(image_features, text_features)
        with torch.no_grad():
            t_all_img, t_all_txt = self.gather.pair(t_image, t_text)
        distill = (
            soft_cross_entropy(t_scale * t_image @ t_all_txt.T, logit_scale * image_features @ all_txt.T)
            + soft_cross_entropy(t_scale * t_text @ t_all_img.T, logit_scale * text_features @ all_img.T)
        ) / 2
        return self.contrastive(image_features, text_features, logit_scale) + self.weight * distill


def normalization(transform) -> tuple:
    """(mean, std) of the Normalize step of a torchvision Compose (None when there is none)."""
    for step in getattr(transform, "transforms", []):
        if hasattr(step, "mean") and hasattr(step, "std"):
            return tuple(map(float, step.mean)), tuple(map(float, step.std))
    return None


class Teacher:
    """The frozen teacher: `teacher(images, texts)` -> its normalised features and temperature."""

    def __init__(
        self,
        spec: DistillConfig,
        student_cfg: ModelConfig,
        student: ModelBundle,
        device: torch.device,
        autocast: Callable,
    ):
        """`spec`: the distill section; `student_cfg`, `student`: the student's model section and bundle (its
        tokenizer, image size and normalisation must be the teacher's)."""
        student_tokenizer = student.tokenizer
        name = student_cfg.name
        teacher = ModelConfig(name=spec.model, pretrained=spec.checkpoint, config_dirs=student_cfg.config_dirs)
        bundle = create_model(teacher, device=device)
        probe = ["a photo of a cat, naïvely tokenised: 12 € / 東京"]
        same_tokens = type(bundle.tokenizer) is type(student_tokenizer) and torch.equal(
            bundle.tokenizer(probe), student_tokenizer(probe)
        )
        if not same_tokens:
            raise ConfigError(
                f"'distill.model={spec.model}' tokenizes text otherwise than model.name={name} "
                "(tokenizer, vocabulary or context length): the teacher reads the student's token ids"
            )
        if (bundle.image_size, normalization(bundle.val_transform)) != (
            student.image_size,
            normalization(student.val_transform),
        ):
            raise ConfigError(
                f"'distill.model={spec.model}' takes other images than model.name={name} "
                f"({bundle.image_size} px, mean/std {normalization(bundle.val_transform)} vs {student.image_size} px, "
                f"{normalization(student.val_transform)}): the teacher reads the student's preprocessed images"
            )
        self.model, self.autocast = bundle.model.eval(), autocast
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: torch.Tensor, batch: dict | None = None) -> dict:
        with self.autocast():
            out = self.model(image=images, text=texts)
        return {
            "teacher_image_features": out["image_features"].float(),
            "teacher_text_features": out["text_features"].float(),
            "teacher_logit_scale": out["logit_scale"].float(),  # open_clip returns it exponentiated
        }


class StoredTeacher:
    """distill.source=shards: the teacher's features as `clipscale shards embed --checkpoint TEACHER` stored
    them in the training samples (the batch carries them: data/stream.py), instead of a teacher forward."""

    def __call__(self, images: torch.Tensor, texts: torch.Tensor, batch: dict | None = None) -> dict:
        if batch is None or TEACHER_KEYS[0] not in batch:
            raise ValueError("distill.source=shards, but the batch carries no teacher features")
        return {k: batch[k].to(images.device, non_blocking=True) for k in TEACHER_KEYS}
