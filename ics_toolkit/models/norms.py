"""The normalization-layer factory shared by the reference models, and seeded building."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ics_toolkit.errors import ICSTypeError, ICSValueError

__all__ = ["NORM_KINDS", "NormSpec", "count_norm_layers", "make_norm", "seeded"]

#: Names :func:`make_norm` accepts.
NORM_KINDS: tuple[str, ...] = ("batch", "unitization", "group", "layer", "none")

#: A norm name, or a callable ``(num_features, dims) -> nn.Module``.
NormSpec = str | Callable[[int, int], nn.Module]

_BATCH = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_norm(norm: object) -> NormSpec:
    """Validate a norm spec early, at model construction, naming the argument."""
    if isinstance(norm, str):
        if norm not in NORM_KINDS:
            raise ICSValueError(
                f"`norm` must be one of {NORM_KINDS} or a callable "
                f"(num_features, dims) -> Module, got {norm!r}"
            )
        return norm
    if callable(norm):
        return norm  # type: ignore[return-value]
    raise ICSTypeError(
        f"`norm` must be a name in {NORM_KINDS} or a callable (num_features, dims) -> "
        f"Module, got {type(norm).__name__}"
    )


def norm_absorbs_bias(norm: NormSpec) -> bool:
    """True if the norm subtracts a per-channel batch mean, making a preceding bias moot."""
    return norm in ("batch", "unitization")


def make_norm(norm: NormSpec, num_features: int, dims: int) -> nn.Module:
    """Build one normalization layer.

    Parameters
    ----------
    norm : {"batch", "unitization", "group", "layer", "none"} or callable
        ``"batch"``: ``BatchNorm{dims}d``; ``"unitization"``:
        :class:`~ics_toolkit.nn.Unitization` of the same rank (defaults: alpha 0,
        the authors' norm); ``"group"``: ``GroupNorm`` with the largest divisor of
        ``num_features`` that is at most 32 groups; ``"layer"``: ``LayerNorm`` for
        ``dims=1``, ``GroupNorm(1, C)`` for feature maps; ``"none"``: ``Identity``.
        A callable is called as ``norm(num_features, dims)`` and must return a Module.
    num_features : int
        ``C``, the number of channels or features.
    dims : {1, 2, 3}
        1 for (N, C) features (after a Linear layer), 2 for (N, C, H, W) and 3 for
        (N, C, D, H, W) feature maps: the ``d`` of ``BatchNorm{d}d``.

    Returns
    -------
    torch.nn.Module

    Examples
    --------
    >>> [type(make_norm(kind, 16, 2)).__name__ for kind in NORM_KINDS]
    ['BatchNorm2d', 'Unitization2d', 'GroupNorm', 'GroupNorm', 'Identity']
    >>> type(make_norm("layer", 16, 1)).__name__
    'LayerNorm'
    """
    norm = check_norm(norm)
    if dims not in (1, 2, 3):
        raise ICSValueError(f"`dims` must be 1, 2 or 3, got {dims!r}")
    if not callable(norm):
        if norm == "batch":
            return _BATCH[dims](num_features)
        if norm == "unitization":
            from ics_toolkit.nn.unitization import Unitization1d, Unitization2d, Unitization3d

            return {1: Unitization1d, 2: Unitization2d, 3: Unitization3d}[dims](num_features)
        if norm == "group":
            from ics_toolkit.nn.replace import default_num_groups

            return nn.GroupNorm(default_num_groups(num_features), num_features)
        if norm == "layer":
            return nn.LayerNorm(num_features) if dims == 1 else nn.GroupNorm(1, num_features)
        return nn.Identity()
    layer = norm(num_features, dims)
    if not isinstance(layer, nn.Module):
        raise ICSTypeError(
            f"the `norm` callable returned {type(layer).__name__} for "
            f"(num_features={num_features}, dims={dims}); it must return a torch.nn.Module"
        )
    return layer


def count_norm_layers(model: nn.Module) -> int:
    """Count BatchNorm, Unitization, GroupNorm and LayerNorm layers in ``model``.

    Examples
    --------
    >>> count_norm_layers(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)))
    1
    """
    from ics_toolkit.nn.unitization import Unitization

    kinds = (nn.modules.batchnorm._BatchNorm, Unitization, nn.GroupNorm, nn.LayerNorm)
    return sum(isinstance(m, kinds) for m in model.modules())


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the block with the CPU torch RNG seeded, restoring the caller's state after.

    Layers built inside draw their initial weights from ``seed``; the global RNG is
    the same after the block as before it. ``seed=None`` does nothing.

    Examples
    --------
    >>> with seeded(0):
    ...     a = torch.rand(2)
    >>> with seeded(0):
    ...     b = torch.rand(2)
    >>> bool((a == b).all())
    True
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(seed))  # CPU only: CUDA is not touched
        yield
