"""Sorting kernels behind the sliced, max-sliced and per-coordinate estimators.

Everything here works on torch tensors that are already checked (see ``_arrays``) and
stays on their device: one matrix product per sample, one sort per group of pairs,
one reduction. The public, documented entry points are in ``ics_toolkit.distances``.

Layout: a group of G pairs with n and m samples, projected on L directions, lives in
buffers of shape (G, L, n) and (G, L, m) (one (G, 2, L, n) buffer when n == m), so
the sort and the reduction run along the contiguous last axis.

The 1-D W1 between two empirical measures with uniform weights is the L1 distance
between their quantile functions, W1 = int_0^1 |F^-1(t) - G^-1(t)| dt. Both quantile
functions are step functions that jump at t = i/n and t = j/m; on each piece between
two consecutive jumps both are constant, so the integral is a weighted sum over the
merged jumps. Written in units of 1/(n m) the jumps are the integers i*m and j*n,
which makes the piece widths and the indices exact integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ics_toolkit._blocks import block_values

# Working-memory budget of one batched kernel call; larger groups are cut into chunks
# (each chunk is an independent computation, so results do not depend on the chunking).
BATCH_BYTES = 256 * 1024**2


def quantile_plan(
    n: int, m: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices and integer widths of the pieces of the merged quantile functions.

    Returns ``ia``, ``ib`` (int64, shape (K,)) and ``width`` (int64, shape (K,), in units
    of 1/(n m), summing to n m): on piece k the quantile functions take the values
    ``a_sorted[ia[k]]`` and ``b_sorted[ib[k]]``.
    """
    jumps = torch.cat(
        (
            torch.arange(1, n + 1, device=device, dtype=torch.int64) * m,
            torch.arange(1, m + 1, device=device, dtype=torch.int64) * n,
        )
    )
    ends = torch.unique(jumps)  # sorted, duplicates (common jumps) merged
    starts = torch.cat((ends.new_zeros(1), ends[:-1]))
    width = ends - starts
    # on the piece (start, end] the level t = end / (n m) gives index ceil(t n) - 1
    ia = torch.div(ends + (m - 1), m, rounding_mode="floor") - 1
    ib = torch.div(ends + (n - 1), n, rounding_mode="floor") - 1
    return ia, ib, width


