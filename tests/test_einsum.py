"""Einsum projections (Gemma-style attention): LoRA on the contracting axes, the profile's einsum
rule, costs == created parameters, merge; allocate refuses what apply_plan cannot build;
profile(example=...)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import layerlens_jax as ll
from layerlens_jax._src.costs import trainable_params
from layerlens_jax._src.peft import apply_plan, count_trainable, merge
from layerlens_jax._src.profile import profile
from layerlens_jax._src.sites import discover_sites, register_site_kind

D, N, K, H = 8, 4, 2, 3  # width, query heads, key-value heads, head size
B, T = 3, 5
HI = jax.lax.Precision.HIGHEST


class GemmaAttention(nnx.Module):
    """Gemma's attention layout: q "BTD,DNH->BTNH" (with a bias here), fused kv
    "BSD,CDKH->CBSKH", out "BTNH,NHD->BTD"; grouped-query, causal."""

    def __init__(self, rngs):
        self.q_einsum = nnx.Einsum("BTD,DNH->BTNH", (D, N, H), (N, H), rngs=rngs,
                                   bias_init=nnx.initializers.normal(0.5))
        self.kv_einsum = nnx.Einsum("BSD,CDKH->CBSKH", (2, D, K, H), rngs=rngs)
        self.attn_vec_einsum = nnx.Einsum("BTNH,NHD->BTD", (N, H, D), rngs=rngs)

    def __call__(self, x):
        q = self.q_einsum(x)
        k, v = self.kv_einsum(x)
        k, v = jnp.repeat(k, N // K, axis=2), jnp.repeat(v, N // K, axis=2)
        logits = jnp.einsum("BTNH,BSNH->BNTS", q, k, precision=HI) / np.sqrt(H)
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -1e9)
        enc = jnp.einsum("BNTS,BSNH->BTNH", jax.nn.softmax(logits, -1), v, precision=HI)
        return self.attn_vec_einsum(enc)


SITES = ("q_einsum", "kv_einsum", "attn_vec_einsum")


@pytest.fixture(scope="module")
def setup():
    model = GemmaAttention(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, T, D)).astype(np.float32)
    y = rng.normal(size=(B, T, D)).astype(np.float32)
    return model, x, y


def _loss(model, batch):
    return jnp.sum((model(batch["x"]) - batch["y"]) ** 2, axis=(1, 2))


def test_lora_factors_map_contracted_axes_to_output_axes_and_costs_match(setup):
    model, x, _ = setup
    sites = {s.path: s for s in discover_sites(model, example=x)}
    assert {p: (sites[p].in_features, sites[p].out_features, sites[p].tokens_per_example)
            for p in SITES} == {"q_einsum": (D, N * H, T), "kv_einsum": (D, 2 * K * H, T),
                                "attn_vec_einsum": (N * H, D, T)}
    assert all(not sites[p].build_refusals for p in SITES)
    wrapped = apply_plan(model, {"q_einsum": ("lora", 2), "kv_einsum": ("lora", 3),
                                 "attn_vec_einsum": ("lora", 2)})
    shapes = {p: (getattr(wrapped, p).peft_lora_a.shape, getattr(wrapped, p).peft_lora_b.shape)
              for p in SITES}
    assert shapes == {"q_einsum": ((D, 2), (2, N * H)), "kv_einsum": ((D, 3), (3, 2 * K * H)),
                      "attn_vec_einsum": ((N * H, 2), (2, D))}
    predicted = sum(trainable_params(sites[p], "lora", r)
                    for p, r in (("q_einsum", 2), ("kv_einsum", 3), ("attn_vec_einsum", 2)))
    assert count_trainable(wrapped) == predicted == 2 * (8 + 12) + 3 * (8 + 12) + 2 * (12 + 8)


def _perturbed(model):
    wrapped = apply_plan(model, {p: ("lora", 2) for p in SITES}, lora_alpha=4.0)
    keys = iter(jax.random.split(jax.random.key(7), 8))
    for p in SITES:
        lora = getattr(wrapped, p)
        lora.peft_lora_b[...] = jax.random.normal(next(keys), lora.peft_lora_b.shape)
    return wrapped


def test_lora_equals_base_with_the_updated_kernel_and_merge(setup):
    model, x, _ = setup
    wrapped = _perturbed(model)
    # independent reference: A rows = contracted axes, B columns = output axes, kernel order
    layouts = {"q_einsum": ("dr,rnh->dnh", (D, 2), (2, N, H)),
               "kv_einsum": ("dr,rckh->cdkh", (D, 2), (2, 2, K, H)),
               "attn_vec_einsum": ("nhr,rd->nhd", (N, H, 2), (2, D))}
    ref = nnx.clone(model)
    for p, (spec, a_shape, b_shape) in layouts.items():
        lora = getattr(wrapped, p)
        a = np.asarray(lora.peft_lora_a[...], np.float64).reshape(a_shape)
        b = np.asarray(lora.peft_lora_b[...], np.float64).reshape(b_shape)
        kernel = getattr(ref, p).kernel
        kernel[...] = jnp.asarray(np.asarray(kernel[...], np.float64)
                                  + (4.0 / 2) * np.einsum(spec, a, b), jnp.float32)
    got = np.asarray(wrapped(x))
    assert np.abs(got - np.asarray(model(x))).max() > 1e-2  # the update matters
    np.testing.assert_allclose(got, np.asarray(ref(x)), rtol=1e-4, atol=1e-4)
    merged = merge(wrapped)
    assert count_trainable(merged) == 0
    np.testing.assert_allclose(np.asarray(merged(x)), got, rtol=1e-4, atol=1e-4)


def _reference_stats(model, batch, paths):
    """grad norm and Fisher trace per site from jax.vmap(jax.grad) per example."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one(params, x, y):
        m = nnx.merge(graphdef, params, rest)
        return _loss(m, {"x": x[None], "y": y[None]})[0]

    per = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, batch["x"], batch["y"])
    per = per.to_pure_dict()
    fisher, mean_sq = [], []
    for p in paths:
        leaves = jax.tree.leaves(per[p])
        sq = sum(np.sum(np.asarray(l, np.float64).reshape(B, -1) ** 2, axis=1) for l in leaves)
        mean = [np.asarray(l, np.float64).mean(axis=0) for l in leaves]
        fisher.append(sq.mean())
        mean_sq.append(np.sqrt(sum(np.sum(m ** 2) for m in mean)))
    return np.array(mean_sq), np.array(fisher)


