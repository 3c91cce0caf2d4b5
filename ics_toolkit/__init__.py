"""ics_toolkit: measure and bound internal covariate shift in PyTorch models.

Internal covariate shift (ICS) of a layer at step t is the Wasserstein-1 (Earth
Mover) distance between the distributions of the layer's outputs on a fixed probe
set before and after the optimizer step t -> t+1 (Huang and Yu, CVPR 2020).

Importing the package is cheap and side-effect free: it does not initialise CUDA,
import POT or select a matplotlib backend. The public names below are loaded on
first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ics_toolkit.errors import (
    ICSError,
    ICSMemoryError,
    ICSRuntimeWarning,
    ICSTypeError,
    ICSUsageError,
    ICSValueError,
    ICSWarning,
    SolverError,
)

__version__ = "0.1.0"

__all__ = [
    "ICSError",
    "ICSMemoryError",
    "ICSMonitor",
    "ICSRuntimeWarning",
    "ICSTypeError",
    "ICSUsageError",
    "ICSValueError",
    "ICSWarning",
    "Recorder",
    "SolverError",
    "__version__",
    "bounds",
    "capture",
    "dry_run",
    "gradient_ics",
    "load_results",
    "replace_norm",
    "sampling_floor",
    "to_wide",
    "wasserstein",
    "wasserstein_many",
]

# public name -> module that defines it; imported on first attribute access
_LAZY: dict[str, str] = {
    # the Earth Mover engine
    "wasserstein": "ics_toolkit.distances",
    "wasserstein_many": "ics_toolkit.distances",
    "sampling_floor": "ics_toolkit.distances",
    # capturing layer outputs
    "capture": "ics_toolkit.recording",
    "dry_run": "ics_toolkit.recording",
    "Recorder": "ics_toolkit.recording",
    # bounds, the monitor and its results
    "bounds": "ics_toolkit.bounding",
    "ICSMonitor": "ics_toolkit.monitor",
    "load_results": "ics_toolkit.results",
    "to_wide": "ics_toolkit.results",
    "gradient_ics": "ics_toolkit.gradient_shift",
    # normalization layers
    "replace_norm": "ics_toolkit.nn",
}
# subpackages reachable as attributes after a bare ``import ics_toolkit``
_SUBMODULES = frozenset(
    {
        "nn",
        "models",
        "data",
        "views",
        "plots",
        "report",
        "experiments",
        "schedules",
        "train",
        "sketch",
        "distributed",
    }
)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"ics_toolkit.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ics_toolkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


if TYPE_CHECKING:  # static type checkers see the real names
    from ics_toolkit.bounding import bounds
    from ics_toolkit.distances import sampling_floor, wasserstein, wasserstein_many
    from ics_toolkit.gradient_shift import gradient_ics
    from ics_toolkit.monitor import ICSMonitor
    from ics_toolkit.nn import replace_norm
    from ics_toolkit.recording import Recorder, capture, dry_run
    from ics_toolkit.results import load_results, to_wide
