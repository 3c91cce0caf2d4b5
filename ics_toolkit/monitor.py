"""ICSMonitor: measure every layer's internal covariate shift across training.

The monitor is a two-step quantity. Before a scheduled optimizer step it captures
the layers' outputs on a fixed probe; after the step it captures them again and
turns the pair into rows (W1 estimators, sampling floors, the theory's bounds,
moment drift and, on request, Santurkar et al.'s gradient ICS) filed under the step
t of the update t -> t+1. Then the cached capture is freed.

Lifecycle::

    monitor = ICSMonitor(model, probe, every=10)
    monitor.attach(optimizer)        # optimizer step pre/post hooks; the loop stays as it is
    ...                              # train
    df = monitor.results()           # the tidy table (ics_toolkit.results.COLUMNS)
    monitor.detach()

or, for custom loops (gradient accumulation, closures, several optimizers)::

    with monitor.step():             # or monitor.before_step() ... monitor.after_step()
        optimizer.step()

Measuring never changes the run: probe passes run without autograd, restore every
buffer, train/eval flag and RNG state (``ics_toolkit.recording``), and unscheduled
steps cost one counter increment and one schedule call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ics_toolkit import _resume, _token, distributed, fsdp, sinks
from ics_toolkit._selection import is_norm
from ics_toolkit.bounding import RTOL
from ics_toolkit.distances import METHODS
from ics_toolkit.errors import (
    ICSError,
    ICSRuntimeWarning,
    ICSTypeError,
    ICSUsageError,
    ICSValueError,
    ICSWarning,
)
from ics_toolkit.recording import Recorder
from ics_toolkit.results import ResultWriter, _frame
from ics_toolkit.schedules import as_schedule
from ics_toolkit.shift import MeasureConfig, StepCapture, _event, measure_step, norm_snapshot
from ics_toolkit.sketch import SketchTransform, chunk_bytes
from ics_toolkit.views import VIEWS

__all__ = ["WORKING_COPIES", "ICSMonitor"]

#: Transient working memory of the estimators at a measured step, in float64 copies of
#: one layer's largest view matrix (``ICSMonitor.memory_per_layer``'s ``bytes_working``):
#: ``exact`` centres both samples and recomputes near-diagonal differences, the
#: bounds difference the samples and sort every column for L3, the moments square the
#: centred samples, the order check takes absolute values. Measured with
#: ``benchmarks/scale.py`` (n = 256, d = 32768, CPU resident high-water mark): 1.5
#: (``paired`` alone) to 5.5 (``exact``, or the bounds) copies on top of the held
#: captures and views; U3 / U5 layers use 2 more (their float64 normalized values).
WORKING_COPIES = 6

Probe = Any  # Tensor | tuple | dict | torch.utils.data.DataLoader


def _draw_probe(loader: Any, size: int, seed: int) -> tuple[Any, Any]:
    """A fixed, seeded probe from a DataLoader's dataset, without touching any global RNG.

    Iterating the loader would draw its shuffle order from the global RNG (and so
    shift the training run); indexing its dataset with a private generator does not.
    """
    dataset = loader.dataset
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ICSTypeError(
            "`probe` is a DataLoader over an iterable-style dataset; pass a fixed probe "
            "batch (a tensor, tuple or dict) instead"
        )
    n = len(dataset)
    if n < 2:
        raise ICSValueError(f"`probe` DataLoader's dataset has {n} sample(s); need at least 2")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=gen)[: min(size, n)].sort().values.tolist()
    collate = loader.collate_fn or torch.utils.data.default_collate
    batch = collate([dataset[i] for i in idx])
    if isinstance(batch, list | tuple) and len(batch) >= 2:
        return batch[0], batch[1]  # (inputs, targets) datasets
    return batch, None


def _to_device(obj: Any, device: torch.device | None) -> Any:
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


class ICSMonitor:
    """Measure internal covariate shift per layer around optimizer steps.

    Parameters
    ----------
    model : torch.nn.Module
        The network being trained (also wrapped in DDP or ``torch.compile``; see
        :func:`ics_toolkit.capture`; or sharded with FSDP2's ``fully_shard``, see
        :mod:`ics_toolkit.fsdp`: build and step the monitor on every rank). Other
        wrappers (FSDP1, DeepSpeed, tensor-parallel ``DTensor`` parameters) are
        refused here.
    probe : Tensor, tuple, dict or DataLoader
        The fixed probe inputs, in the forms :func:`ics_toolkit.capture` takes, on the
        model's device; or a ``DataLoader``, from whose dataset ``probe_size`` samples
        are drawn once with a private generator seeded by ``seed`` (for ``(input,
        target)`` datasets the inputs are the probe and the targets serve the gradient
        ICS). At least 2 inputs.
    layers : selector
        Which layers to measure (see :func:`ics_toolkit.capture`); default every
        normalization layer.
    every : int, list of int, callable or str
        The schedule: measure every k optimizer steps (from step 0), the listed steps,
        the steps where ``every(step)`` is true, or ``"log:END[:N]"`` (see
        :mod:`ics_toolkit.schedules`).
    methods : sequence of str
        :func:`ics_toolkit.wasserstein` methods computed on the ``flatten`` and
        ``pixel`` views (the ``channel`` view always uses ``per_coordinate``). Cost:
        ``exact`` is O(n^3) in the probe size n (fine to a few thousand); ``sliced``
        and ``max_sliced`` are lower bounds, far below W1 in high dimension.
    views : sequence of {"flatten", "pixel", "channel", "token"}
        How a layer output becomes samples (see :mod:`ics_toolkit.views`); ``token``:
        each non-padded token of an (N, T, C) output is a sample in R^C (see
        ``token_mask``), at most ``max_pixel_samples`` of them.
    where : {"output", "input", "both"}
        Measure the layers' outputs, inputs (keys ``name:input``) or both.
    bounds : bool
        Evaluate the theory's bounds (L1-L3, U1, U2 always; U3 for BatchNorm, U5 (and
        U4 at alpha = 1) for Unitization layers, on the normalized values they produced
        with their affine parameters and alpha at both steps) and check their order.
    floor : bool or sequence of str
        Report the sampling floor (W1 between two random halves of the probe at step
        t, the noise level of a W1 estimate; see docs/theory.md) of the first of
        ``methods`` (True), of the listed methods, or of none (False). The ``channel``
        view reports the floor of ``per_coordinate``.
    moments : bool
        Report the moment drift (``drift_mean``, ``drift_var``, ``drift_m4``,
        ``drift_norm_var``).
    gradient : bool
        Also compute Santurkar et al.'s gradient ICS of every weighted layer
        (``grad_ics_l2``, ``grad_ics_cos``, ``grad_norm`` rows, view ``"param"``); needs
        ``loss_fn`` and targets (``targets`` or a DataLoader probe). Costs one
        forward-backward per weighted layer per measured step.
    loss_fn : callable, optional
        ``loss_fn(model(probe), targets) -> scalar`` for the gradient ICS.
    targets : Any, optional
        Targets of the probe for the gradient ICS.
    n_projections : int
        Random directions of ``sliced``, ``max_sliced`` and L3 (POT's name).
    seed : int
        Seeds every random choice (directions, pixel subsamples, halves of the floor,
        the probe draw, dropout masks of the probe passes), each with a private
        generator: the training run's random stream is not touched.
    probe_size : int
        Samples drawn from a DataLoader probe.
    max_pixel_samples : int
        Cap on the rows of the ``pixel`` view (seeded subsample, same rows at both steps).
    mode : {"train", "eval", "keep"}
        Module mode of the probe passes: ``"train"`` normalizes with the probe's own
        batch statistics (what the next layer sees in training).
    path : str or Path, optional
        Folder to append results to as they are measured (one part file per measured
        step; read with :func:`ics_toolkit.load_results`, also after a crash).
    format : {"csv", "parquet"}
        Format of the parts.
    run : str, optional
        Label of this run in the ``run`` column (default: a random id).
    capture_dtype : torch.dtype
        Storage dtype of captured activations (the analysis is float64).
    rtol : float
        Tolerance of the bound checks (:data:`ics_toolkit.bounding.RTOL`).
    method_options : dict, optional
        Extra options per method, e.g. ``{"sinkhorn": {"reg": 0.05}}``.
    sketch : int, optional
        Store a random-projection sketch of k numbers per probe input instead of the
        d of a wide layer (:mod:`ics_toolkit.sketch`; taken inside the hook, so n x d is
        never kept). Needs ``views=("flatten",)``. Layers with d <= k are stored as
        they are. Rows of sketched layers have view ``"sketch"`` and ``dim`` k, and
        read as follows: ``exact`` (of the sketch), ``sliced``, ``max_sliced``, L1,
        L2, L3 and the floors are exact statements about the sketch and **lower
        bounds of the true W1** (the sketch is a contraction); ``paired``, U1 and U2
        bound the sketch's W1 only, **not** the true W1; ``exact_jl`` =
        ``sqrt(d'/k) * exact`` estimates the true W1 within a factor (1 +- eps),
        eps ~ sqrt(log(n) / k) (Johnson-Lindenstrauss; ``d'`` is d rounded up to a
        power of two); U3-U5 (they need the full normalized values) and the moment
        drift are not reported. Memory per layer becomes independent of d (see
        :meth:`memory_per_layer`).
    rank : int
        Under ``torch.distributed`` (an initialised process group): the rank that
        measures and writes results (see :mod:`ics_toolkit.distributed`). Build the
        monitor on every rank with the same arguments. Ignored in a single process.
    gather : bool
        False (default): only ``rank`` runs probe passes and the analysis, the other
        ranks make no collective call at all. True: every rank captures its own probe
        (its shard, e.g. :func:`ics_toolkit.distributed.shard`) and the shards are
        gathered to ``rank`` at the end of each scheduled step, measured as one probe
        in rank order. The gradient ICS, if asked for, uses the measuring rank's shard.
    group : ProcessGroup, optional
        Process group of ``rank`` and of the gather (default: the default group).
    gather_timeout : float
        Seconds a gather may wait for the other ranks; past it (or when a rank died)
        the step is recorded as ``gather_failed`` and gathering stops, instead of
        hanging.
    log_to : SummaryWriter, callable or list, optional
        Loggers the numbers are sent to as they are measured (on the measuring rank):
        a ``torch.utils.tensorboard.SummaryWriter`` or any callable ``(step,
        dict_of_scalars)``; names ``ics/<layer>/<quantity>`` (see
        :mod:`ics_toolkit.sinks`).
    axes, output_select, transform : optional
        Passed on to the capture (:class:`ics_toolkit.Recorder`): per-layer
        ``(batch_axis, channel_axis)`` overrides, which item of a structured output
        to measure, and a ``(key, tensor) -> tensor`` applied in the hook
        (``transform`` and ``sketch`` exclude each other).
    token_mask : tensor, bool or None
        The padding mask (N, T) of the ``token`` view (1 for real tokens). None
        (default): the probe's ``attention_mask`` when the probe is a dict holding one,
        else every position; False: every position. Every measured layer must produce
        tokens of shape (N, T) (checked here). Not with ``gather=True``.

    Notes
    -----
    *Device placement.* Captures are stored on the model's device and every estimator
    but two runs there:
    the views, the moments, ``paired``, ``sliced``, ``max_sliced``,
    ``per_coordinate``, the floors of these, the bounds and the sketch. ``exact``
    builds its cost matrix on the device and hands it to POT's CPU solver;
    ``sinkhorn`` runs POT's torch backend on the device. Only those matrices and the
    final numbers (Python floats in the results table) reach the CPU. Under
    ``torch.autocast`` the probe passes run as the training forward does (e.g.
    bfloat16 activations), are stored in ``capture_dtype`` and analysed in float64
    with autocast disabled.

    Attributes
    ----------
    step_count : int
        Optimizer steps seen so far (the index the next step gets).
    update_count : int
        Steps measured so far.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import ics_toolkit as ics
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> monitor = ics.ICSMonitor(model, torch.randn(32, 4), every=2)
    >>> monitor.attach(opt)
    >>> for _ in range(4):
    ...     opt.zero_grad()
    ...     model(torch.randn(16, 4)).square().mean().backward()
    ...     opt.step()
    >>> df = monitor.results()
    >>> sorted(df.step.unique().tolist()), bool(df.bounds_hold.all())
    ([0, 2], True)
    >>> monitor.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Probe,
        *,
        layers: Any = "norm",
        every: int | Iterable[int] | Callable[[int], bool] | str = 10,
        methods: Sequence[str] = ("exact", "max_sliced", "sliced"),
        views: Sequence[str] = ("flatten",),
        where: str = "output",
        bounds: bool = True,
        floor: bool | Sequence[str] = True,
        moments: bool = True,
        gradient: bool = False,
        loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
        targets: Any = None,
        n_projections: int = 128,
        seed: int = 0,
        probe_size: int = 256,
        max_pixel_samples: int = 1024,
        mode: str = "train",
        path: str | os.PathLike[str] | None = None,
        format: str = "csv",
        run: str | None = None,
        capture_dtype: torch.dtype = torch.float32,
        rtol: float = RTOL,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        sketch: int | None = None,
        rank: int = 0,
        gather: bool = False,
        group: Any = None,
        gather_timeout: float = 300.0,
        log_to: Any = None,
        axes: Mapping[str, tuple[int, int]] | None = None,
        output_select: Any = None,
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        token_mask: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ICSTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.schedule = as_schedule(every)
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        views = (views,) if isinstance(views, str) else tuple(views)
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ICSValueError(
                f"unknown method(s) {bad} in `methods`; choose from {', '.join(METHODS)}"
            )
        bad = [v for v in views if v not in VIEWS]
        if bad or not views:
            raise ICSValueError(f"unknown view(s) {bad} in `views`; choose from {', '.join(VIEWS)}")
        if where not in ("output", "input", "both"):
            raise ICSValueError(f"`where` must be 'output', 'input' or 'both', got {where!r}")
        for name, value in (("n_projections", n_projections), ("probe_size", probe_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ICSValueError(f"`{name}` must be a positive int, got {value!r}")
        if sketch is not None:
            if not isinstance(sketch, int) or isinstance(sketch, bool) or sketch < 1:
                raise ICSValueError(
                    f"`sketch` must be None or a positive int (the sketch dimension k), "
                    f"got {sketch!r}"
                )
            if views != ("flatten",):
                raise ICSValueError(
                    f"`sketch` stores a projection of the flatten view only, so it cannot "
                    f"serve views {list(views)}; pass views=('flatten',) (or sketch=None)"
                )
        self.sketch = sketch
        self._dist = distributed.context(rank, gather, group, gather_timeout)
        self._dist_broken = False
        # FSDP2 (fully_shard): every rank runs the probe passes; unknown wrappers refused
        self._fsdp = fsdp.check_wrappers(model, gradient=bool(gradient))
        sync_bn = _has_sync_bn(model)
        if self._dist.distributed and sync_bn and mode != "eval":
            if not gather:
                raise ICSValueError(
                    f"the model has SyncBatchNorm layers, which synchronize across ranks in "
                    f"mode={mode!r} even in a probe pass, so a probe pass on one rank alone "
                    "would wait forever; pass gather=True (every rank runs the probe) or "
                    "mode='eval'"
                )
            if gradient:
                raise ICSValueError(
                    "gradient=True runs a forward-backward on the measuring rank alone, which "
                    f"SyncBatchNorm layers in mode={mode!r} would block; pass mode='eval' or "
                    "gradient=False"
                )
        # SyncBatchNorm normalizes with the statistics of every shard: one rank cannot
        # recompute its normalized values, so it gets no U3
        self._local_stats = not (self._dist.distributed and mode != "eval")
        self.config = MeasureConfig(
            methods=methods,
            views=views,
            floor=_floor_methods(floor, methods),
            bounds=bool(bounds),
            moments=bool(moments),
            n_projections=n_projections,
            seed=seed,
            max_pixel_samples=max_pixel_samples,
            rtol=rtol,
            method_options=dict(method_options or {}),
        )
        self.where = where

        device = next((p.device for p in model.parameters()), None)
        self._device = device
        if isinstance(probe, torch.utils.data.DataLoader):
            probe, loader_targets = _draw_probe(probe, probe_size, seed)
            probe = _to_device(probe, device)
            targets = loader_targets if targets is None else targets
        self.probe = probe
        self.targets = _to_device(targets, device) if targets is not None else None
        self.gradient = bool(gradient)
        self.loss_fn = loss_fn
        if self.gradient and (loss_fn is None or self.targets is None):
            raise ICSValueError(
                "gradient=True needs `loss_fn` and targets: pass targets=... or a DataLoader "
                "probe of (input, target) pairs"
            )

        def sites(name: str, module: nn.Module) -> str:
            # bound layers need their input too, for the normalized values of U3 / U5
            return "both" if self._snapshots(module) else where

        if sketch is not None and transform is not None:
            raise ICSValueError(
                "`sketch` stores a projection through the capture transform, so it cannot be "
                "combined with `transform`; pass one of them"
            )
        self.recorder = Recorder(
            model,
            layers,
            sites,
            dtype=capture_dtype,
            mode=mode,
            seed=seed,
            device="model",
            axes=axes,
            output_select=output_select,
            transform=transform,
        )
        # the token view's padding mask (ics_toolkit._token), checked against the layers
        mask = _token.resolve_mask(token_mask, self.probe, views, self._dist.exchanges)
        self.config = dataclasses.replace(self.config, token_mask=mask)
        if sketch is not None:
            axes = {t.name: t.axes[0] for t in self.recorder._targets()}
            self.recorder.transform = SketchTransform(sketch, seed, axes)
        self._train_mode = mode
        if self._dist.captures or self._fsdp:  # FSDP2: the check's pass needs every rank
            self._check_probe()

        self.writer = (
            ResultWriter(path, format=format, run=run)
            if path is not None and self._dist.measures
            else None
        )
        self.run = self.writer.run if self.writer is not None else (run or "")
        self._rows: list[dict[str, Any]] = []
        self._frame_cache: Any = None
        self._sink = sinks.as_sink(log_to, with_view=len(views) > 1)  # ics_toolkit.sinks
        self._handles: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._params = [p for p in model.parameters()]
        self.step_count = 0
        self.update_count = 0
        self._current: int | None = None  # step index between before_step and after_step
        self._pending: dict[str, Any] | None = None  # the cached capture at step t

    # ------------------------------------------------------------------ setup checks
    def _check_probe(self) -> None:
        """Run the probe once (side-effect free) so that a probe that does not fit fails now."""
        try:
            table = self.recorder.dry_run(self.probe)
        except ICSError:
            raise
        except Exception as err:
            raise ICSValueError(
                f"the probe does not fit the model: its forward pass raised "
                f"{type(err).__name__}: {err}. Pass probe inputs the model accepts "
                "(a tensor, a tuple of positional arguments or a dict of keyword arguments)"
            ) from err
        missing = table.loc[table["calls"] == 0, "name"].tolist()
        if missing:
            raise ICSValueError(
                f"selected layer(s) {missing} never ran in the forward pass of the probe; "
                "choose other `layers` or check the model's forward"
            )
        axes = {t.name: t.axes for t in self.recorder._targets()}
        _token.check_layers(self.config.token_mask, table, axes)

    # ------------------------------------------------------------------ lifecycle
    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Measure around ``optimizer.step()`` through its step pre/post hooks.

        Attaching to the optimizer it is already attached to only warns. A step the
        optimizer skips entirely (``GradScaler`` on inf/NaN gradients) is invisible
        here; use :meth:`step` / :meth:`before_step` around ``scaler.step`` to record it.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ICSTypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if self._optimizer is optimizer:
            warnings.warn("the monitor is already attached to this optimizer", ICSWarning, 2)
            return
        if self._optimizer is not None:
            raise ICSUsageError(
                "the monitor is already attached to another optimizer; detach() first, or "
                "use monitor.step() around your own steps for several optimizers"
            )
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in owned for p in self._params):
            raise ICSValueError(
                "`optimizer` does not own any parameter of the monitored model; pass the "
                "optimizer that trains this model"
            )
        self._handles = [
            optimizer.register_step_pre_hook(_PreHook(self)),
            optimizer.register_step_post_hook(_PostHook(self)),
        ]
        self._optimizer = optimizer

    def detach(self) -> None:
        """Remove the optimizer hooks (warns if not attached). Results are kept."""
        if self._optimizer is None:
            warnings.warn("detach() called on a monitor that is not attached", ICSWarning, 2)
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._optimizer = None
        self._pending = None
        self._current = None

    @property
    def attached(self) -> bool:
        """Whether the monitor is attached to an optimizer."""
        return self._optimizer is not None

    def before_step(self, step: int | None = None) -> None:
        """Call right before an optimizer step (custom loops; :meth:`attach` does it for you).

        Parameters
        ----------
        step : int, optional
            The step's index; default the monitor's own count (:attr:`step_count`).
        """
        if self._current is not None:
            raise ICSUsageError(
                f"before_step() called twice without after_step() (step {self._current} "
                "is still open)"
            )
        self._current = self.step_count if step is None else int(step)
        if not self.schedule(self._current) or self._dist_broken:
            return
        if not self._dist.captures:
            if self._fsdp:  # FSDP2: the measuring rank's probe pass needs this rank too
                self._follow()
                self._pending = {"follow": True}
            return
        start = time.perf_counter()
        try:
            before = self._capture()
        except Exception as err:
            if not self._dist.exchanges:
                raise
            # the other ranks will wait for this one at the end of the step: take part
            # with a failed status instead of leaving them hanging
            self._warn_failure(f"step {self._current}: the probe pass before the step", err)
            self._pending = {"failed": True}
            return
        # parameter copies: the gradient ICS needs them, and so does the detection of a
        # skipped step with fused optimizers (they may skip inside step() and still bump
        # the version counters); one copy serves both
        params = (
            {n: fsdp.local(p.detach()).clone() for n, p in self.model.named_parameters()}
            if self.gradient or _fused(self._optimizer)
            else None
        )
        self._pending = {
            "capture": before,
            "versions": [p._version for p in self._params],
            "values": None if params is None else list(params.values()),
            "params": params if self.gradient else None,
            "seconds": time.perf_counter() - start,  # this side's share of the step's cost
        }

    def after_step(self) -> None:
        """Call right after the optimizer step opened by :meth:`before_step`."""
        if self._current is None:
            raise ICSUsageError("after_step() called without before_step()")
        step, pending = self._current, self._pending
        self._current, self._pending = None, None
        self.step_count = step + 1
        if pending is None:
            return
        if pending.get("follow"):
            self._follow()
            return
        if self._dist.exchanges:
            self._after_gather(step, pending)
            return
        # FSDP2: the probe pass runs on every rank whatever the step did
        if self._skipped(pending) and not self._fsdp:
            self._record_skip(step, stacklevel=3)
            return
        start = time.perf_counter()
        after = self._capture()
        if self._fsdp and self._skipped(pending):
            self._record_skip(step, stacklevel=3)
            return
        self._measure(step, pending, pending["capture"], after, start)

    def _measure(
        self,
        step: int,
        pending: Mapping[str, Any],
        before: StepCapture,
        after: StepCapture,
        start: float,
    ) -> None:
        keys = [k for k in before.tensors if self._measured(k)]
        rows = measure_step(step, before, after, self.config, keys)
        if self.gradient:
            rows.extend(self._gradient_rows(step, pending["params"]))
        rows.append(  # everything the monitor spent on this step, both probe passes included
            {
                **_event(step, None, "measure_time_s", ""),
                "value": time.perf_counter() - start + pending.get("seconds", 0.0),
                "warning": None,
            }
        )
        self.update_count += 1
        self._emit(rows)

    def abort_step(self, reason: str = "the training step raised") -> None:
        """Drop the open step without measuring it, recording an ``aborted`` event.

        With ``gather=True`` this rank still takes part in the step's exchange (with an
        *aborted* status), so the other ranks are not left waiting for it, and the
        aborted step keeps its index (the next step is the next index, as on the ranks
        whose step went through), so that the ranks' schedules stay aligned.
        """
        if self._current is None:
            return
        step, measured = self._current, self._pending is not None
        self._current, self._pending = None, None
        if self._dist.exchanges:
            self.step_count = step + 1
        if not measured:
            return
        message = f"step {step} not measured: {reason}"
        if self._dist.exchanges:
            message = f"step {step} not measured: rank {self._dist.rank}: {reason}"
            result = self._exchange(step, distributed.ABORTED, None, None)
            if result is None:
                return
            others = _rank_report(result.statuses, exclude=self._dist.rank)
            if others:
                message += f"; {others}"
        if self._dist.measures:
            self._emit([_event(step, None, "aborted", message)])

    @contextlib.contextmanager
    def step(self, step: int | None = None) -> Iterator[None]:
        """Context manager around one optimizer step: ``with monitor.step(): opt.step()``.

        If the block raises, the step is recorded as ``aborted`` and the exception
        propagates unchanged.
        """
        self.before_step(step)
        try:
            yield
        except BaseException as err:
            self.abort_step(f"{type(err).__name__}: {err}")
            raise
        self.after_step()

    # ------------------------------------------------------------------ results
    def results(self) -> Any:
        """The tidy results table (a pandas DataFrame, cached until the next measured step).

        Columns are :data:`ics_toolkit.results.COLUMNS`; pivot with
        :func:`ics_toolkit.to_wide`. Warns when no step has been measured yet.
        """
        if not self._rows and not self._dist.measures:
            warnings.warn(
                f"this is rank {self._dist.rank}; results are kept by the measuring rank "
                f"{self._dist.measuring_rank} only, so results() is empty here",
                ICSWarning,
                stacklevel=2,
            )
        elif not self._rows:
            warnings.warn(
                "no step measured yet; results() is empty (check `every` and attach())",
                ICSWarning,
                stacklevel=2,
            )
        if self._frame_cache is None:
            self._frame_cache = _frame({"run": self.run or None, **r} for r in self._rows)
        return self._frame_cache.copy()

    compute = results

    def memory_per_layer(self) -> Any:
        """Memory the monitor keeps per captured layer, predicted from a dry run.

        One counting-only probe pass (no tensor kept, no side effect; in eval mode so
        that it never synchronizes SyncBatchNorm layers) gives each layer's output
        shape; the sizes follow from ``capture_dtype``, ``sketch``, ``views`` and the
        bounds. Per process: with ``gather=True`` the measuring rank also holds the
        other ranks' shards of the gathered captures (world size times the numbers for
        equal shards).

        Returns
        -------
        pandas.DataFrame
            One row per capture key (module calls after the first assumed to have the
            first call's shape), columns:

            - ``layer``, ``site``, ``device``, ``dtype``;
            - ``shape``: what the layer produced; ``stored_shape``: what is stored
              ((n, k) for a sketched layer); ``dim``: width d of the flatten view;
              ``sketch``: k, or NA when stored unsketched;
            - ``bytes_per_capture``: the stored tensor plus, for BatchNorm /
              Unitization layers with bounds, their normalized values (input shape);
            - ``bytes_held``: twice that, what is held from before the optimizer step
              to the end of the analysis (the capture at t and at t+1);
            - ``bytes_analysis``: the float64 sample matrices of the views built for
              the analysis (both sides), held during it for every layer at once;
            - ``bytes_working``: an estimate of the transient working memory, needed
              one layer at a time: :data:`WORKING_COPIES` float64 copies of the
              layer's largest view matrix (two more for U3 / U5 layers) for the
              estimators, or, if larger, the sketch's chunks in the capture hook
              (:func:`ics_toolkit.sketch.chunk_bytes`);
            - ``bytes_peak``: ``bytes_held + bytes_analysis + bytes_working``.

            All but ``bytes_working`` are exact (tested against the tensors a capture
            holds). For a measured step of the whole model, the peak is about the sum
            of ``bytes_held + bytes_analysis`` over the layers plus the largest
            ``bytes_working``, plus one no-grad forward pass of the probe, plus the
            ``exact`` solver's n x n problem (about 48 n^2 bytes of CPU memory).
            ``benchmarks/scale.py`` prints the prediction beside the measured peak.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> import ics_toolkit as ics
        >>> model = nn.Sequential(nn.Linear(8, 4096), nn.LayerNorm(4096))
        >>> mon = ics.ICSMonitor(model, torch.randn(32, 8), sketch=64)
        >>> mon.memory_per_layer()[["layer", "stored_shape", "bytes_per_capture"]].values.tolist()
        [['1', (32, 64), 8192]]
        """
        import pandas as pd

        quiet = Recorder(self.model, self.recorder.layers, self.recorder.where, mode="eval")
        table = quiet.dry_run(self.probe)
        targets = {t.name: t for t in self.recorder._targets()}
        itemsize = torch.empty((), dtype=self.recorder.dtype).element_size()
        shapes = {(row.name, row.site): tuple(row.shape) for row in table.itertuples()}
        device = str(self._device) if self._device is not None else "cpu"
        rows = []
        for row in table.itertuples():
            for call in range(1, int(row.calls) + 1):
                key = row.name + (f"#{call}" if call > 1 else "")
                key += ":input" if row.site == "input" else ""
                if not self._measured(key):
                    continue
                module = targets[row.name].module
                shape = tuple(row.shape)
                batch = targets[row.name].axes[0] % len(shape)
                n = shape[batch]
                dim = math.prod(shape) // n
                sketched = self.sketch is not None and dim > self.sketch
                stored = (n, self.sketch) if sketched else shape
                stored_bytes = math.prod(stored) * itemsize
                extra = 0
                if row.site == "output" and self._snapshots(module):
                    in_shape = shapes.get((row.name, "input"), shape)
                    extra = math.prod(in_shape) * itemsize  # x_hat, storage dtype
                rows.append(
                    {
                        "layer": key,
                        "site": row.site,
                        "device": device,
                        "dtype": str(self.recorder.dtype).removeprefix("torch."),
                        "shape": shape,
                        "stored_shape": stored,
                        "dim": dim,
                        "sketch": self.sketch if sketched else None,
                        "bytes_per_capture": stored_bytes + extra,
                        "bytes_held": 2 * (stored_bytes + extra),
                    }
                )
                analysis, largest = self._analysis_bytes(
                    stored, 0 if sketched else batch, targets[row.name].axes[1]
                )
                working = (WORKING_COPIES + (2 if extra else 0)) * largest
                if sketched:  # the hook's transient chunks (not at the same time)
                    source = torch.empty((), dtype=self._source_dtype()).element_size()
                    working = max(working, chunk_bytes(n, dim, device, max(source, 4)))
                rows[-1].update(
                    bytes_analysis=analysis,
                    bytes_working=working,
                    bytes_peak=rows[-1]["bytes_held"] + analysis + working,
                )
        frame = pd.DataFrame(rows)
        frame["sketch"] = frame["sketch"].astype("Int64")
        return frame

    def _source_dtype(self) -> torch.dtype:
        return next((p.dtype for p in self.model.parameters()), torch.float32)

    def _analysis_bytes(self, stored: tuple[int, ...], batch: int, channel: int) -> tuple[int, int]:
        """float64 sample matrices of every view of one layer (both sides), and the largest."""
        numel = math.prod(stored)
        n = stored[batch]
        total = largest = 0
        for name in self.config.views:
            if name == "flatten" or len(stored) == 1:
                rows, width = n, numel // n
            else:  # pixel / channel: one row per (input, position), C columns
                width = stored[channel % len(stored)]
                rows = numel // width
            if name == "token" and self.config.token_mask is not None:
                rows = int(self.config.token_mask.sum())  # the real tokens only
            if name in ("pixel", "token"):
                rows = min(rows, self.config.max_pixel_samples)
            total += 2 * rows * width * 8
            largest = max(largest, rows * width * 8)
        return total, largest

    def reset(self) -> None:
        """Forget the rows kept in memory and the step count (files on disk are kept)."""
        self._rows, self._frame_cache = [], None
        self.step_count = self.update_count = 0
        self._current = self._pending = None

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        extra = f", sketch={self.sketch}" if self.sketch is not None else ""
        if self._dist.distributed:
            role = "measures" if self._dist.measures else "silent"
            if self._dist.exchanges:
                role += ", gathers"
            extra += f", rank {self._dist.rank}/{self._dist.world_size} ({role})"
        return (
            f"ICSMonitor({len(self.recorder.names)} layers, methods={list(self.config.methods)}, "
            f"views={list(self.config.views)}{extra}, {state}, steps={self.step_count}, "
            f"measured={self.update_count})"
        )

    # ------------------------------------------------------------------ internals
    def _measured(self, key: str) -> bool:
        is_input = key.endswith(":input")
        return (self.where == "both") or (is_input == (self.where == "input"))

    def _snapshots(self, module: nn.Module) -> bool:
        """Whether the normalized values of ``module`` are recomputed (for U3 / U5)."""
        return (
            self.config.bounds
            and self.sketch is None
            and _bound_layer(module)
            and (self._local_stats or not isinstance(module, nn.SyncBatchNorm))
            and not self._fsdp  # a rank holds only a shard of the affine parameters
        )

    def _capture(self) -> StepCapture:
        tensors = self.recorder.run(self.probe)
        info = self.recorder.info
        norms = {}
        training = self._train_mode == "train"
        for key, inf in info.items():
            if not key.endswith(":input") or not self._snapshots(inf.module):
                continue
            out_key = key[: -len(":input")]
            if self._train_mode == "keep":
                training = inf.module.training
            snap = norm_snapshot(inf.module, tensors[key], training=training)
            if snap is not None:
                norms[out_key] = snap
        for key in [k for k in tensors if k.endswith(":input") and not self._measured(k)]:
            del tensors[key]  # captured only for the normalized values
        sketched = {}
        if self.sketch is not None:
            for key, inf in info.items():
                if key in tensors and inf.shape != inf.source_shape:
                    sketched[key] = math.prod(inf.source_shape) // inf.shape[0]
        return StepCapture(tensors=tensors, info=info, norms=norms, sketched=sketched)

    # ------------------------------------------------------------------ distributed
    def _warn_failure(self, what: str, err: BaseException) -> None:
        warnings.warn(
            f"{what} failed on rank {self._dist.rank} ({type(err).__name__}: {err}); the step "
            "is not measured, training goes on",
            ICSRuntimeWarning,
            stacklevel=4,
        )

    def _exchange(
        self,
        step: int,
        status: int,
        before: StepCapture | None,
        after: StepCapture | None,
    ) -> distributed.Exchange | None:
        """One gather; None (after recording it) when the collectives failed."""
        try:
            return distributed.exchange(
                self._dist, step, status, before, after, device=self._device
            )
        except distributed.CommFailure as err:
            self._dist_broken = True
            message = (
                f"{err}. A rank died or stopped calling the optimizer step; "
                "the monitor stops gathering for the rest of the run"
            )
            warnings.warn(message, ICSRuntimeWarning, stacklevel=4)
            if self._dist.measures:
                self._emit([_event(step, None, "gather_failed", message)])
            return None

    def _after_gather(self, step: int, pending: Mapping[str, Any]) -> None:
        start = time.perf_counter()
        status, after = distributed.OK, None
        if pending.get("failed"):
            status = distributed.FAILED
        elif self._skipped(pending) and not self._fsdp:
            status = distributed.SKIPPED
        else:
            try:
                after = self._capture()
            except Exception as err:
                self._warn_failure(f"step {step}: the probe pass after the step", err)
                status = distributed.FAILED
            if self._fsdp and status == distributed.OK and self._skipped(pending):
                status, after = distributed.SKIPPED, None
        before = pending.get("capture") if status == distributed.OK else None
        result = self._exchange(step, status, before, after)
        del before, after
        if result is None or not self._dist.measures:
            return
        statuses = result.statuses
        if all(s == distributed.SKIPPED for s in statuses):
            self._record_skip(step, stacklevel=4)
            return
        if any(s != distributed.OK for s in statuses):
            message = f"step {step} not measured: {_rank_report(statuses)}"
            self._emit([_event(step, None, "aborted", message)])
            return
        self._measure(step, pending, result.before, result.after, start)

    def _record_skip(self, step: int, stacklevel: int) -> None:
        """A step that changed no parameter: an event row, never a measured shift of zero."""
        msg = (
            f"step {step}: the optimizer step changed no parameter (a GradScaler skip on "
            "inf/NaN gradients, or a gradient-accumulation micro-step); nothing measured"
        )
        warnings.warn(msg, ICSRuntimeWarning, stacklevel=stacklevel)
        self._emit([_event(step, None, "skipped_step", msg)])

    def _skipped(self, pending: Mapping[str, Any]) -> bool:
        values = pending["values"]
        if values is None:
            return [p._version for p in self._params] == pending["versions"]
        # fused optimizers (AdamW(fused=True)) may update without bumping the version
        # counters: with copies at hand, the values decide
        now = [fsdp.local(p.detach()) for p in self._params]  # DTensor: this rank's shard
        return all(torch.equal(v, p) for v, p in zip(values, now, strict=True))

    def _gradient_rows(self, step: int, before: Mapping[str, torch.Tensor]) -> list[dict]:
        from ics_toolkit.gradient_shift import gradient_ics

        start = time.perf_counter()
        try:
            out = gradient_ics(
                self.recorder._runner,
                self.loss_fn,  # type: ignore[arg-type]
                self.probe,
                self.targets,
                {k.removeprefix("module."): v for k, v in before.items()}
                if self.recorder._runner is not self.model
                else before,
                mode=self._train_mode if self._train_mode != "keep" else "train",
                seed=self.config.seed,
            )
        except ICSError as err:
            return [_event(step, None, "gradient_failed", str(err))]
        seconds = (time.perf_counter() - start) / max(len(out), 1)
        rows = []
        for layer, values in out.items():
            for q, v in values.items():
                rows.append(
                    {
                        "step": step,
                        "layer": layer,
                        "view": "param",
                        "quantity": q,
                        "value": v,
                        "kind": "gradient",
                        "wall_time_s": seconds / len(values),
                        "seed": self.config.seed,
                    }
                )
        return rows

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, to save with a training checkpoint.

        Returns
        -------
        dict
            Step count, measured-step count, run id, the rows kept in memory and the
            number of part files written (plain Python values, picklable with
            ``torch.save``). Call between optimizer steps.
        """
        return _resume.state_of(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue a checkpointed run: its schedule, step count, run id and results folder.

        Build the monitor as for the original run (same model, layers and ``path``),
        then load the state before training resumes. The schedule goes on from the
        saved step count, ``results()`` holds the saved rows plus the new ones, and
        new parts are appended to the same folder under the same run id; parts the
        interrupted run wrote after the checkpoint are renamed ``superseded-part-...``
        (its steps are measured again), so :func:`ics_toolkit.load_results` reads
        every step once.

        Parameters
        ----------
        state : dict
            What :meth:`state_dict` returned.
        """
        _resume.load_into(self, state)

    def _follow(self) -> None:
        """FSDP2, on a rank that does not capture: run the probe pass, keep nothing.

        The measuring rank's pass all-gathers the parameters, which needs every rank.
        """
        try:
            self.recorder.dry_run(self.probe)
        except Exception as err:
            self._warn_failure("the probe pass (FSDP2, taking part for the measuring rank)", err)

    def _emit(self, rows: list[dict[str, Any]]) -> None:
        self._rows.extend(rows)
        self._frame_cache = None
        if self.writer is not None:
            self.writer.write(rows)
        if self._sink is not None:
            self._sink(rows)


def _floor_methods(floor: bool | Sequence[str], methods: tuple[str, ...]) -> tuple[str, ...]:
    if floor is True:
        return tuple(m for m in methods if m != "paired")[:1]
    if floor is False or floor is None:
        return ()
    chosen = (floor,) if isinstance(floor, str) else tuple(floor)
    bad = [m for m in chosen if m not in methods or m == "paired"]
    if bad:
        raise ICSValueError(
            f"`floor` names {bad}, which are not among `methods` {list(methods)} or have no "
            "floor (paired needs paired rows); pass True, False or a subset of `methods`"
        )
    return chosen


def _has_sync_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _rank_report(statuses: Sequence[int], exclude: int | None = None) -> str:
    """'rank 1 aborted its step; rank 2 failed to capture' for the ranks not OK."""
    words = {
        distributed.SKIPPED: "skipped its step (no parameter changed)",
        distributed.ABORTED: "aborted its step",
        distributed.FAILED: "failed to capture the probe (see its warning)",
    }
    return "; ".join(
        f"rank {r} {words[s]}"
        for r, s in enumerate(statuses)
        if s != distributed.OK and r != exclude and s in words
    )


def _bound_layer(module: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(module, _BatchNorm) or (
        is_norm(module) and type(module).__name__.startswith("Unitization")
    )


def _fused(optimizer: torch.optim.Optimizer | None) -> bool:
    """Fused / foreach-capable optimizers may skip inside step() (GradScaler's found_inf)."""
    if optimizer is None:
        return True
    return any(g.get("fused") for g in optimizer.param_groups)


class _PreHook:
    """Optimizer step pre-hook: opens the step (a small object, so optimizers stay picklable)."""

    def __init__(self, monitor: ICSMonitor) -> None:
        import weakref

        self._monitor = weakref.ref(monitor)

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        monitor = self._monitor()
        if monitor is None:
            return
        if monitor._current is not None:  # the last step raised between the hooks
            monitor.abort_step("the previous optimizer step raised before finishing")
        monitor.before_step()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._monitor = lambda: None


class _PostHook(_PreHook):
    """Optimizer step post-hook: measures the step."""

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        monitor = self._monitor()
        if monitor is not None and monitor._current is not None:
            monitor.after_step()
