"""Weighted data mixtures in real training runs (torchrun, gloo on CPU): shares exact in every
global batch, every source read without replacement in its own epochs, across kill -9 and
resumes on other world sizes, changed weights, repeats."""

import json
from collections import Counter, defaultdict

import pytest

from clipscale.metrics import read_jsonl, read_sample_keys
from clipscale.shards import write_shards

from helpers import color_samples, run_cli
from process_helpers import kill_and_resume, kill_tree, logged_steps, run, start, wait_for

A_SHARDS, A_PER = 4, 10  # source a: 40 samples
B_SHARDS, B_PER = 3, 7  # source b: 21 samples


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_shards(color_samples(A_SHARDS * A_PER, size=16, seed=1, prefix="a"), root / "a", "a", A_PER)
    write_shards(color_samples(B_SHARDS * B_PER, size=16, seed=2, prefix="b"), root / "b", "b", B_PER)
    return {
        "a": (
            str(root / "a" / f"a-{{000000..{A_SHARDS - 1:06d}}}.tar"),
            {f"a{i:06d}" for i in range(A_SHARDS * A_PER)},
        ),
        "b": (
            str(root / "b" / f"b-{{000000..{B_SHARDS - 1:06d}}}.tar"),
            {f"b{i:06d}" for i in range(B_SHARDS * B_PER)},
        ),
    }


def sources_override(srcs, weights=None, repeats=None):
    items = []
    for name, (pattern, _) in srcs.items():
        extra = f", weight: {weights[name]}" if weights else f", repeat: {repeats[name]}" if repeats else ""
        items.append(f"{{name: {name}, shards: '{pattern}'{extra}}}")
    return "data.sources=[" + ", ".join(items) + "]"


def records(run_dir):
    """[(step, rank, source, pass, key)] of every sample trained on, from the sample-key log."""
    out = []
    for r in read_sample_keys(run_dir):
        out += [(r["step"], r["rank"], s, p, k) for k, s, p in zip(r["keys"], r["sources"], r["passes"])]
    return out


def check_shares(recs, steps, shares, ranks):
    """Every global batch holds exactly `shares` samples of each source; spread over ranks to one."""
    for step in steps:
        per_source = Counter(s for st, _, s, _, _ in recs if st == step)
        assert dict(per_source) == {k: v for k, v in shares.items() if v}, (step, per_source)
        for name in shares:
            per_rank = [sum(1 for st, r, s, _, _ in recs if st == step and r == rank and s == name) for rank in ranks]
            assert max(per_rank) - min(per_rank) <= 1, (step, name, per_rank)


def check_without_replacement(recs, srcs, streams):
    """No sample twice in one pass of its source; every pass before the last two complete, and the
    one before the last owes at most a few samples per stream (the streams' shares end together)."""
    by_pass = defaultdict(list)
    for _, _, s, p, k in recs:
        by_pass[(s, p)].append(k)
    for (s, p), keys in by_pass.items():
        assert len(keys) == len(set(keys)), f"source {s} pass {p}: a sample was read twice"
    for name, (_, every) in srcs.items():
        last = max(p for s, p in by_pass if s == name)
        for p in range(last):
            missing = every - set(by_pass[(name, p)])
            assert not missing or (p == last - 1 and len(missing) <= 3 * streams), (name, p, sorted(missing))
    return by_pass


MIX = [
    "model.name=clip-tiny",
    "model.precision=fp32",
    "train.device=cpu",
    "logging.every_n_steps=1",
    "logging.progress=false",
    "logging.sample_keys=true",
    "data.batch_size=4",
    "data.shuffle_buffer=8",
    "schedule.warmup_steps=2",
    "optim.lr=1e-3",
    "checkpoint.every_n_steps=3",
    "checkpoint.keep_last=0",
]


def mix_run(nproc, run_dir, srcs, *overrides, expect=0, workers=2, steps=24, weights=None):
    args = [
        sources_override(srcs, weights or {"a": 0.75, "b": 0.25}),
        f"data.workers={workers}",
        f"train.steps={steps}",
        *MIX,
        *overrides,
    ]
    return run(nproc, run_dir, None, *args, expect=expect)


@pytest.fixture(scope="module")
def weighted_run(module_tmp, two_sources):
    """One uninterrupted 2-rank run of the two sources at 0.75 / 0.25 (24 steps): what the weights do,
    and the reference of the kill-and-resume test. Read only."""
    run_dir = module_tmp("weighted")
    mix_run(2, run_dir, two_sources)
    return run_dir


