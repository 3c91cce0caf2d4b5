"""A small convolutional network with a pluggable normalization layer."""

from __future__ import annotations

import torch
from torch import nn

from ics_toolkit.errors import ICSValueError
from ics_toolkit.models.norms import NormSpec, check_norm, make_norm, norm_absorbs_bias, seeded

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Three VGG-style stages of two 3x3 convolutions, each followed by a norm and ReLU.

    Stage ``i`` has ``width * 2**i`` channels; 2x2 max pooling sits between stages,
    then global average pooling and a Linear classifier. Six norm layers in all. It
    runs on 8x8 digits (8 -> 4 -> 2 pixels) as well as on 32x32 CIFAR images.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for digits, 3 for CIFAR).
    num_classes : int
        Number of outputs (logits).
    width : int
        Channels of the first stage.
    norm : str or callable
        See :func:`~ics_toolkit.models.make_norm` (built with ``dims=2``). With
        ``"batch"`` or ``"unitization"`` the convolutions have no bias.
    seed : int or None
        Seed of the initial weights (the global RNG is left as it was).

    Shape
    -----
    - Input: (N, in_channels, H, W) with H, W >= 4
    - Output: (N, num_classes)

    Examples
    --------
    >>> model = SmallCNN(1, 10, width=8, seed=0)
    >>> model(torch.randn(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 32,
        norm: NormSpec = "batch",
        *,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        norm = check_norm(norm)
        for name, v in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ICSValueError(f"`{name}` must be a positive int, got {v!r}")
        bias = not norm_absorbs_bias(norm)
        with seeded(seed):
            layers: list[nn.Module] = []
            prev = in_channels
            for stage in range(3):
                ch = width * 2**stage
                if stage:
                    layers.append(nn.MaxPool2d(2))
                for _ in range(2):
                    layers += [
                        nn.Conv2d(prev, ch, 3, padding=1, bias=bias),
                        make_norm(norm, ch, 2),
                        nn.ReLU(),
                    ]
                    prev = ch
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(prev, num_classes)
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, num_classes)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ICSValueError(
                f"SmallCNN expects input of shape (N, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}"
            )
        return self.classifier(self.pool(self.features(x)).flatten(1))
