"""PyTorch Lightning: measure ICS in ``Trainer.fit`` with one callback.

Example::

    from lightning.pytorch import Trainer
    from ics_toolkit.integrations.lightning import ICSCallback

    trainer = Trainer(max_steps=1000, callbacks=[ICSCallback(every=50)])
    trainer.fit(module, train_loader)

The callback builds an :class:`~ics_toolkit.ICSMonitor` on the ``LightningModule``
when training starts and attaches it to the (first) optimizer, so every optimizer
step Lightning takes (after gradient accumulation, in automatic or manual
optimization) is a step of the monitor. The probe is given, or drawn once from the
training dataloader's dataset with a private seeded generator (``probe_size``
samples; the inputs of ``(input, target)`` samples, dict samples without their label
keys), and runs through ``module(probe)``. Results are written to
``<trainer.log_dir>/ics`` (read them with :func:`ics_toolkit.load_results`) and every
number is sent to the trainer's loggers (``logger.log_metrics``, names
``ics/<layer>/<quantity>``, step = the optimizer step t of the update t -> t+1). The
monitor's state is saved in Lightning checkpoints, so ``trainer.fit(...,
ckpt_path=...)`` continues its schedule, run id and results folder.

Requires ``pip install "ics-toolkit[lightning]"`` (the ``lightning`` package).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback

from ics_toolkit.errors import ICSUsageError
from ics_toolkit.integrations._common import check_options, draw_probe, to_device

__all__ = ["ICSCallback"]


class ICSCallback(Callback):
    """A Lightning callback that measures internal covariate shift during ``fit``.

    Parameters
    ----------
    probe : Tensor, tuple or dict, optional
        The fixed probe inputs (moved to the module's device). Default: ``probe_size``
        samples drawn from the training dataloader's dataset.
    path : str, "auto" or None
        Folder of the result parts: ``"auto"`` (default) is ``<trainer.log_dir>/ics``;
        None keeps results in memory only (:meth:`results`).
    log : bool
        Send the numbers to the trainer's loggers.
    **options
        Any option of :class:`~ics_toolkit.ICSMonitor` (``layers``, ``every``,
        ``methods``, ``views``, ``probe_size``, ``seed``, ``log_to``, ...); unknown
        names raise :class:`~ics_toolkit.errors.ICSTypeError` here.

    Attributes
    ----------
    monitor : ICSMonitor or None
        The monitor, once training has started.
    """

    def __init__(
        self, probe: Any = None, *, path: str | None = "auto", log: bool = True, **options
    ):
        self.options = check_options(options, "ICSCallback")
        self.probe = probe
        self.path = path
        self.log = bool(log)
        self.monitor: Any = None
        self._state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the monitor (once) and attach it to the first optimizer."""
        if not trainer.optimizers:
            raise ICSUsageError(
                "ICSCallback: the trainer has no optimizer to measure steps of; return one "
                "from configure_optimizers"
            )
        log_dir = trainer.log_dir  # a collective under DDP: every rank asks
        if self.monitor is None:
            self.monitor = self._build(trainer, pl_module, log_dir)
            if self._state is not None:
                self.monitor.load_state_dict(self._state)
            else:
                self.monitor.step_count = int(trainer.global_step)
        self.monitor.attach(trainer.optimizers[0])

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Detach the monitor (its results are kept)."""
        if self.monitor is not None and self.monitor.attached:
            self.monitor.detach()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Detach when training stops on an exception."""
        self.on_train_end(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, saved in Lightning checkpoints."""
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._state or {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the monitor's state from a checkpoint (before training resumes)."""
        self._state = dict(state_dict) if state_dict else None
        if self.monitor is not None and self._state is not None:
            self.monitor.load_state_dict(self._state)

    # ------------------------------------------------------------------ results
    def results(self) -> Any:
        """The monitor's tidy results table (see :meth:`ics_toolkit.ICSMonitor.results`)."""
        if self.monitor is None:
            raise ICSUsageError("ICSCallback.results(): training has not started yet")
        return self.monitor.results()

    # ------------------------------------------------------------------ internals
    def _build(self, trainer: Any, pl_module: Any, log_dir: str | None) -> Any:
        from ics_toolkit.monitor import ICSMonitor

        options = dict(self.options)
        device = pl_module.device
        probe, targets = self.probe, options.pop("targets", None)
        if probe is None:
            loader = trainer.train_dataloader
            if isinstance(loader, list | tuple | Mapping):
                loader = next(iter(loader.values() if isinstance(loader, Mapping) else loader))
            probe, drawn = draw_probe(
                loader, options.get("probe_size", 256), options.get("seed", 0)
            )
            targets = drawn if targets is None else targets
        probe = to_device(probe, device)
        if targets is not None:
            options["targets"] = to_device(targets, device)
        path = self.path
        if path == "auto":
            path = os.path.join(log_dir or trainer.default_root_dir, "ics")
        sinks = options.pop("log_to", None)
        sinks = [] if sinks is None else list(sinks) if isinstance(sinks, list | tuple) else [sinks]
        if self.log and trainer.loggers:
            sinks.append(_LoggerSink(trainer.loggers))
        return ICSMonitor(pl_module, probe, path=path, log_to=sinks or None, **options)


class _LoggerSink:
    """Send a measured step's scalars to Lightning loggers."""

    def __init__(self, loggers: list[Any]) -> None:
        self.loggers = list(loggers)

    def __call__(self, step: int, values: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.log_metrics(values, step=step)

    def __repr__(self) -> str:
        return f"LightningLoggers({[type(lg).__name__ for lg in self.loggers]})"
