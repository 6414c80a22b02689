"""In-training reallocation: resize_lora keeps the function, the optimizer state is carried,
re-solved plans stay within the budget, and a train / reallocate / train loop runs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layerlens_jax as ll
from layerlens_jax._src.costs import Catalogue
from layerlens_jax._src.peft import LoRA, applied_plan, apply_plan, count_trainable, merge
from layerlens_jax._src.peft.functional import lora_scale
from layerlens_jax._src.reallocate import (lora_ranks, merged_utility, reallocate_plan,
                                          resize_lora, transfer_optimizer_state)
from layerlens_jax._src.sites import get_submodule
from layerlens_jax._src.train import make_functional_train_step, write_back
from layerlens_jax.models import BertClassifier, BertConfig

from plans import MIXED

B, T = 8, 12
L0 = "encoder/layers_0"
Q, K, V = (f"{L0}/attention/mha/{p}" for p in ("query", "key", "value"))
FFN_IN = f"{L0}/mlp/intermediate"
ALPHA = 16.0


def per_example_loss(model, batch):
    logits = model(batch["input_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def mean_loss(model, batch):
    return per_example_loss(model, batch).mean()


@pytest.fixture(scope="module")
def base():
    return BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return {"input_ids": jnp.asarray(rng.integers(1, 50, (B, T)), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, 3, (B,)), jnp.int32)}


def perturbed(model, seed=1, scale=0.3):
    """Random values in every LoRA factor, so each delta is non-zero."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, LoRA):
            for var in (m.peft_lora_a, m.peft_lora_b):
                var[...] = jnp.asarray(rng.normal(size=var[...].shape) * scale, jnp.float32)
    return model


def factors(model, site):
    m = get_submodule(model, site)
    return np.asarray(m.peft_lora_a[...]), np.asarray(m.peft_lora_b[...])


def delta64(a, b, rank, rslora=False):
    """The LoRA update scale * A @ B in float64 (the independent reference)."""
    return lora_scale(ALPHA, rank, rslora) * (a.astype(np.float64) @ b.astype(np.float64))


def adapted(base, plan, seed=1, **options):
    return perturbed(apply_plan(base, plan, **options), seed)


# ------------------------------------------------------------------------------ resize_lora


def test_keep_and_add_leave_factors_and_output_bit_identical(base, batch):
    model = adapted(base, {Q: ("lora", 2), V: ("lora", 4)})
    ids = batch["input_ids"]
    before, q_before = np.asarray(model(ids)), factors(model, Q)
    status = resize_lora(model, {Q: 2, FFN_IN: 3, K: 0})
    assert status == {Q: "kept", FFN_IN: "added", K: "kept"}
    q_after = factors(model, Q)
    assert all(np.array_equal(x, y) for x, y in zip(q_before, q_after))
    added = get_submodule(model, FFN_IN)
    assert isinstance(added, LoRA) and added.rank == 3 and added.alpha == ALPHA
    assert not np.any(np.asarray(added.peft_lora_b[...]))
    assert np.array_equal(np.asarray(model(ids)), before)  # eager: + exact zero
    assert applied_plan(model) == {Q: ("lora", 2), V: ("lora", 4), FFN_IN: ("lora", 3)}


@pytest.mark.parametrize("rslora", [False, True])
def test_grow_keeps_the_delta_and_extends_a_like_the_lora_init(base, batch, rslora):
    model = adapted(base, {V: ("lora", 4)}, use_rslora=rslora)
    ids = batch["input_ids"]
    before, (a, b) = np.asarray(model(ids)), factors(model, V)
    assert resize_lora(model, {V: 6}, seed=5) == {V: "grown"}
    a6, b6 = factors(model, V)
    assert a6.shape == (16, 6) and b6.shape == (6, 16) and get_submodule(model, V).rank == 6
    assert np.array_equal(a6[:, :4], a)  # old columns kept bit for bit
    ratio = np.sqrt(6 / 4) if rslora else 6 / 4  # scale_4 / scale_6
    np.testing.assert_allclose(b6[:4], b * ratio, rtol=1e-6)
    assert not np.any(b6[4:])
    bound = np.sqrt(6.0 / 16)  # He-uniform on fan_in 16
    assert np.all(np.abs(a6[:, 4:]) <= bound) and np.std(a6[:, 4:]) > 0.3 * bound
    np.testing.assert_allclose(delta64(a6, b6, 6, rslora), delta64(a, b, 4, rslora), rtol=1e-6,
                               atol=1e-7)
    np.testing.assert_allclose(np.asarray(model(ids)), before, rtol=1e-5, atol=1e-6)


