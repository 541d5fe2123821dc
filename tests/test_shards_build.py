"""The shard-building CLI: inputs, skips by reason, determinism, resume after kill -9, verify, index."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipscale.shards.build import BuildOptions, build_shards
from clipscale.shards.scan import index_shards
from clipscale.shards.verify import verify_shards
from clipscale.wds.tar import iter_raw_samples

from helpers import run_cli


def pattern_image(w, h, seed):
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 255, size=(4, 4, 3)).astype(np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def read_set(out: Path) -> dict:
    """key → sample dict over every shard of a build."""
    samples = {}
    for tar in sorted(out.glob("*.tar")):
        for s in iter_raw_samples(str(tar), on_error=lambda e: (_ for _ in ()).throw(e)):
            samples[s["__key__"]] = s
    return samples


@pytest.fixture
def image_dir(tmp_path):
    """Good images of several kinds plus every kind of bad input."""
    d = tmp_path / "imgs"
    d.mkdir()
    good = {}
    for i in range(6):
        img = pattern_image(40 + i, 30 + i, i)
        img.save(d / f"good{i}.png")
        good[f"good{i}.png"] = (img, f"caption number {i}")
    cmyk = pattern_image(20, 20, 9).convert("CMYK")
    cmyk.save(d / "cmyk.jpg", quality=95)
    rgba = pattern_image(24, 24, 10).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(d / "alpha.png")
    pattern_image(16, 16, 11).convert("P").save(d / "palette.png")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    png = io.BytesIO()
    pattern_image(64, 64, 12).save(png, format="PNG")
    (d / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    (d / "empty.jpg").write_bytes(b"")
    return d, good


def write_csv(path: Path, rows: list[tuple[str, bytes]]):
    with open(path, "wb") as f:
        f.write(b"filepath,caption,source_id\n")
        for i, (fp, cap) in enumerate(rows):
            f.write(fp.encode() + b',"' + cap + b'",' + str(100 + i).encode() + b"\n")


def table_rows(good):
    rows = [(name, cap.encode()) for name, (_, cap) in good.items()]
    rows += [
        ("cmyk.jpg", b"a cmyk image"),
        ("alpha.png", b"an alpha image"),
        ("palette.png", b"a palette image"),
        ("corrupt.jpg", b"corrupt"),
        ("truncated.png", b"truncated"),
        ("missing.jpg", b"missing"),
        ("empty.jpg", b"zero bytes"),
        ("good0.png", b"   "),
        ("good1.png", b"caf\xe9 latin-1 bytes"),
    ]
    return rows


EXPECTED_SKIPS = {"corrupt_image": 2, "missing_file": 1, "empty_file": 1, "empty_caption": 1, "bad_caption": 1}


def test_csv_round_trip_and_skip_counts(image_dir, tmp_path):
    d, good = image_dir
    write_csv(d / "pairs.csv", table_rows(good))
    out = tmp_path / "out"
    stats = build_shards(str(d / "pairs.csv"), str(out), "cc", BuildOptions(samples_per_shard=4), progress=False)
    assert stats["read"] == 15 and stats["written"] == 9
    assert stats["skipped"] == EXPECTED_SKIPS
    assert stats["examples"]["missing_file"][0]["source"] == "missing.jpg"
    samples = read_set(out)
    assert len(samples) == 9 and len(set(samples)) == 9
    by_caption = {s["txt"].decode(): s for s in samples.values()}
    for name, (img, cap) in good.items():
        s = by_caption[cap]
        meta = json.loads(s["json"])
        assert meta["source"] == name and meta["width"] == img.size[0] and meta["height"] == img.size[1]
        assert meta["source_id"] is not None  # extra column carried along
        got = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"), dtype=np.float32)
        assert np.abs(got - np.asarray(img, dtype=np.float32)).mean() < 3.0  # JPEG q95 of the same pixels
    for cap in ("a cmyk image", "an alpha image", "a palette image"):
        assert Image.open(io.BytesIO(by_caption[cap]["jpg"])).mode == "RGB"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [m["file"] for m in manifest["shards"]] == [f"cc-00000{i}.tar" for i in range(4)]
    assert sum(m["samples"] for m in manifest["shards"]) == 9
    assert json.loads((out / "stats.json").read_text())["written"] == 9
    assert verify_shards(str(out)).ok


def test_no_reencode_keeps_bytes_and_resize_keeps_aspect(image_dir, tmp_path):
    d, good = image_dir
    write_csv(d / "pairs.csv", [(n, c.encode()) for n, (_, c) in good.items()])
    out = tmp_path / "raw"
    build_shards(
        str(d / "pairs.csv"), str(out), "raw", BuildOptions(samples_per_shard=10, reencode=False), progress=False
    )
    for s in read_set(out).values():
        name = json.loads(s["json"])["source"]
        assert s["png"] == (d / name).read_bytes()
    out2 = tmp_path / "small"
    build_shards(
        str(d / "pairs.csv"),
        str(out2),
        "s",
        BuildOptions(samples_per_shard=10, max_size=20, resize_side="shorter"),
        progress=False,
    )
    for s in read_set(out2).values():
        meta = json.loads(s["json"])
        w, h = Image.open(io.BytesIO(s["jpg"])).size
        assert min(w, h) == 20 and (w, h) == (meta["width"], meta["height"])
        assert abs(w / h - meta["original_width"] / meta["original_height"]) < 0.05


def test_exif_orientation_is_applied(tmp_path):
    d = tmp_path / "exif"
    d.mkdir()
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    img.save(d / "rot.jpg", exif=exif)
    (d / "rot.txt").write_text("a rotated image")
    out = tmp_path / "out"
    build_shards(str(d), str(out), "r", BuildOptions(samples_per_shard=5), progress=False)
    (sample,) = read_set(out).values()
    assert Image.open(io.BytesIO(sample["jpg"])).size == (20, 40)


@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_parquet_and_jsonl_round_trip(image_dir, tmp_path, kind):
    d, good = image_dir
    recs = [{"image": str(d / n), "text": c, "width_hint": i} for i, (n, (_, c)) in enumerate(good.items())]
    recs.append({"image": str(d / "good2.png"), "text": None, "width_hint": 99})
    path = tmp_path / f"pairs.{kind}"
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(recs), path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = tmp_path / "out"
    stats = build_shards(str(path), str(out), "p", BuildOptions(samples_per_shard=3), progress=False)
    assert stats["written"] == len(good) and stats["skipped"] == {"no_caption": 1}
    got = {s["txt"].decode(): s for s in read_set(out).values()}
    assert set(got) == {c for _, c in good.values()}
    assert all("width_hint" in json.loads(s["json"]) for s in got.values())


def test_folder_tree_with_sidecars(tmp_path):
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    pattern_image(30, 30, 1).save(root / "a" / "one.jpg")
    (root / "a" / "one.txt").write_text("first image")
    pattern_image(30, 30, 2).save(root / "a" / "b" / "two.png")
    (root / "a" / "b" / "two.json").write_text(json.dumps({"caption": "second image", "license": "cc-by"}))
    pattern_image(30, 30, 3).save(root / "three.webp")
    (root / "three.txt").write_bytes(b"\xff\xfe not utf-8")
    pattern_image(30, 30, 4).save(root / "four.jpg")  # no sidecar
    out = tmp_path / "out"
    stats = build_shards(str(root), str(out), "f", BuildOptions(samples_per_shard=2), progress=False)
    assert stats["written"] == 2
    assert stats["skipped"] == {"bad_caption": 1, "no_caption": 1}
    got = {s["txt"].decode(): json.loads(s["json"]) for s in read_set(out).values()}
    assert got["second image"]["license"] == "cc-by"
    assert got["first image"]["source"] == "a/one.jpg"


def test_missing_table_or_column_is_one_fatal_line(image_dir, tmp_path):
    d, good = image_dir
    write_csv(d / "pairs.csv", table_rows(good))
    proc = run_cli("shards", "build", "--input", str(d / "nope.csv"), "--output", str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and "input table not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(
        "shards",
        "build",
        "--input",
        str(d / "pairs.csv"),
        "--output",
        str(tmp_path / "o"),
        "--caption-col",
        "captoin",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(
        "column 'captoin' (--caption-col) not found; available columns: filepath, caption, source_id"
    )


def many_rows_csv(tmp_path, n=200):
    d = tmp_path / "many"
    d.mkdir()
    rows = []
    for i in range(n):
        pattern_image(160, 120, i).save(d / f"{i}.png")
        rows.append((f"{i}.png", f"image {i}".encode()))
    rows.insert(17, ("missing.png", b"gone"))
    write_csv(d / "pairs.csv", rows)
    return d / "pairs.csv"


def build_cmd(table, out, workers=1):
    return [
        sys.executable,
        "-m",
        "clipscale",
        "shards",
        "build",
        "--input",
        str(table),
        "--output",
        str(out),
        "--name",
        "k",
        "--samples-per-shard",
        "4",
        "--max-size",
        "64",
        "--workers",
        str(workers),
        "--no-progress",
    ]


def build_files(out: Path) -> dict:
    """Every output file's bytes except the timing-dependent ones."""
    files = {}
    for p in sorted(out.iterdir()):
        if p.name == "stats.json":
            continue
        data = p.read_bytes()
        if p.name.endswith("_stats.json"):
            data = json.loads(data)
            data.pop("seconds")
        files[p.name] = data
    return files


