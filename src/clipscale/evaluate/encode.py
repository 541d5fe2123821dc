"""Encoding a whole evaluation set with the model on every rank: equal numbers of forwards on every
rank (ZeRO-3 forwards are collective), features gathered, the model in eval mode under no_grad and
every RNG put back afterwards (evaluating never changes training: resume stays exact)."""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..job.distributed import all_gather_object, rank, world_size
from .sets import EvalSet, _batches_needed, _Images, model_image_shape, shielded_loader


@contextlib.contextmanager
def preserved_rng():
    """Put every RNG back as it was: evaluation must not shift training's random stream."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, was_training in modes.items():
            m.training = was_training


class Encoder:
    """Image and text features of one model, computed in equal numbers of batches on every rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        transform: Callable,
        tokenizer: Callable,
        device: torch.device,
        batch_size: int = 64,
        workers: int = 0,
        autocast: Callable = contextlib.nullcontext,
        signals: Sequence[str] = (),
    ):
        self.model, self.transform, self.tokenizer = model, transform, tokenizer
        self.device, self.batch_size, self.workers, self.autocast = device, batch_size, workers, autocast
        self.signals = tuple(signals)
        self.decode_errors = 0  # images that decoded at start-up but not now (encoded blank)

    def images(self, ev: EvalSet) -> torch.Tensor:
        """Normalised features of the whole set [size, d], gathered from every rank."""
        loader = shielded_loader(
            _Images(ev.sources, self.transform),
            self.signals,
            batch_size=self.batch_size,
            num_workers=self.workers if ev.sources else 0,
        )
        feats = []
        for images, ok in loader:
            self.decode_errors += int((ok == 0).sum())
            feats.append(self._encode_images(images))
        self._pad(len(feats), ev.batches_needed(world_size(), self.batch_size), "image")
        local = torch.cat(feats) if feats else torch.empty(0)
        return _assemble(local, ev.local, ev.size)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised features of `texts` [n, d]; every rank encodes a strided share."""
        r, w = rank(), world_size()
        mine = list(range(r, len(texts), w))
        feats = [
            self._encode_texts([texts[i] for i in mine[s : s + self.batch_size]])
            for s in range(0, len(mine), self.batch_size)
        ]
        self._pad(len(feats), _batches_needed(len(texts), w, self.batch_size), "text")
        local = torch.cat(feats) if feats else torch.empty(0)
        return _assemble(local, mine, len(texts))

    def classifier(self, classnames: Sequence[str], templates: Sequence) -> torch.Tensor:
        """[d, classes]: per class, the mean of its normalised template embeddings, normalised."""
        texts = [t.format(c) if isinstance(t, str) else t(c) for c in classnames for t in templates]
        feats = self.texts(texts).reshape(len(classnames), len(templates), -1).mean(dim=1)
        return F.normalize(feats, dim=-1).T

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32)
        with self.autocast():  # (weights may be bf16/fp16 under DeepSpeed: feed them their dtype)
            out = self.model.encode_image(images.to(self.device, dtype=dtype), normalize=True)
        return out.float().cpu()

    def _encode_texts(self, texts: list[str]) -> torch.Tensor:
        with self.autocast():
            out = self.model.encode_text(self.tokenizer(texts).to(self.device), normalize=True)
        return out.float().cpu()

    def _pad(self, done: int, needed: int, kind: str) -> None:
        """Forwards a rank with a smaller share still runs, so collective (ZeRO-3) forwards pair up."""
        if world_size() == 1:
            return
        for _ in range(needed - done):
            if kind == "image":
                self._encode_images(torch.zeros(1, *model_image_shape(self.model)))
            else:
                self._encode_texts(["padding"])


def _assemble(local: torch.Tensor, indices: list[int], size: int) -> torch.Tensor:
    parts = all_gather_object((indices, local))
    dim = next((f.shape[1] for _, f in parts if f.numel()), 0)
    out = torch.zeros(size, dim)
    for idx, feats in parts:
        if idx:
            out[torch.tensor(idx)] = feats
    return out
