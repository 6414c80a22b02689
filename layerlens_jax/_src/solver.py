"""The compiled Lagrangian solver of the allocation knapsack (:mod:`~layerlens_jax._src.problem`).

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

The function is pure and vmappable over budgets. It works on arrays only; the float64 checks and
the plan are :mod:`~layerlens_jax._src.allocate`'s.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SolverConfig", "Solution", "lagrangian_allocate"]

_NEG = -1.0e30


class SolverConfig(NamedTuple):
    """Static settings of :func:`lagrangian_allocate` (hashable: a jit static argument)."""

    sweeps: int = 3  # coordinate-descent sweeps over the multipliers
    bisect_steps: int = 18  # bisection steps per multiplier (log space, 9 decades)
    dual_sites: int = 256  # fit the first multipliers on at most this many sites (strided subsample)
    thetas: tuple[float, ...] = (0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 2.0)  # primal starts: theta * lam
    fill_rounds: int = 64  # greedy-fill rounds (each accepts at least one upgrade, or stops)
    # float32 use may pass each budget by this fraction: sums of costs that fit a budget exactly
    # round up in float32 (48/48 as 3 x 16/48 = 1.0000001); a float64 check repairs real excess
    margin: float = 2e-6
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


# ------------------------------------------------------------------------------ building blocks


def _resource_use(cn, o):
    """Use ``[R]`` of each resource by the assignment ``o`` ``[S]``."""
    return jnp.take_along_axis(cn, o[None, :, None], 2)[..., 0].sum(1)


def _weighted_cost(cn, lam):
    """``lam . c`` per (site, option): the price of each option at multipliers ``lam``."""
    w = lam[0] * cn[0]
    for r in range(1, cn.shape[0]):
        w = w + lam[r] * cn[r]
    return w


def _lagrangian_choice(g, cn, lam):
    """Per-site argmax of ``g - lam . c``: (choice [S], Lagrangian value, normalised use [R])."""
    score = g
    for r in range(cn.shape[0]):  # R is static and small: unrolled, fused elementwise
        score = score - lam[r] * cn[r]
    o = jnp.argmax(score, axis=1)
    best = jnp.take_along_axis(score, o[:, None], 1)[:, 0]
    return o, best.sum() + lam.sum(), _resource_use(cn, o)


def _minimise_dual(g, cn, sweeps, steps, lam0=None, span=0.0):
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
        u0 = _lagrangian_choice(g, cn, lam.at[r].set(0.0))[2][r]

        def bisect(_, bracket):
            a, b = bracket
            mid = 0.5 * (a + b)
            over = _lagrangian_choice(g, cn, lam.at[r].set(jnp.exp(mid)))[2][r] > 1.0
            return jnp.where(over, mid, a), jnp.where(over, b, mid)

        _, b = jax.lax.fori_loop(0, steps, bisect, (log_lo[r], log_hi[r]))
        return lam.at[r].set(jnp.where(u0 <= 1.0, 0.0, jnp.exp(b)))

    def sweep(_, lam):
        return jax.lax.fori_loop(0, R, coord, lam)

    init = jnp.zeros((R,), g.dtype) if lam0 is None else lam0
    return jax.lax.fori_loop(0, sweeps, sweep, init)


def _greedy_fill(g, cn, ok, cur, slack, cand, rounds, limit, by_gain=False):
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


def _downgrade_to_fit(g, cn, ok, cur, slack, base, fixed, rounds):
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
        sl = cap - _resource_use(cn, c)
        c, sl = _downgrade_to_fit(g, cn, ok, c, sl, base, site, 2 * S + 8)
        feasible = ok[site, to] & jnp.all(sl >= 0)
        c = _greedy_fill(g, cn, ok, c, jnp.maximum(sl, 0.0), cand, 4 * S + 16, 1, bg)
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


def _primal_assignment(g, cn, ok, base, base_use, cap, lam, thetas, config, small):
    """Primal phase on a sites x options matrix: Lagrangian choices over the theta grid, the best
    one within budget (or the cheapest options) as start, then the greedy fill (small problems:
    sequential greedy from every start, then local search). Returns (choice, best lam, values)."""
    S, O = g.shape
    choices, values, uses = jax.lax.map(lambda t: _lagrangian_choice(g, cn, lam * t), thetas)
    starts = jnp.concatenate([choices, base[None]], axis=0)  # [K+1, S]
    start_use = jnp.concatenate([uses, base_use[None]], axis=0)  # [K+1, R]
    start_obj = jnp.sum(jnp.take_along_axis(g[None], starts[..., None], 2)[..., 0], axis=1)
    start_ok = jnp.all(start_use <= cap, axis=1)
    if small:
        slacks = jnp.where(start_ok[:, None], cap - start_use, cap - base_use)
        starts = jnp.where(start_ok[:, None], starts, base[None])
        fills = jax.vmap(lambda c, sl: _greedy_fill(g, cn, ok, c, sl, choices.T, 8 * S + 64, 1))(
            starts, slacks)
        objs = jnp.sum(jnp.take_along_axis(g[None], fills[..., None], 2)[..., 0], axis=1)
        cur = fills[jnp.argmax(objs)]
        if S <= config.search_sites:
            cur = _local_search(g, cn, ok, cur, base, cap, choices.T, config.search_passes,
                                config.search_variants)
    else:
        k0 = jnp.argmax(jnp.where(start_ok, start_obj, -jnp.inf))
        cur = _greedy_fill(g, cn, ok, starts[k0], cap - start_use[k0], choices.T,
                           config.fill_rounds, S)
    kb = jnp.argmin(values)
    return cur, lam * thetas[kb], values


def _compressed_primal(g, cn, ok, base, base_use, cap, lam, thetas, config):
    """Step 3 then 4 for large problems: keep ``K`` candidate options per site (argmax of
    ``g - theta*lam.c`` over the grid, the neighbours of the ``theta = 1`` argmax, the cheapest
    option; in option order), refine the multipliers and run the primal on ``S x K``.
    Returns (choice in the full option indices, lam)."""
    O = g.shape[1]
    w = _weighted_cost(cn, lam)
    firsts = [jnp.argmax(g - t * w, axis=1) for t in config.candidate_thetas]
    o1 = firsts[len(firsts) // 2]
    cand = jnp.stack(firsts + [jnp.maximum(o1 - 1, 0), jnp.minimum(o1 + 1, O - 1), base], axis=1)
    cand = jnp.sort(cand, axis=1)
    okc = jnp.take_along_axis(ok, cand, 1)
    gc = jnp.where(okc, jnp.take_along_axis(g, cand, 1), _NEG)
    cc = jnp.take_along_axis(cn, cand[None], 2)
    base_c = jnp.argmax(cand == base[:, None], axis=1)
    lam = _minimise_dual(gc, cc, config.refine_sweeps, config.refine_steps, lam, config.refine_span)
    cur_c, lam, _ = _primal_assignment(gc, cc, okc, base_c, base_use, cap, lam, thetas, config,
                                       False)
    return jnp.take_along_axis(cand, cur_c[:, None], 1)[:, 0], lam


def _monotone_in_utility(g, ok, cur, group):
    """Re-deal chosen options within each equal-cost group so that utility order = size order."""
    rowsum = jnp.sum(jnp.where(ok, g, 0.0), axis=1)  # proportional to utility within a group
    key = g[group, cur]  # gain of each chosen option on the group's representative row
    idx = jnp.arange(cur.shape[0])
    by_site = jax.lax.sort((group, rowsum, idx), num_keys=2)[2]
    by_choice = jax.lax.sort((group, key, idx), num_keys=2)[2]
    return jnp.zeros_like(cur).at[by_site].set(cur[by_choice])


def _normalise(gain, cost, mask, budget):
    """Step 1: ``(g, cn, ok, gscale)``: gains over their maximum (``_NEG`` where not allowed),
    costs as fractions of each budget, allowed options that fit every budget alone."""
    R = cost.shape[0]
    planes = [jnp.where(cost[r] == 0, 0.0, cost[r] / budget[r]) for r in range(R)]
    ok = mask
    for plane in planes:  # per-plane ops: XLA:CPU reduces slowly over a leading axis
        ok = ok & (plane <= 1.0)
    cn = jnp.stack([jnp.where(ok, plane, 0.0) for plane in planes])
    gmax = jnp.max(jnp.where(ok, gain, 0.0))
    gscale = jnp.where(gmax > 0, gmax, 1.0)
    return jnp.where(ok, gain / gscale, _NEG), cn, ok, gscale


# ------------------------------------------------------------------------------- the solver


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
        largest gains (see :func:`~layerlens_jax._src.problem.build_problem`); sizes are then
        monotone in utility within groups.
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

    g, cn, ok, gscale = _normalise(gain, cost, mask, budget)
    cap = 1.0 + config.margin
    base = jnp.argmin(jnp.where(ok, _weighted_cost(cn, jnp.ones((R,), cn.dtype)), jnp.inf), axis=1)
    base_use = _resource_use(cn, base)
    feasible = jnp.all(jnp.any(ok, axis=1)) & jnp.all(base_use <= cap)

    n = min(S, config.dual_sites)
    idx = (np.arange(n) * S) // n  # evenly strided subsample (all sites when n == S)
    # costs scaled by S/n on the subsample: its multipliers are the full problem's times n/S
    lam = _minimise_dual(g[idx], cn[:, idx] * (S / n), config.sweeps, config.bisect_steps) * (S / n)
    thetas = jnp.asarray(config.thetas, jnp.float32)
    K = len(config.candidate_thetas) + 3
    if S <= config.greedy_sites or O <= K:
        if n < S:
            lam = _minimise_dual(g, cn, config.refine_sweeps, config.refine_steps, lam,
                                 config.refine_span)
        cur, lam, _ = _primal_assignment(g, cn, ok, base, base_use, cap, lam, thetas, config,
                                         S <= config.greedy_sites)
    else:
        cur, lam = _compressed_primal(g, cn, ok, base, base_use, cap, lam, thetas, config)
    _, value, _ = _lagrangian_choice(g, cn, lam)
    cur = _monotone_in_utility(g, ok, cur, group)
    cur = jnp.where(feasible, cur, base).astype(jnp.int32)

    lam_nat = jnp.where(jnp.isfinite(budget) & (budget > 0), lam * gscale / budget, 0.0)
    objective = jnp.sum(jnp.take_along_axis(gain, cur[:, None], 1))
    use = jnp.take_along_axis(cost, cur[None, :, None], 2)[..., 0].sum(1)
    return Solution(cur, objective, value * gscale, lam_nat, use, feasible)
