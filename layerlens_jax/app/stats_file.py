"""The profile stage's file, ``stats.json``: writing it from the profile's statistics, checking
it and reading the sites and utility back (each damaged file refused naming the file and the
stage to rerun), and reading any stage's JSON output."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from layerlens_jax._src.profile import LayerStats
from layerlens_jax._src.sites import Site

__all__ = ["read_json", "stats_to_json", "STATS_KEYS", "check_stats_json", "sites_from_json"]


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The JSON content of a file that ``layerlens <what>`` wrote;
    :class:`~layerlens_jax.app.rundir.StageInputError` naming the file when it is missing or not
    JSON."""
    from layerlens_jax.app.rundir import StageInputError

    path = Path(path)
    if not path.is_file():
        raise StageInputError(f"{path} not found: run `layerlens {what}` first")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageInputError(f"{path} is not valid JSON ({e}); rerun `layerlens {what}`") from None


def stats_to_json(stats: LayerStats, u: np.ndarray, report) -> dict[str, Any]:
    d = stats.to_dict()
    for row, ui in zip(d["sites"], u):
        row["utility"] = float(ui)
    d["utility_report"] = report.to_dict()
    d["sites_meta"] = [s.to_dict() for s in stats.sites]
    return d


STATS_KEYS = ("sites", "sites_meta", "utility_report", "num_examples", "num_tokens",
              "num_batches")


def check_stats_json(d: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``d`` when it has the keys of :func:`stats_to_json`; ValueError naming the file and the
    first missing key otherwise (a StageInputError)."""
    from layerlens_jax.app.rundir import StageInputError

    if not isinstance(d, dict):
        raise StageInputError(f"{path} is not a stats object; rerun `layerlens profile`")
    missing = [k for k in STATS_KEYS if k not in d]
    if missing:
        raise StageInputError(f"{path} lacks {missing[0]!r}: not written by `layerlens profile`; "
                              f"rerun `layerlens profile`")
    if len(d["sites"]) != len(d["sites_meta"]) or not d["sites"]:
        raise StageInputError(f"{path}: {len(d['sites'])} site rows vs {len(d['sites_meta'])} site "
                              f"descriptions; rerun `layerlens profile`")
    return d


def sites_from_json(d: dict[str, Any], path: str | os.PathLike = "stats.json"
                    ) -> tuple[list[Site], np.ndarray]:
    """The sites and utility of ``stats.json``'s content; StageInputError naming ``path`` when
    it is damaged."""
    from layerlens_jax.app.rundir import StageInputError

    check_stats_json(d, path)
    sites = []
    try:
        for m in d["sites_meta"]:
            m = dict(m)
            m["param_shapes"] = {k: tuple(v) for k, v in m["param_shapes"].items()}
            sites.append(Site(**m))
        u = np.array([row["utility"] for row in d["sites"]], np.float64)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StageInputError(f"{path}: damaged site entry ({type(e).__name__}: {e}); rerun "
                              f"`layerlens profile`") from None
    return sites, u
