"""Shard lists as users have them (globs, list files, gaps) and counting once per job (issue 28)."""

import json
import os
import shutil

import pytest

from clipscale.errors import DataError
from clipscale.wds.census import CACHE_NAME, SourceSpec, take_census
from clipscale.wds.expand import expand
from clipscale.wds.shardlist import resolve_shards

from helpers import make_shards


def _unindexed(folder, n=4, per_shard=5, name="s"):
    """`n` shards of `per_shard` samples with no manifest beside them: counting must find them."""
    pattern = make_shards(folder, n_shards=n, per_shard=per_shard, name=name)
    for index in ("manifest.json", "sizes.json"):
        (folder / index).unlink(missing_ok=True)
    return pattern


def test_local_globs_braces_inside_and_double_star(tmp_path):
    for sub in ("cc12m", "yfcc", "other"):
        (tmp_path / sub / "deep").mkdir(parents=True)
        for i in range(2):
            (tmp_path / sub / f"{i:05d}.tar").write_bytes(b"")
            (tmp_path / sub / "deep" / f"{i:05d}.tar").write_bytes(b"")
    assert expand(f"{tmp_path}/yfcc/*.tar") == [f"{tmp_path}/yfcc/00000.tar", f"{tmp_path}/yfcc/00001.tar"]
    both = expand(f"{tmp_path}/{{cc12m,yfcc}}/*.tar")
    assert [os.path.relpath(u, tmp_path) for u in both] == [
        "cc12m/00000.tar",
        "cc12m/00001.tar",
        "yfcc/00000.tar",
        "yfcc/00001.tar",
    ]
    assert len(expand(f"{tmp_path}/**/*.tar")) == 12
    assert expand(f"file:{tmp_path}/other/deep/*.tar") == [
        f"file:{tmp_path}/other/deep/00000.tar",
        f"file:{tmp_path}/other/deep/00001.tar",
    ]
    with pytest.raises(DataError, match=r"no file matches .*/laion/\*\.tar"):
        expand(f"{tmp_path}/laion/*.tar")


def test_list_files_name_shards_patterns_and_other_lists(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"")
    inner = tmp_path / "more.txt"
    inner.write_text("# generated\n\npipe:cat /x/{0..1}.tar\n")
    outer = tmp_path / "shards.list"
    outer.write_text(f"{tmp_path}/a.tar\n{tmp_path}/b-{{00..01}}.tar\n@{inner}\n")
    expected = [
        f"{tmp_path}/a.tar",
        f"{tmp_path}/b-00.tar",
        f"{tmp_path}/b-01.tar",
        "pipe:cat /x/0.tar",
        "pipe:cat /x/1.tar",
    ]
    assert expand(str(outer)) == expected
    assert expand(f"@{outer}::https://h/c.tar") == expected + ["https://h/c.tar"]
    with pytest.raises(DataError, match="shard list file not found: .*nope.txt"):
        expand(f"{tmp_path}/nope.txt")


def test_relative_lines_of_a_list_file_are_beside_it_and_hidden_files_and_folders_do_not_match(tmp_path, monkeypatch):
    (tmp_path / "data" / "dir.tar").mkdir(parents=True)  # a folder whose name matches the glob
    for name in ("000.tar", "001.tar", ".000.tar.tmp", ".hidden.tar"):
        (tmp_path / "data" / name).write_bytes(b"")
    (tmp_path / "data" / "train.txt").write_text("000.tar\n*.tar\n")
    monkeypatch.chdir(tmp_path)  # somewhere else: relative lines must not mean this folder
    data = str(tmp_path / "data")
    assert expand(f"{data}/train.txt") == [f"{data}/000.tar", f"{data}/000.tar", f"{data}/001.tar"]
    assert expand("data/*.tar") == ["data/000.tar", "data/001.tar"]


def test_gaps_are_an_error_that_names_the_key_or_are_skipped(tmp_path):
    pattern = make_shards(tmp_path, n_shards=6, per_shard=4)
    for i in (1, 3, 4, 5):
        (tmp_path / f"toy-{i:06d}.tar").unlink()
    with pytest.raises(DataError) as err:
        resolve_shards(pattern)
    message = str(err.value)
    assert "\n" not in message
    assert "4 of 6 shards not found" in message and "toy-000001.tar" in message and "and 1 more" in message
    assert "data.missing_shards=skip" in message
    shards = resolve_shards(pattern, missing="skip")
    assert [os.path.basename(s.url) for s in shards] == ["toy-000000.tar", "toy-000002.tar"]
    assert [s.samples for s in shards] == [4, 4]
    with pytest.raises(DataError, match=r"data.sources.1.missing_shards=skip"):
        resolve_shards(pattern, what="data.sources.1.shards")


