"""Which modules of a model a capture pass observes, under which names and axes.

Names are the user's names: ``model.named_modules()`` spelling with the wrappers'
segments removed (the ``module`` of ``DataParallel`` / ``DistributedDataParallel``, the
``_orig_mod`` of ``torch.compile``'s ``OptimizedModule``); the wrappers themselves are
never selected. The root module is called ``"<root>"``.

Selectors (the ``layers`` argument):

- ``"norm"`` (default): every BatchNorm*, SyncBatchNorm, LayerNorm, GroupNorm,
  InstanceNorm*, LocalResponseNorm, RMSNorm and ics_toolkit's ``Unitization`` (matched
  by class name, so any subclass counts);
- ``"all"``: every leaf module (one without children);
- any other string: a name glob (``fnmatch``, case-sensitive: ``"layer1.*.bn?"``);
  an exact name is a glob that matches itself;
- a module type or a tuple of types (``isinstance``);
- a list (or tuple) mixing names, globs, the kinds ``"norm"`` / ``"all"``, module
  types and module objects: the union, in model order; each entry must match
  something, else the error names it (an entry ``"norm"`` or ``"all"`` is the kind
  unless a module is literally named so);
- a single module object;
- a predicate ``(name, module) -> bool``.

Pattern selectors (keywords, globs, types, predicates) skip the root unless it is a
leaf, and skip ``ModuleList`` / ``ModuleDict`` containers, which are never called;
name those explicitly to select them anyway.
"""

from __future__ import annotations

import difflib
import fnmatch
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ics_toolkit.errors import ICSTypeError, ICSValueError

ROOT = "<root>"
WHERE = ("output", "input", "both")

# containers that hold modules but are never called themselves
_NEVER_CALLED = (nn.ModuleList, nn.ModuleDict)
_GLOB_CHARS = frozenset("*?[")


def is_compiled(module: nn.Module) -> bool:
    """True for ``torch.compile``'s wrapper (checked by name: no ``torch._dynamo`` import)."""
    return type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")


def _wrapped(module: nn.Module) -> nn.Module | None:
    """The module a wrapper forwards to, or None for an ordinary module."""
    if is_compiled(module):
        return module._orig_mod
    if isinstance(module, nn.DataParallel | nn.parallel.DistributedDataParallel):
        return module.module
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """Peel ``torch.compile`` / ``DataParallel`` / ``DistributedDataParallel`` wrappers.

    The capture pass runs on the returned module, so hooks fire (an eager pass) and
    DDP's collectives (buffer broadcast) are not triggered by a measurement.
    """
    inner = _wrapped(model)
    while inner is not None:
        model = inner
        inner = _wrapped(model)
    return model


def contains_compiled(model: nn.Module) -> bool:
    """True when a compiled submodule sits anywhere in ``model``."""
    return any(is_compiled(m) for m in model.modules())


