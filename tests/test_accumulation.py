"""Feature-cached accumulation: K micro-batches x 2 ranks give the gradients of one process
running the whole batch at once (the loss of the WHOLE batch, not an average of losses)."""

import pytest
import torch

from distributed_helpers import run_distributed

K, B, WORLD = 4, 3, 2


def make(loss_name, impl, grad_ckpt, world, rank=0):
    from clipscale.config import load_config
    from clipscale.distributed import DistEnv
    from clipscale.engine import build_engine
    from clipscale.loss import build_loss
    from clipscale.model import create_model
    from clipscale.train import seed_everything

    cfg = load_config(
        None,
        [
            f"loss.name={loss_name}",
            f"loss.impl={impl}",
            "model.precision=fp32",
            f"model.grad_checkpointing={str(grad_ckpt).lower()}",
            f"optim.accum_steps={K}",
            "loss.chunk_size=5",
        ],
    )
    seed_everything(0)
    bundle = create_model(cfg.model, cfg.loss.name)
    env = DistEnv(rank, world, 0, torch.device("cpu"), "gloo" if world > 1 else None, "test")
    return build_engine(cfg, bundle.model, env), build_loss(cfg), bundle.tokenizer


def whole_batch(tokenizer):
    g = torch.Generator().manual_seed(7)
    n = K * B * WORLD
    images = torch.randn(n, 3, 32, 32, generator=g)
    words = ["red", "blue", "cat", "dog", "tree", "car", "sun", "seven", "house", "boat", "bird", "fish"]
    captions = [f"a {words[i % len(words)]} and a {words[(3 * i + 1) % len(words)]} number {i}" for i in range(n)]
    return images, tokenizer(captions)


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def accumulate_worker(rank, world, loss_name, impl, grad_ckpt):
    from clipscale.grad_cache import forward_backward

    engine, loss_fn, tok = make(loss_name, impl, grad_ckpt, world, rank)
    images, tokens = whole_batch(tok)
    per_rank = K * B
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    micro = [
        {"images": images[mine][j * B : (j + 1) * B], "texts": tokens[mine][j * B : (j + 1) * B]} for j in range(K)
    ]
    out = forward_backward(engine, loss_fn, micro)
    return {"grads": grads_of(engine.module), "loss": out.item()}


def reference(loss_name, impl, grad_ckpt):
    import open_clip.loss as ocl

    engine, _, tok = make(loss_name, impl, grad_ckpt, 1)
    images, tokens = whole_batch(tok)
    out = engine.module(image=images, text=tokens)
    if loss_name == "clip":
        loss = ocl.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    else:
        loss = ocl.SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    loss.backward()
    return {"grads": grads_of(engine.module), "loss": loss.item()}


@pytest.mark.parametrize(
    "loss_name, impl, grad_ckpt",
    [
        ("clip", "local", False),
        ("clip", "chunked", True),
        ("siglip", "ring", False),
    ],
)
def test_accumulated_gradients_equal_whole_batch(loss_name, impl, grad_ckpt):
    ref = reference(loss_name, impl, grad_ckpt)
    results = run_distributed(accumulate_worker, WORLD, loss_name, impl, grad_ckpt)
    assert sum(r["loss"] for r in results) / WORLD == pytest.approx(ref["loss"], rel=1e-5)
    assert results[0]["grads"].keys() == ref["grads"].keys()
    assert "logit_scale" in ref["grads"]
    for name, g_ref in ref["grads"].items():
        for r in results:  # DDP averaged: every rank holds the same gradient
            err = (r["grads"][name] - g_ref).norm() / g_ref.norm().clamp_min(1e-12)
            assert err < 1e-4, f"{name}: relative error {err:.2e}"
