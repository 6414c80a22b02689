"""GoRA's rank allocation (layerlens_jax._src.gora) against its published rule, computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from layerlens_jax import Site
from layerlens_jax._src.costs import trainable_params
from layerlens_jax._src.gora import gora_ranks


def _site(path, d_in, d_out):
    return Site(path=path, kind="linear", module_type="Linear",
                param_shapes={"kernel": (d_in, d_out)}, num_params=d_in * d_out,
                in_features=d_in, out_features=d_out)


SITES = [_site("q", 384, 384), _site("v", 384, 384), _site("fc1", 384, 1536),
         _site("fc2", 1536, 384)]


def test_planted_shares_give_the_official_ranks():
    """Shares 0.5 / 0.3 / 0.15 / 0.05 of B = 73,728 (the MiniLM-L6 reference budget):
    rank_i = round(B * p_i) // (d_in + d_out), as GoRA's get_allocated_rank."""
    imp = [5.0, 3.0, 1.5, 0.5]
    b = 73_728
    ranks = gora_ranks(SITES, imp, b)
    expect = {"q": round(b * 0.5) // 768, "v": round(b * 0.3) // 768,
              "fc1": round(b * 0.15) // 1920, "fc2": round(b * 0.05) // 1920}
    assert ranks == expect == {"q": 48, "v": 28, "fc1": 5, "fc2": 1}
    assert sum(trainable_params(s, "lora", ranks[s.path]) for s in SITES) <= b


def test_a_share_below_one_rank_gets_none_and_max_rank_clips():
    ranks = gora_ranks(SITES, [1000.0, 1.0, 1.0, 1.0], 10_000, max_rank=8)
    assert ranks == {"q": 8, "v": 0, "fc1": 0, "fc2": 0}


def test_never_over_budget_and_equal_to_the_rule_when_it_fits():
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 8))
        sites = [_site(f"s{i}", int(rng.integers(1, 40)), int(rng.integers(1, 40)))
                 for i in range(n)]
        imp = rng.exponential(size=n) * (rng.random(n) > 0.2) + 1e-9
        b = float(rng.integers(1, 600))
        ranks = gora_ranks(sites, imp, b)
        used = sum(trainable_params(s, "lora", ranks[s.path]) for s in sites)
        assert used <= b
        share = imp / imp.sum()
        rule = {s.path: min(int(round(b * p)) // (s.in_features + s.out_features), 64)
                for s, p in zip(sites, share)}
        if sum(r * (s.in_features + s.out_features) for s, r in
               zip(sites, rule.values())) <= b:
            assert ranks == rule


def test_bad_importance_names_the_site():
    with pytest.raises(ValueError, match="'v'"):
        gora_ranks(SITES, [1.0, np.nan, 1.0, 1.0], 1000)
    with pytest.raises(ValueError, match="'fc1'"):
        gora_ranks(SITES, [1.0, 1.0, -1.0, 1.0], 1000)
    with pytest.raises(ValueError, match="every importance is zero"):
        gora_ranks(SITES, [0.0] * 4, 1000)
    with pytest.raises(ValueError, match="4 sites"):
        gora_ranks(SITES, [1.0], 1000)


def test_fill_spends_the_rest_by_the_largest_remainder():
    """B = 10,000 on four sites: the rule gives q 6 (ideal 6.51), v 3 (3.91), fc1 0 (0.78), fc2 0
    (0.26), 6,912 params; 3,088 are left: v (remainder 0.91) gets a rank (768), then fc1 (0.78)
    one (1,920); the 400 left fit nothing."""
    imp = [5.0, 3.0, 1.5, 0.5]
    share = np.array(imp) / sum(imp)
    per = np.array([768, 768, 1920, 1920])
    assert np.allclose(10_000 * share / per, [6.51, 3.91, 0.78, 0.26], atol=0.01)
    assert gora_ranks(SITES, imp, 10_000) == {"q": 6, "v": 3, "fc1": 0, "fc2": 0}
    assert gora_ranks(SITES, imp, 10_000, fill=True) == {"q": 6, "v": 4, "fc1": 1, "fc2": 0}
    rng = np.random.default_rng(1)
    for _ in range(200):
        imp = rng.exponential(size=4)
        b = float(rng.integers(500, 40_000))
        ranks = gora_ranks(SITES, imp, b, fill=True, max_rank=16)
        used = sum(trainable_params(s, "lora", ranks[s.path]) for s in SITES)
        assert used <= b
        assert all(ranks[s.path] == 16 or trainable_params(s, "lora", 1) > b - used
                   for s in SITES)  # nothing that fits is left out


def _largest_remainder_reference(sites, imp, budget, start):
    """Obviously-correct fill: one rank at a time to the affordable site furthest below its ideal
    fractional rank B * p_i / (d_in + d_out)."""
    per = {s.path: trainable_params(s, "lora", 1) for s in sites}
    share = {s.path: w / sum(imp) for s, w in zip(sites, imp)}
    ranks = dict(start)
    while True:
        left = budget - sum(per[p] * r for p, r in ranks.items())
        options = [(budget * share[p] / per[p] - ranks[p], -i, p)
                   for i, p in enumerate(per) if per[p] <= left]
        if not options:
            return ranks
        ranks[max(options)[2]] += 1


def test_floor_first_then_importance_fills_the_rest():
    imp = [5.0, 3.0, 1.5, 0.5]
    b = 12_000  # the floor (r1 everywhere: 2 x 768 + 2 x 1920 = 5,376) leaves 6,624
    floor = {s.path: 1 for s in SITES}
    ranks = gora_ranks(SITES, imp, b, floor=floor)
    assert all(ranks[p] >= 1 for p in floor)
    # GoRA's own ranks (q 7, v 4, fc1 0, fc2 0) raised to the floor need 12,288: over by 288, so
    # v (the lowest share above its floor) gives one rank back; the largest remainder then spends
    # what is left (480: nothing more is affordable)
    start = {"q": 7, "v": 3, "fc1": 1, "fc2": 1}
    assert gora_ranks(SITES, imp, b, max_rank=64) == {"q": 7, "v": 4, "fc1": 0, "fc2": 0}
    assert ranks == _largest_remainder_reference(SITES, imp, b, start)
    used = sum(trainable_params(s, "lora", ranks[s.path]) for s in SITES)
    assert used <= b and b - used < 768  # nothing affordable is left
    # B = 20,000: GoRA's ranks raised to the floor (13, 7, 1, 1) use 19,200; the fill adds one
    # rank to v (ideal 7.81, the largest remainder)
    filled = gora_ranks(SITES, imp, 20_000, floor=floor)
    assert filled == _largest_remainder_reference(SITES, imp, 20_000,
                                                  {"q": 13, "v": 7, "fc1": 1, "fc2": 1})
    assert filled == {"q": 13, "v": 8, "fc1": 1, "fc2": 1}
    # a floor that takes the whole budget is the plan; one over it, or naming another site, errs
    qv = {"q": 1, "v": 1}
    assert gora_ranks(SITES, imp, 1_536, floor=qv) == {"q": 1, "v": 1, "fc1": 0, "fc2": 0}
    with pytest.raises(ValueError, match="floor needs 5,376 parameters, over the budget 5,000"):
        gora_ranks(SITES, imp, 5_000, floor=floor)
    with pytest.raises(ValueError, match="floor names 'k'"):
        gora_ranks(SITES, imp, b, floor={"k": 1})
