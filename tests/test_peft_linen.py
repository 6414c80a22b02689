"""Linen: interception wrapper identity at init, parity with the NNX twin, scan, errors, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from layerlens_jax.models import (BertClassifier, BertConfig, LinenBertClassifier,
                                  nnx_params_as_linen)
from layerlens_jax._src.peft import (PeftLinen, adapter_state, applied_plan, apply_plan,
                                count_trainable, init_adapters, load_adapter_state, merge)

from plans import L0, MIXED

CFG = BertConfig.tiny()


@pytest.fixture(scope="module")
def twins():
    nnx_model = BertClassifier(CFG, rngs=nnx.Rngs(0))
    return nnx_model, LinenBertClassifier(CFG), nnx_params_as_linen(nnx_model)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, CFG.vocab_size, (3, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], jnp.int32)
    return ids, mask


def random_state(state, seed=1, scale=0.3):
    rng = np.random.default_rng(seed)
    return {s: {k: jnp.asarray(rng.normal(size=v.shape) * scale, v.dtype) for k, v in d.items()}
            for s, d in state.items()}


@pytest.mark.parametrize("plan", [
    {f"{L0}/mlp/intermediate": ("lora", 4), f"{L0}/attention/mha/value": ("lora", 2)},
    {f"{L0}/mlp": ("adapter", 5)},
    {f"{L0}/attention/mha": ("prefix", 4)},
    MIXED,
], ids=["lora", "adapter", "prefix", "mixed"])
def test_linen_identity_at_init_and_nnx_parity(twins, batch, plan):
    nnx_model, linen_model, base_vars = twins
    wrapped = apply_plan(linen_model, plan)
    assert isinstance(wrapped, PeftLinen) and applied_plan(wrapped) == plan
    variables = init_adapters(wrapped, jax.random.key(0), base_vars, *batch)
    assert np.array_equal(np.asarray(linen_model.apply(base_vars, *batch)),
                          np.asarray(wrapped.apply(variables, *batch)))
    # same plan on the NNX twin: same adapter leaves under the same site paths, same count
    nnx_wrapped = apply_plan(nnx_model, plan, example=batch)
    ls, ns = adapter_state(wrapped, variables), adapter_state(nnx_wrapped)
    assert jax.tree.map(jnp.shape, ls) == jax.tree.map(jnp.shape, ns)
    assert count_trainable(variables) == count_trainable(nnx_wrapped)
    # with the same (non-trivial) adapter values, NNX and Linen compute the same function
    state = random_state(ns)
    load_adapter_state(nnx_wrapped, state)
    variables = load_adapter_state(wrapped, state, variables)
    np.testing.assert_allclose(np.asarray(wrapped.apply(variables, *batch)),
                               np.asarray(nnx_wrapped(*batch)), rtol=1e-5, atol=1e-6)


def test_linen_base_tree_unchanged_and_leaves_named(twins, batch):
    _, linen_model, base_vars = twins
    wrapped = apply_plan(linen_model, MIXED)
    variables = init_adapters(wrapped, jax.random.key(0), base_vars, *batch)
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    names = {"/".join(k.key for k in p) for p, _ in flat}
    base = {"/".join(k.key for k in p) for p, _ in
            jax.tree_util.tree_flatten_with_path(base_vars["params"])[0]}
    assert base <= names
    assert all(n.rsplit("/", 1)[1].startswith("peft_") for n in names - base)
    assert f"{L0}/attention/mha/query/peft_lora_a" in names


def test_linen_merge(twins, batch):
    _, linen_model, base_vars = twins
    wrapped = apply_plan(linen_model, MIXED)
    variables = init_adapters(wrapped, jax.random.key(0), base_vars, *batch)
    variables = load_adapter_state(wrapped, random_state(adapter_state(wrapped, variables)),
                                   variables)
    module, merged = merge(wrapped, variables)
    assert isinstance(module, PeftLinen)
    assert {m for _, m, _ in module.assignments} == {"adapter", "prefix"}
    np.testing.assert_allclose(module.apply(merged, *batch), wrapped.apply(variables, *batch),
                               rtol=2e-5, atol=2e-5)
    lora_only = apply_plan(linen_model, {"pooler": ("lora", 2), "embeddings/word": ("lora", 2)})
    v = init_adapters(lora_only, jax.random.key(0), base_vars, *batch)
    v = load_adapter_state(lora_only, random_state(adapter_state(lora_only, v)), v)
    module, merged = merge(lora_only, v)
    assert module is linen_model
    assert jax.tree.structure(merged) == jax.tree.structure(base_vars)
    np.testing.assert_allclose(module.apply(merged, *batch), lora_only.apply(v, *batch),
                               rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("plan,match", [
    ({"encoder/layers_7/mlp": ("adapter", 2)}, "encoder/layers_7/mlp"),
    ({f"{L0}/mlp_norm": ("lora", 2)}, f"{L0}/mlp_norm.*kind 'norm'"),
    ({"pooler": ("adapter", 2)}, "'pooler' of kind 'linear'"),
    ({f"{L0}/attention/mha": ("lora", 2)}, "kind 'attention'"),
])
def test_linen_bad_plans_name_the_site(twins, batch, plan, match):
    _, linen_model, base_vars = twins
    wrapped = apply_plan(linen_model, plan)
    with pytest.raises(ValueError, match=match):
        init_adapters(wrapped, jax.random.key(0), base_vars, *batch)


def test_linen_init_adapters_checks_base(twins, batch):
    _, linen_model, base_vars = twins
    wrapped = apply_plan(linen_model, {"pooler": ("lora", 2)})
    bad = jax.tree.map(lambda x: x, base_vars)
    bad["params"]["pooler"]["kernel"] = jnp.zeros((3, 3))
    with pytest.raises(ValueError, match="pooler"):
        init_adapters(wrapped, jax.random.key(0), bad, *batch)


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jax.nn.gelu(nn.Dense(6, name="dense")(x)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=3)(name="layers")
        return nn.Dense(2, name="head")(stack(x, None)[0])


def test_linen_lora_under_scan():
    model, x = _Scanned(), jnp.ones((4, 6))
    base = model.init(jax.random.key(0), x)
    wrapped = apply_plan(model, {"layers/dense": ("lora", 2)})
    v = init_adapters(wrapped, jax.random.key(1), base, x)
    assert v["params"]["layers"]["dense"]["peft_lora_a"].shape == (3, 6, 2)  # one per layer
    assert count_trainable(v) == 3 * 2 * (6 + 6)
    # the scan body is compiled, so XLA may fuse the two programs differently: float32 rounding
    np.testing.assert_allclose(model.apply(base, x), wrapped.apply(v, x), rtol=1e-6, atol=1e-7)
    v = load_adapter_state(wrapped, random_state(adapter_state(wrapped, v)), v)
    module, merged = merge(wrapped, v)
    np.testing.assert_allclose(module.apply(merged, x), wrapped.apply(v, x), rtol=1e-5, atol=1e-5)


class _SetupStyle(nn.Module):
    def setup(self):
        self.dense = nn.Dense(3)

    def __call__(self, x):
        return self.dense(x)


class _Outer(nn.Module):
    def setup(self):
        self.block = _SetupBlock()

    def __call__(self, x):
        return self.block(x)


class _SetupBlock(nn.Module):
    __layerlens_kind__ = "block"

    def setup(self):
        self.dense = nn.Dense(4)

    def __call__(self, x):
        return self.dense(x)


def test_linen_adapter_on_setup_style_block():
    model, x = _Outer(), jnp.ones((2, 4))
    base = model.init(jax.random.key(0), x)
    wrapped = apply_plan(model, {"block": ("adapter", 2), "block/dense": ("lora", 1)})
    v = init_adapters(wrapped, jax.random.key(1), base, x)
    assert count_trainable(v) == (2 * 4 * 2 + 2 + 4) + (4 + 4)
    assert np.array_equal(np.asarray(model.apply(base, x)), np.asarray(wrapped.apply(v, x)))


def test_linen_prefix_reparam_joint_parity(twins, batch):
    nnx_model, linen_model, base_vars = twins
    plan = {f"{L0}/attention/mha": ("prefix", 2), "encoder/layers_1/attention/mha": ("prefix", 3)}
    opts = dict(prefix_reparam_hidden=5, prefix_mode="joint")
    wrapped = apply_plan(linen_model, plan, **opts)
    variables = init_adapters(wrapped, jax.random.key(0), base_vars, *batch)
    nnx_wrapped = apply_plan(nnx_model, plan, **opts)
    assert count_trainable(variables) == count_trainable(nnx_wrapped)
    state = random_state(adapter_state(nnx_wrapped))
    load_adapter_state(nnx_wrapped, state)
    variables = load_adapter_state(wrapped, state, variables)
    np.testing.assert_allclose(jax.jit(wrapped.apply)(variables, *batch),
                               nnx.jit(lambda m, a, b: m(a, b))(nnx_wrapped, *batch),
                               rtol=1e-5, atol=1e-6)


class _LinenZoo(nn.Module):
    """The Linen twin of test_peft_nnx's zoo: Embed, DenseGeneral, Einsum, Conv, Dense."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(11, 6, name="embed")(ids)
        g = nn.DenseGeneral((2, 3), name="general")(h)
        e = nn.Einsum((6, 2, 3), "btd,dnh->btnh", name="einsum")(h)
        h = h + g.reshape(h.shape) + jnp.tanh(e).reshape(h.shape)
        h = nn.Conv(5, (3,), strides=2, padding=((2, 1),), name="conv")(h)
        return nn.Dense(4, name="head")(jax.nn.gelu(h))


