"""Plan record: JSON round trip, strict loading, legacy option names, normalisation."""

import dataclasses
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerlens_jax._src.allocate import allocate
from layerlens_jax.models import BertClassifier, BertConfig
from layerlens_jax._src.costs import CostModel
from layerlens_jax._src.plan import (SCHEMA_VERSION, Plan, SiteAllocation, load_plan, save_plan,
                                     uniform_assignments)
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
    assert dict(plan.peft_options) == {"lora_alpha": 16.0, "use_rslora": False,
                                       "adapter_activation": "gelu", "lora_dropout": 0.0,
                                       "prefix_reparam_hidden": None}


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
    (lambda d: d["peft_options"].update(prefix_reparam_hidden=0), "prefix_reparam_hidden"),
    (lambda d: d["peft_options"].update(use_rslora=1), "use_rslora"),
    (lambda d: d["peft_options"].update(prefix_projection=4), "both 'prefix_projection'"),
    (lambda d: d["peft_options"].update(prefix_projection=-1), "prefix_projection"),
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


def test_json_content_written(sites):
    """The JSON holds the schema's keys with the values given (not just "something")."""
    q, v = "encoder/layers_0/attention/mha/query", "encoder/layers_0/attention/mha/value"
    plan = Plan.from_assignments(sites, {q: ("lora", 8), v: ("lora", 4)},
                                 budgets={"params": 500.0, "latency": float("inf")},
                                 peft_options={"lora_alpha": 8, "prefix_reparam_hidden": 5})
    d = json.loads(plan.to_json())
    assert list(d) == ["schema_version", "solver", "objective", "dual_bound", "budgets", "use",
                       "peft_options", "metadata", "allocations"]
    assert d["schema_version"] == 1 and d["solver"] == "manual" and d["dual_bound"] is None
    assert d["budgets"] == {"params": 500.0, "latency": "inf"}
    assert d["use"]["params"] == 8 * (16 + 16) + 4 * (16 + 16)  # 384
    assert d["peft_options"] == {"lora_alpha": 8.0, "use_rslora": False,
                                 "adapter_activation": "gelu", "lora_dropout": 0.0,
                                 "prefix_reparam_hidden": 5}
    by_site = {a["site"]: a for a in d["allocations"]}
    assert len(by_site) == len(sites)
    assert (by_site[q]["method"], by_site[q]["size"], by_site[q]["cost"]["params"]) == ("lora", 8, 256)
    assert (by_site[v]["method"], by_site[v]["size"]) == ("lora", 4)
    assert (by_site["pooler"]["method"], by_site["pooler"]["size"], by_site["pooler"]["gain"]) == (
        "none", 0, 0.0)
    assert d["metadata"]["cost_model"]["batch_size"] == CostModel().batch_size


def test_legacy_prefix_projection_is_read(plan):
    """Plans written before the PEFT options had one record name the prefix MLP width
    ``prefix_projection`` (0 = off); loading reads it as ``prefix_reparam_hidden`` (None = off)."""
    d = json.loads(plan.to_json())
    assert d["peft_options"].pop("prefix_reparam_hidden") is None
    for legacy, expected in ((0, None), (12, 12)):
        d["peft_options"]["prefix_projection"] = legacy
        loaded = Plan.from_dict(d)
        assert loaded.peft_options["prefix_reparam_hidden"] == expected
        assert "prefix_projection" not in loaded.peft_options
        assert json.loads(loaded.to_json())["peft_options"]["prefix_reparam_hidden"] == expected
    # only the JSON loader knows the old name
    with pytest.raises(ValueError, match="unknown key 'prefix_projection'"):
        Plan.create(allocations=plan.allocations, budgets={}, use={}, dual_bound=None,
                    objective=0.0, peft_options={"prefix_projection": 3})


def test_missing_peft_options_take_defaults(plan):
    d = json.loads(plan.to_json())
    d["peft_options"] = {"lora_alpha": 4}
    loaded = Plan.from_dict(d)
    assert dict(loaded.peft_options) == {"lora_alpha": 4.0, "use_rslora": False,
                                         "adapter_activation": "gelu", "lora_dropout": 0.0,
                                         "prefix_reparam_hidden": None}
    assert type(loaded.peft_options["lora_alpha"]) is float


def test_cost_model_prefix_width_is_recorded(sites):
    mha = "encoder/layers_0/attention/mha"
    plan = Plan.from_assignments(sites, {mha: ("prefix", 2)},
                                 cost_model=CostModel(prefix_projection=6))
    assert plan.peft_options["prefix_reparam_hidden"] == 6
    # prefix 2 on 2 heads of 8 from width 16 through a 6-wide MLP: 2*16 + (16*6 + 6) + (6*32 + 32)
    assert plan.allocation(mha).cost["params"] == 2 * 16 + 16 * 6 + 6 + 6 * 32 + 32
    assert Plan.from_assignments(sites, {}).peft_options["prefix_reparam_hidden"] is None


def test_create_normalises_and_the_constructor_only_validates():
    a = SiteAllocation(site="s", kind="linear", method="lora", size=np.int64(4),
                       cost={"params": np.float32(40.0)}, utility=np.float64(0.5),
                       gain=np.float32(0.25), pinned=np.bool_(True))
    plan = Plan.create(allocations=[a], budgets={"params": "inf"}, use={"params": np.int64(40)},
                       dual_bound=np.float64(1.0), objective=np.float32(0.25),
                       metadata={"t": (np.float32(1.5), np.nan)})
    b = plan.allocations[0]
    assert (type(b.size), type(b.utility), type(b.gain), type(b.pinned)) == (int, float, float, bool)
    assert isinstance(b.cost, types.MappingProxyType) and type(b.cost["params"]) is float
    assert dict(plan.budgets) == {"params": float("inf")} and type(plan.use["params"]) is float
    assert type(plan.objective) is float and type(plan.dual_bound) is float
    assert dict(plan.metadata) == {"t": [1.5, None]}
    for mapping in (plan.budgets, plan.use, plan.peft_options, plan.metadata, b.cost):
        with pytest.raises(TypeError):
            mapping["x"] = 1
    # a replace keeps the plan normalised; the bare constructor validates
    assert dataclasses.replace(plan, solver="milp").budgets is plan.budgets
    with pytest.raises(ValueError, match="missing key"):
        Plan(allocations=(a,), budgets={}, use={}, dual_bound=None, objective=0.0,
             peft_options={"lora_alpha": 2.0})
    with pytest.raises(ValueError, match="must be a tuple"):
        Plan(allocations=[a], budgets={}, use={}, dual_bound=None, objective=0.0)
    with pytest.raises(ValueError, match="Plan.use\\['params'\\] must be >= 0"):
        Plan.create(allocations=[a], budgets={}, use={"params": -1.0}, dual_bound=None,
                    objective=0.0)
    with pytest.raises(ValueError, match="site 's'.*incompatible with kind 'norm'"):
        SiteAllocation(site="s", kind="norm", method="lora", size=2, cost={}, utility=0.0,
                       gain=0.0)
