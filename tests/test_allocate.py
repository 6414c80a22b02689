"""The public entry points: allocate, allocate_curve; options, controls, float64 repair, errors."""

import dataclasses
import doctest
import importlib
import math

import jax.numpy as jnp
import numpy as np
import pytest

import layerlens_jax
from alloc_checks import check_plan, random_utility
from layerlens_jax._src.allocate import allocate, allocate_curve
from layerlens_jax._src.assemble import repair_budget_float64
from layerlens_jax._src.costs import Catalogue
from layerlens_jax._src.exact import allocate_exact
from layerlens_jax._src.instances import tiny_bert_sites
from layerlens_jax._src.plan_metrics import plan_metrics
from layerlens_jax._src.problem import build_problem
from layerlens_jax._src.sites import Site
from layerlens_jax._src.solver import Solution


@pytest.fixture(scope="module")
def sites():
    return tiny_bert_sites()


def test_public_api_reexports():
    assert layerlens_jax.allocate is allocate
    assert layerlens_jax.allocate_curve is allocate_curve
    assert layerlens_jax.allocate_exact is allocate_exact


def test_allocate_docstring_example_runs():
    module = importlib.import_module("layerlens_jax._src.allocate")
    result = doctest.testmod(module, verbose=False)
    assert result.attempted >= 4 and result.failed == 0


# ----------------------------------------------------------------------- options and controls


def test_utilisation_band_and_fill(sites):
    u = random_utility(sites, 2)
    budgets = {"params": 3000.0}
    full = allocate(sites, u, budgets)
    assert full.use["params"] / 3000 >= 0.97  # fills the binding budget without a band
    band = allocate(sites, u, budgets, utilisation=(0.80, 0.88))
    assert 0.80 <= band.use["params"] / 3000 <= 0.88
    m = plan_metrics(band)
    assert m.utilisation_band == (0.80, 0.88)
    assert m.binding_resource == "params"
    assert m.consistency_class == 1.0 and m.consistency_class_incl_none == 1.0
    with pytest.raises(ValueError, match="utilisation band"):
        allocate(sites, u, budgets, utilisation=(0.9, 0.8))


def test_pinned_min_max(sites):
    u = random_utility(sites, 3)
    q0 = "encoder/layers_0/attention/mha/query"
    k1 = "encoder/layers_1/attention/mha/key"
    blk = "encoder/layers_0/mlp"
    plan = allocate(sites, u, {"params": 2000.0},
                    pinned={q0: ("lora", 5), k1: "none"},  # 5 is off the default grid
                    min_size={blk: 4}, max_size={"encoder/layers_1/mlp/output": 2})
    got = {a.site: a for a in plan.allocations}
    assert (got[q0].method, got[q0].size, got[q0].pinned) == ("lora", 5, True)
    assert got[k1].method == "none" and got[k1].pinned
    assert got[blk].method == "adapter" and got[blk].size >= 4
    assert got["encoder/layers_1/mlp/output"].size <= 2
    assert got[q0].cost["params"] == 5 * 32
    check_plan(plan, {"params": 2000.0}, sites)
    # a global max_size of 0 forbids adaptation everywhere
    none = allocate(sites, u, {"params": 2000.0}, max_size=0)
    assert none.assignments() == {}


def test_monotone_within_cost_class(sites):
    # give every query/key/value/out projection (one cost class) a distinct utility
    u = random_utility(sites, 7)
    plan = allocate(sites, u, {"params": 1500.0, "train_flops": 1e4})
    proj = [a for a in plan.allocations if a.cost_class == plan.allocation(
        "encoder/layers_0/attention/mha/query").cost_class]
    assert len(proj) == 8
    proj.sort(key=lambda a: a.utility)
    assert [a.size for a in proj] == sorted(a.size for a in proj)


