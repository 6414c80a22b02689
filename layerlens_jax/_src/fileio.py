"""Crash-safe file writes: the one way this project replaces a file.

Every write goes to a temporary file in the target's folder, is flushed and ``fsync``-ed, then
``os.replace``-d over the target, and the folder is ``fsync``-ed: a reader sees the old content
or the new one, never a torn file, and a crash at any point leaves the previous file intact.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_text", "atomic_write_json", "fsync_dir", "swap_dir",
           "recover_swapped_dir"]


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


def swap_dir(new: Path, final: Path, what: str = "checkpoint") -> None:
    """Replace the folder ``final`` by its complete sibling ``new``: ``final`` -> a hidden backup,
    ``new`` -> ``final``, backup deleted. On a failure the previous ``final`` is put back, ``new``
    is removed and an ``OSError`` says ``"<what> not replaced (...); the previous <what> at ... is
    intact"``; an interrupt (``KeyboardInterrupt``) is cleaned up the same way and re-raised. A
    kill between the two renames leaves the backup, which :func:`recover_swapped_dir` puts back.
    """
    new, final = Path(new), Path(final)
    backup = final.with_name(f".{final.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    had_old = final.exists()
    try:
        if had_old:
            os.rename(final, backup)
        os.rename(new, final)
    except BaseException as e:
        if had_old and backup.exists() and not final.exists():
            os.rename(backup, final)
        shutil.rmtree(new, ignore_errors=True)
        if not isinstance(e, Exception):
            raise
        kept = (f"the previous {what} at {final} is intact" if had_old
                else f"no {what} was there before")
        reason = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
        raise OSError(getattr(e, "errno", None), f"{what} not replaced ({reason}); {kept}") \
            from e
    fsync_dir(final.parent)
    shutil.rmtree(backup, ignore_errors=True)


def recover_swapped_dir(final: Path) -> None:
    """After a kill inside :func:`swap_dir`: put the newest backup back when ``final`` is missing,
    delete the other backups."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    backups = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if backups and not final.exists():
        os.rename(backups.pop(), final)
        fsync_dir(final.parent)
    for p in backups:
        shutil.rmtree(p, ignore_errors=True)
