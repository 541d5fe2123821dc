"""data.fast_crop: open_clip's RandomResizedCrop without PIL must draw the same crops (torchvision's
algorithm) and give pixels within a few levels of PIL's; every odd file still decodes or is a
counted skip."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from clipscale.config import AugmentConfig
from clipscale.data.crop import FastCrop, crop_box, dct_scale
from clipscale.data.samples import SampleDecoder
from clipscale.model import create_model
from clipscale.wds.schema import Skip

from helpers import tiny_config


def photo(width: int, height: int, seed: int = 0, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A smooth random image (like a photo, unlike white noise, so resampling errors are typical)."""
    rng = np.random.RandomState(seed)
    low = Image.fromarray(rng.randint(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    arr = np.clip(np.asarray(low, dtype=np.int16) + rng.randint(-12, 12, (height, width, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).convert(mode).save(buf, format=fmt, quality=90)
    return buf.getvalue()


class TorchDraws:
    """A `random`-like source that draws exactly what torchvision's get_params draws."""

    def uniform(self, a, b):
        return torch.empty(1).uniform_(a, b).item()

    def randint(self, a, b):
        return int(torch.randint(a, b + 1, size=(1,)).item())


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0), (0.9, 0.95)])
def test_crop_box_is_torchvision_get_params(scale):
    ratio = (3 / 4, 4 / 3)
    same = total = 0
    for seed in range(300):
        size = [(320, 256), (64, 400), (400, 30), (37, 37)][seed % 4]  # tall and wide: the fallback too
        torch.manual_seed(seed)
        want = RandomResizedCrop.get_params(Image.new("RGB", size), list(scale), list(ratio))
        torch.manual_seed(seed)
        got = crop_box(*size, scale, ratio, TorchDraws())
        same += tuple(got) == tuple(want)
        total += 1
    assert same == total  # fed the same draws, the same boxes: only the source of the draws differs


def test_crop_box_is_the_centre_crop_when_no_draw_fits():
    class Huge:
        def uniform(self, a, b):
            return b * 50  # an area no image holds: all 10 tries fail

        def randint(self, a, b):
            raise AssertionError("no position is drawn for the fallback")

    assert crop_box(400, 30, (0.9, 1.0), (3 / 4, 4 / 3), Huge()) == (0, 180, 30, 40)
    assert crop_box(30, 400, (0.9, 1.0), (3 / 4, 4 / 3), Huge()) == (180, 0, 40, 30)


def test_dct_scale_keeps_the_crop_at_least_the_output():
    assert dct_scale(256, 300, 224, 224) == 1
    assert dct_scale(460, 700, 224, 224) == 2
    assert dct_scale(900, 1000, 224, 224) == 4
    assert dct_scale(300, 310, 32, 32) == 8
    assert dct_scale(255, 1000, 32, 32) == 4  # 255 // 8 = 31 < 32


def pil_crop(data: bytes, box, size, interpolation=Image.BICUBIC) -> np.ndarray:
    """torchvision's resized_crop on a PIL image: crop, then resize (the filter sees only the box)."""
    top, left, h, w = box
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img.crop((left, top, left + w, top + h)).resize(size[::-1], interpolation))


@pytest.mark.parametrize("interpolation", [Image.BICUBIC, Image.BILINEAR])
def test_pixels_are_within_a_few_levels_of_pil(interpolation):
    """Same box, full decode: torch's uint8 antialiased kernels against PIL's resize."""
    tf = RandomResizedCrop(224, scale=(0.9, 1.0), interpolation=interpolation)
    crop = FastCrop.from_transform(_compose(tf), dct=False)
    assert crop is not None and crop.mode == {Image.BICUBIC: "bicubic", Image.BILINEAR: "bilinear"}[interpolation]
    diffs = []
    for seed in range(8):
        data = photo(320 + 24 * seed, 256, seed=seed)
        random.seed(seed)
        got = crop(data, random)
        random.seed(seed)
        box = crop_box(320 + 24 * seed, 256, (0.9, 1.0), (3 / 4, 4 / 3), random)
        want = pil_crop(data, box, (224, 224), interpolation)
        assert got.shape == want.shape == (224, 224, 3) and got.dtype == np.uint8
        diffs.append(np.abs(got.astype(int) - want.astype(int)))
    diffs = np.stack(diffs)
    assert diffs.max() <= 2 and diffs.mean() < 0.02, (diffs.max(), diffs.mean())


def _compose(*steps):
    from torchvision.transforms import Compose

    return Compose(list(steps))


def test_a_crop_far_larger_than_the_output_decodes_at_a_reduced_dct_scale():
    """1/4 scale for a 1024x768 image cut to 112 px: the same region, slightly softer pixels."""
    crop = FastCrop((112, 112), (0.9, 1.0), (3 / 4, 4 / 3), "bicubic", dct=True, pil_steps=[])
    data = photo(1024, 768, seed=3)
    random.seed(0)
    got = crop(data, random)
    random.seed(0)
    box = crop_box(1024, 768, (0.9, 1.0), (3 / 4, 4 / 3), random)
    assert dct_scale(box[2], box[3], 112, 112) == 4
    want = pil_crop(data, box, (112, 112))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert got.shape == (112, 112, 3) and diff.mean() < 3 and diff.max() < 40, (diff.mean(), diff.max())


