"""The exact reference: the allocation problem as a MILP (``scipy.optimize.milp``, HiGHS).

:func:`solve_exact` works on the arrays of a :class:`~layerlens_jax._src.problem.Problem`;
:func:`allocate_exact` takes the inputs of :func:`~layerlens_jax._src.allocate.allocate` and returns
a plan. :func:`dual_value` evaluates the Lagrangian bound of the same problem in float64 (the
certificate of the Lagrangian solver, checked against the MILP optimum in the tests).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from layerlens_jax._src.assemble import repair_budget_float64, to_plan
from layerlens_jax._src.costs import Catalogue, CostModel, GainModel
from layerlens_jax._src.plan import Plan
from layerlens_jax._src.problem import allowed_options, build_problem
from layerlens_jax._src.sites import Site
from layerlens_jax._src.ties import needs_ties, tie_labels, tie_problem

__all__ = ["allocate_exact", "dual_value", "solve_exact"]


def dual_value(gain: np.ndarray, cost: np.ndarray, mask: np.ndarray, budget: np.ndarray,
               lam: np.ndarray) -> float:
    """The Lagrangian ``sum_s max_o (g - lam . c) + lam . B`` in float64: an upper bound on the
    optimum for every ``lam >= 0`` (``cost`` resource-major ``[R, S, O]``, ``B`` may be inf)."""
    gain = np.asarray(gain, np.float64)
    cost = np.asarray(cost, np.float64)
    budget = np.asarray(budget, np.float64)
    lam = np.where(np.isfinite(budget), np.maximum(np.asarray(lam, np.float64), 0.0), 0.0)
    ok = allowed_options(cost, mask, budget)
    score = gain - np.tensordot(lam, cost, axes=(0, 0))
    score = np.where(ok, score, -np.inf).max(axis=1)
    return float(score.sum() + np.sum(lam * np.where(np.isfinite(budget), budget, 0.0)))


def _constraint_rows(cost, budget, s_idx, o_idx, S, exclusive):
    """The MILP rows: one option per site, resources normalised by their budgets, and for each
    ``(i, j)`` in ``exclusive`` at most one of the two sites adapted."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import csr_array

    nv = len(s_idx)
    rows = [LinearConstraint(csr_array((np.ones(nv), (s_idx, np.arange(nv))), shape=(S, nv)), 1, 1)]
    finite = np.flatnonzero(np.isfinite(budget))
    if len(finite):
        vals, ri, ci = [], [], []
        for k, r in enumerate(finite):
            cr = cost[r, s_idx, o_idx] / budget[r] if budget[r] > 0 else cost[r, s_idx, o_idx]
            nz = np.flatnonzero(cr)
            vals.append(cr[nz]); ri.append(np.full(len(nz), k)); ci.append(nz)
        A = csr_array((np.concatenate(vals), (np.concatenate(ri), np.concatenate(ci))),
                      shape=(len(finite), nv))
        ub = np.where(budget[finite] > 0, 1.0, 0.0)
        rows.append(LinearConstraint(A, -np.inf, ub))
    if len(exclusive):
        ri, ci = [], []
        for k, (i, j) in enumerate(exclusive):
            nz = np.flatnonzero(((s_idx == i) | (s_idx == j)) & (o_idx != 0))
            ri.append(np.full(len(nz), k)); ci.append(nz)
        A = csr_array((np.ones(sum(map(len, ci))), (np.concatenate(ri), np.concatenate(ci))),
                      shape=(len(exclusive), nv))
        rows.append(LinearConstraint(A, -np.inf, 1.0))
    return rows


