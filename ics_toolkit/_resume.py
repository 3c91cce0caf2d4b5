"""The monitor's resumable state (``ICSMonitor.state_dict`` / ``load_state_dict``).

What a resumed run needs to continue where the checkpoint left it: the step count (so
the schedule, a pure function of the step index, goes on), the measured-step count,
the run id, the rows kept in memory and how many part files the run had written. On
load, parts of the same run numbered at or past that count were written by the
interrupted run *after* the checkpoint, for steps the resumed run is going to measure
again: they are renamed ``superseded-part-...`` (kept, but no longer read by
:func:`ics_toolkit.load_results`), and the resumed run writes its parts after the
checkpoint's, so that the folder holds every step once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ics_toolkit.errors import ICSTypeError, ICSUsageError, ICSValueError

FORMAT = "ics_toolkit.ICSMonitor/1"


def state_of(monitor: Any) -> dict[str, Any]:
    if monitor._current is not None:
        raise ICSUsageError(
            f"state_dict() called inside an open step (step {monitor._current}); save the "
            "monitor's state between optimizer steps"
        )
    monitor._flush()  # a worker's queued analyses are part of the state
    return {
        "format": FORMAT,
        "step_count": int(monitor.step_count),
        "update_count": int(monitor.update_count),
        "layers": list(monitor.recorder.names),
        **monitor._store.state(),  # run, parts written, rows kept in memory
    }


def load_into(monitor: Any, state: Mapping[str, Any]) -> None:
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        raise ICSTypeError(
            "`state` is not an ICSMonitor state: pass what monitor.state_dict() returned "
            f"(format {FORMAT!r})"
        )
    if monitor._current is not None:
        raise ICSUsageError(
            "load_state_dict() called inside an open step; load the state before training resumes"
        )
    layers = list(monitor.recorder.names)
    if list(state["layers"]) != layers:
        raise ICSValueError(
            f"the saved monitor measured layers {state['layers']}, this one selects {layers}; "
            "build the monitor with the same `layers` (and model) as the run being resumed"
        )
    monitor.step_count = int(state["step_count"])
    monitor.update_count = int(state["update_count"])
    monitor._flush()  # a worker's queued analyses belong to the run being replaced
    monitor._pending = monitor._carry = None
    monitor._store.resume(state)
    monitor.run = monitor._store.run
