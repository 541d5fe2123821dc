"""Zero-shot accuracy and retrieval recall from features."""

from __future__ import annotations

from typing import Sequence

import torch

RECALL_AT = (1, 5, 10)


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {k: hits[:, :k].any(dim=1).float().mean().item() for k in ks}


def retrieval_recall(
    image_feats: torch.Tensor, text_feats: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int] = RECALL_AT
) -> dict[str, float]:
    """i2t: an image is a hit at k when any of its captions is among its k best texts;
    t2i: a caption is a hit at k when its image is among its k best images."""
    sims = image_feats @ text_feats.T  # [images, texts]
    n_img, n_txt = sims.shape
    match = torch.zeros(n_img, n_txt, dtype=torch.bool)
    match[text_to_image, torch.arange(n_txt)] = True
    out = {}
    i2t_order = sims.argsort(dim=1, descending=True, stable=True)
    first_hit_i2t = match.gather(1, i2t_order).float().argmax(dim=1)  # rank of the best matching text
    t2i_order = sims.T.argsort(dim=1, descending=True, stable=True)
    first_hit_t2i = (t2i_order == text_to_image[:, None]).float().argmax(dim=1)
    for k in ks:
        out[f"i2t_r{k}"] = (first_hit_i2t < k).float().mean().item()
        out[f"t2i_r{k}"] = (first_hit_t2i < k).float().mean().item()
    return out
