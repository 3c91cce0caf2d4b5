"""The monitor's fail-safe: a failure of the monitor never breaks or changes training.

The monitor runs its own code (the schedule, probe passes, the analysis, the gradient
ICS, writing results) inside the user's ``optimizer.step()``. With
``on_error="warn"`` (the default) the lifecycle entry points (:meth:`before_step`,
:meth:`after_step`, :meth:`abort_step`, hence the optimizer hooks and
``monitor.step()``) are wrapped by the guards below, which on an ``Exception``:

- leave the model and the process as they were: probe passes restore buffers, flags
  and RNGs themselves (:func:`ics_toolkit._state.preserved`, also on exceptions), and
  the guard of :meth:`after_step` puts back the global RNG states it saved before a
  measured step's work;
- close the open step consistently (the step is counted once, not measured), so the
  optimizer step itself runs exactly once, whatever failed before or after it;
- record an event row (``quantity="error"``, ``kind="event"``, the message in
  ``warning``, the running count of that kind of failure in ``value``) for each of
  the first :data:`ROW_LIMIT` failures of a kind, then for every :data:`ROW_EVERY`-th;
- warn with :class:`~ics_toolkit.errors.ICSRuntimeWarning` the first time a kind of
  failure (where it happened and the exception type) occurs, then only count it
  (``ICSMonitor.errors``, shown by ``repr``).

``on_error="raise"`` re-raises instead (after the same restoring), for debugging.
``KeyboardInterrupt``, ``SystemExit`` and other non-``Exception`` exceptions always
propagate, after the RNGs are restored and the open step is dropped.

The optimizer hooks live here too: they hold the monitor strongly (an attached
monitor stays alive until ``detach()``), pickle to inert copies (so optimizers stay
picklable and deep-copyable), and defer to a step the user opened explicitly
(``with monitor.step(): scaler.step(optimizer)`` with ``attach()``: one measurement,
by the outer step).
"""

from __future__ import annotations

import functools
import os
import random
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType
from typing import Any

import numpy as np
import torch

from ics_toolkit._state import RNGState, seed_torch
from ics_toolkit.errors import ICSRuntimeWarning, ICSTypeError, ICSValueError
from ics_toolkit.shift import _event

__all__ = [
    "ON_ERROR",
    "Failures",
    "PostHook",
    "PreHook",
    "check_on_error",
    "guard_abort_step",
    "guard_after_step",
    "guard_before_step",
    "isolated_rng",
    "user_stacklevel",
]

#: The values of ``ICSMonitor(on_error=...)``.
ON_ERROR: tuple[str, ...] = ("warn", "raise")

#: ``error`` rows kept per kind of failure before only every ``ROW_EVERY``-th is: a
#: schedule that raises at every step of a long run must not fill the memory.
ROW_LIMIT = 100
ROW_EVERY = 100

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_SKIPPED_FILES = (
    _PACKAGE,
    os.path.dirname(torch.optim.__file__),
    os.path.dirname(torch.amp.__file__),
)


def check_on_error(value: object) -> str:
    """Validate ``on_error``."""
    if value not in ON_ERROR:
        raise ICSValueError(
            f"`on_error` must be 'warn' (a failure of the monitor is recorded and training "
            f"goes on) or 'raise' (it propagates, for debugging), got {value!r}"
        )
    return str(value)


