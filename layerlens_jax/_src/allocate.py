"""Allocation: one option (method, size) per site, maximising predicted gain under every budget.

The problem is a multiple-choice, multi-resource knapsack over a sites x options matrix::

    maximise   sum_s g[s, o_s]
    subject to sum_s c[r, s, o_s] <= B[r]   for every budgeted resource r
               o_s in the options allowed for site s (compatible, within min/max size, pinned)

:func:`lagrangian_allocate` solves it in XLA, jit-compiled, with no Python loop over sites:

1. **Normalise.** Costs in fractions of each budget (``c / B``), gains by their maximum. Options that
   alone exceed a budget are dropped. The *base* option of a site is its cheapest allowed one.
2. **Dual.** The Lagrangian ``L(lam) = sum_s max_o (g[s,o] - lam . c[:,s,o]) + sum_r lam_r`` is an upper
   bound on the optimum for every ``lam >= 0`` (weak duality). It is minimised by cyclic coordinate
   descent: for each resource, the multiplier where that resource's use under the per-site argmax
   crosses the budget, by bisection in log space. Above ``dual_sites`` sites the multipliers are first
   fitted on an evenly strided subsample whose costs are scaled by ``S/n`` (the dual is an average over
   sites; its multipliers are the full problem's times ``n/S``).
3. **Compression** (above ``greedy_sites`` sites, when there are more options than candidates): each
   site keeps ``K`` candidate options, the argmax of ``g - theta * lam . c`` over a grid of ``theta``,
   the neighbours of the ``theta = 1`` argmax and the base, in option order; the multipliers are then
   refined on the whole ``S x K`` matrix (warm-started bisection). Every later step runs on it.
4. **Primal.** The per-site argmax at each ``theta * lam`` is a candidate assignment; the best one within
   every budget (or the base assignment) starts a **greedy fill** of the slack: each site proposes its
   best upgrade (to one of its candidate options or the next option) by gain per unit of remaining
   capacity ``dg / sum_r (dc_r / slack_r)``; proposals are taken in that order while the running sum of
   their positive cost increments fits every budget. Up to ``greedy_sites`` sites the fill is the
   sequential greedy, run from every start, then a ruin-and-recreate **local search** moves one site
   to any option, repairs an excess by the cheapest downgrades of the others and refills.
5. **Monotone repair.** Sites with identical cost rows and allowed options form a group in which the
   gain rows are proportional to utility; within each group the chosen options are re-dealt so the
   larger utility gets the larger option (the rearrangement inequality: same costs, gain never lower).
   Hence sizes are monotone in utility among sites of equal cost structure, exactly.
6. The result carries ``dual_bound = L(lam)`` on the full matrix: ``objective <= optimum <= dual_bound``.

The function is pure and vmappable over budgets (:func:`allocate_curve`). :func:`allocate` is the
public entry that builds the matrices from sites, utility and a :class:`~layerlens_jax._src.costs.CostModel`,
verifies the result in float64 (hard budget check, repaired if float32 rounding ever crossed a
budget) and returns a :class:`~layerlens_jax._src.plan.Plan`. :func:`allocate_exact` solves the same
problem as a MILP with ``scipy.optimize.milp`` (HiGHS) for reference.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from layerlens_jax._src.costs import (RESOURCES, Catalogue, CostModel, GainModel, cost_class,
                                 option_costs, option_mask)
from layerlens_jax._src.methods import METHODS, default_peft_options
from layerlens_jax._src.plan import Plan, SiteAllocation
from layerlens_jax._src.sites import Site

__all__ = [
    "SolverConfig",
    "Solution",
    "Problem",
    "build_problem",
    "lagrangian_allocate",
    "solve_exact",
    "dual_value",
    "allocate",
    "allocate_exact",
    "allocate_curve",
]

_NEG = -1.0e30


class SolverConfig(NamedTuple):
    """Static settings of :func:`lagrangian_allocate` (hashable: a jit static argument)."""

    sweeps: int = 3  # coordinate-descent sweeps over the multipliers
    bisect_steps: int = 18  # bisection steps per multiplier (log space, 9 decades)
    dual_sites: int = 256  # fit the first multipliers on at most this many sites (strided subsample)
    thetas: tuple[float, ...] = (0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2.0)  # primal starts: theta * lam
    fill_rounds: int = 64  # greedy-fill rounds (each accepts at least one upgrade, or stops)
    margin: float = 2e-6  # keep float32 use this fraction below each budget
    greedy_sites: int = 64  # up to this many sites: sequential greedy fill from every start
    search_sites: int = 64  # up to this many sites: ruin-and-recreate local search ...
    search_passes: int = 4  # ... of at most this many passes
    search_variants: int = 4096  # try every (site, option) move when 2*S*O is at most this
    candidate_thetas: tuple[float, ...] = (0.5, 0.8, 1.0, 1.25, 2.0)  # compression grid
    refine_sweeps: int = 2  # dual refinement on the compressed matrix
    refine_steps: int = 10
    refine_span: float = 2.0  # warm-start bracket lam0 * exp(+-span)


class Solution(NamedTuple):
    """Result of :func:`lagrangian_allocate` (arrays; leading batch axis when vmapped)."""

    choice: jax.Array  # int32 [S]: the chosen option per site
    objective: jax.Array  # f32 []: sum of chosen gains
    dual_bound: jax.Array  # f32 []: Lagrangian upper bound on the optimum
    lam: jax.Array  # f32 [R]: multipliers, gain per unit of each resource
    use: jax.Array  # f32 [R]: resource use of the choice
    feasible: jax.Array  # bool []: False when even the cheapest options exceed a budget


# ------------------------------------------------------------------------- XLA solver (pure)


def _choose(g, cn, lam):
    """Per-site argmax of ``g - lam . c``: (choice [S], Lagrangian value, normalised use [R])."""
    score = g
    for r in range(cn.shape[0]):  # R is static and small: unrolled, fused elementwise
        score = score - lam[r] * cn[r]
    o = jnp.argmax(score, axis=1)
    best = jnp.take_along_axis(score, o[:, None], 1)[:, 0]
    return o, best.sum() + lam.sum(), _use(cn, o)


def _use(cn, o):
    return jnp.take_along_axis(cn, o[None, :, None], 2)[..., 0].sum(1)


def _dual(g, cn, sweeps, steps, lam0=None, span=0.0):
    """Cyclic coordinate minimisation of the Lagrangian by bisection on each multiplier.

    The bracket of each multiplier spans 9 decades below a bound where every costly option loses;
    with a warm start ``lam0`` it is ``lam0 * exp(+-span)`` for the positive entries."""
    R = cn.shape[0]
    ok = g > _NEG / 2
    gmin = jnp.min(jnp.where(ok, g, jnp.inf), axis=1)
    dg = jnp.where(ok, g - gmin[:, None], 0.0)
    ratio = jnp.stack([jnp.max(jnp.where(cn[r] > 0, dg / jnp.where(cn[r] > 0, cn[r], 1.0), 0.0))
                       for r in range(R)])
    log_hi = jnp.log(2.0 * jnp.maximum(ratio, 1e-30))
    log_lo = log_hi - 9.0 * math.log(10.0)
    if lam0 is not None:
        centre = jnp.log(jnp.maximum(lam0, 1e-30))
        log_lo = jnp.where(lam0 > 0, centre - span, log_lo)
        log_hi = jnp.where(lam0 > 0, centre + span, log_hi)

    def coord(r, lam):
        u0 = _choose(g, cn, lam.at[r].set(0.0))[2][r]

        def bisect(_, bracket):
            a, b = bracket
            mid = 0.5 * (a + b)
            over = _choose(g, cn, lam.at[r].set(jnp.exp(mid)))[2][r] > 1.0
            return jnp.where(over, mid, a), jnp.where(over, b, mid)

        _, b = jax.lax.fori_loop(0, steps, bisect, (log_lo[r], log_hi[r]))
        return lam.at[r].set(jnp.where(u0 <= 1.0, 0.0, jnp.exp(b)))

    def sweep(_, lam):
        return jax.lax.fori_loop(0, R, coord, lam)

    init = jnp.zeros((R,), g.dtype) if lam0 is None else lam0
    return jax.lax.fori_loop(0, sweeps, sweep, init)


def _fill(g, cn, ok, cur, slack, cand, rounds, limit, by_gain=False):
    """Greedy fill of the slack: parallel proposals, accepted in ratio order while they fit
    (at most ``limit`` per round; ``limit = 1`` is the classic sequential greedy)."""
    S, O = g.shape

    def cond(state):
        return state[3] & (state[2] < rounds)

    def body(state):
        cur, slack, i, _ = state
        cands = jnp.concatenate([cand, jnp.minimum(cur + 1, O - 1)[:, None]], axis=1)  # [S, K+1]
        g_cur = jnp.take_along_axis(g, cur[:, None], 1)
        dg = jnp.take_along_axis(g, cands, 1) - g_cur
        c_cur = jnp.take_along_axis(cn, cur[None, :, None], 2)
        dc = jnp.take_along_axis(cn, cands[None], 2) - c_cur  # [R, S, K+1]
        fits = jnp.all(dc <= slack[:, None, None], axis=0)
        valid = fits & (dg > 1e-7) & jnp.take_along_axis(ok, cands, 1)
        weight = 1.0 / jnp.maximum(slack, 1e-12)
        denom = jnp.sum(weight[:, None, None] * jnp.maximum(dc, 0.0), axis=0)
        ratio = jnp.where(valid, jnp.where(by_gain, dg, dg / (denom + 1e-30)), -jnp.inf)
        kb = jnp.argmax(ratio, axis=1)
        vb = jnp.take_along_axis(valid, kb[:, None], 1)[:, 0]
        rb = jnp.take_along_axis(ratio, kb[:, None], 1)[:, 0]
        dcb = jnp.take_along_axis(dc, kb[None, :, None], 2)[..., 0]  # [R, S]
        order = jnp.argsort(-rb)
        cum = jnp.cumsum(jnp.maximum(dcb[:, order], 0.0), axis=1)
        take_sorted = vb[order] & jnp.all(cum <= slack[:, None], axis=0)
        if limit < S:
            take_sorted &= jnp.arange(S) < limit
        accept = jnp.zeros((S,), bool).at[order].set(take_sorted)
        new = jnp.take_along_axis(cands, kb[:, None], 1)[:, 0]
        cur = jnp.where(accept, new, cur)
        slack = slack - jnp.sum(jnp.where(accept[None], dcb, 0.0), axis=1)
        return cur, slack, i + 1, jnp.any(accept)

    cur, slack, _, _ = jax.lax.while_loop(cond, body, (cur, slack, jnp.int32(0), jnp.bool_(True)))
    return cur


def _weighted(cn, lam):
    w = lam[0] * cn[0]
    for r in range(1, cn.shape[0]):
        w = w + lam[r] * cn[r]
    return w


def _core(g, cn, ok, base, base_use, cap, lam, thetas, config, small):
    """Primal phase on a sites x options matrix: Lagrangian choices over the theta grid, the best
    one within budget (or the cheapest options) as start, then the greedy fill (small problems:
    sequential greedy from every start, then local search). Returns (choice, best lam, values)."""
    S, O = g.shape
    choices, values, uses = jax.lax.map(lambda t: _choose(g, cn, lam * t), thetas)  # [K,S],[K],[K,R]
    starts = jnp.concatenate([choices, base[None]], axis=0)
    start_use = jnp.concatenate([uses, base_use[None]], axis=0)
    start_obj = jnp.sum(jnp.take_along_axis(g[None], starts[..., None], 2)[..., 0], axis=1)
    start_ok = jnp.all(start_use <= cap, axis=1)
    if small:
        slacks = jnp.where(start_ok[:, None], cap - start_use, cap - base_use)
        starts = jnp.where(start_ok[:, None], starts, base[None])
        fills = jax.vmap(lambda c, sl: _fill(g, cn, ok, c, sl, choices.T, 8 * S + 64, 1))(
            starts, slacks)
        objs = jnp.sum(jnp.take_along_axis(g[None], fills[..., None], 2)[..., 0], axis=1)
        cur = fills[jnp.argmax(objs)]
        if S <= config.search_sites:
            cur = _local_search(g, cn, ok, cur, base, cap, choices.T, config.search_passes,
                                config.search_variants)
    else:
        k0 = jnp.argmax(jnp.where(start_ok, start_obj, -jnp.inf))
        cur = _fill(g, cn, ok, starts[k0], cap - start_use[k0], choices.T, config.fill_rounds, S)
    kb = jnp.argmin(values)
    return cur, lam * thetas[kb], values


def _repair_down(g, cn, ok, cur, slack, base, fixed, rounds):
    """Sequential repair of an over-budget assignment: downgrade (to the next lower or the cheapest
    option) the site losing least gain per share of the excess it frees; ``fixed`` stays."""
    S = g.shape[0]
    ar = jnp.arange(S)

    def cond(state):
        return jnp.any(state[1] < 0) & (state[2] < rounds)

    def body(state):
        cur, slack, i = state
        down = jnp.maximum(cur - 1, 0)
        cands = jnp.stack([base, jnp.where(ok[ar, down], down, base)], axis=1)  # [S, 2]
        dg = jnp.take_along_axis(g, cands, 1) - jnp.take_along_axis(g, cur[:, None], 1)
        dc = (jnp.take_along_axis(cn, cands[None], 2)
              - jnp.take_along_axis(cn, cur[None, :, None], 2))  # [R, S, 2]
        excess = jnp.maximum(-slack, 0.0)
        share = jnp.where(excess[:, None, None] > 0,
                          jnp.maximum(-dc, 0.0) / jnp.maximum(excess, 1e-30)[:, None, None], 0.0)
        freed = jnp.sum(share, axis=0)
        valid = (freed > 0) & (ar != fixed)[:, None] & (cands != cur[:, None])
        ratio = jnp.where(valid, -dg / freed, jnp.inf).reshape(-1)
        j = jnp.argmin(ratio)
        s_, k_ = j // 2, j % 2
        ok_ = jnp.isfinite(ratio[j])
        cur = jnp.where(ok_ & (ar == s_), cands[s_, k_], cur)
        slack = slack - jnp.where(ok_, dc[:, s_, k_], 0.0)
        return cur, slack, jnp.where(ok_, i + 1, rounds)

    cur, slack, _ = jax.lax.while_loop(cond, body, (cur, slack, jnp.int32(0)))
    return cur, slack


def _local_search(g, cn, ok, cur, base, cap, cand, passes, max_variants):
    """Ruin and recreate, for small problems: move one site to another option (every option when
    ``2*S*O <= max_variants``, else its cheapest, next lower and next higher one), repair any excess
    by greedy downgrades of the other sites, refill the slack greedily (by gain per capacity and,
    separately, by plain gain); keep the best variant, repeat while it improves."""
    S, O = g.shape

    def objective(c):
        return jnp.sum(jnp.take_along_axis(g, c[:, None], 1))

    if 2 * S * O <= max_variants:
        sites = jnp.repeat(jnp.arange(S), O)
        to_fn = lambda cur: jnp.tile(jnp.arange(O), S)  # noqa: E731
    else:
        sites = jnp.concatenate([jnp.arange(S)] * 3)

        def to_fn(cur):
            down = jnp.maximum(cur - 1, 0)
            return jnp.concatenate([base, jnp.where(ok[jnp.arange(S), down], down, base),
                                    jnp.minimum(cur + 1, O - 1)])
    sites = jnp.concatenate([sites, sites])
    by_gain = jnp.arange(sites.shape[0]) >= sites.shape[0] // 2

    def variant(cur, site, to, bg):
        c = cur.at[site].set(to)
        sl = cap - _use(cn, c)
        c, sl = _repair_down(g, cn, ok, c, sl, base, site, 2 * S + 8)
        feasible = ok[site, to] & jnp.all(sl >= 0)
        c = _fill(g, cn, ok, c, jnp.maximum(sl, 0.0), cand, 4 * S + 16, 1, bg)
        return jnp.where(feasible, c, cur)

    def one_pass(state):
        cur, _, i = state
        to = jnp.concatenate([to_fn(cur), to_fn(cur)])
        fills = jax.vmap(variant, in_axes=(None, 0, 0, 0))(cur, sites, to, by_gain)
        objs = jax.vmap(objective)(fills)
        k = jnp.argmax(objs)
        better = objs[k] > objective(cur) + 1e-7
        return jnp.where(better, fills[k], cur), better, i + 1

    cur, _, _ = jax.lax.while_loop(lambda st: st[1] & (st[2] < passes), one_pass,
                                   (cur, jnp.bool_(True), jnp.int32(0)))
    return cur


def _monotone(g, ok, cur, group):
    """Re-deal chosen options within each equal-cost group so that utility order = size order."""
    rowsum = jnp.sum(jnp.where(ok, g, 0.0), axis=1)  # proportional to utility within a group
    key = g[group, cur]  # gain of each chosen option on the group's representative row
    idx = jnp.arange(cur.shape[0])
    by_site = jax.lax.sort((group, rowsum, idx), num_keys=2)[2]
    by_choice = jax.lax.sort((group, key, idx), num_keys=2)[2]
    return jnp.zeros_like(cur).at[by_site].set(cur[by_choice])


@functools.partial(jax.jit, static_argnames=("config",))
def lagrangian_allocate(gain: jax.Array, cost: jax.Array, mask: jax.Array, budget: jax.Array,
                        group: jax.Array | None = None, *,
                        config: SolverConfig = SolverConfig()) -> Solution:
    """Vectorised Lagrangian allocation on arrays (jit-compiled, vmappable over ``budget``).

    Args:
      gain: f32 ``[S, O]`` predicted gains (>= 0).
      cost: f32 ``[R, S, O]`` costs, resource-major (each resource a contiguous plane).
      mask: bool ``[S, O]`` allowed options; every site needs at least one.
      budget: f32 ``[R]`` budgets (``inf``: unconstrained; 0 allowed).
      group: optional int32 ``[S]``: for each site the index of a representative site with an
        identical cost row and mask and a gain row proportional to it, the representative having the
        largest gains (see :func:`build_problem`); sizes are then monotone in utility within groups.
      config: static :class:`SolverConfig`.

    Returns a :class:`Solution`; ``choice`` is within every budget whenever ``feasible``.
    """
    gain = jnp.asarray(gain, jnp.float32)
    cost = jnp.asarray(cost, jnp.float32)
    budget = jnp.asarray(budget, jnp.float32)
    mask = jnp.asarray(mask, bool)
    S, O = gain.shape
    R = cost.shape[0]
    if cost.shape != (R, S, O) or mask.shape != (S, O) or budget.shape != (R,):
        raise ValueError(f"shape mismatch: gain {gain.shape}, cost {cost.shape} (want [R, S, O]), "
                         f"mask {mask.shape}, budget {budget.shape}")
    group = jnp.arange(S) if group is None else jnp.asarray(group, jnp.int32)

    planes = [jnp.where(cost[r] == 0, 0.0, cost[r] / budget[r]) for r in range(R)]
    ok = mask
    for plane in planes:  # per-plane ops: XLA:CPU reduces slowly over a leading axis
        ok = ok & (plane <= 1.0)
    cn = jnp.stack([jnp.where(ok, plane, 0.0) for plane in planes])
    gmax = jnp.max(jnp.where(ok, gain, 0.0))
    gscale = jnp.where(gmax > 0, gmax, 1.0)
    g = jnp.where(ok, gain / gscale, _NEG)
    cap = 1.0 - config.margin

    base = jnp.argmin(jnp.where(ok, _weighted(cn, jnp.ones((R,), cn.dtype)), jnp.inf), axis=1)
    base_use = _use(cn, base)
    feasible = jnp.all(jnp.any(ok, axis=1)) & jnp.all(base_use <= cap)

    n = min(S, config.dual_sites)
    idx = (np.arange(n) * S) // n  # evenly strided subsample (all sites when n == S)
    # costs scaled by S/n on the subsample: its multipliers are the full problem's times n/S
    lam = _dual(g[idx], cn[:, idx] * (S / n), config.sweeps, config.bisect_steps) * (S / n)
    thetas = jnp.asarray(config.thetas, jnp.float32)
    K = len(config.candidate_thetas) + 3
    if S <= config.greedy_sites or O <= K:
        if n < S:
            lam = _dual(g, cn, config.refine_sweeps, config.refine_steps, lam, config.refine_span)
        cur, lam, _ = _core(g, cn, ok, base, base_use, cap, lam, thetas, config, S <= config.greedy_sites)
    else:
        # compress the options to K candidates per site: argmax of g - theta*lam.c over a grid of
        # theta, the neighbours of the theta=1 argmax and the cheapest option, in option order
        w = _weighted(cn, lam)
        firsts = [jnp.argmax(g - t * w, axis=1) for t in config.candidate_thetas]
        o1 = firsts[len(firsts) // 2]
        cand = jnp.stack(firsts + [jnp.maximum(o1 - 1, 0), jnp.minimum(o1 + 1, O - 1), base], axis=1)
        cand = jnp.sort(cand, axis=1)
        gc = jnp.take_along_axis(g, cand, 1)
        okc = jnp.take_along_axis(ok, cand, 1)
        gc = jnp.where(okc, gc, _NEG)
        cc = jnp.take_along_axis(cn, cand[None], 2)
        base_c = jnp.argmax(cand == base[:, None], axis=1)
        lam = _dual(gc, cc, config.refine_sweeps, config.refine_steps, lam, config.refine_span)
        cur_c, lam, _ = _core(gc, cc, okc, base_c, base_use, cap, lam, thetas, config, False)
        cur = jnp.take_along_axis(cand, cur_c[:, None], 1)[:, 0]
    _, value, _ = _choose(g, cn, lam)
    cur = _monotone(g, ok, cur, group)
    cur = jnp.where(feasible, cur, base).astype(jnp.int32)

    lam_nat = jnp.where(jnp.isfinite(budget) & (budget > 0), lam * gscale / budget, 0.0)
    objective = jnp.sum(jnp.take_along_axis(gain, cur[:, None], 1))
    use = jnp.take_along_axis(cost, cur[None, :, None], 2)[..., 0].sum(1)
    return Solution(cur, objective, value * gscale, lam_nat, use, feasible)


# --------------------------------------------------------------------------- float64 helpers


def _allowed(cost_rso: np.ndarray, mask: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Allowed options that also fit each budget on their own (float64)."""
    with np.errstate(invalid="ignore"):
        fits = np.all((cost_rso <= budget[:, None, None]) | (cost_rso == 0), axis=0)
    return np.asarray(mask, bool) & fits


