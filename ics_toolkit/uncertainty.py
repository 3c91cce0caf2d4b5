"""Confidence intervals of W1 estimates on a fixed probe, by resampling the probe inputs.

ICS is measured on a fixed probe u_1..u_n: X_i and Y_i are a layer's outputs for the
same input u_i before and after a step. What the probe stands for is the population
of inputs, so the uncertainty of an estimate is that of the probe draw. The interval
here is a **paired basic bootstrap**: draw n indices i*_1..i*_n with replacement,
evaluate the estimator on the rows (X_{i*}, Y_{i*}) -- the *same* indices at both
steps, as the probe is the same at both steps -- repeat ``n_resamples`` times, take
the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles q_lo, q_hi of the resampled
values v*, and report ``[2 v - q_hi, 2 v - q_lo]`` around the estimate v (default
level 95 %). The reflection (the "basic" or reverse-percentile interval) removes the
first-order bias of the resamples: duplicated rows make a resampled W1 larger when
the optimal plan is not the identity. For a mean (``paired``, identity-optimal
``exact``) the resampled values are nearly symmetric and it is the percentile
interval.

Two closed forms keep this cheap:

- ``paired`` is the mean of the row distances d_i = ||X_i - Y_i||: its resamples are
  means of resampled d_i, no distance is recomputed.
- ``exact`` when the optimal plan is the identity (``identity_share`` = 1, the common
  case for a small step): the identity coupling is then c-cyclically monotone on the
  probe, a property every sub-multiset inherits, so it stays optimal on every resample
  and the resampled exact W1 *equals* the resampled paired mean. Otherwise each
  resample is solved (``n_solves`` exact problems).

Sliced estimators resample the rows of their projections (one vectorized sort per
block of resamples). The sampling floor (W1 between two halves of the probe at one
step) answers another question -- how well a probe of n/2 inputs resolves two
*independent* draws of one distribution -- and is not an interval of ICS.

Every random choice comes from a private ``torch.Generator`` seeded by ``seed``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ics_toolkit import _checks
from ics_toolkit.errors import ICSValueError

__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_RESAMPLES",
    "DEFAULT_SOLVES",
    "IDENTITY_TOL",
    "bootstrap_indices",
    "check_level",
    "cost_interval",
    "interval",
    "paired_interval",
    "percentile_interval",
    "resampled_interval",
    "t_interval",
]

#: Confidence level of every interval unless told otherwise.
DEFAULT_LEVEL = 0.95
#: Resamples of the closed-form intervals (paired means, identity-optimal exact).
DEFAULT_RESAMPLES = 400
#: Resamples that each need an exact solve (an optimal plan other than the identity).
DEFAULT_SOLVES = 30
#: ``identity_share >= 1 - IDENTITY_TOL`` counts as an identity-optimal plan.
IDENTITY_TOL = 1e-9

#: Methods :func:`ics_toolkit.wasserstein` gives an interval for.
CI_ESTIMATORS = ("exact", "paired", "sliced", "max_sliced")


def check_level(level: Any, name: str = "ci") -> float:
    """``level`` as a float in (0, 1); ICSValueError naming ``name`` otherwise."""
    if isinstance(level, bool) or not isinstance(level, int | float) or not 0 < level < 1:
        raise ICSValueError(
            f"`{name}` must be a confidence level in (0, 1), e.g. {name}=0.95, got {level!r}"
        )
    return float(level)


def bootstrap_indices(
    n: int, n_resamples: int, seed: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``n_resamples`` rows of n indices in [0, n), drawn with replacement.

    Returns
    -------
    torch.Tensor, shape (n_resamples, n), int64
        From a private generator seeded by ``seed`` (global RNGs untouched).
    """
    gen = torch.Generator(device=device).manual_seed(int(seed))
    return torch.randint(0, n, (n_resamples, n), generator=gen, device=device)


def percentile_interval(
    values: torch.Tensor | np.ndarray, level: float, estimate: float | None = None
) -> tuple[float, float]:
    """The ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of resampled values.

    With ``estimate`` v, the basic interval ``[2 v - q_hi, 2 v - q_lo]`` instead.
    """
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64, device=v.device)
    low, high = torch.quantile(v, q).tolist()
    if estimate is None:
        return float(low), float(high)
    return 2.0 * estimate - float(high), 2.0 * estimate - float(low)


