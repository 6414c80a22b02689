"""Layers stacked with nnx.vmap and run with nnx.scan: per-layer sites, profile, LoRA, merge."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from layerlens_jax import discover_sites, profile
from layerlens_jax._src.peft.apply import apply_plan, applied_plan, count_trainable, merge
from layerlens_jax._src.sites import flatten_paths
from layerlens_jax._src.stacked import find_stacks, parse_layer_path

L, D, H = 3, 4, 6  # layers, model width, hidden width


class Block(nnx.Module):
    def __init__(self, rngs, attention=False):
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.fc1 = nnx.Linear(D, H, rngs=rngs)
        self.fc2 = nnx.Linear(H, D, rngs=rngs)
        self.attn = (nnx.MultiHeadAttention(2, D, qkv_features=D, decode=False, rngs=rngs)
                     if attention else None)

    def __call__(self, x):
        if self.attn is not None:
            x = x + self.attn(x)
        return x + self.fc2(jax.nn.gelu(self.fc1(self.norm(x))))


class Scanned(nnx.Module):
    """Blocks built under nnx.vmap (a leading layer axis) and run with nnx.scan."""

    def __init__(self, rngs, attention=False):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return Block(rngs, attention)

        self.embed = nnx.Linear(2, D, rngs=rngs)
        self.layers = create(rngs)
        self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return layer(h)

        return self.head(body(self.embed(x), self.layers))


def loss_fn(model, batch):
    return jnp.sum((model(batch["x"]) - batch["y"]) ** 2, axis=(1, 2))


def batches(n=2, b=4, t=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(b, t, 2)).astype(np.float32),
             "y": rng.normal(size=(b, t, 2)).astype(np.float32)} for _ in range(n)]


def reference_stats(model, data, site_paths):
    """Per-example gradients by vmap(grad) of the whole model, a stacked leaf sliced per layer:
    ``{site: (grad_norm, fisher_trace)}`` over the leaves under each site."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one(p, x, y):
        return loss_fn(nnx.merge(graphdef, p, rest), {"x": x[None], "y": y[None]})[0]

    per_example = jax.jit(jax.vmap(jax.grad(one), (None, 0, 0)))
    grads = [flatten_paths(per_example(params, b["x"], b["y"]).to_pure_dict()) for b in data]
    per_leaf = {}  # per-layer leaf path -> (N, size)
    for leaf in grads[0]:
        g = np.concatenate([np.asarray(gr[leaf], np.float64) for gr in grads])
        if leaf.startswith("layers/"):  # (N, L, ...): one leaf per layer
            for i in range(L):
                per_leaf[f"layers/{i}{leaf[len('layers'):]}"] = g[:, i].reshape(len(g), -1)
        else:
            per_leaf[leaf] = g.reshape(len(g), -1)
    out = {}
    for site in site_paths:
        g = np.concatenate([v for k, v in per_leaf.items() if k.startswith(site + "/")], axis=1)
        out[site] = (float(np.linalg.norm(g.mean(0))), float(np.mean(np.sum(g ** 2, axis=1))))
    return out


# ------------------------------------------------------------------------------- discovery


def test_find_stacks_and_layer_paths():
    model = Scanned(nnx.Rngs(0), attention=True)
    assert find_stacks(model) == {"layers": L}
    assert parse_layer_path("layers/2/attn/query", {"layers": L}) == ("layers/attn/query", "layers", 2)
    assert parse_layer_path("head", {"layers": L}) is None
    with pytest.raises(ValueError, match="'layers/3/fc1'.*3 layers"):
        parse_layer_path("layers/3/fc1", {"layers": L})


