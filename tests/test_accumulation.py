"""Feature-cached accumulation: K micro-batches x 2 ranks give the gradients of one process
running the whole batch at once (the loss of the WHOLE batch, not an average of losses)."""

import pytest
import torch

from distributed_helpers import run_distributed

K, B, WORLD = 4, 3, 2


def make(loss_name, impl, grad_ckpt, world, rank=0):
    from clipscale.checkpoint.state import seed_everything
    from clipscale.config import load_config
    from clipscale.engine import build_engine
    from clipscale.job.distributed import DistEnv
    from clipscale.loss import build_loss
    from clipscale.model import create_model

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
    return build_engine(cfg, bundle.model, env), build_loss(cfg.loss), bundle.tokenizer


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
    from clipscale.train.grad_cache import forward_backward

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


def test_feature_cache_replays_the_rng_so_random_layers_get_whole_batch_gradients(tmp_path):
    """With patch dropout (random patches per forward) the re-encode of each micro-batch draws what
    its cached encode drew: the gradients are those of the loss computed over the cached features."""
    import json

    from clipscale.checkpoint.state import seed_everything
    from clipscale.config import load_config
    from clipscale.engine import build_engine
    from clipscale.job.distributed import DistEnv
    from clipscale.loss import build_loss
    from clipscale.model import create_model
    from clipscale.train.grad_cache import forward_backward

    spec = json.loads((__import__("clipscale.model", fromlist=["x"]).BUNDLED_CONFIGS / "clip-tiny.json").read_text())
    spec["vision_cfg"]["patch_dropout"] = 0.5
    (tmp_path / "clip-tiny-dropout.json").write_text(json.dumps(spec))
    cfg = load_config(
        None,
        [
            "model.name=clip-tiny-dropout",
            f"model.config_dirs=[{tmp_path}]",
            "model.precision=fp32",
            f"optim.accum_steps={K}",
        ],
    )
    env = DistEnv(0, 1, 0, torch.device("cpu"), None, "test")

    def fresh():
        seed_everything(0)
        engine = build_engine(cfg, create_model(cfg.model, cfg.loss.name).model, env)
        engine.module.train()
        return engine

    engine = fresh()
    images, tokens = whole_batch(create_model(cfg.model, cfg.loss.name).tokenizer)
    micro = [{"images": images[j * B : (j + 1) * B], "texts": tokens[j * B : (j + 1) * B]} for j in range(K)]
    torch.manual_seed(123)
    forward_backward(engine, build_loss(cfg.loss), micro)
    cached = grads_of(engine.module)
    # reference: each micro-batch encoded once, in the same order from the same RNG, with grad
    ref_engine = fresh()
    torch.manual_seed(123)
    outs = [ref_engine.forward(mb["images"], mb["texts"]) for mb in micro]
    loss = build_loss(cfg.loss)(
        torch.cat([o["image_features"] for o in outs]),
        torch.cat([o["text_features"] for o in outs]),
        outs[-1]["logit_scale"],
    )
    loss.backward()
    reference = grads_of(ref_engine.module)
    for name, g_ref in reference.items():
        err = (cached[name] - g_ref).norm() / g_ref.norm().clamp_min(1e-12)
        assert err < 1e-4, f"{name}: relative error {err:.2e}"