def test_drop_folds_the_delta_into_the_kernel(base, batch):
    model = adapted(base, {Q: ("lora", 2), V: ("lora", 4)})
    ids = batch["input_ids"]
    before, (a, b) = np.asarray(model(ids)), factors(model, V)
    kernel = np.asarray(get_submodule(model, V).base_module.kernel[...], np.float64)
    assert resize_lora(model, {V: 0}) == {V: "dropped"}
    dropped = get_submodule(model, V)
    assert type(dropped) is type(get_submodule(base, V))  # the LinearGeneral, unwrapped
    np.testing.assert_allclose(np.asarray(dropped.kernel[...]),
                               kernel + delta64(a, b, 4).reshape(kernel.shape), rtol=1e-6,
                               atol=1e-6)
    assert count_trainable(model) == 2 * (16 + 16)
    np.testing.assert_allclose(np.asarray(model(ids)), before, rtol=1e-5, atol=1e-6)


def test_shrink_is_the_balanced_truncated_svd(base):
    model = adapted(base, {V: ("lora", 4)})
    a, b = factors(model, V)
    assert resize_lora(model, {V: 2}) == {V: "shrunk"}
    a2, b2 = factors(model, V)
    assert a2.shape == (16, 2) and b2.shape == (2, 16)
    u, s, vt = np.linalg.svd(delta64(a, b, 4))  # numpy's SVD of the full delta
    truncated = (u[:, :2] * s[:2]) @ vt[:2]
    np.testing.assert_allclose(delta64(a2, b2, 2), truncated, rtol=1e-5, atol=1e-5 * s[0])
    # singular values split evenly: A'^T A' = B' B'^T = diag(s / scale')
    scale2 = lora_scale(ALPHA, 2)
    np.testing.assert_allclose(a2.T.astype(np.float64) @ a2, np.diag(s[:2] / scale2),
                               atol=1e-5 * s[0] / scale2)
    np.testing.assert_allclose(b2.astype(np.float64) @ b2.T, np.diag(s[:2] / scale2),
                               atol=1e-5 * s[0] / scale2)


def test_shrinking_a_zero_delta_keeps_the_site_trainable(base):
    model = apply_plan(base, {V: ("lora", 4)})  # B = 0: the delta is exactly zero
    assert resize_lora(model, {V: 2}) == {V: "shrunk"}
    a2, b2 = factors(model, V)
    assert not np.any(b2)
    bound = np.sqrt(6.0 / 16)  # a fresh He-uniform A (not zeros, which no gradient would move)
    assert np.all(np.abs(a2) <= bound) and np.std(a2) > 0.3 * bound


def test_shrink_keeps_the_function_when_the_delta_has_that_rank(base, batch):
    model = apply_plan(base, {V: ("lora", 4)})
    rng = np.random.default_rng(3)
    lora = get_submodule(model, V)
    lora.peft_lora_a[...] = jnp.asarray(rng.normal(size=(16, 2)) @ rng.normal(size=(2, 4)) * 0.3,
                                        jnp.float32)  # rank 2
    lora.peft_lora_b[...] = jnp.asarray(rng.normal(size=(4, 16)) * 0.3, jnp.float32)
    ids = batch["input_ids"]
    before = np.asarray(model(ids))
    assert resize_lora(model, {V: 2}) == {V: "shrunk"}
    np.testing.assert_allclose(np.asarray(model(ids)), before, rtol=1e-5, atol=1e-5)