@pytest.mark.parametrize("with_example", [False, True])
def test_discovery_gives_one_site_per_layer_with_per_layer_shapes(with_example):
    model = Scanned(nnx.Rngs(0), attention=True)
    example = jnp.zeros((2, 5, 2)) if with_example else None
    sites = {s.path: s for s in discover_sites(model, example=example)}
    for i in range(L):
        fc1, fc2, q = sites[f"layers/{i}/fc1"], sites[f"layers/{i}/fc2"], sites[f"layers/{i}/attn/query"]
        assert (fc1.in_features, fc1.out_features, fc1.num_params) == (D, H, D * H + H)
        assert (fc2.in_features, fc2.out_features) == (H, D)
        assert fc1.param_shapes == {"kernel": (D, H), "bias": (H,)}
        assert q.param_shapes["kernel"] == (D, 2, D // 2)
        attn = sites[f"layers/{i}/attn"]
        assert (attn.num_heads, attn.head_dim, attn.in_features) == (2, D // 2, D)
        assert fc1.tokens_per_example == (5 if with_example else None)
    assert not any(p.startswith("layers/fc") for p in sites)  # no stack-level site
    assert sites["head"].in_features == D


# ------------------------------------------------------------------------------- profile


def test_profile_per_layer_matches_vmap_grad_reference():
    model = Scanned(nnx.Rngs(1), attention=True)
    data = batches()
    stats = profile(model, loss_fn, data, precision="highest")
    ref = reference_stats(model, data, stats.paths)
    for i, site in enumerate(stats.paths):
        want_norm, want_fisher = ref[site]
        np.testing.assert_allclose(stats.fisher_trace[i], want_fisher, rtol=2e-4, err_msg=site)
        np.testing.assert_allclose(stats.grad_norm[i], want_norm, rtol=2e-4, err_msg=site)
    # every layer's dense, norm (local-VJP rule), attention and projection sites were checked
    assert {f"layers/1/{n}" for n in ("fc1", "fc2", "norm", "attn", "attn/query")} <= set(stats.paths)
    # per-layer figures differ between layers (not one figure copied L times)
    f = dict(zip(stats.paths, stats.fisher_trace))
    assert len({round(f[f"layers/{i}/fc1"], 9) for i in range(L)}) == L


def test_profile_refuses_a_stack_whose_scan_does_not_slice_the_sink():
    class Broadcasting(Scanned):  # scans parameters only, broadcasting every other variable
        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, nnx.StateAxes({nnx.Param: 0, ...: None})),
                      out_axes=nnx.Carry)
            def body(h, layer):
                return layer(h)

            return self.head(body(self.embed(x), self.layers))

    with pytest.raises(ValueError, match="stacked unit 'layers/fc1'.*axis 0"):
        profile(Broadcasting(nnx.Rngs(0)), loss_fn, batches(1),
                sites=[s for s in discover_sites(Scanned(nnx.Rngs(0))) if s.path == "layers/0/fc1"])


# ------------------------------------------------------------------------- LoRA per layer


def perturb_b(model):
    """Random non-zero B factors (A is random already), so the LoRA term is not zero."""
    for _, m in nnx.iter_modules(model):
        if hasattr(m, "peft_lora_b"):
            b = m.peft_lora_b
            b[...] = jax.random.normal(jax.random.key(7), b.shape, b.dtype)
    return model


def unstacked_reference(model, wrapped, x, ranks, alpha=16.0):
    """The forward pass with each layer's LoRA added to its kernel by hand (no scan, no mask):
    kernel_i + alpha / r_i * A_i[:, :r_i] @ B_i[:r_i]."""
    layers = nnx.state(model.layers, nnx.Param).to_pure_dict()
    lw = wrapped.layers.fc1
    a, b = np.asarray(lw.peft_lora_a[...]), np.asarray(lw.peft_lora_b[...])

    def layer(h, i):
        p = jax.tree.map(lambda v: v[i], layers)
        k = p["fc1"]["kernel"] + (alpha / ranks[i] * a[i, :, :ranks[i]] @ b[i, :ranks[i]]
                                  if ranks[i] else 0.0)
        n = p["norm"]
        hn = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
        hn = hn * n["scale"] + n["bias"]
        z = jax.nn.gelu(hn @ k + p["fc1"]["bias"])
        return h + z @ p["fc2"]["kernel"] + p["fc2"]["bias"]

    h = wrapped.embed(x)
    for i in range(L):
        h = layer(h, i)
    return wrapped.head(h)  # its own (unstacked) LoRA