def test_allocate_curve_vmapped(sites):
    u = random_utility(sites, 5)
    limits = [300.0, 600.0, 1200.0, 2400.0, 4800.0]
    plans = allocate_curve(sites, u, {"params": limits, "vram_bytes": [1e6] * 5})
    assert len(plans) == 5
    bounds = [p.dual_bound for p in plans]
    assert all(b2 >= b1 * (1 - 1e-6) for b1, b2 in zip(bounds, bounds[1:]))
    for p, lim in zip(plans, limits):
        check_plan(p, {"params": lim, "vram_bytes": 1e6}, sites)
        single = allocate(sites, u, {"params": lim, "vram_bytes": 1e6})
        assert p.objective == pytest.approx(single.objective, rel=1e-6)
    objectives = [p.objective for p in plans]
    assert objectives == sorted(objectives)


def test_large_instance_runs_the_compressed_path():
    rng = np.random.default_rng(0)
    sites = [Site(f"l{i}", "linear", "Linear", {"kernel": (64, 64)}, 4096, 64, 64,
                  tokens_per_example=16) for i in range(300)]
    u = rng.uniform(size=300)
    cat = Catalogue.from_sizes(lora=tuple(range(1, 33)))
    plan = allocate(sites, u, {"params": 300 * 128 * 6.0, "train_flops": 1e9}, catalogue=cat)
    exact = allocate_exact(sites, u, {"params": 300 * 128 * 6.0, "train_flops": 1e9}, catalogue=cat)
    assert plan.objective >= 0.995 * exact.objective
    assert plan.use["params"] <= 300 * 128 * 6.0
    sizes = [a.size for a in sorted(plan.allocations, key=lambda a: a.utility)]
    assert sizes == sorted(sizes)  # one cost class: sizes follow utility exactly


# ------------------------------------------------------------------- float64 budget repair


def _dense(name, width, tokens=None):
    """A ``width x width`` dense layer: LoRA of rank r costs ``2 * width * r`` parameters."""
    return Site(name, "linear", "Dense", {"kernel": (width, width)}, width * width, width, width,
                tokens_per_example=tokens)


def _params_used(problem, choice):
    return float(problem.cost_rso[0, np.arange(len(choice)), choice].sum())


def test_repair_budget_float64_downgrades_the_least_loss_site():
    """Four equal rank-1 LoRA sites use 64 params against a budget of 63.9 (0.16 % over, far less
    than any tolerance a float32 check could hide): exactly the least-utility site drops to none,
    and the result is within the budget exactly in float64."""
    sites = [_dense(f"l{i}", 8) for i in range(4)]
    cat = Catalogue.from_sizes(lora=(1, 2))
    problem = build_problem(sites, [0.4, 0.1, 0.3, 0.2], {"params": 63.9}, catalogue=cat)
    lora1 = problem.options.index(("lora", 1))
    over = np.full(4, lora1)
    assert _params_used(problem, over) == 64.0
    repaired = repair_budget_float64(problem, over)
    assert repaired.tolist() == [lora1, 0, lora1, lora1]
    assert over.tolist() == [lora1] * 4  # the input is not modified
    assert _params_used(problem, repaired) <= 63.9
    # a choice within the budget is returned as is
    assert repair_budget_float64(problem, repaired).tolist() == repaired.tolist()


