"""Send the monitor's numbers to a logger as they are measured (``ICSMonitor(log_to=...)``).

A *sink* receives, once per measured step, the step index t (of the update t -> t+1)
and a flat dict of scalars named::

    ics/<layer>/<quantity>            e.g. ics/layer1.0.bn1/exact, ics/bn1/U1
    ics/<layer>/<view>/<quantity>     when the monitor measures several views
    ics/<quantity>                    rows of no layer (measure_time_s)

with the values of the results table's ``value`` column (rows whose value is NaN,
i.e. events such as ``skipped_step``, are not sent). Accepted sinks:

- a ``torch.utils.tensorboard.SummaryWriter`` (anything with ``add_scalar(tag, value,
  global_step)``): one ``add_scalar`` per number;
- any callable ``sink(step, scalars)``, e.g. ``lambda step, s: wandb.log(s, step=step)``
  or a Lightning logger's ``lambda step, s: logger.log_metrics(s, step)``;
- a list of those.

A sink that raises never stops training: the monitor warns once
(:class:`~ics_toolkit.errors.ICSRuntimeWarning`) and stops sending to that sink.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ics_toolkit.errors import ICSRuntimeWarning, ICSTypeError

__all__ = ["Sink", "as_sink", "scalars"]

SinkFn = Callable[[int, dict[str, float]], Any]


def scalars(rows: Iterable[Mapping[str, Any]], *, with_view: bool = False) -> dict[int, dict]:
    """Group result rows into ``{step: {name: value}}`` with the sinks' names.

    Parameters
    ----------
    rows : iterable of dict
        Rows of the results table (``step``, ``layer``, ``view``, ``quantity``,
        ``value``).
    with_view : bool
        Put the view in the names (``ics/<layer>/<view>/<quantity>``).

    Returns
    -------
    dict of int to dict of str to float
        Finite and infinite values; NaN values are left out.

    Examples
    --------
    >>> rows = [{"step": 3, "layer": "bn", "view": "flatten", "quantity": "exact", "value": 0.5}]
    >>> scalars(rows)
    {3: {'ics/bn/exact': 0.5}}
    """
    out: dict[int, dict[str, float]] = {}
    for row in rows:
        value = row.get("value")
        if value is None:
            continue
        value = float(value)
        if math.isnan(value):
            continue
        layer, view = row.get("layer"), row.get("view")
        parts = ["ics"]
        if layer is not None:
            parts.append(str(layer))
            if with_view and view is not None:
                parts.append(str(view))
        parts.append(str(row["quantity"]))
        out.setdefault(int(row["step"]), {})["/".join(parts)] = value
    return out


def _one(target: Any) -> SinkFn:
    add_scalar = getattr(target, "add_scalar", None)
    if callable(add_scalar):

        def send(step: int, values: dict[str, float]) -> None:
            for name, value in values.items():
                add_scalar(name, value, global_step=step)

        return send
    if callable(target):
        return target
    raise ICSTypeError(
        f"`log_to` must be a SummaryWriter (an object with add_scalar), a callable "
        f"(step, dict_of_scalars) or a list of those, got {type(target).__name__}"
    )


class Sink:
    """The monitor's fan-out to its loggers (built by :func:`as_sink`).

    Parameters
    ----------
    targets : list
        SummaryWriters and callables.
    with_view : bool
        Put the view in the scalar names.
    """

    def __init__(self, targets: list[Any], *, with_view: bool = False) -> None:
        self.targets = list(targets)
        self._send = [_one(t) for t in self.targets]
        self._broken = [False] * len(self._send)
        self.with_view = with_view

    def __call__(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Send the rows of one measured step (or event) to every working sink."""
        grouped = scalars(rows, with_view=self.with_view)
        for i, send in enumerate(self._send):
            if self._broken[i]:
                continue
            for step, values in grouped.items():
                try:
                    send(step, values)
                except Exception as err:
                    self._broken[i] = True
                    warnings.warn(
                        f"the logger sink {self.targets[i]!r} raised {type(err).__name__}: "
                        f"{err}; the monitor stops sending to it (results are still kept)",
                        ICSRuntimeWarning,
                        stacklevel=4,
                    )
                    break


def as_sink(log_to: Any, *, with_view: bool = False) -> Sink | None:
    """Validate ``log_to`` into a :class:`Sink` (None for None or an empty list)."""
    if log_to is None:
        return None
    targets = list(log_to) if isinstance(log_to, list | tuple) else [log_to]
    if not targets:
        return None
    return Sink(targets, with_view=with_view)