def _with_depth(rows, cost, budget, s_idx, o_idx, S, site_depth, fixed):
    """The rows of :func:`_constraint_rows` extended by one binary ``z_d`` per lowest adapted group
    ``d = 0 .. D``: ``sum_d z_d = 1``; a site of group ``g`` takes an option other than ``none`` only
    if ``sum_{d <= g} z_d = 1``; each resource row also charges ``sum_d fixed[r, d] z_d``."""
    from scipy.optimize import LinearConstraint
    from scipy.sparse import csr_array, hstack

    D1 = fixed.shape[1]
    nv = len(s_idx)
    one_hot = rows[0]
    out = [LinearConstraint(hstack([one_hot.A, csr_array((S, D1))]), 1, 1),
           LinearConstraint(csr_array(np.r_[np.zeros(nv), np.ones(D1)][None]), 1, 1)]
    finite = np.flatnonzero(np.isfinite(budget))
    if len(finite):
        z = np.stack([fixed[r] / budget[r] if budget[r] > 0 else fixed[r] for r in finite])
        out.append(LinearConstraint(hstack([rows[1].A, csr_array(z)]), -np.inf, rows[1].ub))
    adapt = csr_array(((o_idx != 0).astype(float), (s_idx, np.arange(nv))), shape=(S, nv))
    allowed_z = -(np.arange(D1)[None, :] <= np.asarray(site_depth)[:, None]).astype(float)
    out.append(LinearConstraint(hstack([adapt, csr_array(allowed_z)]), -np.inf, 0.0))
    for extra in rows[1 + bool(len(finite)):]:
        out.append(LinearConstraint(hstack([extra.A, csr_array((extra.A.shape[0], D1))]),
                                    extra.lb, extra.ub))
    return out


def solve_exact(gain: np.ndarray, cost: np.ndarray, mask: np.ndarray, budget: np.ndarray, *,
                time_limit: float | None = None, mip_rel_gap: float = 1e-6,
                exclusive: Sequence[tuple[int, int]] = (),
                depth: tuple[np.ndarray, np.ndarray] | None = None):
    """The same problem as a MILP (``scipy.optimize.milp``, HiGHS), arrays in, arrays out.

    Binary ``x[s,o]`` for every allowed option, one per site, resource rows normalised by their
    budgets; for each ``(i, j)`` in ``exclusive`` at most one of sites ``i`` and ``j`` takes an
    option other than option 0 (``none``). Returns ``(choice int [S], objective, bound, status
    message)``; ``bound`` is HiGHS's dual bound (equal to the objective, up to ``mip_rel_gap``,
    when solved to optimality). ``depth = (site_depth [S], fixed [R, D+1])``: the whole-step
    structure of :mod:`~layerlens_jax._src.step_cost` (one binary per lowest adapted group, its
    fixed part charged against each budget; option 0 must be ``none``).
    """
    from scipy.optimize import Bounds, milp

    gain = np.asarray(gain, np.float64)
    cost = np.asarray(cost, np.float64)
    budget = np.asarray(budget, np.float64)
    S, O = gain.shape
    ok = allowed_options(cost, mask, budget)
    if not ok.any(axis=1).all():
        bad = int(np.flatnonzero(~ok.any(axis=1))[0])
        raise ValueError(f"site index {bad} has no allowed option within the budgets")
    s_idx, o_idx = np.nonzero(ok)
    nv = len(s_idx)
    gscale = max(gain[s_idx, o_idx].max(initial=0.0), 1e-300)
    c = -gain[s_idx, o_idx] / gscale
    rows = _constraint_rows(cost, budget, s_idx, o_idx, S, exclusive)
    if depth is not None:
        rows = _with_depth(rows, cost, budget, s_idx, o_idx, S, depth[0],
                           np.asarray(depth[1], np.float64))
        c = np.r_[c, np.zeros(np.shape(depth[1])[1])]
    options = {"mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(c, constraints=rows, integrality=np.ones(len(c)), bounds=Bounds(0, 1),
               options=options)
    if res.x is None:
        raise ValueError(f"MILP found no feasible allocation: {res.message}")
    x = res.x[:nv] > 0.5
    choice = np.zeros(S, np.int64)
    choice[s_idx[x]] = o_idx[x]
    objective = float(gain[np.arange(S), choice].sum())
    bound = getattr(res, "mip_dual_bound", None)
    bound = objective if bound is None or not np.isfinite(bound) else max(objective, -bound * gscale)
    return choice, objective, float(bound), str(res.message)