@pytest.mark.slow
def test_kill_and_rerun_gives_byte_identical_output(tmp_path):
    table = many_rows_csv(tmp_path)
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(build_cmd(table, ref, workers=2), check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(build_cmd(table, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*_stats.json"))) < 8:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("*_stats.json")))
    assert 8 <= done_before < 51, "the build was not interrupted mid-way"
    assert not (out / "manifest.json").exists()
    for leftover in (".k-000003_stats.json.tmp-12345", ".k-000049.tar.tmp", ".manifest.json.tmp-12345"):
        (out / leftover).write_bytes(b"{")  # what a kill at another moment leaves behind
    rerun = subprocess.run(build_cmd(table, out), check=True, capture_output=True, text=True, timeout=300)
    assert f"({done_before} reused)" in rerun.stdout or f"({done_before + 1} reused)" in rerun.stdout
    assert build_files(out) == build_files(ref)
    assert not list(out.glob(".*tmp*"))


def test_verify_catches_truncated_tar_and_manifest_mismatch(tmp_path):
    from helpers import make_shards

    make_shards(tmp_path, n_shards=3, per_shard=6)
    assert run_cli("shards", "verify", str(tmp_path)).stdout.startswith("OK: 3 shard(s), 18 samples")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["samples"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    tar = tmp_path / "toy-000002.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    proc = run_cli("shards", "verify", str(tmp_path), check=False)
    assert proc.returncode == 1
    out = proc.stdout
    assert "toy-000000.tar: manifest says 7 samples, the tar holds 6" in out
    assert "toy-000002.tar: truncated" in out
    assert "toy-000002.tar: sha256 differs from manifest.json" in out
    assert "toy-000001.tar" not in out


def make_img2dataset_layout(root: Path, shards=2, per_shard=5):
    """What img2dataset writes: 00000.tar (keys 000000000...), 00000.parquet, 00000_stats.json."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            rows = []
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                pattern_image(24, 24, s * 10 + i).save(buf, format="JPEG")
                members = {
                    "jpg": buf.getvalue(),
                    "txt": f"photo {key}".encode(),
                    "json": json.dumps(
                        {"url": f"http://x/{key}.jpg", "key": key, "status": "success", "caption": f"photo {key}"}
                    ).encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
                rows.append({"key": key, "caption": f"photo {key}", "status": "success"})
        pq.write_table(pa.Table.from_pylist(rows), root / f"{s:05d}.parquet")
        (root / f"{s:05d}_stats.json").write_text(
            json.dumps({"count": per_shard + 1, "successes": per_shard, "failed_to_download": 1})
        )


def test_img2dataset_layout_trains_and_indexes(tmp_path):
    import torch

    from clipscale.job.distributed import DistEnv
    from clipscale.model import create_model

    from helpers import make_train_data, tiny_config

    root = tmp_path / "i2d"
    make_img2dataset_layout(root)
    cfg = tiny_config(tmp_path / "run", str(root / "{00000..00001}.tar"), data__batch_size=5, data__shuffle="false")
    bundle = create_model(cfg.model)
    data = make_train_data(
        cfg, bundle.train_transform, bundle.tokenizer, DistEnv(0, 1, 0, torch.device("cpu"), None, "none")
    )
    assert data.sources[0].samples == 10  # from _stats.json, no manifest needed
    keys = [k for _ in range(2) for k in data.next()[0]["keys"]]
    assert sorted(keys) == [f"0000{s}000{i}" for s in range(2) for i in range(5)]
    path, scans = index_shards(str(root))
    assert [s.samples for s in scans] == [5, 5]
    assert verify_shards(str(root)).ok
    assert run_cli("shards", "index", str(root)).stdout.startswith(f"wrote {path}: 2 shard(s), 10 samples")


def test_inspect_reports_and_draws_a_contact_sheet(tmp_path):
    from helpers import make_shards

    make_shards(tmp_path, n_shards=2, per_shard=6)
    grid = tmp_path / "sheet.png"
    out = run_cli("shards", "inspect", str(tmp_path), "--n", "4", "--grid", str(grid)).stdout
    assert out.startswith("2 shard(s), 12 samples")
    assert "captions: 12 |" in out and "<= 64 px       12" in out
    assert "a red square" in out
    img = Image.open(grid)
    assert img.size[0] > 300 and img.size[1] > 200


def test_tools_wrapper_runs_the_cli(tmp_path):
    from helpers import REPO, make_shards

    make_shards(tmp_path, n_shards=1, per_shard=3)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "verify_shards.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.startswith("OK: 1 shard(s), 3 samples")


def test_a_rerun_after_rows_were_appended_or_changed_rebuilds_only_those_shards(tmp_path):
    """Completion used to be judged by options and tar size only: appended rows were silently dropped."""
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(14):
        pattern_image(20, 20, i).save(d / f"{i}.png")
    rows = [(f"{i}.png", f"image {i}".encode()) for i in range(10)]
    write_csv(d / "pairs.csv", rows)
    out, opts = tmp_path / "out", BuildOptions(samples_per_shard=4)
    build_shards(str(d / "pairs.csv"), str(out), "k", opts, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("k-*.tar")}
    assert sorted(mtimes) == ["k-000000.tar", "k-000001.tar", "k-000002.tar"]

    write_csv(d / "pairs.csv", rows + [(f"{i}.png", f"image {i}".encode()) for i in range(10, 14)])
    stats = build_shards(str(d / "pairs.csv"), str(out), "k", opts, progress=False)
    assert stats["written"] == 14 and stats["shards_reused"] == 2
    assert len(read_set(out)) == 14  # the appended rows are in the shards
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("k-*.tar")}
    assert after["k-000000.tar"] == mtimes["k-000000.tar"] and after["k-000001.tar"] == mtimes["k-000001.tar"]
    assert after["k-000002.tar"] != mtimes["k-000002.tar"]  # held 2 rows, now 4
    assert "k-000003.tar" in after

    changed = rows + [(f"{i}.png", f"image {i}".encode()) for i in range(10, 14)]
    changed[5] = ("5.png", b"a corrected caption")
    write_csv(d / "pairs.csv", changed)
    build_shards(str(d / "pairs.csv"), str(out), "k", opts, progress=False)
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("k-*.tar")}
    assert [n for n in sorted(again) if again[n] != after[n]] == ["k-000001.tar"]
    captions = {s["txt"].decode() for s in read_set(out).values()}
    assert "a corrected caption" in captions and "image 5" not in captions
