"""Crash-safe file writes: the one way this project replaces a file.

Every write goes to a temporary file in the target's folder, is flushed and ``fsync``-ed, then
``os.replace``-d over the target, and the folder is ``fsync``-ed: a reader sees the old content
or the new one, never a torn file, and a crash at any point leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_json", "fsync_dir"]


def fsync_dir(directory: str | os.PathLike) -> None:
    """``fsync`` a folder so that a rename inside it survives a power loss (no-op where the OS
    cannot open folders)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temp file + fsync + ``os.replace``).

    Args:
      path: the file to write; its folder is created if missing.
      text: the whole new content.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (NaN and inf refused) with :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
