"""One measured step: two captures of the probe in, result rows out.

The monitor captures the probe before and after an optimizer step; this module turns
the two captures into rows of the tidy results table (``ics_toolkit.results``): per
layer and view, the chosen W1 estimators, their sampling floors, the theory's bounds
(with U3/U5 from the normalized values BatchNorm and Unitization layers actually
produced), the moment drift, and a check that the bounds are in order. It is pure:
no model is run here, so it can be tested (and reused) on hand-made captures.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ics_toolkit import _checks, _resolution, _scaling, _vocab, diagnostics
from ics_toolkit._norm_snapshot import NormSnapshot, norm_pair, norm_snapshot
from ics_toolkit.bound_terms import bound_terms
from ics_toolkit.bounding import (
    RTOL,
    _bounds,
    _differences,
    _u3_stored_terms,
    _u3_tight,
    check_order,
)
from ics_toolkit.distances import _half_index, _kernel, _many, _parse_options
from ics_toolkit.errors import ICSError, ICSTypeError, ICSValueError, ICSWarning
from ics_toolkit.moments import DRIFT_POWERS, _column_moments, _drift
from ics_toolkit.recording import CaptureInfo
from ics_toolkit.sketch import jl_scale, no_autocast
from ics_toolkit.views import view

__all__ = ["MeasureConfig", "NormSnapshot", "StepCapture", "measure_step", "norm_snapshot"]


@dataclass(frozen=True)
class MeasureConfig:
    """What to compute at a measured step (see :class:`ics_toolkit.ICSMonitor`).

    Built once where the user hands the options over (the monitor's constructor, the
    CLI) and checked there: building it validates and normalizes every field (names
    against :mod:`ics_toolkit._vocab`, ``floor=True`` to the first method with a
    floor, each method's options parsed to their full form). Below it the measured
    step calls the engine's kernels without checking again.

    Parameters
    ----------
    methods : sequence of str
        W1 methods of the ``flatten`` and ``pixel`` views.
    views : sequence of str
        Views of every layer.
    floor : bool or sequence of str
        Methods whose sampling floor is reported (True: the first of ``methods``
        that has one).
    bounds, moments : bool
        Evaluate the bounds / the moment drift.
    n_projections : int
        Random directions of the sliced methods and L3.
    seed : int
        Seed of every random choice.
    max_pixel_samples : int
        Row cap of the ``pixel`` view.
    rtol : float
        Tolerance of the bound checks.
    method_options : mapping
        Extra options per method, e.g. ``{"sinkhorn": {"rtol": 1e-3}}``.
    precision : {"float64", "float32"}
        Dtype of the analysis. ``"float64"`` (the default here, the reference) converts
        every view to float64 once; ``"float32"`` (:class:`ics_toolkit.ICSMonitor`'s
        default) analyses float32 captures as stored: about 2x faster, every estimate,
        floor, bound and interval within a relative :data:`~ics_toolkit._vocab.FLOAT32_ERROR`
        (1e-4) of the float64 value (U3 1e-3), bounds checked with ``max(rtol, 1e-5)``.
        The ``exact`` solver always runs in float64 on the cost matrix.
    """

    methods: tuple[str, ...] = _vocab.DEFAULT_METHODS
    views: tuple[str, ...] = ("flatten",)
    floor: Any = ("exact",)  # methods whose sampling floor is reported
    bounds: bool = True
    moments: bool = True
    n_projections: int = 128
    seed: int = 0
    max_pixel_samples: int = 1024
    rtol: float = RTOL
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    precision: str = "float64"
    token_mask: Any = None  # the probe's padding mask (N, T) for the ``token`` view, or None
    #: every method's options in full (defaults filled in, checked); set when built
    options: Mapping[str, Mapping[str, Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        put = object.__setattr__
        methods = _checks.methods(self.methods)
        put(self, "methods", methods)
        put(self, "views", _checks.views(self.views))
        put(self, "floor", _floor_methods(self.floor, methods))
        put(self, "bounds", _checks.boolean(self.bounds, "bounds"))
        put(self, "moments", _checks.boolean(self.moments, "moments"))
        put(self, "n_projections", _checks.positive_int(self.n_projections, "n_projections"))
        put(self, "seed", _checks.seed(self.seed))
        # a W1 needs 2 samples, so the pixel view keeps at least 2 rows
        put(
            self,
            "max_pixel_samples",
            _checks.integer(self.max_pixel_samples, "max_pixel_samples", 2),
        )
        put(self, "rtol", _checks.positive_number(self.rtol, "rtol"))
        put(self, "precision", _checks.choice(self.precision, "precision", _vocab.PRECISIONS))
        given = _method_options(self.method_options)
        put(self, "method_options", given)
        options = {}
        for method in dict.fromkeys((*methods, *sorted(_vocab.BATCHED_METHODS))):
            opts = dict(given.get(method, {}))
            if method in ("exact", "sinkhorn"):
                opts.setdefault("on_failure", "flag")  # a failed solve is a flagged row
            elif self.precision == "float32":
                opts.setdefault("dtype", None)  # the float32 views as they are
            options[method] = _parse_options(method, opts, log=True)
        put(self, "options", options)

    @property
    def dtype(self) -> torch.dtype:
        """The analysis dtype (``precision`` as a torch dtype)."""
        return torch.float32 if self.precision == "float32" else torch.float64

    @property
    def check_rtol(self) -> float:
        """The bound checks' relative tolerance: ``rtol``, at least 1e-5 in float32."""
        if self.precision == "float32":
            return max(self.rtol, _vocab.FLOAT32_RTOL)
        return self.rtol


# options the monitor passes to every method itself: setting them per method would clash
_MONITOR_OPTIONS = {"n_projections": "n_projections", "seed": "seed", "log": None}


def _method_options(method_options: Any) -> dict[str, dict[str, Any]]:
    """``method_options`` checked: a dict from method name to a dict of its own options."""
    if method_options is None:
        return {}
    if not isinstance(method_options, Mapping):
        raise ICSTypeError(
            f"`method_options` must be a dict from method name to a dict of its options, "
            f'e.g. {{"sinkhorn": {{"rtol": 1e-3}}}}, got {type(method_options).__name__}'
        )
    checked = {}
    for method, options in method_options.items():
        _checks.choice(method, f"`method_options` key {method!r}", _vocab.METHODS)
        if not isinstance(options, Mapping):
            raise ICSTypeError(
                f"`method_options[{method!r}]` must be a dict of options, got "
                f"{type(options).__name__}"
            )
        own = [k for k in options if k in _MONITOR_OPTIONS]
        if own:
            hint = ", ".join(
                f"pass {_MONITOR_OPTIONS[k]}= to the monitor"
                if _MONITOR_OPTIONS[k]
                else f"{k!r} is set by the monitor"
                for k in own
            )
            raise ICSValueError(
                f"`method_options[{method!r}]` sets {own}, which the monitor sets itself "
                f"for every method ({hint})"
            )
        try:
            _parse_options(method, dict(options), log=True)
        except ICSError as err:
            raise type(err)(f"`method_options[{method!r}]`: {err}") from None
        checked[method] = dict(options)
    return checked


def _floor_methods(floor: Any, methods: tuple[str, ...]) -> tuple[str, ...]:
    if floor is True:
        return tuple(m for m in methods if m not in _vocab.FLOORLESS)[:1]
    if floor is False or floor is None:
        return ()
    chosen = (floor,) if isinstance(floor, str) else tuple(floor)
    bad = [m for m in chosen if m not in methods or m in _vocab.FLOORLESS]
    if bad:
        raise ICSValueError(
            f"`floor` names {bad}, which are not among `methods` {list(methods)} or have no "
            "floor (paired needs paired rows); pass True, False or a subset of `methods`"
        )
    return chosen


@dataclass
class StepCapture:
    """Everything captured on one side of an optimizer step.

    ``sketched`` maps the keys stored as a random-projection sketch (``tensors[key]``
    of shape (n, k), see :mod:`ics_toolkit.sketch`) to the width d of the flattened
    output they sketch; their rows get the view ``"sketch"``.
    """

    tensors: dict[str, torch.Tensor]
    info: dict[str, CaptureInfo]
    norms: dict[str, NormSnapshot] = field(default_factory=dict)
    sketched: dict[str, int] = field(default_factory=dict)
    #: What the analysis computed from one side alone (row norms, column moments, sorted
    #: projections, largest |value|), keyed by (key, view, dtype, scale, what): when this
    #: capture is reused as the next step's "before" (``reuse_probe``), its numbers are
    #: not computed again. Lives and dies with the capture's tensors.
    cache: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False, compare=False)


