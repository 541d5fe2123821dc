"""Curation figures (issue 31): deduplicating a million embeddings, and distillation from stored teacher
features against a live teacher.

  dedup     N synthetic image embeddings (d = 512, float32) around N/50 "concepts", with 5 % planted
            near-copies (cosine ~0.99 to their original) and 1 % exact copies: the time of
            `clipscale shards dedup`'s decision (exact hashes, k-means, pairs in clusters) on this machine's
            cores, and how many of the planted copies it found.
  distill   the same short training run (a student and a teacher of one input size) with the teacher run live
            (distill.model / distill.checkpoint) and read from the shards (distill.source=shards, after
            `clipscale shards embed --checkpoint TEACHER`): samples/s of each, the loss difference.

  demo      the worked example of docs/curation.md on the demo's digits: a share of the training captions
            made wrong (another digit), a scorer trained on other clean renderings (as DataComp scores with a
            CLIP trained elsewhere), `shards embed`, `shards filter`
            (top 1 - share), then the same training on the noisy and on the curated shards: the filter's
            precision and recall on the planted captions and both runs' held-out zero-shot accuracy.

    .venv/bin/python benchmarks/curation.py dedup --n 1000000
    .venv/bin/python benchmarks/curation.py distill --student clip-small --teacher clip-small --steps 40
    .venv/bin/python benchmarks/curation.py demo --wrong 0.4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))


def synthetic_tables(n: int, dim: int, seed: int = 0):
    """ShardEmbeddings of n samples in shards of 10,000, and the rows of the planted copies."""
    from clipscale.shards.embeddings import ShardEmbeddings

    rng = np.random.default_rng(seed)
    concepts = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    base = concepts[rng.integers(0, len(concepts), n)] + 1.2 * rng.standard_normal((n, dim)).astype(np.float32)
    near = rng.choice(n, n // 20, replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), near), len(near), replace=False)
    base[near] = base[originals] + 0.1 * rng.standard_normal((len(near), dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    sha1 = np.array([f"{i:040x}" for i in range(n)])
    exact = rng.choice(np.setdiff1d(np.arange(n), np.concatenate([near, originals])), n // 100, replace=False)
    sha1[exact] = sha1[(exact + 1) % n]
    score = rng.uniform(0.1, 0.4, n).astype(np.float32)
    tables = []
    for i in range(0, n, 10_000):
        rows = slice(i, i + 10_000)
        tables.append(ShardEmbeddings(np.array([f"k{j}" for j in range(i, min(n, i + 10_000))]), base[rows],
                                      base[rows][:, :0], score[rows], np.zeros(len(score[rows]), np.int32),
                                      sha1[rows]))  # fmt: skip
    return tables, near, originals, exact


def bench_dedup(args) -> None:
    import torch

    from clipscale.shards.dedup import find_duplicates

    t0 = time.perf_counter()
    tables, near, originals, exact = synthetic_tables(args.n, args.dim)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = find_duplicates(tables, args.threshold)
    seconds = time.perf_counter() - t0
    alive = found["alive"]
    pair_alive = alive[near] & alive[originals]  # a planted pair both of whose members stayed: missed
    print(
        f"dedup of {args.n:,} embeddings (d={args.dim}) on {torch.get_num_threads()} threads: {seconds:.1f} s "
        f"({found['clusters']} clusters; data made in {made:.0f} s)\n"
        f"  exact copies removed {found['exact']:,} (planted {len(exact):,}); near copies removed "
        f"{found['semantic']:,} (planted {len(near):,}, pairs with both members left: {int(pair_alive.sum()):,})"
    )


def bench_distill(args) -> None:
    from clipscale.metrics import read_jsonl
    from clipscale.shards import write_shards
    from clipscale.shards.embed import embed_shards
    from clipscale.train import train

    from helpers import color_samples, tiny_config

    work = Path(tempfile.mkdtemp(prefix="distill-bench-"))
    write_shards(color_samples(args.samples, size=args.size, seed=1), work / "src", "t", 256)
    pattern = f"t-{{000000..{args.samples // 256 - 1:06d}}}.tar"
    teacher_run = work / "teacher"
    train(tiny_config(teacher_run, str(work / "src" / pattern), model__name=args.teacher, train__steps=2,
                      logging__progress=False))  # fmt: skip
    teacher = sorted((teacher_run / "checkpoints").glob("step_*.pt"))[-1]
    t0 = time.perf_counter()
    embed_shards(str(work / "src"), str(work / "emb"), str(teacher), batch_size=256, workers=1, device="cpu",
                 progress=False)  # fmt: skip
    embed_s = time.perf_counter() - t0
    same = {"train__steps": args.steps, "data__augment__scale": "[1.0, 1.0]", "data__workers": 1,
            "data__batch_size": args.batch_size, "logging__every_n_steps": 5, "model__name": args.student}  # fmt: skip
    runs = {
        "live": tiny_config(work / "live", str(work / "src" / pattern), distill__model=args.teacher,
                            distill__checkpoint=str(teacher), **same),
        "stored": tiny_config(work / "stored", str(work / "emb" / pattern), distill__source="shards", **same),
    }  # fmt: skip
    rates, losses = {}, {}
    for name, cfg in runs.items():
        train(cfg)
        records = [r for r in read_jsonl(work / name / "metrics.jsonl") if "loss" in r]
        rates[name] = statistics.median(r["samples_per_s"] for r in records[1:])
        losses[name] = [r["loss"] for r in records]
    diff = max(abs(a - b) for a, b in zip(losses["live"], losses["stored"]))
    print(
        f"distillation, student {args.student}, teacher {args.teacher}, batch {args.batch_size}, {args.steps} steps, "
        f"{args.size}-px images, CPU:\n"
        f"  live teacher {rates['live']:.0f} samples/s, stored features {rates['stored']:.0f} samples/s "
        f"= {rates['stored'] / rates['live']:.2f}x; largest loss difference {diff:.2e}\n"
        f"  (embedding the {args.samples} samples once took {embed_s:.1f} s)"
    )


def bench_demo(args) -> None:
    import json
    import random

    from clipscale.config import load_config
    from clipscale.demo.data import build_demo_shards, load_digits_split, train_samples
    from clipscale.demo.run import DEMO_CONFIG
    from clipscale.evaluate.prompts import DIGIT_WORDS
    from clipscale.metrics import read_jsonl
    from clipscale.shards import write_shards
    from clipscale.shards.embed import embed_shards
    from clipscale.shards.embeddings import ShardEmbeddings
    from clipscale.shards.score_filter import filter_shards
    from clipscale.train import train

    work = Path(args.workdir)
    data = build_demo_shards(work / "data")
    rng, planted, samples = random.Random(7), set(), []
    for sample in train_samples(load_digits_split()[0], 4, 32, 0):
        if rng.random() < args.wrong:
            label = json.loads(sample["json"])["label"]
            sample["txt"] = f"a handwritten {DIGIT_WORDS[(label + rng.randrange(1, 10)) % 10]}"
            planted.add(sample["__key__"])
        samples.append(sample)
    write_shards(samples, work / "noisy", "digits-train", 512)
    # the scorer: as DataComp scores with a CLIP trained elsewhere, a model trained on other, clean renderings
    # of the training scans (other augmentations and captions; the held-out scans are never seen)
    write_shards(train_samples(load_digits_split()[0], 2, 32, 99), work / "reference", "digits-ref", 512)

    def run(name: str, shards: str, steps: int) -> dict:
        items = [f"run.dir={work / name}", f"data.train_shards={shards}", f"eval.zeroshot={data['test']}",
                 f"train.steps={steps}", "eval.every_n_steps=0", "logging.progress=false"]  # fmt: skip
        t0 = time.perf_counter()
        train(load_config(str(DEMO_CONFIG), items))
        final = [r for r in read_jsonl(work / name / "metrics.jsonl") if "eval/zeroshot_top1" in r][-1]
        return {"top1": final["eval/zeroshot_top1"], "seconds": time.perf_counter() - t0}

    noisy = str(work / "noisy")
    scorer = run("scorer", str(work / "reference"), args.steps // 2)
    embed_shards(noisy, str(work / "embedded"), str(work / "scorer"), workers=1, device="cpu", progress=False)
    report = filter_shards(str(work / "embedded"), str(work / "curated"), top=1 - args.wrong)
    kept = {k for p in (work / "curated").glob("*.emb.npz") for k in ShardEmbeddings.load(p, False).keys.tolist()}
    removed = {s["__key__"] for s in samples} - kept
    precision, recall = len(removed & planted) / len(removed), len(removed & planted) / len(planted)
    on_noisy, on_curated = run("on-noisy", noisy, args.steps), run("on-curated", str(work / "curated"), args.steps)
    print(
        f"{len(samples)} training pairs, {len(planted)} ({len(planted) / len(samples):.0%}) with a wrong digit; "
        f"scorer: {args.steps // 2} steps on other, clean renderings of the scans (zero-shot {scorer['top1']:.1%})\n"
        f"filter top {1 - args.wrong:.0%} (threshold {report['threshold']:.3f}): removed {len(removed)}, "
        f"precision {precision:.1%}, recall {recall:.1%} on the planted captions\n"
        f"held-out zero-shot top-1 after {args.steps} steps: noisy shards {on_noisy['top1']:.1%} "
        f"({on_noisy['seconds']:.0f} s), curated shards {on_curated['top1']:.1%} ({on_curated['seconds']:.0f} s)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("dedup")
    d.add_argument("--n", type=int, default=1_000_000)
    d.add_argument("--dim", type=int, default=512)
    d.add_argument("--threshold", type=float, default=0.95)
    t = sub.add_parser("distill")
    t.add_argument("--teacher", default="clip-small")
    t.add_argument("--student", default="clip-small", help="the teacher's input size (a live teacher reads its images)")
    t.add_argument("--size", type=int, default=64, help="image side in the shards (the models' input: 64 px)")
    t.add_argument("--steps", type=int, default=40)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--samples", type=int, default=2048)
    m = sub.add_parser("demo")
    m.add_argument("--wrong", type=float, default=0.4, help="share of training captions made wrong")
    m.add_argument("--steps", type=int, default=600)
    m.add_argument("--workdir", default=str(ROOT / ".bench" / "curation-demo"))
    args = ap.parse_args()
    {"dedup": bench_dedup, "distill": bench_distill, "demo": bench_demo}[args.what](args)


if __name__ == "__main__":
    main()
