r"""The kernel of ``method="sinkhorn"``: entropic W1 with a certified interval.

Everything here works on one checked float64 cost matrix ``C`` (n, m), ``C_ij =
||x_i - y_j||``, on any device, in torch only (no POT, no host round trip but one
scalar per iteration). The documented entry point is
:func:`ics_toolkit.distances.wasserstein`; docs/theory.md derives the bounds and
docs/benchmarks.md ("Sinkhorn") measures the design choices.

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

The annealing stops once ``upper - lower <= rtol * lower`` (or below 1e-13 of the
diameter: W1 = 0); the value returned is ``lower``, so it is within ``rtol`` of W1 by
construction. eps never goes below ``reg * lower`` (the W1 scale, not the mean cost;
by default ``rtol / log(n m)``, where the entropic plan's excess cost is about
``rtol``); there the stages tighten their marginal target instead. Bounds are
certified up to float64 rounding of O(n m) sums (relative 1e-15 of the cost's
diameter).
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

# Width of the interval, relative to the cost's diameter, that counts as closed whatever
# W1 is: the bounds are sums of O(n m) float64 terms, exact to about this (W1 = 0, the
# same samples in another order, is certified by it).
_ABS_WIDTH = 1e-13


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


def dual_bound(
    cost: torch.Tensor, f: torch.Tensor, a: torch.Tensor, b: torch.Tensor, buf: torch.Tensor
) -> float:
    """``<a, f'> + <b, g>`` for the double c-transform of ``f``: a lower bound of W1."""
    g = torch.sub(cost, f[:, None], out=buf).amin(0)
    f2 = torch.sub(cost, g[None, :], out=buf).amin(1)
    return float(a @ f2 + b @ g)


def plan_bound(
    cost: torch.Tensor,
    f: torch.Tensor,
    g: torch.Tensor,
    eps: float,
    a: torch.Tensor,
    b: torch.Tensor,
    buf: torch.Tensor,
) -> float:
    """The cost of a feasible coupling built from the plan of (f, g): an upper bound."""
    best = math.inf
    n, m = cost.shape
    if n == m:  # the plan's row-wise argmax, when it is a permutation
        j = torch.sub(g[None, :], cost, out=buf).argmax(1)
        if bool((torch.bincount(j, minlength=m) == 1).all()):
            best = float(cost.gather(1, j[:, None]).sum()) / n
    plan = torch.sub(f[:, None] + g[None, :], cost, out=buf)
    plan.div_(eps).exp_().mul_(a[:, None]).mul_(b[None, :])
    plan.mul_(torch.clamp(a / plan.sum(1), max=1.0)[:, None])
    plan.mul_(torch.clamp(b / plan.sum(0), max=1.0)[None, :])
    row_gap, col_gap = a - plan.sum(1), b - plan.sum(0)
    value = float(torch.dot(plan.view(-1), cost.reshape(-1)))
    missing = float(row_gap.sum())
    if missing > 0:  # the deficits' product coupling, of mass `missing`
        value += float(row_gap @ cost @ col_gap) / missing
    return min(best, value)


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
    """Whether (n, d) ``x`` and ``y`` hold the same rows with the same multiplicities.

    Then W1 = 0 exactly. The bounds below cannot certify it when rows repeat: ties make
    the plan's row-wise argmax no permutation, and the rounded plan's cost only tends
    to 0.
    """
    if x.shape != y.shape:
        return False
    rows_x, count_x = torch.unique(x, dim=0, return_counts=True)
    rows_y, count_y = torch.unique(y, dim=0, return_counts=True)
    return rows_x.shape == rows_y.shape and bool(
        torch.equal(rows_x, rows_y) and torch.equal(count_x, count_y)
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
    lower, upper = dual_bound(cost, f, a, b, buf), math.inf
    eps, target, n_iter, n_stages, error = 1.0, STAGE_MARGINAL_ERROR, 0, 0, math.inf
    while n_iter < max_iter:
        f, done, error = _stage(cost, f, log_a, log_b, eps, target, max_iter - n_iter, buf)
        n_iter, n_stages = n_iter + done, n_stages + 1
        lower = max(lower, dual_bound(cost, f, a, b, buf))
        floor = max(reg * lower, _EPS_MIN)
        if eps <= max(lower, floor):  # the plan resolves the W1 scale: try to close
            g = soft_min(cost, log_a + f / eps, eps, buf, 0)
            upper = min(upper, plan_bound(cost, f, g, eps, a, b, buf))
            if upper - lower <= rtol * lower + _ABS_WIDTH:
                break
        if eps > floor:
            eps = max(eps * scaling, floor)
        else:  # at the smallest eps: converge further instead
            target = max(target * 0.25, 1e-15)
    if math.isinf(upper):
        g = soft_min(cost, log_a + f / eps, eps, buf, 0)
        upper = plan_bound(cost, f, g, eps, a, b, buf)
    return EntropicResult(
        lower=lower * diameter,
        upper=upper * diameter,
        eps=eps * diameter,
        n_iter=n_iter,
        n_stages=n_stages,
        marginal_error=error,
        converged=upper - lower <= rtol * lower + _ABS_WIDTH,
    )