def walk(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules()`` with wrapper segments removed; shared modules once (first name)."""
    return [(name, m) for name, m, _ in _walk(model)]


def ancestry(model: nn.Module) -> dict[int, list[nn.Module]]:
    """``id(module)`` -> its ancestors, nearest first (wrappers skipped)."""
    return {id(m): ancestors for _, m, ancestors in _walk(model)}


def _walk(model: nn.Module) -> list[tuple[str, nn.Module, list[nn.Module]]]:
    out: list[tuple[str, nn.Module, list[nn.Module]]] = []
    seen: set[int] = set()

    def visit(prefix: str, module: nn.Module, path: list[nn.Module]) -> None:
        inner = _wrapped(module)
        if inner is not None:  # a wrapper: its content takes its name
            visit(prefix, inner, path)
            return
        if id(module) in seen:
            return
        seen.add(id(module))
        out.append((prefix or ROOT, module, path[::-1]))
        for child_name, child in module._modules.items():
            if child is not None:
                name = f"{prefix}.{child_name}" if prefix else child_name
                visit(name, child, [*path, module])

    visit("", model, [])
    return out


def norm_types() -> tuple[type, ...]:
    """The normalization layer types ``"norm"`` selects (besides Unitization by name)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    types: list[type] = [_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm]
    types.append(nn.LocalResponseNorm)
    rms = getattr(nn, "RMSNorm", None)  # torch >= 2.4
    if rms is not None:
        types.append(rms)
    # ics_toolkit.nn is only consulted if something imported it already (it is being
    # written in parallel and importing it here would cost every capture an import)
    toolkit_nn = sys.modules.get("ics_toolkit.nn")
    unit = getattr(toolkit_nn, "Unitization", None)
    if isinstance(unit, type):
        types.append(unit)
    return tuple(types)


def is_unitization(module: nn.Module) -> bool:
    """True for ics_toolkit's Unitization layer or any subclass (matched by class name)."""
    return any(cls.__name__.startswith("Unitization") for cls in type(module).__mro__)


def is_norm(module: nn.Module) -> bool:
    """True for the normalization layers the ``"norm"`` selector picks."""
    return isinstance(module, norm_types()) or is_unitization(module)


def _is_glob(text: str) -> bool:
    return any(ch in _GLOB_CHARS for ch in text)


def _close(word: str, names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    close = difflib.get_close_matches(word, names, n=n, cutoff=0.5)
    if not close:  # fall back to names sharing a dotted segment, then the first few
        parts = set(word.replace("*", ".").replace("?", ".").split("."))
        close = [nm for nm in names if parts & set(nm.split("."))][:n] or names[:n]
    return ", ".join(repr(c) for c in close)


def _pattern_candidates(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    root_is_leaf = len(modules) == 1
    return [
        (name, m)
        for name, m in modules
        if not isinstance(m, _NEVER_CALLED) and (name != ROOT or root_is_leaf)
    ]


def _type_names(modules: list[tuple[str, nn.Module]]) -> str:
    seen = dict.fromkeys(type(m).__name__ for _, m in modules)
    text = ", ".join(list(seen)[:12])
    if any(isinstance(m, torch.jit.ScriptModule) for _, m in modules):
        text += " (TorchScript modules cannot be hooked: capture the eager model instead)"
    return text


def select(model: nn.Module, layers: Any) -> list[tuple[str, nn.Module]]:
    """Resolve a ``layers`` selector into ``(name, module)`` pairs in model order.

    Raises
    ------
    ICSValueError
        When the selector matches nothing or a listed name/module is not in the model
        (the message lists the closest names).
    ICSTypeError
        When ``layers`` has an unusable type.
    """
    modules = walk(model)
    candidates = _pattern_candidates(modules)
    all_names = [name for name, _ in modules]

    if isinstance(layers, str) and layers in ("norm", "all"):
        if layers == "norm":
            chosen = [(n, m) for n, m in candidates if is_norm(m)]
            what = "no normalization layer (BatchNorm, LayerNorm, GroupNorm, ...)"
        else:
            chosen = [(n, m) for n, m in candidates if not m._modules]
            what = "no leaf module"
        if not chosen:
            raise ICSValueError(
                f"`layers={layers!r}` selects nothing: the model has {what}; its module types "
                f"are {_type_names(modules)}. Pick layers by name, glob, type or predicate"
            )
        return chosen
    if isinstance(layers, str):
        return _by_patterns(model, modules, [layers], argument=f"`layers={layers!r}`")
    if isinstance(layers, type):
        layers = (layers,)
    if isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers):
        bad = [t for t in layers if not issubclass(t, nn.Module)]
        if bad:
            raise ICSTypeError(f"`layers` types must be nn.Module subclasses, got {bad[0]!r}")
        chosen = [(n, m) for n, m in candidates if isinstance(m, layers)]
        if not chosen:
            wanted = ", ".join(t.__name__ for t in layers)
            raise ICSValueError(
                f"`layers` selects nothing: no module is a {wanted}; the model's module "
                f"types are {_type_names(modules)}"
            )
        return chosen
    if isinstance(layers, nn.Module):
        layers = [layers]
    if isinstance(layers, list | tuple):
        if not layers:
            raise ICSValueError("`layers` is an empty list; name at least one layer")
        return _by_patterns(model, modules, list(layers), argument="`layers`")
    if callable(layers):
        chosen = []
        for name, m in candidates:
            keep = layers(name, m)
            if not isinstance(keep, bool | int):
                raise ICSTypeError(
                    f"the `layers` predicate must return a bool, got {type(keep).__name__} "
                    f"for module {name!r}"
                )
            if keep:
                chosen.append((name, m))
        if not chosen:
            raise ICSValueError(
                f"the `layers` predicate returned False for all {len(candidates)} modules; "
                f"some names: {_close('', all_names)}"
            )
        return chosen
    raise ICSTypeError(
        f"`layers` must be 'norm', 'all', a name glob, a module type or tuple of types, a "
        f"list of names/modules, or a predicate (name, module) -> bool; got "
        f"{type(layers).__name__}"
    )


def _by_patterns(
    model: nn.Module, modules: list[tuple[str, nn.Module]], entries: list[Any], argument: str
) -> list[tuple[str, nn.Module]]:
    names = {name: m for name, m in modules}
    raw = dict(model.named_modules())  # also accept names with wrapper prefixes
    by_id = {id(m): name for name, m in modules}
    candidates = _pattern_candidates(modules)
    picked: dict[int, None] = {}
    for entry in entries:
        if isinstance(entry, nn.Module):
            if id(entry) not in by_id:
                raise ICSValueError(
                    f"{argument}: the {type(entry).__name__} module given is not a submodule "
                    "of the model; pass a module of this model or its name"
                )
            picked[id(entry)] = None
            continue
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            hits = [m for _, m in candidates if isinstance(m, entry)]
            if not hits:
                raise ICSValueError(
                    f"{argument}: the entry {entry.__name__} matches no module (no module is "
                    f"a {entry.__name__}); the model's module types are {_type_names(modules)}"
                )
            picked.update((id(m), None) for m in hits)
            continue
        if not isinstance(entry, str):
            raise ICSTypeError(
                f"{argument} entries must be module names, globs, 'norm', 'all', module types "
                f"or modules, got {type(entry).__name__}"
            )
        if entry in names or (entry == "" and ROOT in names):
            picked[id(names[entry or ROOT])] = None
        elif entry in raw and id(raw[entry]) in by_id:
            picked[id(raw[entry])] = None
        elif entry in ("norm", "all"):  # a kind, as in select(); no module is named so
            if entry == "norm":
                hits = [m for _, m in candidates if is_norm(m)]
            else:
                hits = [m for _, m in candidates if not m._modules]
            if not hits:
                what = "normalization layer" if entry == "norm" else "leaf module"
                raise ICSValueError(
                    f"{argument}: the entry {entry!r} matches no module: the model has no "
                    f"{what}; its module types are {_type_names(modules)}"
                )
            picked.update((id(m), None) for m in hits)
        elif _is_glob(entry):
            hits = [m for name, m in candidates if fnmatch.fnmatchcase(name, entry)]
            if not hits:
                raise ICSValueError(
                    f"{argument}: the glob {entry!r} matches no module; closest names: "
                    f"{_close(entry, names)}"
                )
            picked.update((id(m), None) for m in hits)
        else:
            raise ICSValueError(
                f"{argument}: the model has no module named {entry!r}; closest names: "
                f"{_close(entry, names)}"
            )
    return [(name, m) for name, m in modules if id(m) in picked]


def sites_for(where: Any, name: str, module: nn.Module) -> tuple[str, ...]:
    """The capture sites (``"output"`` and/or ``"input"``) of one module."""
    value = where(name, module) if callable(where) else where
    if value not in WHERE:
        origin = (
            f"the `where` callable returned {value!r} for {name!r}"
            if callable(where)
            else (f"`where` is {value!r}")
        )
        raise ICSValueError(f"{origin}; use one of 'output', 'input', 'both'")
    return ("output", "input") if value == "both" else (value,)


def check_where(where: Any) -> Any:
    """Validate ``where`` eagerly (a callable is validated per module later)."""
    if callable(where):
        return where
    if where not in WHERE:
        raise ICSValueError(
            f"`where` must be 'output', 'input', 'both' or a callable (name, module) -> one "
            f"of them, got {where!r}"
        )
    return where


# ---------------------------------------------------------------- axes per module type
def _channels_first_types() -> tuple[type, ...]:
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.conv import _ConvNd
    from torch.nn.modules.instancenorm import _InstanceNorm
    from torch.nn.modules.pooling import (
        _AdaptiveAvgPoolNd,
        _AdaptiveMaxPoolNd,
        _AvgPoolNd,
        _MaxPoolNd,
    )

    return (
        _BatchNorm,
        _InstanceNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        _ConvNd,
        _AvgPoolNd,
        _MaxPoolNd,
        _AdaptiveAvgPoolNd,
        _AdaptiveMaxPoolNd,
        nn.Dropout1d,
        nn.Dropout2d,
        nn.Dropout3d,
        nn.Upsample,
        nn.PixelShuffle,
        nn.PixelUnshuffle,
    )


def _channels_last_types() -> tuple[type, ...]:
    types: list[type] = [
        nn.LayerNorm,
        nn.Linear,
        nn.Bilinear,
        nn.Embedding,
        nn.EmbeddingBag,
        nn.MultiheadAttention,
        nn.RNNBase,
        nn.Transformer,
        nn.TransformerEncoder,
        nn.TransformerDecoder,
        nn.TransformerEncoderLayer,
        nn.TransformerDecoderLayer,
    ]
    rms = getattr(nn, "RMSNorm", None)
    if rms is not None:
        types.append(rms)
    return tuple(types)


def _batch_first(module: nn.Module) -> bool | None:
    """``batch_first`` of RNNs, attention and transformer layers; None if it has none."""
    for probe in (module, getattr(module, "self_attn", None)):
        flag = getattr(probe, "batch_first", None)
        if isinstance(flag, bool):
            return flag
    layers = getattr(module, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return _batch_first(layers[0])
    return None


def _known_axes(module: nn.Module) -> tuple[int, int, bool] | None:
    """(batch_axis, channel_axis, batch axis known from the module itself) or None."""
    if isinstance(module, _channels_first_types()) or is_unitization(module):
        return 0, 1, True
    if isinstance(module, _channels_last_types()) or type(module).__name__ == "Conv1D":
        # (Conv1D: the transformers library's linear layer of GPT-2, channels-last)
        flag = _batch_first(module)
        if flag is None:  # LayerNorm, Linear, ...: the batch axis depends on the context
            return 0, -1, False
        return (0 if flag else 1), -1, True
    return None


def infer_axes(module: nn.Module, ancestors: Iterable[nn.Module] = ()) -> tuple[int, int]:
    """``(batch_axis, channel_axis)`` of a module's output, inferred from its type.

    Channels-first (axis 1) for convolutions, pooling, BatchNorm, GroupNorm,
    InstanceNorm, LocalResponseNorm and Unitization; channels-last (-1) for LayerNorm,
    RMSNorm, Linear, Embedding, attention, transformer layers and RNNs. A module of
    another type takes the layout of its first descendant of known type, else of its
    nearest ancestor of known type, else channels-first (PyTorch's convention). The
    batch axis is 0, or 1 where the module or its nearest ancestor with a
    ``batch_first`` flag (RNN, attention, transformer) has ``batch_first=False``: a
    LayerNorm inside a sequence-first transformer layer has batch axis 1.
    """
    ancestors = list(ancestors)
    known = _known_axes(module)
    if known is None:
        for sub in module.modules():
            known = _known_axes(sub) if sub is not module else None
            if known is not None:
                break
    if known is None:
        for parent in ancestors:
            known = _known_axes(parent)
            if known is not None:
                break
    if known is None:
        return 0, 1
    batch, chan, definite = known
    if chan == -1 and not definite:
        for parent in ancestors:
            flag = _batch_first(parent)
            if flag is not None:
                batch = 0 if flag else 1
                break
    return batch, chan


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or (_is_glob(pattern) and fnmatch.fnmatchcase(name, pattern))


def per_layer(
    mapping: dict[str, Any], names: list[str], argument: str
) -> Callable[[str], Any | None]:
    """Look up a per-layer option by exact name or glob; unknown keys raise."""
    for pattern in mapping:
        if not isinstance(pattern, str):
            raise ICSTypeError(f"`{argument}` keys must be layer names or globs, got {pattern!r}")
        if not any(_matches(name, pattern) for name in names):
            raise ICSValueError(
                f"`{argument}` names {pattern!r}, which is not a selected layer; selected "
                f"layers close to it: {_close(pattern, names)}"
            )

    def lookup(name: str) -> Any | None:
        for pattern, value in mapping.items():
            if _matches(name, pattern):
                return value
        return None

    return lookup