@pytest.mark.parametrize("fmt,mode", [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "P"), ("WEBP", "RGB")])
def test_other_files_take_the_pil_decode_and_the_same_crop(fmt, mode):
    crop = FastCrop((32, 32), (0.9, 1.0), (3 / 4, 4 / 3), "bicubic", dct=False, pil_steps=[])
    data = photo(90, 70, seed=1, fmt=fmt, mode=mode)
    random.seed(5)
    got = crop(data, random)
    random.seed(5)
    box = crop_box(90, 70, (0.9, 1.0), (3 / 4, 4 / 3), random)
    want = pil_crop(data, box, (32, 32))
    diff = np.abs(got.astype(int) - want.astype(int))
    assert got.shape == (32, 32, 3) and diff.max() <= 4 and diff.mean() < 0.5, (diff.max(), diff.mean())


@pytest.fixture(scope="module")
def vit_bundles():
    plain = create_model(tiny_config("/tmp/unused", "x").model)
    jitter = create_model(
        tiny_config("/tmp/unused", "x").model,
        augment=AugmentConfig(scale=[0.4, 1.0], color_jitter=[0.4], color_jitter_prob=0.8, gray_scale_prob=0.2),
    )
    return plain, jitter


def test_the_decoder_uses_it_for_open_clips_transforms_and_stays_seeded(vit_bundles):
    for bundle in vit_bundles:
        decoder = SampleDecoder(bundle.train_transform, ["jpg"], draft_size=bundle.image_size, fast_crop=True)
        assert decoder._crop is not None
        sample = {"jpg": photo(120, 90, seed=2), "txt": b"a cat"}
        torch.manual_seed(1)
        random.seed(1)
        a, text = decoder(sample, 7)
        torch.manual_seed(2)
        random.seed(2)
        b, _ = decoder(sample, 7)
        assert text == "a cat" and a.dtype == np.uint8 and a.shape == (32, 32, 3)
        assert np.array_equal(a, b) and not all(np.array_equal(a, decoder(sample, s)[0]) for s in range(8, 12))
    assert (
        vit_bundles[1].train_transform is not None
        and SampleDecoder(vit_bundles[1].train_transform, ["jpg"], fast_crop=True)._crop.pil_steps
    )  # colour jitter and grayscale still run, on the cropped image


def test_the_decoder_without_fast_crop_is_open_clips_transform(vit_bundles):
    assert SampleDecoder(vit_bundles[0].train_transform, ["jpg"])._crop is None  # the default for direct use
    assert SampleDecoder(lambda img: img, ["jpg"], fast_crop=True)._crop is None  # not a transform it knows


@pytest.mark.parametrize("bad,reason", [(b"\xff\xd8\xff garbage", "corrupt_image"), (b"not an image", "corrupt_image")])
def test_bad_bytes_are_a_counted_skip(vit_bundles, bad, reason):
    decoder = SampleDecoder(vit_bundles[0].train_transform, ["jpg"], fast_crop=True)
    with pytest.raises(Skip) as caught:
        decoder({"jpg": bad, "txt": b"x"}, 0)
    assert caught.value.reason == reason


def test_an_augmentation_that_fails_raises_instead_of_skipping_the_image():
    """Only what is wrong with the file is a skip; a bug in a transform step must surface."""
    from torchvision.transforms import Compose, Normalize, ToTensor

    def broken(img):
        raise TypeError("bug in an augmentation")

    tf = Compose([RandomResizedCrop(32), broken, ToTensor(), Normalize([0.5] * 3, [0.5] * 3)])
    decoder = SampleDecoder(tf, ["jpg"], fast_crop=True)
    assert decoder._crop is not None and decoder._crop.pil_steps == [broken]
    with pytest.raises(TypeError, match="bug in an augmentation"):
        decoder({"jpg": photo(60, 40), "txt": b"x"}, 0)


def test_a_truncated_jpeg_is_a_counted_skip_as_with_pil(vit_bundles):
    decoder = SampleDecoder(vit_bundles[0].train_transform, ["jpg"], fast_crop=True)
    cut = photo(200, 150)[:2000]
    with pytest.raises(OSError):
        Image.open(io.BytesIO(cut)).load()  # PIL refuses it: so must the fast path
    with pytest.raises(Skip) as caught:
        decoder({"jpg": cut, "txt": b"x"}, 0)
    assert caught.value.reason == "corrupt_image"


def test_a_decompression_bomb_is_refused(monkeypatch, vit_bundles):
    decoder = SampleDecoder(vit_bundles[0].train_transform, ["jpg"], fast_crop=True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(Skip) as caught:
        decoder({"jpg": photo(40, 30), "txt": b"x"}, 0)
    assert caught.value.reason == "image_too_large"


def test_the_trainer_crops_fast_unless_disabled(tmp_path, toy_shards):
    from clipscale.job.distributed import DistEnv
    from clipscale.train import Trainer

    env = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    with Trainer(tiny_config(tmp_path / "on", toy_shards, train__steps=1), env) as on:
        assert on.data.dataset.decoder._crop is not None and on.data.dataset.decoder._crop.dct
    with Trainer(tiny_config(tmp_path / "off", toy_shards, train__steps=1, data__fast_crop="false"), env) as off:
        assert off.data.dataset.decoder._crop is None
