"""Snapshot and restore everything a measuring forward pass could change.

A probe pass through a model in train mode updates BatchNorm running statistics and
``num_batches_tracked``, consumes the dropout RNG, and (without ``torch.no_grad``)
builds an autograd graph. :func:`preserved` wraps such a pass so that afterwards the
model and the process are bitwise as they were:

- every buffer of every submodule (restored *in place* with ``copy_`` so references
  the user holds stay valid; a buffer the forward re-bound is bound back, one it added
  is removed; a buffer whose bits did not change is not written, so its autograd
  version counter is not bumped);
- every submodule's ``training`` flag, individually (not only the root's);
- the CPU torch RNG, the RNG of every CUDA device (only if CUDA is already
  initialised: this module never initialises it), numpy's global RNG and Python's
  ``random``;
- parameters: by default their autograd version counters are checked and a forward
  that modified one in place raises :class:`~ics_toolkit.errors.ICSUsageError`
  (nothing to restore from); ``parameters=True`` copies and restores them instead.

Plain Python attributes that a custom ``forward`` rebinds (``self.calls += 1``) are
not restored. The ICS monitor reuses :func:`preserved` around its own passes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ics_toolkit.errors import ICSUsageError, ICSValueError

__all__ = ["ModelSnapshot", "RNGState", "bitwise_equal", "preserved", "set_mode"]

MODES = ("train", "eval", "keep")

_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bits (NaN == NaN, 0 != -0)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_floating_point() or a.is_complex():
        as_int = _INT_OF_SIZE.get(a.element_size())
        if as_int is not None:
            return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


@dataclass
class RNGState:
    """The global random states a forward pass can consume."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None
    numpy: Any
    python: Any

    @classmethod
    def capture(cls) -> RNGState:
        """Read the current CPU, CUDA (if initialised), numpy and Python RNG states."""
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda, np.random.get_state(), random.getstate())  # noqa: NPY002

    def restore(self) -> None:
        """Put every captured RNG state back."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        np.random.set_state(self.numpy)  # noqa: NPY002
        random.setstate(self.python)


def seed_torch(seed: int) -> None:
    """Seed the CPU generator and, if CUDA is initialised, every CUDA generator.

    ``torch.manual_seed`` would queue a seed for a CUDA that is not initialised yet
    (changing the user's CUDA stream once it is); this never does.
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


# (module, name -> tensor as bound, [(tensor, copy or version)], is a TorchScript module)
_Saved = tuple[nn.Module, dict[str, Any], list[tuple[Any, Any]], bool]


class ModelSnapshot:
    """Copies of a model's buffers (and optionally parameters) plus every ``training`` flag.

    Parameters
    ----------
    model : torch.nn.Module
        The model; every submodule (shared ones once) is covered.
    parameters : bool
        Copy parameters too. When False only their version counters and bindings are
        recorded, and :meth:`restore` reports a parameter changed in place.
    """

    def __init__(self, model: nn.Module, *, parameters: bool = False) -> None:
        self._modules = list(model.modules())
        self._flags = [m.training for m in self._modules]
        self._buffers: list[_Saved] = []
        self._params: list[_Saved] = []
        self._copy_params = parameters
        for m in self._modules:
            script = isinstance(m, torch.jit.ScriptModule)  # its dicts are read-only views
            if len(m._buffers):
                bound = dict(m._buffers.items())
                saved = [(t, None if t is None else t.detach().clone()) for t in bound.values()]
                self._buffers.append((m, bound, saved, script))
            if len(m._parameters):
                bound = dict(m._parameters.items())
                if parameters:
                    saved = [(p, None if p is None else p.detach().clone()) for p in bound.values()]
                else:
                    saved = [(p, _version(p)) for p in bound.values()]
                self._params.append((m, bound, saved, script))

    def restore(self) -> list[str]:
        """Restore flags, buffers and (if copied) parameters.

        Returns
        -------
        list of str
            Qualified descriptions of parameters that changed in place and could not be
            restored because they were not copied (empty when all is well).
        """
        for m, flag in zip(self._modules, self._flags, strict=True):
            m.training = flag
        for m, bound, saved, script in self._buffers:
            _restore_dict(None if script else m._buffers, bound, saved)
        problems: list[str] = []
        for m, bound, saved, script in self._params:
            if self._copy_params:
                _restore_dict(None if script else m._parameters, bound, saved)
                continue
            if not script:
                _rebind(m._parameters, bound)
            for (name, p), (_, version) in zip(bound.items(), saved, strict=True):
                if p is not None and version is not None and _version(p) != version:
                    problems.append(f"{type(m).__name__}.{name}")
        return problems


def _version(t: torch.Tensor | None) -> int | None:
    if t is None or t.is_inference():
        return None
    return t._version


def _rebind(live: dict[str, Any], bound: dict[str, Any]) -> None:
    for key in [k for k in live if k not in bound]:
        del live[key]
    for key, value in bound.items():
        if live.get(key, None) is not value or key not in live:
            live[key] = value


def _restore_dict(
    live: dict[str, Any] | None, bound: dict[str, Any], saved: list[tuple[Any, Any]]
) -> None:
    if live is not None:
        _rebind(live, bound)
    with torch.no_grad():
        for tensor, copy in saved:
            if tensor is not None and not bitwise_equal(tensor, copy):
                tensor.copy_(copy)


def set_mode(model: nn.Module, mode: str) -> None:
    """Set every submodule's ``training`` flag directly ("train" / "eval"; "keep" does nothing).

    Flags are set per module rather than through ``model.train()``, so an overridden
    ``train()`` (e.g. one that freezes parameters) is not run.
    """
    if mode == "keep":
        return
    flag = mode == "train"
    for m in model.modules():
        m.training = flag


def check_mode(mode: Any) -> str:
    """Validate a ``mode`` argument."""
    if mode not in MODES:
        raise ICSValueError(
            f"`mode` must be one of {', '.join(map(repr, MODES))}, got {mode!r}: 'train' "
            "normalizes with the probe's own batch statistics, 'eval' with running statistics, "
            "'keep' leaves each module's flag as it is"
        )
    return mode


@contextmanager
def preserved(
    model: nn.Module,
    *,
    mode: str = "keep",
    grad: bool = False,
    seed: int | None = None,
    parameters: bool = False,
) -> Iterator[None]:
    """Run a block on ``model`` and leave the model and the global RNGs as they were.

    Parameters
    ----------
    model : torch.nn.Module
        The model whose buffers, flags (and optionally parameters) are restored.
    mode : {"keep", "train", "eval"}
        Flags to set on every submodule for the block only.
    grad : bool
        False (default) runs the block under ``torch.no_grad()``, so no graph is built.
    seed : int or None
        If given, the CPU (and initialised CUDA) torch generators are seeded with it
        for the block, so repeated blocks draw the same dropout masks.
    parameters : bool
        Copy and restore parameters too; otherwise a parameter modified in place
        raises after the block.

    Raises
    ------
    ICSUsageError
        When the block modified a parameter in place and ``parameters`` is False (the
        block's own exception, if any, takes precedence).
    """
    mode = check_mode(mode)
    snapshot = ModelSnapshot(model, parameters=parameters)
    rng = RNGState.capture()
    try:
        set_mode(model, mode)
        if seed is not None:
            seed_torch(seed)
        with nullcontext() if grad else torch.no_grad():
            yield
    except BaseException:
        rng.restore()
        snapshot.restore()
        raise
    rng.restore()
    problems = snapshot.restore()
    if problems:
        raise ICSUsageError(
            f"the forward pass modified parameter(s) {', '.join(problems)} in place, so the "
            "model could not be left as it was; pass copy_parameters=True (Recorder / "
            "capture) or parameters=True (preserved) to copy and restore parameters"
        )
