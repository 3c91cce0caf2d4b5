"""A tiny text progress bar for training loops (no tqdm dependency).

It writes to stderr, redraws at most every ``min_interval`` seconds, and is off
when the stream is not a terminal (logs, CI, notebooks' captured stderr) unless
forced with ``enabled=True``. ``enabled=False``, or the environment variable
``ICS_TOOLKIT_PROGRESS=0``, turns it off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

ENV = "ICS_TOOLKIT_PROGRESS"


def _fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def auto_enabled(file: IO[str]) -> bool:
    """On iff ``file`` is a terminal and ``$ICS_TOOLKIT_PROGRESS`` does not turn it off."""
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return False
    isatty = getattr(file, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # closed stream
        return False


class ProgressBar:
    """``desc |#####-----| 37/100 [00:03<00:05, 12.3 it/s] loss=0.512 acc=0.88``.

    Use as a context manager, or call :meth:`close` when done.

    Parameters
    ----------
    total : int
        Number of updates expected.
    desc : str
        Label printed before the bar.
    enabled : bool or None
        None: on only when ``file`` is a terminal (see :func:`auto_enabled`).
    file : text stream or None
        Where to write; ``sys.stderr`` by default.
    min_interval : float
        Least time between redraws, in seconds (the last state is always drawn).
    width : int
        Number of characters of the bar itself.
    """

    def __init__(
        self,
        total: int,
        desc: str = "",
        *,
        enabled: bool | None = None,
        file: IO[str] | None = None,
        min_interval: float = 0.1,
        width: int = 24,
    ) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.file = sys.stderr if file is None else file
        self.enabled = auto_enabled(self.file) if enabled is None else bool(enabled)
        self.min_interval = float(min_interval)
        self.width = int(width)
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._start = time.perf_counter()
        self._last_draw = -float("inf")
        self._closed = False

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` and set the values shown after the bar (e.g. ``loss=0.5``)."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last_draw >= self.min_interval or self.n >= self.total:
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        """The current line, without the carriage return."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self._start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        filled = round(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        remaining = (self.total - self.n) / rate if rate > 0 else 0.0
        extra = " ".join(f"{k}={_fmt_value(v)}" for k, v in self.postfix.items())
        head = f"{self.desc} " if self.desc else ""
        line = (
            f"{head}|{bar}| {self.n}/{self.total} "
            f"[{_fmt_time(elapsed)}<{_fmt_time(remaining)}, {rate:.1f} it/s]"
        )
        return f"{line} {extra}" if extra else line

    def _draw(self, now: float) -> None:
        self.file.write("\r" + self.render(now))
        self.file.flush()
        self._last_draw = now

    def close(self) -> None:
        """Draw the final state and end the line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(time.perf_counter())
            self.file.write("\n")
            self.file.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
