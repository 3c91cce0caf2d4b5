r"""The kernel of ``method="sinkhorn"``: entropic W1 with a certified interval.

Everything here works on one checked float64 cost matrix ``C`` (n, m), ``C_ij =
||x_i - y_j||``, on any device, in torch only (no POT; the host sees one scalar per
iteration and the n + m potentials once per stage, for the bounds' exact sums). The
documented entry point is :func:`ics_toolkit.distances.wasserstein`; docs/theory.md
derives the bounds and docs/benchmarks.md ("Sinkhorn") measures the design choices.

The entropic problem at regularization ``eps`` with uniform weights ``a``, ``b``::

    OT_eps = min_P <P, C> + eps KL(P | a b^T)  over couplings P of (a, b)

has the dual potentials (f, g) of the soft c-transform relations

    f_i = -eps log sum_j b_j exp((g_j - C_ij) / eps)
    g_j = -eps log sum_i a_i exp((f_i - C_ij) / eps)

and the plan ``P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)``. Sinkhorn's iteration
alternates the two relations (in the log domain: no underflow at small eps).
Epsilon scaling starts at the cost's diameter, where one iteration solves the
problem, and divides eps by ``1 / scaling`` per stage, each stage warm-started from
the previous potentials and iterated until the plan's row marginals are within
:data:`STAGE_MARGINAL_ERROR` (L1) of ``a``.

No entropic number is returned as W1. The iterates only steer two bounds that hold
for *any* potentials and plans, computed in O(n m):

``lower``
    The double c-transform of f: ``g_j = min_i C_ij - f_i``, ``f'_i = min_j C_ij -
    g_j``. Then ``f'_i + g_j <= C_ij`` for all (i, j), so the pair is feasible for
    the dual of the unregularized problem and ``<a, f'> + <b, g> <= W1`` (weak
    duality). With f = 0 it is the nearest-neighbour bound.
``upper``
    The cost of a feasible coupling, hence ``>= W1``: the entropic plan rounded onto
    the marginals (rows, then columns scaled down to ``a`` and ``b``, the missing
    mass sent by the product of the two deficits: Altschuler, Weed and Rigollet 2017,
    Algorithm 2), and, when n == m, the matching ``i -> argmax_j P_ij`` when it is a
    permutation.

Both bounds carry their own float64 rounding allowance (:func:`dual_bound`,
:func:`plan_bound`): they bound the W1 of the cost matrix as computed, whatever the
summation order of the device. The dual's is a few units of roundoff of the diameter
(its sums are taken exactly, with ``math.fsum``); the rounded plan's grows like
(n + m) units of roundoff of the diameter, the matching's is relative to its cost.

The annealing stops once ``upper - lower <= rtol * lower``; the value returned is
``lower``, so it is within ``rtol`` of W1 and below it by construction. eps never goes
below ``reg * lower`` (the W1 scale, not the mean cost; by default ``rtol / log(n m)``,
where the entropic plan's excess cost is about ``rtol``); there the stages tighten
their marginal target instead. A W1 so far below the diameter (about 1e-13 of it or
less) that the rounding allowances alone are wider than ``rtol`` cannot be certified:
the run stops with ``resolved=False`` instead of returning a value that may be off.
W1 = 0 (the same samples) is recognised by the caller (:func:`same_samples`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: L1 error of the plan's row marginals at which one stage of the epsilon scaling is
#: solved. Iterating the closing stages to a marginal error of rtol * W1 instead (what
#: the rounding's cost would ask) failed to close two of the low-dimensional pairs of
#: tests/test_sinkhorn.py within 10,000 iterations (2026-12-04).
STAGE_MARGINAL_ERROR = 1e-2

# Entries of a soft-min whose exponent is below this (after subtracting the row max)
# add less than m e^-60 ~ m 1e-26 relative to the sum: clamping them keeps exp out of
# the subnormal range, which is up to 40x slower on CPUs.
_EXP_FLOOR = -60.0

# The smallest eps, relative to the cost's diameter: below it the exponents
# (f + g - C) / eps would carry more float64 rounding than signal.
_EPS_MIN = 1e-13

# float64's unit roundoff: every rounding allowance below is a multiple of it.
_U = 2.0**-53


@dataclass
class EntropicResult:
    """What :func:`certified_w1` found, in the units of the cost matrix."""

    lower: float
    upper: float
    eps: float
    n_iter: int
    n_stages: int
    marginal_error: float
    converged: bool  # the interval reached the requested relative width
    resolved: bool = True  # False: float64 rounding alone is wider than rtol of W1
    rounding: float = 0.0  # the rounding allowances inside [lower, upper]


def soft_min(
    cost: torch.Tensor, h: torch.Tensor, eps: float, buf: torch.Tensor, dim: int
) -> torch.Tensor:
    """``-eps log sum exp(h - C / eps)`` along ``dim`` of ``cost``, in the buffer ``buf``.

    ``h`` runs along ``dim`` (``log b + g / eps`` for the rows, ``log a + f / eps``
    for the columns). One n x m buffer, in place: no temporary of the matrix's size.
    """
    shifted = h[None, :] if dim == 1 else h[:, None]
    torch.add(shifted, cost, alpha=-1.0 / eps, out=buf)
    top = buf.amax(dim, keepdim=True)
    buf.sub_(top).clamp_(min=_EXP_FLOOR).exp_()
    return -eps * (top.squeeze(dim) + buf.sum(dim).log())


def dual_bound(cost: torch.Tensor, f: torch.Tensor, buf: torch.Tensor) -> tuple[float, float]:
    """A lower bound of W1 from the double c-transform of ``f``, and its rounding allowance.

    ``cost`` holds values in [0, 1] (units of the diameter), uniform weights. ``g_j =
    min_i C_ij - f_i`` is shifted to the centre of its range (which is at most 1: g is
    c-concave), then ``f'_i = min_j C_ij - g_j``. Each computed ``C_ij - g_j`` is exact
    to ``u (1 + max|g|)`` (u = 2^-53), so ``f' - u (1 + max|g|)`` and ``g`` are
    feasible for the dual and their mean values bound W1 from below (weak duality). The
    means are exactly rounded sums (``math.fsum``) divided by n and m, to ``2.01 u``
    relative each, and the last addition rounds once more: the value returned is the
    computed mean minus ``2u (1 + 2 (max|f'| + max|g|) + |value|)``, which covers all
    of it whatever the device's own summation order.
    """
    n, m = cost.shape
    g = torch.sub(cost, f[:, None], out=buf).amin(0)
    g = g - 0.5 * (g.amax() + g.amin())
    f2 = torch.sub(cost, g[None, :], out=buf).amin(1)
    value = math.fsum(f2.tolist()) / n + math.fsum(g.tolist()) / m
    big = float(f2.abs().max()) + float(g.abs().max())
    slack = 2 * _U * (1 + 2 * big + abs(value))
    return value - slack, slack


def plan_bound(
    cost: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    a: torch.Tensor,
    b: torch.Tensor,
    buf: torch.Tensor,
) -> tuple[float, float]:
    """An upper bound of W1: a feasible coupling's cost from (f, g), and its allowance.

    ``cost`` in [0, 1] (units of the diameter). Two couplings, the cheaper wins:

    * n == m and the plan's row-wise argmax is a permutation: its mean cost, an exactly
      rounded sum (``math.fsum``) over n, within ``3 u`` of its value (relative).
    * the entropic plan rounded onto the marginals: rows scaled down to at most ``a``,
      then columns to at most ``b``, and the deficits ``r``, ``s`` (clamped at 0, they
      are only negative by rounding) sent by ``r s^T / max(sum r, sum s)``. Every entry
      is >= 0 and its marginals miss ``a`` and ``b`` only by the rounding of O(n + m)
      sums, at most ``2 (n + m + 8) u`` in L1; moving that mass costs at most twice
      it (costs are <= 1), and the n m-term dot product rounds by ``(n m + 4) u``
      relative: allowance ``8 (n + m + 8) u + (n m + 4) u value`` (the factor 2 again
      as margin).
    """
    best, best_slack = math.inf, 0.0
    n, m = cost.shape
    if n == m:  # the plan's row-wise argmax, when it is a permutation
        j = torch.sub(g[None, :], cost, out=buf).argmax(1)
        if bool((torch.bincount(j, minlength=m) == 1).all()):
            value = math.fsum(cost.gather(1, j[:, None]).view(-1).tolist()) / n
            best_slack = 3 * _U * value
            best = value + best_slack
    plan = torch.sub(f[:, None] + g[None, :], cost, out=buf)
    plan.div_(eps).exp_().mul_(a[:, None]).mul_(b[None, :])
    plan.mul_(torch.clamp(a / plan.sum(1), max=1.0)[:, None])
    plan.mul_(torch.clamp(b / plan.sum(0), max=1.0)[None, :])
    row_gap = (a - plan.sum(1)).clamp_(min=0.0)
    col_gap = (b - plan.sum(0)).clamp_(min=0.0)
    value = float(torch.dot(plan.view(-1), cost.reshape(-1)))
    missing = max(float(row_gap.sum()), float(col_gap.sum()))
    if missing > 0:  # the deficits' product coupling
        value += float(row_gap @ cost @ col_gap) / missing
    slack = 8 * (n + m + 8) * _U + (n * m + 4) * _U * value
    if value + slack < best:
        best, best_slack = value + slack, slack
    return best, best_slack


def _stage(
    cost: torch.Tensor,
    f: torch.Tensor,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    eps: float,
    target: float,
    budget: int,
    buf: torch.Tensor,
) -> tuple[torch.Tensor, int, float]:
    """Sinkhorn at one eps until the row marginals are within ``target`` (or ``budget``).

    The row marginal of the plan (f, g = softmin(f)) is ``a_i exp((f_i - f'_i) / eps)``
    with f' the next row update, so its error comes free with the iteration.
    """
    a = log_a.exp()
    done, error = 0, math.inf
    while done < budget:
        g = soft_min(cost, log_a + f / eps, eps, buf, 0)
        f_next = soft_min(cost, log_b + g / eps, eps, buf, 1)
        error = float((a * torch.expm1((f - f_next) / eps).abs()).sum())
        f, done = f_next, done + 1
        if error <= target:
            break
    return f, done, error


def same_samples(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Whether ``x`` (n, d) and ``y`` (m, d) are the same distribution: W1 = 0 exactly.

    The same rows, each with the same share of its sample (``count_x / n == count_y /
    m``; n and m may differ). The bounds cannot certify W1 = 0 to a relative ``rtol``:
    the caller returns 0 without solving.
    """
    rows_x, count_x = torch.unique(x, dim=0, return_counts=True)
    rows_y, count_y = torch.unique(y, dim=0, return_counts=True)
    return rows_x.shape == rows_y.shape and bool(
        torch.equal(rows_x, rows_y) and torch.equal(count_x * y.shape[0], count_y * x.shape[0])
    )


def certified_w1(
    cost: torch.Tensor, *, rtol: float, reg: float | None, scaling: float, max_iter: int
) -> EntropicResult:
    """W1 of uniform weights on a float64 cost matrix, within a certified interval.

    ``cost`` (n, m) is divided by its maximum in place (the kernel works in units of
    the diameter, so no input scale under- or overflows eps); the result is in the
    original units. eps goes down to ``reg`` times the W1 lower bound; None: ``rtol /
    log(n m)``, where the entropic plan's cost is within about ``rtol`` of W1 (its
    excess is at most eps times the plan's entropy, <= log(n m)). ``max_iter`` caps
    the Sinkhorn iterations (one row and one column update each).
    """
    diameter = float(cost.max())
    cost.div_(diameter)
    n, m = cost.shape
    if reg is None:
        reg = rtol / math.log(max(n * m, 2))
    opts = {"dtype": cost.dtype, "device": cost.device}
    a, b = torch.full((n,), 1.0 / n, **opts), torch.full((m,), 1.0 / m, **opts)
    log_a, log_b = a.log(), b.log()
    buf = torch.empty_like(cost)
    f = torch.zeros(n, **opts)
    (lower, low_slack), (upper, up_slack) = dual_bound(cost, f, buf), (math.inf, 0.0)
    eps, target, n_iter, n_stages, error = 1.0, STAGE_MARGINAL_ERROR, 0, 0, math.inf
    closed, resolved = False, True
    while n_iter < max_iter:
        f, done, error = _stage(cost, f, log_a, log_b, eps, target, max_iter - n_iter, buf)
        n_iter, n_stages = n_iter + done, n_stages + 1
        lower, low_slack = max((lower, low_slack), dual_bound(cost, f, buf))
        floor = max(reg * lower, _EPS_MIN)
        if eps <= max(lower, floor):  # the plan resolves the W1 scale: try to close
            g = soft_min(cost, log_a + f / eps, eps, buf, 0)
            upper, up_slack = min((upper, up_slack), plan_bound(cost, f, g, eps, a, b, buf))
            closed = upper - lower <= rtol * lower
            if closed:
                break
            # at the smallest eps the width left is the rounding's: W1 is below what
            # float64 resolves at this rtol, and more iterations cannot change that
            if eps <= floor and low_slack + up_slack >= rtol * upper:
                resolved = False
                break
        if eps > floor:
            eps = max(eps * scaling, floor)
        else:  # at the smallest eps: converge further instead
            target = max(target * 0.25, 1e-15)
    if math.isinf(upper):
        g = soft_min(cost, log_a + f / eps, eps, buf, 0)
        upper, up_slack = plan_bound(cost, f, g, eps, a, b, buf)
    # back to the samples' units: the cost was divided by the diameter (one rounding
    # per entry, relative u on W1) and the product rounds once more
    lower, upper = lower * diameter, upper * diameter
    return EntropicResult(
        lower=lower - 3 * _U * abs(lower),
        upper=upper + 3 * _U * upper,
        eps=eps * diameter,
        n_iter=n_iter,
        n_stages=n_stages,
        marginal_error=error,
        converged=closed,
        resolved=resolved,
        rounding=(low_slack + up_slack) * diameter,
    )
