"""A fully connected network with a pluggable normalization layer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ics_toolkit.errors import ICSValueError
from ics_toolkit.models.norms import NormSpec, check_norm, make_norm, norm_absorbs_bias, seeded

__all__ = ["MLP"]


class MLP(nn.Module):
    """Flatten, then ``[Linear -> norm -> ReLU] * len(hidden)``, then a Linear classifier.

    Parameters
    ----------
    in_features : int
        Number of input features after flattening (64 for 8x8 digits).
    num_classes : int
        Number of outputs (logits).
    hidden : sequence of int
        Width of each hidden layer; one norm layer follows each.
    norm : str or callable
        See :func:`~ics_toolkit.models.make_norm` (built with ``dims=1``). With
        ``"batch"`` or ``"unitization"`` the hidden Linear layers have no bias (the
        norm removes it).
    seed : int or None
        Seed of the initial weights (the global RNG is left as it was); None draws
        them from the global RNG like any torch layer.

    Shape
    -----
    - Input: (N, *) with ``in_features`` elements per sample
    - Output: (N, num_classes)

    Examples
    --------
    >>> model = MLP(64, 10, hidden=(32, 32), seed=0)
    >>> model(torch.randn(4, 1, 8, 8)).shape
    torch.Size([4, 10])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (128, 128, 128),
        norm: NormSpec = "batch",
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        norm = check_norm(norm)
        for name, v in (("in_features", in_features), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ICSValueError(f"`{name}` must be a positive int, got {v!r}")
        hidden = tuple(hidden)
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ICSValueError(f"`hidden` must be positive ints, got {hidden!r}")
        bias = not norm_absorbs_bias(norm)
        with seeded(seed):
            layers: list[nn.Module] = [nn.Flatten()]
            prev = in_features
            for h in hidden:
                layers += [nn.Linear(prev, h, bias=bias), make_norm(norm, h, 1), nn.ReLU()]
                prev = h
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Linear(prev, num_classes)
        self.in_features = in_features
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, num_classes)."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ICSValueError(
                f"MLP expects {self.in_features} features per sample, got input of shape "
                f"{tuple(x.shape)} ({flat.shape[1]} features)"
            )
        return self.classifier(self.features(flat))
