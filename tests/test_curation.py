"""Curation over real shards with a model trained here: embed (resumable), filter by CLIP score (the
planted wrong captions go), dedup (exactly one of each planted pair stays, nothing else goes), and the
one-line errors of item 4."""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipscale.metrics import read_jsonl
from clipscale.shards import write_shards
from clipscale.shards.embeddings import ShardEmbeddings, sidecar_path
from clipscale.train import train
from clipscale.wds.manifest import read_index

from helpers import COLORS, REPO, SHAPES, cli_here, color_image, color_samples, jpeg, tiny_config, with_wrong_colour

CPU = ["--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def scorer(module_tmp):
    """A clip-tiny trained on clean colour/shape pairs: it knows which colour a caption names."""
    data = module_tmp("clean")
    write_shards(color_samples(256, seed=5, prefix="c"), data, "clean", 32)
    run = module_tmp("scorer")
    train(tiny_config(run, str(data / "clean-{000000..000007}.tar"), train__steps=80, optim__lr=2e-3,
                      schedule__warmup_steps=5, logging__every_n_steps=20))  # fmt: skip
    assert [r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r][-1] < 1.5
    return run


@pytest.fixture(scope="module")
def noisy(module_tmp):
    """128 pairs in 4 shards; every 4th caption names a wrong colour (the planted ones)."""
    samples = list(color_samples(128, seed=11, prefix="n"))
    planted = {s["__key__"] for i, s in enumerate(samples) if i % 4 == 1}
    samples = [with_wrong_colour(s) if s["__key__"] in planted else s for s in samples]
    folder = module_tmp("noisy")
    write_shards(samples, folder, "noisy", 32)
    return folder, planted


def embed(src, out, scorer, *extra):
    return cli_here("shards", "embed", str(src), str(out), "--checkpoint", str(scorer), *CPU, *extra)


def keys_in(folder: Path) -> set[str]:
    return {k for p in sorted(folder.glob("*.emb.npz")) for k in ShardEmbeddings.load(p, vectors=False).keys.tolist()}


def test_embed_then_filter_removes_mostly_the_planted_wrong_captions(tmp_path, scorer, noisy):
    src, planted = noisy
    embed(src, tmp_path / "emb", scorer, "--batch-size", "16")
    assert read_index(tmp_path / "emb" / "manifest.json")["noisy-000000.tar"].samples == 32
    table = ShardEmbeddings.load(tmp_path / "emb" / "noisy-000000.emb.npz")
    assert table.image.shape == (32, 64) and np.allclose(np.linalg.norm(table.image, axis=1), 1, atol=1e-5)
    assert np.allclose((table.image * table.text).sum(1), table.clip_score, atol=1e-5)
    done = cli_here("shards", "filter", str(tmp_path / "emb"), str(tmp_path / "kept"), "--clip-score-top", "0.75")
    assert "kept 96 of 128 samples" in done.stdout
    removed = keys_in(tmp_path / "emb") - keys_in(tmp_path / "kept")
    precision, recall = len(removed & planted) / len(removed), len(removed & planted) / len(planted)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    report = json.loads((tmp_path / "kept" / "filter_report.json").read_text())
    assert report["samples_out"] == read_index(tmp_path / "kept" / "manifest.json")["noisy-000000.tar"].samples + sum(
        r.samples for n, r in read_index(tmp_path / "kept" / "manifest.json").items() if n != "noisy-000000.tar"
    )
    assert report["just_removed"][0]["caption"].startswith("a ") and (tmp_path / "kept" / "filter_report.png").is_file()
    # one threshold over the whole input: every kept score is above every removed one
    scores = {k: s for p in (tmp_path / "emb").glob("*.emb.npz") for k, s in zip(*_scores(p))}
    assert min(scores[k] for k in keys_in(tmp_path / "kept")) >= max(scores[k] for k in removed)
    cli_here("shards", "verify", str(tmp_path / "kept"))  # valid shards with a manifest that matches


def _scores(path):
    table = ShardEmbeddings.load(path, vectors=False)
    return table.keys.tolist(), table.clip_score.tolist()


def distinct_and_planted_pairs():
    """One image of every colour (what the scorer tells apart: it embeds two shapes of one colour alike,
    so those would be near-duplicates to it), then 2 exact copies (same bytes, new key) and 2 near copies
    (re-encoded at JPEG quality 85) of some of them."""
    rng, samples = __import__("random").Random(3), []
    for color, shape in zip(COLORS, SHAPES * 3):
        data = jpeg(color_image(COLORS[color], shape, 32, rng))
        samples.append({"__key__": f"d-{color}", "jpg": data, "txt": f"a {color} {shape}"})
    pairs = []
    for i, source in enumerate(samples[:4]):
        data = source["jpg"]
        if i >= 2:
            buf = io.BytesIO()
            Image.open(io.BytesIO(data)).save(buf, format="JPEG", quality=85)
            data = buf.getvalue()
        copy = {"__key__": f"copy-{i}", "jpg": data, "txt": source["txt"]}
        pairs.append((source["__key__"], copy["__key__"]))
        samples.append(copy)
    return samples, pairs


def test_dedup_keeps_exactly_one_of_each_planted_pair_and_nothing_else_goes(tmp_path, scorer):
    samples, pairs = distinct_and_planted_pairs()
    write_shards(samples, tmp_path / "src", "d", 5)
    write_shards([{"__key__": f"e{i}", "txt": "no image"} for i in range(3)], tmp_path / "src", "empty", 5)
    embed(tmp_path / "src", tmp_path / "emb", scorer)
    done = cli_here("shards", "dedup", str(tmp_path / "emb"), str(tmp_path / "dedup"))  # cosine > 0.95
    tables = [ShardEmbeddings.load(p) for p in sorted((tmp_path / "emb").glob("*.emb.npz"))]
    assert sorted(len(t) for t in tables)[0] == 0  # the shard without images: an empty sidecar
    x = np.concatenate([t.image for t in tables if len(t)])
    assert np.sort((x @ x.T)[np.triu_indices(len(x), 1)])[-5] < 0.9  # the 4 planted pairs, then distinct ones
    kept, before = keys_in(tmp_path / "dedup"), keys_in(tmp_path / "emb")
    for a, b in pairs:
        assert (a in kept) != (b in kept), (a, b)
    assert before - kept == {k for pair in pairs for k in pair} - kept  # only members of planted pairs went
    report = json.loads((tmp_path / "dedup" / "dedup_report.json").read_text())
    assert report["exact_duplicates"] == 2 and report["semantic_duplicates"] == 2, report
    assert {p["kind"] for p in report["example_pairs"]} == {"exact", "semantic"}
    assert "kept 8 of 12 samples" in done.stdout


def test_a_resumed_embed_and_two_ranks_write_what_one_uninterrupted_process_writes(tmp_path, scorer):
    write_shards(color_samples(128, seed=21, prefix="r"), tmp_path / "src", "r", 16)
    embed(tmp_path / "src", tmp_path / "whole", scorer, "--batch-size", "4")
    cmd = [sys.executable, "-m", "clipscale", "shards", "embed", str(tmp_path / "src"), str(tmp_path / "part"),
           "--checkpoint", str(scorer), "--batch-size", "4", *CPU]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((tmp_path / "part").glob("*.emb.npz")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished_before = len(list((tmp_path / "part").glob("*.emb.npz")))
    assert 1 <= finished_before < 8 and not (tmp_path / "part" / "manifest.json").exists()
    resumed = embed(tmp_path / "src", tmp_path / "part", scorer, "--batch-size", "4")
    assert f"({finished_before} done before" in resumed.stdout
    for tar in sorted((tmp_path / "whole").glob("*.tar")):
        assert (tmp_path / "part" / tar.name).read_bytes() == tar.read_bytes(), tar.name
        a, b = ShardEmbeddings.load(sidecar_path(tar)), ShardEmbeddings.load(sidecar_path(tmp_path / "part" / tar.name))
        assert np.array_equal(a.image, b.image) and np.array_equal(a.keys, b.keys) and a.tar_sha256 == b.tar_sha256
    assert (tmp_path / "part" / "manifest.json").read_text() == (tmp_path / "whole" / "manifest.json").read_text()
    # two ranks under torchrun, each a share of the shards: the same output
    ranks = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clipscale",
             "shards", "embed", str(tmp_path / "src"), str(tmp_path / "ranks"), "--checkpoint", str(scorer),
             "--batch-size", "4", *CPU]  # fmt: skip
    done = subprocess.run(ranks, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for tar in sorted((tmp_path / "whole").glob("*.tar")):
        assert (tmp_path / "ranks" / tar.name).read_bytes() == tar.read_bytes(), tar.name
    assert (tmp_path / "ranks" / "manifest.json").read_text() == (tmp_path / "whole" / "manifest.json").read_text()


def test_bad_inputs_are_one_line_errors_and_leave_nothing_that_looks_complete(tmp_path, scorer, noisy):
    src, _ = noisy

    def fails(*args) -> str:
        proc = cli_here(*args, check=False)
        assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        return proc.stderr

    embed_hint = "clipscale shards embed"
    assert embed_hint in fails("shards", "filter", str(src), str(tmp_path / "f"), "--clip-score-top", "0.5")
    assert embed_hint in fails("shards", "dedup", str(src), str(tmp_path / "d"))
    (tmp_path / "empty").mkdir()
    assert "no .tar shards" in fails("shards", "embed", str(tmp_path / "empty"), str(tmp_path / "e"),
                                     "--checkpoint", str(scorer), *CPU)  # fmt: skip
    wrong = fails(
        "shards", "embed", str(src), str(tmp_path / "m"), "--checkpoint", str(scorer), "--model", "ViT-B-32", *CPU
    )
    assert "does not fit model 'ViT-B-32'" in wrong and not (tmp_path / "m" / "manifest.json").exists()
    for flags in ([], ["--overwrite"]):  # never into the input's own folder, not even with --overwrite
        said = fails("shards", "embed", str(src), str(src), "--checkpoint", str(scorer), *CPU, *flags)
        assert "is where the input shards are" in said
    assert len(list(src.glob("*.tar"))) == 4
    embed(src, tmp_path / "emb", scorer)
    cli_here("shards", "filter", str(tmp_path / "emb"), str(tmp_path / "kept"), "--clip-score-top", "0.5")
    assert "already holds shards" in fails("shards", "filter", str(tmp_path / "emb"), str(tmp_path / "kept"),
                                           "--clip-score-top", "0.5")  # fmt: skip
    assert "another folder" in fails("shards", "embed", str(tmp_path / "kept"), str(tmp_path / "emb"),
                                     "--checkpoint", str(scorer), *CPU)  # fmt: skip
    few_words = fails("shards", "filter", str(tmp_path / "emb"), str(tmp_path / "w"), "--clip-score-min", "-1",
                      "--min-caption-words", "4")  # fmt: skip
    assert "no sample passes" in few_words  # "a red square": 3 words each
    (tmp_path / "emb" / "manifest.json").unlink()  # as an embed stopped before its end leaves it
    assert "unfinished embedding" in fails("shards", "dedup", str(tmp_path / "emb"), str(tmp_path / "d2"))
    for name in ("f", "d", "w", "d2"):  # the refused runs wrote nothing a later step could take for a result
        assert not (tmp_path / name / "manifest.json").exists()


def test_distilling_from_stored_features_equals_the_live_teacher(tmp_path, scorer):
    """32-px images are clip-tiny's input and the crop keeps the whole image (augment scale [1, 1]): the
    training crop is then the evaluation crop `shards embed` encoded, so both teachers see the same pixels."""
    write_shards(color_samples(64, seed=31, prefix="t"), tmp_path / "src", "t", 16)
    embed(tmp_path / "src", tmp_path / "emb", scorer, "--batch-size", "16")
    teacher = sorted((scorer / "checkpoints").glob("step_*.pt"))[-1]
    same = {"train__steps": 6, "data__augment__scale": "[1.0, 1.0]", "data__workers": 1}
    live, stored = tmp_path / "live", tmp_path / "stored"
    train(tiny_config(live, str(tmp_path / "src" / "t-{000000..000003}.tar"), distill__model="clip-tiny",
                      distill__checkpoint=str(teacher), **same))  # fmt: skip
    train(tiny_config(stored, str(tmp_path / "emb" / "t-{000000..000003}.tar"), distill__source="shards", **same))
    a, b = ([r["loss"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r] for run in (live, stored))
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6, (a, b)
    plain = tmp_path / "plain"
    train(tiny_config(plain, str(tmp_path / "src" / "t-{000000..000003}.tar"), **same))
    c = [r["loss"] for r in read_jsonl(plain / "metrics.jsonl") if "loss" in r]
    assert abs(c[0] - a[0]) > 1e-3  # the distillation term is there at all


def test_stored_features_missing_from_the_shards_are_a_counted_skip_then_a_clear_stop(tmp_path, noisy):
    from clipscale.errors import DataError

    src, _ = noisy
    with pytest.raises(DataError, match="no_teacher_features"):
        train(tiny_config(tmp_path / "run", str(src / "noisy-{000000..000003}.tar"), distill__source="shards"))
