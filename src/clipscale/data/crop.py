"""open_clip's training crop (RandomResizedCrop to the model's input) from encoded bytes to uint8
pixels without PIL: 1.7-1.9x the samples per worker at a 224-px input.

What a PIL transform spends per 320x256 JPEG here: decode 0.50 ms, bicubic resize 0.67 ms, crop
parameters from torch's RNG (~10 small torch calls) 0.07-0.1 ms, PIL <-> numpy copies 0.1 ms. This
path decodes with libjpeg-turbo straight into an array (simplejpeg, 0.41 ms), draws the crop
with Python's `random` by torchvision's own algorithm (the same distribution of boxes: area
fraction uniform in `scale`, log aspect ratio uniform in `ratio`, 10 tries, then the centre
crop), and resizes with torch's uint8 antialiased kernels (0.16 ms), whose filters are PIL's:
pixels differ from torchvision's crop-then-resize by at most 2 levels (benchmarks/dataloader.py
--pixels prints the difference). Where the crop is at least 2, 4 or 8 times the output in both
sides, libjpeg decodes at that reduced DCT scale (decode and resize do less work; PIL's draft
does this only against the whole image, this against the crop actually drawn).
"""

from __future__ import annotations

import math
import random
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .jpeg import decode_image_pil, decode_jpeg_scaled, jpeg_header

_MODES = {Image.BICUBIC: "bicubic", Image.BILINEAR: "bilinear"}


def crop_box(width: int, height: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) as torchvision's RandomResizedCrop.get_params draws it, from `rng`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # the centre crop torchvision falls back to
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def dct_scale(crop_h: int, crop_w: int, out_h: int, out_w: int) -> int:
    """The largest libjpeg scale (1/8, 1/4, 1/2) at which the crop still covers the output."""
    return next((s for s in (8, 4, 2) if crop_h // s >= out_h and crop_w // s >= out_w), 1)


def resize_uint8(array: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """HxWx3 uint8 -> size HxWx3 uint8 with torch's antialiased kernels (PIL's filters)."""
    x = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)  # a channels-last view: no copy
    out = F.interpolate(x, size=size, mode=mode, antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


class FastCrop:
    """bytes -> the model's uint8 HxWx3 crop, drawn as the RandomResizedCrop it was made from draws
    (`from_transform` gives None for a transform it does not reproduce: the PIL transform runs).

    `cut` decodes and cuts the box (what can fail there is the file: a counted skip), `finish`
    resizes it and runs the transform's other PIL steps (what fails there is a bug: it raises)."""

    def __init__(self, size: tuple[int, int], scale, ratio, mode: str, dct: bool, pil_steps: list[Callable]):
        self.size, self.scale, self.ratio, self.mode, self.dct = size, scale, ratio, mode, dct
        self.pil_steps = pil_steps  # what follows the crop in the transform (colour jitter, grayscale)

    @classmethod
    def from_transform(cls, head: Callable, dct: bool) -> FastCrop | None:
        """From the PIL part of open_clip's train transform: RandomResizedCrop (bicubic or bilinear),
        then RGB conversion and any other PIL steps."""
        from torchvision.transforms import Compose, InterpolationMode, RandomResizedCrop

        steps = list(getattr(head, "transforms", [])) if isinstance(head, Compose) else []
        if not steps or type(steps[0]) is not RandomResizedCrop:
            return None
        crop = steps[0]
        interpolation = crop.interpolation
        if isinstance(interpolation, InterpolationMode):
            interpolation = {InterpolationMode.BICUBIC: Image.BICUBIC, InterpolationMode.BILINEAR: Image.BILINEAR}.get(
                interpolation
            )
        if interpolation not in _MODES:
            return None
        rest = [s for s in steps[1:] if not _is_rgb_conversion(s)]
        return cls(tuple(crop.size), tuple(crop.scale), tuple(crop.ratio), _MODES[interpolation], dct, rest)

    def __call__(self, data: bytes, rng: random.Random) -> np.ndarray | Image.Image:
        return self.finish(self.cut(data, rng))

    def cut(self, data: bytes, rng: random.Random) -> np.ndarray:
        """The decoded crop box (a view), at a reduced DCT scale where the box allows."""
        size, array, s = jpeg_header(data), None, 1
        if size is not None:
            top, left, h, w = crop_box(*size, self.scale, self.ratio, rng)
            s = dct_scale(h, w, *self.size) if self.dct else 1
            array = decode_jpeg_scaled(data, *size, s)
            if array is None:  # simplejpeg declined after all: PIL decodes the same size, in full
                s = 1
        if array is None:
            array = np.array(decode_image_pil(data))  # writable: torch.from_numpy warns otherwise
        if size is None:  # drawn only now, on the size PIL decoded
            top, left, h, w = crop_box(array.shape[1], array.shape[0], self.scale, self.ratio, rng)
        if s > 1:  # the same box on the scaled image (within one scaled pixel)
            top, left = round(top / s), round(left / s)
            h, w = min(round(h / s), array.shape[0] - top), min(round(w / s), array.shape[1] - left)
        return array[top : top + h, left : left + w]

    def finish(self, box: np.ndarray) -> np.ndarray | Image.Image:
        """The box at the model's input size, after the transform's other PIL steps (an image whose
        mode is not RGB then: the caller's per-sample tail handles it)."""
        out = resize_uint8(box, self.size, self.mode)
        if self.pil_steps:
            img = Image.fromarray(out, "RGB")
            for step in self.pil_steps:
                img = step(img)
            if img.mode != "RGB":
                return img
            out = np.asarray(img)
        return out


def _is_rgb_conversion(step: Callable) -> bool:
    """open_clip's MaybeConvertMode("RGB") / _convert_to_rgb: nothing to do for an RGB array."""
    name = getattr(step, "__name__", type(step).__name__)
    return name in ("_convert_to_rgb", "convert_to_rgb") or (
        type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"
    )
