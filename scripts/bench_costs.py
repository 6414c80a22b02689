"""The cost model against measurement: whole-step memory, training FLOPs and latency per plan.

For random-init BERT models (the tiny test config and the MiniLM-L6 shape; no assets needed) and
a suite of plans (uniform LoRA r=8 on query/value, LoRA on the top k layers only, an allocated
LoRA-only plan and a mixed plan at several parameter budgets, and a plan allocated under a
whole-step VRAM budget), prints one table:

* ``mem``: the predicted whole train step (:mod:`layerlens_jax._src.step_cost`: the fixed part of
  the lowest adapted depth group + per-site ``vram_bytes``) against XLA's compiled memory analysis
  of the plan's jit train step (AdamW, ``temp + arguments + outputs - aliased``); ``f=1``: the
  ratio when every LoRA is charged its whole input (``rank1_input_fraction = 1``, not measured);
* ``flops``: the predicted training FLOPs per token against the matmul count of the train step's
  jaxpr (``2*M*N*K`` per ``dot_general``, from the shapes);
* ``lat``: the predicted unmerged inference latency (the base forward timed once by the step
  profile + per-site latency, coefficients from :func:`~layerlens_jax.calibrate_latency` on this
  device) against the
  fastest of several jit-compiled forward passes (the least disturbed on a shared machine).

Reproduce (from the repository root; ~2 minutes on 2 CPU cores)::

    python -m scripts.bench_costs                    # tiny and MiniLM-L6 shape, batch 8 x 32
    python -m scripts.bench_costs --models tiny --batch 4 --seq 16
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import layerlens_jax as ll
from layerlens_jax._src.costs import (Catalogue, option_costs,
                                      trainable_params)
from layerlens_jax._src.step_cost import (compiled_step_bytes, matmul_flops,
                                          measure_step_profile, plan_step_cost)
from layerlens_jax.models import BertClassifier, BertConfig


STEP_ALLOCATE = True


def loss_fn(model, batch):
    logits = model(batch["input_ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def _qv(layers):
    return {f"encoder/layers_{i}/attention/mha/{p}": ("lora", 8)
            for i in layers for p in ("query", "value")}


def plan_suite(sites, profile, cm, num_layers):
    """``[(name, {path: (method, size)})]``: uniform, top-k, allocated plans at several budgets."""
    u = np.random.default_rng(0).uniform(0.2, 1.0, len(sites))
    uniform = _qv(range(num_layers))
    by_path = {s.path: s for s in sites}
    params = sum(trainable_params(by_path[p], m, r) for p, (m, r) in uniform.items())
    lora = Catalogue.from_sizes(lora=(1, 2, 4, 8, 16))
    linear = [s.path for s in sites if s.kind == "linear" and "/layers_" in s.path]
    suite = [("uniform_qv_r8", uniform),
             ("all_linear_r1", {p: ("lora", 1) for p in linear}),  # the default (widest) plan
             ("ffn_r3", {p: ("lora", 3) for p in linear if "/mlp/" in p})]
    for k in sorted({1, max(1, num_layers // 2)}):
        suite.append((f"top{k}_qv_r8", _qv(range(num_layers - k, num_layers))))
    for scale in (0.5, 1.0, 2.0):
        suite.append((f"lora_plan_x{scale:g}", ll.allocate(
            sites, u, {"params": params * scale}, catalogue=lora, cost_model=cm).assignments()))
    suite.append(("mixed_plan_x1", ll.allocate(sites, u, {"params": params}, cost_model=cm,
                                               exclusive_nesting=True).assignments()))
    full = step_prediction(profile, sites, uniform, cm)["vram_bytes"]
    for frac in (0.6, 0.8) if STEP_ALLOCATE else ():
        plan = ll.allocate(sites, u, {"vram_bytes": frac * full}, catalogue=lora, cost_model=cm,
                           step_profile=profile)
        suite.append((f"vram_{int(frac * 100)}pct", plan.assignments()))
    return suite


def step_prediction(profile, sites, assignments, cm):
    options = sorted(set(assignments.values()) | {("none", 0)})
    cost = option_costs(sites, options, cm)
    rows = np.stack([cost[i, options.index(assignments.get(s.path, ("none", 0)))]
                     for i, s in enumerate(sites)])
    adapted = np.array([s.path in assignments for s in sites])
    whole = plan_step_cost(profile, sites, rows, adapted)
    return whole


def measure(model, assignments, batch, repeats=7):
    """(XLA step bytes, matmul FLOPs of the step, fastest unmerged forward seconds)."""
    m = ll.apply_plan(model, assignments, example=(batch["input_ids"],))
    step, state = ll.make_functional_train_step(m, optax.adamw(1e-3), loss_fn)
    args = (state.trainable, state.opt_state, state.other, state.step, state.frozen, batch)
    mem = compiled_step_bytes(step.jitted, *args)["step"]
    flops = matmul_flops(jax.make_jaxpr(step.jitted)(*args))
    graphdef, params = nnx.split(m)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    jax.block_until_ready(fwd(params, batch["input_ids"]))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(params, batch["input_ids"]))
        times.append(time.perf_counter() - t0)
    return mem, flops, float(np.min(times))  # the least-disturbed run on a shared machine


def bench_model(name, cfg, B, T, cm_lat):
    model = BertClassifier(cfg, rngs=nnx.Rngs(0))
    batch = {"input_ids": jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (B, T)),
                                      jnp.int32),
             "labels": jnp.zeros((B,), jnp.int32)}
    example = (batch["input_ids"],)
    t0 = time.perf_counter()
    profile = measure_step_profile(model, loss_fn, batch, example=example)
    print(f"# {name}: step profile of {len(profile.groups)} depth groups in "
          f"{time.perf_counter() - t0:.1f} s: "
          + ", ".join(f"{g} {m / 2**20:.1f} MiB" for g, m in zip(profile.groups, profile.vram_bytes)))
    sites = ll.discover_sites(model, example=example)
    cm = profile.cost_model()  # the batch shape and the measured LoRA input fraction
    print(f"# {name}: measured rank1_input_fraction {profile.rank1_input_fraction:.3f}")
    lat_cm = dataclasses.replace(cm, merge_lora=False,
                                 latency_overhead_ms=cm_lat.latency_overhead_ms,
                                 flops_per_ms=cm_lat.flops_per_ms)
    rows = []
    for plan_name, assignments in plan_suite(sites, profile, cm, cfg.num_layers):
        pred = step_prediction(profile, sites, assignments, cm)
        per_copy = step_prediction(profile, sites, assignments,  # each LoRA keeps its input
                                   dataclasses.replace(cm, rank1_input_fraction=1.0))
        lat = step_prediction(profile, sites, assignments, lat_cm)["latency"]
        mem, flops, seconds = measure(model, assignments, batch)
        rows.append((name, plan_name, len(assignments), pred["vram_bytes"], mem,
                     per_copy["vram_bytes"], pred["train_flops"], flops / (B * T), lat,
                     seconds * 1e3))
    return rows


def print_table(rows):
    print(f"{'model':6} {'plan':16} {'sites':>5} | {'mem pred':>9} {'XLA':>9} {'ratio':>6} "
          f"{'f=1':>6} | {'flops pred':>10} {'count':>10} {'ratio':>6} | {'lat pred':>8} "
          f"{'meas':>8} {'ratio':>6}")
    print("-" * 120)
    for (model, plan, n, mp, mm, ms, fp, fm, lp, lm) in rows:
        print(f"{model:6} {plan:16} {n:5d} | {mp / 2**20:8.2f}M {mm / 2**20:8.2f}M {mp / mm:6.3f} "
              f"{ms / mm:6.3f} | {fp:10.4g} {fm:10.4g} {fp / fm:6.3f} | {lp:7.3f}m "
              f"{lm:7.3f}m {lp / lm:6.3f}")
    for k, what, tol in ((3, "memory", 0.10), (6, "flops", 0.05), (8, "latency", 0.15)):
        ratios = np.array([r[k] / r[k + 1] for r in rows])
        ok = np.abs(ratios - 1) <= tol
        print(f"{what}: ratio range [{ratios.min():.3f}, {ratios.max():.3f}], within "
              f"+-{tol:.0%}: {ok.sum()}/{len(ok)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tiny", "minilm"], choices=["tiny", "minilm"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=32)
    a = p.parse_args(argv)
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}; batch {a.batch} x {a.seq}")
    t0 = time.perf_counter()
    cm_lat = ll.calibrate_latency(repeats=3)
    print(f"# latency coefficients: {cm_lat.latency_overhead_ms:.4f} ms/kernel, "
          f"{cm_lat.flops_per_ms:.3g} FLOP/ms ({time.perf_counter() - t0:.1f} s)")
    configs = {"tiny": BertConfig.tiny(max_position=max(32, a.seq)),
               "minilm": BertConfig.minilm_l6(num_labels=6)}
    rows = []
    for name in a.models:
        rows += bench_model(name, configs[name], a.batch, a.seq, cm_lat)
    print_table(rows)


if __name__ == "__main__":
    main()
