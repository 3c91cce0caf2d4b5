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

Samples already in a safe range (``SAFE``, by dtype) are left alone, so ordinary inputs
give the same bits as before.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

from ics_toolkit.errors import ICSValueError

__all__ = ["SAFE", "exponent", "safe_norms", "scale", "unscale"]

#: Largest |value| (per dtype) left as is: squares, and sums of up to 2^30 of them, stay
#: normal numbers (float64: 2^-200 .. 2^200, about 6e-61 .. 1.6e60; float32: 2^-40 .. 2^40,
#: about 9e-13 .. 1.1e12).
SAFE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (2.0**-200, 2.0**200),
    torch.float32: (2.0**-40, 2.0**40),
}

T = TypeVar("T", float, torch.Tensor, np.ndarray)


def exponent(*samples: torch.Tensor) -> int:
    """``e`` with the largest |value| of ``samples`` in [2^(e-1), 2^e); 0 when it is safe.

    0 also when every value is 0 or a value is not finite (the caller's checks name it).
    """
    top = max((float(t.abs().max()) for t in samples if t.numel()), default=0.0)
    if top == 0.0 or not math.isfinite(top):
        return 0
    low, high = SAFE.get(samples[0].dtype, SAFE[torch.float32])
    if low <= top <= high:
        return 0
    return math.frexp(top)[1]


def safe_norms(*row_norms: torch.Tensor) -> bool:
    """Whether float64 samples with these row norms need no rescaling (a cheap test).

    The largest |value| lies between max ||row|| / sqrt(d) and max ||row||, so row norms
    well inside :data:`SAFE` (2^-150 .. 2^150, any d below 2^100) answer without a pass
    over the samples; norms that under- or overflowed (or are 0) say to look.
    """
    top = max((float(n.max()) for n in row_norms if n.numel()), default=0.0)
    return 2.0**-150 <= top <= 2.0**150  # 0: all zero, or squares that underflowed


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


def unscale(value: T, e: int, what: str) -> T:
    """``value * 2^e``, the length in the samples' units; raises when float64 cannot hold it.

    ``what`` names the quantity in the error.
    """
    if e == 0:
        return value
    out = _times_power_of_two(value, e)
    arr = np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out)
    src = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
    lost = np.isinf(arr) & np.isfinite(src) | (arr == 0) & (src != 0)
    if np.any(lost):
        side = "above the largest" if np.any(np.isinf(arr)) else "below the smallest"
        raise ICSValueError(
            f"the {what} of samples scaled by about 2^{e} is {side} float64 number, so it "
            "cannot be returned; rescale the samples (W1 is homogeneous: W1(aX, aY) = "
            "|a| W1(X, Y)) and scale the result yourself"
        )
    return out
