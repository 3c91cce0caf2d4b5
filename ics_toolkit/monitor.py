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
    monitor.detach()                 # or: with monitor.attach(optimizer): ...

or, for custom loops (gradient accumulation, closures, several optimizers)::

    with monitor.step():             # or monitor.before_step() ... monitor.after_step()
        optimizer.step()

Measuring never changes the run: probe passes run without autograd, restore every
buffer, train/eval flag and RNG state (``ics_toolkit.recording``), and unscheduled
steps cost one counter increment and one schedule call. A failure of the monitor's
own work never breaks training either (``on_error``, ``ics_toolkit._failsafe``).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ics_toolkit import (
    _checks,
    _exchange,
    _failsafe,
    _inputs,
    _probe,
    _resume,
    _token,
    _vocab,
    distributed,
    fsdp,
    sinks,
)
from ics_toolkit._gradient_rows import gradient_rows
from ics_toolkit._layerwise import measure_layerwise
from ics_toolkit._memory import WORKING_COPIES, memory_plan
from ics_toolkit._norm_snapshot import ChainTransform, HatTransform, bound_layer
from ics_toolkit._pot import import_ot
from ics_toolkit._reuse import read_state
from ics_toolkit._worker import AnalysisWorker
from ics_toolkit.bounding import RTOL
from ics_toolkit.errors import (
    ICSRuntimeWarning,
    ICSTypeError,
    ICSUsageError,
    ICSValueError,
    ICSWarning,
)
from ics_toolkit.memory_plan import DEFAULT_BUDGET, MemoryPlan, check_budget, make_plan
from ics_toolkit.recording import Recorder
from ics_toolkit.results import ResultStore
from ics_toolkit.schedules import as_schedule
from ics_toolkit.shift import MeasureConfig, StepCapture, _event, measure_step
from ics_toolkit.sketch import SketchTransform

__all__ = ["WORKING_COPIES", "ICSMonitor"]

