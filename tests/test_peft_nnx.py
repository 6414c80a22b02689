"""NNX: identity at init, exact trainable counts, surgery semantics, errors, merge, prefix masks."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from layerlens_jax.models import BertClassifier, BertConfig, MLP
from layerlens_jax._src.peft import (BASE_FILTER, PEFT_FILTER, Adapter, LoRA, PeftParam, Prefix,
                                adapter_state, applied_plan, apply_plan, count_trainable, merge)
from layerlens_jax._src import costs
from layerlens_jax._src.plan import Plan
from layerlens_jax._src.sites import discover_sites, get_submodule

from plans import L0, MIXED

CFG = BertConfig.tiny()  # hidden 16, 2 heads (head_dim 8), FFN 32, vocab 50, 2 layers
H, NH, HD, FFN, V = 16, 2, 8, 32, 50


@pytest.fixture(scope="module")
def model():
    return BertClassifier(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, V, (3, 7)), jnp.int32)
    mask = jnp.asarray([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4], jnp.int32)
    return ids, mask


@nnx.jit
def fwd(m, *args):
    """Compiled forward: one compile instead of one per eager primitive (for non-exact checks)."""
    return m(*args)


def perturb(m, seed=1, scale=0.3):
    """Give every adapter leaf random values (so adapters actually do something)."""
    st = nnx.state(m, PEFT_FILTER)
    leaves, tdef = jax.tree.flatten(st)
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype) for x in leaves]
    nnx.update(m, jax.tree.unflatten(tdef, new))
    return m




# ------------------------------------------------------------------ identity at init


@pytest.mark.parametrize("plan", [
    {f"{L0}/mlp/intermediate": ("lora", 4)},
    {f"{L0}/attention/mha/key": ("lora", 2)},
    {"embeddings/word": ("lora", 3)},
    {f"{L0}/mlp": ("adapter", 5)},
    {f"{L0}/attention/mha": ("prefix", 4)},
    MIXED,
], ids=["lora-linear", "lora-general", "lora-embed", "adapter", "prefix", "mixed"])
def test_identity_at_init_exact(model, batch, plan):
    wrapped = apply_plan(model, plan, example=batch)
    assert np.array_equal(np.asarray(model(*batch)), np.asarray(wrapped(*batch)))
    if plan is MIXED:
        # Under jit the two programs differ, so XLA may fuse (and round) differently: equal to
        # float32 rounding, not necessarily bit for bit.
        np.testing.assert_allclose(fwd(model, *batch), fwd(wrapped, *batch), rtol=1e-6, atol=1e-7)


def test_identity_prefix_reparam_and_rslora(model, batch):
    wrapped = apply_plan(model, {f"{L0}/attention/mha": ("prefix", 2), "pooler": ("lora", 4)},
                         prefix_reparam_hidden=6, use_rslora=True, lora_alpha=8.0)
    assert np.array_equal(np.asarray(model(*batch)), np.asarray(wrapped(*batch)))
    assert get_submodule(wrapped, "pooler").scale == 8.0 / 2.0


# -------------------------------------------------------------- exact trainable counts


def lora_count(r, fan_in, fan_out):
    return r * (fan_in + fan_out)


def adapter_count(b, d):
    return 2 * d * b + b + d


def prefix_count(p, nh, hd):
    return 2 * p * nh * hd


@pytest.mark.parametrize("size", [1, 4, 8])
def test_trainable_count_matches_cost_formula(model, batch, size):
    cases = [
        ({f"{L0}/mlp/intermediate": ("lora", size)}, lora_count(size, H, FFN)),
        ({f"{L0}/mlp/output": ("lora", size)}, lora_count(size, FFN, H)),
        ({f"{L0}/attention/mha/query": ("lora", size)}, lora_count(size, H, NH * HD)),
        ({f"{L0}/attention/mha/out": ("lora", size)}, lora_count(size, NH * HD, H)),
        ({"embeddings/word": ("lora", size)}, lora_count(size, V, H)),
        ({f"{L0}/mlp": ("adapter", size)}, adapter_count(size, H)),
        ({f"{L0}/attention/mha": ("prefix", size)}, prefix_count(size, NH, HD)),
    ]
    sites = discover_sites(model, example=batch)  # once; apply_plan would rediscover per call
    for plan, expected in cases:  # abstract: counts need shapes, not values
        wrapped = nnx.eval_shape(lambda: apply_plan(model, plan, sites=sites))
        assert count_trainable(wrapped) == expected, plan
    mixed = {k: (m, size) for k, (m, _) in MIXED.items()}
    expected = (lora_count(size, H, H) * 2 + prefix_count(size, NH, HD) + adapter_count(size, H)
                + lora_count(size, H, FFN) + adapter_count(size, H) + lora_count(size, V, H)
                + lora_count(size, H, CFG.num_labels))
    assert count_trainable(nnx.eval_shape(lambda: apply_plan(model, mixed, sites=sites))) == expected


def test_trainable_count_agrees_with_discovered_site_features(model, batch):
    """The cost formula's in/out come from discover_sites: check against it for every linear."""
    sites = discover_sites(model, example=batch, kinds=("linear",))
    plan = {s.path: ("lora", 3) for s in sites}
    wrapped = apply_plan(model, plan)
    assert count_trainable(wrapped) == sum(3 * (s.in_features + s.out_features) for s in sites)


