"""Tied allocation (``allocate(..., tie=...)``): checked against brute-force enumeration."""

import itertools

import numpy as np
import pytest

import layerlens_jax as ll
from layerlens_jax._src.costs import Catalogue
from layerlens_jax._src.problem import build_problem
from layerlens_jax._src.ties import tie_key, tie_labels


def _site(path, d_in, d_out):
    return ll.Site(path=path, kind="linear", module_type="Dense",
                   param_shapes={"kernel": (d_in, d_out)}, num_params=d_in * d_out,
                   in_features=d_in, out_features=d_out)


def _stack(layers=3):
    shapes = {"attn/query": (16, 16), "attn/value": (16, 16), "mlp/fc1": (16, 48)}
    return [_site(f"layers_{i}/{k}", *s) for i in range(layers) for k, s in shapes.items()]


def test_tie_key_replaces_layer_indices_only():
    assert tie_key("encoder/layers_3/attention/query") == "encoder/layers_*/attention/query"
    assert tie_key("layers/11/mlp/fc1") == "layers/*/mlp/fc1"
    assert tie_key("embeddings/word_embeddings") == "embeddings/word_embeddings"
    assert tie_key("block_2/fc_1") == "block_*/fc_*"


def _brute_force(sites, u, budget, catalogue):
    """The tied optimum by enumerating one option per group (tiny instances only)."""
    problem = build_problem(sites, u, {"params": budget}, catalogue=catalogue)
    labels, keys = tie_labels(problem.sites, "layers")
    best = -np.inf
    for combo in itertools.product(range(len(problem.options)), repeat=len(keys)):
        choice = np.asarray(combo)[labels]
        idx = np.arange(len(sites))
        if not problem.mask[idx, choice].all():
            continue
        if problem.cost_rso[0, idx, choice].sum() > budget + 1e-9:
            continue
        best = max(best, problem.gain[idx, choice].sum())
    return best


@pytest.mark.parametrize("budget", [700, 2500, 6000])
def test_tied_plan_shares_options_and_matches_the_enumerated_optimum(budget):
    sites = _stack()
    u = np.random.default_rng(1).uniform(0.1, 1.0, len(sites))
    catalogue = Catalogue.from_sizes(lora=(1, 2, 4, 8))
    plan = ll.allocate(sites, u, {"params": budget}, catalogue=catalogue, tie="layers")
    exact = ll.allocate_exact(sites, u, {"params": budget}, catalogue=catalogue, tie="layers")
    optimum = _brute_force(sites, u, budget, catalogue)
    for p in (plan, exact):
        got = p.assignments()
        for key in ("attn/query", "attn/value", "mlp/fc1"):
            assert len({got.get(f"layers_{i}/{key}", ("none", 0)) for i in range(3)}) == 1
        assert p.use["params"] <= budget
        # created parameters of the plan equal the sum over its sites
        assert p.use["params"] == sum(a.cost["params"] for a in p.allocations)
    assert exact.objective == pytest.approx(optimum, rel=1e-9)
    assert plan.objective <= optimum + 1e-9 <= plan.dual_bound + 1e-6
    assert plan.metadata["tie"] == {"rule": "layers", "groups": 3}
    # the untied optimum is at least the tied one
    assert ll.allocate_exact(sites, u, {"params": budget}, catalogue=catalogue).objective \
        >= optimum - 1e-9


def test_a_group_option_must_fit_the_budget_as_a_whole():
    sites = _stack()
    u = np.ones(len(sites))
    # 3 x fc1 at rank 1 costs 3 * 64 = 192 > 150: only single 32-parameter attention options fit
    plan = ll.allocate(sites, u, {"params": 150}, catalogue=Catalogue.from_sizes(lora=(1,)),
                       tie="layers")
    got = plan.assignments()
    assert not any(k.endswith("fc1") for k in got)
    assert plan.use["params"] <= 150 and len(got) == 3


def test_pinned_sites_stay_their_own_group():
    sites = _stack()
    labels, keys = tie_labels(sites, "layers", pinned=[i == 0 for i in range(len(sites))])
    assert len(keys) == 4 and labels[0] != labels[3]
    plan = ll.allocate(sites, np.ones(len(sites)), {"params": 2000},
                       catalogue=Catalogue.from_sizes(lora=(1, 2)), tie="layers",
                       pinned={"layers_0/attn/query": ("lora", 1)})
    assert plan.assignments()["layers_0/attn/query"] == ("lora", 1)


def test_bad_ties_are_refused_naming_the_sites():
    sites = [_site("layers_0/fc", 16, 16), _site("layers_1/fc", 16, 32)]
    with pytest.raises(ValueError, match="'layers_0/fc' and 'layers_1/fc'"):
        ll.allocate(sites, [1.0, 1.0], {"params": 1000}, tie="layers")
    with pytest.raises(ValueError, match="tie must be one of"):
        ll.allocate(sites, [1.0, 1.0], {"params": 1000}, tie="kinds")
    custom = ll.allocate(sites, [1.0, 1.0], {"params": 1000}, tie=lambda s: s.path)
    assert "tie" in custom.metadata
