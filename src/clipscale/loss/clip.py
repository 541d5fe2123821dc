"""CLIP's symmetric InfoNCE over the global batch: full, local (OpenCLIP's local_loss) or chunked."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config.losses import LOSSES
from .chunked import _ChunkedRowCE, _ChunkedSymmetricCE
from .gather import Gather


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch (see the module docstring for `impl`)."""

    uses_bias = False

    def __init__(self, impl: str = "local", chunk_size: int = 4096, gather: Gather | None = None):
        super().__init__()
        if impl not in LOSSES["clip"].impls:
            raise ValueError(f"ClipLoss impl must be one of {', '.join(LOSSES['clip'].impls)}; got {impl!r}")
        self.impl = impl
        self.chunk_size = chunk_size
        self.gather = gather or Gather()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        rank, world = self.gather.rank_world()
        b = image_features.shape[0]
        if self.impl == "chunked":
            if world == 1:
                return _ChunkedSymmetricCE.apply(image_features, text_features, logit_scale, self.chunk_size)
            all_img, all_txt = self.gather.pair(image_features, text_features)
            return (
                _ChunkedRowCE.apply(image_features, all_txt, logit_scale, rank * b, self.chunk_size)
                + _ChunkedRowCE.apply(text_features, all_img, logit_scale, rank * b, self.chunk_size)
            ) / 2
        if world == 1 or self.impl == "full":
            all_img, all_txt = self.gather.pair(image_features, text_features)
            logits = logit_scale * all_img @ all_txt.T
            labels = torch.arange(logits.shape[0], device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        all_img, all_txt = self.gather.pair(image_features, text_features)
        labels = torch.arange(b, device=image_features.device) + rank * b
        per_image = logit_scale * image_features @ all_txt.T
        per_text = logit_scale * text_features @ all_img.T
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def build(loss_cfg, impl: str) -> ClipLoss:
    return ClipLoss(impl=impl, chunk_size=loss_cfg.chunk_size)
