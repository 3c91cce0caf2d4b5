"""The results table's vocabulary, spelled once: quantity names, kinds, defaults, presets.

Every module that names a W1 method, a bound, a row kind or a view imports it from
here (the public homes, ``ics_toolkit.distances.METHODS``,
``ics_toolkit.bounding.LOWER_BOUNDS`` ... re-export these objects), so that a new
quantity is added in one place. Nothing here imports torch.
"""

from __future__ import annotations

__all__ = [
    "BATCHED_METHODS",
    "BOUND_TERMS",
    "CI_METHODS",
    "DEFAULT_METHODS",
    "ESTIMATORS",
    "FLOAT32_ERROR",
    "FLOAT32_ERROR_U3",
    "FLOAT32_RTOL",
    "FLOORLESS",
    "IDENTITY_SHARE",
    "KINDS",
    "LOWER_BOUNDS",
    "METHODS",
    "MODES",
    "NORM_BOUNDS",
    "PRECISIONS",
    "PRESETS",
    "RESOLUTION",
    "SCALE",
    "THEORY_LOWER",
    "THEORY_UPPER",
    "UPPER_BOUNDS",
    "VIEWS",
    "WHERE",
    "ci_names",
    "per_lr_name",
    "quantity_kind",
    "relative_name",
]

#: The W1 estimators, i.e. the valid ``method`` names of :func:`ics_toolkit.wasserstein`.
METHODS: tuple[str, ...] = ("exact", "paired", "sliced", "max_sliced", "sinkhorn", "per_coordinate")

#: Methods of the monitor, the experiments and the CLI when none are named.
DEFAULT_METHODS: tuple[str, ...] = ("exact", "max_sliced", "sliced")

#: Methods computed fused over many (layer, view) pairs by one batched kernel.
BATCHED_METHODS: frozenset[str] = frozenset({"sliced", "max_sliced", "per_coordinate"})

#: Methods without a sampling floor (``paired`` needs paired rows, halves have none).
FLOORLESS: frozenset[str] = frozenset({"paired"})

#: ICS estimators, in the order reports show them.
ESTIMATORS: tuple[str, ...] = (
    "exact",
    "paired",
    "sinkhorn",
    "max_sliced",
    "sliced",
    "per_coordinate",
)

#: The theory's lower bounds (``docs/theory.md``).
THEORY_LOWER: tuple[str, ...] = ("L1", "L2", "L3")
#: The theory's upper bounds.
THEORY_UPPER: tuple[str, ...] = ("U1", "U2", "U3", "U3_tight", "U4", "U5")

#: Quantities that must not exceed W1 (the methods sliced and max_sliced are lower
#: bounds too, and sinkhorn returns the lower end of its certified interval).
LOWER_BOUNDS: tuple[str, ...] = (*THEORY_LOWER, "sliced", "max_sliced", "sinkhorn")
#: Quantities that must not fall below W1 (``paired`` is U1 under its method name).
UPPER_BOUNDS: tuple[str, ...] = ("paired", *THEORY_UPPER)

#: The normalization layers' own upper bounds (U3 BatchNorm in the paper's form,
#: U3_tight the same with the measured second moments, U4 unitized, U5 the authors'
#: layer): unlike U1 / U2 they are computed from the normalized values and the layer's
#: parameters, not from the measured outputs. U5 at alpha = 0 is U3_tight's form:
#: compare BatchNorm's U3_tight with U5 (tight with tight), not U3.
NORM_BOUNDS: tuple[str, ...] = ("U3", "U3_tight", "U4", "U5")

#: The RMS norm sqrt(mean_i ||X_i||^2) of a layer's outputs at step t (kind ``stat``):
#: the unit of the scale-free ``relative_<estimate>`` rows.
SCALE = "scale"
#: On a sketched layer (view ``sketch``): the exact W1 of the k-dimensional sketch times
#: sqrt(d'/k), the estimate of the layer's exact W1 (kind ``estimate``).
EXACT_JL = "exact_jl"
#: Mass the optimal plan of the ``exact`` W1 keeps on the pairs (i, i) (kind ``stat``).
IDENTITY_SHARE = "identity_share"
#: Storage resolution of a (step, layer, view) (kind ``stat``): a bound on how far the
#: rounding of the captured outputs (to the dtype the layer produced, the capture dtype
#: and the analysis dtype) can move its W1; values at or below it are flagged
#: ``below_resolution`` (:mod:`ics_toolkit._resolution`, docs/theory.md section 5.1).
RESOLUTION = "resolution"

#: Estimators the monitor gives a confidence interval (``<method>_ci_low`` /
#: ``<method>_ci_high`` rows, kind ``interval``; :mod:`ics_toolkit.uncertainty`).
CI_METHODS: tuple[str, ...] = ("exact", "paired")

#: The terms of the normalization bounds (kind ``term``; :mod:`ics_toolkit.bound_terms`):
#: each bound is the sum of its terms. U3_tight shares U3's terms but the eps part
#: (U3 = U3_tight + U3_eps).
BOUND_TERMS: dict[str, tuple[str, ...]] = {
    "U3": ("U3_core", "U3_eps", "U3_gamma", "U3_beta"),
    "U3_tight": ("U3_core", "U3_gamma", "U3_beta"),
    "U5": ("U5_unit", "U5_bn", "U5_alpha", "U5_gamma", "U5_beta"),
}

