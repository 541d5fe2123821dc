"""What a run reports of its device use (FLOPs per sample, TFLOP/s, MFU, peak memory), selective
activation checkpointing, and torch.compile on a CPU."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from clipscale.config import load_config
from clipscale.metrics import read_jsonl
from clipscale.model import create_model, set_grad_checkpointing
from clipscale.train import train
from clipscale.train.flops import device_peak_tflops, flops_per_sample, known_peak_tflops, utilisation

from helpers import tiny_config


@pytest.fixture
def logged():
    """The clipscale logger's lines during the test (it does not propagate to pytest's caplog)."""
    lines = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("clipscale")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def model_cfg(*overrides):
    return load_config(None, list(overrides)).model


@pytest.mark.parametrize("name, gmacs", [("ViT-B-32", 4.41 + 2.96), ("ViT-B-16", 17.58 + 2.96)])
def test_flops_per_sample_match_open_clips_published_profile(name, gmacs):
    """open_clip's model profile (docs/model_profile.csv): forward GMACs of the image and text towers at
    224 px; training is forward + backward = 3 x forward, 2 FLOPs per multiply-add."""
    assert flops_per_sample(model_cfg(f"model.name={name}")) == pytest.approx(3 * 2 * gmacs * 1e9, rel=0.01)


def test_the_meta_count_equals_a_count_on_the_real_model_and_follows_the_training_setup():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_cfg("model.name=clip-tiny")
    model = create_model(cfg).model.train()
    size, context = model.visual.image_size, model.context_length
    size = size if isinstance(size, tuple) else (size, size)
    # the math path: torch's CPU flash-attention kernel has no FLOP formula (CUDA's kernels have)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = model(image=torch.randn(4, 3, *size), text=torch.randint(0, 100, (4, context)))
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    assert flops_per_sample(cfg, batch=2) == counter.get_total_flops() / 4

    full = flops_per_sample(model_cfg("model.name=ViT-B-16"))
    dropped = flops_per_sample(model_cfg("model.name=ViT-B-16", "model.patch_dropout=0.5"))
    locked = flops_per_sample(model_cfg("model.name=ViT-B-16", "model.lock_image=true"))
    assert 0.5 * full < dropped < 0.6 * full  # half the image tokens; the text tower stays
    assert locked < 0.5 * full  # no backward through a locked image tower


def test_mfu_arithmetic_and_device_peaks():
    figures = utilisation(flops_per_sample=1e11, samples_per_s=4000, world_size=2, peak_tflops=400)
    assert figures["tflops"] == pytest.approx(200.0)  # 1e11 x 2000 samples/s per device
    assert figures["mfu"] == pytest.approx(0.5)
    assert utilisation(1e11, 4000, 2, None)["mfu"] is None
    assert known_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert known_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert known_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert known_peak_tflops("NVIDIA GeForce GTX 1080") is None
    assert known_peak_tflops("NVIDIA L40") == 181.0 and known_peak_tflops("NVIDIA L4") == 121.0
    assert known_peak_tflops("NVIDIA H200 NVL") == 835.0 and known_peak_tflops("NVIDIA GB200") == 2500.0
    assert known_peak_tflops("NVIDIA RTX A1000") is None  # not an A100
    assert device_peak_tflops(torch.device("cpu"), None) is None
    assert device_peak_tflops(torch.device("cpu"), 2.5) == 2.5


def test_every_record_reports_tflops_mfu_peak_memory_and_data_wait(tmp_path, toy_shards, logged):
    run = tmp_path / "run"
    train(tiny_config(run, toy_shards, train__steps=6, logging__every_n_steps=3, train__peak_tflops=0.05))
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [3, 6]
    per_sample = flops_per_sample(model_cfg("model.name=clip-tiny"))
    for r in records:
        assert r["tflops"] == pytest.approx(per_sample * r["samples_per_s"] / 1e12, rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.05, rel=1e-6)
        assert 0.05 < r["peak_mem_gib"] < 64  # this process's peak resident set on a CPU
        assert 0.0 <= r["data_wait"] < 1.0
    text = "\n".join(logged)
    assert "GFLOP per sample (forward + backward), peak 0.05 TFLOP/s per device" in text
    assert "| tflops " in text and "| mfu " in text
    assert "first step" in text and "including torch.compile" not in text  # auto: no compile on a CPU


def saved_bytes(model, images, texts) -> int:
    """Bytes of activations autograd keeps for the backward of one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(image=images, text=texts)
    return total, out


def test_selective_checkpointing_keeps_gradients_and_saves_less_for_a_larger_share():
    torch.manual_seed(0)
    images, texts = torch.randn(4, 3, 32, 32), torch.randint(0, 100, (4, 32))
    grads, kept = {}, {}
    for share in (0.0, 0.5, 1.0):
        torch.manual_seed(0)
        model = create_model(model_cfg("model.name=clip-tiny")).model.train()
        set_grad_checkpointing(model, share)
        kept[share], out = saved_bytes(model, images, texts)
        (out["image_features"] @ out["text_features"].T).sum().backward()
        grads[share] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert kept[1.0] < kept[0.5] < kept[0.0], kept
    for share in (0.5, 1.0):
        assert grads[share].keys() == grads[0.0].keys()
        for name, grad in grads[share].items():
            torch.testing.assert_close(grad, grads[0.0][name], rtol=1e-5, atol=1e-6, msg=name)


NO_COMPILER = not (shutil.which("g++") or shutil.which("c++"))


@pytest.mark.slow
@pytest.mark.skipif(NO_COMPILER, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_training_on_cpu_follows_the_eager_loss_curve(tmp_path, toy_shards, logged):
    curves = {}
    for compiled in (False, True):
        run = tmp_path / f"compile-{compiled}"
        train(tiny_config(run, toy_shards, train__steps=4, model__compile=compiled, checkpoint__save_final=False))
        curves[compiled] = [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert len(curves[True]) == 4
    assert curves[True] == pytest.approx(curves[False], rel=1e-3, abs=1e-4)
    assert any("including torch.compile" in line for line in logged)


def test_training_attention_runs_through_fused_scaled_dot_product_kernels():
    """Both towers' attention in training mode reaches torch's fused SDPA kernels (flash / memory-efficient /
    cuDNN on a GPU, its flash kernel on a CPU), never a bmm + softmax of the whole score matrix."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func.__name__)
            return func(*args, **(kwargs or {}))

    model = create_model(model_cfg("model.name=clip-tiny")).model.train()
    with Ops() as ops:
        out = model(image=torch.randn(2, 3, 32, 32), text=torch.randint(0, 100, (2, 32)))
        (out["image_features"].sum() + out["text_features"].sum()).backward()
    fused = {n for n in ops.names if n.startswith("_scaled_dot_product") and "attention" in n}
    assert fused, sorted(ops.names)
    assert not {n for n in ops.names if n.split(".")[0] in ("bmm", "baddbmm", "_softmax")}, sorted(ops.names)


def test_counting_flops_leaves_the_random_streams_alone():
    """open_clip's patch dropout draws its masks on the CPU even on the meta device: a count after a resume
    restored the random state (a training stage's) must not move it."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    flops_per_sample(model_cfg("model.name=clip-tiny", "model.patch_dropout=0.5"))
    assert torch.equal(torch.get_rng_state(), before)
