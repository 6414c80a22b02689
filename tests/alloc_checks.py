"""Checks shared by the allocation tests (test_allocate, test_exact, test_nesting)."""

import numpy as np

from layerlens_jax._src.costs import METHOD_KINDS


def random_utility(sites, seed):
    """Uniform random utilities, normalised to a maximum of 1."""
    u = np.random.default_rng(seed).uniform(size=len(sites))
    return u / u.max()


def check_plan(plan, budgets, sites):
    """Every budget held (float64, no slack beyond rounding of the sum) and every method compatible
    with its site's kind (the catalogue of :data:`METHOD_KINDS`)."""
    for r, b in budgets.items():
        assert plan.use[r] <= b * (1 + 1e-12), (r, plan.use[r], b)
    kinds = {s.path: s.kind for s in sites}
    for a in plan.allocations:
        assert kinds[a.site] in METHOD_KINDS[a.method], (a.site, a.method)
