"""data.gpu_decode: JPEGs decoded on the training device (nvJPEG through torchvision.io.decode_jpeg)
instead of in the loader workers, for nodes with few CPU cores per GPU.

The workers still read the shards, tokenise, and draw each crop box exactly as the CPU path
(crop.FastCrop) draws it, from the JPEG's header; they send the encoded bytes and the box. The
training process decodes the batch in one call on its device, cuts each box and resizes it with the
same antialiased filter. Only the decode scale differs: the device decodes at full size, as the CPU
path does with data.jpeg_draft=false, and pixels agree with that within 2 levels.

What the device path does not take stays on the CPU path, sample by sample: images that are not
baseline-readable JPEGs (PNG, CMYK, no header), files without their end marker (a cut download: the
CPU decode makes it a counted skip), and transforms with PIL steps after the crop (colour jitter).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .crop import FastCrop, crop_box
from .jpeg import decode_image_pil, decode_jpeg_scaled, jpeg_header

log = logging.getLogger("clipscale")
_EOI = b"\xff\xd9"


@dataclass
class Encoded:
    """One JPEG whose decode waits for the training device, and its crop box (top, left, height, width)."""

    data: bytes
    box: tuple[int, int, int, int]


def defer(crop: FastCrop, data: bytes, rng) -> Encoded | None:
    """The crop box drawn as FastCrop.cut draws it (the same calls on `rng`), the decode left to the
    device; None where the CPU path must decode (nothing has been drawn from `rng` then)."""
    if crop.pil_steps or not data.rstrip(b"\x00").endswith(_EOI):
        return None
    size = jpeg_header(data)
    if size is None:
        return None
    return Encoded(data, crop_box(*size, crop.scale, crop.ratio, rng))


def decode_here(crop: FastCrop, item: Encoded) -> np.ndarray:
    """A deferred JPEG decoded on the CPU after all (a batch that mixes it with CPU-path images)."""
    try:
        size = jpeg_header(item.data)
        array = decode_jpeg_scaled(item.data, *size) if size is not None else None
        if array is None:
            array = np.array(decode_image_pil(item.data))
    except Exception as exn:  # noqa: BLE001 - damaged bytes behind a good header: said, not fatal
        log.warning("data.gpu_decode: a JPEG could not be decoded (%s): trained as a grey image", type(exn).__name__)
        return np.full((*crop.size, 3), 128, dtype=np.uint8)
    top, left, h, w = item.box
    return crop.finish(array[top : top + h, left : left + w])


def collate(items: list[Encoded]) -> dict:
    """What the loader passes for a batch of deferred JPEGs: all their bytes in one uint8 tensor (one
    shared-memory block per batch between processes, not one per image), their sizes, the boxes."""
    return {
        "jpeg": torch.frombuffer(bytearray(b"".join(item.data for item in items)), dtype=torch.uint8),
        "sizes": torch.tensor([len(item.data) for item in items], dtype=torch.int64),
        "boxes": torch.tensor([item.box for item in items], dtype=torch.int64),
    }


def is_deferred(batch) -> bool:
    return isinstance(batch, dict) and "jpeg" in batch


def decode_on(batch: dict, device: torch.device, size: tuple[int, int], mode: str) -> torch.Tensor:
    """uint8 [B, H, W, 3] on `device`: every JPEG decoded there (one batched call), its box cut and
    resized to `size` with the antialiased `mode` filter, rounded as the uint8 CPU kernel rounds."""
    from torchvision.io import ImageReadMode, decode_jpeg

    files = list(torch.split(batch["jpeg"], batch["sizes"].tolist()))
    try:
        images = decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # one bad file fails the batched call: decode one by one, the bad one on the CPU
        images = [_decode_one(data, device) for data in files]
    out = torch.empty(len(images), 3, *size, dtype=torch.uint8, device=device)
    for i, (image, (top, left, h, w)) in enumerate(zip(images, batch["boxes"].tolist())):
        box = image[None, :, top : top + h, left : left + w].float()
        resized = F.interpolate(box, size=size, mode=mode, antialias=True, align_corners=False)
        out[i] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1)


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[3, H, W] uint8 of one JPEG: on the device, else by PIL (more tolerant of damaged data), else
    a grey image with a warning (the sample is in the batch already: it cannot be skipped any more)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:
        array = np.array(decode_image_pil(data.numpy().tobytes()))
        return torch.from_numpy(array).permute(2, 0, 1).to(device)
    except Exception as exn:  # noqa: BLE001 - damaged bytes: said, not fatal
        log.warning("data.gpu_decode: a JPEG could not be decoded (%s): trained as a grey image", type(exn).__name__)
        return torch.full((3, 64, 64), 128, dtype=torch.uint8, device=device)
