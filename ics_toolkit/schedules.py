"""When to measure: schedules are callables ``step -> bool``.

A step that is not scheduled costs the monitor one counter increment and one call
of the schedule, so keep schedules cheap (all here are O(1) or a set lookup).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ics_toolkit import _checks
from ics_toolkit.errors import ICSTypeError, ICSValueError

__all__ = ["Schedule", "as_schedule", "explicit", "linear", "logarithmic"]

Schedule = Callable[[int], bool]


@dataclass(frozen=True)
class linear:  # lower case: reads as a function at the call site, like logarithmic
    """Every ``every`` steps, starting at ``offset``: steps offset, offset + every, ...

    Examples
    --------
    >>> [s for s in range(25) if linear(10)(s)]
    [0, 10, 20]
    """

    every: int
    offset: int = 0

    def __post_init__(self) -> None:
        _checks.positive_int(self.every, "every")

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is measured."""
        return step >= self.offset and (step - self.offset) % self.every == 0


@dataclass(frozen=True)
class explicit:
    """Exactly the listed steps.

    Examples
    --------
    >>> [s for s in range(10) if explicit([1, 5])(s)]
    [1, 5]
    """

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        values = frozenset(int(s) for s in steps)
        if any(s < 0 for s in values):
            raise ICSValueError(f"`steps` must be non-negative step indices, got {sorted(values)}")
        object.__setattr__(self, "steps", values)

    def __call__(self, step: int) -> bool:
        """Whether ``step`` is measured."""
        return step in self.steps


def logarithmic(end: int, n_points: int = 50, start: int = 0) -> explicit:
    """About ``n_points`` steps between ``start`` and ``end``, log-spaced (dense early).

    Early training moves layer distributions fastest, so a log-spaced schedule spends
    its measurements where ICS changes most.

    Examples
    --------
    >>> sorted(logarithmic(100, n_points=6).steps)
    [0, 2, 5, 15, 39, 100]
    """
    if end < start or start < 0:
        raise ICSValueError(f"need 0 <= start <= end, got start={start}, end={end}")
    if n_points < 1:
        raise ICSValueError(f"`n_points` must be >= 1, got {n_points}")
    if n_points == 1:
        return explicit([start])
    lo, hi = math.log1p(start), math.log1p(end)
    steps = {round(math.expm1(lo + (hi - lo) * i / (n_points - 1))) for i in range(n_points)}
    return explicit(steps)


def as_schedule(every: int | Iterable[int] | Schedule | str) -> Schedule:
    """Turn the monitor's ``every`` argument into a schedule.

    Parameters
    ----------
    every : int, iterable of int, callable, or str
        An int k measures every k steps (:class:`linear`); an iterable lists the steps
        (:class:`explicit`); a callable ``step -> bool`` is used as is; the string
        ``"log:END"`` or ``"log:END:N"`` is :func:`logarithmic` (END, N points).

    Returns
    -------
    callable
        ``step -> bool``.
    """
    if isinstance(every, bool):
        raise ICSTypeError("`every` must be an int, a list of steps, a callable or 'log:END'")
    if isinstance(every, int):
        return linear(every)
    if isinstance(every, str):
        parts = every.split(":")
        if parts[0] != "log" or len(parts) not in (2, 3):
            raise ICSValueError(
                f"`every` string must be 'log:END' or 'log:END:N_POINTS', got {every!r}"
            )
        try:
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            raise ICSValueError(f"`every`={every!r}: END and N_POINTS must be integers") from None
        return logarithmic(*numbers)
    if callable(every):
        return every
    try:
        return explicit(every)
    except TypeError:
        raise ICSTypeError(
            f"`every` must be an int, a list of steps, a callable or 'log:END', "
            f"got {type(every).__name__}"
        ) from None