def test_prefix_reparam_count(model):
    p, hdim, d = 3, 5, NH * HD
    w = apply_plan(model, {f"{L0}/attention/mha": ("prefix", p)}, prefix_reparam_hidden=hdim)
    assert count_trainable(w) == p * d + d * hdim + hdim + hdim * 2 * d + 2 * d


# ------------------------------------------------------------- variable types / names


def test_variables_are_lora_params_with_one_prefix(model, batch):
    wrapped = apply_plan(model, MIXED, example=batch)
    peft = nnx.state(wrapped, nnx.LoRAParam)
    flat = list(nnx.to_flat_state(peft))
    assert flat and all(str(path[-1]).startswith("peft_") for path, _ in flat)
    assert all(isinstance(v, PeftParam) for _, v in flat)
    assert count_trainable(wrapped) == sum(math.prod(v.shape) for _, v in flat)
    # base params exclude adapters, and their count is unchanged
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(wrapped, BASE_FILTER)))
    assert n_base == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # nnx.Optimizer written for nnx.LoRAParam trains exactly the adapters
    opt = nnx.Optimizer(wrapped, optax.sgd(0.1), wrt=nnx.LoRAParam)
    assert sum(x.size for x in jax.tree.leaves(opt.opt_state)) == 0  # sgd has no state
    assert applied_plan(wrapped) == MIXED


def test_init_is_deterministic_per_site(model):
    a = apply_plan(model, {"pooler": ("lora", 2), "classifier": ("lora", 2)})
    b = apply_plan(model, {"pooler": ("lora", 2)})
    np.testing.assert_array_equal(a.pooler.peft_lora_a[...], b.pooler.peft_lora_a[...])
    c = apply_plan(model, {"pooler": ("lora", 2)}, seed=1)
    assert not np.array_equal(a.pooler.peft_lora_a[...], c.pooler.peft_lora_a[...])


# --------------------------------------------------------------- surgery semantics


def test_clone_by_default_and_inplace(batch):
    m = BertClassifier(CFG, rngs=nnx.Rngs(1))
    ref = np.asarray(m(*batch))
    w = perturb(apply_plan(m, {"pooler": ("lora", 2)}))
    assert not isinstance(m.pooler, LoRA) and isinstance(w.pooler, LoRA)
    assert not np.allclose(ref, np.asarray(fwd(w, *batch)))
    np.testing.assert_array_equal(ref, np.asarray(m(*batch)))
    w2 = apply_plan(m, {"pooler": ("lora", 2)}, inplace=True)
    assert w2 is m and isinstance(m.pooler, LoRA)


@pytest.mark.parametrize("plan,match", [
    ({"encoder/layers_9/mlp": ("adapter", 2)}, "encoder/layers_9/mlp"),
    ({"pooler/nope": ("lora", 2)}, "pooler/nope"),
    ({f"{L0}/mlp_norm": ("lora", 2)}, f"{L0}/mlp_norm.*kind 'norm'"),
    ({"pooler": ("adapter", 2)}, "'pooler' of kind 'linear'"),
    ({"pooler": ("prefix", 2)}, "'pooler' of kind 'linear'"),
    ({f"{L0}/attention/mha": ("lora", 2)}, "kind 'attention'"),
    ({"pooler": ("dora", 2)}, "unknown method 'dora'.*pooler"),
    ({"pooler": ("lora", 0)}, "size 0.*pooler"),
    ({"pooler": ("lora", 2.5)}, "pooler"),
])
def test_bad_plans_raise_naming_the_site(model, batch, plan, match):
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    with pytest.raises(ValueError, match=match):
        apply_plan(model, {"classifier": ("lora", 2), **plan}, example=batch, inplace=True)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
    assert jax.tree.structure(before) == jax.tree.structure(after)
    assert not isinstance(model.classifier, LoRA)


