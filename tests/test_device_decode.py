"""data.gpu_decode: JPEGs decoded in the training process on its device (here the CPU device, through the
same torchvision.io.decode_jpeg call a GPU runs), with the CPU path's crop boxes and pixels within 2 levels
of it at full decode scale; what the device path does not take stays on the CPU path."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image
from test_fast_crop import photo

from clipscale.data.device_decode import Encoded, is_deferred
from clipscale.data.samples import SampleDecoder
from clipscale.metrics import read_jsonl
from clipscale.model import create_model
from clipscale.train import train
from clipscale.wds.schema import Skip

from helpers import tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def transform():
    return create_model(tiny_config("/tmp/unused", "x", model__name="ViT-B-32").model).train_transform


def decoders(transform):
    """(device path, CPU path at full decode scale: what the device path reproduces)."""
    return (
        SampleDecoder(transform, ["jpg"], draft_size=None, fast_crop=True, gpu_decode=True),
        SampleDecoder(transform, ["jpg"], draft_size=None, fast_crop=True),
    )


def batch_of(decoder, samples, seeds):
    return decoder.to_model_input(decoder.collate([decoder(s, seed)[0] for s, seed in zip(samples, seeds)]), CPU)


def test_the_device_path_draws_the_same_boxes_and_gives_the_same_pixels_within_2_levels(transform):
    on_device, on_cpu = decoders(transform)
    samples = [{"jpg": photo(320 + 16 * i, 256 - 8 * i, seed=i), "txt": b"x"} for i in range(6)]
    seeds = list(range(100, 106))
    encoded = [on_device(s, seed)[0] for s, seed in zip(samples, seeds)]
    assert all(isinstance(e, Encoded) for e in encoded)
    assert is_deferred(on_device.collate(encoded))
    a, b = batch_of(on_device, samples, seeds), batch_of(on_cpu, samples, seeds)
    assert a.shape == b.shape == (6, 3, 224, 224) and a.dtype == torch.float32
    levels = ((a - b) * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255).abs()
    assert levels.max() <= 2.01, levels.max()
    assert levels.mean() < 0.3, levels.mean()  # float resize rounded vs torch's uint8 kernel: off by one at most
    other = batch_of(on_device, samples, [s + 50 for s in seeds])
    assert not torch.equal(a, other)  # the boxes follow the seeds


def test_other_images_in_the_batch_take_the_cpu_path(transform):
    on_device, on_cpu = decoders(transform)
    png = io.BytesIO()
    Image.open(io.BytesIO(photo(300, 240, seed=9))).save(png, format="PNG")
    samples = [{"jpg": photo(320, 256, seed=1), "txt": b"x"}, {"jpg": png.getvalue(), "txt": b"x"}]
    assert not isinstance(on_device(samples[1], 5)[0], Encoded)
    mixed = on_device.collate([on_device(s, seed)[0] for s, seed in zip(samples, (4, 5))])
    assert isinstance(mixed, torch.Tensor) and mixed.dtype == torch.uint8  # decoded in the worker, as before
    assert torch.equal(on_device.to_model_input(mixed, CPU), batch_of(on_cpu, samples, (4, 5)))


def test_a_cut_jpeg_stays_a_counted_skip(transform):
    on_device, _ = decoders(transform)
    with pytest.raises(Skip) as caught:
        on_device({"jpg": photo(200, 150)[:2000], "txt": b"x"}, 0)
    assert caught.value.reason == "corrupt_image"


def test_damage_behind_a_good_header_and_end_marker_costs_the_image_not_the_run(transform):
    on_device, _ = decoders(transform)
    good = photo(320, 256, seed=3)
    start = good.index(b"\xff\xda") + 100  # inside the entropy-coded data, after every header
    broken = good[:start] + bytes(random.Random(0).randrange(256) for _ in range(400)) + good[-2:]
    items = [on_device({"jpg": data, "txt": b"x"}, 1)[0] for data in (good, broken)]
    assert all(isinstance(e, Encoded) for e in items)
    out = on_device.to_model_input(on_device.collate(items), CPU)
    assert out.shape == (2, 3, 224, 224) and torch.isfinite(out).all()


def test_a_run_with_gpu_decode_trains_and_refuses_it_without_fast_crop(tmp_path, toy_shards):
    from clipscale.errors import ConfigError

    run = tmp_path / "run"
    train(tiny_config(run, toy_shards, train__steps=3, data__gpu_decode=True, data__workers=1))
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)
    with pytest.raises(ConfigError, match="'data.gpu_decode' needs data.fast_crop=true"):
        tiny_config(run, toy_shards, data__gpu_decode=True, data__fast_crop=False)
