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


def _open_clip_reference(img, txt, scale):
    import open_clip.loss as ocl

    i, t, s = (x.clone().requires_grad_(True) for x in (img, txt, scale))
    loss = ocl.ClipLoss()(i, t, s)
    loss.backward()
    return loss.detach(), i.grad, t.grad, s.grad


@pytest.mark.parametrize("scale", [14.3, 100.0, 400.0])
@pytest.mark.parametrize("chunk", [7, 512, 4096])
def test_chunked_loss_is_exact_in_float64(chunk, scale):
    """Loss and every gradient equal open_clip's to float64 rounding, with ragged tiles (B = 1100 is
    not a multiple of 7 or of the 512-row CPU tile) and at the largest logit scale, where logits
    span 200 (the online max keeps exp() finite and rows that lose to far larger ones exact)."""
    g = torch.Generator().manual_seed(3)
    img = torch.nn.functional.normalize(torch.randn(1100, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(1100, 16, generator=g, dtype=torch.float64), dim=-1)
    txt[:50] = -img[:50]  # positives at -scale: their rows' and columns' maxima are far from the tile's
    s = torch.tensor(scale, dtype=torch.float64)
    expected = _open_clip_reference(img, txt, s)
    i, t, s2 = img.clone().requires_grad_(True), txt.clone().requires_grad_(True), s.clone().requires_grad_(True)
    loss = ClipLoss("chunked", chunk_size=chunk)(i, t, s2)
    loss.backward()
    for got, want in zip((loss.detach(), i.grad, t.grad, s2.grad), expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)


def test_chunked_loss_with_half_precision_features_and_a_one_element_scale():
    """The running sums stay float32 (a float16 sum of 70,000 equal terms would overflow), and a
    [1]-shaped or float64 scale works with any feature dtype; gradients come back in each input's dtype."""
    q, k = torch.ones(2, 8, dtype=torch.float16), torch.ones(70_000, 8, dtype=torch.float16)
    from clipscale.loss import _ChunkedRowCE

    got = _ChunkedRowCE.apply(q, k, torch.tensor(1.0), 0, 4096)
    assert got.item() == pytest.approx(math.log(70_000), rel=1e-3)
    for dtype, scale in (
        (torch.bfloat16, torch.tensor([10.0])),
        (torch.float32, torch.tensor(10.0, dtype=torch.float64)),
    ):
        g = torch.Generator().manual_seed(0)
        img = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1).to(dtype).requires_grad_(True)
        txt = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=-1).to(dtype).requires_grad_(True)
        s = scale.clone().requires_grad_(True)
        loss = ClipLoss("chunked", chunk_size=64)(img, txt, s)
        loss.backward()
        ref = ClipLoss("full")(img.detach().double(), txt.detach().double(), s.detach().double())
        assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
        assert img.grad.dtype == txt.grad.dtype == dtype and s.grad.dtype == s.dtype and s.grad.shape == s.shape


def test_float32_tiles_out_of_range_for_a_shared_exponential_take_the_two_exponential_path(monkeypatch):
    """At logit scale 100 with some positives at -100, tiles whose column maxima (forward) or column
    log-sum-exps (backward) lie far below the tile's rows' take one exponential per direction; the
    rest share one. Both stay within float32 rounding of open_clip's float64 loss and gradients
    (sharing everywhere gives -inf and NaN here)."""
    from clipscale.loss import chunked as loss_module

    calls = {"separate": 0}
    update = loss_module._OnlineLogSumExp.update

    def counted(self, *args):
        calls["separate"] += 1
        return update(self, *args)

    monkeypatch.setattr(loss_module._OnlineLogSumExp, "update", counted)
    g = torch.Generator().manual_seed(4)
    v = torch.randn(32, generator=g, dtype=torch.float64)
    img = torch.nn.functional.normalize(
        v + 0.15 * v.norm() * torch.randn(1500, 32, generator=g, dtype=torch.float64), dim=-1
    )
    txt = torch.nn.functional.normalize(img + 0.2 * torch.randn(1500, 32, generator=g, dtype=torch.float64), dim=-1)
    txt[:40] = -img[:40]  # columns whose every logit is near -100 while their tile's max is near +100
    s = torch.tensor(100.0, dtype=torch.float64)
    expected = _open_clip_reference(img, txt, s)
    i, t = img.float().requires_grad_(True), txt.float().requires_grad_(True)
    s32 = s.float().requires_grad_(True)
    loss = ClipLoss("chunked", chunk_size=4096)(i, t, s32)
    loss.backward()
    tiles = 3 * 3  # 1500 rows and columns in 512-wide CPU tiles
    assert 0 < calls["separate"] < 2 * tiles  # some tiles took the separate path, not all
    for got, want in zip((loss.detach(), i.grad, t.grad, s32.grad), expected):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)
