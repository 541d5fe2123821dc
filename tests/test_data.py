import io
import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from clipscale.data.loader import TrainData
from clipscale.data.plan import StreamPlan, StreamPosition
from clipscale.data.stream import iter_source
from clipscale.errors import DataError
from clipscale.job.distributed import DistEnv
from clipscale.model import create_model
from clipscale.shards import write_shards
from clipscale.wds.shardlist import resolve_shards

from helpers import color_samples, make_shards, make_train_data, tiny_config

CPU = torch.device("cpu")


def env(rank=0, world=1):
    return DistEnv(rank=rank, world_size=world, local_rank=0, device=CPU, backend=None, launcher="none")


@pytest.fixture(scope="module")
def bundle():
    cfg = tiny_config("/tmp/unused", "x")
    return create_model(cfg.model)


def identity_transform(img):
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())


def collect(data: TrainData, n_batches: int):
    batches = [data.next()[0] for _ in range(n_batches)]
    return batches


def test_round_trip_keys_images_captions(tmp_path, bundle):
    samples = list(color_samples(24, size=16))
    write_shards(samples, tmp_path, "rt", 8)
    cfg = tiny_config(
        tmp_path / "run", str(tmp_path / "rt-{000000..000002}.tar"), data__batch_size=4, data__shuffle="false"
    )
    data = make_train_data(cfg, identity_transform, bundle.tokenizer, env())
    got = {}
    for batch in collect(data, 6):
        for key, img, tokens in zip(batch["keys"], batch["images"], batch["texts"]):
            got[key] = (img, tokens)
    assert sorted(got) == sorted(s["__key__"] for s in samples)
    for s in samples:
        img, tokens = got[s["__key__"]]
        expected = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        assert np.array_equal(img.numpy(), expected)
        assert torch.equal(tokens, bundle.tokenizer([s["txt"]])[0])


def test_two_workers_see_disjoint_samples_covering_the_set(toy_shards, bundle):
    cfg = tiny_config("/tmp/unused", toy_shards, data__workers=2, data__batch_size=8)
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, env())
    by_stream = {}
    for batch in collect(data, 8):  # 64 samples = one pass
        assert set(batch["passes"]) == {0}
        by_stream.setdefault(batch["stream"], []).extend(batch["keys"])
    assert set(by_stream) == {0, 1}
    a, b = set(by_stream[0]), set(by_stream[1])
    assert len(a) == len(by_stream[0]) == 32 and len(b) == 32
    assert not a & b
    assert len(a | b) == 64


def test_ranks_split_the_set(toy_shards, bundle):
    cfg = tiny_config("/tmp/unused", toy_shards, data__workers=1, data__batch_size=8)
    keys = []
    for rank in range(2):
        data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, env(rank, 2))
        keys.append([k for b in collect(data, 4) for k in b["keys"]])
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0]) | set(keys[1])) == 64


def test_order_depends_on_seed_and_epoch(toy_shards):
    shards = resolve_shards(toy_shards)

    def keys(seed, data_pass_start, pickled=False):
        plan = StreamPlan(shards, seed=seed, num_streams=1, block_shards=2, shuffle_buffer=8)
        if pickled:  # what a spawned or forkserver DataLoader worker receives
            plan.share(0, 0)  # a filled cache must not travel
            plan = pickle.loads(pickle.dumps(plan))
        out = []
        for sample, _ in iter_source(plan, 0, StreamPosition(), lambda u, e: None):
            out.append((sample["__pass__"], sample["__key__"]))
            if len(out) == 128:
                break
        return [k for p, k in out if p == data_pass_start]

    a0, a0_again, b0 = keys(0, 0), keys(0, 0), keys(1, 0)
    a1 = keys(0, 1)
    assert a0 == a0_again == keys(0, 0, pickled=True)
    assert a0 != b0
    assert a0 != a1 and sorted(a0) == sorted(a1)


def corrupt_shards(tmp_path):
    good = list(color_samples(10, size=16))
    good[2]["jpg"] = b"not a jpeg at all"
    good[5]["txt"] = "   "
    del good[7]["txt"]
    del good[7]["json"]
    good[8]["jpg"] = good[8]["jpg"][:40]  # truncated JPEG
    write_shards(good, tmp_path, "bad", 10)
    return str(tmp_path / "bad-000000.tar")


def test_corrupt_samples_are_skipped_and_counted(tmp_path, bundle):
    cfg = tiny_config(tmp_path / "run", corrupt_shards(tmp_path), data__batch_size=6, data__shuffle="false")
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, env())
    batch = data.next()[0]
    assert len(batch["keys"]) == 6
    assert not {"s000002", "s000005", "s000007", "s000008"} & set(batch["keys"])
    assert data.skipped() == {"corrupt_image": 2, "empty_caption": 1, "no_caption": 1}


def test_missing_shard_is_a_clear_startup_error(tmp_path):
    make_shards(tmp_path, n_shards=2, per_shard=4)
    with pytest.raises(
        DataError,
        match=r"data.train_shards: 1 of 3 shards not found \(.*toy-000002.tar\); set data.missing_shards=skip",
    ):
        resolve_shards(str(tmp_path / "toy-{000000..000002}.tar"))


