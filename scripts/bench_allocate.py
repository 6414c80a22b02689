"""Benchmark of the XLA allocator against the exact MILP (scipy HiGHS).

Prints, in one run:

1. quality: objective / MILP optimum on random 200-site instances with 3 budgets (params,
   vram_bytes, latency) set at the use of a random reference assignment, so that several bind
   (goal: median >= 99.5 %; min reported), with the certified gap of the dual bound;
2. speed: allocator time after compile at 1 000 and 10 000 sites x ~100 options x 4 budgets
   (goal <= 50 ms at 10 000 on this CPU), the MILP time at 1 000 sites and the speed ratio
   (goal >= 100x).

Reproduce with::

    python scripts/bench_allocate.py            # defaults below, ~4 minutes on 2 CPU cores
    python scripts/bench_allocate.py --instances 10 --milp-time-limit 300   # tighter MILP reference
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from layerlens_jax._src.costs import Catalogue, CostModel  # noqa: E402
from layerlens_jax._src.exact import solve_exact  # noqa: E402
from layerlens_jax._src.instances import PRIOR_GAIN  # noqa: E402
from layerlens_jax._src.problem import build_problem  # noqa: E402
from layerlens_jax._src.sites import Site  # noqa: E402
from layerlens_jax._src.solver import lagrangian_allocate  # noqa: E402

# ~100 options per site: none + 64 LoRA ranks + 18 adapter bottlenecks + 17 prefix lengths
CATALOGUE = Catalogue.from_sizes(
    cap_sizes=True,
    lora=tuple(range(1, 65)),
    adapter=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512),
    prefix=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512),
)


def random_sites(n: int, rng: np.random.Generator) -> list[Site]:
    """Synthetic transformer-like sites: linear (various shapes), block, attention, embedding, norm."""
    widths = np.array([256, 384, 512, 768, 1024])
    kinds = rng.choice(["linear", "linear", "linear", "linear", "block", "attention", "embedding",
                        "norm"], size=n)
    sites = []
    for i, kind in enumerate(kinds):
        d = int(rng.choice(widths))
        tokens = int(rng.choice([128, 128, 128, 1]))
        if kind == "linear":
            fin, fout = (d, 4 * d) if rng.random() < 0.3 else (d, d)
            sites.append(Site(f"s{i}", "linear", "Linear", {"kernel": (fin, fout)}, fin * fout,
                              fin, fout, tokens_per_example=tokens))
        elif kind == "block":
            sites.append(Site(f"s{i}", "block", "Block", {}, 0, d, d, tokens_per_example=tokens))
        elif kind == "attention":
            h = int(rng.choice([4, 8, 16]))
            sites.append(Site(f"s{i}", "attention", "MultiHeadAttention", {}, 4 * d * d, d, d,
                              num_heads=h, head_dim=d // h, tokens_per_example=tokens))
        elif kind == "embedding":
            v = int(rng.choice([512, 8192, 30522]))
            sites.append(Site(f"s{i}", "embedding", "Embed", {"embedding": (v, d)}, v * d, v, d,
                              tokens_per_example=tokens))
        else:
            sites.append(Site(f"s{i}", "norm", "LayerNorm", {"scale": (d,)}, d, d, d,
                              tokens_per_example=tokens))
    return sites


def random_problem(n: int, resources: tuple[str, ...], seed: int, fraction: float = 0.35):
    """The solver benchmark's instance family, gains from the prior gain model (fixed apart from the
    calibrated defaults). Budgets = use of a random assignment (each adaptable site adapted with
    prob. ``fraction`` at a random size), so all budgets are of the same tightness and several bind."""
    rng = np.random.default_rng(seed)
    sites = random_sites(n, rng)
    utility = rng.beta(0.7, 1.5, size=n)
    utility /= utility.max()
    big = {r: 1e30 for r in resources}
    p = build_problem(sites, utility, big, catalogue=CATALOGUE, cost_model=CostModel(batch_size=8),
                      gain_model=PRIOR_GAIN)
    S, O = p.mask.shape
    ref = np.zeros(S, int)
    for s in range(S):
        allowed = np.flatnonzero(p.mask[s, 1:]) + 1
        if len(allowed) and rng.random() < fraction:
            ref[s] = rng.choice(allowed)
    c = p.cost_rso
    budgets = {r: float(c[k, np.arange(S), ref].sum()) for k, r in enumerate(p.resources)}
    return build_problem(sites, utility, budgets, catalogue=CATALOGUE,
                         cost_model=CostModel(batch_size=8), gain_model=PRIOR_GAIN)


@contextlib.contextmanager
def quiet_stdout():
    """HiGHS prints solver chatter straight to file descriptor 1: silence it for the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def exact(p, time_limit):
    with quiet_stdout():
        return solve_exact(p.gain, p.cost_rso, p.mask, p.budget, time_limit=time_limit)


def device(p):
    return (jnp.asarray(p.gain, jnp.float32), jnp.asarray(p.cost_rso, jnp.float32),
            jnp.asarray(p.mask), jnp.asarray(p.budget, jnp.float32), jnp.asarray(p.group, jnp.int32))


