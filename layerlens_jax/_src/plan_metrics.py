"""Metrics of a plan (the seed report's): budget utilisation, constraint satisfaction,
rank-utility correlation and consistency, compatibility, method diversity, sizes and the certified
optimality gap; and their Markdown table (:func:`render_metrics_markdown`)."""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from layerlens_jax._src.methods import METHOD_KINDS, METHODS
from layerlens_jax._src.plan import Plan, to_jsonable

__all__ = ["PlanMetrics", "plan_metrics", "render_metrics_markdown"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanMetrics:
    """The seed report's plan metrics (see :func:`plan_metrics` for definitions)."""

    utilisation: Mapping[str, float]  # resource -> use / budget
    binding_resource: str | None  # the most utilised budgeted resource (None: no budgets)
    binding_utilisation: float  # its utilisation (NaN without budgets)
    utilisation_band: tuple[float, float] | None  # the allocator's target band, if any
    constraints: Mapping[str, tuple[float, float, bool]]  # resource -> (use, budget, satisfied)
    constraint_satisfaction: float  # share of budgets met
    spearman: float  # Spearman rho of size vs utility over adapted sites (NaN if undefined)
    spearman_p: float  # its p-value
    consistency_class: float  # rank-utility consistency within method and cost class
    consistency_class_incl_none: float  # the same within cost class, "none" as size 0
    consistency_overall: float  # rank-utility consistency over all adapted sites
    compatibility_rate: float  # share of sites whose method fits their kind
    method_diversity: int  # distinct methods used, "none" included
    method_counts: Mapping[str, int]  # method -> number of sites
    size_min: int  # over all sites ("none" = 0)
    size_max: int
    size_mean: float
    adapted_size_min: int  # over adapted sites (0 when none is adapted)
    adapted_size_max: int
    adapted_size_mean: float
    trainable_params: float  # the plan's "params" use
    objective: float  # sum of predicted gains
    dual_bound: float | None  # the allocator's bound (None for a hand-built plan)
    gap: float | None  # (dual_bound - objective) / dual_bound
    n_sites: int  # sites in the plan
    n_adapted: int  # sites whose method is not "none"

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))