def paired_interval(
    dist: torch.Tensor,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of the mean of the row distances ``dist`` (shape (n,)): ``paired`` W1.

    Also the interval of ``exact`` when the optimal plan is the identity (see the
    module docstring).
    """
    d = dist.to(torch.float64).reshape(-1)
    idx = bootstrap_indices(d.shape[0], n_resamples, seed, d.device)
    return percentile_interval(d[idx].mean(dim=1), level, float(d.mean()))


def resampled_interval(
    x: torch.Tensor,
    y: torch.Tensor,
    statistic: Callable[[torch.Tensor, torch.Tensor], float],
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_SOLVES,
    seed: int = 0,
) -> tuple[float, float]:
    """Interval of ``statistic(x[i*], y[i*])`` over resampled paired rows (one call each)."""
    idx = bootstrap_indices(x.shape[0], n_resamples, seed, x.device)
    values = torch.tensor([float(statistic(x[i], y[i])) for i in idx], dtype=torch.float64)
    return percentile_interval(values, level, float(statistic(x, y)))


def cost_interval(
    cost: np.ndarray,
    solve: Callable[[np.ndarray], float],
    estimate: float,
    level: float = DEFAULT_LEVEL,
    n_resamples: int = DEFAULT_SOLVES,
    seed: int = 0,
) -> tuple[float, float]:
    """:func:`resampled_interval` of the exact W1 from its (n, n) cost matrix.

    Resampling paired rows i* resamples both samples alike, so the cost matrix of
    (x[i*], y[i*]) is ``cost[i*][:, i*]``: the resamples are solved without touching
    the samples again. The same draws, so the same interval as the samples give
    (up to the rounding of the recomputed entries, ~1e-13 relative in float64).
    """
    idx = bootstrap_indices(cost.shape[0], n_resamples, seed).numpy()
    values = torch.tensor([float(solve(cost[np.ix_(i, i)])) for i in idx], dtype=torch.float64)
    return percentile_interval(values, level, estimate)


def _projected_interval(
    x: torch.Tensor,
    y: torch.Tensor,
    directions: torch.Tensor,
    how: str,
    level: float,
    n_resamples: int,
    seed: int,
) -> tuple[float, float]:
    """Sliced (``how="mean"``) or max-sliced (``"max"``) W1 over resampled rows.

    ``directions`` has shape (d, L); the projections are resampled, sorted per
    direction, and the 1-D W1 of each direction is the mean gap of the sorted values.
    """
    px, py = x @ directions, y @ directions  # (n, L)
    n, n_dir = px.shape
    idx = bootstrap_indices(n, n_resamples, seed, x.device)
    block = max(1, 2**22 // max(1, n * n_dir))  # ~32 MiB of float64 per block
    out = []

    def value(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        per_dir = (torch.sort(a, dim=-2).values - torch.sort(b, dim=-2).values).abs().mean(-2)
        return per_dir.mean(dim=-1) if how == "mean" else per_dir.amax(dim=-1)

    for lo in range(0, n_resamples, block):
        i = idx[lo : lo + block]
        out.append(value(px[i], py[i]))  # (block,)
    return percentile_interval(torch.cat(out), level, float(value(px, py)))


def interval(
    method: str,
    x: torch.Tensor,
    y: torch.Tensor,
    info: dict[str, Any],
    solve: Callable[[torch.Tensor, torch.Tensor], float],
    level: float,
    n_resamples: int,
    seed: int,
    directions: torch.Tensor | None = None,
    cost_solve: Callable[[np.ndarray], float] | None = None,
) -> tuple[float, float, str]:
    """The interval of one estimate of checked samples (the engine's kernel).

    When ``info`` holds the exact solve's ``cost_matrix`` (the monitor's path), the
    paired means come from its diagonal and the resamples are solved on its
    submatrices by ``cost_solve`` (:func:`cost_interval`).

    Returns ``(low, high, how)``, ``how`` naming the computation (``"paired means"``,
    ``"exact solves"``, ``"projections"``).
    """
    if x.shape[0] != y.shape[0]:
        raise ICSValueError(
            f"`ci` resamples the probe inputs, the same at both steps, so `x` and `y` need "
            f"paired rows (the same number), got {x.shape[0]} and {y.shape[0]}"
        )
    cost = info.get("cost_matrix") if method == "exact" else None
    if method == "paired" or (
        method == "exact" and info.get("identity_share", 0.0) >= 1 - IDENTITY_TOL
    ):
        if cost is not None:  # its diagonal: ||x_i - y_i||, no pass over the samples
            dist = torch.from_numpy(np.ascontiguousarray(np.diagonal(cost)))
        else:
            dist = torch.linalg.vector_norm(x - y, dim=1)
        return (*paired_interval(dist, level, n_resamples, seed), "paired means")
    if method == "exact":
        solves = min(n_resamples, DEFAULT_SOLVES)
        if cost is not None and cost_solve is not None:
            estimate = float(info["value"]) if "value" in info else float(cost_solve(cost))
            low, high = cost_interval(cost, cost_solve, estimate, level, solves, seed)
            return low, high, "exact solves"
        return (*resampled_interval(x, y, solve, level, solves, seed), "exact solves")
    if method in ("sliced", "max_sliced") and directions is not None:
        how = "mean" if method == "sliced" else "max"
        return (
            *_projected_interval(x, y, directions, how, level, n_resamples, seed),
            "projections",
        )
    raise ICSValueError(
        f"`ci` is available for the methods {', '.join(CI_ESTIMATORS)}, not {method!r}; "
        "use method='exact' (or 'paired' for paired rows)"
    )


def t_interval(values: Any, level: float = DEFAULT_LEVEL) -> tuple[float, float, float]:
    """Mean and Student-t interval of independent replicates (e.g. seeds).

    Returns ``(mean, low, high)``; NaN limits with fewer than 2 finite values, and
    ``low == high == mean`` when every replicate is equal.
    """
    from scipy import stats

    v = np.asarray([float(a) for a in values], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if v.size < 2:
        return mean, math.nan, math.nan
    half = (
        float(stats.t.ppf((1 + level) / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size)
    )
    return mean, mean - half, mean + half


def resamples_arg(value: Any) -> int:
    """``n_resamples`` checked (an int >= 10)."""
    return _checks.integer(value, "ci_resamples", 10)
