"""Contrastive losses over a batch of (already normalised) image and text features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClipLoss(nn.Module):
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy, pairs on the diagonal."""

    def __init__(self, impl: str = "full", chunk_size: int = 4096):
        super().__init__()
        self.impl = impl
        self.chunk_size = chunk_size

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def build_loss(cfg) -> nn.Module:
    from .config import resolved_loss_impl

    return ClipLoss(impl=resolved_loss_impl(cfg), chunk_size=cfg.loss.chunk_size)