def _pair_consistency(u: np.ndarray, size: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Share of pairs (i, j) with u_i > u_j (same group if given) that have size_i >= size_j."""
    n = len(u)
    if n < 2:
        return float("nan")
    good = total = 0
    for start in range(0, n, 2048):  # chunked O(n^2) pair count
        ui, si = u[start:start + 2048, None], size[start:start + 2048, None]
        pair = ui > u[None, :]
        if groups is not None:
            pair &= groups[start:start + 2048, None] == groups[None, :]
        total += int(pair.sum())
        good += int((pair & (si >= size[None, :])).sum())
    return good / total if total else float("nan")


def plan_metrics(plan: Plan, *, utilisation_band: tuple[float, float] | None = None) -> PlanMetrics:
    """The seed report's metrics of a plan.

    Args:
      plan: the plan.
      utilisation_band: the ``(low, high)`` utilisation target band to report against; default:
        the band the allocator used (``plan.metadata["utilisation"]``), else none.

    Returns:
      The :class:`PlanMetrics`; undefined values (a correlation over fewer than 3 sites, a
      consistency without pairs) are NaN. Definitions:

      * **Budget utilisation** per budgeted resource: ``use / budget`` (budgets as given, not the
        utilisation-scaled ones); the *binding* resource is the most utilised one.
      * **Constraint satisfaction**: share of budgets with ``use <= budget``.
      * **Rank–utility Spearman**: Spearman's rho (and its p-value) between size and utility over the
        adapted (non-``none``) sites; NaN with fewer than 3 or constant values.
      * **Rank–utility consistency**: among ordered pairs of sites with ``u_i > u_j``, the share with
        ``size_i >= size_j``. ``consistency_class``: pairs adapted with the same method and in the same
        cost class (equal costs for every option), pinned sites excluded: the allocator guarantees
        100 % here unless per-site size limits differ within a class. ``consistency_class_incl_none``:
        the same with ``none`` counted as size 0. ``consistency_overall``: all pairs of adapted sites,
        sizes compared across methods as numbers (the seed's definition).
      * **Compatibility rate**: share of sites whose method may attach to their kind.
      * **Method diversity**: number of distinct methods used, ``none`` included (the seed's count),
        with the distribution; **size range and mean** over all sites (``none`` = 0) and adapted ones.
      * **Gap**: ``(dual_bound - objective) / dual_bound``, the certified optimality gap.
    """
    from scipy import stats

    allocs = plan.allocations
    u = np.array([a.utility for a in allocs])
    size = np.array([a.size for a in allocs], np.float64)
    adapted = np.array([a.method != "none" for a in allocs], bool)
    utilisation, constraints = {}, {}
    for r, b in plan.budgets.items():
        used = plan.use.get(r, 0.0)
        utilisation[r] = used / b if b > 0 and math.isfinite(b) else (0.0 if used == 0 or b > 0 else math.inf)
        constraints[r] = (used, b, used <= b * (1 + 1e-9))
    binding = max(utilisation, key=utilisation.get) if utilisation else None
    band = utilisation_band
    if band is None and plan.metadata.get("utilisation"):
        band = tuple(plan.metadata["utilisation"])
    rho = p = float("nan")
    if adapted.sum() >= 3 and np.ptp(size[adapted]) > 0 and np.ptp(u[adapted]) > 0:
        res = stats.spearmanr(size[adapted], u[adapted])
        rho, p = float(res.statistic), float(res.pvalue)
    free = ~np.array([a.pinned for a in allocs], bool)
    cls_names = sorted({a.cost_class for a in allocs})
    cls = np.array([cls_names.index(a.cost_class) for a in allocs])
    meth = np.array([METHODS.index(a.method) for a in allocs])
    sel = adapted & free
    cons_class = _pair_consistency(u[sel], size[sel], cls[sel] * len(METHODS) + meth[sel])
    cons_class0 = _pair_consistency(u[free], size[free], cls[free])
    cons_all = _pair_consistency(u[adapted], size[adapted])
    compat = np.mean([a.method == "none" or a.kind in METHOD_KINDS[a.method] for a in allocs])
    counts = collections.Counter(a.method for a in allocs)
    counts = {m: counts.get(m, 0) for m in METHODS}
    sa = size[adapted]
    return PlanMetrics(
        utilisation=utilisation, binding_resource=binding,
        binding_utilisation=utilisation[binding] if binding else float("nan"),
        utilisation_band=band, constraints=constraints,
        constraint_satisfaction=(np.mean([c[2] for c in constraints.values()])
                                 if constraints else 1.0),
        spearman=rho, spearman_p=p, consistency_class=cons_class,
        consistency_class_incl_none=cons_class0, consistency_overall=cons_all,
        compatibility_rate=float(compat), method_diversity=sum(1 for v in counts.values() if v),
        method_counts=counts, size_min=int(size.min()), size_max=int(size.max()),
        size_mean=float(size.mean()),
        adapted_size_min=int(sa.min()) if len(sa) else 0,
        adapted_size_max=int(sa.max()) if len(sa) else 0,
        adapted_size_mean=float(sa.mean()) if len(sa) else 0.0,
        trainable_params=plan.use.get("params", 0.0), objective=plan.objective,
        dual_bound=plan.dual_bound, gap=plan.gap, n_sites=len(allocs), n_adapted=int(adapted.sum()))


_RESOURCE_LABEL = {"params": "Params", "train_flops": "Train FLOPs/token",
                   "infer_flops": "Infer FLOPs/token", "vram_bytes": "VRAM (bytes)",
                   "latency": "Latency (ms)"}


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("✅ Pass" if ok else "⚠️ Below")


def _fmt(x: float, pct: bool = False, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.2f}%" if pct else f"{x:.{digits}f}"


def render_metrics_markdown(metrics: PlanMetrics, *, title: str = "LayerLens plan metrics",
                            spearman_target: float = 0.70, overall_consistency_target: float = 0.85,
                            compatibility_target: float = 0.98, diversity_target: int = 3,
                            gap_target: float = 0.005, fill_target: float = 0.97) -> str:
    """The metrics as Markdown in the seed report's style (target / achieved / status)."""
    m = metrics

    def ge(x, t):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x >= t

    if m.utilisation_band and m.utilisation_band[0] > 0:
        lo, hi = m.utilisation_band
        util_target = f"{100 * lo:.0f}–{100 * hi:.0f}%"
        util_ok = None if m.binding_resource is None else lo <= m.binding_utilisation <= hi * (1 + 1e-9)
    else:
        hi = m.utilisation_band[1] if m.utilisation_band else 1.0
        util_target = f"≥ {100 * fill_target * hi:.0f}%"
        util_ok = None if m.binding_resource is None else m.binding_utilisation >= fill_target * hi
    binding = f" ({m.binding_resource})" if m.binding_resource else ""
    rows = [
        ("Budget Utilization" + binding, util_target, _fmt(m.binding_utilisation, True), util_ok),
        ("Constraint Satisfaction", "100%", _fmt(m.constraint_satisfaction, True),
         m.constraint_satisfaction == 1.0),
        ("Rank-Utility Correlation (Spearman)", f"≥ {spearman_target:.2f}",
         _fmt(m.spearman) + (f" (p={m.spearman_p:.2g})" if not math.isnan(m.spearman_p) else ""),
         ge(m.spearman, spearman_target)),
        ("Rank-Utility Consistency (same method & cost class)", "100%",
         _fmt(m.consistency_class, True), ge(m.consistency_class, 1.0 - 1e-12)),
        ("Rank-Utility Consistency (overall)", f"≥ {100 * overall_consistency_target:.0f}%",
         _fmt(m.consistency_overall, True), ge(m.consistency_overall, overall_consistency_target)),
        ("Compatibility Rate", f"≥ {100 * compatibility_target:.0f}%",
         _fmt(m.compatibility_rate, True), m.compatibility_rate >= compatibility_target),
        ("Method Diversity", f"≥ {diversity_target}", str(m.method_diversity),
         m.method_diversity >= diversity_target),
        ("Optimality Gap (certified)", f"≤ {100 * gap_target:.1f}%", _fmt(m.gap, True),
         None if m.gap is None else m.gap <= gap_target),
    ]
    lines = [f"# {title}", "", "| Metric | Target | Achieved | Status |",
             "|--------|--------|----------|--------|"]
    lines += [f"| **{name}** | {target} | {value} | {_status(ok)} |" for name, target, value, ok in rows]
    lines += ["", "## Constraint satisfaction", ""]
    for r, (used, budget, ok) in m.constraints.items():
        lines.append(f"- **{_RESOURCE_LABEL.get(r, r)}:** {used:.4g} / {budget:.4g} "
                     f"({_fmt(m.utilisation[r], True)}) {'✅' if ok else '❌'}")
    dist = ", ".join(f"{k} ({v})" for k, v in m.method_counts.items())
    lines += ["", "## Methods and sizes", "",
              f"- **Distribution:** {dist}",
              f"- **Sizes:** {m.size_min} – {m.size_max} (avg: {m.size_mean:.2f}); adapted sites "
              f"{m.adapted_size_min} – {m.adapted_size_max} (avg: {m.adapted_size_mean:.2f})",
              f"- **Consistency within cost class, `none` as size 0:** "
              f"{_fmt(m.consistency_class_incl_none, True)}",
              f"- **Trainable parameters:** {m.trainable_params:,.0f}",
              f"- **Objective / dual bound:** {m.objective:.6g} / "
              f"{'n/a' if m.dual_bound is None else f'{m.dual_bound:.6g}'}",
              f"- **Sites:** {m.n_sites} ({m.n_adapted} adapted)", ""]
    return "\n".join(lines)
