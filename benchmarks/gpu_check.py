"""The one-command GPU check (`make gpu-check`): on one GPU, offline, everything issue 30 asks a GPU to show,
into one results file.

Steps, each with its own deadline (a step that fails or runs out of time is recorded as such; the
next one still runs):
  environment   torch, CUDA, the device and its known peak; which of clipscale's packages import
  tier          `pytest -m gpu tests/test_gpu.py` (bf16 vs fp32, the exact loss at 2^20 against
                float64, FSDP2 and ZeRO-2 resume bitwise, compile vs eager)
  mfu           benchmarks/gpu.py: model step alone, ViT-B-32 and ViT-B-16 at --batch-size, eager,
                torch.compile, selective checkpointing (half the blocks); and data.gpu_decode's crops/s
                against one CPU loader worker (4,096 JPEGs of 320x256)
  exact_loss    benchmarks/gpu.py --exact-loss 1048576: time, peak memory, multiple of its matmul limit
  vs_openclip   benchmarks/vs_openclip.py on the GPU: clipscale vs open_clip_train, same shards and batch,
                ViT-B-32 and ViT-B-16; clipscale's whole-run MFU (data included) from its metrics.jsonl
The results file (`--out`/gpu-check.json) is described in docs/gpu.md; the goals of issue 30 are
evaluated in its "goals" part.

    make gpu-check                      # installs what the image lacks from gpu-wheels/, then this
    python benchmarks/gpu_check.py --out gpu-check --ref-path .gpu-ref-site
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from clipscale.job.proc import run_with_deadline  # noqa: E402

# absolute: the steps run wherever this is started from
GPU_BENCH, VS_OPENCLIP = str(ROOT / "benchmarks" / "gpu.py"), str(ROOT / "benchmarks" / "vs_openclip.py")
TIER = str(ROOT / "tests" / "test_gpu.py")
PACKAGES = ("torch", "open_clip", "timm", "webdataset", "braceexpand", "simplejpeg", "ftfy", "yaml", "deepspeed")
GOALS = {  # issue 30: name -> (what, target, comparison)
    "mfu_vit_b_16": ("training MFU, ViT-B-16, batch 512, data included", 0.45, ">="),
    "mfu_vit_b_32": ("training MFU, ViT-B-32, batch 512, data included", 0.35, ">="),
    "vs_openclip_vit_b_32": ("samples/s vs open_clip_train, ViT-B-32", 2.0, ">="),
    "vs_openclip_vit_b_16": ("samples/s vs open_clip_train, ViT-B-16", 1.5, ">="),
    "exact_loss_times_limit": ("exact loss at B = 2^20: time / its matmul limit", 1.2, "<="),
    "exact_loss_peak_gib": ("exact loss at B = 2^20: peak GiB", 16.0, "<"),
}


def clean(value):
    """JSON without NaN (benchmarks print NaN where a CPU has no figure)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def step(name: str, cmd: list[str], out: Path, timeout: float) -> dict:
    """Run one step's command with its deadline; its console goes to OUT/NAME.log."""
    log = out / f"{name}.log"
    started = time.perf_counter()
    print(f"[gpu-check] {name}: {' '.join(cmd[1:])[:160]} (deadline {timeout:.0f} s)", flush=True)
    try:  # a session of its own: at the deadline torchrun, ranks and test jobs go too
        code = run_with_deadline(cmd, timeout, log)
    except TimeoutError:
        code = "timeout"
    seconds = time.perf_counter() - started
    tail = log.read_text(errors="replace").splitlines()[-15:]
    print(f"[gpu-check] {name}: exit {code} after {seconds:.0f} s", flush=True)
    return {"exit": code, "seconds": round(seconds, 1), "log": log.name, "tail": tail}


def environment() -> dict:
    import torch

    found = {}
    for package in PACKAGES:
        try:
            module = importlib.import_module(package)
            found[package] = getattr(module, "__version__", "?")
        except Exception as exn:  # noqa: BLE001 - reported, not fatal: the steps that need it fail on their own
            found[package] = f"missing ({type(exn).__name__})"
    info = {"python": sys.version.split()[0], "packages": found, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        from clipscale.train.flops import known_peak_tflops

        name = torch.cuda.get_device_name(0)
        free, total = torch.cuda.mem_get_info(0)
        info.update(device=name, memory_gib=round(total / 2**30, 1), peak_tflops=known_peak_tflops(name))
    else:
        info["device"] = None
    return info


def tier_results(xml_path: Path) -> dict:
    """{passed, failed, skipped, tests: [{name, outcome, message}]} of pytest's JUnit XML."""
    if not xml_path.is_file():
        return {"passed": 0, "failed": 0, "skipped": 0, "tests": []}
    tests = []
    for case in ET.parse(xml_path).iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = "skipped" if tag == "skipped" else "failed"
                message = (node.get("message") or "")[:300]
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time", 0)),
                      "message": message})  # fmt: skip
    count = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    return {**count, "tests": tests}


