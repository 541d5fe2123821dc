"""The GPU tier (`pytest -m gpu`, run by `make gpu-check`): what only a CUDA device can show. On a machine
without one every test here is skipped with the reason; tests/test_gpu_tier.py checks that on CPUs.

Tolerances, and why:
  bf16 vs fp32 loss        2 % relative: bf16 keeps 8 mantissa bits; the towers' features carry ~0.4 %
                           relative error each, the loss (a log-sum-exp over the batch) averages them
  chunked loss at 2^20     1e-5 relative to a float64 reference (TF32 off): what float32 sums of 2^20
                           terms allow; gradients of 64 sampled rows 1e-4 of their norm
  resume                   bitwise (train.deterministic: fixed cuBLAS workspace, math attention)
  compile vs eager         0.05 absolute per step over 20 bf16 steps (kernels fuse and round differently)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from process_helpers import CURVE, kill_and_resume, losses, run


@pytest.fixture(autouse=True)
def tf32_as_it_was():
    """Tests that turn TF32 off for exactness leave it as they found it."""
    before = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="no CUDA GPU here: the GPU tier runs on a GPU machine (make gpu-check)"
    ),
]
GPU = ["train.device=cuda", "model.precision=bf16", "data.workers=2"]


@pytest.fixture(scope="module")
def shards(curve_shards):
    return curve_shards


def test_bf16_loss_is_within_2_percent_of_fp32():
    from clipscale.config import load_config
    from clipscale.loss import ClipLoss
    from clipscale.model import create_model

    torch.manual_seed(0)
    model = create_model(load_config(None, ["model.name=ViT-B-32"]).model, device="cuda").model.train()
    images, texts = torch.randn(128, 3, 224, 224, device="cuda"), torch.randint(1, 49000, (128, 77), device="cuda")
    loss_fn = ClipLoss("full")

    def loss(dtype):
        torch.manual_seed(1)  # the same patch dropout / dropout draws, if any
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None), torch.no_grad():
            out = model(image=images, text=texts)
        return loss_fn(out["image_features"].float(), out["text_features"].float(), out["logit_scale"].float()).item()

    torch.backends.cuda.matmul.allow_tf32 = False
    fp32, bf16 = loss(None), loss(torch.bfloat16)
    assert abs(bf16 - fp32) <= 0.02 * abs(fp32), (fp32, bf16)


def float64_reference(img: torch.Tensor, txt: torch.Tensor, scale: float, tile: int = 16384, cols: int = 65536):
    """The CLIP loss over the whole batch in float64, tile by tile: (loss, row log-sum-exps, column ones)."""
    n = img.shape[0]
    row_lse = torch.full((n,), -float("inf"), dtype=torch.float64, device=img.device)
    col_lse = torch.full((n,), -float("inf"), dtype=torch.float64, device=img.device)
    for i in range(0, n, tile):
        x = img[i : i + tile].double()
        for j in range(0, n, cols):
            logits = scale * (x @ txt[j : j + cols].double().T)
            row_lse[i : i + tile] = torch.logaddexp(row_lse[i : i + tile], torch.logsumexp(logits, dim=1))
            col_lse[j : j + cols] = torch.logaddexp(col_lse[j : j + cols], torch.logsumexp(logits, dim=0))
    diagonal = scale * (img.double() * txt.double()).sum(-1)
    loss = ((row_lse - diagonal).mean() + (col_lse - diagonal).mean()) / 2
    return loss.item(), row_lse, col_lse


def test_the_chunked_loss_at_a_million_is_exact_against_float64():
    from clipscale.loss import ClipLoss

    batch, dim, scale = 1 << 20, 512, 100.0
    gen = torch.Generator(device="cuda").manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, device="cuda", generator=gen), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(batch, dim, device="cuda", generator=gen), dim=-1).requires_grad_(True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = ClipLoss("chunked", chunk_size=8192)(img, txt, torch.tensor(scale, device="cuda"))
    loss.backward()
    peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    reference, row_lse, col_lse = float64_reference(img.detach(), txt.detach(), scale)
    assert abs(loss.item() - reference) <= 1e-5 * abs(reference), (loss.item(), reference)
    assert peak_gib < 16, peak_gib

    rows = torch.randint(0, batch, (64,), generator=gen, device="cuda")
    x, y = img.detach()[rows].double(), txt.detach().double()
    logits = scale * (x @ y.T)  # [64, B]
    p = torch.exp(logits - row_lse[rows, None]) + torch.exp(logits - col_lse[None, :])
    expected = scale / (2 * batch) * (p @ y - 2 * y[rows])
    got = img.grad[rows].double()
    assert ((got - expected).norm(dim=1) <= 1e-4 * expected.norm(dim=1)).all()


@pytest.mark.parametrize("engine", [["engine.name=fsdp2"], ["engine.name=deepspeed", "engine.zero_stage=2"]])
def test_one_gpu_trains_saves_and_resumes_bitwise(tmp_path, shards, engine):
    kill_and_resume(
        1, tmp_path, shards, *CURVE, *GPU, *engine, "train.deterministic=true", "model.compile=false", seed=3
    )


def test_compiled_and_eager_training_follow_the_same_loss_curve(tmp_path, shards):
    curves = {}
    for compiled in ("true", "false"):
        run(1, tmp_path / compiled, shards, *CURVE, *GPU, f"model.compile={compiled}")
        curves[compiled] = losses(tmp_path / compiled)
    assert sorted(curves["true"]) == sorted(curves["false"])
    worst = max(abs(curves["true"][s] - curves["false"][s]) for s in curves["true"])
    assert worst <= 0.05, worst
