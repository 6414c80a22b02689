"""Allocation: one option (method, size) per site, maximising predicted gain under every budget.

The problem (a multiple-choice, multi-resource knapsack over a sites x options matrix) is built and
checked in :mod:`~layerlens_jax._src.problem` and solved in XLA by the compiled Lagrangian solver
:func:`~layerlens_jax._src.solver.lagrangian_allocate`, which also returns a dual bound:
``objective <= optimum <= dual_bound``. The public entry points here tie them together:

* :func:`allocate` builds the matrices from sites, utility and a
  :class:`~layerlens_jax._src.costs.CostModel`, solves, verifies the result in float64 (hard budget
  check, repaired if float32 rounding ever crossed a budget), evaluates the float64 dual bound and
  returns a :class:`~layerlens_jax._src.plan.Plan`; with ``exclusive_nesting`` it re-solves through
  :func:`~layerlens_jax._src.nesting.resolve_nesting`.
* :func:`allocate_curve` does the same for a batch of budgets in one vmapped solve.

:func:`~layerlens_jax._src.exact.allocate_exact` solves the same problem as a MILP for reference.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from layerlens_jax._src.assemble import repair_budget_float64, to_plan
from layerlens_jax._src.costs import Catalogue, CostModel, GainModel
from layerlens_jax._src.exact import dual_value
from layerlens_jax._src.nesting import resolve_nesting
from layerlens_jax._src.plan import Plan
from layerlens_jax._src.problem import Problem, allowed_options, build_problem
from layerlens_jax._src.sites import Site
from layerlens_jax._src.solver import SolverConfig, lagrangian_allocate
from layerlens_jax._src.ties import needs_ties, tie_labels, tie_problem
from layerlens_jax._src.step_cost import StepProfile, depth_subproblems, with_step_use

__all__ = ["allocate", "allocate_curve"]


def _device_arrays(problem: Problem):
    return (jnp.asarray(problem.gain, jnp.float32), jnp.asarray(problem.cost_rso, jnp.float32),
            jnp.asarray(problem.mask), jnp.asarray(problem.group, jnp.int32))


def allocate(sites: Sequence[Site], utility, budgets: Mapping[str, float], *,
             catalogue: Catalogue | None = None, cost_model: CostModel | None = None,
             gain_model: GainModel | None = None,
             utilisation: float | tuple[float, float] | None = None,
             pinned: Mapping[str, Any] | None = None,
             min_size: int | Mapping[str, int] | None = None,
             max_size: int | Mapping[str, int] | None = None,
             peft_options: Mapping[str, Any] | None = None,
             config: SolverConfig = SolverConfig(),
             exclusive_nesting: bool = False, step_profile: StepProfile | None = None,
             tie: str | Callable[[Site], str] | None = None) -> Plan:
    """Choose a method and size per site under every budget at once.

    Args:
      sites: from :func:`~layerlens_jax._src.sites.discover_sites` (or hand-made
        :class:`~layerlens_jax._src.sites.Site` records), unique paths.
      utility: one score per site, same order (finite, >= 0).
      budgets: ``{resource: limit}`` over any subset of :data:`~layerlens_jax._src.costs.RESOURCES`
        (``inf``: unconstrained).
      catalogue / cost_model / gain_model: options, cost formulas, gain model (defaults documented
        in :mod:`layerlens_jax._src.costs`).
      utilisation: ``hi`` or ``(lo, hi)``: use at most ``hi`` of each budget (the seed's band is
        ``(0.80, 0.88)``); without it the fill goes as close to the binding budget as the size grid
        allows.
      pinned / min_size / max_size: see :func:`~layerlens_jax._src.problem.build_problem`.
      peft_options: overrides of the plan's PEFT options (``lora_alpha``, ``use_rslora``, ...).
      config: solver settings (:class:`~layerlens_jax._src.solver.SolverConfig`).
      exclusive_nesting: never adapt a site together with one of its ancestors or descendants
        (an adapter on ``layers_3/mlp`` and LoRA on ``layers_3/mlp/intermediate``). A block's
        utility is the sum of its layers', so additive gains credit nested options twice with the
        same signal; see :func:`~layerlens_jax._src.nesting.resolve_nesting`.
      step_profile: a :class:`~layerlens_jax._src.step_cost.StepProfile` of the base model
        (:func:`~layerlens_jax._src.step_cost.measure_step_profile`). With it the ``vram_bytes`` and
        ``train_flops`` budgets (and ``plan.use``) mean the *whole* train step: the fixed part of the
        lowest adapted depth group (backward through everything above it) plus the per-site costs.
        Every lowest group is enumerated (methods forbidden below it, its fixed part charged), each
        sub-problem solved in one vmapped solve, the best kept; the dual bound is the largest of the
        sub-problems' bounds, so the certificate stays exact. ``cost_model.batch_size`` must be the
        profile's batch size (the default cost model takes the profile's batch shape). Without it
        (the default) costs are per-site increments, as before.
      tie: ``"layers"``: sites whose paths differ only in layer indices share one option (the
        same projection of every layer gets the same method and size, as a user adapting "value at
        rank 4" does); or a function ``Site -> group key``. The dual bound then certifies the tied
        problem. See :mod:`~layerlens_jax._src.ties`. With ``step_profile`` a group counts at the
        depth of its lowest member.

    Returns:
      A :class:`~layerlens_jax._src.plan.Plan` (``solver="lagrangian"``) whose use is within every
      effective budget exactly (checked in float64). Its ``dual_bound`` is the float64 Lagrangian
      bound (an upper bound on the best objective under the effective budgets, reported as at least
      the objective), so ``dual_bound - objective`` certifies the optimality gap.

    Warns:
      UserWarning: the plan adapts no site (a zero budget, budgets below every option's cost, or an
        all-zero utility); the message names the budgets and the cheapest option's cost.

    Raises:
      ValueError: invalid input (unknown resource, negative or NaN budget or utility, unknown or
        duplicate site, bad pin or size limit), naming the site / resource / value; or infeasible
        budgets (a site's cheapest allowed option, or all mandatory options together, exceed one).
      TypeError: a site that is not a :class:`~layerlens_jax._src.sites.Site`.

    Example:
      Three 64x64 dense layers; LoRA of rank ``r`` costs ``r * (64 + 64)`` parameters, so 1024
      parameters buy 8 ranks, spread by utility:

      >>> import layerlens_jax as ll
      >>> sites = [ll.Site(path=f"layer{i}", kind="linear", module_type="Dense",
      ...                  param_shapes={"kernel": (64, 64)}, num_params=64 * 64,
      ...                  in_features=64, out_features=64) for i in range(3)]
      >>> plan = ll.allocate(sites, [1.0, 0.5, 0.1], {"params": 1024})
      >>> plan.assignments()
      {'layer0': ('lora', 4), 'layer1': ('lora', 3), 'layer2': ('lora', 1)}
      >>> plan.use["params"] <= 1024 and plan.objective <= plan.dual_bound
      True
    """
    if exclusive_nesting:
        return resolve_nesting(
            functools.partial(allocate, sites, utility, budgets, catalogue=catalogue,
                              cost_model=cost_model, gain_model=gain_model,
                              utilisation=utilisation, min_size=min_size, max_size=max_size,
                              peft_options=peft_options, config=config,
                              step_profile=step_profile, tie=tie),
            sites, budgets, pinned)
    t0 = time.perf_counter()
    if step_profile is not None:  # its batch shape (default) and measured LoRA input fraction
        cost_model = step_profile.cost_model(cost_model)
    problem = build_problem(sites, utility, budgets, catalogue=catalogue, cost_model=cost_model,
                            gain_model=gain_model, pinned=pinned, min_size=min_size,
                            max_size=max_size, utilisation=utilisation)
    t1 = time.perf_counter()
    if step_profile is not None:
        return _allocate_over_depth(problem, step_profile, config, peft_options, t1 - t0, tie)
    labels, solved, extra = None, problem, {}
    if needs_ties(problem.sites, tie):  # a tie rule, or the layers of an nnx.scan stack
        labels, keys = tie_labels(problem.sites, tie, problem.pinned)
        solved = tie_problem(problem, labels)
        extra["tie"] = _tie_record(tie, keys)
    gain, cost, mask, group = _device_arrays(solved)
    sol = lagrangian_allocate(gain, cost, mask, jnp.asarray(solved.budget, jnp.float32), group,
                              config=config)
    sol = jax.device_get(sol)
    t2 = time.perf_counter()
    choice = repair_budget_float64(solved, np.asarray(sol.choice, np.int64))
    bound = dual_value(solved.gain, solved.cost_rso, solved.mask, solved.budget, sol.lam)
    if labels is not None:
        choice = choice[labels]  # every member takes its group's option
    extra.update({"multipliers": {r: float(v) for r, v in zip(problem.resources, sol.lam)},
                  "timing_s": {"build": t1 - t0, "solve": t2 - t1}})
    _warn_if_empty(problem, choice)
    return to_plan(problem, choice, bound, "lagrangian", peft_options, extra)


def _tie_record(tie, keys) -> dict[str, Any]:
    """The plan's record of a tie rule: its name (a function's ``__name__``) and group count."""
    rule = tie if isinstance(tie, str) or tie is None else getattr(tie, "__name__", "custom")
    return {"rule": rule, "groups": len(keys)}


def _allocate_over_depth(problem: Problem, profile: StepProfile, config: SolverConfig,
                         peft_options: Mapping[str, Any] | None, build_s: float,
                         tie=None) -> Plan:
    """:func:`allocate` with a step profile: one vmapped solve over the lowest adapted group.

    With ties each depth's sub-problem is tied (a group may be adapted at depth ``d`` only if none
    of its members lies below ``d``: the depth mask forbids them, and a group takes an option only
    where every member allows it)."""
    t0 = time.perf_counter()
    subs = depth_subproblems(problem, profile)
    labels, base, extra = None, problem, {}
    if needs_ties(problem.sites, tie):
        labels, keys = tie_labels(problem.sites, tie, problem.pinned)
        base = tie_problem(problem, labels)
        subs = [None if sub is None else tie_problem(sub, labels) for sub in subs]
        extra["tie"] = _tie_record(tie, keys)
    live = [d for d, sub in enumerate(subs) if sub is not None]
    gain, cost, _, _ = _device_arrays(base)
    stacked = [np.stack([getattr(subs[d], f) for d in live]) for f in ("mask", "budget", "group")]
    solve = jax.vmap(lambda m, b, g: lagrangian_allocate(gain, cost, m, b, g, config=config))
    sols = jax.device_get(solve(jnp.asarray(stacked[0]), jnp.asarray(stacked[1], jnp.float32),
                                jnp.asarray(stacked[2], jnp.int32)))
    best, bound = None, -np.inf
    for k, d in enumerate(live):
        sub = subs[d]
        choice = repair_budget_float64(sub, np.asarray(sols.choice[k], np.int64))
        value = float(sub.gain[np.arange(len(choice)), choice].sum())
        bound = max(bound, dual_value(sub.gain, sub.cost_rso, sub.mask, sub.budget, sols.lam[k]))
        if best is None or value > best[0]:
            best = (value, d, choice, sols.lam[k])
    _, depth, choice, lam = best
    if labels is not None:
        choice = choice[labels]  # every member takes its group's option
    extra.update({"multipliers": {r: float(v) for r, v in zip(problem.resources, lam)},
                  "timing_s": {"build": build_s, "solve": time.perf_counter() - t0}})
    _warn_if_empty(problem, choice)
    plan = to_plan(problem, choice, bound, "lagrangian", peft_options, extra)
    return with_step_use(plan, problem.sites, profile, depth)


def _warn_if_empty(problem: Problem, choice: np.ndarray) -> None:
    """``UserWarning`` when ``choice`` adapts no site, naming the budgets and the cheapest option."""
    if any(problem.options[int(c)][0] != "none" for c in choice):
        return
    cost = problem.cost_rso[:, :, 1:]  # [R, S, O-1] without the "none" option
    cheapest = {r: float(c[c > 0].min()) if (c > 0).any() else None
                for r, c in zip(problem.resources, cost)}
    effective = {r: float(b) for r, b in zip(problem.resources, problem.budget)}
    why = ("every utility is 0" if not np.any(problem.utility > 0)
           else "no option fits the budgets")
    warnings.warn(f"allocate returned an empty plan ({why}): budgets {dict(problem.budgets)} "
                  f"(effective {effective}); the cheapest option costs {cheapest}", UserWarning,
                  stacklevel=3)


def allocate_curve(sites: Sequence[Site], utility, budgets: Mapping[str, Sequence[float]], *,
                   config: SolverConfig = SolverConfig(), **kwargs) -> list[Plan]:
    """Plans for a batch of budgets in one vmapped solve: a utility-vs-budget curve.

    ``budgets`` maps each resource to a sequence of limits (all of one length ``n``); the other
    keyword arguments are those of :func:`allocate`. Returns ``n`` plans.
    """
    if not isinstance(budgets, Mapping) or not budgets:
        raise ValueError("allocate_curve needs budgets {resource: [limit, ...]}")
    columns = {k: np.atleast_1d(np.asarray(v, np.float64)) for k, v in budgets.items()}
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"allocate_curve budgets must all have one length, got {lengths}")
    n = next(iter(lengths.values()))
    peft_options = kwargs.pop("peft_options", None)
    # the largest budgets define the options that exist at all (so shapes are shared)
    largest = {k: float(np.max(v)) for k, v in columns.items()}
    problem = build_problem(sites, utility, largest, **kwargs)
    hi = problem.utilisation[1] if problem.utilisation else 1.0
    batch = np.stack([columns[r] * hi for r in problem.resources], axis=1)  # [n, R]
    gain, cost, mask, group = _device_arrays(problem)
    solve = jax.vmap(lambda b: lagrangian_allocate(gain, cost, mask, b, group, config=config))
    sols = jax.device_get(solve(jnp.asarray(batch, jnp.float32)))
    plans = []
    for j in range(n):
        given = {k: float(columns[k][j]) for k in budgets}
        sub = dataclasses.replace(problem, budget=batch[j], budgets=given,
                                  mask=allowed_options(problem.cost_rso, problem.mask, batch[j]))
        if not bool(sols.feasible[j]):
            raise ValueError(f"budgets {given} are below the mandatory minimum of the sites")
        choice = repair_budget_float64(sub, np.asarray(sols.choice[j], np.int64))
        bound = dual_value(sub.gain, sub.cost_rso, sub.mask, sub.budget, sols.lam[j])
        extra = {"multipliers": {r: float(v) for r, v in zip(sub.resources, sols.lam[j])}}
        plans.append(to_plan(sub, choice, bound, "lagrangian", peft_options, extra))
    return plans
