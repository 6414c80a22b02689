"""Masked training: base weights bit-for-bit unchanged, adapters trained, loss decreases."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from layerlens_jax.models import (BertClassifier, BertConfig, LinenBertClassifier, MLP,
                                  nnx_params_as_linen)
from layerlens_jax._src.peft import (BASE_FILTER, PEFT_FILTER, apply_plan, count_trainable,
                                init_adapters, optax_labels, partition_params)
from layerlens_jax._src.train import (linen_variables, make_functional_train_step,
                                 make_linen_train_step, make_optimizer, make_train_step, masked_tx,
                                 matmul_flops, reduce_loss, write_back)

CFG = BertConfig.tiny()
L0 = "encoder/layers_0"
PLAN = {f"{L0}/attention/mha/query": ("lora", 2), f"{L0}/attention/mha": ("prefix", 2),
        f"{L0}/mlp": ("adapter", 3), "encoder/layers_1/mlp/output": ("lora", 2),
        "embeddings/word": ("lora", 2)}
STEPS = 6


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, CFG.vocab_size, (8, 6)), jnp.int32)
    mask = jnp.asarray(np.where(np.arange(6)[None] < rng.integers(3, 7, (8, 1)), 1, 0), jnp.int32)
    labels = jnp.asarray(rng.integers(0, CFG.num_labels, (8,)), jnp.int32)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_example_loss(model, batch):  # the same function serves NNX models and bound Linen ones
    logits = model(batch["input_ids"], batch["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def bits(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def nnx_run(batch):
    """STEPS steps of make_train_step (nnx.jit) from a fresh wrapped model."""
    model = apply_plan(BertClassifier(CFG, rngs=nnx.Rngs(0)), PLAN, example=(
        batch["input_ids"], batch["attention_mask"]))
    initial = nnx.clone(model)
    opt = make_optimizer(model, optax.adam(3e-2))
    step = make_train_step(per_example_loss)
    losses = [float(step(model, opt, batch)["loss"]) for _ in range(STEPS)]
    return initial, model, opt, losses


def test_nnx_train_step_base_bit_identical(nnx_run):
    initial, model, opt, losses = nnx_run
    base_before = bits(nnx.state(initial, BASE_FILTER))
    peft_before = bits(nnx.state(initial, PEFT_FILTER))
    assert losses[-1] < losses[0]
    assert bits(nnx.state(model, BASE_FILTER)) == base_before
    after = bits(nnx.state(model, PEFT_FILTER))
    assert sum(a != b for a, b in zip(after, peft_before)) == len(after)  # every leaf moved
    # optimizer state covers exactly the adapter parameters (adam: mu and nu)
    n_opt = sum(x.size for x in jax.tree.leaves(opt.opt_state) if x.ndim)
    assert n_opt == 2 * count_trainable(model)


def test_functional_step_matches_nnx_step(batch, nnx_run):
    initial, m2, _, ref = nnx_run
    m1 = nnx.clone(initial)
    base_before = bits(nnx.state(m1, BASE_FILTER))
    tx = optax.adam(3e-2)
    step, state = make_functional_train_step(m1, tx, per_example_loss)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == STEPS and losses[-1] < losses[0]
    write_back(m1, state)
    assert bits(nnx.state(m1, BASE_FILTER)) == base_before
    np.testing.assert_allclose(losses, ref, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(nnx.state(m1, PEFT_FILTER)),
                    jax.tree.leaves(nnx.state(m2, PEFT_FILTER))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_plain_nnx_optimizer_on_lora_param_filter():
    """Training code written for nnx (wrt=nnx.LoRAParam) trains our adapters unchanged."""
    model = apply_plan(MLP((4, 8, 2), rngs=nnx.Rngs(0)), {"layers_0": ("lora", 2),
                                                           "layers_1": ("lora", 1)},
                       lora_alpha=1.0)
    base_before = bits(nnx.state(model, BASE_FILTER))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
    x, y = jnp.ones((5, 4)), jnp.zeros((5, 2))

    @nnx.jit
    def train(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y - 1.0) ** 2),
                                         argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        opt.update(model, grads)
        return loss

    l0 = train(model, opt)
    for _ in range(3):
        l1 = train(model, opt)
    assert l1 < l0 and bits(nnx.state(model, BASE_FILTER)) == base_before


def test_full_finetune_via_wrt_param():
    model = MLP((4, 8, 2), rngs=nnx.Rngs(0))
    before = bits(nnx.state(model, nnx.Param))
    opt = make_optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    step = make_train_step(lambda m, b: jnp.mean((m(b) - 1.0) ** 2), wrt=nnx.Param)
    step(model, opt, jnp.ones((3, 4)))
    assert bits(nnx.state(model, nnx.Param)) != before


def test_linen_train_step_base_bit_identical(batch):
    nnx_model = BertClassifier(CFG, rngs=nnx.Rngs(0))
    linen_model = LinenBertClassifier(CFG)
    wrapped = apply_plan(linen_model, PLAN)
    variables = init_adapters(wrapped, jax.random.key(0), nnx_params_as_linen(nnx_model),
                              batch["input_ids"], batch["attention_mask"])
    _, base = partition_params(variables["params"])
    base_before = bits(base)
    step, state = make_linen_train_step(wrapped, variables, optax.adam(3e-2), per_example_loss)
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    out = linen_variables(state)
    assert bits(partition_params(out["params"])[1]) == base_before
    assert count_trainable(out) == count_trainable(variables)
    # the same run compiled with XLA's default options: same losses to float32 round-off
    step0, state0 = make_linen_train_step(wrapped, variables, optax.adam(3e-2), per_example_loss,
                                          compiler_options=None)
    assert step0.compiler_options is None
    losses0 = []
    for _ in range(STEPS):
        state0, metrics = step0(state0, batch)
        losses0.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, losses0, rtol=1e-5)


def test_masked_tx_and_labels():
    params = {"dense": {"kernel": jnp.ones((2, 2)), "peft_lora_a": jnp.ones((2, 1)),
                        "peft_lora_b": jnp.zeros((1, 2))}}
    labels = optax_labels(params)
    assert labels == {"dense": {"kernel": "frozen", "peft_lora_a": "trainable",
                                "peft_lora_b": "trainable"}}
    tx = masked_tx(optax.sgd(1.0), params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["dense"]["kernel"], params["dense"]["kernel"])
    assert not np.array_equal(new["dense"]["peft_lora_a"], params["dense"]["peft_lora_a"])


def test_reduce_loss():
    loss, aux = reduce_loss(jnp.array([1.0, 3.0]))
    assert float(loss) == 2.0 and aux is None
    loss, aux = reduce_loss((jnp.array(5.0), {"acc": 1}), has_aux=True)
    assert float(loss) == 5.0 and aux == {"acc": 1}
    with pytest.raises(TypeError, match="floating"):
        reduce_loss(jnp.array([1, 2]))


@pytest.mark.parametrize("factory", ["nnx", "functional"])
def test_train_step_rejects_tuple_without_has_aux_and_integer_loss(factory):
    model = apply_plan(MLP((4, 8, 2), rngs=nnx.Rngs(0)), {"layers_0": ("lora", 2)})
    batch = {"x": jnp.ones((3, 4)), "y": jnp.zeros((3, 2))}

    def mse(m, b):
        return jnp.mean((m(b["x"]) - b["y"]) ** 2, axis=-1)

    def build(loss_fn, has_aux=False):
        if factory == "nnx":
            step = make_train_step(loss_fn, has_aux=has_aux)
            opt = make_optimizer(model, optax.sgd(0.1))
            return lambda: step(model, opt, batch)
        step, state = make_functional_train_step(model, optax.sgd(0.1), loss_fn, has_aux=has_aux,
                                                 donate=False)
        return lambda: step(state, batch)[1]

    with pytest.raises(TypeError, match="has_aux=True"):
        build(lambda m, b: (mse(m, b), {"n": 3}))()
    with pytest.raises(TypeError, match="floating loss, got dtype int32"):
        build(lambda m, b: mse(m, b).astype(jnp.int32))()
    with pytest.raises(TypeError, match="has_aux=True.*pair"):
        build(mse, has_aux=True)()
    expected = float(np.mean((np.asarray(model(batch["x"])) - 0.0) ** 2))  # loss before the step
    metrics = build(lambda m, b: (mse(m, b), {"n": 3}), has_aux=True)()
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert int(metrics["aux"]["n"]) == 3


# ------------------------------------------------------------------------- the pipeline loop


def _tiny_prepared(steps: int, eval_every: int):
    from test_pipeline import _fake_prepared  # the random tiny encoder on random token ids
    return _fake_prepared(**{"train.steps": steps, "train.eval_every": eval_every})


def _reference_loop(prep, variant, plan, seed):
    """The training loop as it was before prefetching: numpy batches of ``iterate_batches``
    epoch after epoch (drop_remainder), every step's loss kept, the mean of the last eval_every
    losses at each curve point."""
    from layerlens_jax.app import pipeline
    from layerlens_jax.app.data import iterate_batches

    cfg = prep.cfg
    model, wrt = pipeline.build_variant(prep, variant, plan, seed)
    tx = optax.adamw(pipeline._schedule(cfg, pipeline._lr(cfg, variant)),
                     weight_decay=cfg.train.weight_decay)
    step, state = make_functional_train_step(model, tx, pipeline._mean_loss, wrt=wrt)
    batches = (b for epoch in range(100) for b in iterate_batches(
        prep.arrays["train"], cfg.data.batch_size, seed=seed, epoch=epoch, drop_remainder=True))
    losses, means = [], []
    for i, batch in zip(range(cfg.train.steps), batches):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
        if (i + 1) % cfg.train.eval_every == 0 or i + 1 == cfg.train.steps:
            means.append(float(np.mean(jax.device_get(losses[-cfg.train.eval_every:]))))
    write_back(model, state)
    return means, model


@pytest.mark.parametrize("variant", ["uniform_lora", "full"])
def test_pipeline_loop_bit_identical_to_plain_loop(variant):
    """The prefetching loop of train_variant gives the same curve losses and the same trained
    parameters, bit for bit, as a plain loop over host batches (7 steps over 2-batch epochs; the
    last curve window overlaps the previous one)."""
    from layerlens_jax._src.plan import Plan, uniform_assignments
    from layerlens_jax.app.pipeline import adaptable_sites, train_variant

    prep = _tiny_prepared(steps=7, eval_every=3)
    plan = None
    if variant != "full":
        sites = adaptable_sites(prep.build_model(0), prep)
        plan = Plan.from_assignments(sites, uniform_assignments(sites, "lora", 2,
                                                                ("query", "value")))
    means, ref_model = _reference_loop(prep, variant, plan, seed=3)
    r = train_variant(prep, variant, plan, 3, progress=False, keep_model=True)
    assert [p.step for p in r.curve] == [3, 6, 7]
    assert [p.train_loss for p in r.curve] == means
    assert bits(nnx.state(r.model, nnx.Param)) == bits(nnx.state(ref_model, nnx.Param))


# ---------------------------------------------------------------------------------- work


def test_matmul_flops_of_lora_and_full_steps_match_the_shape_formula():
    """Matmul work of a train step from the traced shapes, against the hand count for a tiny
    encoder at batch 8 x 6 tokens: H=16, FFN 32, 2 layers, 2 heads, 3 classes."""
    b, t, h, f, layers, c, r = 8, 6, 16, 32, 2, 3, 2
    n = b * t
    ids = jnp.ones((b, t), jnp.int32)
    data = {"input_ids": ids, "attention_mask": jnp.ones_like(ids),
            "labels": jnp.zeros((b,), jnp.int32)}
    dense_layer = 4 * h * h + 2 * h * f  # q, k, v, o + FFN in / out kernels of one layer
    attention_layer = 2 * (2 * b * t * t * h)  # scores Q K^T and probabilities x V
    forward = layers * (2 * n * dense_layer + attention_layer) + 2 * b * (h * h + h * c)
    # full fine-tuning: forward, input gradients of everything above the embeddings, and a
    # weight gradient per kernel (the same work as the forward matmuls)
    full_model = BertClassifier(CFG, rngs=nnx.Rngs(0))
    step, s = make_functional_train_step(full_model, optax.sgd(0.1), per_example_loss,
                                         wrt=nnx.Param, donate=False)
    full = matmul_flops(step.jitted, s.trainable, s.opt_state, s.other, s.step, s.frozen, data)
    assert full == 3 * forward
    # LoRA r on query of layer 0 only: forward + the factors' work; input gradients only where
    # the factors lie below (layer 0 from its query up, all of layer 1, the head); no kernel
    # weight gradient at all
    model = apply_plan(BertClassifier(CFG, rngs=nnx.Rngs(0)),
                       {f"{L0}/attention/mha/query": ("lora", r)})
    step, s = make_functional_train_step(model, optax.sgd(0.1), per_example_loss, donate=False)
    lora = matmul_flops(step.jitted, s.trainable, s.opt_state, s.other, s.step, s.frozen, data)
    attention_matmul = 2 * b * t * t * h
    factors = 2 * n * r * h * 2 + 3 * (2 * n * r * h)  # x A, (x A) B; dB, d(x A), dA
    layer0_back = 2 * attention_matmul + 2 * n * (h * h + 2 * h * f)  # dQ, dP; out, FFN
    layer1_back = 2 * n * dense_layer + 2 * attention_layer  # every input gradient
    head_back = 2 * b * (h * h + h * c)
    assert lora == forward + factors + layer0_back + layer1_back + head_back


def test_peft_step_compile_options_on_cpu_same_training_and_nestable(batch):
    """A PEFT step on CPU compiles with CPU_PEFT_COMPILER_OPTIONS (no YNNPACK fusions) and trains
    like the step with XLA's defaults (same losses and adapters to float32 round-off); its
    ``jitted`` stays usable inside other transformations (compile options are top-level only);
    a full fine-tuning step keeps the defaults."""
    from layerlens_jax._src.train import (CPU_PEFT_COMPILER_OPTIONS, _cpu_option_supported,
                                          default_compiler_options)

    if jax.default_backend() != "cpu" or not all(
            _cpu_option_supported(k, v) for k, v in CPU_PEFT_COMPILER_OPTIONS.items()):
        pytest.skip("the option is XLA:CPU's")
    runs = {}
    for options in ("auto", None):
        model = apply_plan(BertClassifier(CFG, rngs=nnx.Rngs(0)), PLAN, example=(
            batch["input_ids"], batch["attention_mask"]))
        step, state = make_functional_train_step(model, optax.adam(3e-2), per_example_loss,
                                                 compiler_options=options)
        losses = []
        for _ in range(STEPS):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        runs[options] = (step, state, losses)
    assert runs["auto"][0].compiler_options == CPU_PEFT_COMPILER_OPTIONS
    assert runs[None][0].compiler_options is None
    np.testing.assert_allclose(runs["auto"][2], runs[None][2], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(runs["auto"][1].trainable),
                    jax.tree.leaves(runs[None][1].trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    s = runs["auto"][1]
    assert matmul_flops(runs["auto"][0].jitted, s.trainable, s.opt_state, s.other, s.step,
                        s.frozen, batch) > 0  # traced inside make_jaxpr: no nested-jit error
    full = BertClassifier(CFG, rngs=nnx.Rngs(0))
    assert default_compiler_options(nnx.state(full, nnx.Param), {}) is None
    step, _ = make_functional_train_step(full, optax.adam(1e-3), per_example_loss, wrt=nnx.Param)
    assert step.compiler_options is None


def test_stacked_runs_train_like_separate_runs(batch):
    """Three runs (own adapters / head init, own batches) over one frozen base in one vmapped step
    give each run's separate losses and trained state to float32 round-off; the base is kept once
    (a different base per run is stacked: test_pipeline's train_seeds test, random encoders)."""
    from layerlens_jax._src.train import stack_train_states, unstack_train_state

    rng = np.random.default_rng(1)
    batches = [[{**batch, "labels": jnp.asarray(rng.integers(0, CFG.num_labels, (8,)), jnp.int32)}
                for _ in range(STEPS)] for _ in range(3)]

    def fresh(seed):
        base = BertClassifier(CFG, rngs=nnx.Rngs(0))  # one base and head; adapters of the seed
        model = apply_plan(base, PLAN, example=(batch["input_ids"], batch["attention_mask"]),
                           seed=seed)
        return make_functional_train_step(model, optax.adam(3e-2), per_example_loss,
                                          wrt=nnx.Any(PEFT_FILTER, nnx.PathContains("classifier")))

    separate = []
    for seed in range(3):
        step, state = fresh(seed)
        losses = []
        for b in batches[seed]:
            state, m = step(state, b)
            losses.append(float(m["loss"]))
        separate.append((losses, state))
    steps_states = [fresh(seed) for seed in range(3)]
    run, state = stack_train_states(steps_states[0][0], [s for _, s in steps_states])
    assert run.share_frozen and run.runs == 3
    losses = []
    for k in range(STEPS):
        state, m = run(state, jax.tree.map(lambda *xs: jnp.stack(xs), *[b[k] for b in batches]))
        assert m["loss"].shape == (3,)
        losses.append(np.asarray(m["loss"]))
    for i, (ref_losses, ref_state) in enumerate(separate):
        np.testing.assert_allclose(np.array(losses)[:, i], ref_losses, rtol=2e-5)
        mine = unstack_train_state(state, i, share_frozen=run.share_frozen)
        assert int(mine.step) == STEPS
        for a, b in zip(jax.tree.leaves(mine.trainable), jax.tree.leaves(ref_state.trainable)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam amplifies round-off
    assert len(separate[0][0]) == STEPS and separate[0][0] != separate[1][0]  # runs differ
