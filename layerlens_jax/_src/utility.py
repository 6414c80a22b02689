"""Utility: one score per site from its gradient statistics, and the seed report's checks.

Definition (defaults in :class:`UtilityConfig`)::

    F_i = fisher_trace_i            (or fisher_trace_sampled_i with source="sampled")
    S_i = grad_norm_i ** 2          (squared norm of the mean gradient: same units as F)
    if per_param: F_i /= n_i ; S_i /= n_i          (n_i = parameters under site i)
    u_i = w_F * phi(F_i) / max_j phi(F_j) + w_S * phi(S_i) / max_j phi(S_j)
    u_i /= max_j u_j                               (the largest utility is 1)

with ``phi`` the identity (``transform="linear"``) or the square root (``"sqrt"``). F is the
expected squared per-example gradient, S its squared mean: F = S + (per-example variance), so F
measures how much each example could still move the site and S how consistently the examples
agree. Both are additive over parameters, so a block's figure is the sum of its layers'.

The default (``w_F = 0.75, w_S = 0.25``, linear, site totals) keeps the score almost a rescaled
Fisher trace (Pearson r with it ≥ 0.95) while the agreement term S ties it to the gradient norms
(r ≥ 0.90): the seed reached 0.64 on the latter with a Fisher-only score. Measured by
``python scripts/utility_targets.py``; the checks are :func:`utility_report`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from scipy import stats as sps

from layerlens_jax._src.profile import LayerStats

__all__ = ["UtilityConfig", "UtilityReport", "utility", "utility_report", "UTILITY_TARGETS"]

#: The seed report's targets: coefficient of variation and the two Pearson correlations.
UTILITY_TARGETS = {"cv": 0.2, "grad_corr": 0.90, "fisher_corr": 0.95}


@dataclasses.dataclass(frozen=True, kw_only=True)
class UtilityConfig:
    """Weights and options of :func:`utility` (the formula is in the module docstring)."""

    fisher_weight: float = 0.75  # w_F, weight of the normalised Fisher term
    grad_weight: float = 0.25  # w_S, weight of the normalised squared-gradient-norm term
    transform: str = "linear"  # phi: "linear" | "sqrt"
    per_param: bool = False  # divide both statistics by the site's parameter count
    source: str = "empirical"  # "empirical" | "sampled" Fisher

    def __post_init__(self):
        for name in ("fisher_weight", "grad_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"UtilityConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.fisher_weight + self.grad_weight <= 0:
            raise ValueError("UtilityConfig: fisher_weight + grad_weight must be > 0")
        if self.transform not in ("linear", "sqrt"):
            raise ValueError(f"UtilityConfig.transform must be 'linear' or 'sqrt', "
                             f"got {self.transform!r}")
        if self.source not in ("empirical", "sampled"):
            raise ValueError(f"UtilityConfig.source must be 'empirical' or 'sampled', "
                             f"got {self.source!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UtilityConfig":
        """Build from a mapping (e.g. a config section); an unknown key is a ``ValueError``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown utility config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def _normalised(v: np.ndarray, transform: str) -> np.ndarray:
    v = np.sqrt(v) if transform == "sqrt" else v
    top = v.max()
    return v / top if top > 0 else np.zeros_like(v)


def utility(stats: LayerStats, config: UtilityConfig | None = None) -> np.ndarray:
    """Utility per site (float64, in the order of ``stats.sites``, max 1).

    Args:
      stats: the output of :func:`~layerlens_jax.profile`.
      config: weights and options (default :class:`UtilityConfig`).

    Returns:
      ``u``, shape (S,): ``w_F·φ(F)/max φ(F) + w_S·φ(S)/max φ(S)`` rescaled to max 1 (module
      docstring).

    Raises:
      ValueError: a non-finite or negative statistic (names the site), ``source="sampled"``
        without sampled Fisher traces, or all-zero statistics.

    Example:
      >>> import numpy as np
      >>> from layerlens_jax import LayerStats, Site, UtilityConfig, utility
      >>> sites = tuple(Site(path=f"s{i}", kind="linear", module_type="Linear", param_shapes={},
      ...                    num_params=10) for i in range(3))
      >>> stats = LayerStats(grad_norm=np.array([1.0, 2.0, 0.5]),
      ...                    fisher_trace=np.array([4.0, 2.0, 1.0]), fisher_trace_sampled=None,
      ...                    num_examples=8, num_tokens=8, num_batches=1, sites=sites)
      >>> # 0.75 * [1, .5, .25] + 0.25 * [.25, 1, .0625] = [.8125, .625, .203125], then / .8125
      >>> utility(stats).round(4).tolist()
      [1.0, 0.7692, 0.25]
      >>> utility(stats, UtilityConfig(fisher_weight=1, grad_weight=0)).tolist()
      [1.0, 0.5, 0.25]
    """
    config = config or UtilityConfig()
    fisher = stats.fisher_trace
    if config.source == "sampled":
        if stats.fisher_trace_sampled is None:
            raise ValueError("utility source='sampled' needs stats profiled with sample_loss_fn")
        fisher = stats.fisher_trace_sampled
    fisher = np.asarray(fisher, np.float64)
    signal = np.asarray(stats.grad_norm, np.float64) ** 2
    for name, v in (("fisher_trace", fisher), ("grad_norm", signal)):
        bad = np.flatnonzero(~np.isfinite(v) | (v < 0))
        if bad.size:
            raise ValueError(f"{name} of site {stats.sites[bad[0]].path!r} is {v[bad[0]]}: "
                             "statistics must be finite and non-negative")
    if config.per_param:
        n = np.array([max(s.num_params, 1) for s in stats.sites], np.float64)
        fisher, signal = fisher / n, signal / n
    u = (config.fisher_weight * _normalised(fisher, config.transform)
         + config.grad_weight * _normalised(signal, config.transform))
    top = u.max()
    if not top > 0:
        raise ValueError("every site has zero gradient statistics: the loss does not depend on "
                         "any site's parameters for these batches")
    return u / top


