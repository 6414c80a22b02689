"""Measure the seed's utility checks on the reference model with real data.

Profiles the pretrained MiniLM-L6 encoder (+ a fresh classifier head) on real TREC-6 / movie-review
training batches and prints, for several utility configurations, the coefficient of variation and
the Pearson r of the utility with gradient norms and with Fisher traces (targets: >= 0.2, >= 0.90,
>= 0.95).

    python scripts/utility_targets.py --task trec6 --batches 4 --batch-size 16
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import optax

from layerlens_jax.app.data import encode_split, iterate_batches, load_task
from layerlens_jax.app.pretrained import load_pretrained_bert, load_tokenizer
from layerlens_jax._src.profile import profile
from layerlens_jax._src.utility import UtilityConfig, utility, utility_report

CONFIGS = {
    "default (0.75 F + 0.25 |g|^2)": UtilityConfig(),
    "fisher only": UtilityConfig(fisher_weight=1.0, grad_weight=0.0),
    "grad only": UtilityConfig(fisher_weight=0.0, grad_weight=1.0),
    "0.5 F + 0.5 |g|^2": UtilityConfig(fisher_weight=0.5, grad_weight=0.5),
    "per-param default": UtilityConfig(per_param=True),
    "sqrt default": UtilityConfig(transform="sqrt"),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", default="trec6")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    data = load_task(args.task, seed=args.seed)
    model = load_pretrained_bert(num_labels=len(data.label_names), seed=args.seed)
    tok = load_tokenizer(max_length=args.max_length)
    arrays = encode_split(data.train, tok, args.max_length)

    def loss(m, b):
        return optax.softmax_cross_entropy_with_integer_labels(
            m(b["input_ids"], b["attention_mask"], b["token_type_ids"]), b["labels"])

    t0 = time.perf_counter()
    stats = profile(model, loss, iterate_batches(arrays, args.batch_size, seed=args.seed),
                    max_batches=args.batches)
    print(f"profiled {len(stats.sites)} sites on {stats.num_examples} {args.task} examples "
          f"in {time.perf_counter() - t0:.1f}s")
    print("| utility | CV | r(grad_norm) | r(fisher) | pass |")
    print("|---|---:|---:|---:|---|")
    for name, cfg in CONFIGS.items():
        rep = utility_report(stats, utility(stats, cfg))
        print(f"| {name} | {rep.cv:.3f} | {rep.grad_corr:.3f} | {rep.fisher_corr:.3f} | "
              f"{'yes' if rep.passed else 'no'} |")
    u = utility(stats)
    top = np.argsort(-u)[:8]
    print("top sites by default utility:", ", ".join(f"{stats.sites[i].path}={u[i]:.3f}" for i in top))
    print(f"reproduce: python scripts/utility_targets.py --task {args.task} --batches {args.batches} "
          f"--batch-size {args.batch_size}")


if __name__ == "__main__":
    main()
