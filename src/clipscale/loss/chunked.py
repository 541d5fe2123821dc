"""The chunked CLIP loss: logits tile by tile with an online log-sum-exp and a custom backward, so
memory is O(chunk^2) instead of O(b x B), exact to float64 rounding against the full loss."""

from __future__ import annotations

import torch

# Tiles of 512 x 512 float32 (two 1 MB buffers) stay in a CPU core's L2/L3 caches between the ~8
# passes over each tile (matmul, max, exp, sums); 4096-wide tiles streamed 64 MB per pass through
# memory and allocated it afresh each time (page faults): the loss ran at 6.6x its matmul limit
# then (687 s at B = 131,072), 1.3x now (133 s; 256- to 1024-wide tiles measure the same).
# A GPU has no such cache to fit and pays per kernel launch, so it keeps the configured chunk.
CPU_TILE = 512


def _tile_size(chunk: int, device: torch.device) -> int:
    return min(chunk, CPU_TILE) if device.type == "cpu" else chunk


def _tiles(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(start + size, n)


class _TileBuffers:
    """Two reusable tile buffers: the loss allocates nothing per tile."""

    def __init__(self, like: torch.Tensor, rows: int, cols: int):
        self.a = like.new_empty(rows * cols)
        self.b = like.new_empty(rows * cols)

    def views(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = rows * cols
        return self.a[:n].view(rows, cols), self.b[:n].view(rows, cols)


class _OnlineLogSumExp:
    """logsumexp along one dimension of a matrix seen tile by tile: a running max and a running
    sum of exp(x - max), rescaled when the max grows (exact; one exponential per element). The
    running values are at least float32: a float16 sum of up to N ones overflows past 65,504."""

    def __init__(self, n: int, like: torch.Tensor):
        dtype = torch.promote_types(like.dtype, torch.float32)
        self.max = torch.full((n,), float("-inf"), dtype=dtype, device=like.device)
        self.sum = torch.zeros(n, dtype=dtype, device=like.device)

    def update(self, tile: torch.Tensor, dim: int, lo: int, hi: int, scratch: torch.Tensor) -> None:
        tile_max = tile.amax(dim)
        torch.sub(tile, tile_max.unsqueeze(dim), out=scratch).exp_()
        self.merge(scratch.sum(dim), tile_max, lo, hi)

    def merge(self, partial: torch.Tensor, partial_max: torch.Tensor, lo: int, hi: int) -> None:
        """Add sum(exp(x - partial_max)) = `partial` for entries lo:hi (partial_max: per entry or one)."""
        old, total = self.max[lo:hi], self.sum[lo:hi]
        new = torch.maximum(old, partial_max)
        total.mul_((old - new).exp_()).add_(partial * (partial_max - new).exp())
        old.copy_(new)

    def result(self) -> torch.Tensor:
        return self.max + self.sum.log()


# How far below a tile's largest logit every column's largest may be for the column sums to come
# from the row-shifted exponentials (terms that underflow are then below the dtype's precision).
_SHARED_EXP_SPAN = {torch.float32: 60.0, torch.float64: 600.0}


def _shared_exp_span(tile: torch.Tensor) -> float | None:
    return _SHARED_EXP_SPAN.get(tile.dtype) if tile.device.type == "cpu" else None


def _softmax_both(d: torch.Tensor, row: torch.Tensor, col: torch.Tensor, scratch: torch.Tensor) -> None:
    """The tile's logits `d` become exp(d - row lse) + exp(d - column lse) in place. Where the log-
    sum-exps lie within range (on a CPU), with one exponential per element: the second term is the
    first times exp(row_i - col_j), an outer product of two vectors."""
    span = _shared_exp_span(d)
    if span is not None:
        top = row.max()
        if float(top - col.min()) < span:
            d.sub_(row[:, None]).exp_()
            torch.outer((row - top).exp_(), (top - col).exp_(), out=scratch)
            d.mul_(scratch.add_(1))
            return
    torch.sub(d, col[None], out=scratch).exp_()
    d.sub_(row[:, None]).exp_().add_(scratch)


def _update_both(logits: torch.Tensor, rows, cols, r0, r1, c0, c1, scratch: torch.Tensor) -> None:
    """Row and column log-sum-exp of one tile. On a CPU, with float32/64 and the tile's column maxima
    within range of its overall max, one exponential per element serves both directions: the column
    sums are a weighted sum of the row-shifted exponentials (a matrix-vector product). Otherwise, and
    on GPUs (where the range check would synchronise every tile), each direction has its own."""
    span = _shared_exp_span(logits)
    if span is None:
        rows.update(logits, 1, r0, r1, scratch)
        cols.update(logits, 0, c0, c1, scratch)
        return
    row_max = logits.amax(1)
    top = row_max.max()
    if float(top - logits.amax(0).min()) >= span:
        rows.update(logits, 1, r0, r1, scratch)
        cols.update(logits, 0, c0, c1, scratch)
        return
    torch.sub(logits, row_max[:, None], out=scratch).exp_()
    rows.merge(scratch.sum(1), row_max, r0, r1)
    cols.merge((row_max - top).exp_() @ scratch, top, c0, c1)


class _ChunkedRowCE(torch.autograd.Function):
    """mean_i [ logsumexp_j(s q_i.k_j) - s q_i.k_{offset+i} ], tile by tile, never [n, N] at once.

    The scale multiplies q once ([n, d]) instead of every logit; the backward recomputes each tile
    and accumulates p @ k and p.T @ q unscaled, so d loss / d scale comes from their sums."""

    @staticmethod
    def forward(ctx, q, k, scale, offset: int, chunk: int):
        n, N = q.shape[0], k.shape[0]
        tile = _tile_size(chunk, q.device)
        bufs, qs = _TileBuffers(q, min(tile, n), min(tile, N)), q * scale.to(q.dtype)
        lse = _OnlineLogSumExp(n, q)
        for r0, r1 in _tiles(n, tile):
            for c0, c1 in _tiles(N, tile):
                logits, scratch = bufs.views(r1 - r0, c1 - c0)
                torch.mm(qs[r0:r1], k[c0:c1].T, out=logits)
                lse.update(logits, 1, r0, r1, scratch)
        row = lse.result()
        pos = (q * k[offset : offset + n]).sum(1) * scale.to(q.dtype)
        ctx.save_for_backward(q, k, scale, row)
        ctx.offset, ctx.chunk = offset, chunk
        return (row - pos).mean()

    @staticmethod
    def backward(ctx, g):
        q, k, scale, row = ctx.saved_tensors
        n, N, offset = q.shape[0], k.shape[0], ctx.offset
        tile = _tile_size(ctx.chunk, q.device)
        scale_dtype, scale = scale.dtype, scale.to(q.dtype)
        bufs, qs = _TileBuffers(q, min(tile, n), min(tile, N)), q * scale
        pk, pq = torch.zeros_like(q), torch.zeros_like(k)  # p @ k and p.T @ q
        for r0, r1 in _tiles(n, tile):
            for c0, c1 in _tiles(N, tile):
                p, _ = bufs.views(r1 - r0, c1 - c0)
                torch.mm(qs[r0:r1], k[c0:c1].T, out=p)
                p.sub_(row[r0:r1, None]).exp_()  # softmax over the row: d loss / d logits, negatives part
                pk[r0:r1].addmm_(p, k[c0:c1])
                pq[c0:c1].addmm_(p.T, q[r0:r1])
        coef = g / n
        kpos = k[offset : offset + n]
        dq = (pk - kpos) * (coef * scale)
        dk = pq.mul_(coef * scale)
        dk[offset : offset + n] -= q * (coef * scale)
        dscale = ((q * pk).sum() - (q * kpos).sum()) * coef
        return dq, dk, dscale.to(scale_dtype).reshape(scale.shape), None, None


class _ChunkedSymmetricCE(torch.autograd.Function):
    """Both directions of a single [B, B] logit matrix in one tiled pass (world size 1): each tile
    is computed once per pass and feeds the row and the column log-sum-exp (forward) or softmax
    (backward)."""

    @staticmethod
    def forward(ctx, img, txt, scale, chunk: int):
        B = img.shape[0]
        tile = _tile_size(chunk, img.device)
        bufs, imgs = _TileBuffers(img, min(tile, B), min(tile, B)), img * scale.to(img.dtype)
        rows, cols = _OnlineLogSumExp(B, img), _OnlineLogSumExp(B, img)
        for r0, r1 in _tiles(B, tile):
            for c0, c1 in _tiles(B, tile):
                logits, scratch = bufs.views(r1 - r0, c1 - c0)
                torch.mm(imgs[r0:r1], txt[c0:c1].T, out=logits)
                _update_both(logits, rows, cols, r0, r1, c0, c1, scratch)
        row, col = rows.result(), cols.result()
        pos = (img * txt).sum(1) * scale.to(img.dtype)
        ctx.save_for_backward(img, txt, scale, row, col)
        ctx.chunk = chunk
        return ((row - pos).mean() + (col - pos).mean()) / 2

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, row, col = ctx.saved_tensors
        B = img.shape[0]
        tile = _tile_size(ctx.chunk, img.device)
        scale_dtype, scale = scale.dtype, scale.to(img.dtype)
        bufs, imgs = _TileBuffers(img, min(tile, B), min(tile, B)), img * scale
        dt, di = torch.zeros_like(img), torch.zeros_like(txt)  # d @ txt and d.T @ img, unscaled
        for r0, r1 in _tiles(B, tile):
            for c0, c1 in _tiles(B, tile):
                d, by_col = bufs.views(r1 - r0, c1 - c0)
                torch.mm(imgs[r0:r1], txt[c0:c1].T, out=d)
                _softmax_both(d, row[r0:r1], col[c0:c1], by_col)  # both directions' softmax
                dt[r0:r1].addmm_(d, txt[c0:c1])
                di[c0:c1].addmm_(d.T, img[r0:r1])
        half = g / (2 * B)
        dimg = (dt.mul_(half) - txt * (2 * half)).mul_(scale)
        dtxt = (di.mul_(half) - img * (2 * half)).mul_(scale)
        dscale = (img * dt).sum() - (img * txt).sum() * (2 * half)
        return dimg, dtxt, dscale.to(scale_dtype).reshape(scale.shape), None
