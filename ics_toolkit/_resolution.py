"""Storage resolution: how far rounding the captured outputs can move a measured W1.

A layer's outputs reach the analysis rounded, up to three times: to the dtype the layer
produced (``source``: float32, or bfloat16 / float16 under a half-precision model or
autocast), to the capture's storage dtype (``ICSMonitor(capture_dtype=...)``), and to
the analysis dtype (``precision``). A stage rounds only when its dtype cannot hold every
value of the previous one (bfloat16 -> float32 does not round; float32 -> bfloat16 and
float16 <-> bfloat16 do). The ``resolution`` row of a (step, layer, view) bounds

    | W1(stored X, stored Y) - W1(X, Y) |

where X, Y are the outputs before the last rounding of the layer (its arithmetic up to
that rounding is part of what it computes). Proof (docs/theory.md, section 5.1): W1 is a
metric, so by the triangle inequality the left side is at most W1(X, stored X) +
W1(Y, stored Y), and the same-input coupling gives W1(X, stored X) <= mean_i
||X_i - stored X_i||. Round-to-nearest into a dtype of unit roundoff u = eps / 2 moves a
coordinate by at most u |v| + a, with v the rounded value and a = tiny * eps (twice the
largest error in the subnormal range). Chaining the stages, ``mean_i ||X_i - v_i|| <=
u_total mean_i ||v_i|| + a_total sqrt(d)``; the row norms of the stored values are
already computed by the measured step. The same bound holds for every estimator
computed from the stored samples (each is a supremum over 1-Lipschitz functions, or a
mean of one-dimensional W1s of coordinates or directions), not for ``sinkhorn``.

The ``channel`` view's 1-D W1s (``per_coordinate``) move by at most mean_i |X_ik -
v_ik| per column k: its resolution is ``u_total max_k mean_i |v_ik| + a_total`` per
side, which bounds both their mean and their maximum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["chain", "representable", "resolution", "roundoff"]


def roundoff(dtype: torch.dtype) -> tuple[float, float]:
    """``(u, a)``: rounding to nearest into ``dtype`` gives ``v`` with ``|x - v| <= u|v| + a``.

    ``u = eps / 2`` is the unit roundoff. In the normal range the rounded value ``v`` lies
    in a binade [2^e, 2^(e+1)) whose spacing is 2^e eps, so ``|x - v| <= 2^e eps / 2 <= u
    |v|`` (also when ``x`` lies just below a power of two ``v``, where the spacing is
    half). In the subnormal range the spacing is ``tiny * eps``; ``a = tiny * eps`` is
    twice the error there (gradual underflow, as torch's casts do).

    Examples
    --------
    >>> roundoff(torch.bfloat16)[0] == 2.0**-8
    True
    """
    info = torch.finfo(dtype)
    return info.eps / 2, info.tiny * info.eps


def representable(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether every finite ``source`` value is a ``target`` value (the cast is exact).

    Examples
    --------
    >>> representable(torch.bfloat16, torch.float32), representable(torch.float16, torch.bfloat16)
    (True, False)
    """
    s, t = torch.finfo(source), torch.finfo(target)
    return t.eps <= s.eps and t.max >= s.max and t.tiny * t.eps <= s.tiny * s.eps


def chain(dtypes: Sequence[torch.dtype]) -> tuple[float, float]:
    """``(u, a)`` of the roundings from exact values through ``dtypes`` in order.

    The first dtype always rounds (it is where the exact values are rounded first); each
    later one only when it cannot hold the previous one's values. With the error of
    stage k at most ``u_k |v_k| + a_k``, and ``|v_k| <= (1 + u_{k+1}) |v_{k+1}| + a_{k+1}``,
    the errors of the stages add up to at most ``(prod_k (1 + u_k) - 1) |v| +
    (sum_k a_k) (1 + u)`` in terms of the final value ``v`` (the sum of ``u_k prod_{j > k}
    (1 + u_j)`` telescopes).

    Examples
    --------
    >>> u, _ = chain([torch.float32, torch.bfloat16, torch.float32])  # two roundings
    >>> u == (1 + 2.0**-24) * (1 + 2.0**-8) - 1
    True
    """
    u_total, a_sum, previous = 1.0, 0.0, None
    for dtype in dtypes:
        if previous is None or not representable(previous, dtype):
            u, a = roundoff(dtype)
            u_total *= 1 + u
            a_sum += a
        previous = dtype
    u_total -= 1
    return u_total, a_sum * (1 + u_total)


def _norm_error(n_terms: int, dtype: torch.dtype) -> float:
    """Relative error bound of a Euclidean norm (or a mean of |values|) of ``n_terms`` values.

    A sum of ``n`` non-negative terms in any order errs by at most (n - 1) u relative;
    squaring and the square root add two more roundings. Returned as the factor's excess
    over 1 (``2 (n + 1) u``, covering the second-order terms while ``(n + 1) u <= 1/2``).
    """
    u = torch.finfo(dtype).eps / 2
    return 2 * (n_terms + 1) * u


def resolution(
    samples: Sequence[torch.Tensor],
    dtypes: Sequence[torch.dtype],
    view: str,
    row_norms: Sequence[torch.Tensor] | None = None,
    sketch: tuple[Sequence[torch.dtype], float, int] | None = None,
    scale_e: int = 0,
) -> float:
    """The storage resolution of one (layer, view): see the module docstring.

    Parameters
    ----------
    samples : sequence of torch.Tensor, shape (n, d)
        The view's samples before and after the step as analysed (final rounded values).
    dtypes : sequence of torch.dtype
        The roundings the values went through, in order (source, storage, analysis).
    view : str
        The view's name; ``"channel"`` uses the per-column bound.
    row_norms : sequence of torch.Tensor, optional
        ``||v_i||`` of each sample when the caller has them (computed here otherwise).
    sketch : (dtypes, scale, width), optional
        For a sketch ``v = P x`` (``ics_toolkit.sketch``): the roundings that happened
        before the projection, the Johnson-Lindenstrauss ``scale`` (``||x|| ~ scale
        ||P x||``) and the width d of ``x``. ``P`` is a contraction, so an error ``e``
        of ``x`` moves ``v`` by at most ``||e|| <= u ||x|| + a sqrt(d)``; ``||x||`` is
        estimated by ``scale ||v||`` (within the sketch's stated error: this part is an
        estimate, the rest a bound).
    scale_e : int
        The samples are the stored values times ``2^-scale_e`` (a layer at an extreme
        scale, :mod:`ics_toolkit._scaling`): the relative part of the bound is scaled
        back by ``2^scale_e``, the absolute (subnormal) part is in the stored units.

    Returns
    -------
    float
        The bound, in the unit of the view's values.
    """
    u, a = chain(dtypes)
    u_pre, a_pre, scale, width = 0.0, 0.0, 0.0, 0
    if sketch is not None:
        (u_pre, a_pre), scale, width = chain(sketch[0]), sketch[1], sketch[2]
    total = 0.0
    for i, v in enumerate(samples):
        n, d = int(v.shape[0]), int(v.shape[1])
        if view == "channel":
            # per column k: mean_i |v_ik|; the largest column bounds every column's W1
            size = math.ldexp(float(v.abs().mean(dim=0, dtype=torch.float64).max()), scale_e)
            total += u * size * (1 + _norm_error(n, torch.float64)) + a
            continue
        norms = row_norms[i] if row_norms is not None else torch.linalg.vector_norm(v, dim=1)
        if _norm_error(d, norms.dtype) > 0.5:  # too wide for the a priori bound: float64
            norms = torch.linalg.vector_norm(v.double(), dim=1)
        grows = _norm_error(d, norms.dtype) + _norm_error(n, torch.float64)
        mean = math.ldexp(float(norms.double().sum()) / n * (1 + grows), scale_e)
        total += (u + u_pre * scale) * mean + a * math.sqrt(d) + a_pre * math.sqrt(width)
    return total
