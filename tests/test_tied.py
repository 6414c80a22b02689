"""Tied embeddings, shared units, broadcast inputs and ragged batches in profile (issue 10, item 3),
against an independent per-example ``vmap(grad)`` reference; LoRA on a tied table; the package
docstring's apply_plan example (item 6)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

from layerlens_jax import apply_plan, count_trainable, merge, profile
from layerlens_jax._src.costs import trainable_params
from layerlens_jax._src.sites import discover_sites, flatten_paths

V, D, T = 11, 6, 5
RTOL = 1e-4


class TiedLM(nnx.Module):
    """A tiny LM: tied input/output embedding, a positional table looked up with ``arange(T)``
    (no example axis), one dense layer and a norm. With ``extra_uses`` the table is also used by
    an ``attend`` and a second lookup between the two ends (all four orders of lookup/attend)."""

    def __init__(self, *, extra_uses=False, pos_layout="unbatched", rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.pos = nnx.Embed(T, D, rngs=rngs)
        self.fc = nnx.Linear(D, D, rngs=rngs)
        self.norm = nnx.LayerNorm(D, rngs=rngs)
        self.extra_uses, self.pos_layout = extra_uses, pos_layout

    def __call__(self, ids, ids2=None):
        t = ids.shape[1]
        positions = jnp.arange(t) if self.pos_layout == "unbatched" else jnp.arange(t)[None]
        h = self.embed(ids) + self.pos(positions)
        if self.extra_uses:
            gate = jax.nn.softmax(self.embed.attend(jnp.tanh(h.mean(1))))  # (B, V)
            h = h + self.embed(ids2) * gate[:, :1, None]
        h = self.norm(h + jnp.tanh(self.fc(h)))
        return self.embed.attend(h)  # (B, T, V): the tied output layer


def lm_loss(model, batch):
    logits = model(batch["ids"], batch.get("ids2"))
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).sum(1)


def make_batches(sizes, seed=0, extra=False):
    rng = np.random.default_rng(seed)
    out = []
    for b in sizes:
        ids = rng.integers(0, V, (b, T)).astype(np.int32)
        ids[:, 1] = ids[:, 3]  # a repeated id inside every example
        batch = {"ids": ids, "labels": rng.integers(0, V, (b, T)).astype(np.int32)}
        if extra:
            batch["ids2"] = rng.integers(0, V, (b, T)).astype(np.int32)
        out.append(batch)
    return out


def per_example_grads(model, loss_fn, batches):
    """{parameter path: (N, ...)} per-example gradients by vmap(grad) of one-example losses."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def one(example):
        ex = jax.tree.map(lambda a: a[None], example)
        grads = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), ex)[0])(params)
        return flatten_paths(grads.to_pure_dict())

    parts = [jax.vmap(one)(b) for b in batches]
    return {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts]) for k in parts[0]}


def reference(grads, paths):
    """(grad_norm, fisher_trace) per site path from per-example gradients."""
    gn, ft = [], []
    for path in paths:
        leaves = [v.reshape(v.shape[0], -1) for k, v in grads.items()
                  if k.rpartition("/")[0] == path]
        flat = np.concatenate(leaves, axis=1)
        gn.append(np.linalg.norm(flat.mean(0)))
        ft.append(np.mean(np.sum(flat ** 2, axis=1)))
    return np.array(gn), np.array(ft)


def check_against_reference(model, loss_fn, batches):
    stats = profile(model, loss_fn, batches)
    gn, ft = reference(per_example_grads(model, loss_fn, batches), stats.paths)
    np.testing.assert_allclose(stats.fisher_trace, ft, rtol=RTOL)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=RTOL)
    return stats, ft


@pytest.mark.parametrize("extra_uses", [False, True])
def test_tied_embedding_fisher_has_the_cross_term(extra_uses):
    """Tied table (2 or 4 uses), position ids ``arange(T)`` without an example axis, in a first
    batch of B == T examples (the ids' leading axis looks like the example axis, yet is not one),
    and a smaller last batch (ragged)."""
    model = TiedLM(extra_uses=extra_uses, rngs=nnx.Rngs(0))
    batches = make_batches([T, 3], extra=extra_uses)
    stats, ft = check_against_reference(model, lm_loss, batches)
    assert stats.paths == ("embed", "fc", "norm", "pos")
    assert (stats.num_examples, stats.num_batches) == (8, 2)

    # the cross term matters: untie the table into one copy per use (same values) and sum the
    # per-use squared norms -- that is not the tied Fisher
    class Untied(TiedLM):
        def __init__(self):
            super().__init__(extra_uses=extra_uses, rngs=nnx.Rngs(0))
            self.out = nnx.Param(self.embed.embedding[...])

        def __call__(self, ids, ids2=None):
            embed = self.embed
            self.embed = _AttendOther(embed, self.out)
            try:
                return super().__call__(ids, ids2)
            finally:
                self.embed = embed

    if not extra_uses:
        g = per_example_grads(Untied(), lm_loss, batches)
        separate = np.mean(np.sum(g["embed/embedding"].reshape(8, -1) ** 2, 1)
                           + np.sum(g["out"].reshape(8, -1) ** 2, 1))
        print("tied Fisher", ft[0], "without the cross term", separate)
        assert abs(separate - ft[0]) > 5e-3 * ft[0]  # 1.5 % here


