"""CIFAR ResNets (He et al. 2016), depth 6n + 2, with a pluggable normalization layer.

Two block layouts:

- post-activation (He et al., "Deep Residual Learning", 2016): ``conv-norm-ReLU-
  conv-norm``, add the shortcut, ReLU. Where the width doubles, the shortcut is the
  parameter-free option A of that paper (stride-2 subsampling, zero-padded channels).
- pre-activation (He et al., "Identity Mappings", 2016), the layout of Huang and Yu's
  reference networks: ``norm-ReLU-conv-norm-ReLU-conv`` plus the shortcut; where the
  shape changes the shortcut is a 1x1 convolution of the pre-activated input, and a
  final ``norm-ReLU`` precedes pooling.

Both have three stages of ``width``, ``2 width``, ``4 width`` channels (16/32/64 by
default) with ``n`` basic blocks each, so ``depth = 6n + 2`` and ``6n + 1`` norm
layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ics_toolkit.errors import ICSValueError
from ics_toolkit.models.norms import NormSpec, check_norm, make_norm, norm_absorbs_bias, seeded

__all__ = ["CifarResNet", "cifar_resnet", "resnet20", "resnet56", "resnet110"]


def _conv3x3(cin: int, cout: int, stride: int, bias: bool) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class _BasicBlock(nn.Module):
    """Post-activation basic block with an option-A shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormSpec, bias: bool) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride, bias)
        self.norm1 = make_norm(norm, cout, 2)
        self.conv2 = _conv3x3(cout, cout, 1, bias)
        self.norm2 = make_norm(norm, cout, 2)
        self.stride = stride
        self.pad = cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            shortcut = shortcut[:, :, :: self.stride, :: self.stride]
        if self.pad:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + shortcut)


class _PreActBlock(nn.Module):
    """Pre-activation basic block with a 1x1 projection where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, norm: NormSpec, bias: bool) -> None:
        super().__init__()
        self.norm1 = make_norm(norm, cin, 2)
        self.conv1 = _conv3x3(cin, cout, stride, bias)
        self.norm2 = make_norm(norm, cout, 2)
        self.conv2 = _conv3x3(cout, cout, 1, bias)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.norm1(x))
        shortcut = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    """A CIFAR ResNet of depth ``6n + 2``; build it with :func:`cifar_resnet`.

    Parameters
    ----------
    depth : int
        ``6n + 2`` (20, 32, 44, 56, 110, ...).
    num_classes : int
        Number of outputs.
    norm : str or callable
        See :func:`~ics_toolkit.models.make_norm` (``dims=2``).
    preact : bool
        Pre-activation layout (Huang and Yu's) instead of the original one.
    in_channels : int
        Input channels.
    width : int
        Channels of the first stage (16 in the papers).

    Shape
    -----
    - Input: (N, in_channels, H, W), any H, W >= 4 (32x32 in the papers)
    - Output: (N, num_classes)
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        norm: NormSpec = "batch",
        preact: bool = False,
        in_channels: int = 3,
        width: int = 16,
    ) -> None:
        super().__init__()
        norm = check_norm(norm)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ICSValueError(
                f"`depth` must be 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                f"got {depth!r}"
            )
        for name, v in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("width", width),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ICSValueError(f"`{name}` must be a positive int, got {v!r}")
        n = (depth - 2) // 6
        bias = not norm_absorbs_bias(norm)
        block = _PreActBlock if preact else _BasicBlock
        self.depth, self.preact, self.in_channels = depth, bool(preact), in_channels
        self.conv1 = _conv3x3(in_channels, width, 1, bias)
        self.norm1 = None if preact else make_norm(norm, width, 2)
        stages = []
        cin = width
        for i in range(3):
            cout = width * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block(cin, cout, stride, norm, bias))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.final_norm = make_norm(norm, cin, 2) if preact else None
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape (N, num_classes)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ICSValueError(
                f"CifarResNet expects input of shape (N, {self.in_channels}, H, W), got "
                f"{tuple(x.shape)}"
            )
        out = self.conv1(x)
        if self.norm1 is not None:
            out = F.relu(self.norm1(out))
        out = self.layer3(self.layer2(self.layer1(out)))
        if self.final_norm is not None:
            out = F.relu(self.final_norm(out))
        return self.fc(out.mean(dim=(2, 3)))


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    norm: NormSpec = "batch",
    preact: bool = False,
    *,
    in_channels: int = 3,
    width: int = 16,
    seed: int | None = None,
) -> CifarResNet:
    """Build a CIFAR ResNet of depth ``6n + 2`` (He et al. 2016).

    Parameters
    ----------
    depth : int
        ``6n + 2``: 20, 56 and 110 are the papers' networks (0.27M, 0.86M, 1.7M
        parameters with BatchNorm).
    num_classes : int
        10 for CIFAR-10, 100 for CIFAR-100.
    norm : str or callable
        See :func:`~ics_toolkit.models.make_norm`.
    preact : bool
        Use the pre-activation layout of Huang and Yu's reference networks.
    in_channels, width : int
        Input channels; channels of the first stage.
    seed : int or None
        Seed of the initial weights (the global RNG is left as it was).

    Returns
    -------
    CifarResNet

    Examples
    --------
    >>> model = cifar_resnet(8, num_classes=10, seed=0)
    >>> model(torch.randn(2, 3, 8, 8)).shape
    torch.Size([2, 10])
    """
    with seeded(seed):
        return CifarResNet(depth, num_classes, norm, preact, in_channels, width)


def resnet20(**kwargs: object) -> CifarResNet:
    """ResNet-20 (n = 3); keyword arguments as :func:`cifar_resnet`."""
    return cifar_resnet(20, **kwargs)  # type: ignore[arg-type]


def resnet56(**kwargs: object) -> CifarResNet:
    """ResNet-56 (n = 9); keyword arguments as :func:`cifar_resnet`."""
    return cifar_resnet(56, **kwargs)  # type: ignore[arg-type]


def resnet110(**kwargs: object) -> CifarResNet:
    """ResNet-110 (n = 18); keyword arguments as :func:`cifar_resnet`."""
    return cifar_resnet(110, **kwargs)  # type: ignore[arg-type]
