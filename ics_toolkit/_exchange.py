"""The monitor's side of the distributed exchange (``gather=True``): one gather per step.

Each rank captures its shard before and after a scheduled step; at the end of the
step the captures (or a status saying why there are none) go to the measuring rank
(:func:`ics_toolkit.distributed.exchange`), which measures them as one probe in rank
order. A failed collective stops gathering for the rest of the run instead of
hanging. These functions take the monitor whose state they read and write.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ics_toolkit import distributed
from ics_toolkit.errors import ICSRuntimeWarning

if TYPE_CHECKING:
    from ics_toolkit.monitor import ICSMonitor
    from ics_toolkit.shift import StepCapture

__all__ = ["after_gather", "exchange", "rank_report", "warn_failure"]


def warn_failure(monitor: ICSMonitor, what: str, err: BaseException) -> None:
    """Warn that one side of a gathered step failed on this rank (training goes on)."""
    warnings.warn(
        f"{what} failed on rank {monitor._dist.rank} ({type(err).__name__}: {err}); the step "
        "is not measured, training goes on",
        ICSRuntimeWarning,
        stacklevel=4,
    )


def exchange(
    monitor: ICSMonitor,
    step: int,
    status: int,
    before: StepCapture | None,
    after: StepCapture | None,
) -> distributed.Exchange | None:
    """One gather; None (after recording it) when the collectives failed."""
    from ics_toolkit.shift import _event

    try:
        return distributed.exchange(
            monitor._dist, step, status, before, after, device=monitor._device
        )
    except distributed.CommFailure as err:
        monitor._dist_broken = True
        message = (
            f"{err}. A rank died or stopped calling the optimizer step; "
            "the monitor stops gathering for the rest of the run"
        )
        warnings.warn(message, ICSRuntimeWarning, stacklevel=4)
        if monitor._dist.measures:
            monitor._emit([_event(step, None, "gather_failed", message)])
        return None


def after_gather(monitor: ICSMonitor, step: int, pending: Mapping[str, Any]) -> None:
    """The end of a gathered step: capture this rank's side, exchange, measure on one rank."""
    from ics_toolkit.shift import _event

    start = time.perf_counter()
    status, after = distributed.OK, None
    if pending.get("failed"):
        status = distributed.FAILED
    elif monitor._skipped(pending) and not monitor._fsdp:
        status = distributed.SKIPPED
    else:  # FSDP2: the probe pass needs every rank, whatever the step did
        try:
            after = monitor._capture()
        except Exception as err:
            warn_failure(monitor, f"step {step}: the probe pass after the step", err)
            status = distributed.FAILED
        if monitor._fsdp and status == distributed.OK and monitor._skipped(pending):
            status, after = distributed.SKIPPED, None
    before = pending.get("capture") if status == distributed.OK else None
    result = exchange(monitor, step, status, before, after)
    del before, after
    if result is None or not monitor._dist.measures:
        return
    statuses = result.statuses
    if all(s == distributed.SKIPPED for s in statuses):
        monitor._record_skip(step, stacklevel=5)
        return
    if any(s != distributed.OK for s in statuses):
        message = f"step {step} not measured: {rank_report(statuses)}"
        monitor._emit([_event(step, None, "aborted", message)])
        return
    monitor._measure(step, pending, result.before, result.after, start)


def rank_report(statuses: Sequence[int], exclude: int | None = None) -> str:
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
