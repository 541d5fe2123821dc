"""Training throughput of a ViT CLIP at FLIP patch dropout 0, 0.5 and 0.75, side by side in one run.

Each setting trains the same model (model.patch_dropout through clipscale's create_model) for a few
warm-up steps and then `--steps` timed steps of forward, CLIP loss, backward and AdamW on random
images and captions; samples/s and the ratio against patch_dropout=0 are printed. Evaluation is
unaffected by construction (PatchDropout is the identity in eval mode; tests/test_recipes.py).

    python benchmarks/patch_dropout.py                       # clip-small, batch 32, CPU
    python benchmarks/patch_dropout.py --model ViT-B-16 --batch 128 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch


def samples_per_s(model_name: str, dropout: float, batch: int, steps: int, device: str) -> float:
    from clipscale.config import ModelConfig
    from clipscale.loss import ClipLoss
    from clipscale.model import create_model

    torch.manual_seed(0)
    bundle = create_model(ModelConfig(name=model_name, patch_dropout=dropout, precision="fp32"), device=device)
    model = bundle.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = ClipLoss(impl="local")
    size = bundle.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    texts = bundle.tokenizer([f"a photo of thing {i}" for i in range(batch)]).to(device)

    def step():
        out = model(image=images, text=texts)
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="clip-small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dropouts", default="0,0.5,0.75")
    args = parser.parse_args()
    rates = {}
    for p in (float(x) for x in args.dropouts.split(",")):
        rates[p] = samples_per_s(args.model, p, args.batch, args.steps, args.device)
    base = rates[min(rates)]
    print(f"{args.model}, batch {args.batch}, {args.steps} timed steps on {args.device}")
    print("patch_dropout  samples/s  vs 0")
    for p, rate in rates.items():
        print(f"{p:13.2f}  {rate:9.1f}  {rate / base:4.2f}x")


if __name__ == "__main__":
    main()
