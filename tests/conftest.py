import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tests run several processes on 2 cores

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_shards(tmp_path_factory):
    """4 shards x 16 colour/shape pairs (64 samples) with a manifest."""
    from helpers import make_shards

    return make_shards(tmp_path_factory.mktemp("toy"), n_shards=4, per_shard=16)
