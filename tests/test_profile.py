"""profile() against a slow, obviously-correct per-example vmap(grad) reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from layerlens_jax.models import (BertClassifier, BertConfig, LinenBertClassifier, LinenMLP, MLP,
                                  nnx_params_as_linen)
from layerlens_jax._src.profile import profile, sampled_label_loss
from layerlens_jax._src.sites import discover_sites

RTOL = 2e-4


def _ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def bert_loss(model, batch):
    return _ce(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


def make_batches(cfg, n_batches=2, b=4, t=6, seed=0, pad_last_example=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_batches):
        ids = rng.integers(1, cfg.vocab_size, (b, t)).astype(np.int32)
        ids[:, 1] = ids[:, 2]  # repeated token ids inside an example (embedding rule)
        am = np.ones((b, t), np.int32)
        am[0, t - 2:] = 0  # padding
        am[1, t - 1:] = 0
        em = np.ones((b,), np.float32)
        if pad_last_example and i == n_batches - 1:
            em[-1] = 0.0
        out.append({"input_ids": ids, "attention_mask": am,
                    "labels": rng.integers(0, cfg.num_labels, (b,)).astype(np.int32),
                    "example_mask": em})
    return out


def reference_stats(per_example_grad, batches, sites):
    """grad_norm and fisher_trace from explicit per-example gradients (vmap(grad))."""
    sq = {s.path: [] for s in sites}
    gsum = {s.path: None for s in sites}
    n = 0.0
    for batch in batches:
        g = jax.vmap(per_example_grad)(batch)  # dict path -> (B, ...)
        w = batch["example_mask"]
        n += w.sum()
        for s in sites:
            leaves = [v for k, v in g.items() if k.rpartition("/")[0] == s.path
                      or k.startswith(s.path + "/")]
            per = sum(np.sum(np.asarray(v, np.float64).reshape(v.shape[0], -1) ** 2, 1)
                      for v in leaves)
            sq[s.path].append(per * w)
            tot = [np.tensordot(w, np.asarray(v, np.float64), 1).ravel() for v in leaves]
            tot = np.concatenate(tot)
            gsum[s.path] = tot if gsum[s.path] is None else gsum[s.path] + tot
    fisher = np.array([np.concatenate(sq[s.path]).sum() / n for s in sites])
    gnorm = np.array([np.linalg.norm(gsum[s.path] / n) for s in sites])
    return gnorm, fisher


def _flat(tree):
    from layerlens_jax._src.sites import flatten_paths as f
    return f(tree)


def nnx_per_example_grad(model, loss_fn):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def g(example):
        ex = jax.tree.map(lambda a: a[None], example)

        def loss(p):
            return loss_fn(nnx.merge(graphdef, p, rest), ex)[0]

        return _flat(jax.grad(loss)(params).to_pure_dict())

    return g


@pytest.fixture(scope="module")
def tiny():
    cfg = BertConfig.tiny()
    return cfg, BertClassifier(cfg, rngs=nnx.Rngs(0))


def test_nnx_bert_matches_vmap_grad_reference(tiny):
    cfg, model = tiny
    batches = make_batches(cfg, pad_last_example=True)
    stats = profile(model, bert_loss, batches)
    assert len(stats.sites) == 28
    gn, fi = reference_stats(nnx_per_example_grad(model, bert_loss), batches, stats.sites)
    np.testing.assert_allclose(stats.fisher_trace, fi, rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=RTOL, atol=1e-9)
    assert stats.num_examples == 7
    assert stats.num_tokens == sum(int((b["attention_mask"] * b["example_mask"][:, None]).sum())
                                   for b in batches)
    kinds = {s.kind for s in stats.sites}
    assert kinds == {"linear", "attention", "block", "embedding", "norm"}
    assert np.all(stats.fisher_trace > 0)


def linen_per_example_grad(module, variables, loss_fn):
    def g(example):
        ex = jax.tree.map(lambda a: a[None], example)

        def loss(p):
            return loss_fn({**variables, "params": p}, ex)[0]

        return _flat(jax.grad(loss)(variables["params"]))

    return g


def test_linen_bert_matches_reference_and_nnx_twin(tiny):
    cfg, model = tiny
    module = LinenBertClassifier(cfg)
    variables = nnx_params_as_linen(model)

    def loss(variables, batch):
        return _ce(module.apply(variables, batch["input_ids"], batch["attention_mask"]),
                   batch["labels"])

    batches = make_batches(cfg, seed=3)
    stats = profile(module, loss, batches, variables=variables)
    gn, fi = reference_stats(linen_per_example_grad(module, variables, loss), batches, stats.sites)
    np.testing.assert_allclose(stats.fisher_trace, fi, rtol=RTOL, atol=1e-9)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=RTOL, atol=1e-9)
    twin = profile(model, bert_loss, batches)  # same weights, same names: same numbers
    assert twin.paths == stats.paths
    np.testing.assert_allclose(twin.fisher_trace, stats.fisher_trace, rtol=1e-4, atol=1e-10)


@pytest.mark.parametrize("seq", [1, 40])  # seq 40 > dims: the outer-product path; 1: T == 1
def test_mlp_dense_rules_nnx_and_linen(seq):
    feats = (4, 8, 3)
    model = MLP(feats, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(seq)
    batches = [{"x": rng.normal(size=(5, seq, 4)).astype(np.float32),
                "y": rng.normal(size=(5, seq, 3)).astype(np.float32)} for _ in range(2)]

    def loss(m, b):
        return jnp.mean((m(b["x"]) - b["y"]) ** 2, axis=(1, 2))

    sites = discover_sites(model)
    stats = profile(model, loss, batches, sites=sites)
    for b in batches:
        b["example_mask"] = np.ones((5,), np.float32)
    gn, fi = reference_stats(nnx_per_example_grad(model, loss), batches, stats.sites)
    np.testing.assert_allclose(stats.fisher_trace, fi, rtol=RTOL)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=RTOL)

    module = LinenMLP(feats)
    variables = {"params": nnx.state(model, nnx.Param).to_pure_dict()}

    def lloss(v, b):
        return jnp.mean((module.apply(v, b["x"]) - b["y"]) ** 2, axis=(1, 2))

    lsites = discover_sites(module, variables, example=batches[0]["x"])
    lstats = profile(module, lloss, batches, variables=variables, sites=lsites)
    np.testing.assert_allclose(lstats.fisher_trace, fi, rtol=RTOL)


def test_streaming_compiles_once_and_counts(tiny):
    cfg, model = tiny
    traces = []

    def loss(m, b):
        traces.append(1)
        return bert_loss(m, b)

    stats = profile(model, loss, make_batches(cfg, n_batches=4), max_batches=3)
    # two abstract traces (at the batch size B, which also checks the loss's shape and dtype
    # before the taps go in, and at B+1, which tells broadcast inputs from batched ones), one
    # trace of the compiled step: none per batch
    assert len(traces) == 3
    assert stats.num_batches == 3 and stats.num_examples == 12


def test_sampled_fisher_matches_reference(tiny):
    cfg, model = tiny
    batches = make_batches(cfg, n_batches=1, seed=5)
    key = jax.random.key(7)
    logits_fn = lambda m, b: m(b["input_ids"], b["attention_mask"])  # noqa: E731
    stats = profile(model, bert_loss, batches, sample_loss_fn=sampled_label_loss(logits_fn),
                    rng=key)
    b = batches[0]
    sampled = jax.random.categorical(jax.random.fold_in(key, 0), logits_fn(model, b), axis=-1)
    ref_batches = [{**b, "labels": np.asarray(sampled)}]
    _, fi = reference_stats(nnx_per_example_grad(model, bert_loss), ref_batches, stats.sites)
    np.testing.assert_allclose(stats.fisher_trace_sampled, fi, rtol=RTOL, atol=1e-9)
    assert not np.allclose(stats.fisher_trace_sampled, stats.fisher_trace)


def test_nan_statistic_names_site_and_batch(tiny):
    cfg, model = tiny
    batches = make_batches(cfg, n_batches=3)
    batches[2]["labels"] = batches[2]["labels"].copy()

    def loss(m, b):
        out = bert_loss(m, b)
        return out * b["scale"]

    for i, b in enumerate(batches):
        b["scale"] = np.full((4,), np.nan if i == 2 else 1.0, np.float32)
    # every site is non-finite: the first statistic checked, at the first site in order
    assert [s.path for s in discover_sites(model)][0] == "classifier"
    with pytest.raises(FloatingPointError,
                       match=r"non-finite fisher_trace at site 'classifier' in batch 2 .*"
                             r"28 site\(s\) affected"):
        profile(model, loss, batches)


def test_nan_in_one_branch_names_that_site_and_batch():
    class TwoBranches(nnx.Module):
        def __init__(self):
            self.branch_a = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
            self.branch_b = nnx.Linear(3, 2, rngs=nnx.Rngs(1))

        def __call__(self, x, c):
            # forward sqrt(c) is finite; its gradient 0 * 1/(2 sqrt(c)) is NaN where c == 0,
            # and reaches branch_b only (branch_a and the input are not upstream of it)
            z = self.branch_b(x)
            return self.branch_a(x) + jnp.sqrt(z * 0.0 + c[:, None])

    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(4, 3)).astype(np.float32),
                "c": np.full((4,), 0.0 if i == 1 else 1.0, np.float32)} for i in range(3)]

    def loss(m, b):
        return jnp.sum(m(b["x"], b["c"]) ** 2, axis=-1)

    model = TwoBranches()
    with pytest.raises(FloatingPointError,
                       match=r"non-finite fisher_trace at site 'branch_b' in batch 1 .*"
                             r"1 site\(s\) affected"):
        profile(model, loss, batches)
    finite = profile(model, loss, [batches[0], batches[2]])  # without the bad batch: finite
    assert finite.paths == ("branch_a", "branch_b") and np.all(np.isfinite(finite.fisher_trace))


def test_bad_loss_shape_and_empty_inputs(tiny):
    cfg, model = tiny
    with pytest.raises(ValueError, match="per-example losses"):
        profile(model, lambda m, b: bert_loss(m, b).mean(), make_batches(cfg, 1))
    with pytest.raises(ValueError, match="no batches"):
        profile(model, bert_loss, [])
    with pytest.raises(TypeError, match="nnx.Module or a linen"):
        profile(object(), bert_loss, make_batches(cfg, 1))


def test_broadcast_batch_axis_is_exact():
    """Position ids with a singleton leading axis (not the example axis) were rejected; they are
    now broadcast over the examples, exactly (more layouts in tests/test_tied.py)."""
    class Pos(nnx.Module):
        def __init__(self):
            self.pos = nnx.Embed(8, 4, rngs=nnx.Rngs(0))
            self.head = nnx.Linear(4, 1, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.head(x + self.pos(jnp.arange(x.shape[1])[None]))

    def loss(m, b):
        return m(b)[:, :, 0].sum(1) ** 2

    model = Pos()
    x = np.random.default_rng(0).normal(size=(3, 8, 4)).astype(np.float32)
    stats = profile(model, loss, [x])
    gd, params, rest = nnx.split(model, nnx.Param, ...)
    per_example = [jax.grad(lambda p, i=i: loss(nnx.merge(gd, p, rest), x)[i])(params)
                   for i in range(3)]
    pos_sq = [float(jnp.sum(g["pos"]["embedding"][...] ** 2)) for g in per_example]
    np.testing.assert_allclose(stats.fisher_trace[stats.paths.index("pos")], np.mean(pos_sq),
                               rtol=RTOL)


class Scale(nnx.Module):
    """A user module with its own parameter, registered as a 'norm' site below."""

    def __init__(self, d):
        self.gain = nnx.Param(jnp.linspace(0.5, 1.5, d))

    def __call__(self, x):
        return x * self.gain


def test_conv_einsum_and_registered_user_module_use_the_local_vmap_rule():
    from layerlens_jax._src.sites import register_site_kind

    register_site_kind(Scale, "norm")

    class Net(nnx.Module):
        def __init__(self):
            r = nnx.Rngs(2)
            self.conv = nnx.Conv(3, 4, kernel_size=(3,), rngs=r)
            self.scale = Scale(4)
            self.mix = nnx.Einsum("btd,de->bte", (4, 2), (2,), rngs=r)

        def __call__(self, x):
            return self.mix(self.scale(jax.nn.relu(self.conv(x))))

    model = Net()
    rng = np.random.default_rng(0)
    batches = [{"x": rng.normal(size=(4, 9, 3)).astype(np.float32),
                "y": rng.normal(size=(4, 9, 2)).astype(np.float32),
                "example_mask": np.ones((4,), np.float32)}]

    def loss(m, b):
        return jnp.sum((m(b["x"]) - b["y"]) ** 2, axis=(1, 2))

    stats = profile(model, loss, batches)
    assert {s.path: s.kind for s in stats.sites} == {"conv": "conv", "scale": "norm", "mix": "linear"}
    gn, fi = reference_stats(nnx_per_example_grad(model, loss), batches, stats.sites)
    np.testing.assert_allclose(stats.fisher_trace, fi, rtol=RTOL)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=RTOL)


def _mlp_problem():
    model = MLP((4, 8, 2), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(8, 4)).astype(np.float32),
             "y": rng.normal(size=(8, 2)).astype(np.float32)}

    def loss(m, b):
        return jnp.sum((m(b["x"]) - b["y"]) ** 2, axis=-1)

    return model, batch, loss


@pytest.mark.parametrize("wrong", [
    lambda loss: (lambda m, b: jnp.concatenate([loss(m, b), loss(m, b)])),  # calls the model twice
    lambda loss: (lambda m, b: jnp.tile(loss(m, b), 2)),
])
def test_loss_of_wrong_length_names_expected_and_got_shapes(wrong):
    model, batch, loss = _mlp_problem()
    with pytest.raises(ValueError, match=r"shape \(8,\) for a batch of 8, got \(16,\)"):
        profile(model, wrong(loss), [batch])


def test_integer_or_tuple_loss_is_type_error():
    model, batch, loss = _mlp_problem()
    with pytest.raises(TypeError, match="floating per-example losses, got dtype int32"):
        profile(model, lambda m, b: loss(m, b).astype(jnp.int32), [batch])
    with pytest.raises(TypeError, match="one array of per-example losses.*tuple of 2"):
        profile(model, lambda m, b: (loss(m, b), {}), [batch])


def test_single_dict_as_batches_says_wrap_in_list():
    model, batch, loss = _mlp_problem()
    with pytest.raises(TypeError, match=r"single dict .*wrap it in a list"):
        profile(model, loss, batch)
    stats = profile(model, loss, [batch])  # wrapped: fine, and equals an independent reference
    per_example = [jax.grad(lambda p, i=i: loss(nnx.merge(gd, p, rest), batch)[i])(params)
                   for gd, params, rest in [nnx.split(model, nnx.Param, ...)] for i in range(8)]
    ref = np.mean([sum(float(jnp.sum(v ** 2)) for v in jax.tree.leaves(g["layers_0"]))
                   for g in per_example])
    np.testing.assert_allclose(stats.fisher_trace[0], ref, rtol=1e-4)
