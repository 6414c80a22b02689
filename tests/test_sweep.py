"""The sweep's pure parts: uniform candidates and the widest uniform default, run keys, selection
by validation, paired differences (against scipy's paired t-test)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

import layerlens_jax as ll
from layerlens_jax.app.sweep import (best_by_validation, paired_difference, pooled_difference,
                                    run_key,
                                     uniform_candidates, widest_uniform)

D, F, LAYERS = 384, 1536, 6  # MiniLM-L6 shapes


def _site(path, d_in, d_out):
    return ll.Site(path=path, kind="linear", module_type="Linear",
                   param_shapes={"kernel": (d_in, d_out)}, num_params=d_in * d_out,
                   in_features=d_in, out_features=d_out)


def _minilm_sites():
    out = []
    for i in range(LAYERS):
        for name in ("query", "key", "value", "out"):
            out.append(_site(f"encoder/layers_{i}/attention/mha/{name}", D, D))
        out.append(_site(f"encoder/layers_{i}/mlp/intermediate", D, F))
        out.append(_site(f"encoder/layers_{i}/mlp/output", F, D))
    return out


QV = LAYERS * 2 * (D + D)  # params per rank: 9,216 = budget 1/8 of r8 on query+value
ALL = LAYERS * (4 * (D + D) + 2 * (D + F))  # 41,472 per rank
FFN = LAYERS * 2 * (D + F)  # 23,040 per rank


def test_uniform_candidates_at_the_reference_budgets():
    sites = _minilm_sites()
    full = uniform_candidates(sites, 8 * QV)  # 73,728: r8 on query+value
    assert full["uniform:qv"][1:] == (8, 8 * QV)
    assert full["uniform:all"][1:] == (1, ALL)
    assert full["uniform:ffn"][1:] == (3, 3 * FFN)
    assert full["uniform:qkvo"][1:] == (4, 4 * 2 * QV)
    eighth = uniform_candidates(sites, QV)
    assert set(eighth) == {"uniform:qv"} and eighth["uniform:qv"][1:] == (1, QV)
    assert uniform_candidates(sites, QV - 1) == {}


@pytest.mark.parametrize("budget, want", [
    (8 * QV, ("uniform:all", 1, ALL)),  # rank 1 on all 36 layers fits: the widest
    (ALL - 1, ("uniform:qkvo", 2, 2 * 2 * QV)),  # not all: q+k+v+o (24 sites) before FFN (12)
    (2 * QV - 1, ("uniform:qv", 1, QV)),  # only query+value fits
])
def test_widest_uniform_prefers_coverage(budget, want):
    name, _, rank, params = widest_uniform(_minilm_sites(), budget)
    assert (name, rank, params) == want and params <= budget
    assert widest_uniform(_minilm_sites(), QV - 1) is None


def test_run_key_is_stable_and_sensitive():
    a = {"task": "trec6", "seed": 0, "set": ["x=1"]}
    assert run_key(a) == run_key(dict(reversed(list(a.items()))))
    assert run_key(a) != run_key({**a, "seed": 1}) and len(run_key(a)) == 16


def test_best_by_validation_uses_validation_only():
    runs = [{"variant": "a", "val_score": 0.90, "val_loss": 0.3, "test_score": 0.99},
            {"variant": "b", "val_score": 0.91, "val_loss": 0.4, "test_score": 0.50},
            {"variant": "c", "val_score": 0.91, "val_loss": 0.2, "test_score": 0.10}]
    assert best_by_validation(runs, ["a", "b", "c"]) == "c"  # tie on accuracy: lower loss
    assert best_by_validation(runs, ["a", "b"]) == "b"
    assert best_by_validation(runs, ["z"]) is None


def test_paired_difference_matches_scipy_paired_t():
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0.8, 0.9, 6), rng.uniform(0.8, 0.9, 6)
    a = [{"seed": s, "test_score": v} for s, v in enumerate(x)]
    b = [{"seed": s, "test_score": v} for s, v in enumerate(y)] + [
        {"seed": 99, "test_score": 0.0}]  # unpaired: ignored
    d = paired_difference(a, b)
    ci = sps.ttest_rel(100 * x, 100 * y).confidence_interval(0.95)
    assert d.seeds == tuple(range(6))
    assert d.mean == pytest.approx(100 * np.mean(x - y))
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
    assert d.excludes_zero == (ci.low > 0 or ci.high < 0)
    one = paired_difference(a[:1], b[:1])
    assert math.isnan(one.low) and paired_difference(a, [{"seed": 7, "test_score": 1}]) is None


def test_pooled_difference_is_the_paired_t_of_per_seed_task_means():
    rng = np.random.default_rng(1)
    acc = rng.uniform(0.7, 0.95, (3, 2, 5))  # task, variant, seed
    runs = lambda t, v, seeds: [{"seed": s, "val_score": acc[t, v, s]} for s in seeds]
    # task 2 lacks seed 4 of variant a: seed 4 leaves the pooled statistic
    pairs = [(runs(0, 0, range(5)), runs(0, 1, range(5))), (runs(1, 0, range(5)), runs(1, 1, range(5))),
             (runs(2, 0, range(4)), runs(2, 1, range(5)))]
    d = pooled_difference(pairs, key="val_score")
    per_seed = 100 * (acc[:, 0, :4] - acc[:, 1, :4]).mean(axis=0)  # mean over tasks, seeds 0-3
    ci = sps.ttest_1samp(per_seed, 0.0).confidence_interval(0.95)
    assert d.seeds == (0, 1, 2, 3) and d.mean == pytest.approx(per_seed.mean())
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
    # one task: the ordinary paired difference
    assert pooled_difference(pairs[:1], key="val_score") == paired_difference(*pairs[0], key="val_score")
    assert pooled_difference([]) is None
