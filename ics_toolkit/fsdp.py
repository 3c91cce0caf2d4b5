"""FSDP2 (``fully_shard``) models under the monitor; wrappers it cannot measure refused.

A model sharded with ``fully_shard`` keeps each parameter as a ``DTensor`` shard; a
forward pass all-gathers the parameters of each sharded group on **every rank**,
registers the unsharded tensors on the modules for the pass and (except for the root,
which FSDP leaves unsharded after its forward) shards them again. For the monitor
this means:

- **every rank takes part in the probe passes**: a probe pass on one rank alone would
  wait for the others' all-gathers (or, worse, pair with their training collectives).
  With ``gather=False`` every rank runs the same probe, only the measuring rank keeps
  its captures and analyses; with ``gather=True`` every rank captures its shard, as
  under DDP (:mod:`ics_toolkit.distributed`). The monitor must therefore be built and
  stepped on every rank, with the same probe (or its shards) and schedule;
- after a probe pass every FSDP module that was sharded before it is sharded again
  (:func:`resharded`), so the training's next forward finds FSDP's state as it left it:
  the parameters registered on the modules are the very ``DTensor`` objects the
  optimizer updates. Parameters are never replaced, copied into the model or gathered
  by the monitor;
- whether an optimizer step changed the parameters is decided from this rank's local
  shards (:func:`local`), with no collective; both probe passes run on every rank at
  every scheduled step whatever that decision, so no rank is left waiting;
- the U3 / U5 bounds of BatchNorm and Unitization layers need their affine
  parameters in full, which a rank holds only as a shard: they are not reported
  (L1-L3, U1, U2 and every estimator are); ``gradient=True`` (a forward-backward on
  one rank) is refused.

Wrappers the monitor does not know are refused when it is built
(:func:`check_wrappers`), never discovered inside ``optimizer.step()``: FSDP1's
``FullyShardedDataParallel`` (flat parameters; use ``fully_shard``), DeepSpeed
engines, and ``DTensor`` parameters not managed by ``fully_shard`` (tensor
parallelism). Nothing here imports ``torch.distributed`` unless the model already uses
it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ics_toolkit.errors import ICSTypeError, ICSValueError

__all__ = ["check_wrappers", "fsdp_modules", "is_fsdp", "local", "resharded"]


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` sharded with ``fully_shard`` (FSDP2), in model order."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    cls = getattr(fsdp, "FSDPModule", None)
    if cls is None:  # nobody imported FSDP: no module can be sharded
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def is_fsdp(model: nn.Module) -> bool:
    """True when ``model`` or one of its submodules is sharded with ``fully_shard``."""
    return bool(fsdp_modules(model))


def _groups(module: nn.Module) -> list[Any]:
    state = module._get_fsdp_state()  # type: ignore[operator]
    return list(getattr(state, "_fsdp_param_groups", []) or [])


def _sharded_params(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in fsdp_modules(model):
        for group in _groups(module):
            for fsdp_param in group.fsdp_params:
                ids.add(id(fsdp_param.sharded_param))
    return ids


def _is_dtensor(t: Any) -> bool:
    tensor_mod = sys.modules.get("torch.distributed.tensor")
    cls = getattr(tensor_mod, "DTensor", None)
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a ``DTensor`` on this rank (no communication); others as they are."""
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[attr-defined]


def check_wrappers(model: nn.Module, *, gradient: bool = False) -> bool:
    """Refuse what the monitor cannot measure; tell whether ``model`` uses FSDP2.

    Parameters
    ----------
    model : torch.nn.Module
        The model given to the monitor.
    gradient : bool
        Whether the gradient ICS is asked for (refused with FSDP2).

    Returns
    -------
    bool
        True when ``model`` (or a submodule) is sharded with ``fully_shard``.

    Raises
    ------
    ICSTypeError
        FSDP1 (``FullyShardedDataParallel``), a DeepSpeed engine, or ``DTensor``
        parameters that ``fully_shard`` does not manage.
    ICSValueError
        ``gradient=True`` on an FSDP2 model.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp1 = getattr(fsdp, "FullyShardedDataParallel", None)
    for name, module in model.named_modules():
        label = name or "<root>"
        if fsdp1 is not None and isinstance(module, fsdp1):
            raise ICSTypeError(
                f"module {label!r} is wrapped in FSDP1's FullyShardedDataParallel, whose flat "
                "parameters the monitor cannot measure; shard the model with FSDP2's "
                "torch.distributed.fsdp.fully_shard instead (supported), or pass the "
                "unwrapped model on one process"
            )
        if any(cls.__name__ == "DeepSpeedEngine" for cls in type(module).__mro__):
            raise ICSTypeError(
                f"module {label!r} is a DeepSpeed engine, which the monitor does not support; "
                "pass its inner model (engine.module) in a single process, or use DDP / "
                "FSDP2 (fully_shard)"
            )
    modules = fsdp_modules(model)
    managed = _sharded_params(model) if modules else set()
    for name, p in model.named_parameters():
        if _is_dtensor(p) and id(p) not in managed:
            raise ICSTypeError(
                f"parameter {name!r} is a DTensor not managed by fully_shard (tensor "
                "parallelism or distribute_module), which the monitor cannot run a probe "
                "pass through; the monitor supports DDP and FSDP2 (fully_shard)"
            )
    if modules and gradient:
        raise ICSValueError(
            "gradient=True runs a forward-backward on the measuring rank alone, which an "
            "FSDP2 (fully_shard) model cannot do (its passes need every rank); pass "
            "gradient=False"
        )
    return bool(modules)


@contextmanager
def resharded(model: nn.Module) -> Iterator[None]:
    """Around a probe pass: shard again, afterwards, every FSDP2 group that was sharded.

    FSDP leaves the root's parameters unsharded after a forward (it expects the
    backward to follow); a probe pass has no backward, so without this the next
    training forward would find FSDP's state out of step with the parameters
    registered on the modules. Does nothing for a model without ``fully_shard``.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield
        return
    before = [(m, [g.is_sharded for g in _groups(m)]) for m in modules]
    try:
        yield
    finally:
        for module, flags in before:
            if any(flags) and not all(g.is_sharded for g in _groups(module)):
                module.reshard()  # type: ignore[operator]