#: Values of the results table's ``kind`` column: ``stat`` (scale, identity share, resolution),
#: ``relative`` (an estimate divided by the scale), ``interval`` (confidence limits),
#: ``term`` (one term of a bound), ``rate`` (an estimate per unit of learning rate).
KINDS: tuple[str, ...] = (
    "estimate",
    "lower",
    "upper",
    "floor",
    "drift",
    "gradient",
    "event",
    "stat",
    "relative",
    "interval",
    "term",
    "rate",
)

_TERMS = frozenset(t for terms in BOUND_TERMS.values() for t in terms)


def relative_name(quantity: str) -> str:
    """Name of the scale-free row of an estimate: ``relative_<quantity>``."""
    return f"relative_{quantity}"


def ci_names(quantity: str) -> tuple[str, str]:
    """Names of the confidence limits of an estimate: ``<quantity>_ci_low`` / ``_ci_high``."""
    return f"{quantity}_ci_low", f"{quantity}_ci_high"


def per_lr_name(quantity: str) -> str:
    """Name of an estimate per unit of learning rate: ``<quantity>_per_lr``."""
    return f"{quantity}_per_lr"


#: How a layer output becomes samples (:mod:`ics_toolkit.views`).
VIEWS: tuple[str, ...] = ("flatten", "pixel", "channel", "token")

#: Which side of a layer the monitor measures.
WHERE: tuple[str, ...] = ("output", "input", "both")

#: Module mode of the probe passes.
MODES: tuple[str, ...] = ("train", "eval", "keep")

#: Floating-point precision of a measured step's analysis (``ICSMonitor(precision=...)``):
#: float64 is the reference; float32 is the monitor's fast default, within
#: :data:`FLOAT32_ERROR` of it (docs/theory.md section 5, docs/guide.md section 6).
PRECISIONS: tuple[str, ...] = ("float32", "float64")

#: Documented largest relative difference between a float32 and a float64 analysis of
#: the same training run for the estimates, floors, intervals, scale, bounds (but U3)
#: and drifts (tested in tests/test_precision.py; measured: at most 9.3e-6, max_sliced, by
#: ``python benchmarks/precision.py``). Two quantities
#: are differences of nearly equal numbers, so their error is stated against the
#: layer's ``scale`` instead: L2 and drift_norm_var, within FLOAT32_ERROR * scale.
#: L1 and L2 are computed from the paired differences x_i - y_i (not from float32 means
#: of each side, off by ~u ||x||), so at tiny steps (W1 near float32's roundoff of the
#: outputs) they stay within FLOAT32_ERROR of the W1 they are checked against.
FLOAT32_ERROR = 1e-4

#: The same for U3, and for its ``U3_eps`` term relative to U3: the paper's core
#: sqrt(2 (d' - c)) amplifies the float32 rounding of the stored normalized values by
#: ~d / core^2, in either precision (measured: 5.8e-4 on the CNN of
#: ``python benchmarks/precision.py``); all of it is in the eps part
#: 2 d' - m2(x_hat) - m2(y_hat). U3_tight and its ``U3_core`` (the RMS gap of the
#: normalized values, as U2) are within :data:`FLOAT32_ERROR`.
FLOAT32_ERROR_U3 = 1e-3

#: Relative tolerance of the bound checks of a float32 analysis: values computed from
#: float32 sums differ from their exact values by ~1e-7 relative, more than the float64
#: tolerance :data:`ics_toolkit.bounding.RTOL` (1e-6) leaves in tight cases.
FLOAT32_RTOL = 1e-5

#: Named monitor configurations, cheapest last: keyword arguments of
#: :class:`ics_toolkit.ICSMonitor`. ``"defaults"`` is what the constructor does
#: without arguments; ``"lean"`` keeps the exact W1 only.
PRESETS: dict[str, dict[str, object]] = {
    "defaults": {"methods": DEFAULT_METHODS, "bounds": True, "floor": True, "moments": True},
    "lean": {"methods": ("exact",), "bounds": False, "floor": False, "moments": False},
}


def quantity_kind(quantity: str) -> str:
    """The ``kind`` of a measured quantity's rows.

    Examples
    --------
    >>> [quantity_kind(q) for q in ("exact", "L2", "U3", "floor_exact", "drift_var")]
    ['estimate', 'lower', 'upper', 'floor', 'drift']
    >>> [quantity_kind(q) for q in ("scale", "relative_exact", "exact_ci_low", "U3_core")]
    ['stat', 'relative', 'interval', 'term']
    """
    if quantity in (SCALE, IDENTITY_SHARE, RESOLUTION):
        return "stat"
    if quantity.startswith("relative_"):
        return "relative"
    if quantity.endswith(("_ci_low", "_ci_high")):
        return "interval"
    if quantity.endswith("_per_lr"):
        return "rate"
    if quantity in _TERMS:
        return "term"
    if quantity.startswith("floor_"):
        return "floor"
    if quantity.startswith("drift_"):
        return "drift"
    if quantity in THEORY_LOWER:
        return "lower"
    if quantity in THEORY_UPPER:
        return "upper"
    return "estimate"