@dataclasses.dataclass(frozen=True, kw_only=True)
class UtilityReport:
    """The seed report's utility checks (Pearson r with two-sided p-values)."""

    cv: float  # coefficient of variation of the utility (std / mean)
    grad_corr: float  # Pearson r of the utility with the gradient norms
    grad_p: float  # its two-sided p-value
    fisher_corr: float  # Pearson r of the utility with the Fisher traces
    fisher_p: float  # its two-sided p-value
    spearman_fisher: float  # Spearman rank correlation of the utility with the Fisher traces
    num_sites: int  # number of sites

    @property
    def checks(self) -> dict[str, bool]:
        """Each figure against :data:`UTILITY_TARGETS` (``True`` where met)."""
        return {"cv": self.cv >= UTILITY_TARGETS["cv"],
                "grad_corr": self.grad_corr >= UTILITY_TARGETS["grad_corr"],
                "fisher_corr": self.fisher_corr >= UTILITY_TARGETS["fisher_corr"]}

    @property
    def passed(self) -> bool:
        """Whether every check is met."""
        return all(self.checks.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields plus ``checks`` and ``passed``."""
        return {**dataclasses.asdict(self), "checks": self.checks, "passed": self.passed}

    def to_markdown(self) -> str:
        """The seed report's table: metric, target, achieved value, status."""
        ok = lambda b: "✅ PASS" if b else "⚠️ Below"  # noqa: E731
        c = self.checks
        rows = [
            ("Coefficient of Variation", ">= 0.20", f"{self.cv:.4f}", ok(c["cv"])),
            ("Gradient Correlation", ">= 0.90", f"{self.grad_corr:.4f} (p={self.grad_p:.2g})",
             ok(c["grad_corr"])),
            ("Fisher Correlation", ">= 0.95", f"{self.fisher_corr:.4f} (p={self.fisher_p:.2g})",
             ok(c["fisher_corr"])),
        ]
        lines = ["| Metric | Target | Achieved | Status |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {v} | {s} |" for a, b, v, s in rows]
        return "\n".join(lines)


def _pearson(a, b) -> tuple[float, float]:
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    r = sps.pearsonr(a, b)
    return float(r.statistic), float(r.pvalue)


def utility_report(stats: LayerStats, u: np.ndarray) -> UtilityReport:
    """Coefficient of variation of ``u`` and its Pearson r with grad norms and Fisher traces.

    Args:
      stats: the statistics ``u`` was computed from.
      u: utility per site, shape (S,), in the order of ``stats.sites``.

    Returns:
      :class:`UtilityReport`; ``.checks`` compares it with :data:`UTILITY_TARGETS`. A correlation
      with a constant vector is NaN.

    Raises:
      ValueError: ``u`` does not have one entry per site, or fewer than 3 sites.

    Example:
      >>> import numpy as np
      >>> from layerlens_jax import LayerStats, Site, utility, utility_report
      >>> sites = tuple(Site(path=f"s{i}", kind="linear", module_type="Linear", param_shapes={},
      ...                    num_params=10) for i in range(4))
      >>> stats = LayerStats(grad_norm=np.array([2.0, 1.0, 1.0, 0.5]),
      ...                    fisher_trace=np.array([8.0, 4.0, 2.0, 1.0]), fisher_trace_sampled=None,
      ...                    num_examples=8, num_tokens=8, num_batches=1, sites=sites)
      >>> report = utility_report(stats, utility(stats))
      >>> round(report.cv, 4), round(report.fisher_corr, 4), report.passed
      (0.7538, 0.9972, True)
    """
    u = np.asarray(u, np.float64)
    if u.shape != (len(stats.sites),):
        raise ValueError(f"utility has shape {u.shape}, expected ({len(stats.sites)},)")
    if len(u) < 3:
        raise ValueError("utility_report needs at least 3 sites for correlations")
    cv = float(u.std() / u.mean()) if u.mean() > 0 else float("nan")
    gr, gp = _pearson(u, stats.grad_norm)
    fr, fp = _pearson(u, stats.fisher_trace)
    return UtilityReport(cv=cv, grad_corr=gr, grad_p=gp, fisher_corr=fr, fisher_p=fp,
                         spearman_fisher=float(sps.spearmanr(u, stats.fisher_trace).statistic),
                         num_sites=len(u))
