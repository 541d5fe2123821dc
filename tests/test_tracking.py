"""logging.wandb in offline mode: the scalars of metrics.jsonl, the config, and one W&B run across a resume."""

import struct
from pathlib import Path

from clipscale.metrics import read_jsonl
from clipscale.train import train

from helpers import tiny_config


def wandb_records(path: Path) -> list:
    """The records of an offline .wandb file (LevelDB-log framing: 7-byte file header, 32 KiB blocks,
    each chunk with a 7-byte header of crc, length and type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, out, partial = path.read_bytes(), 32768, 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        partial = chunk if kind in (1, 2) else partial + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(partial)
            out.append(record)
    return out


def offline_runs(run_dir: Path) -> dict:
    """{run id: {step: {key: value}}} over every offline run file of a run directory."""
    runs: dict = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                runs.setdefault(run_id, {})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
                if "train/step" in row:
                    runs[run_id].setdefault(int(float(row["train/step"])), {}).update(row)
    return runs


def test_offline_wandb_holds_the_scalars_and_a_resumed_run_continues_the_same_run(tmp_path, toy_shards, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = {"logging__wandb__mode": "offline", "logging__wandb__project": "t", "checkpoint__every_n_steps": 2}
    train(tiny_config(tmp_path / "run", toy_shards, train__steps=2, **common))
    train(tiny_config(tmp_path / "run", toy_shards, train__steps=4, checkpoint__resume="auto", **common))
    runs = offline_runs(tmp_path / "run")
    assert len(runs) == 1  # the resumed job logged into the same W&B run
    (history,) = runs.values()
    metrics = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r}
    assert sorted(metrics) == [1, 2, 3, 4]
    for step, record in metrics.items():
        assert float(history[step]["loss"]) == record["loss"]
        assert float(history[step]["lr"]) == record["lr"]