def dual_value(gain: np.ndarray, cost: np.ndarray, mask: np.ndarray, budget: np.ndarray,
               lam: np.ndarray) -> float:
    """The Lagrangian ``sum_s max_o (g - lam . c) + lam . B`` in float64: an upper bound on the
    optimum for every ``lam >= 0`` (``cost`` resource-major ``[R, S, O]``, ``B`` may be inf)."""
    gain = np.asarray(gain, np.float64)
    cost = np.asarray(cost, np.float64)
    budget = np.asarray(budget, np.float64)
    lam = np.where(np.isfinite(budget), np.maximum(np.asarray(lam, np.float64), 0.0), 0.0)
    ok = _allowed(cost, mask, budget)
    score = gain - np.tensordot(lam, cost, axes=(0, 0))
    score = np.where(ok, score, -np.inf).max(axis=1)
    return float(score.sum() + np.sum(lam * np.where(np.isfinite(budget), budget, 0.0)))


def solve_exact(gain: np.ndarray, cost: np.ndarray, mask: np.ndarray, budget: np.ndarray, *,
                time_limit: float | None = None, mip_rel_gap: float = 1e-6,
                exclusive: Sequence[tuple[int, int]] = ()):
    """The same problem as a MILP (``scipy.optimize.milp``, HiGHS), arrays in, arrays out.

    Binary ``x[s,o]`` for every allowed option, one per site, resource rows normalised by their
    budgets; for each ``(i, j)`` in ``exclusive`` at most one of sites ``i`` and ``j`` takes an
    option other than option 0 (``none``). Returns ``(choice int [S], objective, bound, status
    message)``; ``bound`` is HiGHS's dual bound (equal to the objective, up to ``mip_rel_gap``,
    when solved to optimality).
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    gain = np.asarray(gain, np.float64)
    cost = np.asarray(cost, np.float64)
    budget = np.asarray(budget, np.float64)
    S, O = gain.shape
    ok = _allowed(cost, mask, budget)
    if not ok.any(axis=1).all():
        bad = int(np.flatnonzero(~ok.any(axis=1))[0])
        raise ValueError(f"site index {bad} has no allowed option within the budgets")
    s_idx, o_idx = np.nonzero(ok)
    nv = len(s_idx)
    gscale = max(gain[s_idx, o_idx].max(initial=0.0), 1e-300)
    c = -gain[s_idx, o_idx] / gscale
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
    options = {"mip_rel_gap": mip_rel_gap}
    if time_limit is not None:
        options["time_limit"] = float(time_limit)
    res = milp(c, constraints=rows, integrality=np.ones(nv), bounds=Bounds(0, 1), options=options)
    if res.x is None:
        raise ValueError(f"MILP found no feasible allocation: {res.message}")
    x = res.x > 0.5
    choice = np.zeros(S, np.int64)
    choice[s_idx[x]] = o_idx[x]
    objective = float(gain[np.arange(S), choice].sum())
    bound = getattr(res, "mip_dual_bound", None)
    bound = objective if bound is None or not np.isfinite(bound) else max(objective, -bound * gscale)
    return choice, objective, float(bound), str(res.message)


# ----------------------------------------------------------------------- problem construction


@dataclasses.dataclass(frozen=True)
class Problem:
    """The numeric allocation problem built from sites (float64 numpy, shared by all solvers)."""

    sites: tuple[Site, ...]
    options: tuple[tuple[str, int], ...]
    utility: np.ndarray  # [S]
    gain: np.ndarray  # [S, O]
    cost: np.ndarray  # [S, O, len(RESOURCES)]: every resource, for the plan
    mask: np.ndarray  # [S, O] allowed (compatible, sizes, pins, fits the budgets alone)
    resources: tuple[str, ...]  # the budgeted resources, in RESOURCES order
    budget: np.ndarray  # [R] effective budgets (utilisation-scaled)
    budgets: Mapping[str, float]  # as given
    group: np.ndarray  # [S] representative site of each equal-cost group
    pinned: np.ndarray  # [S] bool
    utilisation: tuple[float, float] | None
    catalogue: Catalogue
    cost_model: CostModel
    gain_model: GainModel

    @property
    def cost_rso(self) -> np.ndarray:
        """Costs of the budgeted resources, resource-major ``[R, S, O]``."""
        idx = [RESOURCES.index(r) for r in self.resources]
        return np.ascontiguousarray(np.moveaxis(self.cost[..., idx], -1, 0))


def _site_map(sites: Sequence[Site], arg: Mapping, what: str) -> dict[int, Any]:
    index = {s.path: i for i, s in enumerate(sites)}
    out = {}
    for path, value in arg.items():
        if path not in index:
            raise ValueError(f"{what} names site {path!r}, which is not among the sites")
        out[index[path]] = value
    return out


def _check_budgets(budgets: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(budgets, Mapping) or not budgets:
        raise ValueError(f"budgets must be a non-empty mapping over {RESOURCES}, got {budgets!r}")
    out = {}
    for key, value in budgets.items():
        if key not in RESOURCES:
            raise ValueError(f"unknown budget resource {key!r}; expected one of {RESOURCES}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"budget {key!r} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value) or value < 0:
            raise ValueError(f"budget {key!r} must be >= 0 (inf: unconstrained), got {value!r}")
        out[key] = value
    return out


def _check_utilisation(utilisation) -> tuple[float, float] | None:
    if utilisation is None:
        return None
    if isinstance(utilisation, (int, float)) and not isinstance(utilisation, bool):
        band = (0.0, float(utilisation))
    else:
        try:
            lo, hi = utilisation
            band = (float(lo), float(hi))
        except (TypeError, ValueError):
            raise ValueError(f"utilisation must be a fraction or a (low, high) band, got "
                             f"{utilisation!r}") from None
    lo, hi = band
    if not (0.0 <= lo <= hi <= 1.0) or hi == 0.0:
        raise ValueError(f"utilisation band must satisfy 0 <= low <= high <= 1 and high > 0, "
                         f"got {utilisation!r}")
    return band


def _size_limits(sites, value, what) -> dict[int, int]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = _site_map(sites, value, what)
    else:
        items = {i: value for i in range(len(sites))}
    for i, v in items.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{what} for site {sites[i].path!r} must be an int >= 0, got {v!r}")
    return {i: int(v) for i, v in items.items()}


def _parse_pin(path: str, value) -> tuple[str, int]:
    if value is None or value == "none":
        return ("none", 0)
    try:
        method, size = value
    except (TypeError, ValueError):
        raise ValueError(f"pinned[{path!r}] must be 'none' or (method, size), got {value!r}") from None
    if method not in METHODS:
        raise ValueError(f"pinned[{path!r}] has unknown method {method!r}; expected {METHODS}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0 \
            or (method == "none") != (size == 0):
        raise ValueError(f"pinned[{path!r}] has invalid size {size!r} for method {method!r}")
    return (str(method), int(size))


def build_problem(sites: Sequence[Site], utility, budgets: Mapping[str, float], *,
                  catalogue: Catalogue | None = None, cost_model: CostModel | None = None,
                  gain_model: GainModel | None = None, pinned: Mapping[str, Any] | None = None,
                  min_size: int | Mapping[str, int] | None = None,
                  max_size: int | Mapping[str, int] | None = None,
                  utilisation: float | tuple[float, float] | None = None) -> Problem:
    """Validate the inputs and build the sites x options matrices.

    ``pinned``: ``{path: "none" | (method, size)}`` fixes those sites (sizes off the grid are added
    to it). ``min_size`` / ``max_size``: an int for every site, or ``{path: int}``; a positive
    ``min_size`` makes adaptation mandatory (an int applies only to sites with a compatible method;
    a per-site value is strict), ``max_size = 0`` forbids it. ``utilisation``: a fraction ``hi`` or a
    band ``(lo, hi)``: every budget is scaled by ``hi`` (``lo`` is checked by :func:`plan_metrics`).
    """
    sites = tuple(sites)
    if not sites:
        raise ValueError("allocate needs at least one site")
    for s in sites:
        if not isinstance(s, Site):
            raise TypeError(f"sites must be layerlens_jax._src.sites.Site records, got {type(s).__name__}")
    paths = [s.path for s in sites]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"site {dup!r} appears twice in the sites")
    u = np.asarray(utility, np.float64)
    if u.shape != (len(sites),):
        raise ValueError(f"utility must have one value per site: shape {u.shape}, "
                         f"{len(sites)} sites")
    bad = np.flatnonzero(~np.isfinite(u) | (u < 0))
    if len(bad):
        raise ValueError(f"utility of site {sites[bad[0]].path!r} is {u[bad[0]]!r}; utilities must "
                         f"be finite and >= 0")
    budgets = _check_budgets(budgets)
    band = _check_utilisation(utilisation)
    catalogue = catalogue or Catalogue()
    cost_model = cost_model or CostModel()
    gain_model = gain_model or GainModel()

    pins = {i: _parse_pin(sites[i].path, v) for i, v in _site_map(sites, pinned or {}, "pinned").items()}
    for i, (method, size) in pins.items():
        if method != "none" and not catalogue.compatible(sites[i].kind, method):
            raise ValueError(f"pinned[{sites[i].path!r}] = {method}({size}) is incompatible with its "
                             f"kind {sites[i].kind!r} in this catalogue")
    extra: dict[str, set] = {}
    for method, size in pins.values():
        if method != "none":
            extra.setdefault(method, set()).add(size)
    if extra:
        catalogue = catalogue.with_sizes(extra)
    options = catalogue.options()
    mask = option_mask(sites, options, catalogue)
    for i, pin in pins.items():  # a pinned size is allowed even above the full-rank cap
        j = options.index(pin)
        mask[i] = False
        mask[i, j] = True
    cost = option_costs(sites, options, cost_model, mask=mask)
    sizes = np.array([s for _, s in options])
    adaptable = mask[:, 1:].any(axis=1)
    mins = _size_limits(sites, min_size, "min_size")
    maxs = _size_limits(sites, max_size, "max_size")
    strict = isinstance(min_size, Mapping)
    for i, k in mins.items():
        if i in pins or k == 0 or (not strict and not adaptable[i]):
            continue
        mask[i] &= sizes >= k
        mask[i, 0] = False
    for i, k in maxs.items():
        if i in pins:
            continue
        mask[i] &= sizes <= k
    if mins and maxs:
        for i in set(mins) & set(maxs):
            if mins[i] > maxs[i]:
                raise ValueError(f"site {sites[i].path!r}: min_size {mins[i]} > max_size {maxs[i]}")
    empty = np.flatnonzero(~mask.any(axis=1))
    if len(empty):
        s = sites[empty[0]]
        raise ValueError(f"site {s.path!r} ({s.kind}) has no allowed option: check its min_size / "
                         f"max_size / pin against the catalogue's sizes for its kind")

    resources = tuple(r for r in RESOURCES if r in budgets)
    hi = band[1] if band else 1.0
    budget = np.array([budgets[r] * hi for r in resources])
    ridx = [RESOURCES.index(r) for r in resources]
    c_rso = np.moveaxis(cost[..., ridx], -1, 0)
    allowed = _allowed(c_rso, mask, budget)
    empty = np.flatnonzero(~allowed.any(axis=1))
    if len(empty):
        i = int(empty[0])
        cheapest = {r: float(c_rso[k, i][mask[i]].min()) for k, r in enumerate(resources)}
        raise ValueError(f"site {sites[i].path!r}: even its cheapest allowed option exceeds a budget "
                         f"(cheapest cost {cheapest}, effective budgets "
                         f"{dict(zip(resources, budget.tolist()))})")
    for k, r in enumerate(resources):
        floor = np.where(allowed, c_rso[k], np.inf).min(axis=1)
        if floor.sum() > budget[k] * (1 + 1e-12):
            top = np.argsort(-floor)[:3]
            who = ", ".join(f"{sites[i].path!r} ({floor[i]:.4g})" for i in top if floor[i] > 0)
            raise ValueError(f"budget {r!r} = {budget[k]:.6g} (effective) is smaller than the "
                             f"mandatory minimum {floor.sum():.6g} of pinned / min_size sites "
                             f"(largest: {who})")
    gain = gain_model.gain(u, options)
    gain = np.where(allowed, gain, 0.0)

    keys: dict[bytes, list[int]] = {}
    for i in range(len(sites)):
        if i in pins:
            continue
        keys.setdefault(c_rso[:, i].tobytes() + allowed[i].tobytes(), []).append(i)
    group = np.arange(len(sites))
    for members in keys.values():
        rep = members[int(np.argmax(u[members]))]
        group[members] = rep
    pinned_flags = np.zeros(len(sites), bool)
    pinned_flags[list(pins)] = True
    return Problem(sites, options, u, gain, cost, allowed, resources, budget, budgets, group,
                   pinned_flags, band, catalogue, cost_model, gain_model)


# ----------------------------------------------------------------------------- plan assembly


def _repair(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """Float64 hard check; should float32 rounding have crossed a budget, downgrade until within."""
    c = problem.cost_rso
    S = len(choice)
    idx = np.arange(S)
    choice = choice.copy()
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


def _plan(problem: Problem, choice: np.ndarray, dual_bound: float | None, solver: str,
          peft_options: Mapping | None, extra: Mapping[str, Any]) -> Plan:
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
             exclusive_nesting: bool = False) -> Plan:
    """Choose a method and size per site under every budget at once; returns a :class:`Plan`.

    Args:
      sites: from :func:`~layerlens_jax._src.sites.discover_sites`.
      utility: one score per site, same order (finite, >= 0).
      budgets: ``{resource: limit}`` over any subset of :data:`~layerlens_jax._src.costs.RESOURCES`.
      catalogue / cost_model / gain_model: options, cost formulas, gain model (defaults documented
        in :mod:`layerlens_jax._src.costs`).
      utilisation: ``hi`` or ``(lo, hi)``: use at most ``hi`` of each budget (the seed's band is
        ``(0.80, 0.88)``); without it the fill goes as close to the binding budget as the size grid
        allows.
      pinned / min_size / max_size: see :func:`build_problem`.
      peft_options: overrides of the plan's PEFT options (``lora_alpha``, ``use_rslora``, ...).
      config: solver settings.
      exclusive_nesting: never adapt a site together with one of its ancestors or descendants
        (an adapter on ``layers_3/mlp`` and LoRA on ``layers_3/mlp/intermediate``). A block's
        utility is the sum of its layers', so additive gains credit nested options twice with the
        same signal; see :func:`resolve_nesting`.

    The plan's ``dual_bound`` is the float64 Lagrangian bound (an upper bound on the best objective
    under the effective budgets), so ``dual_bound - objective`` certifies the optimality gap.
    Raises ``ValueError`` naming the site / resource / value for invalid or infeasible input.
    """
    if exclusive_nesting:
        return resolve_nesting(
            functools.partial(allocate, sites, utility, budgets, catalogue=catalogue,
                              cost_model=cost_model, gain_model=gain_model,
                              utilisation=utilisation, min_size=min_size, max_size=max_size,
                              peft_options=peft_options, config=config),
            sites, budgets, pinned)
    t0 = time.perf_counter()
    problem = build_problem(sites, utility, budgets, catalogue=catalogue, cost_model=cost_model,
                            gain_model=gain_model, pinned=pinned, min_size=min_size,
                            max_size=max_size, utilisation=utilisation)
    t1 = time.perf_counter()
    gain, cost, mask, group = _device_arrays(problem)
    sol = lagrangian_allocate(gain, cost, mask, jnp.asarray(problem.budget, jnp.float32), group,
                              config=config)
    sol = jax.device_get(sol)
    t2 = time.perf_counter()
    choice = _repair(problem, np.asarray(sol.choice, np.int64))
    bound = dual_value(problem.gain, problem.cost_rso, problem.mask, problem.budget, sol.lam)
    extra = {"multipliers": {r: float(v) for r, v in zip(problem.resources, sol.lam)},
             "timing_s": {"build": t1 - t0, "solve": t2 - t1}}
    return _plan(problem, choice, bound, "lagrangian", peft_options, extra)


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

    def settle(pins, decided):
        pins, decided = dict(pins), dict(decided)
        for _ in range(rounds):
            plan = solve(pinned=pins or None)
            conflicts = nested_conflicts(plan)
            if not conflicts:
                return plan, pins, decided
            by_site = {a.site: a for a in plan.allocations}

            def value(paths):
                g = sum(by_site[p].gain for p in paths)
                c = sum(by_site[p].cost[r] / b for p in paths for r, b in finite.items())
                return g / c if c > 0 else math.inf

            settled = set()
            for anc, desc in conflicts:
                if anc in settled or any(d in settled for d in desc):
                    continue  # an outer conflict already pinned one side this round
                desc_free = [d for d in desc if d not in user]
                if anc in user and not desc_free:
                    raise ValueError(f"pinned site {anc!r} nests pinned site(s) {list(desc)}: "
                                     f"exclusive nesting cannot hold")
                keep_ancestor = anc in user or (desc_free and value([anc]) >= value(desc))
                losers = desc_free if keep_ancestor else [anc]
                winners = [anc] if keep_ancestor else desc_free
                for p in losers:
                    pins[p] = "none"
                decided[anc] = (tuple(losers), tuple(w for w in winners if w not in user))
                settled.update((anc, *desc))
        raise RuntimeError(f"exclusive nesting did not settle in {rounds} rounds")  # a bug

    plan, pins, decided = settle(user, {})
    for anc in list(decided):  # one local-search pass over the decisions
        if anc not in decided:
            continue  # an accepted flip re-settled without this conflict
        losers, winners = decided[anc]
        if not winners:
            continue  # the winning side is user-pinned: nothing to flip
        trial = {k: v for k, v in pins.items() if k not in losers or k in user}
        trial.update({w: "none" for w in winners})
        flipped = {**decided, anc: (winners, tuple(x for x in losers if x not in user))}
        cand, cand_pins, cand_decided = settle(trial, flipped)
        if cand.objective > plan.objective * (1 + 1e-9):
            plan, pins, decided = cand, cand_pins, cand_decided
    return plan


def allocate_exact(sites: Sequence[Site], utility, budgets: Mapping[str, float], *,
                   catalogue: Catalogue | None = None, cost_model: CostModel | None = None,
                   gain_model: GainModel | None = None,
                   utilisation: float | tuple[float, float] | None = None,
                   pinned: Mapping[str, Any] | None = None,
                   min_size: int | Mapping[str, int] | None = None,
                   max_size: int | Mapping[str, int] | None = None,
                   peft_options: Mapping[str, Any] | None = None,
                   time_limit: float | None = None, mip_rel_gap: float = 1e-6,
                   exclusive_nesting: bool = False) -> Plan:
    """The exact optimum of the problem :func:`allocate` solves (MILP, scipy HiGHS); same inputs.

    For small problems and tests: exponential in the worst case. ``dual_bound`` is HiGHS's bound.
    With ``exclusive_nesting`` every (ancestor, descendant) site pair is a MILP row: the exact
    optimum :func:`resolve_nesting` approximates.
    """
    t0 = time.perf_counter()
    problem = build_problem(sites, utility, budgets, catalogue=catalogue, cost_model=cost_model,
                            gain_model=gain_model, pinned=pinned, min_size=min_size,
                            max_size=max_size, utilisation=utilisation)
    exclusive = []
    if exclusive_nesting:
        paths = [st.path for st in problem.sites]
        exclusive = [(i, j) for i, a in enumerate(paths) for j, d in enumerate(paths)
                     if d.startswith(a + "/")]
    choice, _, bound, message = solve_exact(problem.gain, problem.cost_rso, problem.mask,
                                            problem.budget, time_limit=time_limit,
                                            mip_rel_gap=mip_rel_gap, exclusive=exclusive)
    choice = _repair(problem, choice)
    extra = {"milp_status": message, "timing_s": {"solve": time.perf_counter() - t0}}
    return _plan(problem, choice, bound, "milp", peft_options, extra)


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
                                  mask=_allowed(problem.cost_rso, problem.mask, batch[j]))
        if not bool(sols.feasible[j]):
            raise ValueError(f"budgets {given} are below the mandatory minimum of the sites")
        choice = _repair(sub, np.asarray(sols.choice[j], np.int64))
        bound = dual_value(sub.gain, sub.cost_rso, sub.mask, sub.budget, sols.lam[j])
        extra = {"multipliers": {r: float(v) for r, v in zip(sub.resources, sols.lam[j])}}
        plans.append(_plan(sub, choice, bound, "lagrangian", peft_options, extra))
    return plans
