"""Benchmark profile() against a plain training step and a naive vmap(grad) profiler.

For a model shape (``--config``: MiniLM-L6 by default, BERT-large, or a Llama-style decoder;
random weights) at sequence length 128, for each batch size prints, measured in ONE run on the
current device:

* profile / step:  time of one compiled profile step (gradients + per-example exact Fisher traces
  of every site) / time of one plain jitted ``value_and_grad`` of the mean loss (goal <= 1.3x);
* naive / profile: time of a naive profiler (``vmap(grad)`` per-example gradients of the whole
  model, then per-site squared norms) / time of the profile step (goal >= 5x at batch 64);
* memory: XLA's buffer assignment of each compiled function (temporaries + outputs, from
  ``compiled.memory_analysis()``), and memory ratio naive / profile (goal >= 10x at batch 64).

Times are the median of ``--repeats`` interleaved calls after one warm-up (compile) call each.

    python scripts/bench_profile.py                       # batches 8 32 64, seq 128
    python scripts/bench_profile.py --batch-sizes 8 --seq 32 --repeats 3   # quick
    python scripts/bench_profile.py --config bert_large --batch-sizes 4 --seq 64
    python scripts/bench_profile.py --config decoder --batch-sizes 8 --seq 64
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from layerlens_jax.models import BertClassifier, BertConfig
from layerlens_jax._src.profile import ProfileStep
from layerlens_jax._src.sites import flatten_paths as _flat


def classifier_loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def decoder_loss(model, batch):
    """Per-example next-token cross-entropy over the real (unpadded) positions."""
    logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["input_ids"][:, 1:])
    w = batch["attention_mask"][:, 1:].astype(nll.dtype)
    return (nll * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0)


def make_model(name: str):
    """``(model, loss_fn, description)`` of one benchmark shape (random weights)."""
    from layerlens_jax.decoder import Decoder, DecoderConfig

    if name == "minilm":
        cfg = BertConfig.minilm_l6()
        return BertClassifier(cfg, rngs=nnx.Rngs(0)), classifier_loss, cfg, "MiniLM-L6 shape"
    if name == "bert_large":
        cfg = BertConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
        return BertClassifier(cfg, rngs=nnx.Rngs(0)), classifier_loss, cfg, "BERT-large shape"
    cfg = DecoderConfig(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8,
                        num_kv_heads=4, intermediate_size=1536)
    return Decoder(cfg, rngs=nnx.Rngs(0)), decoder_loss, cfg, "Llama-style decoder (GQA, SwiGLU)"


def make_batch(cfg, b, t, seed=0):
    rng = np.random.default_rng(seed)
    am = np.ones((b, t), np.int32)
    lengths = rng.integers(t // 2, t + 1, size=b)
    am[np.arange(t)[None, :] >= lengths[:, None]] = 0
    return {"input_ids": rng.integers(0, cfg.vocab_size, (b, t)).astype(np.int32),
            "attention_mask": am,
            "labels": rng.integers(0, getattr(cfg, "num_labels", 2), (b,)).astype(np.int32),
            "example_mask": np.ones((b,), np.float32)}


def timed_interleaved(calls: dict, repeats: int) -> dict:
    """Median seconds per call; the calls alternate (ABCABC...) so that load from other processes
    on a shared machine hits all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def mem_bytes(lowered) -> float:
    m = lowered.compile().memory_analysis()
    if m is None:
        return float("nan")
    return float(m.temp_size_in_bytes + m.output_size_in_bytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-naive-above", type=int, default=1 << 30,
                    help="skip the naive profiler above this batch size (memory)")
    ap.add_argument("--config", choices=["minilm", "bert_large", "decoder"], default="minilm",
                    help="model shape (random weights): MiniLM-L6, BERT-large, or a Llama-style "
                         "decoder (8 layers, width 512, GQA, SwiGLU, 32k vocabulary)")
    args = ap.parse_args()

    model, loss_fn, cfg, what = make_model(args.config)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), "
          f"{platform.processor() or platform.machine()}; jax {jax.__version__}")
    print(f"model: {what}, {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.1f} M "
          f"params; seq {args.seq}")

    @jax.jit
    def plain_step(params, batch):
        def mean_loss(p):
            losses = loss_fn(nnx.merge(graphdef, p, rest), batch)
            return jnp.sum(losses * batch["example_mask"]) / jnp.sum(batch["example_mask"])
        return jax.value_and_grad(mean_loss)(params)

    rows = []
    for b in args.batch_sizes:
        batch = jax.device_put(make_batch(cfg, b, args.seq))
        step = ProfileStep(model, loss_fn, batch)
        leaf_paths = list(_flat(params.to_pure_dict()).keys())
        site_leaf = jnp.asarray(step.site_leaf, jnp.float32)

        @jax.jit
        def naive(params, batch):
            def one(ex):
                ex = jax.tree.map(lambda a: a[None], ex)
                return jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), ex)[0])(params)
            per_ex = _flat(jax.vmap(one)(batch).to_pure_dict())
            leaf_sq = jnp.stack([jnp.sum(jnp.square(per_ex[p]).reshape(b, -1), axis=1)
                                 for p in leaf_paths], axis=1)  # (B, leaves)
            return (leaf_sq * batch["example_mask"][:, None]).sum(0) @ site_leaf.T

        calls = {"plain": (plain_step, (params, batch)), "profile": (step, (batch,))}
        with_naive = b <= args.skip_naive_above
        if with_naive:
            calls["naive"] = (naive, (params, batch))
        t = timed_interleaved(calls, args.repeats)
        t_plain, t_prof = t["plain"], t["profile"]
        m_plain = mem_bytes(plain_step.lower(params, batch))
        m_prof = mem_bytes(step.lower(batch))
        if with_naive:
            t_naive = t["naive"]
            m_naive = mem_bytes(naive.lower(params, batch))
            # the naive and the ghost-norm Fisher traces agree
            _, fisher, *_ = step(batch)
            ref = np.asarray(naive(params, batch))
            err = float(np.max(np.abs(np.asarray(fisher) - ref) / np.maximum(np.abs(ref), 1e-30)))
        else:
            t_naive = m_naive = err = float("nan")
        rows.append((b, t_plain, t_prof, t_naive, m_plain, m_prof, m_naive, err))
        print(f"  batch {b}: step {t_plain*1e3:.1f} ms, profile {t_prof*1e3:.1f} ms, "
              f"naive {t_naive*1e3:.1f} ms", flush=True)

    print()
    print("| batch | step ms | profile ms | profile/step | naive ms | naive/profile | step MiB | "
          "profile MiB | naive MiB | naive mem/profile mem | max rel. diff naive vs profile |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = 1 / 2**20
    for b, tp, tr, tn, mp, mr, mn, err in rows:
        print(f"| {b} | {tp*1e3:.1f} | {tr*1e3:.1f} | {tr/tp:.2f}x | {tn*1e3:.1f} | {tn/tr:.1f}x | "
              f"{mp*mib:.0f} | {mr*mib:.0f} | {mn*mib:.0f} | {mn/mr:.1f}x | {err:.1e} |")
    print(f"\nreproduce: python scripts/bench_profile.py --config {args.config} --batch-sizes "
          f"{' '.join(map(str, args.batch_sizes))} --seq {args.seq} --repeats {args.repeats}")


if __name__ == "__main__":
    main()
