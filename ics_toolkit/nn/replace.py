"""Swap a model's BatchNorm layers for another normalization, in place."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ics_toolkit.errors import ICSRuntimeWarning, ICSTypeError, ICSValueError
from ics_toolkit.nn.unitization import Unitization, Unitization1d, Unitization2d, Unitization3d

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["KINDS", "replace_norm"]

#: What :func:`replace_norm` can put in place of a BatchNorm layer.
KINDS: tuple[str, ...] = ("unitization", "group", "layer", "identity")

# options each kind accepts (everything else carries over from the BatchNorm layer)
_OPTIONS: dict[str, frozenset[str]] = {
    "unitization": frozenset({"alpha_init", "norm", "clamp_alpha", "learn_alpha"}),
    "group": frozenset({"num_groups"}),
    "layer": frozenset(),
    "identity": frozenset(),
}

Selection = str | Sequence[str] | Callable[[str, nn.Module], bool] | None


def default_num_groups(num_channels: int, max_groups: int = 32) -> int:
    """Return the largest divisor of ``num_channels`` that is at most ``max_groups``.

    32 groups is the GroupNorm paper's default (Wu and He, 2018); layers with fewer
    channels, or a channel count 32 does not divide, get the largest valid count.

    Examples
    --------
    >>> default_num_groups(64), default_num_groups(16), default_num_groups(48)
    (32, 16, 24)
    """
    for g in range(min(max_groups, num_channels), 0, -1):
        if num_channels % g == 0:
            return g
    return 1  # pragma: no cover - g = 1 always divides


def _factory(bn: nn.Module) -> dict[str, Any]:
    for t in (getattr(bn, "weight", None), getattr(bn, "running_mean", None)):
        if isinstance(t, torch.Tensor):
            return {"device": t.device, "dtype": t.dtype}
    return {}


def _share_affine(new: nn.Module, bn: _BatchNorm, carried: list[str]) -> None:
    if bn.affine and bn.weight is not None:
        new.weight = bn.weight  # the same Parameter objects: optimizers keep working
        new.bias = bn.bias
        carried += ["weight", "bias"]


def _to_unitization(bn: _BatchNorm, opts: dict[str, Any]) -> tuple[nn.Module, list[str]]:
    cls: type[Unitization] = Unitization
    if isinstance(bn, nn.BatchNorm1d):
        cls = Unitization1d
    elif isinstance(bn, nn.BatchNorm2d):
        cls = Unitization2d
    elif isinstance(bn, nn.BatchNorm3d):
        cls = Unitization3d
    new = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        **opts,
        **_factory(bn),
    )
    carried: list[str] = []
    _share_affine(new, bn, carried)
    if bn.track_running_stats and bn.running_mean is not None:
        new.running_mean = bn.running_mean
        new.running_var = bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        carried += ["running_mean", "running_var", "num_batches_tracked"]
    return new, carried


def _to_group(bn: _BatchNorm, name: str, num_groups: int | None) -> tuple[nn.Module, list[str]]:
    c = bn.num_features
    g = default_num_groups(c) if num_groups is None else num_groups
    if isinstance(g, bool) or not isinstance(g, int) or g < 1 or c % g:
        raise ICSValueError(
            f"`num_groups`={g!r} does not divide the {c} channels of layer {name!r}; "
            "pass a divisor, or num_groups=None for the largest divisor <= 32"
        )
    new = nn.GroupNorm(g, c, eps=bn.eps, affine=bn.affine, **_factory(bn))
    carried: list[str] = []
    _share_affine(new, bn, carried)
    return new, carried


def _to_layer(bn: _BatchNorm) -> tuple[nn.Module, list[str]]:
    c = bn.num_features
    new: nn.Module
    if isinstance(bn, nn.BatchNorm1d):
        new = nn.LayerNorm(c, eps=bn.eps, elementwise_affine=bn.affine, **_factory(bn))
    else:
        new = nn.GroupNorm(1, c, eps=bn.eps, affine=bn.affine, **_factory(bn))
    carried: list[str] = []
    _share_affine(new, bn, carried)
    return new, carried


def _select(model: nn.Module, layers: Selection) -> list[tuple[str, _BatchNorm]]:
    candidates = [
        (name, m) for name, m in model.named_modules() if name and isinstance(m, _BatchNorm)
    ]
    if isinstance(model, _BatchNorm):
        raise ICSValueError(
            "`model` is itself a BatchNorm layer and cannot be replaced in place; "
            "wrap it in a container (e.g. torch.nn.Sequential) first"
        )
    if not candidates:
        raise ICSValueError(f"`model` ({type(model).__name__}) has no BatchNorm layers to replace")
    names = [n for n, _ in candidates]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    if layers is None:
        return candidates
    if callable(layers):
        chosen = [(n, m) for n, m in candidates if layers(n, m)]
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        if not all(isinstance(p, str) for p in patterns):
            raise ICSTypeError(
                "`layers` must be None, a name glob, a list of name globs, or a "
                "callable (name, module) -> bool"
            )
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ICSValueError(
                    f"`layers` pattern {p!r} matches no BatchNorm layer; "
                    f"the BatchNorm layers are: {shown}"
                )
        chosen = [(n, m) for n, m in candidates if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not chosen:
        raise ICSValueError(
            f"`layers` selected no BatchNorm layer; the BatchNorm layers are: {shown}"
        )
    return chosen


def replace_norm(
    model: nn.Module,
    kind: str,
    *,
    layers: Selection = None,
    **options: Any,
) -> pd.DataFrame:
    """Replace BatchNorm layers of ``model`` in place; return what was replaced.

    Parameters
    ----------
    model : torch.nn.Module
        The model to modify (its BatchNorm1d/2d/3d and other ``_BatchNorm`` layers).
    kind : {"unitization", "group", "layer", "identity"}
        - ``"unitization"``: :class:`~ics_toolkit.nn.Unitization` of the same rank
          (1d/2d/3d), with the BatchNorm's ``eps``, ``momentum``, ``affine``,
          ``track_running_stats``, affine parameters and running statistics, so the
          swapped model at ``alpha_init = 0`` computes exactly what it did before.
          Options: ``alpha_init``, ``norm``, ``clamp_alpha``, ``learn_alpha``.
        - ``"group"``: ``GroupNorm(num_groups, C)``. Option ``num_groups``: an int
          that divides every selected layer's ``C``, or None (default) for the largest
          divisor of ``C`` that is at most 32.
        - ``"layer"``: ``LayerNorm(C)`` in place of ``BatchNorm1d`` (meant for (N, C)
          features; for (N, C, L) inputs use ``kind="group", num_groups=1``), and
          ``GroupNorm(1, C)`` (LayerNorm over channel and spatial axes with a
          per-channel affine map) in place of BatchNorm2d/3d.
        - ``"identity"``: ``torch.nn.Identity()``.

        ``group`` and ``layer`` keep ``eps`` and the affine parameters; running
        statistics have no counterpart there.
    layers : str, sequence of str, callable or None
        Which BatchNorm layers, by dotted name (``model.named_modules()``): None for
        all, a glob (``"layer1.*"``), a list of globs (each must match a layer), or a
        predicate ``(name, module) -> bool``.
    **options
        Options of ``kind`` (see above).

    Returns
    -------
    pandas.DataFrame
        One row per replaced module: ``name`` (dotted path; a module registered
        under several names is replaced everywhere and listed under its first name),
        ``old`` and ``new`` (class names), ``num_features``, and ``carried`` (the
        parameters and buffers the new layer took over, comma-separated).

    Raises
    ------
    ICSValueError
        Unknown ``kind`` or option, a selection that matches nothing, a
        ``num_groups`` that does not divide a layer's channels, an uninitialized lazy
        BatchNorm.
    ICSTypeError
        ``model`` is not a Module, or ``layers`` is not a glob, globs or a predicate.

    Notes
    -----
    The new layers hold the *same* Parameter and buffer objects as the old ones and
    keep the old layer's train/eval flag, device and dtype. An optimizer built before
    the swap keeps updating ``gamma`` and ``beta`` but does not know the new ``alpha``:
    build the optimizer after swapping. Hooks registered on an old layer do not carry
    over (a warning says so).

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> report = replace_norm(model, "unitization")
    >>> report[["name", "old", "new"]].values.tolist()
    [['1', 'BatchNorm1d', 'Unitization1d']]
    """
    import pandas as pd

    if not isinstance(model, nn.Module):
        raise ICSTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in KINDS:
        raise ICSValueError(f"`kind` must be one of {KINDS}, got {kind!r}")
    unknown = sorted(set(options) - _OPTIONS[kind])
    if unknown:
        allowed = ", ".join(sorted(_OPTIONS[kind])) or "none"
        raise ICSValueError(f"unknown option(s) {unknown} for kind={kind!r}; it accepts: {allowed}")
    chosen = _select(model, layers)
    for name, bn in chosen:
        if isinstance(bn, nn.modules.lazy.LazyModuleMixin) and bn.has_uninitialized_params():
            raise ICSValueError(
                f"layer {name!r} is a lazy BatchNorm that has not seen an input yet; "
                "run one forward pass before replace_norm"
            )

    rows: list[dict[str, Any]] = []
    new_of: dict[int, nn.Module] = {}
    for name, bn in chosen:
        if kind == "unitization":
            new, carried = _to_unitization(bn, options)
        elif kind == "group":
            new, carried = _to_group(bn, name, options.get("num_groups"))
        elif kind == "layer":
            new, carried = _to_layer(bn)
        else:
            new, carried = nn.Identity(), []
        new.train(bn.training)
        new_of[id(bn)] = new
        if bn._forward_hooks or bn._forward_pre_hooks or bn._backward_hooks:
            warnings.warn(
                f"layer {name!r} has hooks registered on it; they do not carry over to "
                f"the new {type(new).__name__} (attach monitors after replace_norm)",
                ICSRuntimeWarning,
                stacklevel=2,
            )
        rows.append(
            {
                "name": name,
                "old": type(bn).__name__,
                "new": type(new).__name__,
                "num_features": int(bn.num_features),
                "carried": ", ".join(carried),
            }
        )
    # every registration of a chosen module, including shared ones, gets the new one
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in new_of:
                setattr(parent, child_name, new_of[id(child)])
    return pd.DataFrame(rows, columns=["name", "old", "new", "num_features", "carried"])
