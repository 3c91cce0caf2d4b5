"""The opt-in analysis worker: the analysis of step t runs while training goes on.

A measured step has two parts: the probe passes, which must run between the optimizer
steps (they read the model), and the analysis of the two captures, which reads only
the captures. With a worker the analysis goes to one background thread and the
training loop continues; its rows are handed back in step order at the next measured
step, by :meth:`ics_toolkit.ICSMonitor.results`, by ``detach()`` and at the end of the
run. The analysis uses private random generators only, so the training trajectory is
the same to the bit with and without a worker. It pays off where the analysis runs on
another device than the host thread's work (a GPU model); on a CPU-only machine the
worker and the training share the cores.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

__all__ = ["AnalysisWorker"]


class AnalysisWorker:
    """One background thread running analyses in submission order."""

    def __init__(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="ics-analysis"
        )
        self._queue: list[tuple[int, concurrent.futures.Future]] = []

    def submit(self, step: int, fn: Callable[[], Any]) -> None:
        """Queue ``fn`` (the analysis of ``step``)."""
        self._queue.append((step, self._pool.submit(fn)))

    def drain(self, handle: Callable[[int, Any, BaseException | None], None]) -> None:
        """Wait for every queued analysis, calling ``handle(step, result, error)`` in order."""
        queue, self._queue = self._queue, []
        for i, (step, future) in enumerate(queue):
            try:
                result, error = future.result(), None
            except Exception as err:  # handed to the monitor, which decides
                result, error = None, err
            try:
                handle(step, result, error)
            except BaseException:
                self._queue = queue[i + 1 :] + self._queue  # keep what was not handled
                raise

    @property
    def pending(self) -> int:
        """Analyses queued and not handed back yet."""
        return len(self._queue)

    def close(self) -> None:
        """Stop the thread (after the queued analyses finish)."""
        self._pool.shutdown(wait=True)
