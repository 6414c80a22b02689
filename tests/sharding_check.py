"""Multi-device check, run in its own process by tests/test_sharding.py (8 simulated CPU devices).

Profile, allocate, apply and train the tiny BERT twice in one process: once on one device, once
with its kernels sharded over a ``(data=2, fsdp=2, model=2)`` mesh (FSDP on the input axes,
Megatron-style tensor parallelism on the feed-forward and attention heads) and batches sharded
over ``("data", "fsdp")``. Asserts that per-site statistics, the plan and the training losses
agree, and that new adapters follow the base kernels' shardings. Prints ``SHARDING OK`` at the end.

Usage: ``python tests/sharding_check.py`` (sets ``XLA_FLAGS`` itself before importing jax).
"""

from __future__ import annotations

import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from layerlens_jax import (BertClassifier, BertConfig, LoRA, allocate, apply_plan,  # noqa: E402
                           make_functional_train_step, profile, utility)

# Tolerances: the sharded run reduces in a different order (partial sums per device, then
# all-reduce), so float32 results agree to rounding, not bit for bit.
STATS_RTOL = 1e-5
LOSS_RTOL = 1e-5

# The base layout under test: path suffix -> spec of that kernel (the rest replicated).
BASE_LAYOUT = {
    "word/embedding": P("fsdp", None),  # (50, 16): FSDP over the vocabulary
    "query/kernel": P("fsdp", "model", None),  # (16, heads, head_dim): heads tensor-parallel
    "key/kernel": P("fsdp", "model", None),
    "value/kernel": P("fsdp", "model", None),
    "out/kernel": P("model", None, "fsdp"),  # (heads, head_dim, 16): row-parallel
    "intermediate/kernel": P("fsdp", "model"),  # (16, 32): column-parallel
    "output/kernel": P("model", "fsdp"),  # (32, 16): row-parallel
    "pooler/kernel": P("fsdp", None),  # (16, 16): FSDP only
}

# Expected LoRA factor specs, written out by hand from qwix's rule (A: first sharded input axis,
# rank replicated; B: rank replicated, first sharded output axis).
EXPECTED_LORA = {
    "embeddings/word": (P("fsdp", None), P(None, None)),
    "encoder/layers_0/attention/mha/query": (P("fsdp", None), P(None, "model")),
    "encoder/layers_0/attention/mha/out": (P("model", None), P(None, "fsdp")),
    "encoder/layers_1/mlp/intermediate": (P("fsdp", None), P(None, "model")),
    "encoder/layers_1/mlp/output": (P("model", None), P(None, "fsdp")),
    "pooler": (P("fsdp", None), P(None, None)),
    "classifier": (P(None, None), P(None, None)),  # a replicated kernel: replicated factors
}


def make_model() -> BertClassifier:
    return BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))


def shard_model(model: BertClassifier, mesh) -> None:
    """Put every parameter on ``mesh``: kernels by BASE_LAYOUT, the rest replicated."""
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            name = "/".join(str(p) for p in path)
            spec = next((s for k, s in BASE_LAYOUT.items() if name.endswith(k)), P())
            var.set_value(jax.device_put(var.get_value(), NamedSharding(mesh, spec)))


def make_batches(n_batches=3, batch=8, seq=8):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n_batches):
        mask = np.ones((batch, seq), np.int32)
        mask[:, seq - 2:] = rng.integers(0, 2, size=(batch, 2))
        out.append({"input_ids": rng.integers(0, 50, size=(batch, seq)).astype(np.int32),
                    "attention_mask": mask,
                    "labels": rng.integers(0, 3, size=(batch,)).astype(np.int32)})
    return out


def loss_fn(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def spec(x) -> P:
    return x.sharding.spec


def check_adapter_shardings(mesh) -> None:
    model = make_model()
    shard_model(model, mesh)
    plan = {path: ("lora", 2) for path in EXPECTED_LORA}
    plan["encoder/layers_0/mlp"] = ("adapter", 4)
    plan["encoder/layers_1/attention/mha"] = ("prefix", 3)
    wrapped = apply_plan(model, plan, example=jnp.ones((2, 8), jnp.int32))
    for path, (a_spec, b_spec) in EXPECTED_LORA.items():
        lora = wrapped
        for part in path.split("/"):
            lora = getattr(lora, part)
        a, b = lora.peft_lora_a[...], lora.peft_lora_b[...]
        assert a.sharding.mesh == mesh and b.sharding.mesh == mesh, path
        assert (spec(a), spec(b)) == (a_spec, b_spec), (path, spec(a), spec(b))
    adapter = wrapped.encoder.layers_0.mlp
    for name in ("peft_adapter_down", "peft_adapter_up", "peft_adapter_up_bias"):
        arr = getattr(adapter, name)[...]
        assert arr.sharding.mesh == mesh and spec(arr) == P(), (name, arr.sharding)
    prefix = wrapped.encoder.layers_1.attention.mha.attention_fn
    assert spec(prefix.peft_prefix_key[...]) == P(None, "model", None)
    assert spec(prefix.peft_prefix_value[...]) == P(None, "model", None)
    print("adapter shardings: LoRA (FSDP + tensor-parallel), adapter (replicated), "
          "prefix (heads) ok")


def check_flax_metadata(mesh) -> None:
    """A model annotated with nnx.with_partitioning: the factors carry matching metadata."""
    init = nnx.initializers.lecun_normal()
    with jax.set_mesh(mesh):
        base = nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ("fsdp", "model")),
                          rngs=nnx.Rngs(0))
    lora = LoRA(base, 4, rngs=nnx.Rngs(1))
    specs = nnx.get_partition_spec(nnx.state(lora, nnx.LoRAParam))
    assert specs["peft_lora_a"].get_value() == P("fsdp", None), specs
    assert specs["peft_lora_b"].get_value() == P(None, "model"), specs
    assert spec(lora.peft_lora_a[...]) == P("fsdp", None)
    assert spec(lora.peft_lora_b[...]) == P(None, "model")
    print("flax partitioning metadata: ok")


