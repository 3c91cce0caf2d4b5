"""Capture layer outputs (or inputs) of any PyTorch model on a probe batch, side-effect free.

:func:`capture` runs one forward pass of ``model`` on the probe ``inputs`` with forward
hooks on the selected layers and returns detached copies of what they produced.
:class:`Recorder` is the reusable object behind it (the ICS monitor runs it before and
after each measured optimizer step); :func:`dry_run` lists what a selector would
capture.

Keys
----
Every captured tensor is stored under a key of the form::

    <name>[#<call>][:input]

- ``<name>``: the module's name as ``model.named_modules()`` spells it, with wrapper
  segments removed (``module.`` of DataParallel / DistributedDataParallel,
  ``_orig_mod.`` of ``torch.compile``); the root module is ``"<root>"``. A module
  registered under several names is known by the first.
- ``#<call>``: the k-th call of a module that runs several times in one forward
  (shared blocks); the first call has no suffix, later ones ``#2``, ``#3``, ...
- ``:input``: the module's input (``where="input"`` or ``"both"``); the output has no
  suffix. With ``where="both"`` a norm layer ``bn1`` gives ``"bn1:input"`` and ``"bn1"``.

What is stored
--------------
- Outputs of any structure: a tensor is stored as is; for tuples, lists, dicts
  (incl. transformer-library ``ModelOutput``) and dataclasses the **first floating-point
  tensor found depth-first** is stored (an LSTM's ``(output, (h, c))`` gives
  ``output``). ``output_select`` picks another item by index, key or callable; it only
  applies to structured outputs. Inputs: the first floating tensor among the
  positional, then keyword arguments.
- Values are detached and copied inside the hook, before later in-place operations
  (``ReLU(inplace=True)``) can change them, converted to ``dtype`` (float32 by
  default: bfloat16 / float16 activations are upcast) on ``device`` (``"cpu"`` by
  default, ``"model"`` for the model's own device).
- ``transform(key, tensor) -> tensor`` (optional) runs inside the hook on the detached
  tensor as the layer produced it (model dtype and device; do not modify it in place)
  before it is stored, e.g. a random-projection sketch. Its result is converted to
  ``dtype`` / ``device``; if it changes the shape, it must put the batch on axis 0.

No side effects
---------------
The pass runs under ``torch.no_grad()`` inside :func:`ics_toolkit._state.preserved`:
buffers (BatchNorm running statistics, ``num_batches_tracked``), every submodule's
train/eval flag and the CPU / CUDA / numpy / ``random`` RNG states are bitwise as before
afterwards. ``mode="train"`` (default) runs every module in train mode, so BatchNorm
normalizes with the probe batch's own statistics (what the next layer sees in
training); ``mode="eval"`` uses running statistics; ``mode="keep"`` keeps each module's
flag (e.g. frozen BatchNorm layers in a fine-tuned model). Hooks are removed on every
exit path; no reference to the captured tensors is kept once the result is returned.
The model stays picklable while hooks are attached (hooks are small module-level
objects holding only a weak reference; nothing is written onto the modules).

Wrapped and compiled models
---------------------------
The pass runs on the wrapped module: ``torch.compile``'s ``OptimizedModule`` is
measured through its eager ``_orig_mod`` (hooks on compiled code may never fire), and
compiled submodules run eagerly for the pass (``torch.compiler.set_stance
("force_eager")`` where available). DataParallel / DistributedDataParallel run their
``module`` directly: no collectives are triggered, the probe must be on the module's
device. SyncBatchNorm in ``mode="train"`` still synchronises across processes when a
process group is active: run the capture on every rank, or use ``mode="eval"``.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from ics_toolkit._selection import (
    ROOT,
    ancestry,
    check_where,
    contains_compiled,
    infer_axes,
    is_norm,
    per_layer,
    select,
    sites_for,
    unwrap,
)
from ics_toolkit._state import check_mode, preserved
from ics_toolkit.errors import ICSTypeError, ICSUsageError, ICSValueError
from ics_toolkit.fsdp import resharded

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CaptureInfo", "Recorder", "capture", "dry_run"]

_MAX_DEPTH = 32


@dataclass(frozen=True)
class CaptureInfo:
    """What one captured tensor is.

    Attributes
    ----------
    key : str
        The result key (``name[#call][:input]``).
    name : str
        The layer's name (wrapper prefixes stripped).
    call : int
        1 for the first call of the module in the forward pass, 2 for the second, ...
    site : {"output", "input"}
        Which side of the module was captured.
    module_type : str
        The module's class name.
    module : torch.nn.Module
        The module itself (to read affine parameters, ``eps`` or running statistics).
    shape : tuple of int
        Shape of the stored tensor.
    batch_axis : int
        Axis of the stored tensor indexing probe inputs (non-negative).
    channel_axis : int or None
        Axis of features/channels (non-negative); None for a 1-D tensor.
    source_dtype : torch.dtype
        Dtype the layer produced (before conversion to the storage dtype).
    source_shape : tuple of int
        Shape the layer produced (before ``transform``).
    """

    key: str
    name: str
    call: int
    site: str
    module_type: str
    module: nn.Module = field(repr=False, compare=False)
    shape: tuple[int, ...]
    batch_axis: int
    channel_axis: int | None
    source_dtype: torch.dtype
    source_shape: tuple[int, ...]


# ------------------------------------------------------------------ structured outputs
def _first_float(obj: Any, depth: int = 0) -> torch.Tensor | None:
    """First floating-point tensor in ``obj``, depth-first (tuple/list/dict/dataclass)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if depth > _MAX_DEPTH:
        return None
    for item in _children(obj):
        found = _first_float(item, depth + 1)
        if found is not None:
            return found
    return None


def _children(obj: Any) -> list[Any]:
    if isinstance(obj, Mapping):
        return list(obj.values())
    if isinstance(obj, tuple | list):
        return list(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [getattr(obj, f.name) for f in dataclasses.fields(obj)]
    return []


def _describe(obj: Any, depth: int = 0) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if depth > 2:
        return type(obj).__name__
    if isinstance(obj, Mapping):
        inner = ", ".join(f"{k!r}: {_describe(v, depth + 1)}" for k, v in list(obj.items())[:6])
        return f"{type(obj).__name__}{{{inner}}}"
    if isinstance(obj, tuple | list) or dataclasses.is_dataclass(obj):
        inner = ", ".join(_describe(v, depth + 1) for v in _children(obj)[:6])
        return f"{type(obj).__name__}({inner})"
    return type(obj).__name__


def _pick(output: Any, select: Any, name: str) -> torch.Tensor:
    """Apply ``output_select`` to a structured output (a tensor is taken as is)."""
    if isinstance(output, torch.Tensor) or select is None:
        value = _first_float(output)
    elif callable(select):
        value = select(output)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ICSTypeError(
                f"the output_select callable for layer {name!r} returned "
                f"{_describe(value)}; it must return a floating-point tensor"
            )
    elif isinstance(select, int) and not isinstance(select, bool):
        items = _children(output)
        if not -len(items) <= select < len(items):
            raise ICSValueError(
                f"layer {name!r} returned {_describe(output)}, which has no item "
                f"output_select={select}; use an index in 0..{len(items) - 1} or a key"
                if items
                else f"layer {name!r} returned {_describe(output)}, which cannot be indexed; "
                "use output_select=None"
            )
        value = _first_float(items[select])
    elif isinstance(select, str):
        if isinstance(output, Mapping) and select in output:
            value = _first_float(output[select])
        elif not isinstance(output, Mapping) and dataclasses.is_dataclass(output):
            if select not in {f.name for f in dataclasses.fields(output)}:
                raise ICSValueError(
                    f"layer {name!r} returned {_describe(output)}, which has no field "
                    f"{select!r}; use one of its fields"
                )
            value = _first_float(getattr(output, select))
        else:
            keys = list(output.keys()) if isinstance(output, Mapping) else []
            raise ICSValueError(
                f"layer {name!r} returned {_describe(output)}, which has no key {select!r}"
                + (f"; keys: {keys}" if keys else "; use an integer index instead")
            )
    else:  # validated in Recorder.__init__
        raise ICSTypeError(f"unusable output_select {select!r}")
    if value is None:
        raise ICSValueError(
            f"layer {name!r} returned {_describe(output)}: no floating-point tensor to "
            "capture; pick one with output_select (index, key or callable) or select "
            "another layer"
        )
    return value


def _first_input(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> torch.Tensor:
    value = _first_float(args)
    if value is None:
        value = _first_float(kwargs)
    if value is None:
        raise ICSValueError(
            f"layer {name!r} received {_describe(args)} {_describe(kwargs)}: no floating-point "
            "tensor input to capture (an Embedding takes integer ids); capture its output "
            "instead (where='output')"
        )
    return value


def _norm_axes(axes: tuple[int, int], shape: tuple[int, ...], name: str) -> tuple[int, int | None]:
    ndim = len(shape)
    batch, chan = axes
    if ndim == 0 or not -ndim <= batch < ndim:
        raise ICSValueError(
            f"layer {name!r} produced a tensor of shape {shape} without batch axis {batch}; "
            f"set its axes with axes={{{name!r}: (batch_axis, channel_axis)}} or leave it out "
            "of `layers`"
        )
    batch %= ndim
    if ndim == 1:
        return batch, None
    if not -ndim <= chan < ndim or chan % ndim == batch:
        raise ICSValueError(
            f"layer {name!r} produced shape {shape}, for which channel axis {chan} is invalid "
            f"(batch axis {batch}); set axes={{{name!r}: (batch_axis, channel_axis)}}"
        )
    return batch, chan % ndim


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # pragma: no cover - exotic tensor types
        return True


# ------------------------------------------------------------------ the hook plumbing
@dataclass(eq=False)
class _Target:
    name: str
    module: nn.Module
    sites: tuple[str, ...]
    axes: tuple[int, int]
    select: Any
    check_input_batch: bool
    calls: int = 0
    stack: list[int] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


class _Store:
    """Everything one pass records; hooks reach it only through a weak reference."""

    def __init__(
        self,
        targets: list[_Target],
        *,
        dtype: torch.dtype,
        device: torch.device | None,
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None,
        keep: bool,
        pin_memory: bool = False,
    ) -> None:
        self.targets = targets
        self.dtype = dtype
        self.device = device
        self.transform = transform
        self.keep = keep
        self.pin_memory = pin_memory
        self.tensors: dict[str, torch.Tensor] = {}
        self.infos: dict[str, CaptureInfo] = {}

    def before(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        target = self.targets[index]
        target.calls += 1
        target.stack.append(target.calls)
        if "input" in target.sites:
            self._keep(target, target.calls, "input", _first_input(args, kwargs, target.name))
        elif target.check_input_batch:
            value = _first_float(args)
            if value is not None:  # fail before BatchNorm's own batch-of-1 error
                self._check_batch(target, value, "input")

    def after(self, index: int, output: Any) -> None:
        target = self.targets[index]
        call = target.stack.pop() if target.stack else target.calls
        if "output" in target.sites:
            self._keep(target, call, "output", _pick(output, target.select, target.name))

    def _check_batch(self, target: _Target, value: torch.Tensor, site: str) -> tuple[int, Any]:
        shape = tuple(value.shape)
        batch, chan = _norm_axes(target.axes, shape, target.name)
        if shape[batch] < 2:
            raise ICSValueError(
                f"layer {target.name!r} got a probe batch of {shape[batch]} sample(s) (its "
                f"{site} has shape {shape}, batch axis {batch}); ICS compares distributions, "
                "so pass a probe of at least 2 inputs (hundreds for stable estimates)"
            )
        return batch, chan

    def _keep(self, target: _Target, call: int, site: str, value: torch.Tensor) -> None:
        if not self.keep:  # dry run: count and record the first shape only
            self._check_batch(target, value, site)
            target.shapes.setdefault(site, tuple(value.shape))
            return
        key = target.name
        if call > 1:
            key += f"#{call}"
        if site == "input":
            key += ":input"
        batch, chan = self._check_batch(target, value, site)
        source = value.detach()
        copy = True
        out = source
        if self.transform is not None:
            out = self.transform(key, source)
            if not isinstance(out, torch.Tensor):
                raise ICSTypeError(
                    f"transform returned {type(out).__name__} for {key!r}; it must return a "
                    "torch.Tensor"
                )
            copy = _shares_memory(out, source)
            if tuple(out.shape) != tuple(source.shape):
                batch, chan = 0, (out.ndim - 1 if out.ndim >= 2 else None)
        where = torch.device(self.device or out.device)
        if self.pin_memory and where.type == "cpu" and out.device.type == "cuda":
            # page-locked: the copy runs at the bus's speed, and so does the copy back
            stored = torch.empty(out.shape, dtype=self.dtype, pin_memory=True)
            stored.copy_(out)
        else:
            stored = out.to(
                device=where, dtype=self.dtype, copy=copy, memory_format=torch.contiguous_format
            )
        self.tensors[key] = stored
        self.infos[key] = CaptureInfo(
            key=key,
            name=target.name,
            call=call,
            site=site,
            module_type=type(target.module).__name__,
            module=target.module,
            shape=tuple(stored.shape),
            batch_axis=batch,
            channel_axis=chan,
            source_dtype=value.dtype,
            source_shape=tuple(value.shape),
        )


class _Hook:
    """A forward (pre-)hook: module-level, picklable, holding only a weakref to the store."""

    __slots__ = ("_store", "index", "pre")

    def __init__(self, store: _Store, index: int, pre: bool) -> None:
        self._store: weakref.ref[_Store] | None = weakref.ref(store)
        self.index = index
        self.pre = pre

    def __call__(self, module: nn.Module, *rest: Any) -> None:
        store = self._store() if self._store is not None else None
        if store is None:  # pass over, or unpickled copy: do nothing
            return None
        if self.pre:
            store.before(self.index, rest[0], rest[1])
        else:
            store.after(self.index, rest[-1])
        return None

    def __getstate__(self) -> dict[str, Any]:
        return {"index": self.index, "pre": self.pre}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._store = None
        self.index = state["index"]
        self.pre = state["pre"]


# ------------------------------------------------------------------ helpers of a pass
def _as_call(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, tuple):
        return inputs, {}
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise ICSTypeError(
                f"`inputs` is a mapping with non-string key {bad[0]!r}; a dict is passed as "
                "keyword arguments, so its keys must be argument names (wrap it in a tuple, "
                "(inputs,), to pass it as one positional argument)"
            )
        return (), dict(inputs)
    return (inputs,), {}


def _floats(obj: Any, depth: int = 0) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if depth > _MAX_DEPTH:
        return []
    return [t for item in _children(obj) for t in _floats(item, depth + 1)]


def _model_device(model: nn.Module) -> torch.device | None:
    """The single device of the model's parameters and buffers (None if none or several)."""
    devices = {t.device for t in model.parameters()} | {t.device for t in model.buffers()}
    return devices.pop() if len(devices) == 1 else None


def _check_model(model: nn.Module) -> None:
    for name, m in model.named_modules():
        for tensor in list(m._parameters.values()) + list(m._buffers.values()):
            if tensor is not None and is_lazy(tensor):
                raise ICSUsageError(
                    f"module {name or ROOT!r} ({type(m).__name__}) has uninitialized lazy "
                    "parameters; run one ordinary forward pass first, so that measuring "
                    "does not initialise them"
                )


def _check_devices(args: Any, kwargs: Any, device: torch.device | None) -> None:
    if device is None:
        return
    for t in _floats((args, kwargs)):
        if t.device != device:
            raise ICSValueError(
                f"`inputs` holds a tensor on {t.device} but the model is on {device}; move "
                f"the probe to the model's device (e.g. inputs.to({str(device)!r}))"
            )


def _eager(model: nn.Module) -> AbstractContextManager[Any]:
    """Run compiled submodules eagerly for the pass, so hooks on their layers fire."""
    if not contains_compiled(model):
        return nullcontext()
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def _is_device_error(err: RuntimeError) -> bool:
    text = str(err)
    return (
        "same device" in text
        or "expected device" in text
        or ("cuda" in text and "should be the same" in text)
    )


# ------------------------------------------------------------------ public API
class Recorder:
    """Reusable capture of selected layers' outputs and/or inputs on a probe batch.

    Parameters
    ----------
    model : torch.nn.Module
        Any model, also wrapped in ``torch.compile``, DataParallel or
        DistributedDataParallel (the pass runs on the wrapped module, see module docs).
    layers : str, type, tuple of types, list, torch.nn.Module or callable
        Selector: ``"norm"`` (every normalization layer, default), ``"all"`` (every leaf
        module), a name glob (``"layer1.*.bn?"``), a module type or tuple of types, a
        list of names, globs and modules, or a predicate ``(name, module) -> bool``. A
        selector matching nothing raises with the closest names.
    where : {"output", "input", "both"} or callable
        Side(s) of each selected module to capture, or ``(name, module) -> side`` (e.g.
        both sides of norm layers only). See the module docs for the key grammar.
    output_select : int, str, callable, dict or None
        For layers returning a tuple / list / dict / dataclass: the item to store (an
        index, a key, or ``output -> tensor``), or a dict from layer name or glob to
        such a selector. None stores the first floating tensor found depth-first.
        Tensor outputs are always stored as is.
    dtype : torch.dtype
        Floating dtype of the stored copies (default float32; low-precision
        activations are upcast).
    device : "cpu", "model", str or torch.device
        Where the copies are stored; ``"model"`` keeps them on the model's device.
    mode : {"train", "eval", "keep"}
        Train/eval flags for the pass only (see module docs); default "train".
    transform : callable or None
        ``(key, tensor) -> tensor`` applied inside the hook to the detached tensor
        before it is stored (see module docs).
    axes : dict or None
        Override of ``(batch_axis, channel_axis)`` per layer name or glob; by default
        they are inferred from the module type (channels-first for conv / BatchNorm /
        GroupNorm / InstanceNorm / LRN / Unitization, channels-last for LayerNorm /
        RMSNorm / Linear / attention / transformer / RNN / Embedding, batch axis 1 for
        ``batch_first=False``).
    seed : int or None
        If given, the torch RNGs are seeded with it during the pass (and restored
        after), so every pass draws the same dropout masks.
    allow_missing : bool
        Silently skip selected modules that never run (default: raise).
    copy_parameters : bool
        Copy and restore parameters too, for models whose forward modifies them in
        place (default: only verify that it did not).
    pin_memory : bool
        Store copies of a GPU model's tensors that go to the host (``device="cpu"``) in
        page-locked memory (default False): they move between the GPU and the host
        several times faster, but pinned memory cannot be swapped out, and torch's
        caching host allocator rounds each block up to a power of two and keeps freed
        blocks for reuse. The monitor's memory plan turns it on with host offload.

    Attributes
    ----------
    info : dict of str to CaptureInfo
        Metadata of the last :meth:`run`, one entry per returned key.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from ics_toolkit import Recorder
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    >>> rec = Recorder(model, where="both")
    >>> out = rec.run(torch.ones(5, 3).cumsum(0))
    >>> {key: tuple(t.shape) for key, t in out.items()}
    {'1:input': (5, 4), '1': (5, 4)}
    >>> rec.info["1"].module_type, rec.info["1"].channel_axis
    ('BatchNorm1d', 1)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Any = "norm",
        where: str | Callable[[str, nn.Module], str] = "output",
        *,
        output_select: Any = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        mode: str = "train",
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        axes: Mapping[str, tuple[int, int]] | None = None,
        seed: int | None = None,
        allow_missing: bool = False,
        copy_parameters: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ICSTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._runner = unwrap(model)
        self.layers = layers
        self.where = check_where(where)
        self.mode = check_mode(mode)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ICSTypeError(
                f"`dtype` must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}"
            )
        self.dtype = dtype
        if isinstance(device, str) and device != "model":
            try:
                device = torch.device(device)
            except RuntimeError as err:
                raise ICSValueError(
                    f"`device` must be 'cpu', 'model' or a torch device, got {device!r}"
                ) from err
        elif not isinstance(device, str | torch.device):
            raise ICSTypeError(
                f"`device` must be 'cpu', 'model' or a torch.device, got {type(device).__name__}"
            )
        self.device = device
        choices = output_select.values() if isinstance(output_select, Mapping) else [output_select]
        for choice in choices:
            if not (choice is None or callable(choice) or isinstance(choice, int | str)) or (
                isinstance(choice, bool)
            ):
                raise ICSTypeError(
                    "`output_select` must be an int index, a str key, a callable output -> "
                    f"tensor or a dict of those per layer, got {type(choice).__name__}"
                )
        self.output_select = output_select
        if transform is not None and not callable(transform):
            raise ICSTypeError(
                f"`transform` must be a callable (key, tensor) -> tensor, got "
                f"{type(transform).__name__}"
            )
        self.transform = transform
        if axes is not None and not isinstance(axes, Mapping):
            raise ICSTypeError(
                "`axes` must be a dict {layer name or glob: (batch_axis, channel_axis)}, got "
                f"{type(axes).__name__}"
            )
        for key, value in (axes or {}).items():
            if not (
                isinstance(value, tuple | list)
                and len(value) == 2
                and all(isinstance(v, int) for v in value)
            ):
                raise ICSTypeError(
                    f"`axes[{key!r}]` must be a pair of ints (batch_axis, channel_axis), got "
                    f"{value!r}"
                )
        self.axes = dict(axes or {})
        if seed is not None and not isinstance(seed, int):
            raise ICSTypeError(f"`seed` must be an int or None, got {type(seed).__name__}")
        self.seed = seed
        self.allow_missing = bool(allow_missing)
        self.copy_parameters = bool(copy_parameters)
        self.pin_memory = bool(pin_memory)
        self._info: dict[str, CaptureInfo] = {}
        self._targets()  # validate the selection now, not at the first run

    @property
    def names(self) -> list[str]:
        """Names of the selected layers, in model order."""
        return [t.name for t in self._targets()]

    @property
    def runner(self) -> nn.Module:
        """The module a probe pass calls: ``model`` without DDP / ``torch.compile`` wrappers."""
        return self._runner

    def selected(self) -> list[tuple[str, nn.Module, tuple[int, int]]]:
        """The selected layers in model order: ``(name, module, (batch_axis, channel_axis))``.

        The axes are those a capture uses (inferred, or from ``axes``); no pass is run.
        """
        return [(t.name, t.module, tuple(t.axes)) for t in self._targets()]  # type: ignore[misc]

    @property
    def info(self) -> dict[str, CaptureInfo]:
        """Metadata of the last :meth:`run`, keyed like its result."""
        return dict(self._info)

    def _targets(self) -> list[_Target]:
        chosen = select(self.model, self.layers)
        names = [name for name, _ in chosen]
        axes_of = per_layer(self.axes, names, "axes")
        if isinstance(self.output_select, Mapping):
            select_of = per_layer(dict(self.output_select), names, "output_select")
        else:
            select_of = lambda name: self.output_select  # noqa: E731
        parents = ancestry(self.model)
        targets = []
        for name, module in chosen:
            if isinstance(module, torch.jit.ScriptModule):
                raise ICSTypeError(
                    f"layer {name!r} is a TorchScript module, which forward hooks cannot "
                    "observe; capture the eager module (before torch.jit.script / trace)"
                )
            override = axes_of(name)
            targets.append(
                _Target(
                    name=name,
                    module=module,
                    sites=sites_for(self.where, name, module),
                    axes=tuple(override)
                    if override is not None
                    else infer_axes(module, parents[id(module)]),
                    select=select_of(name),
                    check_input_batch=is_norm(module),
                )
            )
        return targets

    def _pass(self, inputs: Any, *, keep: bool) -> tuple[_Store, list[_Target]]:
        targets = self._targets()
        args, kwargs = _as_call(inputs)
        runner = self._runner
        _check_model(runner)
        model_device = _model_device(runner)
        _check_devices(args, kwargs, model_device)
        if self.device == "model":
            device = model_device
        else:
            device = self.device  # type: ignore[assignment]
        store = _Store(
            targets,
            dtype=self.dtype,
            device=device,
            transform=self.transform,
            keep=keep,
            pin_memory=self.pin_memory,
        )
        handles = []
        with (
            preserved(runner, mode=self.mode, seed=self.seed, parameters=self.copy_parameters),
            resharded(runner),  # FSDP2: shard again what the pass unsharded (ics_toolkit.fsdp)
            _eager(runner),
        ):
            try:
                for index, target in enumerate(targets):
                    module = target.module
                    pre = module.register_forward_pre_hook(
                        _Hook(store, index, pre=True), with_kwargs=True
                    )
                    handles.append(pre)
                    handles.append(module.register_forward_hook(_Hook(store, index, pre=False)))
                runner(*args, **kwargs)
            except BaseException as err:
                store.tensors.clear()  # free what was captured before the failure
                store.infos.clear()
                if not isinstance(err, RuntimeError) or not _is_device_error(err):
                    raise
                raise ICSValueError(
                    f"the forward pass failed with a device mismatch ({err}); put the probe "
                    f"`inputs` on the model's device ({model_device}) and the whole model "
                    "on one device"
                ) from err
            finally:
                for handle in handles:
                    handle.remove()
        return store, targets

    def run(self, inputs: Any) -> dict[str, torch.Tensor]:
        """Run one capture pass on the probe ``inputs``.

        Parameters
        ----------
        inputs : torch.Tensor, tuple, dict or object
            The probe batch: a tensor, a tuple of positional arguments, or a dict of
            keyword arguments; any other object is passed as the only positional
            argument. It must be on the model's device and hold at least 2 inputs.

        Returns
        -------
        dict of str to torch.Tensor
            Detached copies keyed ``name[#call][:input]`` in the order they were
            produced; shapes are the layers' own (e.g. (N, C, H, W)), see :attr:`info`.

        Raises
        ------
        ICSValueError
            A probe of fewer than 2 inputs, a selected module that never ran, an output
            without floating tensor, a missing ``output_select`` key or index, a probe on
            another device than the model.
        ICSUsageError
            A model with uninitialized lazy modules, or one whose forward changed a
            parameter in place (see ``copy_parameters``).
        """
        self._info = {}
        store, targets = self._pass(inputs, keep=True)
        missing = [t for t in targets if t.calls == 0]
        if missing and not self.allow_missing:
            raise ICSValueError(_missing_message(missing))
        tensors, self._info = store.tensors, store.infos
        del store  # the result is the only holder of the tensors
        return tensors

    def dry_run(self, inputs: Any = None) -> pd.DataFrame:
        """List what :meth:`run` would capture.

        Parameters
        ----------
        inputs : optional
            Without inputs nothing runs: the table lists the selected names, types and
            sites (``calls`` is NaN). With inputs one counting-only pass runs (no
            tensors kept, no side effects) and fills ``calls`` (0 for modules that
            never ran) and ``shape`` (of the first call, before ``transform``).

        Returns
        -------
        pandas.DataFrame
            Columns ``name, type, site, calls`` (and ``shape`` with inputs), one row per
            selected module and site.
        """
        import pandas as pd

        if inputs is None:
            targets = self._targets()
        else:
            _, targets = self._pass(inputs, keep=False)
        rows = []
        for t in targets:
            for site in sorted(t.sites, reverse=True):  # output first
                row: dict[str, Any] = {
                    "name": t.name,
                    "type": type(t.module).__name__,
                    "site": site,
                    "calls": float("nan") if inputs is None else t.calls,
                }
                if inputs is not None:
                    row["shape"] = t.shapes.get(site)
                rows.append(row)
        columns = ["name", "type", "site", "calls"] + ([] if inputs is None else ["shape"])
        return pd.DataFrame(rows, columns=columns)


def _missing_message(missing: list[_Target]) -> str:
    names = ", ".join(repr(t.name) for t in missing[:8])
    more = f" (and {len(missing) - 8} more)" if len(missing) > 8 else ""
    causes = [
        "it is not used in forward",
        "it is called through .forward() directly, which skips hooks",
        "it runs inside a compiled (torch.compile / torch.jit) region",
    ]
    if any(isinstance(t.module, nn.ModuleList | nn.ModuleDict) for t in missing):
        causes.insert(
            0,
            "a ModuleList / ModuleDict is a container that is never called: select its "
            "elements (e.g. 'layers.*')",
        )
    return (
        f"selected module(s) {names}{more} never ran during the capture pass; possible "
        f"causes: {'; '.join(causes)}. Select other layers, or pass allow_missing=True to "
        "skip them"
    )


def capture(
    model: nn.Module,
    inputs: Any,
    layers: Any = "norm",
    where: str | Callable[[str, nn.Module], str] = "output",
    mode: str = "train",
    **recorder_options: Any,
) -> dict[str, torch.Tensor]:
    """Capture the selected layers' outputs (or inputs) on one probe pass, side-effect free.

    Parameters
    ----------
    model : torch.nn.Module
        The model (wrappers allowed, see the module docs).
    inputs : torch.Tensor, tuple, dict or object
        The probe: a tensor, a tuple of positional arguments, or a dict of keyword
        arguments; at least 2 inputs, on the model's device.
    layers : selector
        Which modules (default ``"norm"``: every normalization layer); see
        :class:`Recorder`.
    where : {"output", "input", "both"} or callable
        Which side of each module.
    mode : {"train", "eval", "keep"}
        ``"train"`` (default): normalization with the probe's own batch statistics;
        ``"eval"``: running statistics; ``"keep"``: the modules' current flags.
    **recorder_options
        ``output_select``, ``dtype``, ``device``, ``transform``, ``axes``, ``seed``,
        ``allow_missing``, ``copy_parameters`` (see :class:`Recorder`).

    Returns
    -------
    dict of str to torch.Tensor
        Detached float32 CPU copies (by default) keyed ``name[#call][:input]``, each
        with the layer's own shape (batch axis included, e.g. (N, C, H, W)).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import ics_toolkit as ics
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
    >>> x = torch.linspace(-1, 1, 2 * 3 * 5 * 5).reshape(2, 3, 5, 5)
    >>> out = ics.capture(model, x)
    >>> list(out), tuple(out["1"].shape)
    (['1'], (2, 4, 3, 3))
    >>> bool((out["1"] < 0).any())  # copied before the in-place ReLU
    True
    """
    return Recorder(model, layers, where, mode=mode, **recorder_options).run(inputs)


def dry_run(
    model: nn.Module,
    inputs: Any = None,
    layers: Any = "norm",
    where: str | Callable[[str, nn.Module], str] = "output",
) -> pd.DataFrame:
    """List what :func:`capture` would record, before recording anything.

    Parameters
    ----------
    model : torch.nn.Module
        The model.
    inputs : optional
        Without inputs nothing runs (``calls`` is NaN); with inputs one counting-only,
        side-effect-free pass fills ``calls`` and ``shape``.
    layers : selector
        As in :func:`capture`.
    where : {"output", "input", "both"} or callable
        As in :func:`capture`.

    Returns
    -------
    pandas.DataFrame
        Columns ``name, type, site, calls`` (and ``shape`` with inputs).

    Examples
    --------
    >>> from torch import nn
    >>> import ics_toolkit as ics
    >>> model = nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 3), nn.LayerNorm(3))
    >>> ics.dry_run(model)[["name", "type", "site"]].values.tolist()
    [['1', 'LayerNorm', 'output'], ['3', 'LayerNorm', 'output']]
    """
    return Recorder(model, layers, where).dry_run(inputs)