def test_repair_budget_float64_ranks_by_loss_per_unit_freed_and_keeps_pins():
    """The site losing least gain per parameter freed goes first (the wide site, although its own
    loss is the larger); pinned sites never move; with no unpinned site to downgrade it raises."""
    sites = [_dense("narrow", 8), _dense("wide", 32), _dense("mid", 16)]
    cat = Catalogue.from_sizes(lora=(1, 2))
    u = [0.2, 0.5, 1.0]  # loss per param freed: narrow 0.2/16, wide 0.5/64, mid 1.0/32
    budgets = {"params": 16 + 64 + 32 - 1.0}
    problem = build_problem(sites, u, budgets, catalogue=cat)
    lora1 = problem.options.index(("lora", 1))
    g = problem.gain[:, lora1]
    assert g[1] > g[0] and g[1] / 64 < g[0] / 16 < g[2] / 32  # the instance is as described
    repaired = repair_budget_float64(problem, np.full(3, lora1))
    assert repaired.tolist() == [lora1, 0, lora1]
    assert _params_used(problem, repaired) <= budgets["params"]
    pinned = build_problem(sites, u, budgets, catalogue=cat, pinned={"wide": ("lora", 1)})
    repaired = repair_budget_float64(pinned, np.full(3, lora1))
    assert repaired.tolist() == [0, lora1, lora1]  # the next best ratio, the wide site being pinned
    all_pinned = build_problem(sites, u, budgets, catalogue=cat,
                               pinned={s.path: ("lora", 1) for s in sites[:2]})
    with pytest.raises(ValueError, match="no allocation within the budgets"):  # 80 pinned > 70
        repair_budget_float64(dataclasses.replace(all_pinned, budget=np.array([70.0])),
                              np.array([lora1, lora1, 0]))


def test_repair_budget_float64_repairs_the_most_over_used_budget_first():
    """params 0.9 % over, train_flops 11 % over: train_flops goes first, and dropping the site with
    the least gain per flop (narrow, whose 64 tokens make it flop-heavy) fixes both; repairing
    params first would have dropped the wide site and then the narrow one as well."""
    sites = [_dense("narrow", 8, tokens=64), _dense("wide", 32, tokens=1),
             _dense("mid", 16, tokens=4)]
    cat = Catalogue.from_sizes(lora=(1, 2))
    u = [0.2, 0.5, 1.0]
    loose = build_problem(sites, u, {"params": 1e9, "train_flops": 1e12}, catalogue=cat)
    lora1 = loose.options.index(("lora", 1))
    per_site = loose.cost_rso[:, :, lora1]  # [R, S]
    np.testing.assert_array_equal(per_site[0], [16, 64, 32])
    budget = np.array([per_site[0].sum() - 1.0, per_site[1].sum() * 0.9])
    problem = dataclasses.replace(loose, budget=budget)
    g = problem.gain[:, lora1]
    assert np.argmin(g / per_site[1]) == 0 and np.argmin(g / per_site[0]) == 1
    repaired = repair_budget_float64(problem, np.full(3, lora1))
    assert repaired.tolist() == [0, lora1, lora1]
    assert np.all(problem.cost_rso[:, np.arange(3), repaired].sum(axis=1) <= budget)


def test_allocate_repairs_a_solver_choice_over_budget(sites, monkeypatch):
    """Should the float32 solver ever return a choice over a budget, ``allocate`` downgrades it in
    float64 until it is within every budget exactly: here a fake solver adapts every site at its
    largest option."""
    module = importlib.import_module("layerlens_jax._src.allocate")
    calls = []

    def over_budget(gain, cost, mask, budget, group=None, *, config=None):
        mask = np.asarray(mask)
        choice = np.array([np.flatnonzero(row)[-1] for row in mask], np.int32)
        calls.append(choice)
        return Solution(choice=jnp.asarray(choice), objective=jnp.float32(0.0),
                        dual_bound=jnp.float32(0.0), lam=jnp.zeros(budget.shape, jnp.float32),
                        use=jnp.zeros(budget.shape, jnp.float32), feasible=jnp.bool_(True))

    monkeypatch.setattr(module, "lagrangian_allocate", over_budget)
    u = random_utility(sites, 4)
    budgets = {"params": 1500.0, "vram_bytes": 1e9}
    plan = allocate(sites, u, budgets)
    problem = build_problem(sites, u, budgets)
    assert calls and _params_used(problem, calls[0]) > 1500.0  # the fake choice was over
    assert plan.use["params"] <= 1500.0 and plan.use["vram_bytes"] <= 1e9
    expected = repair_budget_float64(problem, calls[0].astype(np.int64))
    assert plan.assignments() == {s.path: problem.options[o] for s, o in zip(sites, expected)
                                  if o != 0}


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("budgets, match", [
    ({"params": -1.0}, "budget 'params' must be >= 0"),
    ({"params": math.nan}, "budget 'params' must be >= 0"),
    ({"flops": 1.0}, "unknown budget resource 'flops'"),
    ({"params": "10"}, "budget 'params' must be a number"),
    ({}, "non-empty mapping"),
])
def test_bad_budgets(sites, budgets, match):
    with pytest.raises(ValueError, match=match):
        allocate(sites, random_utility(sites, 0), budgets)