def time_solver(args, repeats: int) -> float:
    sol = lagrangian_allocate(*args)
    jax.block_until_ready(sol)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(lagrangian_allocate(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=5, help="random 200-site instances")
    ap.add_argument("--sites", type=int, default=200)
    ap.add_argument("--speed-sites", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--milp-time-limit", type=float, default=30.0,
                    help="per MILP solve; a solve that hits it is counted in the table")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nesting-instances", type=int, default=30,
                    help="tiny-BERT instances for exclusive nesting vs its MILP (0: skip)")
    a = ap.parse_args(argv)

    print(f"# bench_allocate  (jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()})")
    print(f"options per site: {len(CATALOGUE.options())} in the matrix (none + "
          + " + ".join(f"{len(m.sizes)} {m.name}" for m in CATALOGUE.methods) + ")\n")

    three = ("params", "vram_bytes", "latency")
    ratios, vs_bound, gaps, bindings, t_alloc, t_milp, limited = [], [], [], [], [], [], 0
    for i in range(a.instances):
        p = random_problem(a.sites, three, a.seed + i)
        args = device(p)
        sol = jax.device_get(lagrangian_allocate(*args))
        t_alloc.append(time_solver(args, 3))
        t0 = time.perf_counter()
        choice, opt, bound, msg = exact(p, a.milp_time_limit)
        t_milp.append(time.perf_counter() - t0)
        limited += "time limit" in msg.lower()
        obj = float(p.gain[np.arange(len(choice)), np.asarray(sol.choice)].sum())
        use = p.cost_rso[:, np.arange(len(choice)), np.asarray(sol.choice)].sum(1)
        assert np.all(use <= p.budget * (1 + 1e-9)), "budget exceeded"
        ratios.append(obj / opt)
        vs_bound.append(obj / bound)
        gaps.append((float(sol.dual_bound) - obj) / float(sol.dual_bound))
        mu = p.cost_rso[:, np.arange(len(choice)), choice].sum(1) / p.budget
        bindings.append(int(np.sum(mu >= 0.99)))
    ratios = np.array(ratios)
    print(f"## Quality: {a.instances} random instances, {a.sites} sites, 3 budgets {three}\n")
    print("| metric | value | goal |")
    print("|---|---|---|")
    print(f"| objective / MILP optimum, median | {100 * np.median(ratios):.3f} % | >= 99.5 % |")
    print(f"| objective / MILP optimum, min | {100 * ratios.min():.3f} % | |")
    print(f"| objective / MILP dual bound (a lower bound on the ratio to the true optimum), "
          f"median / min | {100 * np.median(vs_bound):.3f} % / {100 * np.min(vs_bound):.3f} % | |")
    print(f"| certified gap (dual bound - objective) / bound, median | {100 * np.median(gaps):.3f} % | |")
    print(f"| budgets binding at the MILP optimum (>= 99 % used), mean | {np.mean(bindings):.1f} of 3 | |")
    print(f"| allocator time, median | {1e3 * np.median(t_alloc):.2f} ms | |")
    print(f"| MILP time, median | {1e3 * np.median(t_milp):.0f} ms | |")
    print(f"| MILP solves stopped by the time limit (optimum = its incumbent) | {limited} | |\n")

    four = ("params", "train_flops", "vram_bytes", "latency")
    print(f"## Speed: 4 budgets {four}, {len(CATALOGUE.options())} options, after compile "
          f"(median of {a.repeats})\n")
    print("| sites | allocator | objective / dual bound | MILP | speed ratio |")
    print("|---|---|---|---|---|")
    for n in a.speed_sites:
        p = random_problem(n, four, a.seed + 1000 + n)
        args = device(p)
        t = time_solver(args, a.repeats)
        sol = jax.device_get(lagrangian_allocate(*args))
        ratio = float(sol.objective) / float(sol.dual_bound)
        milp = ratio_s = "—"
        if n <= 1000:
            t0 = time.perf_counter()
            _, opt, _, msg = exact(p, a.milp_time_limit)
            tm = time.perf_counter() - t0
            milp = f"{tm:.2f} s (obj ratio {100 * float(sol.objective) / opt:.3f} %)"
            ratio_s = f"{tm / t:,.0f}x"
        print(f"| {n} | {1e3 * t:.1f} ms | {100 * ratio:.3f} % | {milp} | {ratio_s} |")
    if a.nesting_instances:
        nesting_quality(a.nesting_instances, a.seed)
    print("\nreproduce: python scripts/bench_allocate.py " + " ".join(argv or sys.argv[1:]))


def nesting_quality(instances: int, seed: int) -> None:
    """``allocate(exclusive_nesting=True)`` against ``allocate_exact(exclusive_nesting=True)`` on
    the tiny BERT's nested sites, blocks scored with the sum of their layers' utilities."""
    from layerlens_jax._src.allocate import allocate
    from layerlens_jax._src.exact import allocate_exact
    from layerlens_jax._src.instances import NESTING_CATALOGUE, nesting_instance, tiny_bert_sites
    from layerlens_jax._src.nesting import nested_conflicts

    sites = tiny_bert_sites()
    cat = NESTING_CATALOGUE
    ratios, conflicts_free = [], []
    for i in range(instances):
        u, budgets = nesting_instance(sites, seed + i)
        conflicts_free.append(len(nested_conflicts(allocate(sites, u, budgets, catalogue=cat))))
        with quiet_stdout():
            plan = allocate(sites, u, budgets, catalogue=cat, exclusive_nesting=True)
            exact_plan = allocate_exact(sites, u, budgets, catalogue=cat, exclusive_nesting=True)
        assert not nested_conflicts(plan)
        ratios.append(plan.objective / exact_plan.objective)
    r = np.array(ratios)
    print(f"\n## Exclusive nesting: {instances} tiny-BERT instances, {len(sites)} sites\n")
    print(f"objective / exclusive-MILP optimum: median {100 * np.median(r):.2f} %, min "
          f"{100 * r.min():.2f} %; nested conflicts in the unconstrained plan, mean "
          f"{np.mean(conflicts_free):.1f}")


if __name__ == "__main__":
    main()