class _AttendOther(nnx.Module):
    """Looks up rows of ``embed``, attends with a separate table ``out`` (the untied twin)."""

    def __init__(self, embed, out):
        self.inner, self.out = embed, out

    def __call__(self, ids):
        return self.inner(ids)

    def attend(self, q):
        return q @ self.out[...].T


def test_singleton_broadcast_axis():
    model = TiedLM(pos_layout="singleton", rngs=nnx.Rngs(1))
    check_against_reference(model, lm_loss, make_batches([4], seed=1))


def test_dense_unit_called_twice_is_exact():
    class Twice(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(4, 4, rngs=nnx.Rngs(3))
            self.head = nnx.Linear(4, 1, rngs=nnx.Rngs(4))

        def __call__(self, x):
            return self.head(self.fc(jnp.tanh(self.fc(x))))[..., 0]

    rng = np.random.default_rng(3)
    batches = [rng.normal(size=(5, 3, 4)).astype(np.float32) for _ in range(2)]
    check_against_reference(Twice(), lambda m, x: jnp.sum(m(x) ** 2, axis=1), batches)


def test_unit_without_cross_rule_called_twice_is_refused():
    class NormTwice(nnx.Module):
        def __init__(self):
            self.norm = nnx.LayerNorm(4, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.norm(self.norm(x) * 2.0)

    with pytest.raises(NotImplementedError, match=r"'norm' is called 2 times"):
        profile(NormTwice(), lambda m, x: m(x).sum((1, 2)), [np.ones((3, 2, 4), np.float32)])


def test_flattened_example_axis_is_refused_naming_the_unit():
    class Flat(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(4, 1, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.fc(x.reshape(-1, 4)).reshape(x.shape[0], -1)

    with pytest.raises(ValueError, match=r"'fc'.*neither the example axis nor independent"):
        profile(Flat(), lambda m, x: m(x).sum(1), [np.ones((3, 2, 4), np.float32)])


def test_linen_tied_embedding_matches_reference():
    class LinenTied(nn.Module):
        @nn.compact
        def __call__(self, ids):
            embed = nn.Embed(V, D, name="embed")
            h = embed(ids) + nn.Embed(T, D, name="pos")(jnp.arange(ids.shape[1]))
            h = h + jnp.tanh(nn.Dense(D, name="fc")(h))
            return embed.attend(h)

    module = LinenTied()
    batches = make_batches([3, 3], seed=4)
    variables = module.init(jax.random.key(0), batches[0]["ids"])

    def loss(v, b):
        return optax.softmax_cross_entropy_with_integer_labels(
            module.apply(v, b["ids"]), b["labels"]).sum(1)

    stats = profile(module, loss, batches, variables=variables,
                    sites=discover_sites(module, variables, example=batches[0]["ids"]))

    def one(example):
        ex = jax.tree.map(lambda a: a[None], example)
        grads = jax.grad(lambda p: loss({"params": p}, ex)[0])(variables["params"])
        return flatten_paths(grads)

    grads = {k: np.concatenate([np.asarray(jax.vmap(one)(b)[k], np.float64) for b in batches])
             for k in flatten_paths(variables["params"])}
    gn, ft = reference(grads, stats.paths)
    np.testing.assert_allclose(stats.fisher_trace, ft, rtol=RTOL)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=RTOL)


# --------------------------------------------------------------------- LoRA on the tied table


def test_lora_on_tied_table_is_consistent_in_both_uses():
    model = TiedLM(rngs=nnx.Rngs(5))
    ids = make_batches([2], seed=5)[0]["ids"]
    site = next(s for s in discover_sites(model, example=ids) if s.path == "embed")
    wrapped = apply_plan(model, {"embed": ("lora", 2)})
    assert count_trainable(wrapped) == trainable_params(site, "lora", 2) == 2 * (V + D)
    rng = np.random.default_rng(5)
    wrapped.embed.peft_lora_b[...] = jnp.asarray(rng.normal(size=(2, D)), jnp.float32)
    # independent reference: the base model with its table replaced by E + scale * A B
    a, b = wrapped.embed.peft_lora_a[...], wrapped.embed.peft_lora_b[...]
    reference_model = nnx.clone(model)
    reference_model.embed.embedding[...] = (model.embed.embedding[...]
                                            + wrapped.embed.scale * np.asarray(a) @ np.asarray(b))
    want = reference_model(ids)
    np.testing.assert_allclose(wrapped(ids), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(model(ids), want, atol=1e-3)  # the delta is visible in the output
    np.testing.assert_allclose(merge(wrapped)(ids), want, rtol=1e-5, atol=1e-5)


class LinenTiedLM(nn.Module):
    @nn.compact
    def __call__(self, ids):
        embed = nn.Embed(V, D, name="embed")
        h = embed(ids)
        return embed.attend(h + jnp.tanh(nn.Dense(D, name="fc")(h)))


def test_linen_lora_on_tied_table_is_consistent_in_both_uses():
    from layerlens_jax import init_adapters

    module = LinenTiedLM()
    ids = make_batches([2], seed=6)[0]["ids"]
    base = module.init(jax.random.key(0), ids)
    wrapped = apply_plan(module, {"embed": ("lora", 2)}, lora_alpha=4.0)
    variables = init_adapters(wrapped, jax.random.key(1), base, ids)
    emb = variables["params"]["embed"]
    assert count_trainable(variables) == 2 * (V + D)
    b = jnp.asarray(np.random.default_rng(6).normal(size=(2, D)), jnp.float32)
    variables = {"params": {**variables["params"], "embed": {**emb, "peft_lora_b": b}}}
    table = base["params"]["embed"]["embedding"] + (4.0 / 2) * emb["peft_lora_a"] @ b
    want = module.apply({"params": {**base["params"], "embed": {"embedding": table}}}, ids)
    np.testing.assert_allclose(wrapped.apply(variables, ids), want, rtol=1e-5, atol=1e-5)
    assert not np.allclose(module.apply(base, ids), want, atol=1e-3)
    bare, merged = merge(wrapped, variables)
    np.testing.assert_allclose(bare.apply(merged, ids), want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ item 6: the package docstring


def test_package_docstring_flow_runs_with_adapters():
    """The data flow in ``layerlens_jax.__doc__`` runs as written, for a plan with adapters."""
    import layerlens_jax
    from layerlens_jax import BertClassifier, BertConfig

    doc = layerlens_jax.__doc__
    code = doc[doc.index("::") + 2: doc.index("(``loss_fn(model, batch)``")]
    cfg = BertConfig.tiny(num_layers=1)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(1, cfg.vocab_size, (4, 6)).astype(np.int32),
             "attention_mask": np.ones((4, 6), np.int32),
             "labels": rng.integers(0, cfg.num_labels, (4,)).astype(np.int32)}

    def loss_fn(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(
            m(b["input_ids"], b["attention_mask"]), b["labels"])

    ns = {**vars(layerlens_jax), "optax": optax, "loss_fn": loss_fn, "batch": batch,
          "batches": [batch], "model": BertClassifier(cfg, rngs=nnx.Rngs(0))}
    lines = [ln.split("  #")[0].strip() for ln in code.strip().splitlines()]
    lines = [ln for ln in lines if ln]
    assert len(lines) == 9 and lines[4].startswith("model = apply_plan(")
    for line in lines[:4]:  # as written: sites, profile, utility, allocate
        exec(line, ns)
    assert ns["plan"].assignments()
    # the rest as written, with a plan that has an adapter (apply_plan needs example=) and a LoRA
    ns["plan"] = {"encoder/layers_0/attention": ("adapter", 2), "classifier": ("lora", 1)}
    for line in lines[4:8]:
        exec(line, ns)
    assert np.isfinite(float(ns["metrics"]["loss"]))
    trained = ns["model"]
    assert count_trainable(trained) == (2 * 16 * 2 + 2 + 16) + (16 + 3)
    exec(lines[8], ns)
    np.testing.assert_allclose(ns["model"](batch["input_ids"], batch["attention_mask"]),
                               trained(batch["input_ids"], batch["attention_mask"]), atol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
def test_tied_embedding_lora_flops_equal_the_matmul_count(tied):
    """Discovery records the attend use of a tied table (``Site.attend_tokens``); the cost model's
    unmerged forward FLOPs of its LoRA equal the matmuls the wrapped model adds (plus the scale-
    and-add terms the matmul count leaves out): the lookup's ``A[ids] @ B`` and, tied, the
    output layer's ``(h @ B.T) @ A.T``."""
    import dataclasses as dc

    from layerlens_jax._src.costs import CostModel, site_option_cost
    from layerlens_jax._src.train import matmul_flops
    from layerlens_jax.decoder import Decoder, DecoderConfig

    model = Decoder(dc.replace(DecoderConfig.tiny(), tie_embeddings=tied), rngs=nnx.Rngs(0))
    batch, seq, rank = 2, 10, 4
    ids = jnp.zeros((batch, seq), jnp.int32)
    site = next(s for s in discover_sites(model, example=(ids,)) if s.kind == "embedding")
    assert site.attend_tokens == (seq if tied else None)

    def flops(m):
        graphdef, state = nnx.split(m)
        return matmul_flops(lambda s: nnx.merge(graphdef, s)(ids), state)

    added = flops(apply_plan(model, {site.path: ("lora", rank)})) - flops(model)
    vocab, width = site.in_features, site.out_features
    per_token = site_option_cost(site, "lora", rank,
                                 CostModel(merge_lora=False, seq_len=seq))["infer_flops"]
    adds = seq * 2 * width + (seq * 2 * vocab if tied else 0)  # scale-and-add, per example
    assert per_token * seq * batch - batch * adds == pytest.approx(added)
    assert added == batch * seq * (2 * rank * width + (2 * rank * (vocab + width) if tied else 0))
