"""Probe utility: per-site first-order loss decrease of probe adapters, against a plain Python
loop over optax and per-site string matching."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import layerlens_jax as ll
from layerlens_jax._src.methods import METHOD_KINDS
from layerlens_jax._src.peft.apply import apply_plan
from layerlens_jax._src.peft.nnx_modules import PEFT_FILTER
from layerlens_jax._src.probe import probe_utility
from layerlens_jax._src.sites import flatten_paths
from layerlens_jax.models import BertClassifier, BertConfig

CFG = BertConfig.tiny()


def _batches(n=3, b=4, t=8, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(1, CFG.vocab_size, (b, t)).astype(np.int32)
        out.append({"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(ids),
                    "labels": jnp.asarray(rng.integers(0, CFG.num_labels, b))})
    return out


def loss_fn(m, b):
    logits = m(b["input_ids"], b["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"])


def _reference(model, sites, batches, tx, rank):
    """The same probe, step by step in Python: grads and updates as flat {"a/b/peft_x": array},
    each leaf credited to the site whose path precedes ``/peft_``."""
    lora = [s for s in sites if s.kind in METHOD_KINDS["lora"]]
    wrapped = apply_plan(model, {s.path: ("lora", rank) for s in lora})
    params = nnx.state(wrapped, PEFT_FILTER)
    opt_state = tx.init(params)
    total = {s.path: 0.0 for s in sites}
    for batch in batches:
        grads = nnx.grad(lambda m: loss_fn(m, batch).mean(),
                         argnums=nnx.DiffState(0, PEFT_FILTER))(wrapped)
        updates, opt_state = tx.update(grads, opt_state, params)
        g, u = flatten_paths(grads.to_pure_dict()), flatten_paths(updates.to_pure_dict())
        for leaf in g:
            site = leaf[:leaf.index("/peft_")]
            total[site] -= float(np.vdot(np.asarray(g[leaf], np.float64),
                                         np.asarray(u[leaf], np.float64)))
        params = optax.apply_updates(params, updates)
        nnx.update(wrapped, params)
    return np.array([total[s.path] for s in sites])


@pytest.mark.parametrize("tx, rank", [(optax.sgd(0.5), 1), (optax.adam(1e-2), 2)])
def test_probe_contributions_match_a_python_loop(tx, rank):
    model = BertClassifier(CFG, rngs=nnx.Rngs(0))
    batches = _batches()
    sites = ll.discover_sites(model, example=(batches[0]["input_ids"],))
    got = probe_utility(model, loss_fn, batches, sites, tx, steps=3, rank=rank)
    want = _reference(model, sites, batches, tx, rank)
    np.testing.assert_allclose(got.contribution, want, rtol=2e-3, atol=1e-9)
    assert got.probed.sum() > 10 and np.all(got.contribution[~got.probed] == 0)
    # every probed site of the attention (query, key, value, out) is credited on its own path
    value = [i for i, s in enumerate(sites) if s.path.endswith("mha/value")]
    assert all(got.contribution[i] != 0 for i in value)
    assert got.losses.shape == (3,) and np.isfinite(got.losses).all()
    assert np.all(got.utility >= 0)
    # the model itself is untouched (the probe adapts a clone)
    assert ll.count_trainable(model) == 0


def test_probe_with_sgd_credits_lr_times_squared_gradient_norms():
    """With SGD u = -lr g, so one step credits each site lr * |g|^2 exactly."""
    model = BertClassifier(CFG, rngs=nnx.Rngs(1))
    batches = _batches(1)
    sites = ll.discover_sites(model, example=(batches[0]["input_ids"],))
    lr = 0.25
    got = probe_utility(model, loss_fn, batches, sites, optax.sgd(lr), steps=1)
    wrapped = apply_plan(model, {s.path: ("lora", 1) for s in sites
                                 if s.kind in METHOD_KINDS["lora"]})
    grads = flatten_paths(nnx.grad(lambda m: loss_fn(m, batches[0]).mean(),
                                   argnums=nnx.DiffState(0, PEFT_FILTER))(wrapped).to_pure_dict())
    for i, s in enumerate(sites):
        sq = sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for k, v in grads.items()
                 if k.startswith(s.path + "/peft_"))
        assert got.contribution[i] == pytest.approx(lr * sq, rel=1e-4, abs=1e-12)


def test_probe_refuses_bad_input():
    model = BertClassifier(CFG, rngs=nnx.Rngs(0))
    batches = _batches(2)
    sites = ll.discover_sites(model, example=(batches[0]["input_ids"],))
    with pytest.raises(ValueError, match="batches ran out after 2"):
        probe_utility(model, loss_fn, batches, sites, optax.sgd(0.1), steps=3)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        probe_utility(model, loss_fn, batches, sites, optax.sgd(0.1), steps=0)
    norms = [s for s in sites if s.kind == "norm"]
    with pytest.raises(ValueError, match="no site of a LoRA kind"):
        probe_utility(model, loss_fn, batches, norms, optax.sgd(0.1), steps=1)
