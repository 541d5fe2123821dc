"""Every loss implementation, in real gloo process groups of 1, 2 and 4 ranks, against open_clip's
single-process losses on the concatenated global batch (interface contract of clipscale.loss)."""

import open_clip.loss as ocl
import pytest
import torch
import torch.nn.functional as F

from distributed_helpers import run_distributed

B_PER_RANK, DIM = 6, 8
CASES = [("clip", "full"), ("clip", "local"), ("clip", "chunked"), ("siglip", "gather"), ("siglip", "ring")]


def global_inputs(world):
    g = torch.Generator().manual_seed(1234 + world)
    n = B_PER_RANK * world
    img = F.normalize(torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(n, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(7.5, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)


def make_loss(name, impl):
    from clipscale.loss import ClipLoss, SigLipLoss

    # chunk 4 does not divide the sizes: exercises ragged tiles
    return ClipLoss(impl, chunk_size=4) if name == "clip" else SigLipLoss(impl)


def rank_worker(rank, world):
    img, txt, scale, bias = global_inputs(world)
    sl = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
    out = {}
    for name, impl in CASES:
        i = img[sl].clone().requires_grad_(True)
        t = txt[sl].clone().requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        b = bias.clone().requires_grad_(True)
        loss_fn = make_loss(name, impl)
        loss = loss_fn(i, t, s, b) if name == "siglip" else loss_fn(i, t, s)
        loss.backward()
        out[(name, impl)] = {
            "loss": loss.item(),
            "img": i.grad,
            "txt": t.grad,
            "scale": s.grad.item(),
            "bias": b.grad.item() if name == "siglip" else None,
        }
    return out


def reference(name, world):
    img, txt, scale, bias = global_inputs(world)
    i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    s, b = scale.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    if name == "clip":
        loss = ocl.ClipLoss()(i, t, s)
    else:
        loss = ocl.SigLipLoss()(i, t, s, b)
    loss.backward()
    return {
        "loss": loss.item(),
        "img": i.grad,
        "txt": t.grad,
        "scale": s.grad.item(),
        "bias": b.grad.item() if name == "siglip" else None,
    }


@pytest.mark.parametrize("world", [1, 2, 4])
def test_losses_match_single_process_reference(world):
    results = run_distributed(rank_worker, world)
    for name, impl in CASES:
        ref = reference(name, world)
        per_rank = [r[(name, impl)] for r in results]
        mean_loss = sum(r["loss"] for r in per_rank) / world
        assert mean_loss == pytest.approx(ref["loss"], abs=1e-10), (name, impl)
        for rank, r in enumerate(per_rank):
            sl = slice(rank * B_PER_RANK, (rank + 1) * B_PER_RANK)
            torch.testing.assert_close(r["img"], world * ref["img"][sl], atol=1e-10, rtol=0, msg=f"{name}/{impl}")
            torch.testing.assert_close(r["txt"], world * ref["txt"][sl], atol=1e-10, rtol=0, msg=f"{name}/{impl}")
        assert sum(r["scale"] for r in per_rank) / world == pytest.approx(ref["scale"], abs=1e-10), (name, impl)
        if name == "siglip":
            assert sum(r["bias"] for r in per_rank) / world == pytest.approx(ref["bias"], abs=1e-10), (name, impl)


def test_chunked_matches_full_on_a_larger_single_process_batch():
    from clipscale.loss import ClipLoss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(300, 32, generator=g), dim=-1)
    txt = F.normalize(img + torch.randn(300, 32, generator=g), dim=-1)
    grads = []
    for impl, chunk in (("full", 0), ("chunked", 64), ("chunked", 1000)):
        i, t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        s = torch.tensor(20.0, requires_grad=True)
        loss = ClipLoss(impl, chunk_size=chunk or 1)(i, t, s)
        loss.backward()
        grads.append((loss.detach(), i.grad, t.grad, s.grad))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
