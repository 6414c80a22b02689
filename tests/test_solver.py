"""The compiled Lagrangian solver on arrays: invariants, certificate, quality against the MILP."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from alloc_checks import random_utility
from layerlens_jax._src.exact import dual_value, solve_exact
from layerlens_jax._src.instances import tiny_bert_sites
from layerlens_jax._src.problem import build_problem
from layerlens_jax._src.solver import SolverConfig, lagrangian_allocate


def _random_instance(rng, S=12, O=8, R=3, tight=None):
    """Padded instance: option 0 = none (free); options 1-4 method A sizes (1, 2, 4, 8), 5-7
    method B sizes (2, 4, 8); sites of kind A, B, A+B or none-only; some sites duplicate another's
    cost row and mask with a different utility (equal-cost groups)."""
    sizes = np.array([0, 1, 2, 4, 8, 2, 4, 8], float)
    method = np.array([0, 1, 1, 1, 1, 2, 2, 2])
    shape = np.where(method == 1, 1.0, 0.7) * sizes / (sizes + 4.0)
    kinds = rng.integers(0, 4, size=S)
    mask = np.zeros((S, O), bool)
    mask[:, 0] = True
    mask[:, 1:5] = (kinds == 1)[:, None] | (kinds == 3)[:, None]
    mask[:, 5:8] = (kinds == 2)[:, None] | (kinds == 3)[:, None]
    rate = rng.uniform(0.1, 1.0, size=(R, S, 1)) * (rng.random((R, S, 1)) < 0.85)
    setup = rng.uniform(0.0, 2.0, size=(R, S, 1)) * (rng.random((R, S, 1)) < 0.5)
    cost = np.where(sizes > 0, setup + rate * sizes * np.where(method == 2, 1.5, 1.0), 0.0)
    u = rng.uniform(size=S) * (rng.random(S) < 0.9)
    for s in range(1, S):  # equal-cost duplicates
        if rng.random() < 0.35:
            src = int(rng.integers(0, s))
            cost[:, s] = cost[:, src]
            mask[s] = mask[src]
    gain = u[:, None] * shape[None, :]
    total = np.where(mask[None], cost, 0).max(axis=2).sum(axis=1)
    frac = rng.uniform(0.05, 1.1, size=R) if tight is None else np.full(R, tight)
    budget = frac * total + 1e-3
    if rng.random() < 0.2:
        budget[int(rng.integers(0, R))] = np.inf
    keys = {}
    group = np.arange(S)
    for s in range(S):
        keys.setdefault(cost[:, s].tobytes() + mask[s].tobytes(), []).append(s)
    for members in keys.values():
        group[members] = members[int(np.argmax(u[members]))]
    return gain, cost, mask, budget, group, u, shape


def _solve(gain, cost, mask, budget, group, config=SolverConfig()):
    return jax.device_get(lagrangian_allocate(jnp.asarray(gain, jnp.float32),
                                              jnp.asarray(cost, jnp.float32), jnp.asarray(mask),
                                              jnp.asarray(budget, jnp.float32),
                                              jnp.asarray(group, jnp.int32), config=config))


@given(seed=st.integers(0, 2**32 - 1))
def test_property_allocator_invariants_and_certificate(seed):
    """>= 1 000 random instances (default hypothesis profile 'layerlens', tests/conftest.py)."""
    rng = np.random.default_rng(seed)
    gain, cost, mask, budget, group, u, shape = _random_instance(rng)
    sol = _solve(gain, cost, mask, budget, group)
    S = gain.shape[0]
    choice = np.asarray(sol.choice)
    assert bool(sol.feasible)
    assert mask[np.arange(S), choice].all()  # never an incompatible option
    use = cost[:, np.arange(S), choice].sum(axis=1)
    assert np.all(use <= budget * (1 + 1e-6))  # never over a budget
    a = shape[choice]
    for s in range(S):  # sizes monotone in utility within equal-cost groups
        same = (group == group[s]) & (u < u[s])
        assert np.all(a[s] >= a[same] - 1e-12)
    objective = float(gain[np.arange(S), choice].sum())
    _, opt, _, _ = solve_exact(gain, cost, mask, budget)
    bound = dual_value(gain, cost, mask, budget, sol.lam)
    assert objective <= opt * (1 + 1e-6) + 1e-9
    assert bound >= opt * (1 - 1e-9) - 1e-9  # objective >= optimum - certified gap
    assert float(sol.dual_bound) >= opt * (1 - 1e-4) - 1e-6


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1))
def test_property_compressed_path_invariants(seed):
    """Above ``greedy_sites`` and with more options than candidates: the compressed, parallel path."""
    rng = np.random.default_rng(seed)
    gain, cost, mask, budget, group, u, shape = _random_instance(rng, S=96, O=8)
    config = SolverConfig(dual_sites=32, candidate_thetas=(0.5, 1.0, 2.0))  # K = 6 < O
    sol = _solve(gain, cost, mask, budget, group, config)
    S = gain.shape[0]
    choice = np.asarray(sol.choice)
    assert mask[np.arange(S), choice].all()
    assert np.all(cost[:, np.arange(S), choice].sum(axis=1) <= budget * (1 + 1e-6))
    a = shape[choice]
    for s in range(S):
        same = (group == group[s]) & (u < u[s])
        assert np.all(a[s] >= a[same] - 1e-12)
    bound = dual_value(gain, cost, mask, budget, sol.lam)
    assert bound >= float(gain[np.arange(S), choice].sum()) * (1 - 1e-6)


def test_quality_on_random_small_instances():
    ratios = []
    for seed in range(30):
        gain, cost, mask, budget, group, *_ = _random_instance(np.random.default_rng(seed), tight=0.3)
        sol = _solve(gain, cost, mask, budget, group)
        _, opt, _, _ = solve_exact(gain, cost, mask, budget)
        ratios.append(float(gain[np.arange(12), sol.choice].sum()) / opt)
    assert np.median(ratios) >= 0.995
    assert min(ratios) >= 0.97


def test_lagrangian_allocate_vmaps_over_budgets():
    sites = tiny_bert_sites()
    problem = build_problem(sites, random_utility(sites, 1), {"params": 1e3, "vram_bytes": 1e6})
    gain, cost = jnp.asarray(problem.gain, jnp.float32), jnp.asarray(problem.cost_rso, jnp.float32)
    budgets = jnp.asarray([[500.0, 1e6], [1000.0, 1e6], [2000.0, 2e5]], jnp.float32)
    sols = jax.vmap(lambda b: lagrangian_allocate(gain, cost, jnp.asarray(problem.mask), b))(budgets)
    assert sols.choice.shape == (3, len(sites))
    assert np.all(np.asarray(sols.use) <= np.asarray(budgets) * (1 + 1e-6))
    assert np.all(np.asarray(sols.dual_bound) >= np.asarray(sols.objective) * (1 - 1e-6))