@pytest.mark.slow
def test_two_sources_weights_hold_in_every_global_batch(weighted_run, two_sources):
    tmp_path = weighted_run
    recs = records(tmp_path)
    check_shares(recs, range(1, 25), {"a": 6, "b": 2}, ranks=(0, 1))
    by_pass = check_without_replacement(recs, two_sources, streams=4)
    assert max(p for s, p in by_pass if s == "a") >= 2 and max(p for s, p in by_pass if s == "b") >= 1
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["data/a/samples"] == 24 * 6 and last["data/b/samples"] == 24 * 2
    assert last["data/a/epoch"] == pytest.approx(24 * 6 / 40) and last["data/b/epoch"] == pytest.approx(48 / 21)


@pytest.fixture(scope="module")
def killed_mix(module_tmp, two_sources):
    """A 2-rank x 2-worker run of the two sources killed (SIGKILL) after step 7: (its folder, the last
    step it logged). Tests resume a copy of it."""
    run_dir = module_tmp("killed") / "run"
    return run_dir, kill_mid_run(run_dir, two_sources)


def resume_copy(killed_mix, tmp_path):
    import shutil

    source, killed_at = killed_mix
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    return killed_at


def kill_mid_run(run_dir, srcs, nproc=2, workers=2, at=7):
    proc = start(
        nproc,
        run_dir,
        None,
        sources_override(srcs, {"a": 0.75, "b": 0.25}),
        f"data.workers={workers}",
        "train.steps=24",
        *MIX,
    )
    wait_for(lambda: logged_steps(run_dir) >= at, proc)
    kill_tree(proc)
    return logged_steps(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, workers", [(1, 2), (4, 2)])
def test_kill_and_resume_on_another_world_size_keeps_every_source_epoch_exact(
    tmp_path, two_sources, killed_mix, nproc, workers
):
    killed_at = resume_copy(killed_mix, tmp_path)
    saved = (killed_at // 3) * 3
    proc = mix_run(nproc, tmp_path, two_sources, "checkpoint.resume=auto", workers=workers)
    assert "resuming on another data layout" in proc.stderr
    recs = records(tmp_path)  # the resume dropped the killed run's records after the checkpoint
    assert sorted({r[0] for r in recs}) == list(range(1, 25))
    check_shares([r for r in recs if r[0] <= saved], range(1, saved + 1), {"a": 6, "b": 2}, ranks=(0, 1))
    batch = 4 * nproc
    check_shares(
        [r for r in recs if r[0] > saved],
        range(saved + 1, 25),
        {"a": batch * 3 // 4, "b": batch // 4},
        ranks=range(nproc),
    )
    check_without_replacement(recs, two_sources, streams=max(4, nproc * workers))


@pytest.mark.slow
def test_same_stream_count_on_another_world_size_continues_the_streams(tmp_path, two_sources, killed_mix):
    """2 ranks x 2 workers -> 4 ranks x 1 worker: the same 4 streams (this crashed with an IndexError)."""
    killed_at = resume_copy(killed_mix, tmp_path)
    saved = (killed_at // 3) * 3
    proc = mix_run(4, tmp_path, two_sources, "checkpoint.resume=auto", workers=1)
    assert "resuming on another data layout" not in proc.stderr
    recs = records(tmp_path)
    assert sorted({r[0] for r in recs}) == list(range(1, 25))
    check_shares([r for r in recs if r[0] > saved], range(saved + 1, 25), {"a": 12, "b": 4}, ranks=range(4))
    check_without_replacement(recs, two_sources, streams=4)


@pytest.mark.slow
def test_changed_weights_on_resume_keep_what_was_consumed(tmp_path, two_sources):
    mix_run(2, tmp_path, two_sources, steps=9)
    proc = mix_run(2, tmp_path, two_sources, "checkpoint.resume=auto", weights={"a": 0.5, "b": 0.5})
    assert "the data mixture changed" in proc.stderr and "a 0.5000 (was 0.7500)" in proc.stderr
    recs = records(tmp_path)
    check_shares(recs, range(1, 10), {"a": 6, "b": 2}, ranks=(0, 1))
    check_shares(recs, range(10, 25), {"a": 4, "b": 4}, ranks=(0, 1))
    check_without_replacement(recs, two_sources, streams=4)
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["data/a/samples"] == 9 * 6 + 15 * 4 and last["data/b/samples"] == 9 * 2 + 15 * 4


@pytest.mark.slow
def test_repeat_reads_each_source_its_number_of_times_per_mixture_epoch(tmp_path, two_sources):
    # a once, b twice per mixture epoch of 40 + 42 samples: shares 40/82 and 42/82 of every batch
    pattern_args = sources_override(two_sources, repeats={"a": 1, "b": 2})
    run(2, tmp_path, None, pattern_args, "data.workers=1", "train.steps=41", *MIX)
    last = read_jsonl(tmp_path / "metrics.jsonl")[-1]
    assert last["data/a/samples"] + last["data/b/samples"] == 41 * 8
    assert abs(last["data/a/samples"] - 41 * 8 * 40 / 82) < 2
    assert last["data/b/epoch"] == pytest.approx(2 * last["data/a/epoch"], rel=0.05)
    assert last["epoch"] == 41 * 8 // 82  # one epoch = the mixture epoch
    check_without_replacement(records(tmp_path), two_sources, streams=2)


@pytest.mark.slow
def test_a_mixture_resumes_bitwise_after_kill_at_the_same_layout(tmp_path, two_sources, weighted_run):
    settings = [sources_override(two_sources, {"a": 0.75, "b": 0.25}), "data.workers=2", "train.steps=24", *MIX]
    kill_and_resume(2, tmp_path, None, *settings, full=weighted_run)  # (mix_run's settings: the same run)


def test_data_plan_prints_each_source_without_training(tmp_path, two_sources):
    out = run_cli(
        "data",
        "plan",
        sources_override(two_sources, {"a": 0.75, "b": 0.25}),
        "train.steps=100",
        "data.batch_size=4",
        "--world-size",
        "2",
        "--max-repeats",
        "10",
    ).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in ("a", "b")}
    assert "40" in lines["a"] and "0.75" in lines["a"] and " 6" in lines["a"] and "15" in lines["a"]
    assert "21" in lines["b"] and "0.25" in lines["b"] and " 2" in lines["b"]
    assert "warning: source b would repeat 9.5 times" not in out  # 200 / 21 = 9.5 < 10
    out = run_cli(
        "data",
        "plan",
        sources_override(two_sources, {"a": 0.75, "b": 0.25}),
        "train.steps=1000",
        "--world-size",
        "2",
        "--max-repeats",
        "10",
    ).stdout
    assert "warning: source b would repeat" in out
    out = run_cli(
        "data", "plan", sources_override(two_sources, {"a": 0.999, "b": 0.001}), "train.steps=1", "data.batch_size=4"
    ).stdout
    assert "warning: source b would not finish one epoch" in out
    json_out = run_cli("data", "plan", sources_override(two_sources, {"a": 0.75, "b": 0.25}), "--json").stdout
    plan = json.loads(json_out)
    assert [s["name"] for s in plan["sources"]] == ["a", "b"] and plan["sources"][0]["samples"] == 40


@pytest.mark.slow
def test_weights_that_do_not_divide_the_batch_hold_to_one_sample(tmp_path, two_sources):
    """0.7 / 0.3 of a global batch of 8 is 5.6 / 2.4: every batch has 5 or 6 and 2 or 3, and the
    totals follow the weights."""
    mix_run(2, tmp_path, two_sources, weights={"a": 0.7, "b": 0.3}, steps=30)
    recs = records(tmp_path)
    totals = Counter()
    for step in range(1, 31):
        counts = Counter(s for st, _, s, _, _ in recs if st == step)
        assert counts["a"] in (5, 6) and counts["b"] in (2, 3) and sum(counts.values()) == 8, (step, counts)
        totals.update(counts)
    assert abs(totals["a"] - 0.7 * 240) <= 2 and abs(totals["b"] - 0.3 * 240) <= 2
    check_without_replacement(recs, two_sources, streams=4)


def test_a_source_of_three_samples_with_a_gap_trains_at_four_streams(tmp_path, two_sources):
    """A curated 3-sample source (its second shard never arrived: missing_shards: skip) beside a big
    one, at 2 ranks x 2 workers = 4 streams: it trains, each of its passes holds its 3 samples once,
    and the gap is reported in the run status."""
    write_shards(color_samples(3, size=16, seed=3, prefix="c"), tmp_path / "c", "c", 3)
    small = {"c": (str(tmp_path / "c" / "c-{000000..000001}.tar"), {f"c{i:06d}" for i in range(3)})}
    a = {"a": two_sources["a"]}
    sources = (
        f"data.sources=[{{name: a, shards: '{a['a'][0]}', weight: 0.75}}, "
        f"{{name: c, shards: '{small['c'][0]}', weight: 0.25, missing_shards: skip}}]"
    )
    run_dir = tmp_path / "run"
    run(2, run_dir, None, sources, "data.workers=2", "train.steps=9", *MIX)
    recs = records(run_dir)
    check_shares(recs, range(1, 10), {"a": 6, "c": 2}, ranks=(0, 1))
    by_pass = check_without_replacement(recs, {**a, **small}, streams=4)
    assert max(p for s, p in by_pass if s == "c") >= 4  # 18 samples of c: at least 6 passes begun
    status = json.loads((run_dir / "status.json").read_text())
    assert status["missing_shards"] == {"c": 1}