def test_lora_with_different_ranks_per_layer_pads_and_masks():
    model, x = Scanned(nnx.Rngs(0)), jnp.asarray(batches(1)[0]["x"])
    ranks = (3, 0, 1)  # layer 1 gets no LoRA
    plan = {f"layers/{i}/fc1": ("lora", r) for i, r in enumerate(ranks) if r}
    plan["head"] = ("lora", 2)
    wrapped = apply_plan(model, plan)
    lora = wrapped.layers.fc1
    assert lora.peft_lora_a.shape == (L, D, 3) and lora.peft_lora_b.shape == (L, 3, H)
    a = np.asarray(lora.peft_lora_a[...])
    assert np.all(a[0] != 0) and np.all(a[1] == 0) and np.all(a[2, :, 1:] == 0) and np.all(a[2, :, 0] != 0)
    np.testing.assert_array_equal(np.asarray(lora.lora_mask[...]),
                                  np.float32([[16 / 3] * 3, [0, 0, 0], [16.0, 0, 0]]))
    assert applied_plan(wrapped) == plan
    # identity at init, then created params == the cost: L * max rank * (d_in + d_out), padding in
    np.testing.assert_array_equal(np.asarray(wrapped(x)), np.asarray(model(x)))
    from layerlens_jax._src.peft.stacked_lora import stacked_lora_params
    sites = discover_sites(model)
    assert stacked_lora_params(plan, sites) == {"layers/fc1": L * 3 * (D + H)}
    assert count_trainable(wrapped) == L * 3 * (D + H) + 2 * (D + 2)
    # the forward equals a hand-built per-layer reference with the true ranks
    perturb_b(wrapped)
    np.testing.assert_allclose(wrapped(x), unstacked_reference(model, wrapped, x, ranks),
                               rtol=1e-5, atol=1e-5)
    # padded columns and the LoRA-free layer get exactly zero gradient
    def loss(w):
        return jnp.sum(w(x) ** 2)

    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(wrapped)
    ga = np.asarray(grads["layers"]["fc1"]["peft_lora_a"][...])
    gb = np.asarray(grads["layers"]["fc1"]["peft_lora_b"][...])
    assert np.all(ga[1] == 0) and np.all(gb[1] == 0) and np.all(ga[2, :, 1:] == 0)
    assert np.all(gb[2, 1:] == 0) and np.any(ga[0] != 0) and np.any(gb[2, 0] != 0)
    # merge per layer: merged == unmerged
    merged = merge(wrapped)
    assert type(merged.layers.fc1).__name__ == "Linear" and count_trainable(merged) == 0
    np.testing.assert_allclose(merged(x), wrapped(x), rtol=1e-5, atol=1e-5)


def test_stacked_sites_refuse_adapter_and_prefix():
    model = Scanned(nnx.Rngs(0), attention=True)
    with pytest.raises(ValueError, match="prefix to site 'layers/1/attn'.*only LoRA"):
        apply_plan(model, {"layers/1/attn": ("prefix", 2)})
    with pytest.raises(ValueError, match="prefix to site 'layers/attn'.*only LoRA"):
        apply_plan(model, {"layers/attn": ("prefix", 2)})
    with pytest.raises(ValueError, match="'layers/fc1' and also some of its layers"):
        apply_plan(model, {"layers/fc1": ("lora", 2), "layers/0/fc1": ("lora", 1)})
    # the cost model's option mask refuses them at allocation time too
    from layerlens_jax._src.costs import Catalogue, option_mask
    sites = [s for s in discover_sites(model, example=jnp.zeros((1, 5, 2)))
             if s.path in ("layers/1/attn", "layers/1/fc1", "head")]
    cat = Catalogue.from_sizes(lora=(1,), prefix=(1,), adapter=(2,))
    mask = option_mask(sites, cat.options(), cat)
    allowed = {s.path: {o[0] for o, ok in zip(cat.options(), row) if ok} for s, row in zip(sites, mask)}
    assert allowed == {"head": {"none", "lora"}, "layers/1/attn": {"none"},
                       "layers/1/fc1": {"none", "lora"}}
    unstacked = [s for s in discover_sites(Scanned(nnx.Rngs(0), attention=True), kinds=["attention"])]
    assert all(s.stacked_module == "layers/attn" for s in unstacked)


def test_linen_scan_is_refused_by_profile_naming_the_site():
    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return nn.Dense(4, name="fc")(x), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                            length=L)
            return stack(name="layers")(x, None)[0]

    model, x = Model(), jnp.ones((4, 4))
    variables = model.init(jax.random.key(0), x)

    def linen_loss(v, batch):
        return jnp.sum(model.apply(v, batch["x"]) ** 2, axis=-1)

    with pytest.raises(ValueError, match="'layers/fc'.*stacked Linen layers.*not supported"):
        profile(model, linen_loss, [{"x": x}], variables=variables,
                sites=discover_sites(model, variables, example=x))


