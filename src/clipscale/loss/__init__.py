"""Contrastive losses over the GLOBAL batch, computed from this rank's features.

Looked up by name in the registry (config/losses.py), which also holds each loss's config checks.

Every loss takes this rank's (already normalised) features [b, d] and gathers what it needs
across the default process group itself. Convention (open_clip's, which makes DDP's gradient
averaging exact): the mean over ranks of the returned losses is the loss of the global batch;
each rank's gradient w.r.t. its own features is world_size x the matching slice of the
single-process gradient; temperature/bias gradients averaged over ranks equal the
single-process ones.

CLIP (symmetric InfoNCE), `impl`:
  full     all_gather with grad, global [B, B] logits on every rank (the baseline)
  local    this rank's rows/columns only: [b, B] logits, labels offset by rank (OpenCLIP's local_loss)
  chunked  like local, but logits are computed tile by tile with an online log-sum-exp and a
           custom backward, so memory is O(chunk^2) instead of O(b x B)
SigLIP (sigmoid loss with temperature and bias), `impl`:
  gather   all_gather texts with grad, [b, B] logits
  ring     text blocks travel around the ring of ranks (forward and backward): no rank ever
           holds more than two blocks of text features
"""

from __future__ import annotations

from torch import nn

from ..config.losses import builder, loss_spec, resolved_impl
from .chunked import CPU_TILE, _ChunkedRowCE, _tile_size
from .clip import ClipLoss
from .gather import CommTimer, Gather
from .siglip import SigLipLoss


def build_loss(loss_cfg) -> nn.Module:
    """The loss `loss.name` names in the registry, with its implementation (`loss.impl`, auto resolved)."""
    return builder(loss_spec(loss_cfg.name))(loss_cfg, resolved_impl(loss_cfg))


__all__ = ["CPU_TILE", "ClipLoss", "CommTimer", "Gather", "SigLipLoss", "_ChunkedRowCE", "_tile_size", "build_loss"]
