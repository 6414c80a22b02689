"""Exclusive nesting: no site adapted together with an ancestor or descendant."""

import numpy as np
import pytest

from alloc_checks import check_plan
from layerlens_jax._src.allocate import allocate
from layerlens_jax._src.costs import Catalogue
from layerlens_jax._src.exact import allocate_exact
from layerlens_jax._src.instances import (NESTING_CATALOGUE, block_utility, nesting_instance,
                                          tiny_bert_sites)
from layerlens_jax._src.nesting import nested_conflicts


@pytest.fixture(scope="module")
def sites():
    return tiny_bert_sites()


def test_block_utility_sums_the_nested_leaves(sites):
    """The instance generator: every site carries its own random score plus the total of each of
    its direct children (recursively), normalised to a maximum of 1."""
    paths = [s.path for s in sites]
    own = dict(zip(paths, np.random.default_rng(3).uniform(0.05, 1.0, size=len(paths))))

    def children(p):
        desc = [q for q in paths if q.startswith(p + "/")]
        return [q for q in desc if not any(q.startswith(r + "/") for r in desc)]

    def total(p):
        return own[p] + sum(total(c) for c in children(p))

    expected = np.array([total(p) for p in paths])
    assert any(children(p) for p in paths) and any(children(c) for p in paths for c in children(p))
    np.testing.assert_allclose(block_utility(sites, 3), expected / expected.max(), rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_exclusive_nesting_against_the_exact_milp(sites, seed):
    """No site is adapted with an ancestor or descendant; the heuristic lands near the MILP that
    has every (ancestor, descendant) pair as a constraint row."""
    u, budgets = nesting_instance(sites, seed)
    cat = NESTING_CATALOGUE
    free = allocate(sites, u, budgets, catalogue=cat)
    plan = allocate(sites, u, budgets, catalogue=cat, exclusive_nesting=True)
    exact = allocate_exact(sites, u, budgets, catalogue=cat, exclusive_nesting=True)
    assert nested_conflicts(free)  # the unconstrained plan double-credits nested sites
    assert not nested_conflicts(plan) and not nested_conflicts(exact)
    check_plan(plan, budgets, sites)
    check_plan(exact, budgets, sites)
    assert exact.objective <= allocate_exact(sites, u, budgets, catalogue=cat).objective + 1e-9
    assert exact.objective * 0.97 <= plan.objective <= exact.objective * (1 + 1e-9)


def test_exclusive_nesting_keeps_user_pins_and_names_impossible_ones(sites):
    u = block_utility(sites, 0)
    cat = Catalogue.from_sizes(lora=(1, 2, 4), adapter=(2, 4))
    blocks = [s.path for s in sites if s.kind == "block"]
    child = next(s.path for s in sites if s.path.startswith(blocks[0] + "/") and s.kind == "linear")
    plan = allocate(sites, u, {"params": 2000}, catalogue=cat, exclusive_nesting=True,
                    pinned={child: ("lora", 2)})
    a = plan.assignments()
    assert a[child] == ("lora", 2) and blocks[0] not in a
    with pytest.raises(ValueError, match="exclusive nesting cannot hold"):
        allocate(sites, u, {"params": 4000}, catalogue=cat, exclusive_nesting=True,
                 pinned={child: ("lora", 2), blocks[0]: ("adapter", 2)})
