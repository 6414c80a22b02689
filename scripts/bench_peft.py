#!/usr/bin/env python
"""Benchmark the PEFT modules on the realistic reference config (all-MiniLM-L6-v2 shape).

Prints, from one run:

1. train-step time of our ``LoRA``-wrapped model / the same ranks with ``nnx.LoRALinear``
   (LoRA on every ``nnx.Linear`` of the encoder, the sites ``nnx.LoRALinear`` can replace;
   goal <= 1.05x);
2. merged-model inference / base-model inference (goal <= 1.02x);
3. train-step time and peak memory of LoRA / Adapter / Prefix / mixed vs full fine-tuning.

All train steps use the same jit-compiled factory (``make_functional_train_step``, donated
state), AdamW, softmax cross-entropy. Timings interleave the variants being compared (A B A B ...)
and report medians, so a noisy host affects both sides alike. "Peak memory" is XLA's compiled
memory analysis of the step (arguments + outputs + temporaries - aliased), the number a device
would need; on CPU no allocator high-water mark is available. "GFLOP" is XLA's cost analysis of
the compiled step (deterministic, unlike wall time on a shared host).

Reproduce:  python scripts/bench_peft.py            (CPU, ~3-6 min)
            python scripts/bench_peft.py --batch 32 --seq 128 --repeats 20   (on a GPU)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from layerlens_jax.models import BertClassifier, BertConfig  # noqa: E402
from layerlens_jax._src.peft import apply_plan, merge  # noqa: E402
from layerlens_jax._src.sites import discover_sites, get_submodule, set_submodule  # noqa: E402
from layerlens_jax._src.train import make_functional_train_step  # noqa: E402


def loss_fn(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def make_batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, (b, 1))
    return {"input_ids": jnp.asarray(rng.integers(1, cfg.vocab_size, (b, t)), jnp.int32),
            "attention_mask": jnp.asarray(np.arange(t)[None] < lengths, jnp.int32),
            "labels": jnp.asarray(rng.integers(0, cfg.num_labels, (b,)), jnp.int32)}


def with_nnx_lora_linear(model, paths, rank):
    """The same model with each listed nnx.Linear replaced by nnx.LoRALinear (base copied)."""
    m = nnx.clone(model)
    for path in paths:
        lin = get_submodule(m, path)
        new = nnx.LoRALinear(lin.in_features, lin.out_features, lora_rank=rank, rngs=nnx.Rngs(0),
                             kernel_init=nnx.initializers.zeros)
        new.kernel[...] = lin.kernel[...]
        new.bias[...] = lin.bias[...]
        set_submodule(m, path, new)
    return m


class Stepper:
    """A compiled train step with its state; ``run()`` does one step and blocks."""

    def __init__(self, model, wrt, batch, lr=1e-4):
        self.step, self.state = make_functional_train_step(model, optax.adamw(lr), loss_fn,
                                                           wrt=wrt)
        self.batch = batch
        j = self.step.jitted
        s = self.state
        compiled = j.lower(s.trainable, s.opt_state, s.other, s.step, s.frozen, batch).compile()
        cost = compiled.cost_analysis()
        cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
        self.gflops = cost.get("flops", float("nan")) / 1e9
        mem = compiled.memory_analysis()
        self.peak_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                           + mem.temp_size_in_bytes - mem.alias_size_in_bytes) if mem else None
        self.trainable = sum(x.size for x in jax.tree.leaves(s.trainable))
        self.run()  # warm-up (and first-call dispatch)

    def run(self):
        t = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state.trainable, metrics["loss"]))
        return time.perf_counter() - t


class Inference:
    def __init__(self, model, batch):
        graphdef, state = nnx.split(model)
        self.state, self.batch = state, batch
        self.fn = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b["input_ids"], b["attention_mask"]))
        jax.block_until_ready(self.fn(state, batch))

    def run(self):
        t = time.perf_counter()
        jax.block_until_ready(self.fn(self.state, self.batch))
        return time.perf_counter() - t


def interleaved(runners, repeats):
    times = [[] for _ in runners]
    for _ in range(repeats):
        for i, r in enumerate(runners):
            times[i].append(r.run())
    return [statistics.median(t) for t in times]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--bottleneck", type=int, default=64)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--infer-repeats", type=int, default=30)
    args = ap.parse_args(argv)

    cfg = BertConfig.minilm_l6()
    model = BertClassifier(cfg, rngs=nnx.Rngs(0))
    batch = make_batch(cfg, args.batch, args.seq)
    example = (batch["input_ids"], batch["attention_mask"])
    sites = discover_sites(model, example=example)
    by_kind = lambda k: [s.path for s in sites if s.kind == k]  # noqa: E731
    dense = [s.path for s in sites if s.module_type == "Linear" and s.path.startswith("encoder")]
    r = args.rank
    print(f"# bench_peft: BertConfig.minilm_l6() ({sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))):,} params), "
          f"batch {args.batch} x seq {args.seq}, device {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}, {args.repeats} interleaved repeats (median)")

    rows = []
    # 1. ours vs nnx.LoRALinear on the same sites and ranks
    ours = apply_plan(model, {p: ("lora", r) for p in dense})
    theirs = with_nnx_lora_linear(model, dense, r)
    s_ours, s_nnx = Stepper(ours, nnx.LoRAParam, batch), Stepper(theirs, nnx.LoRAParam, batch)
    assert s_ours.trainable == s_nnx.trainable, (s_ours.trainable, s_nnx.trainable)
    t_ours, t_nnx = interleaved([s_ours, s_nnx], args.repeats)
    rows.append(("train step: LoRA (ours) / nnx.LoRALinear", f"{len(dense)} Linear sites, r={r}",
                 t_ours / t_nnx, "<= 1.05", f"{t_ours * 1e3:.1f} / {t_nnx * 1e3:.1f} ms"))
    del s_ours, s_nnx

    # 2. merged inference vs base inference (LoRA on every linear site, merged)
    all_linear = by_kind("linear")
    wrapped = apply_plan(model, {p: ("lora", r) for p in all_linear})
    merged = merge(wrapped)
    i_base, i_merged, i_wrapped = (Inference(m, batch) for m in (model, merged, wrapped))
    tb, tm, tw = interleaved([i_base, i_merged, i_wrapped], args.infer_repeats)
    rows.append(("inference: merged / base", f"LoRA r={r} on all {len(all_linear)} linear sites",
                 tm / tb, "<= 1.02", f"{tm * 1e3:.2f} / {tb * 1e3:.2f} ms"))
    rows.append(("inference: unmerged / base", "(for reference)", tw / tb, "",
                  f"{tw * 1e3:.2f} / {tb * 1e3:.2f} ms"))
    del i_base, i_merged, i_wrapped

    # 3. each method vs full fine-tuning
    plans = {
        f"LoRA r={r}, all {len(all_linear)} linear": {p: ("lora", r) for p in all_linear},
        f"Adapter b={args.bottleneck}, all {len(by_kind('block'))} blocks":
            {p: ("adapter", args.bottleneck) for p in by_kind("block")},
        f"Prefix p={args.prefix}, all {len(by_kind('attention'))} attention":
            {p: ("prefix", args.prefix) for p in by_kind("attention")},
        "mixed (LoRA q,v + FFN adapters + prefix)": {
            **{p: ("lora", r) for p in all_linear if p.endswith(("query", "value"))},
            **{p: ("adapter", args.bottleneck) for p in by_kind("block") if p.endswith("mlp")},
            **{p: ("prefix", args.prefix) for p in by_kind("attention")}},
    }
    steppers = {"full fine-tuning": Stepper(model, nnx.Param, batch)}
    for name, plan in plans.items():
        steppers[name] = Stepper(apply_plan(model, plan, sites=sites), nnx.LoRAParam, batch)
    times = dict(zip(steppers, interleaved(list(steppers.values()), args.repeats)))
    full = steppers["full fine-tuning"]
    method_rows = []
    for name, st in steppers.items():
        method_rows.append((name, st.trainable, times[name] * 1e3,
                            times[name] / times["full fine-tuning"], st.gflops,
                            st.peak_bytes / 2**20, st.peak_bytes / full.peak_bytes))

    print("\n| comparison | setting | ratio | goal | times |")
    print("|---|---|---|---|---|")
    for name, setting, ratio, goal, detail in rows:
        print(f"| {name} | {setting} | {ratio:.3f}x | {goal} | {detail} |")
    print("\n| method | trainable params | step ms | step / full FT | step GFLOP (XLA) | peak MiB "
          "| peak / full FT |")
    print("|---|---|---|---|---|---|---|")
    for name, n, ms, rt, gf, mib, rm in method_rows:
        print(f"| {name} | {n:,} | {ms:.1f} | {rt:.3f}x | {gf:.1f} | {mib:.1f} | {rm:.3f}x |")
    cmd = "python scripts/bench_peft.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v != ap.get_default(k))
    print(f"\nreproduce: {cmd}")


if __name__ == "__main__":
    main()
