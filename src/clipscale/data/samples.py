"""Turning one raw WebDataset sample into (image tensor, caption), or a counted skip.

What a sample holds (image keys, caption rules) is `wds.schema`'s; this module decodes and
transforms. Everything that can be wrong with one sample is a `Skip` with a reason; the stream
counts skips by reason and never stops for one.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image

from ..wds.schema import EMBEDDING_MEMBERS as TEACHER_MEMBERS
from ..wds.schema import Skip, caption_of, image_bytes
from . import device_decode
from .crop import FastCrop
from .jpeg import decode_image


@contextlib.contextmanager
def _bad_file_is_a_skip():
    """What decoding raises for the file's bytes becomes a counted Skip (both decode paths)."""
    try:
        yield
    except Image.DecompressionBombError as exn:
        raise Skip("image_too_large", str(exn)[:120]) from None
    except Exception as exn:  # PIL raises many types for bad bytes
        raise Skip("corrupt_image", f"{type(exn).__name__}") from None


def split_to_tensor_tail(transform: Callable) -> tuple[Callable, torch.Tensor, torch.Tensor] | None:
    """(PIL part, mean, std) of a Compose[..., ToTensor, Normalize] (open_clip's transforms all
    end so), or None for any other transform."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    steps = getattr(transform, "transforms", None)
    if not isinstance(transform, Compose) or len(steps) < 2:
        return None
    if not isinstance(steps[-2], ToTensor) or not isinstance(steps[-1], Normalize):
        return None
    mean = torch.as_tensor(steps[-1].mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(steps[-1].std, dtype=torch.float32).view(1, -1, 1, 1)
    return Compose(steps[:-2]), mean, std


def draft_size(image_size: int, augment=None) -> int:
    """The smallest decoded side that still gives the model full resolution: a RandomResizedCrop of
    area fraction `scale[0]` and aspect ratio up to `ratio` spans only part of the image, so the image
    must be decoded that much larger (data.augment; the default crop keeps 90-100%: image_size)."""
    if augment is None:
        return image_size
    stretch = math.sqrt(4 / 3)  # open_clip's crop aspect ratios: 3/4 to 4/3
    return math.ceil(image_size * stretch / math.sqrt(augment.scale[0]))


class SampleDecoder:
    """raw sample → (image, caption); `collate` makes the batch tensor. Augmentation randomness is
    seeded per sample so a sample looks the same however the stream was interrupted and resumed.

    For a transform ending in ToTensor + Normalize, samples stay uint8 RGB arrays, `collate`
    stacks them, and `to_model_input` converts and normalises the whole batch on the training
    device: the same float32 operations in the same order (bitwise the same tensor), without
    ~0.1 ms of per-sample tensor overhead in the workers. With `fast_crop`, open_clip's
    RandomResizedCrop runs as `crop.FastCrop` (no PIL; the same distribution of crops, drawn from
    Python's `random`; pixels within 2 levels of PIL's).
    """

    def __init__(
        self,
        transform: Callable,
        image_keys: list[str],
        caption_key: str = "txt",
        caption_json_field: str = "caption",
        draft_size: int | None = None,
        fast_crop: bool = False,
        gpu_decode: bool = False,
        stored_teacher: bool = False,
    ):
        self.transform = transform
        self.image_keys = [k.lower() for k in image_keys]
        self.caption_key = caption_key
        self.caption_json_field = caption_json_field
        self.draft_size = draft_size
        self.gpu_decode = gpu_decode  # JPEGs decoded on the training device (device_decode.py), with fast_crop
        self.stored_teacher = stored_teacher  # distill.source=shards: each sample carries the teacher's features
        self._split = split_to_tensor_tail(transform)
        # the DCT scale is then chosen against each crop; jpeg_draft=false (no draft size) turns it off
        self._crop = (
            FastCrop.from_transform(self._split[0], draft_size is not None) if fast_crop and self._split else None
        )
        self._stats_on: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (mean, std) per device

    def __call__(self, sample: dict, aug_seed: int) -> tuple[torch.Tensor | np.ndarray, str]:
        data = image_bytes(sample, self.image_keys)
        if data is None:
            raise Skip("no_image")
        text = caption_of(sample, self.caption_key, self.caption_json_field)
        if self._crop is not None:
            return self._fast(data, aug_seed), text
        with _bad_file_is_a_skip():
            img = decode_image(data, self.draft_size)
        # the CPU generator only: torch.manual_seed also seeds every accelerator and costs ~0.2 ms;
        # and Python's (open_clip's colour jitter and grayscale draw from `random`)
        torch.random.default_generator.manual_seed(aug_seed)
        random.seed(aug_seed)
        if self._split is None:
            return self.transform(img), text
        out = self._split[0](img)
        if isinstance(out, Image.Image) and out.mode == "RGB":
            return np.asarray(out), text
        return self._tail(out), text

    def teacher_features(self, sample: dict) -> tuple[np.ndarray, np.ndarray, float]:
        """(image embedding, text embedding, temperature) of the teacher, stored in the sample by
        `clipscale shards embed`; a sample without them is a counted skip."""
        try:
            stored = (sample[TEACHER_MEMBERS[0]], sample[TEACHER_MEMBERS[1]], sample[TEACHER_MEMBERS[2]])
            image, text = (np.load(io.BytesIO(b), allow_pickle=False).astype(np.float32) for b in stored[:2])
            scale = float(json.loads(stored[2])["logit_scale"])
        except KeyError:
            raise Skip("no_teacher_features", "distill.source=shards: run `clipscale shards embed` on them") from None
        except (ValueError, TypeError, EOFError, OSError) as exn:  # damaged members
            raise Skip("no_teacher_features", f"{type(exn).__name__}") from None
        return image, text, scale

    def _fast(self, data: bytes, aug_seed: int) -> np.ndarray | torch.Tensor:
        random.seed(aug_seed)  # the crop and open_clip's colour jitter / grayscale draw from `random`
        if self._crop.pil_steps:  # torchvision's ColorJitter draws from torch's CPU generator
            torch.random.default_generator.manual_seed(aug_seed)
        if self.gpu_decode:
            deferred = device_decode.defer(self._crop, data, random)  # the same box; decoded on the device
            if deferred is not None:
                return deferred
        with _bad_file_is_a_skip():
            box = self._crop.cut(data, random)
        out = self._crop.finish(box)  # an error here is not the file's: it is raised
        return out if isinstance(out, np.ndarray) else self._tail(out)  # a PIL step left mode != RGB

    def _tail(self, img) -> torch.Tensor:
        """ToTensor + Normalize for one sample (an image the batched path cannot take)."""
        return self.transform.transforms[-1](self.transform.transforms[-2](img))

    def collate(self, images: list) -> torch.Tensor:
        """The batch of what __call__ returned for each sample: uint8 [B, H, W, C] on the batched
        path (4x less to pass between processes and to copy to the GPU; `to_model_input` finishes
        it), else the transformed float tensors stacked [B, C, H, W]; with data.gpu_decode, the encoded
        JPEGs and their boxes (a batch that mixes them with other images decodes them here)."""
        deferred = sum(isinstance(im, device_decode.Encoded) for im in images)
        if deferred and deferred == len(images):
            return device_decode.collate(images)
        if deferred:
            images = [
                device_decode.decode_here(self._crop, im) if isinstance(im, device_decode.Encoded) else im
                for im in images
            ]
        arrays = [im for im in images if isinstance(im, np.ndarray)]
        if not arrays:
            return torch.stack(images)
        if len(arrays) == len(images) and len({a.shape for a in arrays}) == 1:
            return torch.from_numpy(np.stack(arrays))
        return torch.stack(
            [
                self._normalize(torch.from_numpy(np.array(im))[None])[0] if isinstance(im, np.ndarray) else im
                for im in images
            ]
        )

    def to_model_input(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Move a collated batch to `device`; a uint8 batch is converted and normalised there,
        with ToTensor's and Normalize's float32 operations (bitwise their result)."""
        if device_decode.is_deferred(images):
            return self._normalize(device_decode.decode_on(images, device, self._crop.size, self._crop.mode))
        images = images.to(device, non_blocking=True)
        if self._split is None or images.dtype != torch.uint8:
            return images
        return self._normalize(images)

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        key = str(batch.device)
        if key not in self._stats_on:  # copied once: a pageable host-to-device copy would sync every step
            self._stats_on[key] = (self._split[1].to(batch.device), self._split[2].to(batch.device))
        mean, std = self._stats_on[key]
        x = batch.permute(0, 3, 1, 2).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        return x.div_(255).sub_(mean).div_(std)
