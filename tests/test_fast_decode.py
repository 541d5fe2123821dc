"""The data path's speed-ups (JPEG draft decode, batched ToTensor + Normalize, CPU-only seeding,
one collective for both feature gathers) must not change what training sees."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from clipscale.data.jpeg import decode_image
from clipscale.data.samples import SampleDecoder, split_to_tensor_tail
from clipscale.job.distributed import DistEnv
from clipscale.model import create_model

from helpers import tiny_config


def jpeg(width: int, height: int, seed: int = 0, fmt: str = "JPEG") -> bytes:
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_bundle():
    return create_model(tiny_config("/tmp/unused", "x").model)


def decode_batch(decoder: SampleDecoder, samples: list[dict]) -> torch.Tensor:
    """What the model gets: collated in the worker, finished on the training device."""
    return decoder.to_model_input(
        decoder.collate([decoder(s, 1000 + i)[0] for i, s in enumerate(samples)]), torch.device("cpu")
    )


def test_batched_tensorize_is_bitwise_the_per_sample_transform(tiny_bundle):
    samples = [{"jpg": jpeg(40 + 9 * i, 30 + 5 * i, seed=i), "txt": b"a cat"} for i in range(6)]
    tf = tiny_bundle.train_transform
    assert split_to_tensor_tail(tf) is not None  # open_clip's transform takes the batched path
    decoder = SampleDecoder(tf, ["jpg"])
    sent = decoder.collate([decoder(s, 1000 + i)[0] for i, s in enumerate(samples)])
    assert sent.dtype == torch.uint8 and sent.shape == (6, 32, 32, 3)  # pixels cross the process boundary
    fast = decode_batch(decoder, samples)
    # a plain function is not a Compose: the per-sample path, i.e. exactly open_clip's transform
    reference = decode_batch(SampleDecoder(lambda img: tf(img), ["jpg"]), samples)
    assert fast.shape == (6, 3, 32, 32) and fast.dtype == torch.float32 and fast.is_contiguous()
    assert torch.equal(fast, reference)


def test_a_batch_mixing_fast_and_per_sample_images_is_still_exact(tiny_bundle):
    tf = tiny_bundle.train_transform
    decoder = SampleDecoder(tf, ["jpg"])
    images = [decoder({"jpg": jpeg(50, 40, seed=i), "txt": b"x"}, i)[0] for i in range(3)]
    torch.manual_seed(5)
    images[1] = tf(Image.open(io.BytesIO(jpeg(50, 40, seed=9))))  # as a non-RGB sample would come back
    mixed = decoder.to_model_input(decoder.collate(images), torch.device("cpu"))
    alone = decoder.to_model_input(decoder.collate([images[0]]), torch.device("cpu"))
    assert mixed.dtype == torch.float32 and torch.equal(mixed[0], alone[0]) and torch.equal(mixed[1], images[1])


def test_transforms_without_the_usual_tail_or_rgb_output_are_applied_per_sample():
    gray = T.Compose([T.Grayscale(), T.Resize((8, 8)), T.ToTensor(), T.Normalize([0.5], [0.25])])
    samples = [{"png": jpeg(20, 16, seed=i, fmt="PNG"), "txt": b"x"} for i in range(3)]
    out = decode_batch(SampleDecoder(gray, ["png"]), samples)  # head ends in mode "L": tail per sample
    expected = torch.stack([gray(Image.open(io.BytesIO(s["png"])).convert("RGB")) for s in samples])
    assert out.shape == (3, 1, 8, 8) and torch.equal(out, expected)
    assert split_to_tensor_tail(T.Compose([T.Resize(8), T.ToTensor()])) is None


def test_jpeg_draft_decodes_at_least_the_requested_size():
    data = jpeg(320, 256)
    assert decode_image(data).size == (320, 256)
    small = decode_image(data, draft_size=32)
    assert small.size == (40, 32) and small.mode == "RGB"  # 1/8 scale: both sides still >= 32
    assert decode_image(data, draft_size=100).size == (160, 128)  # 1/2: 1/4 would be 64 px < 100
    assert decode_image(jpeg(320, 256, fmt="PNG"), draft_size=32).size == (320, 256)  # PNG: no draft


def test_augmentation_is_seeded_per_sample_regardless_of_the_global_rng(tiny_bundle):
    decoder = SampleDecoder(tiny_bundle.train_transform, ["jpg"])
    sample = {"jpg": jpeg(64, 48), "txt": b"x"}
    torch.manual_seed(1)
    a = decode_batch(decoder, [sample])
    torch.manual_seed(2)
    b = decode_batch(decoder, [sample])
    c = decoder.collate([decoder(sample, 8)[0]])
    c = decoder.to_model_input(c, torch.device("cpu"))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_trainer_decodes_with_draft_at_the_model_input_size_unless_disabled(tmp_path, toy_shards):
    from clipscale.train import Trainer

    env = DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    with Trainer(tiny_config(tmp_path / "on", toy_shards, train__steps=1), env) as on:
        assert on.data.dataset.decoder.draft_size == on.bundle.image_size == 32
    with Trainer(tiny_config(tmp_path / "off", toy_shards, train__steps=1, data__jpeg_draft="false"), env) as off:
        assert off.data.dataset.decoder.draft_size is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_decompression_bomb_is_refused_on_both_paths_and_counted(monkeypatch, tiny_bundle, fmt):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS; the simplejpeg fast path must as well."""
    from clipscale.data.jpeg import decode_jpeg_fast
    from clipscale.wds.schema import Skip

    data = jpeg(40, 30, fmt=fmt)  # 1200 pixels: a bomb once the limit is 500
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)
    if fmt == "JPEG":
        with pytest.raises(Image.DecompressionBombError):
            decode_jpeg_fast(data)
    with pytest.raises(Image.DecompressionBombError):
        decode_image(data)
    decoder = SampleDecoder(tiny_bundle.train_transform, [fmt.lower().replace("jpeg", "jpg")])
    with pytest.raises(Skip) as caught:
        decoder({fmt.lower().replace("jpeg", "jpg"): data, "txt": b"a cat"}, 0)
    assert caught.value.reason == "image_too_large"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 <= 2 x 1000: decodes as PIL would
    assert decode_image(data).size == (40, 30)
