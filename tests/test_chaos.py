"""The chaos run's short form (benchmarks/chaos.py, issue 29 item 8): a real 2-rank torchrun job of
80 steps through a SIGKILLed rank, a SIGKILLed launcher, a preemption, EIO on a checkpoint read, a
disk that fills during a save, a loss spike from poisoned data, a corrupt and a truncated shard;
then nothing lost. (The frozen rank is left to the benchmark: its hang costs torchrun's 30 s
shutdown wait; tests/test_slurm.py freezes one under SLURM.)"""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "chaos.py"


def load_chaos():
    spec = importlib.util.spec_from_file_location("chaos_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_short_chaos_run_loses_nothing(tmp_path):
    chaos = load_chaos()
    steps, deadline_s = 80, 300
    reference = chaos.reference_run(tmp_path, steps, deadline_s)
    kinds = [k for k in chaos.PROCESS_FAULTS + chaos.DATA_FAULTS if k != "stop-rank"]
    outcome = chaos.run_seed(0, kinds, steps, tmp_path, reference, deadline_s)
    print(chaos.table(outcome))
    assert not outcome.problems, chaos.table(outcome)
    assert sorted(f.kind for f in outcome.faults) == sorted(kinds)
    assert all(f.did for f in outcome.faults)
    stops = [f for f in outcome.faults if f.kind in chaos.PROCESS_FAULTS]
    assert outcome.launches == len(stops) + 1  # each stop, one restart; none hung to its deadline
    assert all(f.recover_s is not None for f in stops)