def test_counts_are_made_once_and_reused_while_size_and_version_hold(tmp_path):
    pattern = _unindexed(tmp_path / "shards", n=4, per_shard=5)
    cache = tmp_path / "run" / CACHE_NAME
    first = take_census([SourceSpec("data.train_shards", pattern)], cache)[0]
    assert first.by_origin()["reading"] == 4 and sum(first.counts.values()) == 20
    assert cache.is_file()

    again = take_census([SourceSpec("data.train_shards", pattern)], cache)[0]
    assert again.by_origin()["cache"] == 4 and again.counts == first.counts

    # one shard replaced by a bigger one: only it is counted again
    shutil.copy(tmp_path / "shards" / "s-000000.tar", tmp_path / "big.tar")
    make_shards(tmp_path / "other", n_shards=1, per_shard=9, name="s")
    shutil.copy(tmp_path / "other" / "s-000000.tar", tmp_path / "shards" / "s-000002.tar")
    changed = take_census([SourceSpec("data.train_shards", pattern)], cache)[0]
    origin = changed.by_origin()
    assert (origin["cache"], origin["reading"]) == (3, 1)
    assert changed.counts[str(tmp_path / "shards" / "s-000002.tar")] == 9


def test_img2dataset_stats_count_a_shard_without_reading_it(tmp_path):
    folder = tmp_path / "download"
    folder.mkdir()
    _unindexed(folder, n=2, per_shard=5, name="x")
    # img2dataset names shards 00000.tar with 00000_stats.json beside them
    for i in range(2):
        os.rename(folder / f"x-{i:06d}.tar", folder / f"{i:05d}.tar")
    (folder / "00000_stats.json").write_text(json.dumps({"successes": 5, "failed_to_download": 3}))
    found = take_census([SourceSpec("data.train_shards", f"{folder}/{{00000..00001}}.tar")], None)[0]
    assert found.how[f"{folder}/00000.tar"] == "stats"
    assert found.how[f"{folder}/00001.tar"] == "reading"
    assert [found.counts[u] for u in found.urls] == [5, 5]


def test_a_shard_that_cannot_be_counted_is_one_line_naming_it(tmp_path):
    pattern = _unindexed(tmp_path, n=2, per_shard=5)
    bad = tmp_path / "s-000001.tar"
    bad.write_bytes(bad.read_bytes()[:700])  # truncated inside a member
    with pytest.raises(DataError, match=r"cannot count the samples of shard .*s-000001.tar") as err:
        take_census([SourceSpec("data.train_shards", pattern)], None)
    assert "\n" not in str(err.value)


def test_data_plan_shows_gaps_where_counts_came_from_and_estimates_past_its_budget(tmp_path):
    from helpers import cli_here

    pattern = _unindexed(tmp_path / "a", n=6, per_shard=5, name="a")
    (tmp_path / "a" / "a-000003.tar").unlink()
    common = [f"data.train_shards={pattern}", "data.missing_shards=skip", "train.steps=10", "data.batch_size=4"]

    # counting stops at once (one count in flight): the other shards are estimated, nothing cached
    first = cli_here("data", "plan", "--count-budget", "0", "--json", *common,
                     f"run.dir={tmp_path / 'run'}", "data.count_concurrency=1")  # fmt: skip
    row = json.loads(first.stdout)["sources"][0]
    assert (row["shards"], row["missing"], row["estimated_shards"]) == (5, 1, 4)
    assert row["counted_from"]["reading"] == 1 and row["samples"] == 25 and row["streams"] == 2

    cli_here("data", "plan", *common, f"run.dir={tmp_path / 'run'}")  # counts all and caches them
    again = cli_here("data", "plan", *common, f"run.dir={tmp_path / 'run'}")
    line = next(x for x in again.stdout.splitlines() if x.startswith("train"))
    assert line.split()[:5] == ["train", "5", "1", "cache", "5"]  # shards, missing, counted from the cache
    assert "not counted in the time given" not in again.stdout


def test_a_folder_names_its_shards_in_order(tmp_path):
    for name in ("b-000001.tar", "a-000000.tar", "c.tar.gz", "manifest.json", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand(str(tmp_path)) == [str(tmp_path / n) for n in ("a-000000.tar", "b-000001.tar", "c.tar.gz")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar shards"):
        expand(str(tmp_path / "empty"))
