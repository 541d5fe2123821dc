"""The sample-key log: a file per rank, appended, cut back to a resume point in place (issue 28)."""

import json
import os

import pytest

from clipscale.metrics import MetricsLogger, cut_log_after, read_sample_keys, sample_keys_path


def write_log(path, steps, torn_tail=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for i, step in enumerate(steps):
            f.write(json.dumps({"step": step, "rank": 0, "keys": [f"k{i:06d}"] * (1 + i % 7)}) + "\n")
        if torn_tail:
            f.write('{"step": 99, "rank": 0, "ke')  # a kill in the middle of a write


@pytest.mark.parametrize("cut", [0, 1, 2, 3, 250, 499, 500, 501, 1000])
def test_the_log_is_cut_after_a_step_in_place(tmp_path, cut):
    path = tmp_path / "rank-00000.jsonl"
    steps = [s for s in range(1, 501) for _ in range(1 + s % 3)]  # several lines a step (skipped batches)
    write_log(path, steps, torn_tail=cut % 2 == 1)
    inode = os.stat(path).st_ino
    cut_log_after(path, cut)
    assert os.stat(path).st_ino == inode  # the same file, cut: not rewritten
    kept = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert kept == [s for s in steps if s <= cut]
    assert path.read_text() == "" or path.read_text().endswith("\n")


def test_each_rank_cuts_its_own_log_and_the_main_rank_those_of_ranks_gone(tmp_path):
    for rank in range(3):  # a job of 3 ranks wrote steps 1..6, resumed on 2 ranks at step 4
        write_log(sample_keys_path(tmp_path, rank), range(1, 7))
    for rank in (1, 0):
        MetricsLogger(tmp_path, is_main=rank == 0, rank=rank, world_size=2, sample_keys=True).resume_at(4)
    logs = [[json.loads(x)["step"] for x in sample_keys_path(tmp_path, k).read_text().splitlines()] for k in range(3)]
    assert logs == [[1, 2, 3, 4]] * 3
    logger = MetricsLogger(tmp_path, is_main=False, rank=1, world_size=2, sample_keys=True)
    logger.sample_keys(5, ["a", "b"], [0, 0], ["s", "s"])
    assert [r["step"] for r in read_sample_keys(tmp_path)] == [1, 2, 3, 4] + [1, 2, 3, 4, 5] + [1, 2, 3, 4]


def bytes_read_by_this_process() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def test_cutting_a_long_log_reads_a_few_lines_not_the_log(tmp_path):
    path = tmp_path / "rank-00000.jsonl"
    write_log(path, list(range(1, 40_001)))  # ~3 MB
    size = os.path.getsize(path)
    before = bytes_read_by_this_process()
    cut_log_after(path, 31_234)
    read = bytes_read_by_this_process() - before
    assert read < 64 * 1024 < size // 40, (read, size)
    assert json.loads(path.read_text().splitlines()[-1])["step"] == 31_234