def w1_sorted(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact 1-D W1 along the last axis of sorted ``a`` (..., n) and ``b`` (..., m)."""
    n, m = a.shape[-1], b.shape[-1]
    if n == m:
        return (a - b).abs().sum(-1) / n
    ia, ib, width = quantile_plan(n, m, a.device)
    gaps = (a.index_select(-1, ia) - b.index_select(-1, ib)).abs()
    return (gaps @ width.to(gaps.dtype)) / (n * m)


def sort_last_(buf: torch.Tensor) -> torch.Tensor:
    """Sort a freshly allocated buffer along its last axis, in place where possible.

    On CPU, numpy's vectorized sort (x86-simd-sort in numpy >= 2) of float32/float64
    rows is about 10x faster than ``torch.sort`` (which also builds an index tensor);
    it runs in place on the buffer's memory. Elsewhere (CUDA, other dtypes),
    ``torch.sort``. Sorted values do not depend on the algorithm, so both paths give
    identical numbers.
    """
    if buf.device.type == "cpu" and buf.dtype in (torch.float32, torch.float64):
        buf.numpy().sort(axis=-1)
        return buf
    return torch.sort(buf, dim=-1).values


def _chunks(count: int, bytes_per_item: int) -> list[range]:
    step = max(1, BATCH_BYTES // max(1, bytes_per_item))
    return [range(i, min(count, i + step)) for i in range(0, count, step)]


#: Per pair, where its sides' sorted projections are kept: (x's cache, y's cache, key).
Memo = tuple[dict, dict, tuple]


def _project(
    t: torch.Tensor, directions_t: torch.Tensor, out: torch.Tensor, memo: dict | None, key: Any
) -> None:
    """``out`` = the projections of ``t`` on every direction, or their sorted copy if kept."""
    known = None if memo is None else memo.get(key)
    if known is not None:  # sorted already: the sort below leaves it as it is
        out.copy_(known)
    else:
        torch.matmul(directions_t, t.to(directions_t.dtype).T, out=out)


def projected_group(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    directions_t: torch.Tensor,
    memos: Sequence[Memo | None] | None = None,
) -> torch.Tensor:
    """Per-direction 1-D W1 for a group of pairs of equal (n, m, d).

    ``xs[i]`` (n, d) and ``ys[i]`` (m, d) are cast to ``directions_t``'s dtype one pair
    at a time (so a group never holds more than one cast copy); ``directions_t`` is
    (L, d) with unit rows. Returns (G, L) in that dtype. Nothing is checked for NaN
    here: non-finite inputs give non-finite outputs, which the caller checks.
    ``memos[i]`` = (cache of x, cache of y, key): each side's sorted projections (L, n)
    are read from its cache under ``key`` when there, and kept there otherwise (a
    monitor's capture reused as the next step's "before" is not projected again).
    """
    n, m = xs[0].shape[0], ys[0].shape[0]
    n_dir = directions_t.shape[0]
    dtype, device = directions_t.dtype, directions_t.device
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_pair = n_dir * (n + m) * (itemsize * 2 + 8) * (1 if n == m else 3)
    memos = memos or [None] * len(xs)
    out = []
    for chunk in _chunks(len(xs), per_pair):
        g = len(chunk)
        if n == m:
            buf = torch.empty((g, 2, n_dir, n), dtype=dtype, device=device)
            bx, by = buf[:, 0], buf[:, 1]
        else:
            bx = torch.empty((g, n_dir, n), dtype=dtype, device=device)
            by = torch.empty((g, n_dir, m), dtype=dtype, device=device)
        for j, i in enumerate(chunk):
            memo = memos[i]
            _project(xs[i], directions_t, bx[j], memo and memo[0], memo and memo[2])
            _project(ys[i], directions_t, by[j], memo and memo[1], memo and memo[2])
        if n == m:
            srt = sort_last_(buf)
            bx, by = srt[:, 0], srt[:, 1]
        else:
            bx, by = sort_last_(bx), sort_last_(by)
        for j, i in enumerate(chunk):
            memo = memos[i]
            if memo is not None:
                for side, cache in ((bx[j], memo[0]), (by[j], memo[1])):
                    cache.setdefault(memo[2], side.clone())
        out.append(w1_sorted(bx, by))
        buf = srt = bx = by = None  # freed before the next chunk's buffers
    return torch.cat(out) if len(out) > 1 else out[0]


def coordinate_group(
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Per-column 1-D W1 for a group of pairs of equal (n, m, d): returns (G, d).

    Columns are transposed into a small reusable buffer block by block (the sort runs
    along the last axis), so the working memory is one block whatever d is (a few MiB on a
    CPU, :mod:`ics_toolkit._blocks`).
    """
    n, m, d = xs[0].shape[0], ys[0].shape[0], xs[0].shape[1]
    device = xs[0].device
    # column blocks through two small reused buffers: on a CPU they stay in cache, 3x
    # faster than transposing whole wide layers into fresh (page-faulting) memory
    width = max(1, min(d, block_values(device) // (n + m)))
    out = torch.empty((len(xs), d), dtype=dtype, device=device)
    bx = torch.empty((width, n), dtype=dtype, device=device)
    by = torch.empty((width, m), dtype=dtype, device=device)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        for lo in range(0, d, width):
            k = min(width, d - lo)
            sx, sy = bx[:k], by[:k]
            sx.copy_(x[:, lo : lo + k].T)
            sy.copy_(y[:, lo : lo + k].T)
            out[i, lo : lo + k] = w1_sorted(sort_last_(sx), sort_last_(sy))
    return out
