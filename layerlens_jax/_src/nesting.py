"""Exclusive nesting: never adapt a site together with one of its ancestors or descendants.

A block's utility is the sum of its layers', so additive gains credit nested options (an adapter on
``layers_3/mlp`` and LoRA on ``layers_3/mlp/intermediate``) twice with the same signal.
:func:`resolve_nesting` re-solves with pins until no adapted site nests another;
:func:`~layerlens_jax._src.exact.allocate_exact` has the exact optimum it approximates.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from layerlens_jax._src.plan import Plan
from layerlens_jax._src.sites import Site

__all__ = ["nested_conflicts", "resolve_nesting"]


def nested_conflicts(plan: Plan) -> list[tuple[str, tuple[str, ...]]]:
    """``(ancestor, adapted descendants)`` for every adapted site with adapted descendants
    (paths nest by ``"/"``), outermost ancestors first."""
    adapted = sorted(a.site for a in plan.allocations if a.method != "none")
    out = []
    for anc in adapted:
        desc = tuple(d for d in adapted if d.startswith(anc + "/"))
        if desc:
            out.append((anc, desc))
    return out


def _gain_per_budget(by_site: Mapping[str, Any], paths, finite: Mapping[str, float]) -> float:
    """``gain / sum_r cost_r / budget_r`` of the sites ``paths`` together (inf when free)."""
    g = sum(by_site[p].gain for p in paths)
    c = sum(by_site[p].cost[r] / b for p in paths for r, b in finite.items())
    return g / c if c > 0 else math.inf


def _settle(solve, user: Mapping[str, Any], finite: Mapping[str, float], rounds: int,
            pins: Mapping[str, Any], decided: Mapping[str, tuple]):
    """Solve, pin the losing side of every nested conflict to ``none``, repeat until none is left.

    Returns ``(plan, pins, decided)``; ``decided[ancestor] = (losers, winners not user-pinned)``."""
    pins, decided = dict(pins), dict(decided)
    for _ in range(rounds):
        plan = solve(pinned=pins or None)
        conflicts = nested_conflicts(plan)
        if not conflicts:
            return plan, pins, decided
        by_site = {a.site: a for a in plan.allocations}
        settled = set()
        for anc, desc in conflicts:
            if anc in settled or any(d in settled for d in desc):
                continue  # an outer conflict already pinned one side this round
            desc_free = [d for d in desc if d not in user]
            if anc in user and not desc_free:
                raise ValueError(f"pinned site {anc!r} nests pinned site(s) {list(desc)}: "
                                 f"exclusive nesting cannot hold")
            keep_ancestor = anc in user or (
                desc_free and _gain_per_budget(by_site, [anc], finite)
                >= _gain_per_budget(by_site, desc, finite))
            losers = desc_free if keep_ancestor else [anc]
            winners = [anc] if keep_ancestor else desc_free
            for p in losers:
                pins[p] = "none"
            decided[anc] = (tuple(losers), tuple(w for w in winners if w not in user))
            settled.update((anc, *desc))
    raise RuntimeError(f"exclusive nesting did not settle in {rounds} rounds")  # a bug


def resolve_nesting(solve, sites: Sequence[Site], budgets: Mapping[str, float],
                    pinned: Mapping[str, Any] | None = None, max_rounds: int = 64) -> Plan:
    """Re-solve until no site is adapted together with an ancestor or descendant.

    ``solve(pinned=...)`` returns a plan. Each round settles every conflict (outermost first) by
    gain per unit of budget, ``gain / sum_r cost_r / budget_r`` over the finite budgets: the
    ancestor's option against its adapted descendants' together; the losing side is pinned to
    ``none`` and the freed budget re-allocated by the next solve. Then one local-search pass flips
    each decision in turn (pins the other side instead, re-settles) and keeps a flip that raises
    the objective. User pins are kept (a conflict between two user-pinned sites is an error
    naming them). Each settling round pins at least one more site, so it ends within
    ``len(sites)`` rounds.
    """
    user = dict(pinned or {})
    finite = {r: float(b) for r, b in budgets.items() if math.isfinite(float(b)) and float(b) > 0}
    rounds = max(1, min(max_rounds, len(sites) + 1))
    plan, pins, decided = _settle(solve, user, finite, rounds, user, {})
    for anc in list(decided):  # one local-search pass over the decisions
        if anc not in decided:
            continue  # an accepted flip re-settled without this conflict
        losers, winners = decided[anc]
        if not winners:
            continue  # the winning side is user-pinned: nothing to flip
        trial = {k: v for k, v in pins.items() if k not in losers or k in user}
        trial.update({w: "none" for w in winners})
        flipped = {**decided, anc: (winners, tuple(x for x in losers if x not in user))}
        cand, cand_pins, cand_decided = _settle(solve, user, finite, rounds, trial, flipped)
        if cand.objective > plan.objective * (1 + 1e-9):
            plan, pins, decided = cand, cand_pins, cand_decided
    return plan
