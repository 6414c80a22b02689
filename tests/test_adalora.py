"""AdaLoRA: budget schedule, importance, masking, regulariser, module, training, counts.

Every reference below is an independent NumPy (float64) re-computation written from the paper /
HF PEFT formulas, not a call back into the module under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from layerlens_jax._src import adalora as ad
from layerlens_jax._src.peft.nnx_modules import BASE_FILTER, PEFT_FILTER


class TwoLayer(nnx.Module):
    def __init__(self, d_in=6, d_hidden=5, d_out=4, seed=0):
        rngs = nnx.Rngs(seed)
        self.layers = nnx.List([nnx.Linear(d_in, d_hidden, rngs=rngs),
                                nnx.Linear(d_hidden, d_out, rngs=rngs)])

    def __call__(self, x):
        return self.layers[1](jnp.tanh(self.layers[0](x)))


SITES = ("layers/0", "layers/1")


def _cfg(**kw):
    base = dict(target_rank=2, total_step=50, tinit=5, tfinal=10, delta_t=1)
    base.update(kw)
    return ad.AdaLoRAConfig(**base)


# ------------------------------------------------------------------------- budget schedule


def _reference_budget(step, init_b, target_b, tinit, tfinal, total, delta_t):
    """Paper / HF cubic schedule, written out independently."""
    if step <= tinit:
        return init_b, False
    if step > total - tfinal:
        return target_b, True
    frac = (step - tinit) / float(total - tfinal - tinit)
    b = target_b + (init_b - target_b) * np.power(1.0 - frac, 3)
    return int(np.floor(b)), step % delta_t == 0


@pytest.mark.parametrize("tinit,tfinal,total,delta_t,init_b,target_b",
                         [(5, 10, 50, 1, 36, 16), (0, 0, 40, 3, 24, 8), (100, 200, 1000, 10, 864, 576)])
def test_budget_schedule_matches_cubic_reference(tinit, tfinal, total, delta_t, init_b, target_b):
    cfg = ad.AdaLoRAConfig(target_rank=1, total_step=total, tinit=tinit, tfinal=tfinal,
                           delta_t=delta_t)
    got = [ad.budget_schedule(s, cfg, init_b, target_b) for s in range(total + 1)]
    ref = [_reference_budget(s, init_b, target_b, tinit, tfinal, total, delta_t)
           for s in range(total + 1)]
    assert got == ref
    # the target is reached exactly at total - tfinal (the decay's end), the budget never rises
    assert got[total - tfinal][0] == target_b
    span = total - tfinal - tinit
    for s in range(tinit + 1, total - tfinal + 1):  # exact integer cubic: floor(D (L - s)^3 / L^3)
        assert got[s][0] == target_b + (init_b - target_b) * (span - (s - tinit)) ** 3 // span ** 3
    budgets = [b for b, _ in got]
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))
    # cubic in between: at the midpoint of the decay the excess over target is 1/8 of the total
    mid = tinit + (total - tfinal - tinit) // 2
    if (total - tfinal - tinit) % 2 == 0:
        assert got[mid][0] == target_b + (init_b - target_b) // 8


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="tinit"):
        ad.AdaLoRAConfig(target_rank=2, total_step=10, tinit=8, tfinal=2)
    with pytest.raises(ValueError, match="beta1"):
        ad.AdaLoRAConfig(target_rank=2, total_step=10, beta1=1.0)
    with pytest.raises(ValueError, match="target_rank"):
        ad.AdaLoRAConfig(target_rank=0, total_step=10)
    with pytest.raises(ValueError, match="orth_reg_form"):
        ad.AdaLoRAConfig(target_rank=1, total_step=10, orth_reg_form="l2")
    with pytest.raises(ValueError, match="exceeds the initial budget"):
        ad.budgets(ad.AdaLoRAConfig(target_rank=5, total_step=10), 2, 8)


# ------------------------------------------------------------------------- importance


def _random_triplets(rng, shapes):
    return {s: ad.Triplet(p=rng.normal(size=(o, r)).astype(np.float32),
                          e=rng.normal(size=(r,)).astype(np.float32),
                          q=rng.normal(size=(r, i)).astype(np.float32))
            for s, (o, r, i) in shapes.items()}


def test_importance_ema_and_scores_match_numpy():
    rng = np.random.default_rng(0)
    shapes = {"a": (5, 3, 4), "b": (2, 3, 6)}
    b1, b2 = 0.85, 0.7
    alloc = ad.init_allocator({s: ad.Triplet(*map(jnp.asarray, t))
                               for s, t in _random_triplets(rng, shapes).items()})
    ipt, unc = alloc.ipt, alloc.unc
    ref_ipt = {s: [np.zeros((o, r)), np.zeros(r), np.zeros((r, i))] for s, (o, r, i) in shapes.items()}
    ref_unc = {s: [np.zeros((o, r)), np.zeros(r), np.zeros((r, i))] for s, (o, r, i) in shapes.items()}
    for _ in range(4):
        params, grads = _random_triplets(rng, shapes), _random_triplets(rng, shapes)
        ipt, unc = ad.update_importance(ipt, unc, params, grads, beta1=b1, beta2=b2)
        for s in shapes:
            for k in range(3):
                sens = np.abs(np.float64(params[s][k]) * np.float64(grads[s][k]))
                ref_ipt[s][k] = b1 * ref_ipt[s][k] + (1 - b1) * sens
                ref_unc[s][k] = b2 * ref_unc[s][k] + (1 - b2) * np.abs(sens - ref_ipt[s][k])
    scores = ad.triplet_scores(ipt, unc)
    for s in shapes:
        for k in range(3):
            np.testing.assert_allclose(ipt[s][k], ref_ipt[s][k], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(unc[s][k], ref_unc[s][k], rtol=1e-5, atol=1e-7)
        sp, se, sq = (ref_ipt[s][k] * ref_unc[s][k] for k in range(3))
        ref_score = se + sq.mean(axis=1) + sp.mean(axis=0)  # E_i + row i of Q + column i of P
        np.testing.assert_allclose(scores[s], ref_score, rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------- masking


@pytest.mark.parametrize("budget", [0, 1, 5, 9, 12])
def test_mask_keeps_exactly_the_budget_and_the_best(budget):
    rng = np.random.default_rng(budget)
    scores = {"x": rng.random(4), "w": rng.random(3), "z": rng.random(5)}
    mask = ad.mask_to_budget({k: jnp.asarray(v, jnp.float32) for k, v in scores.items()}, budget)
    assert sum(int(np.sum(m)) for m in mask.values()) == min(budget, 12)
    flat = np.concatenate([scores[k] for k in sorted(scores)])
    kept = np.concatenate([np.asarray(mask[k]) for k in sorted(scores)])
    if 0 < budget < 12:
        assert flat[kept].min() > flat[~kept].max()


def test_mask_with_ties_still_keeps_exactly_the_budget():
    scores = {"a": jnp.zeros(4), "b": jnp.array([1.0, 0.0, 0.0])}
    mask = ad.mask_to_budget(scores, 3)
    assert sum(int(np.sum(m)) for m in mask.values()) == 3
    assert bool(mask["b"][0])  # the one positive score survives


def test_update_and_allocate_phases():
    """Warm-up: nothing masked; allocation: E zeroed outside the budget; step == T - tfinal: mask to
    target and EMAs reset; after it: the stored mask is re-applied to revived E."""
    cfg = ad.AdaLoRAConfig(target_rank=1, total_step=10, tinit=2, tfinal=3)
    rng = np.random.default_rng(1)
    shapes = {"s0": (3, 3, 4), "s1": (5, 3, 2)}
    params = {k: {ad.LEAF_P: jnp.asarray(t.p), ad.LEAF_E: jnp.asarray(t.e), ad.LEAF_Q: jnp.asarray(t.q)}
              for k, t in _random_triplets(rng, shapes).items()}
    alloc = ad.init_allocator(ad.adalora_triplets(params))
    init_b, target_b = 6, 2
    for step in range(cfg.total_step):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        params = jax.tree.map(lambda x: x + 0.01, params)  # an "optimizer step" reviving E
        alloc, params = ad.update_and_allocate(alloc, params, grads, step, cfg)
        kept = sum(int(np.sum(m)) for m in alloc.mask.values())
        nonzero_e = sum(int(np.sum(np.asarray(p[ad.LEAF_E]) != 0)) for p in params.values())
        budget, _ = ad.budget_schedule(step, cfg, init_b, target_b)
        if step <= cfg.tinit:
            assert kept == init_b and nonzero_e == init_b
        elif step <= cfg.total_step - cfg.tfinal:
            assert kept == budget and nonzero_e == budget and int(alloc.budget) == budget
        else:
            assert kept == target_b and nonzero_e == target_b
        if step >= cfg.total_step - cfg.tfinal:
            assert all(float(jnp.abs(x).sum()) == 0 for t in alloc.ipt.values() for x in t)
        for s in shapes:  # masked E are exactly zero
            e, m = np.asarray(params[s][ad.LEAF_E]), np.asarray(alloc.mask[s])
            assert np.all(e[~m] == 0)


# ------------------------------------------------------------------------- regulariser


def test_orthogonal_regulariser_matches_numpy():
    rng = np.random.default_rng(2)
    shapes = {"a": (5, 3, 4), "b": (6, 2, 7)}
    trip = _random_triplets(rng, shapes)
    tree = {s: {ad.LEAF_P: t.p, ad.LEAF_E: t.e, ad.LEAF_Q: t.q} for s, t in trip.items()}
    norms, paper = [], 0.0
    for t in trip.values():
        p, q = np.float64(t.p), np.float64(t.q)
        cp = p.T @ p - np.eye(p.shape[1])
        cq = q @ q.T - np.eye(q.shape[0])
        norms += [np.linalg.norm(cp, "fro"), np.linalg.norm(cq, "fro")]
        paper += np.linalg.norm(cp, "fro") ** 2 + np.linalg.norm(cq, "fro") ** 2
    np.testing.assert_allclose(ad.orthogonal_regulariser(tree, "hf"), np.mean(norms), rtol=1e-5)
    np.testing.assert_allclose(ad.orthogonal_regulariser(tree, "paper"), paper, rtol=1e-5)
    # orthonormal factors cost nothing
    p_orth = np.linalg.qr(rng.normal(size=(7, 3)))[0]  # orthonormal columns
    q_orth = np.linalg.qr(rng.normal(size=(6, 3)))[0].T  # orthonormal rows
    ortho = {"s": {ad.LEAF_P: p_orth, ad.LEAF_E: np.ones(3), ad.LEAF_Q: q_orth}}
    assert float(ad.orthogonal_regulariser(ortho, "paper")) < 1e-10


# ------------------------------------------------------------------------- module


def test_wrapped_forward_equals_base_at_init_and_explicit_formula():
    base = TwoLayer()
    model = ad.apply_adalora(base, SITES, 3, alpha=6.0, seed=1)
    x = jax.random.normal(jax.random.key(3), (7, 6))
    np.testing.assert_array_equal(model(x), base(x))  # E = 0: identical at init
    layer = model.layers[0]
    assert isinstance(layer, ad.AdaLoRA) and layer.scale == 2.0
    assert layer.peft_adalora_p.shape == (5, 3) and layer.peft_adalora_q.shape == (3, 6)
    assert abs(float(np.std(np.asarray(layer.peft_adalora_q[...]))) - 0.02) < 0.01
    e = np.array([0.5, -1.0, 2.0], np.float32)
    layer.peft_adalora_e[...] = jnp.asarray(e)
    p, q = np.float64(layer.peft_adalora_p[...]), np.float64(layer.peft_adalora_q[...])
    w = np.float64(base.layers[0].kernel[...]) + 2.0 * (p @ np.diag(e) @ q).T
    ref = np.float64(x) @ w + np.float64(base.layers[0].bias[...])
    np.testing.assert_allclose(layer(x), ref, rtol=1e-5, atol=1e-6)
    merged = ad.merge_adalora(model)
    assert isinstance(merged.layers[0], nnx.Linear)
    np.testing.assert_allclose(merged(x), model(x), rtol=1e-5, atol=1e-6)


def test_apply_adalora_rejects_bad_sites():
    with pytest.raises(ValueError, match="layers/7"):
        ad.apply_adalora(TwoLayer(), ["layers/7"], 2)
    with pytest.raises(ValueError, match="positive int"):
        ad.apply_adalora(TwoLayer(), SITES, 0)


def test_triplets_found_in_nnx_state():
    model = ad.apply_adalora(TwoLayer(), SITES, 3)
    trip = ad.adalora_triplets(nnx.state(model, PEFT_FILTER))
    assert sorted(trip) == list(SITES)
    assert trip["layers/1"].p.shape == (4, 3) and trip["layers/1"].q.shape == (3, 5)


# ------------------------------------------------------------------------- training + counts


def test_training_reduces_loss_and_ends_at_target_budget():
    teacher = TwoLayer(seed=7)
    x = jax.random.normal(jax.random.key(0), (64, 6))
    y = teacher(x)
    base = TwoLayer(seed=1)
    model = ad.apply_adalora(base, SITES, 3, alpha=3.0, seed=0)
    base_before = jax.tree.map(np.asarray, nnx.state(model, BASE_FILTER))
    cfg = ad.AdaLoRAConfig(target_rank=2, total_step=120, tinit=10, tfinal=20, delta_t=5,
                           orth_reg_weight=0.1)
    loss_fn = lambda m, batch: jnp.mean((m(batch[0]) - batch[1]) ** 2)  # noqa: E731
    step, state = ad.make_adalora_train_step(model, loss_fn, optax.adam(3e-2), cfg)
    first = float(loss_fn(model, (x, y)))
    for _ in range(cfg.total_step):
        state, metrics = step(state, (x, y))
    nnx.update(model, state.trainable, state.other)
    last = float(loss_fn(model, (x, y)))
    assert last < 0.5 * first
    ranks = ad.final_ranks(state)
    assert sum(ranks.values()) == cfg.target_rank * len(SITES) == int(metrics["budget"])
    for site, trip in ad.adalora_triplets(state.trainable).items():
        m = np.asarray(state.opt_state.allocator.mask[site])
        assert np.all(np.asarray(trip.e)[~m] == 0) and np.all(np.asarray(trip.e)[m] != 0)
    after = jax.tree.map(np.asarray, nnx.state(model, BASE_FILTER))
    jax.tree.map(np.testing.assert_array_equal, base_before, after)  # base untouched
    np.testing.assert_allclose(float(metrics["loss"]),
                               float(metrics["task_loss"]) + 0.1 * float(metrics["orth_reg"]),
                               rtol=1e-6)


def test_param_counts():
    model = ad.apply_adalora(TwoLayer(), SITES, 3)  # sites 6->5 and 5->4
    c = ad.count_adalora_params(model, target_rank=2)
    assert c.allocated == 3 * (6 + 5 + 1) + 3 * (5 + 4 + 1) == 66
    # HF PEFT's trainable count = every stored A, E, B entry
    assert c.allocated == sum(x.size for x in jax.tree.leaves(nnx.state(model, PEFT_FILTER)))
    assert c.effective == 66 and c.target == 2 * 12 + 2 * 10
    mask = {"layers/0": np.array([True, False, False]), "layers/1": np.array([True, True, True])}
    c = ad.count_adalora_params(model, mask)
    assert c.effective == 1 * 12 + 3 * 10 and c.ranks == {"layers/0": 1, "layers/1": 3}
    with pytest.raises(ValueError, match="layers/1"):
        ad.count_adalora_params(model, {"layers/0": mask["layers/0"]})