# ------------------------------------------------------------------ allocation: exact costs


def test_allocate_ties_the_layers_of_a_stack_so_created_params_equal_the_plan():
    """Without any tie rule, allocate gives every layer of a stack one option (the storage is
    padded to the largest rank anyway), so the plan's params are exactly what apply_plan creates;
    a hand-made Plan with uneven ranks inside a stack is refused, naming the stack."""
    import layerlens_jax as ll
    from layerlens_jax._src.costs import Catalogue
    from layerlens_jax._src.peft.stacked_lora import stacked_lora_params

    model = Scanned(nnx.Rngs(0))
    sites = discover_sites(model)
    u = np.linspace(1.0, 0.2, len(sites))  # uneven utilities: an untied solve would split ranks
    for budget in (60, 150, 400):
        plan = ll.allocate(sites, u, {"params": budget}, catalogue=Catalogue.from_sizes(
            lora=(1, 2, 3, 4)))
        got = plan.assignments()
        for leaf in ("fc1", "fc2"):
            assert len({got.get(f"layers/{i}/{leaf}", ("none", 0)) for i in range(L)}) == 1
        wrapped = apply_plan(model, plan)
        assert count_trainable(wrapped) == plan.use["params"] <= budget
        stacked = stacked_lora_params(got, sites)
        rest = sum(a.cost["params"] for a in plan.allocations
                   if not a.site.startswith("layers/"))
        assert plan.use["params"] == sum(stacked.values()) + rest
    with pytest.raises(ValueError, match="stacked module 'layers/fc1'"):
        ll.Plan.from_assignments(sites, {"layers/0/fc1": ("lora", 2), "layers/1/fc1": ("lora", 1),
                                         "layers/2/fc1": ("lora", 1)})


class EinsumBlock(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Einsum("BTD,DNH->BTNH", (D, 2, 3), rngs=rngs)
        self.out = nnx.Einsum("BTNH,NHD->BTD", (2, 3, D), rngs=rngs)

    def __call__(self, x):
        return x + self.out(jnp.tanh(self.proj(x)))


class ScannedEinsum(nnx.Module):
    def __init__(self, rngs):
        @nnx.split_rngs(splits=L)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create(rngs):
            return EinsumBlock(rngs)

        self.layers = create(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(h, layer):
            return layer(h)

        return body(x, self.layers)


def test_stacked_einsum_sites_profile_lora_and_merge():
    """Einsum projections inside an nnx.scan stack: per-layer contracting-axis shapes, exact
    per-layer Fisher (vmap(grad) reference), created params == plan, merged == unmerged."""
    import layerlens_jax as ll

    model = ScannedEinsum(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 5, D))
    sites = discover_sites(model, example=(x,))
    shapes = {s.path: (s.in_features, s.out_features) for s in sites}
    assert shapes["layers/1/proj"] == (D, 6) and shapes["layers/0/out"] == (6, D)

    def loss(m, b):
        return jnp.sum(m(b["x"]) ** 2, axis=(1, 2))

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one(p, xi):
        return loss(nnx.merge(graphdef, p, rest), {"x": xi[None]})[0]

    g = flatten_paths(jax.vmap(jax.grad(one), (None, 0))(params, x).to_pure_dict())
    stats = profile(model, loss, [{"x": x}])
    ref = [np.mean(np.sum(np.asarray(g[f"layers/{p.split('/')[2]}/kernel"])[:, int(p.split('/')[1])]
                          .reshape(3, -1) ** 2, axis=1)) for p in stats.paths]
    np.testing.assert_allclose(stats.fisher_trace, ref, rtol=1e-4)
    plan = ll.allocate(sites, stats.fisher_trace, {"params": 150})
    wrapped = apply_plan(model, plan)
    assert count_trainable(wrapped) == plan.use["params"] > 0
    perturb_b(wrapped)
    y = wrapped(x)
    assert float(jnp.max(jnp.abs(y - model(x)))) > 1e-3  # the LoRA term is live
    np.testing.assert_allclose(merge(wrapped)(x), y, rtol=1e-4, atol=1e-4)
