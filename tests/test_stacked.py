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

    grads = [flatten_paths(jax.vmap(jax.grad(one), (None, 0, 0))(params, b["x"], b["y"])
                           .to_pure_dict()) for b in data]
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
