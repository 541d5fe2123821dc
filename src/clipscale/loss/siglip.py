"""SigLIP's sigmoid loss over the global batch: texts gathered (with grad), or passed around the ring
of ranks (forward and backward) so that no rank holds more than two blocks of text features."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config.losses import LOSSES
from .gather import CommTimer, Gather, _world


def _siglip_block_loss(img, txt, scale, bias, positives: bool) -> torch.Tensor:
    """sum of -log sigmoid(label * logit) over one [b, b'] block (labels +1 on the diagonal if `positives`)."""
    logits = (img @ txt.T) * scale + bias
    loss = F.softplus(logits).sum()  # every pair as a negative: -log sigmoid(-x) = softplus(x)
    if positives:
        loss = loss - torch.diagonal(logits).sum()  # softplus(-x) - softplus(x) = -x
    return loss


def _siglip_block_grads(img, txt, scale, bias, positives: bool, coef):
    """Gradients of coef x _siglip_block_loss w.r.t. img, txt, scale, bias."""
    raw = img @ txt.T
    d = torch.sigmoid(raw * scale + bias) * coef
    if positives:
        d.diagonal().sub_(coef)
    return (d @ txt) * scale, (d.T @ img) * scale, (d * raw).sum(), d.sum()


def _ring_shift(x: torch.Tensor, timer: CommTimer) -> torch.Tensor:
    """Send `x` to the next rank, receive the previous rank's tensor."""
    rank, world = _world()
    out = torch.empty_like(x)
    with timer.time(x.device):
        ops = [
            dist.P2POp(dist.isend, x.contiguous(), (rank + 1) % world),
            dist.P2POp(dist.irecv, out, (rank - 1) % world),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return out


class _RingSigLip(torch.autograd.Function):
    """SigLIP of local images against every rank's texts, texts passed around the ring.

    Backward runs the ring again, carrying each text block with its gradient accumulator; after
    a full turn every block is back home with the gradient contributed by every rank.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, bias, timer):
        rank, world = _world()
        total = _siglip_block_loss(img, txt, scale, bias, positives=True)
        block = txt
        for _ in range(world - 1):
            block = _ring_shift(block, timer)
            total = total + _siglip_block_loss(img, block, scale, bias, positives=False)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.timer = timer
        return total / img.shape[0]

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias = ctx.saved_tensors
        _, world = _world()
        coef = g / img.shape[0]
        dimg = torch.zeros_like(img)
        dscale = torch.zeros((), dtype=img.dtype, device=img.device)
        dbias = torch.zeros((), dtype=img.dtype, device=img.device)
        block, dblock = txt, torch.zeros_like(txt)
        for step in range(world):
            gi, gt, gs, gb = _siglip_block_grads(img, block, scale, bias, step == 0, coef)
            dimg += gi
            dblock = dblock + gt
            dscale += gs
            dbias += gb
            # after `world` shifts every block (with its accumulated gradient) is back with its owner
            packed = _ring_shift(torch.cat([block, dblock], dim=1), ctx.timer)
            block, dblock = packed.split(txt.shape[1], dim=1)
        return dimg, dblock, dscale.reshape(scale.shape), dbias.reshape(bias.shape), None


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP) over the global batch: positives on the diagonal, every other pair negative."""

    uses_bias = True

    def __init__(self, impl: str = "gather", gather: Gather | None = None):
        super().__init__()
        if impl not in LOSSES["siglip"].impls:
            raise ValueError(f"SigLipLoss impl must be one of {', '.join(LOSSES['siglip'].impls)}; got {impl!r}")
        self.impl = impl
        self.gather = gather or Gather()

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        rank, world = self.gather.rank_world()
        b = image_features.shape[0]
        if world == 1:
            return _siglip_block_loss(image_features, text_features, logit_scale, logit_bias, True) / b
        if self.impl == "ring":
            return _RingSigLip.apply(image_features, text_features, logit_scale, logit_bias, self.gather.timer)
        all_txt = self.gather(text_features)
        logits = (image_features @ all_txt.T) * logit_scale + logit_bias
        loss = F.softplus(logits).sum()
        own = logits[:, rank * b : (rank + 1) * b]
        return (loss - torch.diagonal(own).sum()) / b


def build(loss_cfg, impl: str) -> SigLipLoss:
    return SigLipLoss(impl=impl)