def test_linen_every_lora_kind_against_numpy_merged_reference():
    """Each Linen LoRA target (read through the shared table) gives ``kernel + alpha/r a @ b``:
    the wrapper equals the base model with float64-numpy-merged kernels, and so does merge."""
    zoo = _LinenZoo()
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 7)), jnp.int32)
    base_vars = zoo.init(jax.random.key(0), ids)
    plan = {"embed": ("lora", 3), "general": ("lora", 2), "einsum": ("lora", 1),
            "conv": ("lora", 2), "head": ("lora", 2)}
    wrapped = apply_plan(zoo, plan)
    variables = init_adapters(wrapped, jax.random.key(1), base_vars, ids)
    assert count_trainable(variables) == 3 * 17 + 2 * 12 + 1 * 12 + 2 * 23 + 2 * 9
    assert np.array_equal(np.asarray(wrapped.apply(variables, ids)),
                          np.asarray(zoo.apply(base_vars, ids)))
    state = random_state(adapter_state(wrapped, variables))
    variables = load_adapter_state(wrapped, state, variables)
    ref_params = jax.tree.map(lambda x: x, base_vars["params"])
    for site, (_, r) in plan.items():
        name = "embedding" if site == "embed" else "kernel"
        k = np.asarray(ref_params[site][name], np.float64)
        a, b = (np.asarray(state[site][f"peft_lora_{n}"], np.float64) for n in "ab")
        ref_params[site][name] = jnp.asarray(k + 16.0 / r * (a @ b).reshape(k.shape), jnp.float32)
    ref = np.asarray(zoo.apply({"params": ref_params}, ids))
    assert not np.allclose(ref, np.asarray(zoo.apply(base_vars, ids)), atol=1e-2)
    np.testing.assert_allclose(np.asarray(wrapped.apply(variables, ids)), ref, rtol=1e-4,
                               atol=1e-4)
    module, merged = merge(wrapped, variables)
    assert module is zoo
    np.testing.assert_allclose(np.asarray(zoo.apply(merged, ids)), ref, rtol=1e-4, atol=1e-4)
