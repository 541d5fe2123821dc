"""Shards in an object store: a real S3-compatible server (moto's, on 127.0.0.1, started here),
reads that survive a connection cut mid-shard, globs and remote manifests, and training from s3://."""

import contextlib
import json
import os
import shutil
import subprocess
from collections import Counter

import pytest
import torch
from s3_helpers import CuttingProxy, S3Server

from clipscale.errors import CheckpointError, DataError
from clipscale.metrics import read_jsonl, read_sample_keys
from clipscale.wds import remote
from clipscale.wds.census import SourceSpec, take_census
from clipscale.wds.expand import expand
from clipscale.wds.shardlist import resolve_shards
from clipscale.wds.tar import iter_raw_samples

from process_helpers import ENV, command


@pytest.fixture(scope="module")
def s3():
    server = S3Server()
    yield server
    server.stop()
    remote.configure()


@pytest.fixture(scope="module")
def bucket_shards(s3, toy_shards):
    folder = os.path.dirname(toy_shards)
    url = s3.upload_folder(folder, "data", "toy")
    return folder, url


def samples(url):
    errors = []
    out = list(iter_raw_samples(url, errors.append))
    assert errors == []
    return out


def test_a_remote_shard_reads_as_the_local_file(s3, bucket_shards):
    folder, url = bucket_shards
    remote.configure()  # the standard environment (AWS_ENDPOINT_URL) and nothing else
    assert samples(f"{url}/toy-000001.tar") == [
        {**s, "__url__": f"{url}/toy-000001.tar"} for s in samples(f"{folder}/toy-000001.tar")
    ]


