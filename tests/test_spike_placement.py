"""The loss-spike guard skips the data that caused the spike, wherever it lies after the checkpoint
it rolls back to (issue 29, item 2): real 2-rank jobs with gradient accumulation, poison placed 1,
3 and 7 steps after a checkpoint and across a checkpoint boundary.

The poison is placed by sample key: a clean run's sample-key log says which samples every step
reads (the order does not depend on the captions), and the poisoned shards are the same samples
with wrong colours in the captions of 3 consecutive steps."""

import json

import pytest

from clipscale.metrics import read_jsonl, read_sample_keys
from clipscale.shards import write_shards

from helpers import color_samples, with_wrong_colour
from process_helpers import run

SAMPLES, PER_SHARD, STEPS, GLOBAL = 640, 8, 32, 16
SETTINGS = ["data.shuffle=false", "data.batch_size=4", "optim.accum_steps=2", "data.workers=1", "optim.lr=2e-3",
            "checkpoint.every_n_steps=10", "logging.sample_keys=true"]  # fmt: skip
GUARD = ["train.spike_guard.factor=3.0", "train.spike_guard.window=10", "train.spike_guard.patience=3",
         "train.spike_guard.skip_batches=3", "train.spike_guard.max_rollbacks=1"]  # fmt: skip


def shards_with(out, poisoned: set[str]) -> str:
    samples = [with_wrong_colour(s) if s["__key__"] in poisoned else s for s in color_samples(SAMPLES, size=16, seed=1)]
    write_shards(samples, out, "mix", PER_SHARD)
    return f"{out}/mix-{{000000..{SAMPLES // PER_SHARD - 1:06d}}}.tar"


@pytest.fixture(scope="module")
def keys_by_step(module_tmp):
    """{step: the keys both ranks read in it} of the clean data, as far as a poisoned run reads."""
    root = module_tmp("clean")
    run(2, root / "run", shards_with(root / "shards", set()), *SETTINGS, f"train.steps={STEPS + 3}")
    found: dict[int, set[str]] = {}
    for record in read_sample_keys(root / "run"):
        found.setdefault(record["step"], set()).update(record["keys"])
    assert all(len(found[s]) == GLOBAL for s in range(1, STEPS + 4))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    "first, checkpoint",
    [(21, 20), (23, 20), (27, 20), (19, 10)],  # 1, 3, 7 steps after the checkpoint at 20; across it
    ids=["1-after", "3-after", "7-after", "across-a-checkpoint"],
)
def test_the_batches_that_caused_the_spike_are_skipped_and_no_other(tmp_path, keys_by_step, first, checkpoint):
    spiking = [first, first + 1, first + 2]  # patience 3: the spike is detected at the last of them
    poison = set().union(*(keys_by_step[s] for s in spiking))
    run_dir = tmp_path / "run"
    run(2, run_dir, shards_with(tmp_path / "shards", poison), *SETTINGS, *GUARD, f"train.steps={STEPS}")

    (event,) = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("event") == "rollback"]
    assert (event["rollback/from_step"], event["rollback/to_step"]) == (spiking[-1], checkpoint), event
    assert event["rollback/skipped_steps"] == [first, spiking[-1]]
    (rollback,) = json.loads((run_dir / "status.json").read_text())["rollbacks"]
    assert rollback["skipped_steps"] == [first, spiking[-1]] and rollback["skipped_batches"] == 3

    records = read_sample_keys(run_dir)
    skipped = [k for r in records if r.get("skipped") is not None for k in r["keys"]]
    trained = [k for r in records if r.get("skipped") is None for k in r["keys"]]
    assert sorted(skipped) == sorted(poison)  # exactly the data that caused the spike
    assert not poison & set(trained) and len(trained) == len(set(trained)) == STEPS * GLOBAL
    replayed = set().union(*(keys_by_step[s] for s in range(checkpoint + 1, first)))
    assert replayed <= set(trained)  # the batches between the checkpoint and the poison: trained on again
    losses = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}
    assert (
        sorted(losses) == list(range(1, STEPS + 1))
        and json.loads((run_dir / "status.json").read_text())["state"] == "finished"
    )