def _memo(capture: StepCapture, key: tuple[Any, ...], fn: Callable[..., Any], *args: Any) -> Any:
    """``capture.cache[key]``, computed as ``fn(*args)`` the first time."""
    if key not in capture.cache:
        capture.cache[key] = fn(*args)
    return capture.cache[key]


def measure_step(
    step: int,
    before: StepCapture,
    after: StepCapture,
    config: MeasureConfig,
    keys: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows of the results table for one optimizer step.

    Parameters
    ----------
    step : int
        The step t whose update t -> t+1 separates ``before`` and ``after``.
    before, after : StepCapture
        The captures of the probe at t and t+1 (same keys, same probe).
    config : MeasureConfig
        Methods, views and options.
    keys : sequence of str, optional
        Capture keys to measure (default: every key of ``before.tensors``).

    Returns
    -------
    list of dict
        One dict per row, with the columns of :data:`ics_toolkit.results.COLUMNS`.
        A layer whose outputs are not finite gets one ``nonfinite`` event row (and an
        :class:`~ics_toolkit.errors.ICSWarning`); the other layers are measured. A
        violated bound is warned about and kept (``bounds_hold`` False).

    Notes
    -----
    Everything runs on the captures' device, in ``config.precision`` (a (layer, view)
    whose row norms float32 cannot square safely, above 1e15 or all below 1e-15, in
    float64), with autocast disabled (a capture taken under ``torch.autocast`` is
    analysed at full precision); only the
    ``exact`` solver's cost matrix (POT runs on the CPU) and the final numbers move
    to the host. Keys in ``before.sketched`` are random-projection sketches: their
    rows get the view ``"sketch"``, every quantity is that of the sketch (lower
    bounds and ``exact`` remain lower bounds of the true W1, upper bounds do not),
    ``exact_jl`` is the Johnson-Lindenstrauss estimate ``sqrt(d'/k) * exact`` of the
    true W1, and no moment drift is reported (see :mod:`ics_toolkit.sketch`).
    """
    types = {"cpu"} | {t.device.type for t in before.tensors.values()}
    with contextlib.ExitStack() as stack:
        for device_type in sorted(types):
            stack.enter_context(no_autocast(torch.device(device_type)))
        return _measure_step(step, before, after, config, keys)


def _measure_step(
    step: int,
    before: StepCapture,
    after: StepCapture,
    config: MeasureConfig,
    keys: Sequence[str] | None,
) -> list[dict[str, Any]]:
    keys = list(before.tensors) if keys is None else list(keys)
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], dict[str, Any]] = {}  # (key, view) -> views and rows
    # a view that holds every value (flatten, channel; not the subsampled pixel and token
    # views) is scanned for NaN / Inf through
    # the float64 row norms the bounds and the drift use anyway; otherwise one scan
    covering = next((v for v in config.views if v not in ("pixel", "token")), None)
    for key in keys:
        x, y = before.tensors[key], after.tensors[key]
        info = before.info[key]
        layer: dict[tuple[str, str], dict[str, Any]] = {}
        x_ok = y_ok = True
        if covering is None:
            x_ok, y_ok = _all_finite(x), _all_finite(y)
        if x_ok and y_ok:
            for name in config.views:
                opts = (
                    {"max_samples": config.max_pixel_samples, "seed": config.seed}
                    if name in ("pixel", "token")
                    else {}
                )
                if name == "token":
                    opts["mask"] = config.token_mask
                # the analysis dtype once here, not in every estimator below
                xv = view(x, name, info, **opts).to(config.dtype)
                yv = view(y, name, info, **opts).to(config.dtype)
                g = {"x": xv, "y": yv, "opts": opts, "rows": []}
                if name in ("flatten", "channel") and x.dtype in (torch.float32, torch.float64):
                    # these views hold every stored value, which float64 holds exactly: the
                    # check's scale (largest |value|) is read from the half-size storage
                    g["stored"] = (x, y)
                g["norms"] = _side_norms(before, after, key, name, xv, yv)
                if xv.dtype == torch.float32 and not _float32_safe(*g["norms"]):
                    # squared norms would overflow or underflow float32 (or a value is not
                    # finite: float64 tells which): this (layer, view) is analysed in float64
                    # from the stored values: the float32 view may have flushed them
                    xv = view(x, name, info, **opts).to(torch.float64)
                    yv = view(y, name, info, **opts).to(torch.float64)
                    g["x"], g["y"] = xv, yv
                    g["norms"] = _side_norms(before, after, key, name, xv, yv)
                _rescale(g)
                g["side"] = (key, name, g["x"].dtype, g.get("scale_e", 0))
                g["rounding"] = _roundings(x.dtype, info, xv.dtype, key in before.sketched)
                if name == covering:
                    x_ok = bool(torch.isfinite(g["norms"][0].sum()))
                    y_ok = bool(torch.isfinite(g["norms"][1].sum()))
                layer[(key, name)] = g
        if not (x_ok and y_ok):
            side = "before" if not x_ok else "after"
            msg = (
                f"step {step}: layer {key!r} produced NaN or Inf on the probe ({side} the "
                "update); it is not measured at this step, the other layers are"
            )
            source = info.source_dtype
            if source.is_floating_point and torch.finfo(source).max > torch.finfo(x.dtype).max:
                # a finite float64 output above 3.4e38 is stored by a float32 capture as inf
                msg += (
                    f" (or its {source} outputs exceed the largest {x.dtype} the capture "
                    f"stores, {torch.finfo(x.dtype).max:.3g}: pass capture_dtype={source})"
                )
            warnings.warn(msg, ICSWarning, stacklevel=3)
            rows.append(_event(step, key, "nonfinite", msg))
            continue
        groups.update(layer)
    # every tensor was scanned for NaN / Inf above: from here on the engine's kernels
    _measure_groups(step, groups, before, after, config)
    for (key, name), g in groups.items():
        n, d = int(g["x"].shape[0]), int(g["x"].shape[1])
        label = "sketch" if key in before.sketched else name
        for row in g["rows"]:
            row.update(step=step, layer=key, view=label, n_samples=n, dim=d)
            row.setdefault("seed", config.seed)
            rows.append(row)
    return rows


def _measure_groups(
    step: int,
    groups: dict[tuple[str, str], dict[str, Any]],
    before: StepCapture,
    after: StepCapture,
    config: MeasureConfig,
) -> None:
    """Fill ``groups[...]["rows"]``: estimators, floors, bounds, drift and the check."""
    batched = _vocab.BATCHED_METHODS
    for (_, name), g in groups.items():
        methods = ("per_coordinate",) if name == "channel" else config.methods
        g["methods"] = [m for m in methods if m not in batched]
        g["batched"] = [m for m in methods if m in batched]

    # the fused path: one call per kernel over every (layer, view); sliced and max_sliced
    # are the mean and the max of the same per-direction distances, so they share a call
    for kernel in ("sliced", "per_coordinate"):
        wanted = ("sliced", "max_sliced") if kernel == "sliced" else (kernel,)
        chosen = [gk for gk, g in groups.items() if any(m in g["batched"] for m in wanted)]
        if not chosen:
            continue
        start = time.perf_counter()
        # each side's sorted projections are kept with its capture (see StepCapture.cache)
        memos = [
            (before.cache, after.cache, (*groups[gk]["side"], "sorted_projections", kernel))
            for gk in chosen
        ]
        out = _many(
            kernel,
            [(groups[gk]["x"], groups[gk]["y"]) for gk in chosen],
            [(f"{gk[0]} before", f"{gk[0]} after") for gk in chosen],
            config.options[kernel],
            config.n_projections,
            config.seed,
            memos if kernel == "sliced" else None,
        )
        seconds = (time.perf_counter() - start) / len(chosen)
        for gk, (value, log) in zip(chosen, out, strict=True):
            g = groups[gk]
            if kernel == "per_coordinate":
                _estimate_rows(g, kernel, value, seconds, config)
                continue
            per_direction = log["per_direction"]
            methods = [m for m in wanted if m in g["batched"]]
            for method in methods:  # one computation: its time is shared between the rows
                v = value if method == "sliced" else float(per_direction.max())
                _estimate_rows(g, method, v, seconds / len(methods), config)

    for (_, name), g in groups.items():
        paired = g["x"].shape[0] == g["y"].shape[0]
        if paired and config.bounds and name != "channel":
            # one pass over x - y: U1/U2's row distances and L3's per-column upper values,
            # and the cost matrix's diagonal where it would be differenced again
            g["differences"] = _differences(g["x"], g["y"], g["norms"])
        for method in g["methods"]:
            start = time.perf_counter()
            try:
                value, log = _kernel(
                    method,
                    g["x"],
                    g["y"],
                    config.options[method],
                    config.n_projections,
                    config.seed,
                    row_norms=g["norms"],
                    paired_dist=g["differences"].dist if "differences" in g else None,
                    keep_cost=method == "exact",
                )
            except ICSError as err:  # e.g. a problem too large for the exact solver
                g["rows"].append(_row("estimate", method, math.nan, warning=str(err)))
                continue
            row = _row("estimate", method, value, wall_time_s=time.perf_counter() - start)
            g.setdefault("logs", {})[method] = log  # read by diagnostics.step_rows
            row["solver_status"] = log.get("status")
            if log.get("status") not in (None, "optimal", "converged"):
                row["warning"] = f"{method} solver status {log.get('status')}: value not W1"
            g["rows"].append(row)

    for (key, name), g in groups.items():
        x, y = g["x"], g["y"]
        width = before.sketched.get(key)
        if width is not None:  # the JL estimate of the true W1 from the sketch's exact W1
            exact = next((r for r in g["rows"] if r["quantity"] == "exact"), None)
            if exact is not None and math.isfinite(exact["value"]):
                value = jl_scale(width, int(x.shape[1])) * exact["value"]
                g["rows"].append(_row("estimate", _vocab.EXACT_JL, value, wall_time_s=0.0))
        if config.floor:
            floored = [m for m in (*g["batched"], *g["methods"]) if m in config.floor]
            if name == "channel":
                floored = ["per_coordinate"]
            for method in floored:
                g["rows"].append(_floor_row(x, method, config, g["norms"][0]))
        drifts = config.moments and name != "channel" and width is None
        g["stats_s"], shared = 0.0, config.bounds and "differences" not in g
        if (drifts or shared) and name != "channel":
            # one pass over the samples for the column moments the drift (mean, variance,
            # fourth moment) and unpaired bounds (mean gap) share; paired bounds take
            # the mean gap from the differences
            start = time.perf_counter()
            ids = (*g["side"], "column_moments", drifts)
            g["moments"] = (
                _memo(before, ids, _column_moments, x, drifts),
                _memo(after, ids, _column_moments, y, drifts),
            )
            seconds = time.perf_counter() - start
            # the moments' time, split between the rows that use them
            g["stats_s"] = seconds / (1 + drifts) if shared else 0.0
            g["drift_stats_s"] = seconds - g["stats_s"]
        if config.bounds and name != "channel":
            g["rows"].extend(_bound_rows(key, name, g, before, after, config))
        if drifts:
            start = time.perf_counter()
            drift = _drift(x, y, g["moments"], g["norms"])
            seconds = time.perf_counter() - start + g["drift_stats_s"]
            for q, v in drift.items():
                g["rows"].append(_row("drift", q, v, wall_time_s=seconds / len(drift)))
        g["rows"].append(_resolution_row(g, name, width))
        # scale, identity share, intervals and relative values (issue #13)
        g["rows"].extend(
            diagnostics.step_rows(
                x,
                y,
                g["rows"],
                g.get("logs", {}),
                config,
                g["norms"][0],
                1.0 if width is None else jl_scale(width, int(x.shape[1])),
            )
        )
        if g.get("scale_e"):
            _unscale_rows(g["rows"], g["scale_e"])
        _check_group(step, key, name, g, config, (before, after))


def _roundings(
    stored: torch.dtype, info: CaptureInfo, analysed: torch.dtype, sketched: bool
) -> dict[str, Any]:
    """The roundings between a layer's exact outputs and the analysed view (``_resolution``).

    The layer rounds to the dtype it produced (``info.source_dtype``: bfloat16 under a
    bfloat16 model or autocast), the recorder to the storage dtype, the view to the
    analysis dtype. A sketch is computed from the layer's values in float32 (float64 for
    float64 values) and rounded after: the layer's rounding happened before the projection.
    """
    if not sketched:
        return {"dtypes": (info.source_dtype, stored, analysed), "sketch": None}
    wide = torch.float64 if info.source_dtype == torch.float64 else torch.float32
    return {"dtypes": (wide, stored, analysed), "sketch": (info.source_dtype,)}


def _resolution_row(g: dict[str, Any], name: str, width: int | None) -> dict[str, Any]:
    """The ``resolution`` row of one (layer, view): how far storage rounding moves its W1."""
    start = time.perf_counter()
    rounding = g["rounding"]
    sketch = None
    if rounding["sketch"] is not None and width is not None:
        sketch = (rounding["sketch"], jl_scale(width, int(g["x"].shape[1])), width)
    value = _resolution.resolution(
        (g["x"], g["y"]),
        rounding["dtypes"],
        name,
        g["norms"],
        sketch=sketch,
        scale_e=g.get("scale_e", 0),
    )
    g["resolution"] = value
    return _row("stat", _vocab.RESOLUTION, value, wall_time_s=time.perf_counter() - start)


def _floor_row(
    x: torch.Tensor, method: str, config: MeasureConfig, row_norms: torch.Tensor | None = None
) -> dict[str, Any]:
    """The sampling floor of ``method`` on the checked float64 sample ``x``.

    ``row_norms`` (``||x_i||``) spare ``exact`` a pass over each half.
    """
    start = time.perf_counter()
    if x.shape[0] < 4:
        message = (
            f"the floor splits the {x.shape[0]} probe samples into two halves of at "
            "least 2 samples each, so it needs at least 4"
        )
        return _row("floor", f"floor_{method}", math.nan, warning=message)
    i, j = _half_index(x.shape[0], config.seed, x.device)
    first, second = x[i], x[j]
    norms = None if row_norms is None else (row_norms[i], row_norms[j])
    opts = config.options[method]
    try:
        value, log = _kernel(
            method, first, second, opts, config.n_projections, config.seed, row_norms=norms
        )
    except ICSError as err:
        return _row("floor", f"floor_{method}", math.nan, warning=str(err))
    if log.get("status") not in (None, "optimal", "converged"):
        message = f"{method} solver status {log.get('status')} on the halves: floor not W1"
        return _row("floor", f"floor_{method}", math.nan, warning=message)
    if method == "per_coordinate":
        value = float(torch.as_tensor(value).mean())
    return _row("floor", f"floor_{method}", value, wall_time_s=time.perf_counter() - start)


#: Row norms a float32 analysis handles: their squares (cost matrices, second moments)
#: stay far from float32's overflow (3.4e38) and from its subnormal range (1.2e-38).
_FLOAT32_NORMS = (1e-15, 1e15)


def _rescale(g: dict[str, Any]) -> None:
    """A (layer, view) at an extreme scale for its analysis dtype: analysed times 2^-e.

    The row norms answer without a pass over the samples (:data:`_scaling.SAFE_NORMS`:
    float64 2^-150..2^150, float32 2^-8..2^20, where fourth moments and squared paired
    distances stay normal); only norms that under- or overflowed need a scan. The
    scaling is exact, every row is scaled back by :func:`_unscale_rows`.
    """
    x, y = g["x"], g["y"]
    e = _scaling.norm_exponent(*g["norms"], dtype=x.dtype)
    if e is None:  # norms of 0 or inf: squares that under- or overflowed; look at the values
        e = _scaling.exponent(x, y)
    if e:
        g["x"], g["y"] = x, y = _scaling.scale(x, e), _scaling.scale(y, e)
        if e > 0 and all(bool(torch.isfinite(n.max())) for n in g["norms"]):
            # large finite norms: scaled with the samples (exact), no second pass
            g["norms"] = tuple(_scaling.scale(n, e) for n in g["norms"])
        else:  # norms that under- or overflowed, or lost digits to subnormal squares
            g["norms"] = (torch.linalg.vector_norm(x, dim=1), torch.linalg.vector_norm(y, dim=1))
        g["scale_e"] = e


def _float32_safe(nx: torch.Tensor, ny: torch.Tensor) -> bool:
    """Whether samples with row norms ``nx``, ``ny`` can be analysed in float32.

    Every row norm must be finite and at most 1e15, and the largest at least 1e-15
    (a layer of exact zeros is analysed in float64, where it costs nothing).
    """
    top = float(torch.maximum(nx.max(), ny.max()))
    return math.isfinite(top) and _FLOAT32_NORMS[0] <= top <= _FLOAT32_NORMS[1]


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in ``t``, in one pass without a mask the size of ``t``.

    A float64 sum of lower-precision values cannot overflow, so it is finite exactly
    when every value is.
    """
    if t.dtype == torch.float64:
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