def test_plan_object_duck_typed(model, batch):
    class FakePlan:
        peft_options = {"lora_alpha": 4.0, "use_rslora": False, "adapter_activation": "relu"}

        def assignments(self):
            return {"pooler": ("lora", 2), f"{L0}/mlp": ("adapter", 3)}

    w = apply_plan(model, FakePlan(), example=batch)
    assert w.pooler.scale == 2.0 and get_submodule(w, f"{L0}/mlp").activation == "relu"
    w = apply_plan(model, FakePlan(), example=batch, lora_alpha=8.0)  # keyword overrides
    assert w.pooler.scale == 4.0


def test_adapter_needs_width(model):
    with pytest.raises(ValueError, match="example"):
        apply_plan(model, {f"{L0}/mlp": ("adapter", 2)})


# -------------------------------------------------------------------------- merge


def test_merge_matches_unmerged_and_restores_tree(model, batch):
    plan = {k: v for k, v in MIXED.items()}
    wrapped = perturb(apply_plan(model, plan, example=batch))
    merged = merge(wrapped)
    np.testing.assert_allclose(fwd(merged, *batch), fwd(wrapped, *batch), rtol=2e-5, atol=2e-5)
    assert not any(isinstance(m, LoRA) for _, m in nnx.iter_modules(merged))
    assert any(isinstance(m, Adapter) for _, m in nnx.iter_modules(merged))  # not mergeable
    assert isinstance(get_submodule(merged, f"{L0}/attention/base_module/mha").attention_fn, Prefix)
    # LoRA sites are plain base modules again; sites outside the plan were never wrapped
    assert type(merged.classifier) is nnx.Linear and type(merged.pooler) is nnx.Linear
    assert type(get_submodule(merged, "embeddings/word")) is nnx.Embed
    assert type(get_submodule(merged, f"{L0}/attention/base_module/mha/query")) is nnx.LinearGeneral
    assert isinstance(get_submodule(wrapped, "classifier"), LoRA)  # merge cloned


def test_merge_lora_only_gives_base_structure(model, batch):
    sites = discover_sites(model, kinds=("linear", "embedding"))
    wrapped = perturb(apply_plan(model, {s.path: ("lora", 2) for s in sites}))
    merged = merge(wrapped)
    np.testing.assert_allclose(fwd(merged, *batch), fwd(wrapped, *batch), rtol=2e-5, atol=2e-5)
    assert nnx.graphdef(merged) == nnx.graphdef(model)
    assert count_trainable(merged) == 0


# ------------------------------------------------------------------ other site types


def test_lora_conv_and_einsum_against_materialised_kernel():
    rngs = nnx.Rngs(0)
    conv = nnx.Conv(3, 4, kernel_size=(3, 3), strides=(2, 1), padding="SAME", rngs=rngs)
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 3))
    lora = LoRA(conv, 2, alpha=2.0, rngs=nnx.Rngs(2))
    assert np.array_equal(np.asarray(lora(x)), np.asarray(conv(x)))
    assert count_trainable(lora) == 2 * (3 * 3 * 3 + 4)
    perturb(lora)
    ref = nnx.clone(conv)
    ref.kernel[...] = lora.merged_kernel()
    np.testing.assert_allclose(fwd(lora, x), fwd(ref, x), rtol=1e-4, atol=1e-4)

    ein = nnx.Einsum("btd,dnh->btnh", (4, 2, 3), (2, 3), rngs=rngs)
    x = jax.random.normal(jax.random.key(3), (2, 5, 4))
    lora = perturb(LoRA(ein, 2, rngs=nnx.Rngs(4)))
    assert count_trainable(lora) == 2 * (4 + 6)
    ref = nnx.clone(ein)
    ref.kernel[...] = lora.merged_kernel()
    np.testing.assert_allclose(fwd(lora, x), fwd(ref, x), rtol=1e-4, atol=1e-4)