def test_profile_einsum_rule_matches_vmap_grad_per_example(setup):
    model, x, y = setup
    batch = {"x": x, "y": y}
    stats = profile(model, _loss, [batch], example=x, precision="highest")
    assert stats.paths == SITES[2:] + SITES[1:2] + SITES[:1]  # sorted
    gn, fi = _reference_stats(model, batch, stats.paths)
    np.testing.assert_allclose(stats.fisher_trace, fi, rtol=1e-4)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=1e-4)


def test_linear_general_lora_is_on_its_contracting_axes():
    out = nnx.LinearGeneral((N, H), D, axis=(-2, -1), rngs=nnx.Rngs(0))
    x = np.random.default_rng(1).normal(size=(B, T, N, H)).astype(np.float32)

    class Net(nnx.Module):
        def __init__(self):
            self.out = out

        def __call__(self, x):
            return self.out(x)

    (site,) = discover_sites(Net(), example=x)
    assert (site.in_features, site.out_features, site.tokens_per_example) == (N * H, D, T)
    lora = ll.LoRA(out, 3, rngs=nnx.Rngs(1))
    assert (lora.peft_lora_a.shape, lora.peft_lora_b.shape) == ((N * H, 3), (3, D))
    assert count_trainable(lora) == trainable_params(site, "lora", 3)
    lora.peft_lora_b[...] = jax.random.normal(jax.random.key(2), (3, D))
    delta = np.einsum("nhr,rd->nhd", np.asarray(lora.peft_lora_a[...]).reshape(N, H, 3),
                      np.asarray(lora.peft_lora_b[...])) * lora.scale
    want = np.einsum("btnh,nhd->btd", x, np.asarray(out.kernel[...]) + delta) + np.asarray(
        out.bias[...])
    np.testing.assert_allclose(np.asarray(lora(x)), want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ refusals


class Batched(nnx.Module):
    def __init__(self, rngs):
        self.mix = nnx.Einsum("BNH,NHD->BND", (N, H, D), rngs=rngs)

    def __call__(self, x):
        return self.mix(x)


def test_unfactorable_einsum_is_refused_naming_site_and_equation():
    model = Batched(nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"site 'mix'.*'BNH,NHD->BND'.*batched kernel"):
        apply_plan(model, {"mix": ("lora", 2)})
    (site,) = discover_sites(model, example=np.zeros((B, N, H), np.float32))
    assert [m for m, _ in site.build_refusals] == ["lora"]
    with pytest.raises(ValueError, match=r"site 'mix' of kind 'linear' \(Einsum\): apply_plan "
                                         r"cannot build lora.*BNH,NHD->BND"):
        ll.allocate([site], [1.0], {"params": 1e6})
    with pytest.warns(UserWarning, match="empty plan"):
        plan = ll.allocate([site], [1.0], {"params": 1e6}, pinned={"mix": "none"})
    assert plan.assignments() == {}  # "none" is left out


class BatchedThenGated(Batched):
    def __init__(self, rngs):
        super().__init__(rngs)
        self.gate = nnx.Einsum("...E,GFE->...GF", (2, D, D), (2, D), rngs=rngs,
                               bias_init=nnx.initializers.normal(0.5))

    def __call__(self, x):
        g = self.gate(self.mix(x))
        return g[..., 0, :] * jax.nn.sigmoid(g[..., 1, :])


def test_profile_batched_kernel_and_ellipsis_einsums_match_vmap_grad():
    model = BatchedThenGated(nnx.Rngs(3))
    rng = np.random.default_rng(4)
    batch = {"x": rng.normal(size=(B, N, H)).astype(np.float32),
             "y": rng.normal(size=(B, N, D)).astype(np.float32)}
    stats = profile(model, _loss, [batch], example=batch["x"], precision="highest")
    assert stats.paths == ("gate", "mix")
    gn, fi = _reference_stats(model, batch, stats.paths)
    np.testing.assert_allclose(stats.fisher_trace, fi, rtol=1e-4)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=1e-4)


