"""The validation sweep's pure parts: variants at a budget, result keys, selection, paired statistics.

A sweep trains every (task, budget, variant, seed) once; :mod:`scripts/validate_task.py` drives it.
This module holds what must be right independently of the training loop:

* :data:`TARGET_SETS` and :func:`uniform_candidates`: the uniform-rank baselines a careful user tries
  by hand -- LoRA on {query+value, q+k+v+out, FFN only, all linear layers}, each at the largest rank
  whose parameter count fits the budget (none where rank 1 does not fit);
* :func:`upgrade_runs`: stores written before the score keys (``test_accuracy`` /
  ``val_accuracy``, classification only) read as the current ones;
* :func:`run_key`: the results store's key, a hash of everything that determines a run, so a sweep
  resumes across sittings and never recomputes a finished run (and never reuses a run whose settings
  changed);
* :func:`best_by_validation`: the variant with the best mean validation score (accuracy, or R²) (ties: lower
  validation loss) -- the test split plays no part in any choice;
* :func:`paired_difference`: mean test-score difference of two variants over the seeds they share,
  with a two-sided 95 % paired-t confidence interval (seeds pair the data order and head
  initialisation, so the per-seed differences are the honest unit of replication);
* :func:`pooled_difference`: the same over several tasks at once -- per seed, the mean over the tasks
  of the two variants' difference, and the paired-t interval of those per-seed means (the issue's
  "mean over the tasks, with the 95 % CI").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

from layerlens_jax._src.costs import trainable_params
from layerlens_jax._src.sites import Site

__all__ = ["TARGET_SETS", "targeted", "uniform_candidates", "widest_uniform", "widest_floor",
           "run_key", "upgrade_runs", "best_by_validation", "PairedDifference", "paired_difference", "pooled_difference"]

#: LoRA target sets of the uniform baselines, by the last component of a site's path.
TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qv": ("query", "value"),
    "qkvo": ("query", "key", "value", "out"),
    "ffn": ("intermediate", "output"),
    "all": ("query", "key", "value", "out", "intermediate", "output"),
}


def targeted(sites: Sequence[Site], targets: Sequence[str]) -> list[Site]:
    """The ``linear`` sites whose last path component is in ``targets`` (a uniform target set)."""
    return [s for s in sites if s.kind == "linear" and s.path.rsplit("/", 1)[-1] in targets]


def uniform_candidates(sites: Sequence[Site], budget_params: float,
                       target_sets: Mapping[str, Sequence[str]] = TARGET_SETS,
                       max_rank: int = 64) -> dict[str, tuple[tuple[str, ...], int, int]]:
    """``{"uniform:<set>": (targets, rank, params)}``: each target set at the largest rank that fits.

    Args:
      sites: the model's sites (only ``linear`` ones are targeted).
      budget_params: the trainable-parameter budget (adapter parameters).
      target_sets: name -> last path components to target.
      max_rank: the largest rank tried.

    Returns:
      One entry per target set whose rank-1 configuration fits; a set that matches no linear site
      is left out.
    """
    out = {}
    for name, targets in target_sets.items():
        chosen = targeted(sites, targets)
        if not chosen:
            continue
        per_rank = sum(trainable_params(s, "lora", 1) for s in chosen)
        rank = min(max_rank, int(math.floor(budget_params / per_rank + 1e-9)))
        if rank >= 1:
            out[f"uniform:{name}"] = (tuple(targets), rank, rank * per_rank)
    return out


def widest_uniform(sites: Sequence[Site], budget_params: float,
                   target_sets: Mapping[str, Sequence[str]] = TARGET_SETS
                   ) -> tuple[str, tuple[str, ...], int, int] | None:
    """``(name, targets, rank, params)``: of the uniform candidates that fit the budget, the one
    covering the most sites (ties: more parameters), at its largest rank -- "LoRA on all linear
    layers" when rank 1 of it fits, else the widest set that does. None when nothing fits.

    The validated default (see README "Task validation"): on the four tasks' validation splits
    breadth at low rank beat every allocated plan, at 1/8 of the reference budget (only
    query+value fits: +2.5 points over the plans) and at the full budget (all linear layers at
    rank 1: +0.8 over the utility plan, mean of four tasks).
    """
    best = None
    for name, (targets, rank, params) in uniform_candidates(sites, budget_params,
                                                           target_sets).items():
        width = len(targeted(sites, targets))
        if best is None or (width, params) > best[0]:
            best = ((width, params), (name, targets, rank, params))
    return None if best is None else best[1]


def widest_floor(sites: Sequence[Site], budget_params: float,
                 target_sets: Mapping[str, Sequence[str]] = TARGET_SETS) -> dict[str, int]:
    """``{path: 1}`` for the sites of :func:`widest_uniform`'s target set: the ``min_size`` that
    makes an allocation start from "LoRA rank 1 on the widest set that fits" and spend only the
    rest of the budget by utility (``{}`` when no set fits)."""
    widest = widest_uniform(sites, budget_params, target_sets)
    if widest is None:
        return {}
    targets = widest[1]
    return {s.path: 1 for s in targeted(sites, targets)}


def run_key(settings: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit key for a run's settings (JSON-serialisable mapping)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_OLD_KEYS = {"test_accuracy": "test_score", "val_accuracy": "val_score"}


def upgrade_runs(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A results store's runs with the current keys: runs written before regression support
    (``test_accuracy`` / ``val_accuracy``; their curves' ``val_accuracy``) get ``test_score`` /
    ``val_score`` and ``metric = "accuracy"``; current runs are returned unchanged."""
    out = {}
    for key, r in runs.items():
        if "test_score" in r:
            out[key] = dict(r)
            continue
        r = {_OLD_KEYS.get(k, k): v for k, v in r.items()}
        r.setdefault("metric", "accuracy")
        if "curve" in r:
            r["curve"] = [{_OLD_KEYS.get(k, k): v for k, v in p.items()} for p in r["curve"]]
        out[key] = r
    return out


