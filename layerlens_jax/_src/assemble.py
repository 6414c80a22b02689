"""From a solver's choice to a :class:`~layerlens_jax._src.plan.Plan`.

Every solver's choice passes the float64 hard budget check of :func:`repair_budget_float64` (the
compiled solver works in float32: should rounding ever cross a budget, the least-loss sites are
downgraded until the choice is within every budget exactly) and becomes a plan with
:func:`to_plan`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from layerlens_jax._src.costs import RESOURCES, cost_class
from layerlens_jax._src.methods import default_peft_options
from layerlens_jax._src.plan import Plan, SiteAllocation
from layerlens_jax._src.problem import Problem

__all__ = ["repair_budget_float64", "to_plan"]


def repair_budget_float64(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Float64 hard check of ``choice`` against ``problem.budget``; while a budget is exceeded,
    take the most over-used one (relative to its limit) and move the unpinned site with the least
    gain lost per unit of it freed to its cheapest option. Returns a new choice within every budget
    (no tolerance); ``ValueError`` when even that is impossible."""
    c = problem.cost_rso
    S = len(choice)
    idx = np.arange(S)
    choice = np.array(choice, np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cn = np.where(c == 0, 0.0, c / problem.budget[:, None, None])
    base = np.argmin(np.where(problem.mask, cn.sum(0), np.inf), axis=1)
    for _ in range(S + 1):
        use = c[:, idx, choice].sum(axis=1)
        over = use > problem.budget
        if not over.any():
            return choice
        r = int(np.argmax(np.where(over, use / np.maximum(problem.budget, 1e-300), -np.inf)))
        freed = c[r, idx, choice] - c[r, idx, base]
        loss = problem.gain[idx, choice] - problem.gain[idx, base]
        ratio = np.where((freed > 0) & ~problem.pinned, loss / np.where(freed > 0, freed, 1), np.inf)
        s = int(np.argmin(ratio))
        if not np.isfinite(ratio[s]):
            break
        choice[s] = base[s]
    raise ValueError("no allocation within the budgets was found (the cheapest options of the "
                     "sites exceed them together); try allocate_exact or larger budgets")


def to_plan(problem: Problem, choice: np.ndarray, dual_bound: float | None, solver: str,
            peft_options: Mapping | None, extra: Mapping[str, Any]) -> Plan:
    """The plan of ``choice``; ``dual_bound`` is reported as ``max(dual_bound, objective)``."""
    idx = np.arange(len(problem.sites))
    chosen_cost = problem.cost[idx, choice]  # [S, all resources]
    gains = problem.gain[idx, choice]
    allocations = []
    for i, site in enumerate(problem.sites):
        method, size = problem.options[int(choice[i])]
        allocations.append(SiteAllocation(
            site=site.path, kind=site.kind, method=method, size=int(size),
            cost={r: float(v) for r, v in zip(RESOURCES, chosen_cost[i])},
            utility=float(problem.utility[i]), gain=float(gains[i]),
            cost_class=cost_class(site), pinned=bool(problem.pinned[i])))
    use = {r: float(v) for r, v in zip(RESOURCES, chosen_cost.sum(axis=0))}
    objective = float(gains.sum())
    opts = default_peft_options()
    opts["prefix_reparam_hidden"] = problem.cost_model.prefix_projection or None
    opts.update(peft_options or {})
    metadata = {
        "effective_budgets": {r: float(b) for r, b in zip(problem.resources, problem.budget)},
        "utilisation": list(problem.utilisation) if problem.utilisation else None,
        "catalogue": problem.catalogue.to_dict(),
        "cost_model": problem.cost_model.to_dict(),
        "gain_model": problem.gain_model.to_dict(),
        **extra,
    }
    return Plan.create(allocations=tuple(allocations), budgets=dict(problem.budgets), use=use,
                       dual_bound=None if dual_bound is None else max(float(dual_bound), objective),
                       objective=objective, peft_options=opts, solver=solver, metadata=metadata)