@contextlib.contextmanager
def through_cuts(s3, url, cuts, retries):
    """Reads of `url` go through a proxy that cuts `cuts` responses after 3,000 bytes, with no retries
    below clipscale's (neither botocore's nor s3fs's): the cuts reach clipscale's reader."""
    proxy = CuttingProxy(s3.port, cut_after=3000, cuts=cuts)
    try:
        options = {"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}}
        remote.configure(options, retries=retries, backoff_s=0.01)
        remote.filesystem(url)[0].retries = 1
        yield proxy
    finally:
        proxy.close()
        remote.configure()


def test_a_connection_cut_mid_shard_continues_at_the_byte_offset(s3, bucket_shards):
    folder, url = bucket_shards
    with through_cuts(s3, url, cuts=3, retries=5) as proxy:
        reader = remote.RangeReader(f"{url}/toy-000002.tar", chunk=8192)
        assert reader.read() == open(f"{folder}/toy-000002.tar", "rb").read()
        assert proxy.cut >= 1 and reader.resumed >= 1  # asked again from its offset


def test_an_object_replaced_before_a_retry_ends_the_shard_instead_of_splicing_two_versions(s3, bucket_shards):
    folder, url = bucket_shards
    first, second = (open(f"{folder}/toy-00000{i}.tar", "rb").read() for i in (1, 2))
    s3.client().put_object(Bucket="data", Key="changing/replaced.tar", Body=first)
    with through_cuts(s3, url, cuts=1, retries=3) as proxy:
        reader = remote.RangeReader("s3://data/changing/replaced.tar", chunk=8192)
        s3.client().put_object(Bucket="data", Key="changing/replaced.tar", Body=second)  # while it is read
        with pytest.raises(remote.ObjectChanged, match="was replaced while it was read"):
            reader.read()
        assert proxy.cut <= 1  # refused (If-Match its ETag) before or after the cut; never read on


def test_an_object_replaced_between_two_ranges_is_never_spliced(s3, bucket_shards):
    """No retry needed: the second range of a replaced object is refused (If-Match its ETag), and
    the shard ends as a counted error."""
    folder, _ = bucket_shards
    first, second = (open(f"{folder}/toy-00000{i}.tar", "rb").read() for i in (1, 2))
    s3.client().put_object(Bucket="data", Key="changing/between.tar", Body=first)
    remote.configure()
    reader = remote.RangeReader("s3://data/changing/between.tar", chunk=8192)
    assert reader.read(8192) == first[:8192]
    s3.client().put_object(Bucket="data", Key="changing/between.tar", Body=second)
    with pytest.raises(remote.ObjectChanged, match="was replaced while it was read"):
        reader.read()
    errors = []
    assert list(iter_raw_samples("s3://data/changing/between.tar", errors.append))  # the new one reads
    assert not errors


def test_in_a_versioned_bucket_a_replaced_shard_is_read_whole_as_it_was(s3, bucket_shards):
    folder, _ = bucket_shards
    first, second = (open(f"{folder}/toy-00000{i}.tar", "rb").read() for i in (1, 2))
    client = s3.client()
    client.create_bucket(Bucket="versioned")
    client.put_bucket_versioning(Bucket="versioned", VersioningConfiguration={"Status": "Enabled"})
    client.put_object(Bucket="versioned", Key="shards/000.tar", Body=first)
    remote.configure()
    reader = remote.RangeReader("s3://versioned/shards/000.tar", chunk=4096)
    head = reader.read(4096)
    client.put_object(Bucket="versioned", Key="shards/000.tar", Body=second)
    assert head + reader.read() == first  # every range from the version seen first


def test_a_read_that_keeps_failing_ends_the_shard_as_a_counted_error(s3, bucket_shards):
    _, url = bucket_shards
    with through_cuts(s3, url, cuts=1000, retries=2):
        errors = []
        list(iter_raw_samples(f"{url}/toy-000003.tar", errors.append))
        assert len(errors) == 1 and "failed 3 times" in str(errors[0])


def test_globs_and_counts_from_the_remote_manifest(s3, bucket_shards, caplog):
    folder, url = bucket_shards
    remote.configure()
    shards = resolve_shards(f"{url}/*.tar")
    local = resolve_shards(f"{folder}/toy-{{000000..000003}}.tar")
    assert [s.url.rsplit("/", 1)[-1] for s in shards] == [s.url.rsplit("/", 1)[-1] for s in local]
    assert [s.samples for s in shards] == [s.samples for s in local]
    assert "counted by reading them" not in caplog.text  # from manifest.json next to them


def test_a_remote_glob_matches_objects_not_folders(s3):
    client = s3.client()
    for key in ("globbed/a.tar", "globbed/b.tar", "globbed/nested.tar/inner.txt", "globbed/c.txt"):
        client.put_object(Bucket="data", Key=key, Body=b"x")
    remote.configure()
    assert expand("s3://data/globbed/*.tar") == ["s3://data/globbed/a.tar", "s3://data/globbed/b.tar"]


def test_a_shard_list_in_the_bucket_names_shards_beside_it(s3, bucket_shards):
    _, url = bucket_shards
    listing = "# relative lines are next to the list\ntoy-000000.tar\ntoy-{000001..000002}.tar\n"
    s3.client().put_object(Bucket="data", Key="toy/train.txt", Body=listing.encode())
    remote.configure()
    assert expand(f"@{url}/train.txt") == [f"{url}/toy-00000{i}.tar" for i in range(3)]


def test_a_missing_remote_shard_is_one_line(s3, bucket_shards):
    _, url = bucket_shards
    remote.configure()
    with pytest.raises(
        DataError,
        match=r"6 of 10 shards not found \(s3://data/toy/toy-000004.tar, s3://data/toy/toy-000005.tar, "
        r"s3://data/toy/toy-000006.tar and 3 more\)",
    ):
        resolve_shards(f"{url}/toy-{{000000..000009}}.tar")


@pytest.mark.slow
def test_two_ranks_train_from_the_bucket_through_cut_connections_as_from_local_files(s3, bucket_shards, tmp_path):
    folder, url = bucket_shards
    proxy = CuttingProxy(s3.port, cut_after=5000, cuts=4)
    try:
        runs = {}
        for name, shards, env in [
            ("local", f"{folder}/toy-{{000000..000003}}.tar", ENV),
            ("s3", f"{url}/toy-{{000000..000003}}.tar", {**ENV, **s3.env, "AWS_ENDPOINT_URL": proxy.endpoint}),
        ]:
            cmd = command(2, tmp_path / name, shards, "train.steps=6", "data.read_retries=8")
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[name] = {(r["step"], r["rank"]): r["keys"] for r in read_sample_keys(tmp_path / name)}
        assert runs["s3"] == runs["local"] and len(runs["local"]) == 12
        assert proxy.cut >= 1  # connections were cut while the shards were read
        status = json.loads((tmp_path / "s3" / "status.json").read_text())
        assert status["state"] == "finished"
    finally:
        proxy.close()


# --------------------------------------------------------------------------- checkpoints in the bucket


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def test_checkpoints_mirror_to_the_bucket_and_resume_in_an_empty_run_directory(s3, toy_shards, tmp_path):
    from clipscale.checkpoint.remote import RemoteMirror
    from clipscale.train import train

    from helpers import tiny_config

    s3.client().create_bucket(Bucket="ckpt")
    remote.configure()
    common = {"checkpoint__every_n_steps": 2, "checkpoint__keep_last": 2, "checkpoint__remote": "s3://ckpt/run1"}
    train(tiny_config(tmp_path / "first", toy_shards, train__steps=4, **common))
    shutil.copytree(tmp_path / "first", tmp_path / "here")  # the same machine: resumes from its own disk
    train(tiny_config(tmp_path / "here", toy_shards, train__steps=6, checkpoint__resume="auto",
                      checkpoint__every_n_steps=2))  # fmt: skip
    mirror = RemoteMirror("s3://ckpt/run1", keep_last=2)
    assert mirror.latest() == "step_00000004.pt"
    listed = {p.rsplit("/", 1)[-1] for p in remote.filesystem("s3://ckpt/run1")[0].ls("ckpt/run1/checkpoints")}
    assert listed == {"latest", "step_00000002.pt", "step_00000002.pt.sha256", "step_00000004.pt",
                      "step_00000004.pt.sha256"}  # fmt: skip

    # another machine: an empty run directory, the same command
    train(tiny_config(tmp_path / "elsewhere", toy_shards, train__steps=6, checkpoint__resume="auto", **common))
    assert (tmp_path / "elsewhere" / "checkpoints" / "step_00000004.pt").exists()
    assert losses(tmp_path / "elsewhere") == {s: v for s, v in losses(tmp_path / "here").items() if s > 4}  # bitwise
    assert mirror.latest() == "step_00000006.pt"
    listed = {p.rsplit("/", 1)[-1] for p in remote.filesystem("s3://ckpt/run1")[0].ls("ckpt/run1/checkpoints")}
    assert "step_00000002.pt" not in listed  # remote retention follows keep_last
    from clipscale.checkpoint.export import consolidated_weights

    from_bucket, info = consolidated_weights("s3://ckpt/run1")  # export / eval --checkpoint s3://...
    local, _ = consolidated_weights(tmp_path / "elsewhere")
    assert info["step"] == 6 and all(torch.equal(from_bucket[k], local[k]) for k in local)


def test_a_step_uploaded_again_holds_exactly_its_files_and_an_extra_object_is_damage(s3, tmp_path):
    from clipscale.checkpoint import checksum_problem
    from clipscale.checkpoint.files import checksum_path, checksums
    from clipscale.checkpoint.remote import RemoteMirror

    s3.client().create_bucket(Bucket="ckpt3")
    remote.configure()
    mirror = RemoteMirror("s3://ckpt3/r")
    local = tmp_path / "checkpoints" / "step_00000005"

    def publish(files):
        shutil.rmtree(local, ignore_errors=True)
        for rel, data in files.items():
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(data)
        checksum_path(local).write_text(json.dumps(checksums(local)))
        mirror.upload(local)

    publish({f"state/zero_pp_rank_{r}_optim_states.pt": b"old" for r in range(3)})  # 3 ranks; then a rollback
    publish({f"state/zero_pp_rank_{r}_optim_states.pt": b"new" for r in range(2)})  # the same step, 2 ranks
    listed = s3.client().list_objects_v2(Bucket="ckpt3", Prefix="r/checkpoints/step_00000005/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[-1] for o in listed) == [
        "zero_pp_rank_0_optim_states.pt",
        "zero_pp_rank_1_optim_states.pt",
    ]
    fetched = mirror.download("step_00000005", tmp_path / "fresh")
    assert checksum_problem(fetched) is None
    assert (fetched / "state" / "zero_pp_rank_1_optim_states.pt").read_bytes() == b"new"

    key = "r/checkpoints/step_00000005/state/zero_pp_rank_2_optim_states.pt"
    s3.client().put_object(Bucket="ckpt3", Key=key, Body=b"old")  # a stale object no checksum lists
    with pytest.raises(CheckpointError, match=r"step_00000005 in s3://ckpt3/r is damaged \(unexpected file state/"):
        mirror.download("step_00000005", tmp_path / "again")
    assert not (tmp_path / "again" / "step_00000005").exists()


def test_a_rollback_target_damaged_here_comes_again_from_the_bucket(s3, tmp_path):
    from clipscale.checkpoint.manager import CheckpointManager
    from clipscale.checkpoint.remote import RemoteMirror
    from clipscale.config import CheckpointConfig

    s3.client().create_bucket(Bucket="ckpt4")
    remote.configure()
    manager = CheckpointManager(tmp_path, CheckpointConfig(remote="s3://ckpt4/r"))
    for step in (2, 4):
        manager.save(step, lambda tmp, s=step: torch.save({"step": s}, tmp))
    local = tmp_path / "checkpoints" / "step_00000002.pt"
    good = local.read_bytes()
    local.write_bytes(b"bits flipped on a disk")
    target = manager.rollback_target(before_step=3)  # the local copy is damaged; the bucket's is not
    assert target == local

    class Engine:  # what restore asks of an engine: load a checkpoint, return its train state
        def load(self, path):
            return torch.load(path)

    assert manager.restore(Engine(), target) == {"step": 2}
    assert local.read_bytes() == good
    assert list((tmp_path / "checkpoints" / "abandoned").glob("step_00000002.pt.*.damaged"))  # kept, aside
    names = {o["Key"] for o in s3.client().list_objects_v2(Bucket="ckpt4", Prefix="r/")["Contents"]}
    assert "r/checkpoints/step_00000004.pt" not in names  # the later one moved aside in the bucket too
    assert any(n.startswith("r/checkpoints/abandoned/step_00000004.pt.") for n in names)
    assert RemoteMirror("s3://ckpt4/r").latest() == "step_00000002.pt"


def test_an_interrupted_upload_leaves_the_remote_latest_usable(s3, toy_shards, tmp_path):
    from clipscale.checkpoint import checksum_problem
    from clipscale.checkpoint.remote import RemoteMirror
    from clipscale.train import train

    from helpers import tiny_config

    s3.client().create_bucket(Bucket="ckpt2")
    remote.configure()
    train(tiny_config(tmp_path / "run", toy_shards, train__steps=2, checkpoint__every_n_steps=2,
                      checkpoint__remote="s3://ckpt2/r"))  # fmt: skip
    local = tmp_path / "run" / "checkpoints"
    newer = local / "step_00000009.pt"
    newer.write_bytes((local / "step_00000002.pt").read_bytes() * 2)  # a bigger upload, cut mid-way
    (local / "step_00000009.pt.sha256").write_text("{}")
    proxy = CuttingProxy(s3.port, cut_after=0, cuts=10**6)
    try:
        remote.configure(retries=1, backoff_s=0.01)
        cut = RemoteMirror(
            "s3://ckpt2/r",
            storage_options={"endpoint_url": proxy.endpoint, "config_kwargs": {"retries": {"max_attempts": 1}}},
        )
        cut._fs()[0].retries = 1
        with pytest.raises(OSError):
            cut.upload(newer)
    finally:
        proxy.close()
        remote.configure()
    mirror = RemoteMirror("s3://ckpt2/r")
    assert mirror.latest() == "step_00000002.pt"
    fetched = mirror.download("step_00000002.pt", tmp_path / "fresh")
    assert checksum_problem(fetched) is None


# --------------------------------------------------------------------------- building shards into the bucket


def test_shards_built_into_the_bucket_are_byte_identical_and_a_rerun_reuses_them(s3, tmp_path):
    from test_shards_build import build_files, pattern_image, write_csv

    from clipscale.shards.build import BuildOptions, build_shards

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(10):
        pattern_image(30, 20, i).save(d / f"{i}.png")
    write_csv(d / "pairs.csv", [(f"{i}.png", f"image {i}".encode()) for i in range(10)])
    s3.client().create_bucket(Bucket="builds")
    remote.configure()
    opts = BuildOptions(samples_per_shard=4)
    build_shards(str(d / "pairs.csv"), str(tmp_path / "local"), "k", opts, progress=False)
    first = build_shards(str(d / "pairs.csv"), "s3://builds/set1", "k", opts, progress=False)
    fs, _ = remote.filesystem("s3://builds/set1")
    fs.get("builds/set1/", str(tmp_path / "fetched") + "/", recursive=True)
    assert first["shards_reused"] == 0
    assert build_files(tmp_path / "fetched") == build_files(tmp_path / "local")
    again = build_shards(str(d / "pairs.csv"), "s3://builds/set1", "k", opts, progress=False)
    assert again["shards_reused"] == 3  # complete shards are detected in the bucket
    assert resolve_shards("s3://builds/set1/*.tar")[0].samples == 4  # and train from there, counted by its manifest


def _read_in_child(url):
    return len(list(iter_raw_samples(url, lambda e: (_ for _ in ()).throw(e))))


def test_a_forked_worker_reads_with_its_own_filesystem(s3, bucket_shards):
    """s3fs's event loop does not survive a fork: the parent's listing must not poison the workers."""
    import multiprocessing as mp

    _, url = bucket_shards
    remote.configure()
    shards = resolve_shards(f"{url}/*.tar")  # the parent made a filesystem
    with mp.get_context("fork").Pool(2) as pool:
        counts = pool.map(_read_in_child, [s.url for s in shards])
    assert counts == [s.samples for s in shards]


@pytest.fixture
def web_shards(toy_shards):
    """The toy shards on a web server that lists no folders and ignores Range requests."""
    import functools
    import http.server
    import threading

    class NoListing(http.server.SimpleHTTPRequestHandler):
        def list_directory(self, path):
            self.send_error(403, "no listing")

        def log_message(self, *args):
            pass

    handler = functools.partial(NoListing, directory=os.path.dirname(toy_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_shards_on_a_web_server_without_listing_or_ranges(web_shards, toy_shards):
    remote.configure()
    shards = resolve_shards(f"{web_shards}/toy-{{000000..000003}}.tar")
    local = resolve_shards(toy_shards)
    assert [s.samples for s in shards] == [s.samples for s in local]
    found = take_census([SourceSpec("web", f"{web_shards}/toy-{{000000..000003}}.tar")])[0]
    assert set(found.how.values()) == {"manifest"}  # from its manifest.json: no shard read to count it
    reader = remote.RangeReader(f"{web_shards}/toy-000001.tar", chunk=4096)
    assert reader.read() == open(os.path.join(os.path.dirname(toy_shards), "toy-000001.tar"), "rb").read()
    assert not remote.has_glob(f"{web_shards}/toy-000001.tar?X-Amz-Signature=abc")


def test_checkpoints_use_their_own_storage_options(s3):
    from clipscale.checkpoint.remote import RemoteMirror

    remote.configure({"anon": True})  # a public data bucket
    try:
        fs, _ = RemoteMirror("s3://ckpt/x", storage_options={})._fs()
        assert not fs.anon and remote.filesystem("s3://data/x")[0].anon
    finally:
        remote.configure()


def test_img2dataset_stats_next_to_remote_shards_count_them(s3, tmp_path, caplog):
    from test_shards_build import make_img2dataset_layout

    folder = tmp_path / "i2d"
    make_img2dataset_layout(folder, shards=2, per_shard=5)
    url = s3.upload_folder(folder, "i2d", "set")
    remote.configure()
    shards = resolve_shards(f"{url}/{{00000..00001}}.tar")
    assert [s.samples for s in shards] == [s.samples for s in resolve_shards(f"{folder}/{{00000..00001}}.tar")]
    assert "counted by reading them" not in caplog.text  # from the stats objects, without reading the shards


def test_a_two_rank_job_asks_for_each_stats_object_once_and_its_resume_for_none(s3, tmp_path):
    """img2dataset shards in a bucket, no manifest: the counts come from the stats objects, each
    asked for once per job over both ranks (the server's own request log), cached in the run
    folder; the resumed job lists the folder once and asks for no stats object."""
    from test_shards_build import make_img2dataset_layout

    folder = tmp_path / "i2d"
    make_img2dataset_layout(folder, shards=4, per_shard=8)
    url = s3.upload_folder(folder, "counted", "set")
    shards = f"{url}/{{00000..00003}}.tar"
    env = {**ENV, **s3.env}
    run_dir = tmp_path / "run"
    for steps, settings in ((2, []), (4, ["checkpoint.resume=auto"])):
        before = len(s3.requests())
        cmd = command(2, run_dir, shards, f"train.steps={steps}", "data.batch_size=4", "checkpoint.every_n_steps=2",
                      *settings)  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        asked = s3.requests()[before:]
        stats = Counter(p for m, p in asked if m == "GET" and p.endswith("_stats.json"))
        listings = [p for m, p in asked if m == "GET" and "list-type=2" in p and "prefix=set" in p]
        if not settings:
            assert sorted(stats) == [f"/counted/set/{i:05d}_stats.json" for i in range(4)]
            assert set(stats.values()) == {1}  # once per shard per job, not per rank
        else:
            assert not stats  # the resume counted nothing: the run's cache after one listing
        assert 1 <= len(listings) <= 2, listings  # the folder (and at most a glob-free existence check)
    cache = json.loads((run_dir / "shard_counts.json").read_text())
    assert sorted(v[2] for v in cache["shards"].values()) == [8, 8, 8, 8]