#: Powers of length of the rows computed from a (layer, view)'s samples that are not
#: plain lengths (the rest of those kinds are lengths, power 1).
_ROW_POWERS = {
    **DRIFT_POWERS,
    _vocab.IDENTITY_SHARE: 0,
    _vocab.RESOLUTION: 0,  # computed in the stored units already (scale_e)
}


def _unscale_rows(rows: list[dict[str, Any]], e: int) -> None:
    """Rows measured on samples times 2^-e, back in the samples' units (in place).

    The normalization bounds and their terms come from the layer's normalized values
    and parameters, not from the rescaled samples, and relative values are ratios:
    those stay as they are.
    """
    for row in rows:
        if row["kind"] in ("relative", "term") or row["quantity"] in _vocab.NORM_BOUNDS:
            continue
        power = _ROW_POWERS.get(row["quantity"], 1)
        if power and math.isfinite(row["value"]):
            try:
                row["value"] = _scaling.unscale(row["value"], power * e, row["quantity"])
            except ICSValueError as err:  # e.g. a variance of outputs near 1e-200: 1e-400
                row["value"], row["warning"] = math.nan, str(err)


def _side_norms(
    before: StepCapture,
    after: StepCapture,
    key: str,
    name: str,
    xv: torch.Tensor,
    yv: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The row norms of both sides' views, each computed once per capture."""
    ids = (key, name, xv.dtype, "row_norms")
    return (
        _memo(before, ids, torch.linalg.vector_norm, xv, 2, 1),
        _memo(after, ids, torch.linalg.vector_norm, yv, 2, 1),
    )


def _row(kind: str, quantity: str, value: float, **extra: Any) -> dict[str, Any]:
    return {"quantity": quantity, "value": float(value), "kind": kind, **extra}


def _event(step: int, layer: str | None, quantity: str, message: str) -> dict[str, Any]:
    return {
        "step": step,
        "layer": layer,
        "view": None,
        "quantity": quantity,
        "value": math.nan,
        "kind": "event",
        "warning": message,
    }


def _estimate_rows(
    g: dict[str, Any], method: str, value: Any, seconds: float, config: MeasureConfig
) -> None:
    if method == "per_coordinate":
        vec = torch.as_tensor(value)
        g["rows"].append(_row("estimate", "per_coordinate", float(vec.mean()), wall_time_s=seconds))
        g["rows"].append(_row("estimate", "per_coordinate_max", float(vec.max())))
        return
    g["rows"].append(
        _row(
            "estimate",
            method,
            value,
            wall_time_s=seconds,
            n_projections=config.n_projections,
        )
    )


def _bound_rows(
    key: str,
    name: str,
    g: dict[str, Any],
    before: StepCapture,
    after: StepCapture,
    config: MeasureConfig,
) -> list[dict[str, Any]]:
    start = time.perf_counter()
    a, b = before.norms.get(key), after.norms.get(key)
    norms, u3 = None, None
    if a is not None and b is not None:
        if a.form == b.form == "batchnorm" and name == "flatten":
            # from the stored values, in float64 row blocks: no float64 copy of x_hat
            u3 = _u3_stored_terms(
                a.x_hat,
                b.x_hat,
                (a.weight, b.weight),
                (a.bias, b.bias),
                precise=config.precision == "float64",
                memo=(before.cache, after.cache, (key, "x_hat_mean_sq")),
            )
        else:
            norms = norm_pair(a, b, name, g["opts"])
    have_max_sliced = "max_sliced" in g["batched"]
    moments = g.get("moments")
    values = _bounds(
        g["x"],
        g["y"],
        norms,
        0 if have_max_sliced else config.n_projections,
        config.seed,
        gap=None if moments is None else moments[0][0] - moments[1][0],
        row_norms=g["norms"],
        differences=g.get("differences"),
    )
    if u3 is not None:  # U3, U3_tight and their terms (ics_toolkit.bound_terms) from stored values
        values["U3"], values["U3_tight"] = sum(u3), _u3_tight(u3)
        values.update(zip(_vocab.BOUND_TERMS["U3"], u3, strict=True))
    elif norms is not None:  # the terms that U3 / U5 add up (ics_toolkit.bound_terms)
        values.update(bound_terms(*norms))
    seconds = time.perf_counter() - start + g["stats_s"]
    if have_max_sliced:  # L3 tries the max_sliced directions too: reuse, don't recompute
        max_sliced = next(r["value"] for r in g["rows"] if r["quantity"] == "max_sliced")
        values["L3"] = max(values["L3"], max_sliced)
    return [
        _row(
            _vocab.quantity_kind(q),
            q,
            v,
            wall_time_s=seconds / len(values),
            n_projections=config.n_projections if q == "L3" else None,
        )
        for q, v in values.items()
    ]


def _largest_abs(t: torch.Tensor) -> float:
    return max(float(v.abs()) for v in torch.aminmax(t))


def _check_group(
    step: int,
    key: str,
    name: str,
    g: dict[str, Any],
    config: MeasureConfig,
    sides: tuple[StepCapture, StepCapture],
) -> None:
    values = {r["quantity"]: r["value"] for r in g["rows"] if r["kind"] != "floor"}
    pair = g.get("stored", (g["x"], g["y"]))
    ids = (key, "stored") if "stored" in g else g["side"]
    scale = max(
        _memo(side, (*ids, "largest_abs"), _largest_abs, t)
        for side, t in zip(sides, pair, strict=True)
    )
    if "stored" not in g and g.get("scale_e"):  # the rescaled samples: back to the rows' units
        scale = _scaling.unscale(scale, g["scale_e"], "largest |value|")
    resolution = g.get("resolution", 0.0)
    check = check_order(values, rtol=config.check_rtol, scale=scale, resolution=resolution)
    text = "; ".join(check.violations)
    flags = _below_resolution(g["rows"], resolution)
    for row, flag in zip(g["rows"], flags, strict=True):
        row["bounds_hold"] = check.holds
        row["violations"] = text or None
        row["below_resolution"] = flag
    if not check.holds:
        warnings.warn(
            f"step {step}, layer {key!r}, view {name!r}: a bound is violated: {text} "
            "(kept in the results; please report it with the rows)",
            ICSWarning,
            stacklevel=4,
        )


#: Kinds whose values are distances in the unit of the view (compared with the resolution).
_DISTANCE_KINDS = frozenset({"estimate", "lower", "upper", "floor", "interval"})


def _below_resolution(rows: Sequence[dict[str, Any]], resolution: float) -> list[bool | None]:
    """Per row: whether its value is within the storage resolution (None: not a distance).

    Distances (estimates, bounds, floors, interval limits) are compared with the
    resolution; a ``relative_<q>`` row takes the flag of ``q``, and the sketch's rescaled
    ``exact_jl`` that of the sketch's ``exact``. NaN values get None.
    """
    own: dict[str, bool | None] = {}
    for row in rows:
        value = row["value"]
        if row["kind"] in _DISTANCE_KINDS and math.isfinite(value):
            own[row["quantity"]] = bool(value <= resolution)
    if "exact" in own and _vocab.EXACT_JL in own:
        own[_vocab.EXACT_JL] = own["exact"]
    flags = []
    for row in rows:
        quantity = row["quantity"]
        if row["kind"] == "relative":
            quantity = quantity[len("relative_") :]
        flags.append(own.get(quantity) if row["kind"] in (*_DISTANCE_KINDS, "relative") else None)
    return flags