def allocate_exact(sites: Sequence[Site], utility, budgets: Mapping[str, float], *,
                   catalogue: Catalogue | None = None, cost_model: CostModel | None = None,
                   gain_model: GainModel | None = None,
                   utilisation: float | tuple[float, float] | None = None,
                   pinned: Mapping[str, Any] | None = None,
                   min_size: int | Mapping[str, int] | None = None,
                   max_size: int | Mapping[str, int] | None = None,
                   peft_options: Mapping[str, Any] | None = None,
                   time_limit: float | None = None, mip_rel_gap: float = 1e-6,
                   exclusive_nesting: bool = False, step_profile=None, tie=None) -> Plan:
    """The exact optimum of the problem :func:`~layerlens_jax._src.allocate.allocate` solves
    (MILP, scipy HiGHS); same inputs.

    For small problems and tests: exponential in the worst case. ``dual_bound`` is HiGHS's bound.
    With ``exclusive_nesting`` every (ancestor, descendant) site pair is a MILP row: the exact
    optimum :func:`~layerlens_jax._src.nesting.resolve_nesting` approximates. With
    ``step_profile`` the budgets mean the whole train step, as in ``allocate``: one binary per
    lowest adapted depth group (see :func:`solve_exact`). With ``tie`` (as in ``allocate``) the
    MILP has one row per group (as deep as its lowest member); not combinable with
    ``exclusive_nesting``.
    """
    if needs_ties(sites, tie) and exclusive_nesting:
        raise ValueError("allocate_exact: tie cannot be combined with exclusive_nesting")
    t0 = time.perf_counter()
    if step_profile is not None:  # its batch shape (default) and measured LoRA input fraction
        cost_model = step_profile.cost_model(cost_model)
    problem = build_problem(sites, utility, budgets, catalogue=catalogue, cost_model=cost_model,
                            gain_model=gain_model, pinned=pinned, min_size=min_size,
                            max_size=max_size, utilisation=utilisation)
    exclusive = []
    if exclusive_nesting:
        paths = [st.path for st in problem.sites]
        exclusive = [(i, j) for i, a in enumerate(paths) for j, d in enumerate(paths)
                     if d.startswith(a + "/")]
    depth = None
    if step_profile is not None:
        from layerlens_jax._src.step_cost import depth_subproblems, site_depths

        depth_subproblems(problem, step_profile)  # the same checks (batch size, feasibility)
        depth = (site_depths(step_profile, problem.sites),
                 np.stack([step_profile.fixed(r) for r in problem.resources]))
    solved, labels = problem, None
    if needs_ties(problem.sites, tie):
        labels, _ = tie_labels(problem.sites, tie, problem.pinned)
        solved = tie_problem(problem, labels)
        if depth is not None:  # a group is as deep as its lowest member
            group_depth = np.full(int(labels.max()) + 1, np.iinfo(np.int64).max)
            np.minimum.at(group_depth, labels, depth[0])
            depth = (group_depth, depth[1])
    choice, _, bound, message = solve_exact(solved.gain, solved.cost_rso, solved.mask,
                                            solved.budget, time_limit=time_limit,
                                            mip_rel_gap=mip_rel_gap, exclusive=exclusive,
                                            depth=depth)
    if depth is None:
        choice = repair_budget_float64(solved, choice)
    if labels is not None:
        choice = choice[labels]
    extra = {"milp_status": message, "timing_s": {"solve": time.perf_counter() - t0}}
    plan = to_plan(problem, choice, bound, "milp", peft_options, extra)
    if step_profile is not None:
        from layerlens_jax._src.step_cost import with_step_use

        plan = with_step_use(plan, problem.sites, step_profile, -1)
    return plan
