"""The benchmark scripts are run by hand (figures in BENCHMARKS.md); these tests keep the parts
that could silently go wrong working: log parsing, shard patterns, the GPU script on CPU, and the
start-up benchmark (with a small shard list)."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

OPENCLIP_LOG = (
    "2026-11-23,13:25:17 | INFO | Train Epoch: 0 [ 128/7680 (2%)] Data (t): 0.189 Batch (t): 0.498, 256.805/s, "
    "128.403/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 5.2030 (5.2030) Loss: 5.2030 (5.2030)\n"
    "2026-11-23,13:25:17 | INFO | Train Epoch: 0 [ 256/7680 (3%)] Data (t): 0.004 Batch (t): 0.218, 588.283/s, "
    "294.142/s/gpu LR: 0.000200 Logit Scale: 14.284 Contrastive_loss: 5.0377 (5.1204) Loss: 5.0377 (5.1204)\n"
)


def test_openclip_log_lines_parse_into_step_rate_loss():
    from vs_openclip import OPENCLIP_LINE, loss_at, measured

    rows = [(int(m[1]) // 128, float(m[2]), float(m[3])) for m in OPENCLIP_LINE.finditer(OPENCLIP_LOG)]
    assert rows == [(1, 256.805, 5.2030), (2, 588.283, 5.0377)]
    assert measured(rows, warmup=1) == 588.283
    assert abs(loss_at(rows, [2])[0] - (5.2030 + 5.0377) / 2) < 1e-9


def test_shard_pattern_names_exactly_the_shards(tmp_path):
    import braceexpand
    from bench_data import shard_pattern

    shards = [tmp_path / f"bench-{i:06d}.tar" for i in range(12)]
    assert [Path(p) for p in braceexpand.braceexpand(shard_pattern(shards))] == shards


def test_gpu_benchmark_runs_on_cpu_as_a_smoke_test():
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "gpu.py"),
        "--device",
        "cpu",
        "--models",
        "clip-tiny",
        "--batch-size",
        "4",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--precision",
        "fp32",
        "--variants",
        "base,ckpt",
        "--loss-memory",
        "--loss-world",
        "4",
        "--loss-batches",
        "256",
        "--exact-loss",
        "300",
        "--exact-loss-chunk",
        "128",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rates = re.findall(r"clip-tiny\s+\|\s+(base|ckpt)\s+\|\s+([\d.]+)", proc.stdout)
    assert [r[0] for r in rates] == ["base", "ckpt"] and all(float(r[1]) > 0 for r in rates)
    flops = re.search(r"clip-tiny: ([\d,.]+) GFLOP per step", proc.stdout)
    assert flops and float(flops[1].replace(",", "")) > 0
    losses = re.findall(r"^\s+256 \| (full|local|chunked)\s+\|\s+nan \|\s+([\d.]+)$", proc.stdout, re.M)
    assert [r[0] for r in losses] == ["full", "local", "chunked"]
    assert re.search(r"exact chunked loss, B=300, d=512, tile 128: [\d.]+ s .* matmul limit [\d.]+ s", proc.stdout)


def test_startup_benchmark_reads_the_trainers_start_up_line(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "startup.py"), "--shards", "40", "--dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"start-up with 40 shards: [\d.]+ s; with 4 shards", proc.stdout)
    assert re.search(r"model build \(trainer's log\): [\d.]+ s; data set-up with 40 shards", proc.stdout)
    assert len(list((tmp_path / "many-40").glob("laion-*.tar"))) == 40


def test_fsync_benchmark_counts_files_plus_directories(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "checkpoint_fsync.py"), "--ranks", "8", "--dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert re.search(r"^\| 8 \| 10 \| 2 \| 12 \| 12 \| 96 \|", proc.stdout, re.M), proc.stdout


def test_count_at_scale_benchmark_counts_once_and_its_requeue_asks_for_nothing(tmp_path):
    sizes = ["--shards", "3000", "--ranks", "4", "--latency-ms", "1", "--local-shards", "300"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "count_at_scale.py"), *sizes, "--plan-remote-shards", "200"]
    cmd += ["--dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert re.search(r"first start: [\d.]+ s .* 6 LIST pages, 3,000 GET \(1\.00 per shard\), 0 HEAD", proc.stdout)
    assert re.search(r"requeue: [\d.]+ s .* 6 LIST pages, 0 GET \(0\.00 per shard\), 0 HEAD", proc.stdout)
    assert re.search(r"^laion +290 +10 +stats 290 ", proc.stdout, re.M), proc.stdout
