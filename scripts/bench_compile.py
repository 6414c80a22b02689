"""First-call (compile included) and repeat-call time of ``allocate`` and ``apply_plan``.

The MiniLM-L6 shape (``BertConfig.minilm_l6()``, random init), a utility per site drawn at random,
a parameter budget of 1 % of the model. Each stage is timed on its first call in a fresh process
(so JAX's in-memory compile caches are cold; the persistent compilation cache is off unless you
enable it) and on a repeat call with a different utility (same shapes). Goal: first calls
<= 2 s on a 2-core CPU.

    python scripts/bench_compile.py            # ~20-40 s on 2 CPU cores
    python scripts/bench_compile.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from layerlens_jax import BertClassifier, BertConfig, allocate, apply_plan, discover_sites  # noqa: E402


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree.leaves(nnx.state(out)) if isinstance(out, nnx.Module) else 0)
    return out, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="repeat calls to time")
    parser.add_argument("--budget-fraction", type=float, default=0.01,
                        help="parameter budget as a fraction of the model's parameters")
    args = parser.parse_args()

    t0 = time.perf_counter()
    model = BertClassifier(BertConfig.minilm_l6(), rngs=nnx.Rngs(0))
    example = jnp.ones((2, 16), jnp.int32)
    sites = discover_sites(model, example=example)
    setup = time.perf_counter() - t0
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    budgets = {"params": args.budget_fraction * n_params}
    rng = np.random.default_rng(0)

    rows = []
    for call in range(1 + args.repeats):
        u = rng.uniform(0.05, 1.0, size=len(sites))
        plan, t_alloc = _timed(lambda: allocate(sites, u, budgets))
        _, t_apply = _timed(lambda: apply_plan(model, plan, sites=sites))
        rows.append((call, t_alloc, t_apply, len(plan.assignments())))

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__}, {jax.devices()[0].platform}; MiniLM-L6 shape, "
          f"{len(sites)} sites, budget params={budgets['params']:.0f}; setup {setup:.1f}s")
    print(f"{'call':>8} {'allocate s':>11} {'apply_plan s':>13} {'sites adapted':>14}")
    for call, t_alloc, t_apply, n in rows:
        name = "first" if call == 0 else f"repeat{call}"
        print(f"{name:>8} {t_alloc:>11.2f} {t_apply:>13.2f} {n:>14}")


if __name__ == "__main__":
    main()