def test_errors_name_the_site_and_leave_the_model_untouched(base):
    model = adapted(base, {Q: ("lora", 2)})
    with pytest.raises(ValueError, match="'nope'"):
        resize_lora(model, {Q: 3, "nope": 1})
    assert get_submodule(model, Q).rank == 2  # checked before any edit
    with pytest.raises(ValueError, match=f"{Q}.*int >= 0"):
        resize_lora(model, {Q: -1})
    with pytest.raises(ValueError, match=f"{Q}.*int >= 0"):
        resize_lora(model, {Q: 1.5})
    with pytest.raises(ValueError, match=f"{L0}/mlp"):
        resize_lora(model, {f"{L0}/mlp": 2})  # a block: LoRA cannot wrap it
    mixed = apply_plan(base, MIXED, example=(jnp.ones((2, 5), jnp.int32),))
    with pytest.raises(ValueError, match=f"'{L0}/attention' carries an adapter"):
        resize_lora(mixed, {f"{L0}/attention": 2})
    prefixed = apply_plan(base, {f"{L0}/attention/mha": ("prefix", 2)})
    with pytest.raises(ValueError, match=f"'{L0}/attention/mha' carries a prefix"):
        resize_lora(prefixed, {f"{L0}/attention/mha": 0})
    odd = apply_plan(base, {Q: ("lora", 2)}, lora_alpha=8.0)
    assert resize_lora(odd, {V: 1}) == {V: "added"}
    assert get_submodule(odd, V).alpha == 8.0  # the model's alpha, not the default 16
    get_submodule(odd, V).alpha = 4.0  # two sites with differing options, made by hand
    with pytest.raises(ValueError, match="differ in options"):
        resize_lora(odd, {K: 1})
    assert resize_lora(odd, {K: 1}, peft_options={"lora_alpha": 2.0}) == {K: "added"}
    assert get_submodule(odd, K).alpha == 2.0
    zero = apply_plan(base, {Q: ("lora", 2)}, lora_alpha=0.0)
    with pytest.raises(ValueError, match=f"{Q}.*lora_alpha 0"):
        resize_lora(zero, {Q: 1})


# ------------------------------------------------------------------------- optimizer state


def _mu_nu(opt_state):
    adam = opt_state[0]
    return adam.mu, adam.nu


def _leaf(state, site, name):
    node = state
    for part in site.split("/"):
        node = node[part]
    return np.asarray(node[name][...])


def test_optimizer_state_is_carried_by_shape(base, batch):
    tx = optax.adamw(1e-2)
    model = adapted(base, {Q: ("lora", 2), V: ("lora", 4), FFN_IN: ("lora", 4),
                           "classifier": ("lora", 1)})
    step, state = make_functional_train_step(model, tx, mean_loss)
    for _ in range(2):
        state, _ = step(state, batch)
    write_back(model, state)
    old_mu, old_nu = (jax.tree.map(np.asarray, t) for t in _mu_nu(state.opt_state))
    old_params = state.trainable
    status = resize_lora(model, {Q: 2, V: 6, FFN_IN: 2, "classifier": 0, K: 1})
    assert status == {Q: "kept", V: "grown", FFN_IN: "shrunk", "classifier": "dropped",
                      K: "added"}
    step, fresh = make_functional_train_step(model, tx, mean_loss)
    opt = transfer_optimizer_state(tx, old_params, state.opt_state, fresh.trainable)
    mu, nu = _mu_nu(opt)
    assert int(opt[0].count) == 2
    for new, old in ((mu, old_mu), (nu, old_nu)):
        for leaf in ("peft_lora_a", "peft_lora_b"):
            assert np.array_equal(_leaf(new, Q, leaf), _leaf(old, Q, leaf))  # kept: bit for bit
            assert not np.any(_leaf(new, FFN_IN, leaf)) and not np.any(_leaf(new, K, leaf))
        assert np.any(_leaf(old, V, "peft_lora_a"))
        assert np.array_equal(_leaf(new, V, "peft_lora_a")[:, :4], _leaf(old, V, "peft_lora_a"))
        assert not np.any(_leaf(new, V, "peft_lora_a")[:, 4:])
        assert np.array_equal(_leaf(new, V, "peft_lora_b")[:4], _leaf(old, V, "peft_lora_b"))
        assert not np.any(_leaf(new, V, "peft_lora_b")[4:])
        assert "classifier" not in new
    state, metrics = step(fresh._replace(opt_state=opt, step=state.step), batch)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 3


