"""A VRAM-bounded plan against the best uniform LoRA that fits the same whole-step memory.

Issue "budgets that mean what they say": with a whole-step VRAM budget (bytes of the compiled train
step: frozen model, activations kept for backward through every layer above the lowest adapted
one, adapters, optimizer state), the allocator chooses the lowest adapted layer group and the
per-site options together (``allocate(..., step_profile=...)``). A careful user facing the same
limit adapts only the top layers: for every uniform target set {query+value, q+k+v+out, FFN, all
linear} and every lowest layer ``k``, LoRA on layers ``k..L-1`` at the largest rank that fits the
parameter budget, kept when its predicted whole-step memory fits; per target set the one reaching
lowest. Those candidates and the plan train with the same seeds; the best uniform is chosen on
validation; the table reports predicted vs XLA-measured step memory for every variant. The plan
comes twice: allocated at the budget on the prediction alone (``layerlens_vram``), and with its
compiled step checked and re-allocated until it fits (``layerlens_vram_checked``, what
``layerlens plan`` does under a ``vram_bytes`` budget).

    python scripts/validate_vram.py --task trec6 --fraction 0.6 --seeds 0 1 2

Results are stored per run (keyed by a hash of its settings) in ``--out``/vram.json and reused.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

from layerlens_jax._src.allocate import allocate
from layerlens_jax._src.costs import Catalogue, CostModel
from layerlens_jax._src.fileio import atomic_write_json
from layerlens_jax._src.plan import Plan, uniform_assignments
from layerlens_jax._src.step_cost import with_step_use
from layerlens_jax.app.config import load_config
from layerlens_jax.app.pipeline import prepare, run_profile, train_variant
from layerlens_jax.app.plans import (make_plans, measure_step_memory, measure_whole_step,
                                     within_measured_memory)
from layerlens_jax.app.sweep import (TARGET_SETS, best_by_validation, paired_difference, run_key,
                                     upgrade_runs,
                                     uniform_candidates)

LAYER = re.compile(r"layers_(\d+)/")


def _layer(path: str) -> int | None:
    m = LAYER.search(path)
    return None if m is None else int(m.group(1))


def uniform_top_candidates(sites, u, params_budget, memory_budget, profile, reference_options,
                           measure):
    """Per target set, the uniform LoRA on layers k..L-1 (smallest k) that fits both budgets: its
    predicted whole-step memory first (cheap), then its compiled step (``measure``), as a careful
    user would check before training."""
    cost_model = CostModel(batch_size=profile.batch_size, seq_len=profile.seq_len)
    layers = sorted({_layer(s.path) for s in sites if _layer(s.path) is not None})
    out = {}
    for name, targets in TARGET_SETS.items():
        for k in layers:
            top = [s for s in sites if _layer(s.path) is not None and _layer(s.path) >= k]
            fit = uniform_candidates(top, params_budget, {name: targets}).get(f"uniform:{name}")
            if fit is None:
                continue
            _, rank, _ = fit
            plan = with_step_use(Plan.from_assignments(
                sites, uniform_assignments(top, "lora", rank, targets), u,
                peft_options=reference_options, cost_model=cost_model,
                metadata={"variant": f"uniform:{name}@{k}", "rank": rank}), sites, profile)
            if plan.use["vram_bytes"] <= memory_budget and measure(plan) <= memory_budget:
                out[f"uniform:{name}@{k}"] = plan
                break  # the lowest k that fits: the most layers
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--task", default="trec6")
    ap.add_argument("--fraction", type=float, default=0.6,
                    help="VRAM budget as a fraction of uniform LoRA r8 q,v's whole-step memory")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", default="runs/vram")
    ap.add_argument("--plans-only", action="store_true", help="print the plans, train nothing")
    args = ap.parse_args()

    cfg = load_config(args.config, {"data.task": args.task, "model.max_length": 32,
                                    "train.steps": args.steps,
                                    "train.eval_every": max(args.steps // 3, 1),
                                    "run.output_dir": str(Path(args.out) / args.task)})
    out = Path(args.out)
    store_path = out / "vram.json"
    store = json.loads(store_path.read_text()) if store_path.is_file() else {"runs": {}}
    store["runs"] = upgrade_runs(store["runs"])
    store["command"] = "python " + " ".join(sys.argv)
    prep = prepare(cfg)
    stats, u, _ = run_profile(prep, progress=False)
    sites = list(stats.sites)
    profile = measure_whole_step(prep)
    base = make_plans(cfg, sites, u, profile)  # whole-step predictions of the reference plans
    reference = base["uniform_lora"]
    params_budget = reference.use["params"]
    memory_budget = args.fraction * reference.use["vram_bytes"]
    a = cfg.allocate
    plans = {"uniform_lora (unbounded)": reference}
    def allocate_at(vram):
        return allocate(sites, u, {"params": params_budget, "vram_bytes": vram},
                        catalogue=Catalogue.from_sizes(lora=a.lora_ranks),
                        gain_model=a.gain_model(), step_profile=profile,
                        peft_options={"lora_alpha": a.lora_alpha, "use_rslora": a.use_rslora})

    plans["layerlens_vram"] = allocate_at(memory_budget)  # at the predicted budget
    plans["layerlens_vram_checked"] = within_measured_memory(  # its compiled step checked
        allocate_at, memory_budget,
        lambda p: measure_step_memory(prep, "layerlens_lora", p))
    ref_opts = {"lora_alpha": cfg.budget.reference_alpha, "use_rslora": False}
    plans.update(uniform_top_candidates(
        sites, u, params_budget, memory_budget, profile, ref_opts,
        lambda p: measure_step_memory(prep, "uniform_lora", p)))
    store["budgets"] = {"params": params_budget, "vram_bytes": memory_budget,
                        "fraction": args.fraction}
    store["plans"] = {n: {"assignments": {k: list(v) for k, v in p.assignments().items()},
                          "params": p.use["params"], "predicted_vram_bytes": p.use["vram_bytes"]}
                      for n, p in plans.items()}
    for name, plan in plans.items():
        by_layer = sorted({_layer(k) for k in plan.assignments() if _layer(k) is not None})
        print(f"{name}: {plan.use['params']:,.0f} params, predicted step "
              f"{plan.use['vram_bytes'] / 2**20:.0f} MiB, layers {by_layer}", flush=True)
    if args.plans_only:
        return
    for seed in args.seeds:
        for name, plan in plans.items():
            key = run_key({"task": args.task, "variant": name, "seed": seed, "steps": args.steps,
                           "fraction": args.fraction, "plan": store["plans"][name]["assignments"],
                           "protocol": 1})
            if key not in store["runs"]:
                res = train_variant(prep, "uniform_lora" if name.startswith("uniform")
                                    else "layerlens_lora", plan, seed, progress=False)
                store["runs"][key] = {**res.to_json(), "variant": name}
                atomic_write_json(store_path, store)
                r = store["runs"][key]
                print(f"{name} seed {seed}: test {100 * r['test_score']:.2f} val "
                      f"{100 * r['val_score']:.2f}, XLA {r['step_memory_bytes'] / 2**20:.0f} MiB "
                      f"(predicted {plan.use['vram_bytes'] / 2**20:.0f})", flush=True)
    atomic_write_json(store_path, store)
    print(render(store))
    (out / "vram.md").write_text(render(store))


def render(store) -> str:
    runs = list(store["runs"].values())
    uniform = [n for n in store["plans"] if n.startswith("uniform:")]
    best = best_by_validation(runs, uniform)
    b = store["budgets"]
    lines = [f"reproduce: `{store['command']}`", "",
             f"Budgets: {b['params']:,.0f} adapter parameters and {b['vram_bytes'] / 2**20:.0f} MiB "
             f"of whole-step memory ({100 * b['fraction']:.0f} % of uniform LoRA r8 q,v's). Best "
             f"uniform that fits, by validation: `{best}`.", "",
             "| variant | params | step MiB predicted | step MiB XLA | test % | val % | seeds | "
             "Δ test vs best uniform [95 % CI] |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, p in store["plans"].items():
        rs = [r for r in runs if r["variant"] == name]
        if not rs:
            continue
        test = np.array([r["test_score"] for r in rs]) * 100
        val = np.array([r["val_score"] for r in rs]) * 100
        d = (paired_difference(rs, [r for r in runs if r["variant"] == best])
             if best and name != best else None)
        ci = "" if d is None else f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
        lines.append(f"| {name} | {p['params']:,.0f} | {p['predicted_vram_bytes'] / 2**20:.0f} | "
                     f"{rs[0]['step_memory_bytes'] / 2**20:.0f} | {test.mean():.2f} ± "
                     f"{test.std():.2f} | {val.mean():.2f} | {len(rs)} | {ci} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