def training_mfu(run_dir: Path, warmup: int) -> dict | None:
    """clipscale's whole-run figures (data included) from the benchmark run's metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if "mfu" in r and r["step"] > warmup]
    if not records:
        return None
    pick = {k: statistics.median(r[k] for r in records) for k in ("mfu", "tflops", "samples_per_s", "data_wait")}
    return {**pick, "peak_mem_gib": max(r["peak_mem_gib"] for r in records)}


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def goals(results: dict) -> dict:
    """Each goal of issue 30 with its measured value (None: not measured) and whether it is met."""
    vs = results.get("vs_openclip", {})
    exact = (results.get("exact_loss") or {}).get("figures") or {}
    measured = {
        "mfu_vit_b_16": ((vs.get("ViT-B-16") or {}).get("clipscale_training") or {}).get("mfu"),
        "mfu_vit_b_32": ((vs.get("ViT-B-32") or {}).get("clipscale_training") or {}).get("mfu"),
        "vs_openclip_vit_b_32": ((vs.get("ViT-B-32") or {}).get("figures") or {}).get("ratio"),
        "vs_openclip_vit_b_16": ((vs.get("ViT-B-16") or {}).get("figures") or {}).get("ratio"),
        "exact_loss_times_limit": exact.get("times_limit"),
        "exact_loss_peak_gib": exact.get("peak_gib"),
    }
    out = {}
    for key, (what, target, op) in GOALS.items():
        value = measured[key]
        met = None if value is None else {">=": value >= target, "<=": value <= target, "<": value < target}[op]
        out[key] = {"what": what, "target": f"{op} {target}", "measured": value, "met": met}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "gpu-check"))
    ap.add_argument("--batch-size", type=int, default=512, help="per-GPU batch of the MFU table and the side-by-side")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="loader workers")
    ap.add_argument("--steps", type=int, default=40, help="steps of each side-by-side run")
    ap.add_argument("--ref-path", default=str(ROOT / ".gpu-ref-site"), help="webdataset 0.2.x for open_clip_train")
    ap.add_argument("--skip", default="", help="comma-separated steps to leave out: tier,mfu,exact_loss,vs_openclip")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    skip, py = set(filter(None, args.skip.split(","))), sys.executable
    started = time.perf_counter()
    results: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "environment": environment()}
    print(f"[gpu-check] {json.dumps(results['environment'])}", flush=True)

    if "tier" not in skip:
        xml = out / "tier.xml"
        cmd = [py, "-m", "pytest", "-m", "gpu", TIER, "-q", "-rA", "-p", "no:cacheprovider",
               f"--junitxml={xml}"]  # fmt: skip
        results["tier"] = {**step("tier", cmd, out, 420), **tier_results(xml)}
    if "mfu" not in skip:
        cmd = [py, GPU_BENCH, "--models", "ViT-B-32,ViT-B-16", "--batch-size", str(args.batch_size),
               "--variants", "base,compile,ckpt-half", "--steps", "10", "--warmup", "3", "--decode", "4096",
               "--json", str(out / "mfu.json")]  # fmt: skip
        results["mfu"] = {**step("mfu", cmd, out, 360), "figures": read_json(out / "mfu.json")}
    if "exact_loss" not in skip:
        cmd = [py, GPU_BENCH, "--models", "", "--exact-loss", str(1 << 20), "--json", str(out / "exact.json")]
        results["exact_loss"] = step("exact_loss", cmd, out, 300)
        results["exact_loss"]["figures"] = (read_json(out / "exact.json") or {}).get("exact_loss")
    if "vs_openclip" not in skip:
        results["vs_openclip"] = {}
        for model in ("ViT-B-32", "ViT-B-16"):
            work, figures = out / f"vs-{model}", out / f"vs-{model}.json"
            cmd = [py, VS_OPENCLIP, "--device", "cuda", "--precision", "bf16", "--nproc", "1",
                   "--model", model, "--batch-size", str(args.batch_size), "--workers", str(args.workers),
                   "--steps", str(args.steps), "--warmup", "15", "--rounds", "1", "--workdir", str(work),
                   "--ref-path", args.ref_path, "--json", str(figures)]  # fmt: skip
            results["vs_openclip"][model] = {
                **step(f"vs_openclip-{model}", cmd, out, 300),
                "figures": read_json(figures),
                "clipscale_training": training_mfu(work / "run-clipscale-0", warmup=15),
            }
    results["goals"] = goals(results)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    path = out / "gpu-check.json"
    path.write_text(json.dumps(clean(results), indent=1))
    print(f"\n[gpu-check] {results['wall_s']:.0f} s; results in {path}")
    for goal in results["goals"].values():
        verdict = {True: "met", False: "NOT met", None: "not measured"}[goal["met"]]
        print(f"  {goal['what']:55s} {goal['target']:>8s}  measured {goal['measured']}  {verdict}")


if __name__ == "__main__":
    main()
