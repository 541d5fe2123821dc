"""Contrastive losses over the GLOBAL batch, computed from this rank's features.

Every loss takes this rank's (already normalised) features [b, d] and gathers what it needs
across the default process group itself. Convention (open_clip's, which makes DDP's gradient
averaging exact): the mean over ranks of the returned losses is the loss of the global batch;
each rank's gradient w.r.t. its own features is world_size x the matching slice of the
single-process gradient; temperature/bias gradients averaged over ranks equal the
single-process ones.

CLIP (symmetric InfoNCE), `impl`:
  full     all_gather with grad, global [B, B] logits on every rank (the baseline)
  local    this rank's rows/columns only: [b, B] logits, labels offset by rank (OpenCLIP's local_loss)
  chunked  like local, but logits are computed tile by tile with an online log-sum-exp and a
           custom backward, so memory is O(chunk^2) instead of O(b x B)
SigLIP (sigmoid loss with temperature and bias), `impl`:
  gather   all_gather texts with grad, [b, B] logits
  ring     text blocks travel around the ring of ranks (forward and backward): no rank ever
           holds more than two blocks of text features
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .config import LOSS_IMPLS, resolved_loss_impl

# --------------------------------------------------------------------------- communication


class CommTimer:
    """Seconds spent in collectives (CUDA events on GPU, so timing does not force a sync)."""

    def __init__(self):
        self.seconds = 0.0
        self._events: list = []

    @contextlib.contextmanager
    def time(self, device: torch.device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0

    def pop(self) -> float:
        """Seconds since the last pop (synchronises pending CUDA events)."""
        for start, end in self._events:
            end.synchronize()
            self.seconds += start.elapsed_time(end) / 1000.0
        self._events.clear()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherGrad(torch.autograd.Function):
    """Concatenate every rank's [b, d] tensor; backward sums the gradients of each slice over ranks
    (reduce-scatter on NCCL; all-reduce + slice on gloo, which has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, timer):
        rank, world = _world()
        ctx.rank, ctx.world, ctx.timer, ctx.b = rank, world, timer, x.shape[0]
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0], *x.shape[1:]))
        with timer.time(x.device):
            dist.all_gather_into_tensor(out, x)  # one buffer, no per-rank tensors to concatenate
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()  # reduced in place below; autograd may share the input
        with ctx.timer.time(grad.device):
            if dist.get_backend() == "nccl":
                out = torch.empty((ctx.b, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
                dist.reduce_scatter_tensor(out, grad)
            else:
                dist.all_reduce(grad)
                out = grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]
        return out, None


class Gather:
    """all_gather with grad over the default group; `timer` accumulates the time it takes."""

    def __init__(self):
        self.timer = CommTimer()

    def rank_world(self) -> tuple[int, int]:
        return _world()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if _world()[1] == 1:
            return x
        return _AllGatherGrad.apply(x, self.timer)

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather two [b, d] tensors in ONE collective each way (image and text features): half
        the latency-bound calls of gathering them one by one."""
        if self.rank_world()[1] == 1:
            return a, b
        fusable = a.ndim == b.ndim == 2 and a.shape[0] == b.shape[0] and a.dtype == b.dtype
        if not fusable:
            return self(a), self(b)
        both = self(torch.cat([a, b], dim=1))
        return both[:, : a.shape[1]], both[:, a.shape[1] :]


# --------------------------------------------------------------------------- chunked CLIP


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


# --------------------------------------------------------------------------- CLIP loss


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch (see the module docstring for `impl`)."""

    uses_bias = False

    def __init__(self, impl: str = "local", chunk_size: int = 4096, gather: Gather | None = None):
        super().__init__()
        if impl not in LOSS_IMPLS["clip"]:
            raise ValueError(f"ClipLoss impl must be one of {', '.join(LOSS_IMPLS['clip'])}; got {impl!r}")
        self.impl = impl
        self.chunk_size = chunk_size
        self.gather = gather or Gather()

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor):
        rank, world = self.gather.rank_world()
        b = image_features.shape[0]
        if self.impl == "chunked":
            if world == 1:
                return _ChunkedSymmetricCE.apply(image_features, text_features, logit_scale, self.chunk_size)
            all_img, all_txt = self.gather.pair(image_features, text_features)
            return (
                _ChunkedRowCE.apply(image_features, all_txt, logit_scale, rank * b, self.chunk_size)
                + _ChunkedRowCE.apply(text_features, all_img, logit_scale, rank * b, self.chunk_size)
            ) / 2
        if world == 1 or self.impl == "full":
            all_img, all_txt = self.gather.pair(image_features, text_features)
            logits = logit_scale * all_img @ all_txt.T
            labels = torch.arange(logits.shape[0], device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        all_img, all_txt = self.gather.pair(image_features, text_features)
        labels = torch.arange(b, device=image_features.device) + rank * b
        per_image = logit_scale * image_features @ all_txt.T
        per_text = logit_scale * text_features @ all_img.T
        return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


# --------------------------------------------------------------------------- SigLIP loss


def _siglip_block_loss(img, txt, scale, bias, positives: bool) -> torch.Tensor:
    """sum of -log sigmoid(label * logit) over one [b, b'] block (labels +1 on the diagonal if `positives`)."""
    logits = (img @ txt.T) * scale + bias
    loss = F.softplus(logits).sum()  # every pair as a negative: -log sigmoid(-x) = softplus(x)
    if positives:
        loss = loss - torch.diagonal(logits).sum()  # softplus(-x) - softplus(x) = -x
    return loss


def _siglip_block_grads(img, txt, scale, bias, positives: bool, coef):
    """Gradients of coef x _siglip_block_loss w.r.t. img, txt, scale, bias."""
    raw = img @ txt.T
    d = torch.sigmoid(raw * scale + bias) * coef
    if positives:
        d.diagonal().sub_(coef)
    return (d @ txt) * scale, (d.T @ img) * scale, (d * raw).sum(), d.sum()


def _ring_shift(x: torch.Tensor, timer: CommTimer) -> torch.Tensor:
    """Send `x` to the next rank, receive the previous rank's tensor."""
    rank, world = _world()
    out = torch.empty_like(x)
    with timer.time(x.device):
        ops = [
            dist.P2POp(dist.isend, x.contiguous(), (rank + 1) % world),
            dist.P2POp(dist.irecv, out, (rank - 1) % world),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return out


class _RingSigLip(torch.autograd.Function):
    """SigLIP of local images against every rank's texts, texts passed around the ring.

    Backward runs the ring again, carrying each text block with its gradient accumulator; after
    a full turn every block is back home with the gradient contributed by every rank.
    """

    @staticmethod
    def forward(ctx, img, txt, scale, bias, timer):
        rank, world = _world()
        total = _siglip_block_loss(img, txt, scale, bias, positives=True)
        block = txt
        for _ in range(world - 1):
            block = _ring_shift(block, timer)
            total = total + _siglip_block_loss(img, block, scale, bias, positives=False)
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.timer = timer
        return total / img.shape[0]

    @staticmethod
    def backward(ctx, g):
        img, txt, scale, bias = ctx.saved_tensors
        _, world = _world()
        coef = g / img.shape[0]
        dimg = torch.zeros_like(img)
        dscale = torch.zeros((), dtype=img.dtype, device=img.device)
        dbias = torch.zeros((), dtype=img.dtype, device=img.device)
        block, dblock = txt, torch.zeros_like(txt)
        for step in range(world):
            gi, gt, gs, gb = _siglip_block_grads(img, block, scale, bias, step == 0, coef)
            dimg += gi
            dblock = dblock + gt
            dscale += gs
            dbias += gb
            # after `world` shifts every block (with its accumulated gradient) is back with its owner
            packed = _ring_shift(torch.cat([block, dblock], dim=1), ctx.timer)
            block, dblock = packed.split(txt.shape[1], dim=1)
        return dimg, dblock, dscale.reshape(scale.shape), dbias.reshape(bias.shape), None


class SigLipLoss(nn.Module):
    """Sigmoid loss (SigLIP) over the global batch: positives on the diagonal, every other pair negative."""

    uses_bias = True

    def __init__(self, impl: str = "gather", gather: Gather | None = None):
        super().__init__()
        if impl not in LOSS_IMPLS["siglip"]:
            raise ValueError(f"SigLipLoss impl must be one of {', '.join(LOSS_IMPLS['siglip'])}; got {impl!r}")
        self.impl = impl
        self.gather = gather or Gather()

    def forward(self, image_features, text_features, logit_scale, logit_bias):
        rank, world = self.gather.rank_world()
        b = image_features.shape[0]
        if world == 1:
            return _siglip_block_loss(image_features, text_features, logit_scale, logit_bias, True) / b
        if self.impl == "ring":
            return _RingSigLip.apply(image_features, text_features, logit_scale, logit_bias, self.gather.timer)
        all_txt = self.gather(text_features)
        logits = (image_features @ all_txt.T) * logit_scale + logit_bias
        loss = F.softplus(logits).sum()
        own = logits[:, rank * b : (rank + 1) * b]
        return (loss - torch.diagonal(own).sum()) / b


def build_loss(cfg) -> nn.Module:
    impl = resolved_loss_impl(cfg)
    if cfg.loss.name == "siglip":
        return SigLipLoss(impl=impl)
    return ClipLoss(impl=impl, chunk_size=cfg.loss.chunk_size)
