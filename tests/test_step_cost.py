"""Whole-step cost model (the backprop-depth term) against XLA and brute force."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layerlens_jax as ll
from layerlens_jax._src.costs import RESOURCES, Catalogue, CostModel, option_costs
from layerlens_jax._src.step_cost import (StepProfile, compiled_step_bytes, depth_groups,
                                          matmul_flops, measure_step_profile, plan_step_cost,
                                          site_call_order)
from layerlens_jax.models import BertClassifier, BertConfig

from plans import MIXED

B, T = 8, 32  # the shape of scripts/bench_costs.py (tiny: 0.95-1.08 of XLA there)


def loss_fn(model, batch):
    logits = model(batch["input_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


@pytest.fixture(scope="module")
def setup():
    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 50, (B, T)), jnp.int32)
    batch = {"input_ids": ids, "labels": jnp.zeros((B,), jnp.int32)}
    profile = measure_step_profile(model, loss_fn, batch, example=(ids,))
    sites = ll.discover_sites(model, example=(ids,))
    return model, batch, profile, sites


def _predicted(profile, sites, assignments, cm):
    options = sorted(set(assignments.values()) | {("none", 0)})
    cost = option_costs(sites, options, cm)
    rows = np.stack([cost[i, options.index(assignments.get(s.path, ("none", 0)))]
                     for i, s in enumerate(sites)])
    return plan_step_cost(profile, sites, rows, np.array([s.path in assignments for s in sites]))


def _measured(model, batch, assignments):
    m = ll.apply_plan(model, assignments, example=(batch["input_ids"],))
    step, state = ll.make_functional_train_step(m, optax.adamw(1e-3), loss_fn)
    args = (state.trainable, state.opt_state, state.other, state.step, state.frozen, batch)
    return (compiled_step_bytes(step.jitted, *args)["step"],
            matmul_flops(jax.make_jaxpr(step.jitted)(*args)) / (B * T))


def test_call_order_and_depth_groups_follow_the_forward_graph(setup):
    model, batch, profile, _ = setup
    order = list(site_call_order(model, (batch["input_ids"],)))
    assert order.index("encoder/layers_0/attention") < order.index(
        "encoder/layers_0/attention/mha/query") < order.index("encoder/layers_0/mlp/output") \
        < order.index("encoder/layers_1/attention") < order.index("classifier")
    groups, depth = depth_groups(order)
    assert groups == ("embeddings", "encoder/layers_0", "encoder/layers_1", "pooler", "classifier")
    assert profile.groups == groups and depth["encoder/layers_1/mlp/intermediate"] == 2
    # backward through more layers keeps more: the fixed parts fall with the lowest group
    assert np.all(np.diff(profile.vram_bytes) <= 0) and profile.vram_bytes[1] > profile.vram_bytes[3]
    assert np.all(np.diff(profile.train_flops) <= 0)


def test_matmul_flops_counts_a_known_product():
    f = jax.make_jaxpr(lambda a, b: jnp.tanh(a @ b) @ b.T)(jnp.ones((5, 7)), jnp.ones((7, 3)))
    assert matmul_flops(f) == 2 * 5 * 7 * 3 + 2 * 5 * 3 * 7


@pytest.mark.parametrize("name", ["uniform", "top1", "mixed", "cls_only", "all_r1"])
def test_step_memory_and_flops_match_xla(setup, name):
    model, batch, profile, sites = setup
    qv = lambda layers: {f"encoder/layers_{i}/attention/mha/{p}": ("lora", 8)  # noqa: E731
                         for i in layers for p in ("query", "value")}
    linear = [s.path for s in sites if s.kind == "linear" and "/layers_" in s.path]
    assignments = {"uniform": qv([0, 1]), "top1": qv([1]), "mixed": MIXED,
                   "cls_only": {"classifier": ("lora", 2)},
                   "all_r1": {p: ("lora", 1) for p in linear}}[name]  # the widest plan
    pred = _predicted(profile, sites, assignments, profile.cost_model())
    mem, flops = _measured(model, batch, assignments)
    assert pred["vram_bytes"] == pytest.approx(mem, rel=0.10)
    assert pred["train_flops"] == pytest.approx(flops, rel=0.20)


def test_vram_budget_holds_when_compiled(setup):
    model, batch, profile, sites = setup
    cm = profile.cost_model()
    u = np.random.default_rng(1).uniform(0.2, 1.0, len(sites))
    lora = Catalogue.from_sizes(lora=(1, 2, 4, 8))
    full = _predicted(profile, sites, {s.path: ("lora", 8) for s in sites
                                       if s.kind == "linear"}, cm)["vram_bytes"]
    for frac in (0.5, 0.8):
        budget = frac * full
        plan = ll.allocate(sites, u, {"vram_bytes": budget}, catalogue=lora, cost_model=cm,
                           step_profile=profile)
        assert plan.assignments() and plan.use["vram_bytes"] <= budget
        # the plan's own use is the whole-step prediction
        assert plan.use["vram_bytes"] == pytest.approx(
            _predicted(profile, sites, plan.assignments(), cm)["vram_bytes"])
        # compiled: within the model's +-10 % tolerance of the budget. NOT yet strictly below it:
        # on this tiny model the per-site marginals under-count by up to ~8 % (issue 15, open)
        assert _measured(model, batch, plan.assignments())[0] <= budget * 1.10


def _toy(seed, n_groups=3, per_group=2):
    rng = np.random.default_rng(seed)
    sites = [ll.Site(path=f"layers_{g}/p{j}", kind="linear", module_type="Dense",
                     param_shapes={"kernel": (8, 8)}, num_params=64, in_features=8,
                     out_features=8, tokens_per_example=4)
             for g in range(n_groups) for j in range(per_group)]
    depth = {s.path: int(s.path[7]) for s in sites}
    fixed = np.sort(rng.uniform(1e3, 1e4, n_groups + 1))[::-1]
    profile = StepProfile(groups=tuple(f"layers_{g}" for g in range(n_groups)), depth=depth,
                          vram_bytes=tuple(fixed), train_flops=tuple(fixed * 0),
                          forward_flops=0.0, batch_size=2, seq_len=4)
    return sites, rng.uniform(0.1, 1.0, len(sites)), profile


@pytest.mark.parametrize("seed", range(4))
def test_depth_enumeration_matches_milp_and_brute_force(seed):
    sites, u, profile = _toy(seed)
    cm = CostModel(batch_size=2, seq_len=4)
    catalogue = Catalogue.from_sizes(lora=(1, 4))
    budget = profile.vram_bytes[0] * (0.9 + 0.1 * seed) + 3000.0 * seed
    budgets = {"vram_bytes": budget}
    fast = ll.allocate(sites, u, budgets, catalogue=catalogue, cost_model=cm, step_profile=profile)
    exact = ll.allocate_exact(sites, u, budgets, catalogue=catalogue, cost_model=cm,
                              step_profile=profile)
    truth = _brute_force(sites, u, profile, budget, cm, catalogue)
    assert exact.objective == pytest.approx(truth, rel=1e-9, abs=1e-12)
    assert fast.objective == pytest.approx(truth, rel=1e-6, abs=1e-12)
    assert fast.dual_bound >= truth - 1e-9
    for plan in (fast, exact):
        assert plan.use["vram_bytes"] <= budget


def _brute_force(sites, u, profile, budget, cm, catalogue, key=lambda s: s.path):
    """The optimum by enumeration: one option per group of sites (``key``; default: each site on
    its own), the whole step charged at the lowest member of any adapted group."""
    options = catalogue.options()
    cost = option_costs(sites, options, cm)[..., RESOURCES.index("vram_bytes")]
    gain = ll.GainModel().gain(u, options)
    groups = sorted({key(s) for s in sites})
    best = 0.0
    for pick in itertools.product(range(len(options)), repeat=len(groups)):
        choice = [pick[groups.index(key(s))] for s in sites]
        adapted = [i for i, o in enumerate(choice) if o]
        d = min(profile.depth[sites[i].path] for i in adapted) if adapted else len(profile.groups)
        use = profile.vram_bytes[d] + sum(cost[i, o] for i, o in enumerate(choice))
        if use <= budget:
            best = max(best, sum(gain[i, o] for i, o in enumerate(choice)))
    return best


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tie", ["layers", "by_layer"])
def test_tied_depth_enumeration_matches_milp_and_brute_force(seed, tie):
    """Ties and a step profile together: a group is as deep as its lowest member (``layers``:
    one group per projection spanning every layer; ``by_layer``: one group per layer)."""
    sites, u, profile = _toy(seed, n_groups=3, per_group=3)
    cm = CostModel(batch_size=2, seq_len=4)
    catalogue = Catalogue.from_sizes(lora=(1, 4))
    # "layers" groups reach layer 0, so only budgets above its fixed part adapt anything; per-layer
    # groups are tried between the fixed parts of layers 1 and 0 (the top layers only)
    low = profile.vram_bytes[0 if tie == "layers" else 1]
    budget = low + 2000.0 * (seed + 1)
    key = (lambda s: s.path.split("/")[1]) if tie == "layers" else (lambda s: s.path.split("/")[0])
    rule = "layers" if tie == "layers" else key
    fast = ll.allocate(sites, u, {"vram_bytes": budget}, catalogue=catalogue, cost_model=cm,
                       step_profile=profile, tie=rule)
    exact = ll.allocate_exact(sites, u, {"vram_bytes": budget}, catalogue=catalogue, cost_model=cm,
                              step_profile=profile, tie=rule)
    truth = _brute_force(sites, u, profile, budget, cm, catalogue, key)
    assert truth > 0
    assert exact.objective == pytest.approx(truth, rel=1e-9)
    assert fast.objective <= truth + 1e-9 and fast.dual_bound >= truth - 1e-9
    for plan in (fast, exact):
        assert plan.use["vram_bytes"] <= budget
        by_group = {}
        for path, option in plan.assignments().items():  # every member shares its group's option
            by_group.setdefault(key(next(s for s in sites if s.path == path)), set()).add(option)
        assert all(len(v) == 1 for v in by_group.values())


def test_rank1_input_fraction_is_measured_and_used(setup):
    """The measured rank-1 fraction reproduces XLA's step memory on the plan it is calibrated on
    (LoRA r1 on every LoRA-able non-embedding site); a fraction clipped to 0 / 1 means XLA is below
    / above the whole range; allocate's plans are priced with it."""
    model, batch, profile, sites = setup
    f = profile.rank1_input_fraction
    every = {s.path: ("lora", 1) for s in sites if s.kind == "linear"}
    measured = _measured(model, batch, every)[0]
    pred = _predicted(profile, sites, every, profile.cost_model())["vram_bytes"]
    if 0.0 < f < 1.0:
        assert pred == pytest.approx(measured, rel=1e-6)
    else:
        assert (measured < pred) if f == 0.0 else (measured > pred)
    u = np.random.default_rng(2).uniform(0.2, 1.0, len(sites))
    plan = ll.allocate(sites, u, {"vram_bytes": 1.05 * pred}, step_profile=profile,
                       catalogue=Catalogue.from_sizes(lora=(1, 2)))
    assert plan.use["vram_bytes"] == pytest.approx(
        _predicted(profile, sites, plan.assignments(), profile.cost_model())["vram_bytes"])
    # the base forward is timed once: the fixed part of latency at every depth
    assert profile.forward_ms > 0 and np.all(profile.fixed("latency") == profile.forward_ms)
    assert plan.use["latency"] >= profile.forward_ms
    with pytest.raises(ValueError, match="rank1_input_fraction"):
        CostModel(rank1_input_fraction=1.5)


def test_scanned_stacks_are_refused_naming_the_site():
    from layerlens_jax.decoder import Decoder, DecoderConfig

    model = Decoder(DecoderConfig.tiny(scan_layers=True), rngs=nnx.Rngs(0))
    ids = jnp.zeros((2, 8), jnp.int32)
    with pytest.raises(ValueError, match=r"site 'layers/0/.*nnx.scan stack"):
        measure_step_profile(model, lambda m, b: m(b).mean(), ids, example=(ids,))