def test_lora_embed_attend():
    emb = nnx.Embed(10, 4, rngs=nnx.Rngs(0))
    lora = perturb(LoRA(emb, 2, rngs=nnx.Rngs(1)))
    q = jax.random.normal(jax.random.key(2), (3, 4))
    table = lora.merged_kernel()
    np.testing.assert_allclose(lora.attend(q), q @ table.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(lora(jnp.array([1, 7])), table[jnp.array([1, 7])], rtol=1e-5)


def test_lora_dropout_only_in_training():
    lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    lora = perturb(LoRA(lin, 2, dropout=0.5, rngs=nnx.Rngs(1)))
    x = jnp.ones((8, 4))
    lora.eval()
    y1, y2 = lora(x), lora(x)
    np.testing.assert_array_equal(y1, y2)
    lora.train()
    assert not np.allclose(lora(x), y1)


def test_lora_dtypes_respected():
    lin = nnx.Linear(4, 3, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    lora = LoRA(lin, 2, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    assert lora.peft_lora_a.dtype == jnp.bfloat16
    y = lora(jnp.ones((2, 4), jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, lin(jnp.ones((2, 4), jnp.bfloat16)))


def test_standalone_adapter():
    ad = Adapter(None, 3, features=5, rngs=nnx.Rngs(0))
    h = jnp.ones((2, 5))
    np.testing.assert_array_equal(ad(h), h)
    assert count_trainable(ad) == 2 * 5 * 3 + 3 + 5


# ------------------------------------------------------------- prefix and masks


@pytest.mark.parametrize("mode", ["parallel", "joint"])
def test_prefix_padding_invariance(model, batch, mode):
    """Outputs at real tokens don't depend on what sits at padded positions, prefix or not."""
    wrapped = perturb(apply_plan(model, {f"{L0}/attention/mha": ("prefix", 3),
                                         "encoder/layers_1/attention/mha": ("prefix", 2)},
                                 prefix_mode=mode))
    ids, mask = batch
    ids2 = jnp.where(mask == 0, (ids + 7) % V, ids)
    encode = nnx.jit(lambda m, i, k: m.encode(i, k))
    h1, h2 = encode(wrapped, ids, mask), encode(wrapped, ids2, mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(h1)[real], np.asarray(h2)[real], rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(h1), np.asarray(encode(model, ids, mask)))


@pytest.mark.parametrize("mode", ["parallel", "joint"])
def test_prefix_causal_with_mha(mode):
    mha = nnx.MultiHeadAttention(2, 8, decode=False, rngs=nnx.Rngs(0))
    from layerlens_jax._src.peft.nnx_modules import prefix_target_info
    info = prefix_target_info(mha)
    mha.attention_fn = nnx.data(Prefix(3, info["num_heads"], info["head_dim"],
                                       base_fn=mha.attention_fn, mode=mode, rngs=nnx.Rngs(1)))
    perturb(mha)
    x = jax.random.normal(jax.random.key(2), (2, 6, 8))
    x2 = x.at[:, 4:].set(5.0)
    causal_fwd = nnx.jit(lambda m, x: m(x, is_causal=True))
    y1, y2 = causal_fwd(mha, x), causal_fwd(mha, x2)
    np.testing.assert_allclose(y1[:, :4], y2[:, :4], rtol=1e-5, atol=1e-5)  # future ignored
    assert not np.allclose(y1[:, 4:], y2[:, 4:])
    # causal via explicit mask gives the same
    causal = jnp.tril(jnp.ones((6, 6), bool))[None, None]
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x, mask=causal))(mha, x), y1, rtol=1e-5,
                               atol=1e-5)


def test_prefix_user_attention_protocol():
    class MyAttention(nnx.Module):
        __layerlens_kind__ = "attention"

        def __init__(self, rngs):
            self.num_heads, self.head_dim = 2, 4
            self.proj = nnx.Linear(8, 24, rngs=rngs)
            self.attention_fn = nnx.dot_product_attention

        def __call__(self, x):
            q, k, v = jnp.split(self.proj(x).reshape(x.shape[:-1] + (6, 4)), 3, axis=-2)
            return self.attention_fn(q, k, v).reshape(x.shape)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.attn = MyAttention(rngs)

        def __call__(self, x):
            return self.attn(x)

    net = Net(nnx.Rngs(0))
    x = jnp.ones((1, 3, 8))
    w = apply_plan(net, {"attn": ("prefix", 2)})
    assert np.array_equal(np.asarray(w(x)), np.asarray(net(x)))
    assert count_trainable(w) == 2 * 2 * 2 * 4
    assert adapter_state(w).keys() == {"attn"}


def test_mlp_all_layers_lora():
    m = MLP((4, 8, 8, 2), rngs=nnx.Rngs(0))
    w = apply_plan(m, {f"layers_{i}": ("lora", 2) for i in range(3)})
    x = jnp.ones((5, 4))
    assert np.array_equal(np.asarray(w(x)), np.asarray(m(x)))
    assert count_trainable(w) == 2 * (4 + 8) + 2 * (8 + 8) + 2 * (8 + 2)
    np.testing.assert_allclose(fwd(merge(perturb(w)), x), fwd(w, x), rtol=1e-5, atol=1e-5)


class _ScanLayer(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(6, 6, rngs=rngs)
        self.proj = nnx.LinearGeneral(6, (2, 3), rngs=rngs)

    def __call__(self, x):
        return jax.nn.gelu(self.dense(x)) + self.proj(x).reshape(x.shape)


class _ScanStack(nnx.Module):
    """Layers built under nnx.vmap and run with nnx.scan (stacked parameters)."""

    def __init__(self, n, rngs):
        @nnx.split_rngs(splits=n)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return _ScanLayer(rngs)

        self.layers = create(rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, layer):
            return layer(x)

        return self.head(body(x, self.layers))


def test_lora_on_scan_stacked_layers():
    m, x = _ScanStack(3, nnx.Rngs(0)), jnp.ones((4, 6))
    w = apply_plan(m, {"layers/dense": ("lora", 2), "layers/proj": ("lora", 1),
                       "head": ("lora", 2)})
    a = w.layers.dense.peft_lora_a[...]
    assert a.shape == (3, 6, 2) and w.layers.proj.peft_lora_b.shape == (3, 1, 6)
    assert not np.allclose(a[0], a[1])  # independent init per layer (split keys)
    assert count_trainable(w) == 3 * 2 * (6 + 6) + 3 * 1 * (6 + 6) + 2 * (6 + 2)
    assert np.array_equal(np.asarray(m(x)), np.asarray(w(x)))
    perturb(w)
    merged = merge(w)
    assert merged.layers.dense.kernel.shape == (3, 6, 6)
    np.testing.assert_allclose(fwd(merged, x), fwd(w, x), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size", [1, 3, 16])
def test_trainable_count_equals_cost_model(model, batch, size):
    """Every site x compatible method: the modules create exactly costs.trainable_params."""
    sites = discover_sites(model, example=batch)
    method_of = {"linear": "lora", "embedding": "lora", "block": "adapter", "attention": "prefix"}
    checked = 0
    for site in sites:
        method = method_of.get(site.kind)
        if method is None:
            continue
        w = nnx.eval_shape(lambda: apply_plan(model, {site.path: (method, size)}, sites=sites))
        assert count_trainable(w) == costs.trainable_params(site, method, size), site.path
        checked += 1
    assert checked == len([s for s in sites if s.kind in method_of])
    att = next(s for s in sites if s.kind == "attention")
    w = nnx.eval_shape(lambda: apply_plan(model, {att.path: ("prefix", size)},
                                          prefix_reparam_hidden=5))
    assert count_trainable(w) == costs.trainable_params(att, "prefix", size, prefix_projection=5)


def test_real_plan_object(model, batch):
    sites = discover_sites(model, example=batch)
    assignments = {f"{L0}/attention/mha/query": ("lora", 4), f"{L0}/mlp": ("adapter", 8),
                   f"{L0}/attention/mha": ("prefix", 2)}
    plan = Plan.from_assignments(sites, assignments, peft_options={"lora_alpha": 4.0})
    assert plan.assignments() == assignments
    w = apply_plan(model, plan, sites=sites)
    assert applied_plan(w) == assignments
    assert get_submodule(w, f"{L0}/attention/mha/query").scale == 4.0 / 4  # plan's options used
    assert np.array_equal(np.asarray(model(*batch)), np.asarray(w(*batch)))


def test_prefix_module_reparam_against_numpy(model):
    """The Prefix module's keys / values are Li & Liang's tanh MLP of its own variables (a
    float64 numpy reference), through apply_plan with prefix_reparam_hidden."""
    w = perturb(apply_plan(model, {f"{L0}/attention/mha": ("prefix", 3)},
                           prefix_reparam_hidden=5), scale=1.0)
    prefix = get_submodule(w, f"{L0}/attention/mha").attention_fn
    e, w1, b1, w2, b2 = (np.asarray(getattr(prefix, f"peft_prefix_{n}")[...], np.float64)
                         for n in ("embed", "mlp_w1", "mlp_b1", "mlp_w2", "mlp_b2"))
    assert e.shape == (3, H) and w2.shape == (5, 2 * NH * HD)
    kv = np.tanh(e @ w1 + b1) @ w2 + b2
    k, v = prefix.key_value()
    np.testing.assert_allclose(np.asarray(k), kv[:, :NH * HD].reshape(3, NH, HD), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(v), kv[:, NH * HD:].reshape(3, NH, HD), rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------- every LoRA target kind under apply_plan


class _Zoo(nnx.Module):
    """One LoRA target of each kind: Embed, LinearGeneral, Einsum, Conv (explicit pads), Linear."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 6, rngs=rngs)
        self.general = nnx.LinearGeneral(6, (2, 3), rngs=rngs)
        self.einsum = nnx.Einsum("btd,dnh->btnh", (6, 2, 3), (2, 3), rngs=rngs)
        self.conv = nnx.Conv(6, 5, kernel_size=(3,), strides=2, padding=((2, 1),), rngs=rngs)
        self.head = nnx.Linear(5, 4, rngs=rngs)

    def __call__(self, ids):
        h = self.embed(ids)
        h = h + self.general(h).reshape(h.shape) + jnp.tanh(self.einsum(h)).reshape(h.shape)
        return self.head(jax.nn.gelu(self.conv(h)))


#: rank per site; fan_in + fan_out: embed 11 + 6, general / einsum 6 + 6, conv 3*6 + 5, head 5 + 4
ZOO_PLAN = {"embed": ("lora", 3), "general": ("lora", 2), "einsum": ("lora", 1),
            "conv": ("lora", 2), "head": ("lora", 2)}
ZOO_COUNT = 3 * 17 + 2 * 12 + 1 * 12 + 2 * 23 + 2 * 9


def numpy_merged(base_model, wrapped, plan, alpha=16.0):
    """``base_model`` with each planned kernel replaced by ``kernel + alpha / r * a @ b`` in float64
    numpy (the LoRA definition, independent of LoRA.merged_kernel / merge)."""
    ref = nnx.clone(base_model)
    for site, (_, r) in plan.items():
        lora, base = get_submodule(wrapped, site), get_submodule(ref, site)
        var = base.embedding if isinstance(base, nnx.Embed) else base.kernel
        a = np.asarray(lora.peft_lora_a[...], np.float64)
        b = np.asarray(lora.peft_lora_b[...], np.float64)
        var[...] = jnp.asarray(np.asarray(var[...], np.float64) + alpha / r * (a @ b).reshape(
            var.shape), var.dtype)
    return ref


def test_every_lora_kind_unmerged_merged_reference_and_cost_model():
    zoo = _Zoo(nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 11, (2, 7)), jnp.int32)
    sites = {s.path: s for s in discover_sites(zoo, example=(ids,))}
    for site, (method, r) in ZOO_PLAN.items():  # per site: modules create the cost model's count
        w = nnx.eval_shape(lambda: apply_plan(zoo, {site: (method, r)}))
        assert count_trainable(w) == costs.trainable_params(sites[site], method, r), site
    wrapped = apply_plan(zoo, ZOO_PLAN)
    assert {type(get_submodule(wrapped, s).base_module) for s in ZOO_PLAN} == {
        nnx.Embed, nnx.LinearGeneral, nnx.Einsum, nnx.Conv, nnx.Linear}
    assert count_trainable(wrapped) == ZOO_COUNT == sum(
        costs.trainable_params(sites[s], m, r) for s, (m, r) in ZOO_PLAN.items())
    assert np.array_equal(np.asarray(wrapped(ids)), np.asarray(zoo(ids)))  # identity at init
    perturb(wrapped)
    ref = fwd(numpy_merged(zoo, wrapped, ZOO_PLAN), ids)
    assert not np.allclose(ref, fwd(zoo, ids), atol=1e-2)  # the adapters do something
    np.testing.assert_allclose(fwd(wrapped, ids), ref, rtol=1e-4, atol=1e-4)  # unmerged
    merged = merge(wrapped)
    assert nnx.graphdef(merged) == nnx.graphdef(zoo)
    np.testing.assert_allclose(fwd(merged, ids), ref, rtol=1e-4, atol=1e-4)


def test_lora_target_info_is_a_typed_record_from_the_one_table():
    from layerlens_jax._src.peft import LORA_KINDS, LoRATarget
    from layerlens_jax._src.peft.nnx_modules import lora_target_info
    zoo = _Zoo(nnx.Rngs(0))
    got = {s: lora_target_info(get_submodule(zoo, s), s) for s in ZOO_PLAN}
    assert all(isinstance(t, LoRATarget) for t in got.values())
    assert {s: (t.kind, t.fan_in, t.fan_out, t.kernel_name, t.kernel_shape, t.stack)
            for s, t in got.items()} == {
        "embed": ("embed", 11, 6, "embedding", (11, 6), ()),
        "general": ("general", 6, 6, "kernel", (6, 2, 3), ()),
        "einsum": ("einsum", 6, 6, "kernel", (6, 2, 3), ()),
        "conv": ("conv", 18, 5, "kernel", (3, 6, 5), ()),
        "head": ("linear", 5, 4, "kernel", (5, 4), ())}
    assert dict(got["conv"].delta_args)["padding"] == ((2, 1),)
    assert set(LORA_KINDS) == {t.kind for t in got.values()}
    with pytest.raises(dataclasses.FrozenInstanceError):
        got["head"].fan_in = 1
    with pytest.raises(ValueError, match="'norm'.*LayerNorm"):
        lora_target_info(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), "norm")
    with pytest.raises(ValueError, match="'c'.*grouped"):
        lora_target_info(nnx.Conv(4, 4, 3, feature_group_count=2, rngs=nnx.Rngs(0)), "c")
    with pytest.raises(ValueError, match="'c'.*CIRCULAR"):
        lora_target_info(nnx.Conv(4, 4, 3, padding="CIRCULAR", rngs=nnx.Rngs(0)), "c")


@pytest.mark.parametrize("padding,rank", [
    ("SAME", 2), ("VALID", 1), (1, 2), (0, 3), ([(0, 1), 2], 2), (((1, 2), (3, 4)), 2), ([3], 1),
])
def test_conv_padding_equals_flax_canonicalize_padding(padding, rank):
    """Pins our helper to flax's (internal) ``canonicalize_padding`` that it replaces."""
    from flax.nnx.nn.linear import canonicalize_padding
    from layerlens_jax._src.peft.targets import conv_padding
    theirs = canonicalize_padding(padding, rank)
    ours = conv_padding(padding, rank)
    assert ours == (theirs if isinstance(theirs, str) else tuple(tuple(p) for p in theirs))


@pytest.mark.parametrize("padding,rank", [((1, 2, 3), 2), ([(1, 2, 3)], 1), (1.5, 1)])
def test_conv_padding_rejects_what_flax_rejects(padding, rank):
    from flax.nnx.nn.linear import canonicalize_padding
    from layerlens_jax._src.peft.targets import conv_padding
    with pytest.raises(ValueError):
        canonicalize_padding(padding, rank)
    with pytest.raises(ValueError, match="padding"):
        conv_padding(padding, rank)


def test_normalize_plan_is_a_deprecated_alias():
    from layerlens_jax._src.peft import normalise_plan, normalize_plan
    plan = {"pooler": ("lora", 2), "classifier": ("none", 0)}
    with pytest.warns(DeprecationWarning, match="normalise_plan"):
        old = normalize_plan(plan, lora_alpha=4.0)
    assert old == normalise_plan(plan, lora_alpha=4.0)
    assert old[0] == {"pooler": ("lora", 2)} and old[1].lora_alpha == 4.0


def test_docstring_examples_run():
    import doctest
    from layerlens_jax._src.peft import apply, targets, tree
    for module in (apply, targets, tree):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0, module.__name__
