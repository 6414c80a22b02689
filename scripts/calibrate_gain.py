"""Calibrate the gain model's method efficiencies and LoRA saturation on a validation split.

The allocator predicts ``gain = utility * efficiency[method] * x / (1 + x)`` with
``x = size / saturation[method]`` (``layerlens_jax._src.costs.GainModel``; the ``[allocate]`` keys
``*_efficiency`` / ``*_saturation``). This script measures those numbers instead of assuming them:
it fine-tunes the pretrained MiniLM-L6 on a real task with

  head_only        the task head alone (the zero point),
  lora_r{R}        uniform LoRA rank R on query/value of every layer (the reference budget),
  lora_r{R/2}      the same at half the rank (how fast LoRA saturates with rank),
  adapter_b{A}     a bottleneck adapter of width A on every encoder block (attention and MLP),
  prefix_p{P}      prefix length P on every attention,
  lora_all_r{r}    LoRA rank r on every encoder linear layer (spread everywhere),

and reports each one's validation-loss drop below head-only. Efficiencies are the drops relative
to uniform LoRA at (about) the same parameter count; the LoRA saturation solves the hyperbolic
curve's ratio ``g(R/2) / g(R) = (R + s) / (R + 2 s)`` for ``s`` (0 when half the rank does as
well). Only the validation split is used. Results are written to ``--out`` after every run.

    python scripts/calibrate_gain.py --task trec6 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerlens_jax.app.config import load_config
from layerlens_jax.app.pipeline import prepare, run_profile, train_variant, write_json
from layerlens_jax.app.plans import make_plans
from layerlens_jax._src.plan import Plan, uniform_assignments
from validate_task import MAX_LENGTH  # the same per-task sequence lengths as the validation
LINEAR = ("query", "key", "value", "out", "intermediate", "output")


def saturation_from_ratio(rank: int, ratio: float) -> float:
    """``s`` with ``g(rank / 2) / g(rank) = ratio`` for ``g(r) = r / (r + s)``; 0 if ratio >= 1."""
    if ratio >= 1.0:
        return 0.0
    if ratio <= 0.5:
        return float("inf")  # linear in rank: no saturation visible
    return rank * (1.0 - ratio) / (2.0 * ratio - 1.0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--task", default="trec6", choices=sorted(MAX_LENGTH))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--adapter-size", type=int, default=8)
    ap.add_argument("--prefix-length", type=int, default=16)
    ap.add_argument("--lora-all-rank", type=int, default=2)
    ap.add_argument("--out", default="runs/calibration")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, {"data.task": args.task,
                                    "model.max_length": MAX_LENGTH[args.task],
                                    "train.steps": args.steps,
                                    "train.eval_every": max(args.steps // 3, 1)})
    prep = prepare(cfg)
    stats, u, _ = run_profile(prep, progress=False)
    sites = list(stats.sites)
    uniform = make_plans(cfg, sites, u)["uniform_lora"]
    rank, targets = cfg.budget.reference_rank, cfg.budget.reference_targets
    lora_opts = dict(uniform.peft_options)

    def encoder(assignments):
        return {k: v for k, v in assignments.items() if k.startswith("encoder/")}

    arms = {
        "head_only": None,
        f"lora_r{rank}": uniform,
        f"lora_r{max(rank // 2, 1)}": Plan.from_assignments(
            sites, uniform_assignments(sites, "lora", max(rank // 2, 1), targets), u,
            peft_options=lora_opts),
        f"adapter_b{args.adapter_size}": Plan.from_assignments(
            sites, encoder(uniform_assignments(sites, "adapter", args.adapter_size, None)), u),
        f"prefix_p{args.prefix_length}": Plan.from_assignments(
            sites, encoder(uniform_assignments(sites, "prefix", args.prefix_length, None)), u),
        f"lora_all_r{args.lora_all_rank}": Plan.from_assignments(  # scaled as LayerLens plans
            sites, encoder(uniform_assignments(sites, "lora", args.lora_all_rank, LINEAR)), u,
            peft_options={"lora_alpha": cfg.allocate.lora_alpha,
                          "use_rslora": cfg.allocate.use_rslora}),
    }
    out = Path(args.out)
    path = out / f"{args.task}_seed{args.seed}.json"
    res = json.loads(path.read_text()) if path.is_file() else {}
    for name, plan in arms.items():
        if name in res:
            continue
        variant = "head_only" if plan is None else name
        r = train_variant(prep, variant, plan, args.seed, progress=False)
        res[name] = {"params": 0 if plan is None else plan.use["params"],
                     "val_loss": r.val_loss, "val_score": r.val_score,
                     "curve": [point.to_json() for point in r.curve]}
        write_json(path, res)
        print(f"{name}: {res[name]['params']:.0f} params, val loss {r.val_loss:.4f}, "
              f"val acc {100 * r.val_score:.2f}%", flush=True)

    zero = res["head_only"]["val_loss"]
    ref = res[f"lora_r{rank}"]
    ref_drop = zero - ref["val_loss"]
    print(f"\n{args.task}, seed {args.seed}, {args.steps} steps; drops below head-only "
          f"(val loss {zero:.4f}), relative to uniform LoRA r={rank} ({ref['params']:.0f} params)")
    print("| arm | params | params / reference | val loss | drop | drop / reference drop |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for name, r in res.items():
        if name in ("head_only", "summary"):
            continue
        drop = zero - r["val_loss"]
        summary[name] = drop / ref_drop
        print(f"| {name} | {r['params']:.0f} | {r['params'] / ref['params']:.2f} | "
              f"{r['val_loss']:.4f} | {drop:.4f} | {drop / ref_drop:.2f} |")
    half = summary[f"lora_r{max(rank // 2, 1)}"]
    print(f"\nsuggested [allocate]: adapter_efficiency ~ "
          f"{summary[f'adapter_b{args.adapter_size}']:.2f}, prefix_efficiency ~ "
          f"{summary[f'prefix_p{args.prefix_length}']:.2f}, lora_saturation ~ "
          f"{saturation_from_ratio(rank, half):.2f} (half-rank ratio {half:.3f})")
    res["summary"] = summary
    write_json(path, res)


if __name__ == "__main__":
    sys.exit(main())
