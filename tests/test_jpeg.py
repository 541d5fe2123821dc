"""The fast JPEG path gives PIL's pixels, or leaves the image to PIL."""

import io

import numpy as np
import pytest
from PIL import Image

from clipscale.data.jpeg import decode_image, decode_image_pil, decode_jpeg_fast, pil_draft_scale


def jpeg(width, height, mode="RGB", **save):
    rng = np.random.default_rng(width * 1000 + height)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)), (xx + yy) % 256], -1)
    noisy = np.clip(base + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(noisy, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


CASES = {
    "420": jpeg(320, 256, quality=90),
    "444": jpeg(321, 257, quality=95, subsampling=0),
    "422": jpeg(300, 199, quality=80, subsampling=1),
    "progressive": jpeg(256, 384, progressive=True),
    "tiny": jpeg(17, 9),
    "gray": jpeg(200, 150, mode="L"),
    "cmyk": jpeg(120, 80, mode="CMYK"),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("draft", [None, 16, 32, 100, 224, 5000])
def test_same_pixels_as_pil(name, draft):
    data = CASES[name]
    ours, pils = decode_image(data, draft), decode_image_pil(data, draft)
    assert ours.mode == pils.mode == "RGB" and ours.size == pils.size
    assert np.array_equal(np.asarray(ours), np.asarray(pils))
    fast = decode_jpeg_fast(data, draft)
    assert (fast is None) == (name == "cmyk")  # the fast path is really taken, except for CMYK


def test_draft_scale_follows_pil():
    assert [pil_draft_scale(320, 256, s) for s in (32, 64, 100, 128, 224, 400)] == [8, 4, 2, 2, 1, 1]


def test_warnings_and_damage_are_pils_to_judge():
    data = CASES["420"]
    sos = data.index(b"\xff\xda")
    with_junk = data[:sos] + b"\x00\x00\x00" + data[sos:]  # libjpeg: "extraneous bytes before marker"
    assert decode_jpeg_fast(with_junk) is None
    assert np.array_equal(np.asarray(decode_image(with_junk)), np.asarray(decode_image_pil(with_junk)))
    for bad in (data[: len(data) // 2], b"\xff\xd8 not a jpeg at all"):
        with pytest.raises(OSError):
            decode_image(bad)


def test_other_formats_go_to_pil():
    buf = io.BytesIO()
    Image.new("RGBA", (10, 7), (1, 2, 3, 4)).save(buf, "PNG")
    assert decode_jpeg_fast(buf.getvalue()) is None
    img = decode_image(buf.getvalue(), 4)
    assert img.mode == "RGB" and img.size == (10, 7) and img.getpixel((0, 0)) == (1, 2, 3)
