"""Normalization layers: :class:`Unitization` and :func:`replace_norm`.

``Unitization`` is the layer of Huang and Yu (CVPR 2020): BatchNorm whose output is
partly divided by each sample's norm, with a trainable per-channel share ``alpha``;
``alpha = 0`` is BatchNorm exactly. ``replace_norm`` swaps the BatchNorm layers of an
existing model for Unitization, GroupNorm, LayerNorm-style or Identity layers.
The functional form is ``ics_toolkit.nn.functional.unitization`` (as
``torch.nn.functional.batch_norm`` is to ``torch.nn.BatchNorm2d``).
"""

from __future__ import annotations

from ics_toolkit.nn import functional
from ics_toolkit.nn.functional import (
    DEFAULT_NORM,
    NORMS,
    Normalized,
    normalized,
    unitization_scale,
)
from ics_toolkit.nn.replace import KINDS, default_num_groups, replace_norm
from ics_toolkit.nn.unitization import Unitization, Unitization1d, Unitization2d, Unitization3d

__all__ = [
    "DEFAULT_NORM",
    "KINDS",
    "NORMS",
    "Normalized",
    "Unitization",
    "Unitization1d",
    "Unitization2d",
    "Unitization3d",
    "default_num_groups",
    "functional",
    "normalized",
    "replace_norm",
    "unitization_scale",
]