# --------------------------------------------------------------------------- isolation
@contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with every global RNG seeded from ``seed``, and put them back after.

    For code that draws from the global streams and cannot be given a generator (a
    dataset's random transforms while the probe is drawn): the block is reproducible
    (same ``seed``, same draws) and the caller's torch, numpy and Python random
    states are bitwise as before, also when the block raises.
    """
    saved = RNGState.capture()
    try:
        seed_torch(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002
        yield
    finally:
        saved.restore()


# --------------------------------------------------------------------------- failures
class Failures:
    """What the guard caught: a count per kind of failure, and which kinds were warned.

    Parameters
    ----------
    on_error : {"warn", "raise"}
        What a failure does (see the module docstring).
    """

    def __init__(self, on_error: str) -> None:
        self.on_error = check_on_error(on_error)
        self.counts: dict[str, int] = {}

    @property
    def total(self) -> int:
        """Failures caught so far."""
        return sum(self.counts.values())

    def handle(self, monitor: Any, err: Exception, step: int | None, when: str) -> None:
        """Record ``err`` (raised ``when``) as an ``error`` event, warn once per kind."""
        phase = _phase(err, monitor)
        kind = f"{phase}: {type(err).__name__}"
        count = self.counts[kind] = self.counts.get(kind, 0) + 1
        at = f"step {step}" if step is not None else "a step"
        message = (
            f"{at}: {phase} failed {when} ({type(err).__name__}: {err}); the step is not "
            "measured, the model and the random states are as they were and training goes on"
        )
        if count <= ROW_LIMIT or count % ROW_EVERY == 0:
            row = {**_event(step if step is not None else -1, None, "error", message)}
            row["value"] = float(count)  # how many failures of this kind so far
            try:
                monitor._emit([row])
            except Exception:  # e.g. the writer's folder is gone: the row stays in memory
                pass
        if count == 1:
            warnings.warn(
                f"{message}. Further failures of this kind are counted in "
                "`monitor.errors` and recorded as 'error' rows, not warned again; pass "
                "on_error='raise' to debug",
                ICSRuntimeWarning,
                stacklevel=user_stacklevel(),
            )


def _phase(err: BaseException, monitor: Any) -> str:
    """Which part of the monitor's work raised ``err``, from its traceback (innermost first)."""
    codes: list[CodeType] = []
    tb = err.__traceback__
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    schedule = _codes_of(getattr(monitor, "schedule", None))
    for code in reversed(codes):
        name, file = code.co_name, os.path.basename(code.co_filename)
        if code in schedule:
            return "the schedule"
        if name == "_emit" or (file == "results.py" and name != "_frame"):
            return "writing results"
        if name in ("_gradient_rows", "gradient_ics"):
            return "the gradient ICS"
        if name == "_capture" or file == "recording.py":
            return "a probe pass"
        if name in ("measure_step", "_measure", "analyse"):
            return "the analysis"
    return "the monitor"


def _codes_of(fn: Any) -> set[CodeType]:
    codes = set()
    calls = [vars(cls).get("__call__") for cls in type(fn).__mro__ if cls is not object]
    for obj in (fn, getattr(fn, "__func__", None), *calls):
        code = getattr(obj, "__code__", None)
        if isinstance(code, CodeType):
            codes.add(code)
    return codes


def user_stacklevel() -> int:
    """The stacklevel of the first frame outside ics_toolkit, torch.optim and torch.amp."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_SKIPPED_FILES)
        or os.path.basename(frame.f_code.co_filename) == "contextlib.py"
    ):
        frame, level = frame.f_back, level + 1
    return level


# --------------------------------------------------------------------------- guards
def _check_step(step: object) -> int | None:
    if step is None:
        return None
    if isinstance(step, bool) or not isinstance(step, int | np.integer):
        raise ICSTypeError(
            f"`step` must be None (the monitor's own count) or a non-negative int, got {step!r}"
        )
    if int(step) < 0:
        raise ICSValueError(f"`step` must be a non-negative int, got {step!r}")
    return int(step)


def guard_before_step(fn: Callable[..., None]) -> Callable[..., None]:
    """Wrap :meth:`ICSMonitor.before_step` (see the module docstring)."""

    @functools.wraps(fn)
    def before_step(self: Any, step: int | None = None) -> None:
        step = _check_step(step)
        if self._current is not None:
            if not self._hook_step:
                return fn(self, step)  # opened twice by the user: the usage error, unguarded
            # opened by the optimizer hook, whose step raised before the post-hook
            self.abort_step("the previous optimizer step raised before finishing")
        self._hook_step = False
        try:
            return fn(self, step)
        except Exception as err:
            if self._current is None:
                self._current = self.step_count if step is None else step
            self._pending = None
            dist = getattr(self, "_dist", None)
            if dist is not None and dist.exchanges and _phase(err, self) != "the schedule":
                # take part in the step's gather with a failed status (as a failed probe
                # pass does), so that the other ranks are not left waiting for this one
                self._pending = {"failed": True}
            if self._failures.on_error == "raise":
                raise
            self._failures.handle(self, err, self._current, "before the optimizer step")
        except BaseException:
            self._current = self._pending = None
            raise
        return None

    return before_step


def guard_after_step(fn: Callable[..., None]) -> Callable[..., None]:
    """Wrap :meth:`ICSMonitor.after_step` (see the module docstring)."""

    @functools.wraps(fn)
    def after_step(self: Any) -> None:
        if self._current is None:
            return fn(self)  # the usage error, unguarded
        self._hook_step = False
        step = self._current
        rng = RNGState.capture() if self._pending is not None else None
        try:
            return fn(self)
        except BaseException as err:
            if rng is not None:
                rng.restore()
            self._current = self._pending = None
            self.step_count = max(self.step_count, step + 1)
            if not isinstance(err, Exception) or self._failures.on_error == "raise":
                raise
            self._failures.handle(self, err, step, "after the optimizer step")
        return None

    return after_step


def guard_abort_step(fn: Callable[..., None]) -> Callable[..., None]:
    """Wrap :meth:`ICSMonitor.abort_step` (see the module docstring)."""

    @functools.wraps(fn)
    def abort_step(self: Any, reason: str = "the training step raised") -> None:
        self._hook_step = False
        step = self._current
        try:
            return fn(self, reason)
        except Exception as err:
            self._current = self._pending = None
            if self._failures.on_error == "raise":
                raise
            self._failures.handle(self, err, step, "while recording the aborted step")
        return None

    return abort_step


# --------------------------------------------------------------------------- hooks
class PreHook:
    """Optimizer step pre-hook: opens the step.

    It holds the monitor strongly, so an attached monitor lives as long as the
    optimizer (until ``detach()``), and pickles to an inert copy, so the optimizer
    stays picklable and deep-copyable.
    """

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is None:
            return
        if monitor._current is not None and not monitor._hook_step:
            return  # the user opened this step (monitor.step()): it measures, not the hook
        try:
            monitor.before_step()
        finally:
            monitor._hook_step = monitor._current is not None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.monitor = None


class PostHook(PreHook):
    """Optimizer step post-hook: measures the step the pre-hook opened."""

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        monitor = self.monitor
        if monitor is not None and monitor._current is not None and monitor._hook_step:
            monitor.after_step()
