"""The results table's vocabulary, spelled once: quantity names, kinds, defaults, presets.

Every module that names a W1 method, a bound, a row kind or a view imports it from
here (the public homes, ``ics_toolkit.distances.METHODS``,
``ics_toolkit.bounding.LOWER_BOUNDS`` ... re-export these objects), so that a new
quantity is added in one place. Nothing here imports torch.
"""

from __future__ import annotations

__all__ = [
    "BATCHED_METHODS",
    "DEFAULT_METHODS",
    "ESTIMATORS",
    "FLOORLESS",
    "KINDS",
    "LOWER_BOUNDS",
    "METHODS",
    "MODES",
    "NORM_BOUNDS",
    "PRESETS",
    "THEORY_LOWER",
    "THEORY_UPPER",
    "UPPER_BOUNDS",
    "VIEWS",
    "WHERE",
    "quantity_kind",
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
THEORY_UPPER: tuple[str, ...] = ("U1", "U2", "U3", "U4", "U5")

#: Quantities that must not exceed W1 (the methods sliced and max_sliced are lower
#: bounds too).
LOWER_BOUNDS: tuple[str, ...] = (*THEORY_LOWER, "sliced", "max_sliced")
#: Quantities that must not fall below W1 (``paired`` is U1 under its method name).
UPPER_BOUNDS: tuple[str, ...] = ("paired", *THEORY_UPPER)

#: The normalization layers' own upper bounds (U3 BatchNorm, U4 unitized, U5 the
#: authors' layer): unlike U1 / U2 they do not follow the measured displacement.
NORM_BOUNDS: tuple[str, ...] = ("U3", "U4", "U5")

#: Values of the results table's ``kind`` column.
KINDS: tuple[str, ...] = ("estimate", "lower", "upper", "floor", "drift", "gradient", "event")

#: How a layer output becomes samples (:mod:`ics_toolkit.views`).
VIEWS: tuple[str, ...] = ("flatten", "pixel", "channel", "token")

#: Which side of a layer the monitor measures.
WHERE: tuple[str, ...] = ("output", "input", "both")

#: Module mode of the probe passes.
MODES: tuple[str, ...] = ("train", "eval", "keep")

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
    """
    if quantity.startswith("floor_"):
        return "floor"
    if quantity.startswith("drift_"):
        return "drift"
    if quantity in THEORY_LOWER:
        return "lower"
    if quantity in THEORY_UPPER:
        return "upper"
    return "estimate"