Probe = Any  # Tensor | tuple | dict | torch.utils.data.DataLoader


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
        Evaluate the theory's bounds (L1-L3, U1, U2 always; U3 and U3_tight for
        BatchNorm, U5 (and U4 at alpha = 1) for Unitization layers, on the normalized
        values they produced with their affine parameters and alpha at both steps) and
        check their order.
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
        Storage dtype of captured activations (the analysis runs in ``precision``). Its
        rounding, with that of the dtype the layer produced, sets each measured layer's
        ``resolution`` row: W1 values at or below it are flagged ``below_resolution``
        (about 0.4 % of the outputs' mean norm, per step side, in bfloat16; docs/theory.md
        section 5.1).
    precision : {"float32", "float64"}
        Dtype of the analysis. ``"float32"`` (default) analyses float32 captures as
        stored, about twice as fast: every estimate, floor, bound and interval is within
        a relative 1e-4 of the float64 value (:data:`ics_toolkit._vocab.FLOAT32_ERROR`,
        tested; U3 within 1e-3, L2 and drift_norm_var within 1e-4 of the layer's scale;
        measured at most 9.3e-6, U3 5.8e-4: ``python benchmarks/precision.py``), the
        ``exact`` solver runs in float64 on the float32 cost matrix, and the bounds are
        checked with ``max(rtol, 1e-5)``.
        ``"float64"`` is the reference (the main job ``ics-toolkit run`` uses it).
    rtol : float
        Tolerance of the bound checks (:data:`ics_toolkit.bounding.RTOL`).
    method_options : dict, optional
        Extra options per method, e.g. ``{"sinkhorn": {"rtol": 1e-3}}``.
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
    memory_budget : float, int or None
        The memory a measured step may use: a share of the memory available at
        construction where the captures live (host RAM; a GPU's free memory), default
        0.5, or a number of bytes (an int). At construction the monitor predicts the
        peak of a measured step from the dry run (:meth:`memory_plan`); if it exceeds
        the budget, the monitor adapts by itself (one layer's analysis at a time, host
        offload of the captures on a GPU, a sketch of k = 256 of the widest layers,
        :mod:`ics_toolkit.memory_plan`) and says once, in an
        :class:`~ics_toolkit.errors.ICSWarning`, what it chose for which layers; if
        nothing fits it raises :class:`~ics_toolkit.errors.ICSMemoryError` with the
        numbers and the options. None: no plan, nothing adapted.
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
    on_error : {"warn", "raise"}
        What a failure of the monitor's own work (the schedule, a probe pass, the
        analysis, the gradient ICS, writing results) does. ``"warn"`` (default): it
        never breaks or changes training. The model, its buffers and flags and every
        RNG are left as they were, the optimizer step runs exactly once, the step is
        not measured and an event row (``quantity="error"``, the message in
        ``warning``, the count of that kind of failure in ``value``) is recorded (for
        the first 100 failures of a kind, then every 100th); an
        :class:`~ics_toolkit.errors.ICSRuntimeWarning` is issued the first time a kind
        of failure occurs, later ones are only counted (:attr:`errors`, ``repr``).
        ``"raise"``: the exception propagates (for debugging). ``KeyboardInterrupt``
        and ``SystemExit`` always propagate, after the state is restored. Arguments
        are checked at construction (the probe is run once, and with
        ``gradient=True`` so is ``loss_fn`` on it), so misuse fails before training.
    reuse_probe : bool
        When steps t and t+1 are both measured, reuse the probe pass after step t as
        the one before step t+1 if nothing it reads changed in between (parameter and
        buffer version counters; see :mod:`ics_toolkit._reuse`): one probe pass less
        per consecutive measured step, the same numbers.
    worker : bool, optional
        Run the analysis of a measured step on a background thread while training
        goes on (:mod:`ics_toolkit._worker`); its rows appear at the next measured
        step, :meth:`results` or :meth:`detach`. Default (None): on when the model is
        on a CUDA device, off otherwise. The trajectory is the same to the bit; the
        captures of the step being analysed are held until its analysis ends (at most
        one more capture than without a worker, which the memory plan counts: a
        measured step that needs a fresh "before" pass waits for the running analysis).
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
    but one runs there:
    the views, the moments, ``paired``, ``sliced``, ``max_sliced``,
    ``per_coordinate``, ``sinkhorn`` (a torch kernel), the floors of these, the bounds
    and the sketch. ``exact`` builds its cost matrix on the device and hands it to
    POT's CPU solver. Only that matrix and the final numbers (Python floats in the
    results table) reach the CPU. Under ``torch.autocast`` the probe passes run as
    the training forward does (e.g. bfloat16 activations), are stored in
    ``capture_dtype`` and analysed in float64 with autocast disabled.

    *Lifetime.* :meth:`attach` returns the monitor, and the optimizer's hooks hold
    it: ``ICSMonitor(model, probe, path=...).attach(optimizer)`` keeps measuring
    without a reference, until :meth:`detach`; ``with monitor.attach(optimizer):``
    detaches on leaving the block.

    Attributes
    ----------
    step_count : int
        Optimizer steps seen so far (the index the next step gets).
    update_count : int
        Steps measured so far.
    errors : dict of str to int
        Failures of the monitor caught so far, per kind (``on_error="warn"``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import ics_toolkit as ics
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> monitor = ics.ICSMonitor(model, torch.randn(32, 4), every=2)
    >>> with monitor.attach(opt):  # or monitor.attach(opt) ... monitor.detach()
    ...     for _ in range(4):
    ...         opt.zero_grad()
    ...         model(torch.randn(16, 4)).square().mean().backward()
    ...         opt.step()
    >>> df = monitor.results()
    >>> sorted(df.step.unique().tolist()), bool(df.bounds_hold.all())
    ([0, 2], True)
    >>> monitor.attached, monitor.errors
    (False, {})
    """

    def __init__(
        self,
        model: nn.Module,
        probe: Probe,
        *,
        layers: Any = "norm",
        every: int | Iterable[int] | Callable[[int], bool] | str = 10,
        methods: Sequence[str] = _vocab.DEFAULT_METHODS,
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
        precision: str = "float32",
        rtol: float = RTOL,
        method_options: Mapping[str, Mapping[str, Any]] | None = None,
        sketch: int | None = None,
        memory_budget: float | int | None = DEFAULT_BUDGET,
        rank: int = 0,
        gather: bool = False,
        group: Any = None,
        gather_timeout: float = 300.0,
        on_error: str = "warn",
        reuse_probe: bool = True,
        worker: bool | None = None,
        log_to: Any = None,
        axes: Mapping[str, tuple[int, int]] | None = None,
        output_select: Any = None,
        transform: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
        token_mask: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ICSTypeError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        # --- fail-safe (ics_toolkit._failsafe / _inputs): checks and the guard's state
        self._failures = _failsafe.Failures(on_error)
        self._hook_step = False  # the open step was opened by the optimizer pre-hook
        _inputs.check_arguments(
            probe=probe, every=every, loss_fn=loss_fn, run=run, capture_dtype=capture_dtype
        )
        # --- end fail-safe
        self.model = model
        self.schedule = as_schedule(every)
        # the boundary: every option is checked here, once (MeasureConfig checks its own)
        self.config = MeasureConfig(
            methods=methods,
            views=views,
            floor=floor,
            bounds=bounds,
            moments=moments,
            n_projections=n_projections,
            seed=seed,
            max_pixel_samples=max_pixel_samples,
            rtol=rtol,
            method_options=method_options or {},
            precision=precision,
        )
        methods, views = self.config.methods, self.config.views
        if {"exact", "sinkhorn"} & set(methods):
            # once, here: importing POT (and the scikit-learn it loads) takes ~1.5 s, which
            # would otherwise land inside the first measured optimizer step
            import_ot()
        where = _checks.choice(where, "where", _vocab.WHERE)
        probe_size = _checks.positive_int(probe_size, "probe_size")
        if sketch is not None:
            _checks.positive_int(
                sketch, "sketch", allow_none=True, hint=" (the sketch dimension k)"
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
        self.where = where

        device = next((p.device for p in model.parameters()), None)
        self._device = device
        if isinstance(probe, torch.utils.data.DataLoader):
            probe, loader_targets = _probe.draw_probe(probe, probe_size, seed)
            probe = _probe.to_device(probe, device)
            targets = loader_targets if targets is None else targets
        self.probe = probe
        self.targets = _probe.to_device(targets, device) if targets is not None else None
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
            axes = {name: axes[0] for name, _, axes in self.recorder.selected()}
            self.recorder.transform = SketchTransform(sketch, seed, axes)
        elif (
            transform is None and where == "output" and self.config.bounds
        ):  # inputs kept only for x_hat
            modules = {name: module for name, module, _ in self.recorder.selected()}
            fast = self.config.precision == "float32"  # the fused kernel's rounding
            self.recorder.transform = HatTransform(modules, mode, capture_dtype, fast)
        self._train_mode = mode
        if worker is None:
            worker = device is not None and device.type == "cuda"
        # the plan counts the capture a worker's analysis still holds (see make_plan)
        self._uses_worker = _checks.boolean(worker, "worker")
        # --- memory plan (ics_toolkit.memory_plan): made from the probe check's dry run
        memory_budget = check_budget(memory_budget)
        self._plan: MemoryPlan | None = None
        self._plan_modules: set[int] = set()  # ids of the modules the plan sketched
        if self._dist.captures or self._fsdp:  # FSDP2: the check's pass needs every rank
            table = _probe.check_probe(self.recorder, self.probe)
            axes = {name: axes for name, _, axes in self.recorder.selected()}
            _token.check_layers(self.config.token_mask, table, axes)
            if self._dist.captures:
                self._plan = make_plan(self, table, memory_budget)
                self._apply_plan(self._plan)
        # --- end memory plan
        _inputs.check_probe_values(self.probe)  # fail-safe: a finite probe
        if self.gradient:  # fail-safe: loss_fn and targets tried once, side-effect free
            _inputs.check_loss(
                self.recorder.runner,
                self.probe,
                self.targets,
                loss_fn,
                mode if mode != "keep" else "train",
                seed,
            )

        self._store = ResultStore(path if self._dist.measures else None, format=format, run=run)
        self.run = self._store.run
        self._sink = sinks.as_sink(log_to, with_view=len(views) > 1)  # ics_toolkit.sinks
        self._handles: list[Any] = []
        self._optimizer: torch.optim.Optimizer | None = None
        self._params = [p for p in model.parameters()]
        self.step_count = 0
        self.update_count = 0
        self._current: int | None = None  # step index between before_step and after_step
        self._pending: dict[str, Any] | None = None  # the cached capture at step t
        self._reuse_probe = _checks.boolean(reuse_probe, "reuse_probe")
        self._carry: tuple[int, StepCapture, Any] | None = None  # capture after step t
        self._worker = AnalysisWorker() if self._uses_worker else None
        if self._worker is not None:  # the end of the run hands back what is still queued
            atexit.register(_flush_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ lifecycle
    def attach(self, optimizer: torch.optim.Optimizer) -> ICSMonitor:
        """Measure around ``optimizer.step()`` through its step pre/post hooks.

        The hooks hold the monitor: an attached monitor lives until :meth:`detach`,
        also when no reference to it is kept. The optimizer stays picklable and
        deep-copyable (the hooks pickle to inert copies). Attaching to the optimizer it
        is already attached to only warns. A step the optimizer skips entirely
        (``GradScaler`` on inf/NaN gradients) is invisible here; use :meth:`step` /
        :meth:`before_step` around ``scaler.step`` to record it (the hooks then defer
        to that step: it is measured once).

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
            The optimizer that trains the monitored model.

        Returns
        -------
        ICSMonitor
            The monitor itself, so that ``with monitor.attach(optimizer): ...``
            detaches on leaving the block; a plain ``monitor.attach(optimizer)`` call
            stays attached until :meth:`detach`.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ICSTypeError(
                f"`optimizer` must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if self._optimizer is optimizer:
            warnings.warn("the monitor is already attached to this optimizer", ICSWarning, 2)
            return self
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
            optimizer.register_step_pre_hook(_failsafe.PreHook(self)),
            optimizer.register_step_post_hook(_failsafe.PostHook(self)),
        ]
        self._optimizer = optimizer
        return self

    def __enter__(self) -> ICSMonitor:
        """``with monitor.attach(optimizer):`` (the monitor itself)."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Detach on leaving the block (if attached); exceptions propagate."""
        if self.attached:
            self.detach()

    @property
    def errors(self) -> dict[str, int]:
        """Failures of the monitor caught so far (``on_error="warn"``), per kind.

        A kind is where the failure happened and the exception type, e.g. ``"a probe
        pass: RuntimeError"``; each failure is also an ``error`` row of the results.
        """
        return dict(self._failures.counts)

    @property
    def on_error(self) -> str:
        """What a failure of the monitor's own work does: ``"warn"`` or ``"raise"``."""
        return self._failures.on_error

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
        self._carry = None
        self._flush()

    @property
    def attached(self) -> bool:
        """Whether the monitor is attached to an optimizer."""
        return self._optimizer is not None

    @_failsafe.guard_before_step
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
        carry, self._carry = self._carry, None
        try:
            if carry is not None and carry[0] == self._current and carry[2] == self._read_state():
                before = carry[1]  # the probe pass after the last step: nothing changed since
            else:
                # a worker's analysis still holds its two captures: let it finish before two
                # new ones are stored, so at most three are alive (what the memory plan counts)
                self._flush()
                before = self._capture()
        except Exception as err:
            if not self._dist.exchanges:
                raise
            # the other ranks will wait for this one at the end of the step: take part
            # with a failed status instead of leaving them hanging
            _exchange.warn_failure(
                self, f"step {self._current}: the probe pass before the step", err
            )
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

    @_failsafe.guard_after_step
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
            _exchange.after_gather(self, step, pending)
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
        if self._reuse_probe and self._will_measure(step + 1):
            self._carry = (step + 1, after, self._read_state())
        self._measure(step, pending, pending["capture"], after, start)

    def _will_measure(self, step: int) -> bool:
        """Whether ``step`` is scheduled; a schedule that raises is reported when it opens."""
        try:
            return bool(self.schedule(step))
        except Exception:
            return False  # no reuse; before_step(step) calls it again and records the failure

    def _measure(
        self,
        step: int,
        pending: Mapping[str, Any],
        before: StepCapture,
        after: StepCapture,
        start: float,
    ) -> None:
        keys = [k for k in before.tensors if self._measured(k)]
        rows: list[dict[str, Any]] = []
        if self.gradient:  # a forward-backward of the model: here, between the steps
            rows = gradient_rows(
                step,
                self.model,
                self.recorder.runner,
                self.loss_fn,  # type: ignore[arg-type]
                self.probe,
                self.targets,
                pending["params"],
                mode=self._train_mode,
                seed=self.config.seed,
            )
        spent = time.perf_counter() - start + pending.get("seconds", 0.0)

        def analyse() -> list[dict[str, Any]]:
            begin = time.perf_counter()
            plan = self._plan
            if plan is not None and plan.layerwise:  # memory plan: one float64 set at a time
                device = self._device if plan.offload else None
                out = measure_layerwise(step, before, after, self.config, keys, device) + rows
            else:
                out = measure_step(step, before, after, self.config, keys) + rows
            out.append(  # what the monitor spent on this step, both probe passes included
                {
                    **_event(step, None, "measure_time_s", ""),
                    "value": spent + time.perf_counter() - begin,
                    "warning": None,
                }
            )
            return out

        if self._worker is None:
            try:
                result = analyse()
            except Exception as err:
                self._failed(step, "analysis", err)
                return
            self.update_count += 1
            self._emit(result)
            return
        self.update_count += 1
        self._flush()  # the previous analysis first: rows stay in step order
        self._worker.submit(step, analyse)

    def _flush(self) -> None:
        """Hand back the worker's finished analyses, in step order (waits for them)."""
        if self._worker is None or not self._worker.pending:
            return

        def handle(step: int, rows: Any, error: BaseException | None) -> None:
            if error is not None:
                self._failed(step, "analysis", error)
            else:
                self._emit(rows)

        self._worker.drain(handle)

    def _failed(self, step: int, stage: str, err: BaseException) -> None:
        """Every error of a measured step's analysis comes here, inline or from the worker.

        ``stage`` names the part that failed (``"analysis"``). ``on_error="raise"``
        re-raises; ``"warn"`` records an ``error`` row and warns once per kind
        (:mod:`ics_toolkit._failsafe`); the step is then not measured.
        """
        if not isinstance(err, Exception) or self._failures.on_error == "raise":
            raise err
        self._failures.handle(self, err, step, f"in the {stage}")

    @_failsafe.guard_abort_step
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
            result = _exchange.exchange(self, step, distributed.ABORTED, None, None)
            if result is None:
                return
            others = _exchange.rank_report(result.statuses, exclude=self._dist.rank)
            if others:
                message += f"; {others}"
        if self._dist.measures:
            self._emit([_event(step, None, "aborted", message)])

    @contextlib.contextmanager
    def step(self, step: int | None = None) -> Iterator[None]:
        """Context manager around one optimizer step: ``with monitor.step(): opt.step()``.

        If the block raises, the step is recorded as ``aborted`` and the exception
        propagates unchanged. With :meth:`attach` too, the optimizer hooks defer to
        this step (``with monitor.step(): scaler.step(optimizer)`` is measured once).
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
        self._flush()
        if not self._store and not self._dist.measures:
            warnings.warn(
                f"this is rank {self._dist.rank}; results are kept by the measuring rank "
                f"{self._dist.measuring_rank} only, so results() is empty here",
                ICSWarning,
                stacklevel=2,
            )
        elif not self._store:
            warnings.warn(
                "no step measured yet; results() is empty (check `every` and attach())",
                ICSWarning,
                stacklevel=2,
            )
        return self._store.frame()

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
            - ``bytes_cache``: the numbers the analysis computes from one capture
              alone and keeps with it, so that a capture reused as the next step's
              "before" (``reuse_probe``) is not analysed twice: per view of r rows
              and w columns, in the analysis dtype, the row norms (r), the sorted
              projections of sliced / max_sliced (``n_projections`` x r) and the
              column moments of the drift (3 w);
            - ``bytes_held``: twice the sum of those two, what is held from before the
              optimizer step to the end of the analysis (the capture at t and at t+1);
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
        return memory_plan(self)

    def memory_plan(self) -> MemoryPlan:
        """The memory plan made at construction: peak bytes per layer against the budget.

        Returns
        -------
        MemoryPlan
            ``table`` (one row per measured capture key: the columns of
            :meth:`memory_per_layer` under the plan's choices, plus
            ``sketched_by_plan``), ``available`` and ``budget`` (bytes, where the
            captures live), ``peak`` (the predicted peak of a measured step under the
            plan) and ``peak_unplanned`` (without adapting), and what was chosen:
            ``layerwise``, ``offload``, ``sketch`` and ``sketched`` (layer names);
            ``summary()`` says it in words. See :mod:`ics_toolkit.memory_plan`.

        Raises
        ------
        ICSUsageError
            On a rank that captures nothing (it holds no capture, so it has no plan).

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> import ics_toolkit as ics
        >>> model = nn.Sequential(nn.Linear(8, 4096), nn.LayerNorm(4096))
        >>> plan = ics.ICSMonitor(model, torch.randn(32, 8)).memory_plan()
        >>> plan.fits, plan.adapted, plan.table.layer.tolist()
        (True, False, ['1'])
        """
        if self._plan is None:
            raise ICSUsageError(
                "this rank captures nothing, so it has no memory plan; ask the measuring rank"
            )
        return self._plan

    def reset(self) -> None:
        """Forget the rows kept in memory and the step count (files on disk are kept)."""
        self._flush()
        self._store.clear()
        self.step_count = self.update_count = 0
        self._current = self._pending = self._carry = None

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        extra = f", sketch={self.sketch}" if self.sketch is not None else ""
        if self._dist.distributed:
            role = "measures" if self._dist.measures else "silent"
            if self._dist.exchanges:
                role += ", gathers"
            extra += f", rank {self._dist.rank}/{self._dist.world_size} ({role})"
        if self._failures.total:
            extra += f", errors={self._failures.total}"
        return (
            f"ICSMonitor({len(self.recorder.names)} layers, methods={list(self.config.methods)}, "
            f"views={list(self.config.views)}{extra}, {state}, steps={self.step_count}, "
            f"measured={self.update_count})"
        )

    # ------------------------------------------------------------------ internals
    def _measured(self, key: str) -> bool:
        is_input = key.endswith(":input")
        return (self.where == "both") or (is_input == (self.where == "input"))

    def _read_state(self) -> Any:
        return read_state(self.model, self._train_mode)

    def _snapshots(self, module: nn.Module) -> bool:
        """Whether the normalized values of ``module`` are recomputed (for U3 / U5)."""
        return (
            self.sketch is None
            and id(module) not in getattr(self, "_plan_modules", ())
            and self._bound_snapshot(module)
        )

    def _bound_snapshot(self, module: nn.Module) -> bool:
        """Whether ``module`` would get U3 / U5 if it were stored unsketched."""
        return (
            self.config.bounds
            and bound_layer(module)
            and (self._local_stats or not isinstance(module, nn.SyncBatchNorm))
            and not self._fsdp  # a rank holds only a shard of the affine parameters
        )

    # ------------------------------------------------------------------ memory plan
    def _sketch_of(self, name: str) -> int | None:
        """The sketch dimension of layer ``name`` (user's ``sketch``, or the plan's)."""
        if self.sketch is not None:
            return self.sketch
        plan = getattr(self, "_plan", None)
        return plan.sketch if plan is not None and name in plan.sketched else None

    def _apply_plan(self, plan: MemoryPlan) -> None:
        """Put the plan's choices in place (sketch transform, host offload) and say them."""
        if plan.sketched:
            axes = {name: axes[0] for name, _, axes in self.recorder.selected()}
            sketch = SketchTransform(plan.sketch, self.config.seed, axes, layers=plan.sketched)
            hat = self.recorder.transform  # the normalized values taken in the hook, if any
            self.recorder.transform = sketch if hat is None else ChainTransform(hat, sketch)
            self._plan_modules = {
                id(module) for name, module, _ in self.recorder.selected() if name in plan.sketched
            }
        if plan.offload:
            self.recorder.device = torch.device("cpu")
            self.recorder.pin_memory = True  # page-locked: the copies both ways run faster
        if plan.adapted:
            warnings.warn(plan.summary(), ICSWarning, stacklevel=_failsafe.user_stacklevel())

    def _capture(self) -> StepCapture:
        """One probe pass with the norm snapshots (:func:`ics_toolkit._probe.capture`)."""
        return _probe.capture(
            self.recorder,
            self.probe,
            mode=self._train_mode,
            snapshots=self._snapshots,
            measured=self._measured,
            sketch=self.sketch if self.sketch is not None else (self._plan and self._plan.sketch),
        )

    # ------------------------------------------------------------------ skipped steps
    def _record_skip(self, step: int, stacklevel: int) -> None:
        """A step that changed no parameter: an event row, never a measured shift of zero."""
        msg = (
            f"step {step}: the optimizer step changed no parameter (a GradScaler skip on "
            "inf/NaN gradients, or a gradient-accumulation micro-step); nothing measured"
        )
        warnings.warn(msg, ICSRuntimeWarning, stacklevel=_failsafe.user_stacklevel())
        self._emit([_event(step, None, "skipped_step", msg)])

    def _skipped(self, pending: Mapping[str, Any]) -> bool:
        values = pending["values"]
        if values is None:
            return [p._version for p in self._params] == pending["versions"]
        # fused optimizers (AdamW(fused=True)) may update without bumping the version
        # counters: with copies at hand, the values decide
        now = [fsdp.local(p.detach()) for p in self._params]  # DTensor: this rank's shard
        return all(torch.equal(v, p) for v, p in zip(values, now, strict=True))

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
            _exchange.warn_failure(
                self, "the probe pass (FSDP2, taking part for the measuring rank)", err
            )

    def _emit(self, rows: list[dict[str, Any]]) -> None:
        self._store.append(rows)
        if self._sink is not None:
            self._sink(rows)


def _flush_at_exit(ref: Callable[[], ICSMonitor | None]) -> None:
    monitor = ref()
    if monitor is not None and monitor._worker is not None:
        monitor._flush()


def _has_sync_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


def _fused(optimizer: torch.optim.Optimizer | None) -> bool:
    """Fused / foreach-capable optimizers may skip inside step() (GradScaler's found_inf)."""
    if optimizer is None:
        return True
    return any(g.get("fused") for g in optimizer.param_groups)
