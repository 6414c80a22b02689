"""LoRA's backward on XLA:CPU: the token-major factor-gradient products of ``lora_delta`` against
the plain form ``(x @ a) @ b`` (whose autodiff contracts the token axis of both operands, a dot
that XLA:CPU leaves out of its fast matmul library), in the default job's configuration
(MiniLM-L6 shape, random init, batch 32 x 32, AdamW), interleaved repeats, median.

    python scripts/bench_lora_backward.py
"""
import statistics, time, sys, dataclasses as dc
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from layerlens_jax import BertClassifier, apply_plan, discover_sites
from layerlens_jax.app.pretrained import read_bert_config
from layerlens_jax._src.peft import functional as F, PEFT_FILTER
import layerlens_jax._src.peft.targets as T_
from layerlens_jax._src.train import make_functional_train_step
new = F.lora_delta
def plain(x, a, b, scale, *, dtype=None, precision=None):
    x, a, b = F._promote(x, a, b, dtype=dtype)
    return jnp.matmul(jnp.matmul(x, a, precision=precision), b, precision=precision) * jnp.asarray(scale, x.dtype)
cfg = read_bert_config(num_labels=6); model = BertClassifier(cfg, rngs=nnx.Rngs(0))
B, T = 32, 32; rng = np.random.default_rng(0)
batch = {"input_ids": rng.integers(1, 30000, (B, T)).astype(np.int32), "attention_mask": np.ones((B, T), np.int32), "labels": rng.integers(0, 6, (B,)).astype(np.int32)}
sites = discover_sites(model, example=batch["input_ids"])
loss = lambda m, b: optax.softmax_cross_entropy_with_integer_labels(m(b["input_ids"], b["attention_mask"]), b["labels"]).mean()
enc = [s for s in sites if s.path.startswith("encoder") and s.kind == "linear"]
plans = {"qv r8": {s.path: ("lora", 8) for s in enc if s.path.endswith(("query", "value"))},
         "ffn r3": {s.path: ("lora", 3) for s in enc if s.path.endswith(("intermediate", "output"))},
         "all r1": {s.path: ("lora", 1) for s in enc}}
steps = {}
for name, plan in plans.items():
    for impl, fn in (("plain", plain), ("token-major", new)):
        F.lora_delta = fn
        for k, v in list(T_.LORA_KINDS.items()):
            if getattr(v, "delta", None) in (plain, new): T_.LORA_KINDS[k] = dc.replace(v, delta=fn)
        m = apply_plan(model, plan, example={"args": (batch["input_ids"],), "kwargs": {"attention_mask": batch["attention_mask"]}})
        step, state = make_functional_train_step(m, optax.adamw(1e-3), loss, wrt=PEFT_FILTER)
        state, met = step(state, batch); jax.block_until_ready(met["loss"])
        steps[(name, impl)] = [step, state]
times = {k: [] for k in steps}
for _ in range(9):
    for k, v in steps.items():
        t = time.perf_counter(); v[1], met = v[0](v[1], batch); jax.block_until_ready(met["loss"]); times[k].append(time.perf_counter() - t)
print("| plan | plain ms | token-major ms | ratio |\n|---|---:|---:|---:|")
for name in plans:
    p, n = statistics.median(times[(name, "plain")]), statistics.median(times[(name, "token-major")])
    print(f"| {name} | {p*1e3:.0f} | {n*1e3:.0f} | {n/p:.2f}x |")