class MyLinear(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, D)))

    def __call__(self, x):
        return x @ self.w


def test_allocate_refuses_lora_on_a_registered_linear_apply_plan_cannot_wrap():
    register_site_kind(MyLinear, "linear")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.mine = MyLinear(rngs)
            self.dense = nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            return self.dense(self.mine(x))

    sites = discover_sites(Net(nnx.Rngs(0)), example=np.zeros((B, D), np.float32))
    assert {s.path: [m for m, _ in s.build_refusals] for s in sites} == {"dense": [],
                                                                         "mine": ["lora"]}
    with pytest.raises(ValueError, match=r"site 'mine' of kind 'linear' \(MyLinear\): "
                                         r"apply_plan cannot build lora.*LoRA cannot wrap"):
        ll.allocate(sites, [1.0, 1.0], {"params": 1e6})
    plan = ll.allocate(sites, [1.0, 1.0], {"params": 1e6}, max_size={"mine": 0})
    assert list(plan.assignments()) == ["dense"] and plan.assignments()["dense"][0] == "lora"


# ------------------------------------------------------------------ profile(example=...)


class LinenImageNet(nn.Module):
    @nn.compact
    def __call__(self, image):
        h = nn.relu(nn.Conv(4, (3, 3), name="conv")(image))
        return nn.Dense(2, name="head")(h.reshape(h.shape[0], -1))


def test_profile_example_gives_site_shapes_for_any_batch_structure():
    module = LinenImageNet()
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(4, 5, 5, 1)).astype(np.float32),
             "label": rng.integers(0, 2, size=(4,))}
    variables = module.init(jax.random.key(0), batch["image"])

    def loss(v, b):
        logits = module.apply(v, b["image"])
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), b["label"][:, None], 1)[:, 0]

    with pytest.raises(ValueError, match="pass example="):
        profile(module, loss, [batch], variables=variables)
    stats = profile(module, loss, [batch], variables=variables, example=batch["image"])
    assert {s.path: (s.in_features, s.out_features, s.tokens_per_example)
            for s in stats.sites} == {"conv": (9, 4, 25), "head": (100, 2, 1)}
    plan = ll.allocate(list(stats.sites), [1.0, 1.0], {"params": 200})
    assert plan.use["params"] <= 200 and set(plan.assignments()) == {"conv", "head"}


# ------------------------------------------------------------------ Linen, docs


class LinenProjections(nn.Module):
    @nn.compact
    def __call__(self, x):  # x: (B, T, N, H)
        out = nn.Einsum((N, H, D), "BTNH,NHD->BTD", name="out")(x)
        return nn.Einsum((2, D, K, H), "BSD,CDKH->CBSKH", name="kv", use_bias=False)(out)


def test_linen_einsum_lora_and_merge_or_a_named_refusal():
    module = LinenProjections()
    x = np.random.default_rng(2).normal(size=(B, T, N, H)).astype(np.float32)
    variables = module.init(jax.random.key(0), x)
    wrapped = apply_plan(module, {"out": ("lora", 2)})
    v = ll.init_adapters(wrapped, jax.random.key(1), variables, x)
    assert v["params"]["out"]["peft_lora_a"].shape == (N * H, 2)
    v["params"]["out"]["peft_lora_b"] = jax.random.normal(jax.random.key(3), (2, D))
    got = np.asarray(wrapped.apply(v, x))
    bare, merged = merge(wrapped, v)
    np.testing.assert_allclose(np.asarray(bare.apply(merged, x)), got, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError,
                       match=r"site 'kv'.*contracted kernel axes.*'BSD,CDKH->CBSKH'"):
        ll.init_adapters(apply_plan(module, {"kv": ("lora", 2)}), jax.random.key(1), variables, x)


def test_einsum_layout_docstring_examples_run():
    import doctest

    from layerlens_jax._src import einsum
    result = doctest.testmod(einsum, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 4 and result.failed == 0
