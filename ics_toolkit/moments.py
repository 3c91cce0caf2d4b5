"""Moment drift: how much a layer's per-coordinate moments move across a step.

BatchNorm fixes the first two moments of every coordinate (over the batch it
normalizes); the theory says ICS also depends on what it does not fix, such as the
fourth moment and the variance of the norm. These drifts put numbers on that.
"""

from __future__ import annotations

import math
import warnings

import torch

from ics_toolkit import _scaling
from ics_toolkit._arrays import ArrayLike, as_pair
from ics_toolkit._blocks import block_rows
from ics_toolkit.errors import ICSRuntimeWarning, ICSValueError

__all__ = ["moment_drift"]


def moment_drift(x: ArrayLike, y: ArrayLike) -> dict[str, float]:
    """Change of per-coordinate moments between two samples.

    Parameters
    ----------
    x, y : array_like, shape (n, d) and (m, d)
        Samples before and after the step (numpy or torch; 1-D means d = 1).

    Returns
    -------
    dict of str to float
        ``drift_mean``: ``||mean(x) - mean(y)||_2`` over the d coordinates (equal to
        the lower bound L1); ``drift_var``: the same for the biased per-coordinate
        variances; ``drift_m4``: the same for the central fourth moments;
        ``drift_norm_var``: the change of the variance of the sample norms
        ``Var ||x_i||``, which moves the lower bound L2 under BatchNorm. Computed in
        float64; units are those of the samples raised to the moment's order. Samples
        at any scale are computed times a power of two (exact); a drift float64
        cannot hold (the fourth moment of samples near 1e-100 is near 1e-400) is NaN,
        with an :class:`~ics_toolkit.errors.ICSRuntimeWarning` saying so.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0.0], [2.0]])
    >>> moment_drift(x, x + 1)["drift_mean"], moment_drift(x, 2 * x)["drift_var"]
    (1.0, 3.0)
    """
    tx, ty = as_pair(x, y)
    e = _scaling.exponent(tx, ty)
    out = _drift(_scaling.scale(tx, e), _scaling.scale(ty, e))
    for q, value in out.items():
        try:
            out[q] = _scaling.unscale(value, DRIFT_POWERS[q] * e, f"{q} of `x` and `y`")
        except ICSValueError as err:
            warnings.warn(str(err), ICSRuntimeWarning, stacklevel=2)
            out[q] = math.nan
    return out


#: The power of a length each drift is in (its units: the samples' to that power).
DRIFT_POWERS = {"drift_mean": 1, "drift_var": 2, "drift_m4": 4, "drift_norm_var": 2}


def _column_moments(
    t: torch.Tensor, higher: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-column mean, biased variance and central fourth moment of a checked (n, d) tensor.

    One pass for the mean, one for the centred powers, in row blocks (the working
    memory is one block, whatever n). ``higher=False`` stops after the mean.
    """
    n = t.shape[0]
    # blocks of a few whole rows (ics_toolkit._blocks): on a CPU they stay in cache, and
    # summing contiguous rows is several times faster than reducing strided columns
    step = block_rows(t.shape[1], t.device)
    mu = t.sum(dim=0) / n
    if not higher:
        return mu, None, None
    var, m4 = torch.zeros_like(mu), torch.zeros_like(mu)
    buf = torch.empty((min(step, n), t.shape[1]), dtype=t.dtype, device=t.device)
    if step == 1:
        # wide rows, one per block: add them in place instead of summing a block of one
        # (the same additions in the same order, so the same bits, 2.2x faster on a CPU)
        row = buf[0]
        for i in range(n):
            c2 = torch.sub(t[i], mu, out=row).square_()
            var += c2
            m4 += c2.square_()
        return mu, var / n, m4 / n
    for lo in range(0, n, step):
        c2 = torch.sub(t[lo : lo + step], mu, out=buf[: min(step, n - lo)]).square_()
        var += c2.sum(dim=0)
        m4 += c2.square_().sum(dim=0)
    return mu, var / n, m4 / n


def _drift(
    tx: torch.Tensor,
    ty: torch.Tensor,
    moments: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None,
    row_norms: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """The drifts of checked float64 samples (the kernel behind :func:`moment_drift`).

    ``moments`` ((mean, var, m4) of each side) and ``row_norms`` reuse what a caller
    computed already.
    """
    (mx, vx, kx), (my, vy, ky) = moments or (_column_moments(tx), _column_moments(ty))
    assert vx is not None and kx is not None and vy is not None and ky is not None
    if row_norms is None:
        row_norms = (torch.linalg.vector_norm(tx, dim=1), torch.linalg.vector_norm(ty, dim=1))
    nx, ny = (r.var(unbiased=False) for r in row_norms)
    return {
        "drift_mean": _norm(mx - my),
        "drift_var": _norm(vx - vy),
        "drift_m4": _norm(kx - ky),
        "drift_norm_var": abs(float(nx - ny)),
    }


def _norm(v: torch.Tensor) -> float:
    """||v||_2 without squaring v's entries in its dtype.

    A fourth moment of values near 1e-40 is near 1e-160, whose square is no float64
    (``vector_norm`` gives 0); in float32 that happens from values near 1e-5. Outside
    :data:`ics_toolkit._scaling.SAFE` the norm of ``v / max|v|``, times ``max|v|``,
    squares numbers of at most 1.
    """
    if not v.numel():
        return 0.0
    top = float(v.abs().max())
    low, high = _scaling.window(v.dtype)
    if low <= top <= high or top == 0.0 or not math.isfinite(top):
        return float(torch.linalg.vector_norm(v))
    return top * float(torch.linalg.vector_norm(v / top))
