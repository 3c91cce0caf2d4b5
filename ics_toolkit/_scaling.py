"""Samples at extreme scales: an exact power-of-two rescaling around the computation.

Distances are computed from squares (``|x|^2 + |y|^2 - 2 <x, y>`` in the cost matrices,
sums of squares in the norms): samples near 1e-160 have squares in float64's subnormal
range (digits lost) and below about 1e-162 squares of 0; samples above about 1e154 have
squares of inf. W1 and every length the engine returns are positively homogeneous
(W1(aX, aY) = |a| W1(X, Y)), so the engine multiplies both samples by one power of two
``2^-e`` that brings their largest |value| into [0.5, 1), computes, and multiplies every
length back by ``2^e``. A power of two changes no mantissa bit: the scaled samples are
exact, and so are the results scaled back (unless they leave float64's range, which is
reported with :class:`~ics_toolkit.errors.ICSValueError`, never returned as 0 or inf).

The safe range is that of the dtype the computation runs in (the samples are scaled in
their own dtype, exactly, then converted): float32 samples computed in float64 need no
rescaling, float64 samples at 1e100 computed in float32 are scaled before the cast. The
per-coordinate W1 is a length per column: each column outside the range gets its own
power of two (:func:`column_exponents`), so a column at 1e-100 next to one at 1e250 is
measured as exactly as alone.

Samples already in a safe range (``SAFE``, by dtype) are left alone, so ordinary inputs
give the same bits as before.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

from ics_toolkit.errors import ICSValueError

__all__ = [
    "SAFE",
    "SAFE_NORMS",
    "column_exponents",
    "exponent",
    "norm_exponent",
    "safe_norms",
    "scale",
    "scale_columns",
    "unscale",
    "unscale_columns",
    "window",
]

#: Largest |value| (per computing dtype) left as is: squares, and sums of up to 2^30 of
#: them, stay normal numbers (float64: 2^-200 .. 2^200, about 6e-61 .. 1.6e60; float32
#: and bfloat16: 2^-40 .. 2^40, about 9e-13 .. 1.1e12). float16 (largest 65504, normal
#: from 6e-5) holds no useful range of squares: its samples are always brought to
#: [0.5, 1], where projections and row norms of up to 2^24 coordinates stay finite.
SAFE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (2.0**-200, 2.0**200),
    torch.float32: (2.0**-40, 2.0**40),
    torch.bfloat16: (2.0**-40, 2.0**40),
    torch.float16: (0.5, 1.0),
}

#: Largest row norm (per analysis dtype) the monitor analyses as is. Its rows include
#: fourth moments (``drift_m4``) and squares of paired distances (U2): float64 keeps
#: them normal for norms 2^-150 .. 2^150, float32 only for about 2^-8 .. 2^20 (a row
#: norm of 2^-8 in 2^24 coordinates still has a largest value whose fourth power,
#: 2^-80, is a normal float32).
SAFE_NORMS: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (2.0**-150, 2.0**150),
    torch.float32: (2.0**-8, 2.0**20),
}

T = TypeVar("T", float, torch.Tensor, np.ndarray)
C = TypeVar("C", torch.Tensor, np.ndarray)


def window(dtype: torch.dtype) -> tuple[float, float]:
    """:data:`SAFE` of ``dtype`` (that of float32 for the dtypes it does not list)."""
    return SAFE.get(dtype, SAFE[torch.float32])


def exponent(*samples: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """``e`` with the largest |value| of ``samples`` in [2^(e-1), 2^e); 0 when it is safe.

    Safe means inside :data:`SAFE` of ``dtype`` (the dtype the computation runs in;
    by default that of ``samples[0]``). 0 also when every value is 0 or a value is not
    finite (the caller's checks name it). One ``aminmax`` pass per sample.
    """
    top = 0.0
    for t in samples:
        if t.numel():
            low, high = torch.aminmax(t)
            top = max(top, -float(low), float(high))
    if top == 0.0 or not math.isfinite(top):
        return 0
    low, high = window(dtype or samples[0].dtype)
    if low <= top <= high:
        return 0
    return math.frexp(top)[1]


def column_exponents(*samples: torch.Tensor, dtype: torch.dtype | None = None) -> np.ndarray:
    """Per column k, :func:`exponent` of column k of every sample (int64, shape (d,)).

    0 for a column inside :data:`SAFE` of ``dtype``, of zeros, or holding a NaN / Inf.
    """
    tops = []
    for t in samples:  # no |t| copy of the samples (and amin, amax beat aminmax along dim 0)
        tops.append(torch.maximum(t.amin(dim=0).neg_(), t.amax(dim=0)))
    top = torch.stack(tops).amax(dim=0).to("cpu", torch.float64).numpy()
    low, high = window(dtype or samples[0].dtype)
    e = np.frexp(top)[1]
    keep = (top == 0) | ~np.isfinite(top) | ((low <= top) & (top <= high))
    return np.where(keep, 0, e).astype(np.int64)


def norm_exponent(*row_norms: torch.Tensor, dtype: torch.dtype) -> int | None:
    """The monitor's test: 0 when row norms are inside :data:`SAFE_NORMS` of ``dtype``.

    Otherwise the ``e`` with the largest norm in [2^(e-1), 2^e) (then every value is
    below 1 once scaled by ``2^-e``), or None when the norms cannot tell (0, or
    squares that under- or overflowed): then :func:`exponent` must look at the values.
    """
    top = max((float(n.max()) for n in row_norms if n.numel()), default=0.0)
    low, high = SAFE_NORMS.get(dtype, SAFE_NORMS[torch.float32])
    if low <= top <= high:
        return 0
    if top == 0.0 or not math.isfinite(top):
        return None
    return math.frexp(top)[1]


def safe_norms(*row_norms: torch.Tensor) -> bool:
    """Whether float64 samples with these row norms need no rescaling (a cheap test).

    The largest |value| lies between max ||row|| / sqrt(d) and max ||row||, so row norms
    well inside :data:`SAFE` (2^-150 .. 2^150, any d below 2^100) answer without a pass
    over the samples; norms that under- or overflowed (or are 0) say to look.
    """
    return norm_exponent(*row_norms, dtype=torch.float64) == 0


def _times_power_of_two(value: T, e: int) -> T:
    # in factors of at most 2^1000: 2^e alone is no float for |e| > 1023 (a variance
    # rescaled by 2^(2e) can need that), and each factor times a value is exact as long
    # as the product is a normal number
    while e:
        step = max(-1000, min(1000, e))
        value = value * 2.0**step
        e -= step
    return value


def scale(t: T, e: int) -> T:
    """``t * 2^-e`` (a new tensor or array), exact; ``t`` itself when ``e == 0``."""
    return t if e == 0 else _times_power_of_two(t, -e)


def scale_columns(t: torch.Tensor, e: np.ndarray) -> torch.Tensor:
    """Column k of ``t`` times ``2^-e[k]`` (exact); ``t`` itself when every e is 0.

    Two factors per column, each a number of ``t``'s dtype (2^-e alone need not be:
    2^149 is no float32), each product exact: the first moves every value towards 1.
    """
    if not e.any():
        return t
    half = -(e // 2)
    factors = [np.ldexp(1.0, half), np.ldexp(1.0, -e - half)]
    for f in factors:
        t = t * torch.from_numpy(f).to(t.device, t.dtype)
    return t


def _describe(e: int) -> str:
    # the samples' largest |value|, between 2^(e - 1) and 2^e, in decimal
    return f"about 1e{round((e - 0.5) * math.log10(2))}"


def _check_lost(out: np.ndarray, src: np.ndarray, what: str, e: int | np.ndarray) -> None:
    out, src = np.asarray(out), np.asarray(src)
    lost = np.isinf(out) & np.isfinite(src) | (out == 0) & (src != 0)
    if not np.any(lost):
        return
    where = np.flatnonzero(lost)[0]
    if np.ndim(e):  # one power per column
        what, e = f"{what} (column {where})", int(np.asarray(e).reshape(-1)[where])
    side = "above the largest" if np.isinf(out.reshape(-1)[where]) else "below the smallest"
    raise ICSValueError(
        f"the {what} is {side} {out.dtype.name} number (the samples' largest |value| is "
        f"{_describe(int(e))}), so it cannot be returned; multiply the samples by a "
        "constant a (W1(aX, aY) = |a| W1(X, Y)) and divide the result by |a| yourself"
    )


def _host(value: object) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
    return np.asarray(value)


def unscale(value: T, e: int, what: str) -> T:
    """``value * 2^e``, the length in the samples' units; raises when float64 cannot hold it.

    ``what`` names the quantity (and the samples) in the error.
    """
    if e == 0:
        return value
    out = _times_power_of_two(value, e)
    _check_lost(_host(out), _host(value), what, e)
    return out


def unscale_columns(values: C, e: np.ndarray, what: str) -> C:
    """Entry k of ``values`` (last axis) times ``2^e[k]``; raises where its dtype cannot hold it."""
    if not e.any():
        return values
    if isinstance(values, torch.Tensor):
        out = scale_columns(values, -e)
    else:
        half = e // 2
        out = values * np.ldexp(1.0, half) * np.ldexp(1.0, e - half)
    _check_lost(_host(out), _host(values), what, e)
    return out
