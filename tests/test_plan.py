"""Plan record: JSON round trip, strict loading, metrics, PEFT export."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from layerlens_jax._src.allocate import allocate
from layerlens_jax.models import BertClassifier, BertConfig
from layerlens_jax._src.plan import (SCHEMA_VERSION, Plan, SiteAllocation, hf_bert_module_name,
                                load_plan, plan_metrics, render_metrics_markdown, save_peft_config,
                                save_plan, to_peft_config, uniform_assignments)
from layerlens_jax._src.sites import discover_sites


@pytest.fixture(scope="module")
def sites():
    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    return discover_sites(model, example=(jnp.zeros((2, 7), jnp.int32),))


@pytest.fixture(scope="module")
def plan(sites):
    u = np.random.default_rng(0).uniform(size=len(sites))
    return allocate(sites, u / u.max(), {"params": 4000.0, "latency": float("inf")})


def _alloc(site, method, size, utility, kind="linear", cls="c", pinned=False):
    return SiteAllocation(site=site, kind=kind, method=method, size=size, cost={"params": 10.0 * size},
                          utility=utility, gain=0.1 * size, cost_class=cls, pinned=pinned)


def test_json_round_trip_and_atomic_save(plan, tmp_path):
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    assert json.loads(text)["budgets"]["latency"] == "inf"
    path = tmp_path / "sub" / "plan.json"
    save_plan(plan, path)
    assert os.listdir(path.parent) == ["plan.json"]  # no temporary file left behind
    assert load_plan(path) == plan
    assert plan.schema_version == SCHEMA_VERSION


def test_assignments_and_immutability(plan):
    got = plan.assignments()
    assert got == {a.site: (a.method, a.size) for a in plan.allocations if a.method != "none"}
    assert all(m in ("lora", "adapter", "prefix") and s > 0 for m, s in got.values())
    with pytest.raises(TypeError):
        plan.budgets["params"] = 1.0
    with pytest.raises(AttributeError):
        plan.objective = 0.0  # frozen dataclass
    assert plan.peft_options["lora_alpha"] == 16.0
    assert plan.peft_options["use_rslora"] is False
    assert plan.peft_options["adapter_activation"] == "gelu"


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(extra=1), "unknown key"),
    (lambda d: d.pop("use"), "missing key"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.update(allocations={}), "'allocations' must be a list"),
    (lambda d: d["allocations"][0].update(size="8"), "key 'size' must be int"),
    (lambda d: d["allocations"][0].update(method="ia3"), "unknown method 'ia3'"),
    (lambda d: d["allocations"][0].update(kind="mlp"), "unknown kind 'mlp'"),
    (lambda d: d["allocations"][0].update(colour="red"), "unknown key"),
    (lambda d: d["allocations"][0].pop("gain"), "missing key"),
    (lambda d: d["allocations"].append(dict(d["allocations"][0])), "appears twice"),
    (lambda d: d["peft_options"].update(lora_alpha="big"), "lora_alpha"),
    (lambda d: d["peft_options"].update(rank=3), "unknown key 'rank'"),
    (lambda d: d["budgets"].update(flops=1), "unknown resource 'flops'"),
    (lambda d: d["allocations"][0]["cost"].update(params=-np.inf), "must be finite"),
])
def test_strict_loading(plan, edit, match):
    d = json.loads(plan.to_json())
    edit(d)
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(d)


def test_strict_loading_names_the_site(plan):
    d = json.loads(plan.to_json())
    d["allocations"][5]["method"] = "lora"
    d["allocations"][5]["size"] = 0
    with pytest.raises(ValueError, match=d["allocations"][5]["site"]):
        Plan.from_dict(d)
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.from_json("{")


def test_load_plan_checks_sites(plan, sites, tmp_path):
    path = tmp_path / "plan.json"
    save_plan(plan, path)
    load_plan(path, sites)
    with pytest.raises(ValueError, match="not sites of the model"):
        load_plan(path, sites[:3])
    with pytest.raises(ValueError, match="missing from the plan"):
        Plan.from_assignments(sites[:5], {}).check_sites(sites, require_all=True)


def test_from_assignments_uniform_lora(sites):
    u = np.linspace(0.1, 1.0, len(sites))
    assign = uniform_assignments(sites, "lora", 8)
    assert sorted(assign) == sorted(s.path for s in sites if s.path.endswith(("query", "value")))
    plan = Plan.from_assignments(sites, assign, u, budgets={"params": 1024.0})
    assert plan.use["params"] == 4 * 8 * (16 + 16)
    assert plan.assignments() == assign
    assert plan.dual_bound is None and plan.solver == "manual"
    # costs from the same model as allocate: equal to the allocator's for the same option
    q = plan.allocation("encoder/layers_0/attention/mha/query")
    auto = allocate(sites, u, {"params": 5000.0}, pinned={q.site: ("lora", 8)})
    assert dict(auto.allocation(q.site).cost) == dict(q.cost)
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError, match="incompatible with its kind 'norm'"):
        Plan.from_assignments(sites, {"embeddings/norm": ("lora", 4)})
    with pytest.raises(ValueError, match="names site 'x'"):
        Plan.from_assignments(sites, {"x": ("lora", 4)})


def test_metrics_hand_computed():
    allocs = (
        _alloc("a", "lora", 8, 0.9), _alloc("b", "lora", 4, 0.5), _alloc("c", "lora", 6, 0.4),
        _alloc("d", "none", 0, 0.8), _alloc("e", "adapter", 2, 0.3, kind="block", cls="blk"),
        _alloc("f", "lora", 1, 0.95, cls="other"),
    )
    use = {"params": sum(a.cost["params"] for a in allocs)}  # 210
    plan = Plan(allocations=allocs, budgets={"params": 250.0}, use=use, dual_bound=2.2,
                objective=2.1)
    m = plan_metrics(plan)
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


def test_metrics_of_an_allocated_plan(plan):
    m = plan_metrics(plan)
    assert m.constraint_satisfaction == 1.0
    assert m.consistency_class == 1.0  # guaranteed by the allocator within cost classes
    assert m.consistency_class_incl_none == 1.0
    assert m.binding_utilisation >= 0.97
    assert json.dumps(m.to_dict(), allow_nan=False)
    assert "Optimality Gap" in render_metrics_markdown(m)


def test_peft_config_export(sites, tmp_path):
    assign = {"encoder/layers_0/attention/mha/query": ("lora", 8),
              "encoder/layers_0/attention/mha/value": ("lora", 8),
              "encoder/layers_1/attention/mha/query": ("lora", 4),
              "embeddings/word": ("lora", 2),
              "encoder/layers_0/mlp": ("adapter", 8),
              "encoder/layers_0/attention/mha": ("prefix", 4)}
    plan = Plan.from_assignments(sites, assign, peft_options={"lora_alpha": 32.0, "use_rslora": True})
    config, dropped = to_peft_config(plan, hf_bert_module_name, task_type="SEQ_CLS",
                                     alpha_pattern={"embeddings/word": 4.0})
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["r"] == 8 and config["lora_alpha"] == 32.0 and config["use_rslora"] is True
    assert config["target_modules"] == ["embeddings.word_embeddings",
                                        "encoder.layer.0.attention.self.query",
                                        "encoder.layer.0.attention.self.value",
                                        "encoder.layer.1.attention.self.query"]
    assert config["rank_pattern"] == {"embeddings.word_embeddings": 2,
                                      "encoder.layer.1.attention.self.query": 4}
    assert config["alpha_pattern"] == {"embeddings.word_embeddings": 4.0}
    assert sorted((d["site"], d["method"]) for d in dropped) == [
        ("encoder/layers_0/attention/mha", "prefix"), ("encoder/layers_0/mlp", "adapter")]
    # a mapping without some sites: those are dropped, with the reason
    config2, dropped2 = to_peft_config(plan, {"embeddings/word": "word"})
    assert config2["target_modules"] == ["word"]
    assert any("no PyTorch module name" in d["reason"] for d in dropped2)
    default, _ = to_peft_config(plan)
    assert "encoder.layers_0.attention.mha.query" in default["target_modules"]
    with pytest.raises(ValueError, match="map to one module name"):
        to_peft_config(plan, lambda p: "same")
    save_peft_config(plan, tmp_path, hf_bert_module_name)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8


def test_hf_bert_names():
    assert hf_bert_module_name("encoder/layers_3/attention/mha/out") == "encoder.layer.3.attention.output.dense"
    assert hf_bert_module_name("encoder/layers_0/mlp/intermediate") == "encoder.layer.0.intermediate.dense"
    assert hf_bert_module_name("encoder/layers_0/mlp/output") == "encoder.layer.0.output.dense"
    assert hf_bert_module_name("pooler") == "pooler.dense"
    assert hf_bert_module_name("encoder/layers_0/mlp") is None