def best_by_validation(runs: Sequence[Mapping[str, Any]], variants: Sequence[str]) -> str | None:
    """Among ``variants``, the one with the best mean ``val_score`` over its runs (ties: lower
    mean ``val_loss``, then name); None when none of them has a run."""
    scored = []
    for v in variants:
        rs = [r for r in runs if r["variant"] == v]
        if rs:
            scored.append((-np.mean([r["val_score"] for r in rs]),
                           np.mean([r["val_loss"] for r in rs]), v))
    return min(scored)[2] if scored else None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PairedDifference:
    """``a - b`` over the seeds both have (test score, in points unless scaled by the caller)."""

    mean: float  # mean of the per-seed differences
    low: float  # 95 % paired-t confidence interval, lower end (NaN with fewer than 2 seeds)
    high: float  # upper end
    seeds: tuple[int, ...]  # the shared seeds, sorted

    @property
    def excludes_zero(self) -> bool:
        """True when the 95 % interval lies entirely above or below zero."""
        return bool(self.low > 0 or self.high < 0)


def paired_difference(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]],
                      key: str = "test_score", scale: float = 100.0) -> PairedDifference | None:
    """Paired difference of ``key`` (times ``scale``) of runs ``a`` minus runs ``b`` by seed.

    Returns None when the two share no seed. The interval is the two-sided 95 % Student-t interval
    of the mean of the per-seed differences (``n - 1`` degrees of freedom).
    """
    by_a = {r["seed"]: scale * r[key] for r in a}
    by_b = {r["seed"]: scale * r[key] for r in b}
    seeds = tuple(sorted(set(by_a) & set(by_b)))
    if not seeds:
        return None
    return _t_interval(np.array([by_a[s] - by_b[s] for s in seeds]), seeds)


def pooled_difference(pairs: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]],
                      key: str = "test_score", scale: float = 100.0) -> PairedDifference | None:
    """Mean over tasks of ``a - b``, paired by seed: ``pairs`` holds one ``(runs a, runs b)`` per
    task. For every seed that all tasks share for both variants, the mean over the tasks of the
    per-task difference; then the mean of those and its two-sided 95 % Student-t interval. A
    seed missing from any task is left out (None when no seed is shared by all)."""
    per_task = []
    for a, b in pairs:
        by_a = {r["seed"]: scale * r[key] for r in a}
        by_b = {r["seed"]: scale * r[key] for r in b}
        per_task.append({s: by_a[s] - by_b[s] for s in set(by_a) & set(by_b)})
    if not per_task:
        return None
    seeds = tuple(sorted(set.intersection(*(set(d) for d in per_task))))
    if not seeds:
        return None
    return _t_interval(np.array([np.mean([d[s] for d in per_task]) for s in seeds]), seeds)


def _t_interval(d: np.ndarray, seeds: tuple[int, ...]) -> PairedDifference:
    mean = float(d.mean())
    if len(d) < 2:
        return PairedDifference(mean=mean, low=math.nan, high=math.nan, seeds=seeds)
    half = float(sps.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return PairedDifference(mean=mean, low=mean - half, high=mean + half, seeds=seeds)
