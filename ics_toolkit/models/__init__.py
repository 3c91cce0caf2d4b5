"""Reference models with a pluggable normalization layer.

- :class:`MLP` and :class:`SmallCNN` for fast experiments (8x8 digits, 32x32 CIFAR);
- :func:`cifar_resnet` (He et al. 2016, depth 6n+2) and :func:`resnet20`,
  :func:`resnet56`, :func:`resnet110`, post-activation or the pre-activation variant
  used by Huang and Yu;
- :func:`make_norm`, the factory every model uses for its normalization layers:
  ``"batch" | "unitization" | "group" | "layer" | "none"`` or a callable
  ``(num_features, dims) -> Module``.
"""

from __future__ import annotations

from ics_toolkit.models.cnn import SmallCNN
from ics_toolkit.models.mlp import MLP
from ics_toolkit.models.norms import NORM_KINDS, NormSpec, count_norm_layers, make_norm, seeded
from ics_toolkit.models.resnet import CifarResNet, cifar_resnet, resnet20, resnet56, resnet110

__all__ = [
    "MLP",
    "NORM_KINDS",
    "CifarResNet",
    "NormSpec",
    "SmallCNN",
    "cifar_resnet",
    "count_norm_layers",
    "make_norm",
    "resnet20",
    "resnet56",
    "resnet110",
    "seeded",
]
