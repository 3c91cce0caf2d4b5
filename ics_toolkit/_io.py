"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half.

Every file the toolkit writes goes through :func:`atomic_write`: the content is
written to ``.<name>.tmp`` next to the target and renamed over it (``os.replace``,
atomic on POSIX and Windows within one file system). A process killed mid-write
leaves at most that temporary file, which :func:`stale_temporaries` finds so that
the writer that owns the folder can remove it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["atomic_write", "stale_temporaries", "temporary_name"]


def temporary_name(path: Path) -> Path:
    """The temporary file :func:`atomic_write` uses for ``path``: ``.<name>.tmp`` beside it."""
    return path.with_name(f".{path.name}.tmp")


def atomic_write(
    path: str | os.PathLike[str], content: bytes | str | Callable[[Path], object]
) -> Path:
    """Write ``content`` to ``path`` atomically; returns ``path`` as a Path.

    Parameters
    ----------
    path : str or Path
        The target file (its folder must exist).
    content : bytes, str or callable
        Bytes, text (written as UTF-8), or a function called with the temporary path
        that writes the file itself (e.g. ``lambda tmp: df.to_parquet(tmp)``).

    Notes
    -----
    On any exception, KeyboardInterrupt included, the temporary file is removed and
    the target is left as it was. Only ``kill -9`` or a power cut can leave the
    temporary file behind (the target is still intact).
    """
    target = Path(path)
    tmp = temporary_name(target)
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_bytes(content.encode("utf-8"))
        else:
            content(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def stale_temporaries(folder: Path, names: Iterable[str] | Callable[[str], bool]) -> list[Path]:
    """Temporary files of :func:`atomic_write` in ``folder`` whose target name is owned.

    Parameters
    ----------
    folder : Path
        The folder searched (not recursively); a missing folder has none.
    names : iterable of str or callable
        The owned target names, or a predicate on a target name.
    """
    if not folder.is_dir():
        return []
    owned = names if callable(names) else set(names).__contains__
    found = []
    for f in folder.iterdir():
        n = f.name
        if n.startswith(".") and n.endswith(".tmp") and owned(n[1:-4]) and f.is_file():
            found.append(f)
    return sorted(found)
