"""Peak memory and time of the CLIP loss implementations (forward + backward) on CPU.

Each measurement runs in a fresh subprocess (peak RSS is a high-water mark) under an
address-space cap, so a configuration that cannot fit fails with "out of memory" instead of
swapping the machine. Multi-rank memory is shown for rank 0 of a simulated world of --world
ranks: the other ranks' features are stand-ins appended by a fake gather, exactly what rank 0
of a real job holds after all_gather.

    python benchmarks/loss_memory.py                      # B = 4k, 16k, 64k; d = 512; world 8
    python benchmarks/loss_memory.py --exact-131k         # + the exact B = 131,072 (d = 128) single-process run

The exact run is set against its matmul limit, measured in the same run: the four B x B x d
products the chunked loss cannot avoid (forward: logits; backward: logits again, p @ k, p.T @ q),
tile by tile with nothing else, at the tile size the loss uses on this device and at 4096.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

GIB = 1024**3


def simulated_rank0(batch: int, dim: int, world: int, device="cpu"):
    """(image features, text features, logit scale, gather) of rank 0 in a simulated world: the
    gather appends fixed features standing for the other ranks' (no process group needed)."""
    import torch
    import torch.nn.functional as F

    from clipscale.loss import Gather

    b = batch // world
    img = F.normalize(torch.randn(b, dim, device=device), dim=-1).requires_grad_(True)
    txt = F.normalize(torch.randn(b, dim, device=device), dim=-1).requires_grad_(True)
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    others = F.normalize(torch.randn(batch - b, dim, device=device), dim=-1) if world > 1 else None

    class SimulatedGather(Gather):
        def rank_world(self):
            return 0, world

        def __call__(self, x):
            return x if others is None else torch.cat([x, others])

        def pair(self, a, b):
            return self(a), self(b)

    return img, txt, scale, SimulatedGather()


def tile_products(q, k, tile: int) -> None:
    """The chunked loss's four B x B x d products, tile by tile, and nothing else (forward: logits;
    backward: logits again, p @ k, p.T @ q): its floor on this machine."""
    import torch

    batch = q.shape[0]
    dq, dk, buf = torch.zeros_like(q), torch.zeros_like(k), q.new_empty(tile * tile)
    for r0 in range(0, batch, tile):
        for c0 in range(0, batch, tile):
            qr, kc = q[r0 : r0 + tile], k[c0 : c0 + tile]
            logits = buf[: qr.shape[0] * kc.shape[0]].view(qr.shape[0], kc.shape[0])
            torch.mm(qr, kc.T, out=logits)
            torch.mm(qr, kc.T, out=logits)
            dq[r0 : r0 + tile].addmm_(logits, kc)
            dk[c0 : c0 + tile].addmm_(logits.T, qr)


def matmul_limit(batch: int, dim: int, tile: int) -> dict:
    import torch

    q, k = torch.randn(batch, dim), torch.randn(batch, dim)
    t0 = time.perf_counter()
    tile_products(q, k, tile)
    return {"loss": float("nan"), "seconds": time.perf_counter() - t0, "peak_bytes": 0}


def measure(impl: str, batch: int, dim: int, world: int, chunk: int) -> dict:
    """Run inside the child process: one forward+backward of rank 0's loss."""
    import torch

    from clipscale.loss import ClipLoss

    if impl == "matmul":
        return matmul_limit(batch, dim, chunk)
    torch.manual_seed(0)
    img, txt, scale, gather = simulated_rank0(batch, dim, world)
    loss_fn = ClipLoss(impl, chunk_size=chunk, gather=gather)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = loss_fn(img, txt, scale)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loss": loss.item(), "seconds": seconds, "peak_bytes": max(0, peak - base)}


def run_child(impl, batch, dim, world, chunk, mem_cap_gib, timeout) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, str(batch), str(dim), str(world), str(chunk), str(mem_cap_gib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout}s"}
    if proc.returncode != 0:
        text = proc.stderr
        oom = "can't allocate memory" in text or "MemoryError" in text or "out of memory" in text.lower()
        return {"error": "out of memory" if oom else f"failed: {text.strip().splitlines()[-1][:80]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def logits_gib(impl: str, batch: int, world: int) -> float:
    b = batch // world
    rows = {"full": batch * batch, "local": 2 * b * batch}.get(impl, 0)
    return rows * 4 / GIB


def fmt(res: dict) -> str:
    if "error" in res:
        return f"{res['error']:>22}"
    return f"{res['peak_bytes'] / GIB:8.2f} GiB {res['seconds']:8.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="4096,16384,65536")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--world", type=int, default=8, help="simulated world size (rank 0 is measured)")
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--impls", default="full,local,chunked")
    ap.add_argument("--mem-cap-gib", type=float, default=20.0, help="address-space cap of each child")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument(
        "--exact-131k",
        action="store_true",
        help="also run the exact B=131,072, d=128, single-process chunked (and full) loss",
    )
    ap.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        impl, batch, dim, world, chunk, cap = args.child
        cap_bytes = int(float(cap) * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
        print(json.dumps(measure(impl, int(batch), int(dim), int(world), int(chunk))))
        return

    impls = args.impls.split(",")
    print(
        f"CLIP loss forward+backward on CPU, d={args.dim}, rank 0 of a simulated world of {args.world}, "
        f"chunk {args.chunk}, memory cap {args.mem_cap_gib} GiB per run"
    )
    print(
        f"{'global B':>9} | " + " | ".join(f"{i + ' (peak, time)':>24}" for i in impls) + " | logits size full / local"
    )
    for batch in [int(x) for x in args.batches.split(",")]:
        cells = [
            fmt(run_child(i, batch, args.dim, args.world, args.chunk, args.mem_cap_gib, args.timeout)) for i in impls
        ]
        print(
            f"{batch:>9} | "
            + " | ".join(f"{c:>24}" for c in cells)
            + f" | {logits_gib('full', batch, args.world):.1f} / {logits_gib('local', batch, args.world):.1f} GiB",
            flush=True,
        )
    if args.exact_131k:
        batch, dim = 131072, 128
        print(
            f"\nexact single-process batch B={batch}, d={dim} (world 1): full logits alone need "
            f"{batch * batch * 4 / 1e9:.0f} GB"
        )
        from clipscale.loss import CPU_TILE

        results = {}
        for impl in ("full", "chunked"):
            results[impl] = res = run_child(impl, batch, dim, 1, args.chunk, args.mem_cap_gib, args.timeout * 4)
            extra = f"  loss {res['loss']:.4f}" if "loss" in res else ""
            print(f"  {impl:>8}: {fmt(res)}{extra}", flush=True)
        for tile in (min(args.chunk, CPU_TILE), 4096):
            res = run_child("matmul", batch, dim, 1, tile, args.mem_cap_gib, args.timeout * 4)
            line = f"  matmul limit, {tile}-wide tiles: {res.get('seconds', float('nan')):8.1f} s"
            if "seconds" in res and "seconds" in results["chunked"]:
                line += f"  (chunked loss = {res['seconds'] / results['chunked']['seconds']:.2f} of it)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