def check_stacked(mesh) -> None:
    """Layers stacked under nnx.vmap, the layer axis unsharded: it stays the factors' first axis."""
    @nnx.split_rngs(splits=4)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return nnx.Linear(16, 32, rngs=rngs)

    stack = create(nnx.Rngs(0))
    stack.kernel.set_value(jax.device_put(stack.kernel.get_value(),
                                          NamedSharding(mesh, P("data", "fsdp", "model"))))
    lora = LoRA(stack, 2, rngs=nnx.Rngs(1))
    assert spec(lora.peft_lora_a[...]) == P("data", "fsdp", None)
    assert spec(lora.peft_lora_b[...]) == P("data", None, "model")
    print("stacked layers: ok")


def run_pipeline(mesh):
    """Profile, allocate, apply, train 4 steps; ``mesh=None``: everything on one device."""
    t0 = time.perf_counter()
    model = make_model()
    batches = make_batches()
    if mesh is not None:
        shard_model(model, mesh)
        data = NamedSharding(mesh, P(("data", "fsdp")))
        batches = [jax.device_put(b, data) for b in batches]
    stats = profile(model, loss_fn, batches)
    t1 = time.perf_counter()
    plan = allocate(stats.sites, utility(stats), {"params": 600})
    t2 = time.perf_counter()
    wrapped = apply_plan(model, plan, example=batches[0]["input_ids"])
    t3 = time.perf_counter()
    step, state = make_functional_train_step(wrapped, optax.adam(1e-2), loss_fn)
    losses = []
    for _ in range(4):  # one batch: the loss must fall
        state, metrics = step(state, batches[0])
        losses.append(float(metrics["loss"]))
    print(f"  {'mesh' if mesh else '1 device'}: profile {t1 - t0:.1f}s, allocate {t2 - t1:.1f}s, "
          f"apply {t3 - t2:.1f}s, train {time.perf_counter() - t3:.1f}s")
    return stats, plan, losses, state


def check_pipeline(mesh) -> None:
    stats1, plan1, losses1, _ = run_pipeline(None)
    stats8, plan8, losses8, state8 = run_pipeline(mesh)
    assert stats1.paths == stats8.paths
    np.testing.assert_allclose(stats8.fisher_trace, stats1.fisher_trace, rtol=STATS_RTOL)
    np.testing.assert_allclose(stats8.grad_norm, stats1.grad_norm, rtol=STATS_RTOL)
    assert (stats8.num_examples, stats8.num_tokens) == (stats1.num_examples, stats1.num_tokens)
    assert plan8.assignments() == plan1.assignments(), (plan8.assignments(), plan1.assignments())
    assert any(m == "lora" for m, _ in plan1.assignments().values()), plan1.assignments()
    np.testing.assert_allclose(losses8, losses1, rtol=LOSS_RTOL)
    assert losses1[-1] < losses1[0], losses1  # training moved
    on_mesh = [x for x in jax.tree.leaves(state8.trainable) if len(x.sharding.device_set) == 8]
    assert on_mesh and len(on_mesh) == len(jax.tree.leaves(state8.trainable))
    max_rel = np.max(np.abs(stats8.fisher_trace / stats1.fisher_trace - 1))
    print(f"pipeline: {len(stats1.paths)} sites, max rel. Fisher-trace difference {max_rel:.2e}, "
          f"plan {len(plan1.assignments())} sites equal, losses {np.round(losses8, 5).tolist()} "
          f"vs {np.round(losses1, 5).tolist()}")


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    # Auto axes: XLA's SPMD partitioner propagates the shardings (GSPMD), unannotated models run
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "model"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    check_adapter_shardings(mesh)
    check_flax_metadata(mesh)
    check_stacked(mesh)
    check_pipeline(mesh)
    print("SHARDING OK")


if __name__ == "__main__":
    main()
