"""Plan metrics against hand-computed values, their JSON and their Markdown."""

import collections
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from layerlens_jax._src.allocate import allocate
from layerlens_jax._src.plan import Plan, SiteAllocation
from layerlens_jax._src.plan_metrics import plan_metrics, render_metrics_markdown
from layerlens_jax._src.sites import discover_sites
from layerlens_jax.models import BertClassifier, BertConfig


@pytest.fixture(scope="module")
def plan():
    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    sites = discover_sites(model, example=(jnp.zeros((2, 7), jnp.int32),))
    u = np.random.default_rng(0).uniform(size=len(sites))
    return allocate(sites, u / u.max(), {"params": 4000.0, "latency": float("inf")})


def _alloc(site, method, size, utility, kind="linear", cls="c", pinned=False):
    return SiteAllocation(site=site, kind=kind, method=method, size=size, cost={"params": 10.0 * size},
                          utility=utility, gain=0.1 * size, cost_class=cls, pinned=pinned)


def _hand_plan():
    allocs = (
        _alloc("a", "lora", 8, 0.9), _alloc("b", "lora", 4, 0.5), _alloc("c", "lora", 6, 0.4),
        _alloc("d", "none", 0, 0.8), _alloc("e", "adapter", 2, 0.3, kind="block", cls="blk"),
        _alloc("f", "lora", 1, 0.95, cls="other"),
    )
    use = {"params": sum(a.cost["params"] for a in allocs)}  # 210
    return Plan.create(allocations=allocs, budgets={"params": 250.0}, use=use, dual_bound=2.2,
                       objective=2.1)


def test_metrics_hand_computed():
    m = plan_metrics(_hand_plan())
    assert m.utilisation == {"params": pytest.approx(210 / 250)}
    assert m.binding_resource == "params" and m.constraint_satisfaction == 1.0
    sizes, utils = [8, 4, 6, 2, 1], [0.9, 0.5, 0.4, 0.3, 0.95]
    ref = stats.spearmanr(sizes, utils)
    assert m.spearman == pytest.approx(ref.statistic) and m.spearman_p == pytest.approx(ref.pvalue)
    # same method & class "c": pairs (a>b ok), (a>c ok), (b>c: 4<6 bad) -> 2/3
    assert m.consistency_class == pytest.approx(2 / 3)
    # class "c" with none as 0: a,b,c,d -> pairs u_i>u_j: a>d(8>=0), a>b, a>c, d>b(0<4 bad),
    # d>c (bad), b>c (bad) -> 3/6
    assert m.consistency_class_incl_none == pytest.approx(3 / 6)
    # overall over adapted a,b,c,e,f: 10 ordered pairs, good: f>a? 1<8 bad, f>b bad, f>c bad,
    # f>e bad, a>b, a>c, a>e, b>c bad, b>e, c>e -> 5/10
    assert m.consistency_overall == pytest.approx(0.5)
    assert m.method_counts == {"none": 1, "lora": 4, "adapter": 1, "prefix": 0}
    assert m.method_diversity == 3
    assert (m.size_min, m.size_max) == (0, 8) and m.size_mean == pytest.approx(21 / 6)
    assert (m.adapted_size_min, m.adapted_size_max) == (1, 8)
    assert m.compatibility_rate == 1.0
    assert m.gap == pytest.approx(0.1 / 2.2)
    md = render_metrics_markdown(m)
    assert "| Metric | Target | Achieved | Status |" in md
    assert "| **Budget Utilization (params)** | ≥ 97% | 84.00% | ⚠️ Below |" in md
    assert "| **Rank-Utility Consistency (same method & cost class)** | 100% | 66.67% | ⚠️ Below |" in md
    assert "| **Method Diversity** | ≥ 3 | 3 | ✅ Pass |" in md
    assert "**Params:** 210 / 250 (84.00%) ✅" in md


def test_metrics_json_content():
    d = json.loads(json.dumps(plan_metrics(_hand_plan()).to_dict(), allow_nan=False))
    assert d["utilisation"] == {"params": pytest.approx(0.84)}
    assert d["binding_resource"] == "params" and d["binding_utilisation"] == pytest.approx(0.84)
    assert d["utilisation_band"] is None
    assert d["constraints"] == {"params": [210.0, 250.0, True]}
    assert d["method_counts"] == {"none": 1, "lora": 4, "adapter": 1, "prefix": 0}
    assert d["consistency_class"] == pytest.approx(2 / 3) and d["consistency_overall"] == 0.5
    assert (d["size_min"], d["size_max"], d["adapted_size_min"], d["adapted_size_max"]) == (0, 8, 1, 8)
    assert (d["n_sites"], d["n_adapted"], d["trainable_params"]) == (6, 5, 210.0)
    assert (d["objective"], d["dual_bound"]) == (2.1, 2.2)
    assert d["gap"] == pytest.approx(0.1 / 2.2)
    # undefined metrics (Spearman over two adapted sites) are written as null, not NaN
    two = Plan.create(allocations=(_alloc("a", "lora", 8, 0.9), _alloc("b", "lora", 4, 0.5)),
                      budgets={}, use={"params": 120.0}, dual_bound=None, objective=1.2)
    d2 = json.loads(json.dumps(plan_metrics(two).to_dict(), allow_nan=False))
    assert d2["spearman"] is None and d2["spearman_p"] is None and d2["gap"] is None
    assert d2["binding_resource"] is None and d2["constraint_satisfaction"] == 1.0


def test_metrics_of_an_allocated_plan(plan):
    m = plan_metrics(plan)
    assert m.constraint_satisfaction == 1.0
    assert m.consistency_class == 1.0  # guaranteed by the allocator within cost classes
    assert m.consistency_class_incl_none == 1.0
    assert m.binding_utilisation >= 0.97
    d = json.loads(json.dumps(m.to_dict(), allow_nan=False))
    counts = collections.Counter(a.method for a in plan.allocations)
    assert d["method_counts"] == {k: counts.get(k, 0) for k in ("none", "lora", "adapter", "prefix")}
    assert d["n_sites"] == len(plan.allocations) and d["n_adapted"] == len(plan.assignments())
    assert d["constraints"]["params"] == [plan.use["params"], 4000.0, True]
    assert d["constraints"]["latency"] == [plan.use["latency"], "inf", True]
    assert d["utilisation"] == {"params": pytest.approx(plan.use["params"] / 4000.0), "latency": 0.0}
    assert d["trainable_params"] == plan.use["params"] and d["objective"] == plan.objective
    assert d["gap"] == pytest.approx((plan.dual_bound - plan.objective) / plan.dual_bound)
    assert "Optimality Gap" in render_metrics_markdown(m)