def test_bad_inputs_name_the_culprit(sites):
    u = random_utility(sites, 0)
    with pytest.raises(ValueError, match="one value per site"):
        allocate(sites, u[:-1], {"params": 1e3})
    bad = u.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match=sites[3].path):
        allocate(sites, bad, {"params": 1e3})
    with pytest.raises(ValueError, match="names site 'nope'"):
        allocate(sites, u, {"params": 1e3}, pinned={"nope": "none"})
    with pytest.raises(ValueError, match="embeddings/norm.*incompatible"):
        allocate(sites, u, {"params": 1e3}, pinned={"embeddings/norm": ("lora", 4)})
    with pytest.raises(ValueError, match="unknown method 'ia3'"):
        allocate(sites, u, {"params": 1e3}, pinned={"classifier": ("ia3", 4)})
    with pytest.raises(ValueError, match="embeddings/norm.*no allowed option"):
        allocate(sites, u, {"params": 1e3}, min_size={"embeddings/norm": 2})
    with pytest.raises(ValueError, match="budget 'params'.*mandatory minimum"):
        allocate(sites, u, {"params": 100.0}, min_size=1)
    with pytest.raises(ValueError, match="min_size 8 > max_size 2"):
        allocate(sites, u, {"params": 1e4}, min_size={"classifier": 8}, max_size={"classifier": 2})
    with pytest.raises(ValueError, match="even its cheapest"):
        allocate(sites, u, {"params": 10.0}, pinned={"pooler": ("lora", 8)})


@pytest.mark.parametrize("utility, budget, why", [
    ([1.0, 0.5, 0.1], 0.0, "no option fits"),
    ([1.0, 0.5, 0.1], 100.0, "no option fits"),  # below LoRA rank 1 = 2 * 64 = 128 parameters
    ([0.0, 0.0, 0.0], 1024.0, "every utility is 0"),
])
def test_empty_plan_warns_with_budget_and_cheapest_cost(utility, budget, why):
    sites = [_dense(f"layer{i}", 64) for i in range(3)]
    with pytest.warns(UserWarning, match=rf"empty plan \({why}.*budgets \{{'params': "
                      rf"{budget}\}}.*cheapest option costs \{{'params': 128.0\}}"):
        plan = allocate(sites, utility, {"params": budget})
    assert plan.assignments() == {} and plan.use["params"] == 0.0


def test_non_empty_plan_does_not_warn():
    import warnings
    sites = [_dense(f"layer{i}", 64) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = allocate(sites, [1.0, 0.5, 0.1], {"params": 256.0})
    assert plan.assignments() and 0 < plan.use["params"] <= 256.0


def test_a_budget_filled_exactly_is_reached():
    """Costs that add up to the budget exactly (float32 rounds 3 x 16/48 up to 1.0000001) must
    stay within reach; the MILP's optimum is the reference."""
    from layerlens_jax._src.exact import allocate_exact
    sites = [Site(path=f"layer{i}", kind="linear", module_type="Dense",
                  param_shapes={"kernel": (64, 64)}, num_params=4096, in_features=64,
                  out_features=64) for i in range(3)]
    for budget, want in ((128, {"layer0": ("lora", 1)}),
                         (1024, {"layer0": ("lora", 4), "layer1": ("lora", 3),
                                 "layer2": ("lora", 1)})):
        plan = allocate(sites, [1.0, 0.5, 0.1], {"params": budget})
        exact = allocate_exact(sites, [1.0, 0.5, 0.1], {"params": budget})
        assert plan.assignments() == want == exact.assignments()
        assert plan.use["params"] == budget
