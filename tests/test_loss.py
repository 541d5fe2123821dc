import math

import pytest
import torch

from clipscale.loss import ClipLoss


def test_hand_checkable_two_pairs():
    feats = torch.eye(2)
    loss = ClipLoss()(feats, feats, torch.tensor(1.0))
    # each row: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1); symmetric average is the same
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)


def test_perfect_and_swapped_pairs():
    feats = torch.eye(4)
    scale = torch.tensor(100.0)
    assert ClipLoss()(feats, feats, scale).item() < 1e-6
    swapped = feats[[1, 0, 3, 2]]
    assert ClipLoss()(feats, swapped, scale).item() == pytest.approx(100.0, rel=1e-4)