def test_counts_from_other_tools_indexes(tmp_path):
    # img2dataset layout: 00000.tar + 00000_stats.json, no manifest
    d1 = tmp_path / "i2d"
    d1.mkdir()
    write_shards(color_samples(5, size=8), d1, "tmp", 5)
    (d1 / "tmp-000000.tar").rename(d1 / "00000.tar")
    (d1 / "manifest.json").unlink()
    (d1 / "00000_stats.json").write_text(json.dumps({"count": 6, "successes": 5, "failed_to_download": 1}))
    # OpenCLIP sizes.json
    d2 = tmp_path / "oc"
    write_shards(color_samples(7, size=8), d2, "x", 7)
    (d2 / "manifest.json").unlink()
    (d2 / "sizes.json").write_text(json.dumps({"x-000000.tar": 7}))
    # no index at all: counted by reading the tar
    d3 = tmp_path / "bare"
    write_shards(color_samples(3, size=8), d3, "y", 3)
    (d3 / "manifest.json").unlink()
    shards = resolve_shards(f"{d1}/00000.tar::{d2}/x-000000.tar::{d3}/y-000000.tar")
    assert [s.samples for s in shards] == [5, 7, 3]


def test_pipe_urls_are_read(tmp_path, bundle):
    pattern = make_shards(tmp_path, n_shards=2, per_shard=8)
    pipe = "::".join(f"pipe:cat {tmp_path}/toy-00000{i}.tar" for i in range(2))
    cfg = tiny_config(tmp_path / "run", pipe, data__batch_size=8, data__manifest=str(tmp_path / "manifest.json"))
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, env())
    keys = [k for b in collect(data, 2) for k in b["keys"]]
    assert len(set(keys)) == 16
    assert pattern.endswith(".tar")


def test_truncated_tar_ends_its_shard_with_a_count(tmp_path, bundle):
    make_shards(tmp_path, n_shards=2, per_shard=8)
    path = tmp_path / "toy-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    cfg = tiny_config(
        tmp_path / "run", str(tmp_path / "toy-{000000..000001}.tar"), data__batch_size=4, data__shuffle="false"
    )
    td = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, env())
    keys = [k for b in collect(td, 4) for k in b["keys"]]
    assert len(keys) == 16  # the rest came from the next pass
    assert td.skipped().get("unreadable_shard", 0) >= 1


def test_shard_urls_of_other_forms(tmp_path, monkeypatch):
    from clipscale.wds.shardlist import missing_local_shards
    from clipscale.wds.urls import local_path, shard_name

    folder = tmp_path / "my set"
    make_shards(folder, n_shards=1, per_shard=3)
    path = folder / "toy-000000.tar"
    assert local_path(f"file://{path}".replace(" ", "%20")) == str(path)
    assert local_path(f"file:{path}") == str(path) and local_path("-") is None and local_path("pipe:cat x") is None
    assert shard_name("pipe:aws s3 cp s3://b/cc12m/00012.tar -") == "00012.tar"
    assert [s.samples for s in resolve_shards(f"file://{path}".replace(" ", "%20"))] == [3]
    monkeypatch.chdir(folder)
    assert missing_local_shards(["toy-000000.tar", "toy-000001.tar"]) == ["toy-000001.tar"]


def test_a_shard_that_cannot_be_counted_is_an_error_not_a_silent_drop(tmp_path):
    make_shards(tmp_path, n_shards=1, per_shard=3)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(DataError, match="cannot count the samples of shard pipe:exit 7"):
        resolve_shards(f"{tmp_path}/toy-000000.tar::pipe:exit 7")


def test_shards_with_no_samples_are_left_out_with_a_warning(tmp_path, caplog):
    make_shards(tmp_path, n_shards=2, per_shard=3)
    import json as _json

    manifest = _json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["samples"] = 0
    (tmp_path / "manifest.json").write_text(_json.dumps(manifest))
    shards = resolve_shards(str(tmp_path / "toy-{000000..000001}.tar"))
    assert [s.url.endswith("toy-000000.tar") for s in shards] == [True]
    assert "hold no samples and are left out" in caplog.text


def test_a_stream_whose_shards_yield_nothing_gives_up_instead_of_spinning(tmp_path, bundle):
    """The manifest promises samples the tars do not hold (every read comes back empty): the stream
    stops with a clear error after a bounded number of blocks, not at 100% CPU forever."""
    import tarfile
    import time

    for i in range(3):
        with tarfile.open(tmp_path / f"hollow-{i:06d}.tar", "w"):
            pass
    manifest = {"shards": [{"file": f"hollow-{i:06d}.tar", "samples": 50} for i in range(3)]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = tiny_config(tmp_path / "run", str(tmp_path / "hollow-{000000..000002}.tar"), data__batch_size=4)
    data = make_train_data(cfg, bundle.train_transform, bundle.tokenizer, env())
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"unusable \(\{'unreadable_shard'"):
        data.next()
    assert time.perf_counter() - t0 < 60