def test_transfer_refuses_a_reshaped_non_parameter_leaf():
    tx = optax.adamw(1e-3)
    old = {"w": jnp.ones((2, 3))}
    state = tx.init(old)
    bad = jax.tree.map(lambda x: jnp.zeros((2,)) if x.ndim == 0 else x, state)
    with pytest.raises(ValueError, match="count"):
        transfer_optimizer_state(tx, old, bad, {"w": jnp.ones((2, 4))})


# ------------------------------------------------------------------------- plan and budget


def test_lora_ranks_and_reallocate_plan_refuse_other_methods(base, batch):
    sites = ll.discover_sites(base, example=(batch["input_ids"],))
    mixed = ll.Plan.from_assignments(sites, {Q: ("lora", 2), f"{L0}/attention": ("adapter", 2)})
    with pytest.raises(ValueError, match=f"'{L0}/attention' has method 'adapter'"):
        lora_ranks(mixed)
    plan = ll.Plan.from_assignments(sites, {Q: ("lora", 2)})
    assert lora_ranks(plan)[Q] == 2 and lora_ranks(plan)[V] == 0
    model = apply_plan(base, {Q: ("lora", 2)})
    with pytest.raises(ValueError, match="LoRA only"):
        reallocate_plan(model, plan, sites, np.ones(len(sites)),
                        catalogue=Catalogue.from_sizes(lora=(1, 2), adapter=(2,)))
    with pytest.raises(ValueError, match=f"'{L0}/attention' carries an adapter"):
        reallocate_plan(apply_plan(base, mixed, example=(batch["input_ids"],)), plan, sites,
                        np.ones(len(sites)))


def _check_budget(model, plan, budget):
    assert plan.use["params"] <= budget
    assert count_trainable(model) == plan.use["params"]  # the leaves, counted
    assert {s: r for s, (_, r) in applied_plan(model).items()} == {
        s: r for s, r in lora_ranks(plan).items() if r}


def test_train_reallocate_train_stays_within_the_budget(base, batch):
    budget = 1500.0
    sites = ll.discover_sites(base, example=(batch["input_ids"],))
    catalogue = Catalogue.from_sizes(lora=(1, 2, 4, 8))
    start = ll.allocate(sites, np.random.default_rng(0).uniform(size=len(sites)),
                        {"params": budget}, catalogue=catalogue)
    model = apply_plan(base, start)
    _check_budget(model, start, budget)
    tx = optax.adamw(1e-2)
    step, state = make_functional_train_step(model, tx, mean_loss)
    plan, changes = start, []
    for round_ in range(2):
        for _ in range(3):
            state, metrics = step(state, batch)
            assert np.isfinite(float(metrics["loss"]))
        write_back(model, state)
        u = (merged_utility(model, per_example_loss, [batch], sites) if round_ == 0
             else (lambda m: merged_utility(m, per_example_loss, [batch], sites)))
        plan = reallocate_plan(model, plan, sites, u)
        assert dict(plan.budgets) == {"params": budget}
        assert plan.metadata["catalogue"]["methods"].keys() == {"lora"}
        before = merge(model)(batch["input_ids"])
        status = resize_lora(model, lora_ranks(plan), seed=round_ + 1)
        changes += [s for s in status.values() if s != "kept"]
        _check_budget(model, plan, budget)
        if "shrunk" not in status.values():  # then the function is exactly kept
            np.testing.assert_allclose(model(batch["input_ids"]), before, rtol=1e-4, atol=1e-5)
        step, fresh = make_functional_train_step(model, tx, mean_loss)
        state = fresh._replace(step=state.step, opt_state=transfer_optimizer_state(
            tx, state.trainable, state.opt_state, fresh.trainable))
    for _ in range(3):
        state, metrics = step(state, batch)
        assert np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 9
    assert changes  # the profiled utility moved ranks (random start)


def test_merged_utility_profiles_the_merged_model(base, batch):
    sites = ll.discover_sites(base, example=(batch["input_ids"],))
    model = adapted(base, {Q: ("lora", 2), "classifier": ("lora", 1)})
    u = merged_utility(model, per_example_loss, [batch], sites)
    reference = ll.utility(ll.profile(merge(model), per_example_loss, [batch], sites=sites))
    np.testing.assert_allclose(u, reference, rtol=1e-6)
    assert isinstance(get_submodule(model, Q), LoRA)  # the model itself is not merged
