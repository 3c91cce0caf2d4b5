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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ics_toolkit._arrays import checked_finite
from ics_toolkit.bounding import RTOL, NormState, bounds, check_order
from ics_toolkit.distances import sampling_floor, wasserstein, wasserstein_many
from ics_toolkit.errors import ICSError, ICSWarning
from ics_toolkit.moments import moment_drift
from ics_toolkit.recording import CaptureInfo
from ics_toolkit.sketch import jl_scale, no_autocast
from ics_toolkit.views import view

__all__ = ["MeasureConfig", "NormSnapshot", "StepCapture", "measure_step", "norm_snapshot"]

#: Methods computed fused over all layers by ``wasserstein_many``.
_BATCHED = ("sliced", "max_sliced", "per_coordinate")


@dataclass(frozen=True)
class MeasureConfig:
    """What to compute at a measured step (see :class:`ics_toolkit.ICSMonitor`)."""

    methods: tuple[str, ...] = ("exact", "max_sliced", "sliced")
    views: tuple[str, ...] = ("flatten",)
    floor: tuple[str, ...] = ("exact",)  # methods whose sampling floor is reported
    bounds: bool = True
    moments: bool = True
    n_projections: int = 128
    seed: int = 0
    max_pixel_samples: int = 1024
    rtol: float = RTOL
    method_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    token_mask: Any = None  # the probe's padding mask (N, T) for the ``token`` view, or None


@dataclass
class NormSnapshot:
    """A BatchNorm / Unitization layer's internals at one capture.

    ``x_hat`` has the layer's input shape (N, C, *spatial); the per-channel vectors
    have shape (C,) and are float64 copies taken at capture time.
    """

    x_hat: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    alpha: torch.Tensor | None
    k: float
    eps: float
    form: str


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


def _vector(p: torch.Tensor | None) -> torch.Tensor | None:
    return None if p is None else p.detach().to(torch.float64).clone()


