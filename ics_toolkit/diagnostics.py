"""Rows that make a measured step interpretable: scale, coupling and uncertainty.

Called once per (layer, view) by the measured step (:mod:`ics_toolkit.shift`) after
its estimates are computed; everything is a function of the two float64 samples and
of the estimates' logs, so it is pure and testable on plain tensors.

- ``scale``: the RMS norm sqrt(mean_i ||X_i||^2) of the outputs at step t.
  ``relative_<q>`` = value / scale for every estimate and confidence limit: W1 is
  positively homogeneous (W1(aP, aQ) = |a| W1(P, Q)) and so is the scale, so the
  ratio does not change when a layer's outputs are rescaled (docs/theory.md).
- ``identity_share``: the mass the optimal plan of the exact W1 keeps on the pairs
  (i, i); 1 means exact = paired.
- ``<method>_ci_low`` / ``<method>_ci_high``: the probe-resampling interval of the
  methods in :data:`ics_toolkit._vocab.CI_METHODS` (:mod:`ics_toolkit.uncertainty`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ics_toolkit import _vocab, uncertainty
from ics_toolkit.errors import ICSError

__all__ = ["MAX_SOLVED_N", "relative_rows", "rms_scale", "step_rows"]

#: Largest number of rows whose exact interval is resolved resample by resample when the
#: optimal plan is not the identity (above it the monitor reports no interval, with a
#: warning on the row: 30 solves of an n x n problem at every step cost more than the step).
MAX_SOLVED_N = 512


def rms_scale(x: torch.Tensor, row_norms: torch.Tensor | None = None) -> float:
    """sqrt(mean_i ||x_i||^2) of an (n, d) sample: the unit of the relative values.

    ``row_norms`` (||x_i||, shape (n,)) reuse what a caller computed.
    """
    if row_norms is None:
        row_norms = torch.linalg.vector_norm(x, dim=1)
    # row norms combined in float64: float32 row norms are accurate (~1e-6) where one
    # float32 norm of all n * d values is not (~1e-4)
    return float(torch.linalg.vector_norm(row_norms.double())) / math.sqrt(x.shape[0])


def relative_rows(
    rows: Sequence[Mapping[str, Any]], scale: float, jl: float = 1.0
) -> list[dict[str, Any]]:
    """``relative_<q>`` rows (value / scale) of the estimate and interval rows in ``rows``.

    On a sketched view ``scale`` is the sketch's and ``jl`` (sqrt(d'/k)) rescales it to
    the layer's for ``exact_jl``, the one row in the layer's units: so
    ``relative_exact_jl`` equals ``relative_exact``, as the rescaling cancels.
    """
    out = []
    for row in rows:
        if row.get("kind") not in ("estimate", "interval"):
            continue
        unit = scale * (jl if row["quantity"] == _vocab.EXACT_JL else 1.0)
        value = row["value"] / unit if unit > 0 else math.nan
        out.append(
            {
                "quantity": _vocab.relative_name(row["quantity"]),
                "value": float(value),
                "kind": "relative",
                "wall_time_s": 0.0,
            }
        )
    return out


def step_rows(
    x: torch.Tensor,
    y: torch.Tensor,
    rows: Sequence[Mapping[str, Any]],
    logs: Mapping[str, Mapping[str, Any]],
    config: Any,
    row_norms: torch.Tensor | None = None,
    jl: float = 1.0,
) -> list[dict[str, Any]]:
    """The scale, identity-share, interval and relative rows of one (layer, view).

    Parameters
    ----------
    x, y : torch.Tensor, shape (n, d), float32 or float64
        The view's samples before and after the step (row i: the same probe input).
    rows : sequence of dict
        The rows already measured for this (layer, view) (estimates among them).
    logs : mapping
        The log of each non-batched estimator (``exact``: ``identity_share``).
    config : ics_toolkit.shift.MeasureConfig
        Its ``seed`` seeds the resamples; its ``exact`` options solve the resamples
        whose optimal plan is not the identity.
    row_norms : torch.Tensor, shape (n,), optional
        ||x_i||, when the caller has them (the scale is computed from them).
    jl : float
        On a sketched view, sqrt(d'/k) (:func:`ics_toolkit.sketch.jl_scale`): the
        factor of ``exact_jl``, which its relative row divides out again.

    Returns
    -------
    list of dict
        Rows with ``quantity``, ``value``, ``kind`` (and ``warning`` where an
        interval could not be computed).
    """
    start = time.perf_counter()
    out: list[dict[str, Any]] = []
    scale = rms_scale(x, row_norms)
    out.append({"quantity": _vocab.SCALE, "value": scale, "kind": "stat"})
    exact_log = logs.get("exact", {})
    if "identity_share" in exact_log:
        share = float(exact_log["identity_share"])
        out.append({"quantity": _vocab.IDENTITY_SHARE, "value": share, "kind": "stat"})
    values = {r["quantity"]: r["value"] for r in rows if r.get("kind") == "estimate"}
    if x.shape[0] == y.shape[0]:
        for method in _vocab.CI_METHODS:
            if method not in values or not math.isfinite(values[method]):
                continue
            share = float(logs.get(method, {}).get("identity_share", 0.0))
            if (
                method == "exact"
                and share < 1 - uncertainty.IDENTITY_TOL
                and x.shape[0] > MAX_SOLVED_N
            ):
                warning = (
                    f"no interval: the exact plan is not the identity, and resolving "
                    f"{uncertainty.DEFAULT_SOLVES} resamples of n = {x.shape[0]} rows (above "
                    f"{MAX_SOLVED_N}) at every step would cost more than the step"
                )
                for name in _vocab.ci_names(method):
                    out.append(
                        {
                            "quantity": name,
                            "value": math.nan,
                            "kind": "interval",
                            "warning": warning,
                        }
                    )
                continue
            try:
                low, high, _ = uncertainty.interval(
                    method,
                    x,
                    y,
                    {**logs.get(method, {}), "value": values[method]},
                    _solver(config),
                    uncertainty.DEFAULT_LEVEL,
                    uncertainty.DEFAULT_RESAMPLES,
                    config.seed,
                    cost_solve=_cost_solver(config),
                )
            except ICSError as err:  # a resample the exact solver could not finish
                low = high = math.nan
                warning = f"no interval: {err}"
            else:
                warning = None
            for name, value in zip(_vocab.ci_names(method), (low, high), strict=True):
                row = {"quantity": name, "value": value, "kind": "interval"}
                if warning:
                    row["warning"] = warning
                out.append(row)
    seconds = time.perf_counter() - start
    for row in out:
        row["wall_time_s"] = seconds / len(out)
    out += relative_rows([*rows, *out], scale, jl)
    return out


def _solver(config: Any) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """The exact W1 of two resampled float64 samples, with the monitor's exact options."""
    from ics_toolkit.distances import _kernel

    def solve(a: torch.Tensor, b: torch.Tensor) -> float:
        opts = {**config.options["exact"], "on_failure": "raise"}
        return float(_kernel("exact", a, b, opts, config.n_projections, config.seed)[0])

    return solve


def _cost_solver(config: Any) -> Callable[[Any], float]:
    """The exact W1 of a resample's float64 cost matrix (uniform weights), as :func:`_solver`."""
    from ics_toolkit.distances import _solve_cost

    def solve(cost: Any) -> float:
        opts = {**config.options["exact"], "on_failure": "raise"}
        return _solve_cost(cost, opts)

    return solve