def norm_snapshot(module: nn.Module, x: torch.Tensor, *, training: bool) -> NormSnapshot | None:
    """Recompute what a BatchNorm / Unitization layer normalized on its input ``x``.

    ``training`` is the mode the capture pass ran the layer in (batch statistics when
    True). Returns None for other layers. No side effects on ``module``.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    from ics_toolkit.nn import Unitization, normalized

    if not isinstance(module, _BatchNorm | Unitization):
        return None
    was = module.training
    try:
        module.training = training  # normalized() picks batch or running statistics by it
        # in the storage dtype: x_hat is stored in it anyway, and float64 here would
        # double the cost of a measured step's norm layers for digits nobody keeps; but
        # never below float32: batch statistics in bfloat16 / float16 are badly wrong
        low = x.dtype in (torch.float16, torch.bfloat16)
        with no_autocast(x.device):
            out = normalized(module, x, dtype=torch.float32 if low else None)
    finally:
        module.training = was
    if low:
        out = out._replace(x_hat=out.x_hat.to(x.dtype))
    unit = isinstance(module, Unitization)
    return NormSnapshot(
        x_hat=out.x_hat,
        weight=_vector(module.weight),
        bias=_vector(module.bias),
        alpha=_vector(out.alpha) if unit else None,
        k=float(out.k),
        eps=float(module.eps),
        form="embedded" if unit else "batchnorm",
    )


def _param_rows(p: torch.Tensor | None, shape: Sequence[int], name: str) -> Any:
    """A per-channel (C,) vector laid out like one row of the view of a (1, C, *spatial) tensor."""
    if p is None:
        return None
    full = p.reshape((1, -1) + (1,) * (len(shape) - 2)).expand((1, *shape[1:]))
    return view(full, name, (0, 1))[0] if name == "flatten" else p


def _norm_states(
    a: NormSnapshot, b: NormSnapshot, name: str, opts: dict
) -> tuple[NormState, NormState]:
    """NormStates for one view of a layer, rows aligned with the view of its output."""
    states = []
    shape = tuple(a.x_hat.shape)
    for snap in (a, b):
        x_hat = view(snap.x_hat.to(torch.float64), name, (0, 1), **opts)
        s = None
        if snap.form != "batchnorm" and name in ("pixel", "token"):
            # each pixel row belongs to an image, and the layer divided by the image's norm
            n = snap.x_hat.shape[0]
            norms = snap.x_hat.to(torch.float64).reshape(n, -1).norm(dim=1)
            s_img = torch.sqrt(norms**2 / snap.k**2 + snap.eps)
            s_full = s_img.reshape((n, 1) + (1,) * (len(shape) - 2)).expand((n, 1, *shape[2:]))
            s = view(s_full, name, (0, 1), **opts)[:, 0]
        states.append(
            NormState(
                x_hat=x_hat,
                weight=_param_rows(snap.weight, shape, name),
                bias=_param_rows(snap.bias, shape, name),
                alpha=_param_rows(snap.alpha, shape, name),
                k=snap.k,
                eps=snap.eps,
                form=snap.form,  # type: ignore[arg-type]
                s=s,
            )
        )
    return states[0], states[1]


def _kind(quantity: str) -> str:
    if quantity.startswith("floor_"):
        return "floor"
    if quantity.startswith("drift_"):
        return "drift"
    if quantity in ("L1", "L2", "L3"):
        return "lower"
    if quantity in ("U1", "U2", "U3", "U4", "U5"):
        return "upper"
    return "estimate"


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
    Everything runs on the captures' device, in float64, with autocast disabled (a
    capture taken under ``torch.autocast`` is analysed at full precision); only the
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
    for key in keys:
        x, y = before.tensors[key], after.tensors[key]
        info = before.info[key]
        if not (_all_finite(x) and _all_finite(y)):
            side = "before" if not _all_finite(x) else "after"
            msg = (
                f"step {step}: layer {key!r} produced NaN or Inf on the probe ({side} the "
                "update); it is not measured at this step, the other layers are"
            )
            warnings.warn(msg, ICSWarning, stacklevel=3)
            rows.append(_event(step, key, "nonfinite", msg))
            continue
        for name in config.views:
            opts = (
                {"max_samples": config.max_pixel_samples, "seed": config.seed}
                if name in ("pixel", "token")
                else {}
            )
            if name == "token":
                opts["mask"] = config.token_mask
            # float64 once here, not in every estimator below
            xv = view(x, name, info, **opts).to(torch.float64)
            yv = view(y, name, info, **opts).to(torch.float64)
            groups[(key, name)] = {"x": xv, "y": yv, "opts": opts, "rows": []}
    with checked_finite():  # every tensor was scanned for NaN / Inf above
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
    for (_, name), g in groups.items():
        methods = ("per_coordinate",) if name == "channel" else config.methods
        g["methods"] = [m for m in methods if m not in _BATCHED]
        g["batched"] = [m for m in methods if m in _BATCHED]

    # the fused path: one call per kernel over every (layer, view); sliced and max_sliced
    # are the mean and the max of the same per-direction distances, so they share a call
    for kernel in ("sliced", "per_coordinate"):
        wanted = ("sliced", "max_sliced") if kernel == "sliced" else (kernel,)
        pairs = {
            gk: (g["x"], g["y"])
            for gk, g in groups.items()
            if any(m in g["batched"] for m in wanted)
        }
        if not pairs:
            continue
        start = time.perf_counter()
        values, logs = wasserstein_many(
            pairs,
            kernel,
            n_projections=config.n_projections,
            seed=config.seed,
            log=True,
            **config.method_options.get(kernel, {}),
        )
        seconds = (time.perf_counter() - start) / len(pairs)
        for gk, value in values.items():
            g = groups[gk]
            if kernel == "per_coordinate":
                _estimate_rows(g, kernel, value, seconds, config)
                continue
            per_direction = logs[gk]["per_direction"]
            methods = [m for m in wanted if m in g["batched"]]
            for method in methods:  # one computation: its time is shared between the rows
                v = value if method == "sliced" else float(per_direction.max())
                _estimate_rows(g, method, v, seconds / len(methods), config)

    for g in groups.values():
        for method in g["methods"]:
            opts = dict(config.method_options.get(method, {}))
            if method in ("exact", "sinkhorn"):
                opts.setdefault("on_failure", "flag")
            if method in ("sliced", "max_sliced"):
                opts.update(n_projections=config.n_projections, seed=config.seed)
            start = time.perf_counter()
            try:
                value, log = wasserstein(g["x"], g["y"], method, log=True, **opts)
            except ICSError as err:  # e.g. a problem too large for the exact solver
                g["rows"].append(_row("estimate", method, math.nan, warning=str(err)))
                continue
            row = _row("estimate", method, value, wall_time_s=time.perf_counter() - start)
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
                g["rows"].append(_row("estimate", "exact_jl", value, wall_time_s=0.0))
        if config.floor:
            floored = [m for m in (*g["batched"], *g["methods"]) if m in config.floor]
            if name == "channel":
                floored = ["per_coordinate"]
            for method in floored:
                opts = dict(config.method_options.get(method, {}))
                if method in ("sliced", "max_sliced"):
                    opts.update(n_projections=config.n_projections)
                start = time.perf_counter()
                try:
                    value = sampling_floor(x, method, seed=config.seed, **opts)
                except ICSError as err:
                    g["rows"].append(_row("floor", f"floor_{method}", math.nan, warning=str(err)))
                    continue
                if method == "per_coordinate":
                    value = float(torch.as_tensor(value).mean())
                seconds = time.perf_counter() - start
                g["rows"].append(_row("floor", f"floor_{method}", value, wall_time_s=seconds))
        if config.bounds and name != "channel":
            g["rows"].extend(_bound_rows(key, name, g, before, after, config))
        if config.moments and name != "channel" and width is None:
            start = time.perf_counter()
            drift = moment_drift(x, y)
            seconds = time.perf_counter() - start
            for q, v in drift.items():
                g["rows"].append(_row("drift", q, v, wall_time_s=seconds / len(drift)))
        _check_group(step, key, name, g, config)


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN / Inf in ``t``, in one pass without a mask the size of ``t``.

    A float64 sum of lower-precision values cannot overflow, so it is finite exactly
    when every value is.
    """
    if t.dtype == torch.float64:
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


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
    states: tuple[NormState, NormState] | tuple[None, None] = (None, None)
    a, b = before.norms.get(key), after.norms.get(key)
    if a is not None and b is not None:
        states = _norm_states(a, b, name, g["opts"])
    have_max_sliced = "max_sliced" in g["batched"]
    start = time.perf_counter()
    values = bounds(
        g["x"],
        g["y"],
        before=states[0],
        after=states[1],
        n_projections=0 if have_max_sliced else config.n_projections,
        seed=config.seed,
    )
    seconds = time.perf_counter() - start
    if have_max_sliced:  # L3 tries the max_sliced directions too: reuse, don't recompute
        max_sliced = next(r["value"] for r in g["rows"] if r["quantity"] == "max_sliced")
        values["L3"] = max(values["L3"], max_sliced)
    return [
        _row(
            _kind(q),
            q,
            v,
            wall_time_s=seconds / len(values),
            n_projections=config.n_projections if q == "L3" else None,
        )
        for q, v in values.items()
    ]


def _check_group(step: int, key: str, name: str, g: dict[str, Any], config: MeasureConfig) -> None:
    values = {r["quantity"]: r["value"] for r in g["rows"] if r["kind"] != "floor"}
    scale = max(float(v.abs()) for t in (g["x"], g["y"]) for v in torch.aminmax(t))
    check = check_order(values, rtol=config.rtol, scale=scale)
    text = "; ".join(check.violations)
    for row in g["rows"]:
        row["bounds_hold"] = check.holds
        row["violations"] = text or None
    if not check.holds:
        warnings.warn(
            f"step {step}, layer {key!r}, view {name!r}: a bound is violated: {text} "
            "(kept in the results; please report it with the rows)",
            ICSWarning,
            stacklevel=4,
        )
