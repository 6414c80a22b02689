"""Task-performance validation: LayerLens plans vs uniform LoRA at the same parameter budget.

For each task (real TREC-6 questions, real movie-review sentences) and each budget (the parameter
count of uniform LoRA r=8 on query/value of all 6 layers, times ``--budgets``), fine-tunes the
pretrained MiniLM-L6 with

  1. uniform_lora     the same rank on query and value of every layer (rank scaled with the budget),
  2. layerlens_lora   a LoRA-only plan from the per-site utility,
  3. layerlens_mixed  a LoRA / Adapter / Prefix / none plan,
  4. head_only, full  reference points (run once per task, not per budget),

over ``--seeds`` with identical data order, head initialisation and optimizer settings per seed,
and reports mean ± std test accuracy, trainable parameters, train time and XLA step memory as
Markdown + JSON. With ``--predictive`` it also measures the utility's predictive validity: for
every LoRA-able encoder site, the validation-loss drop of training a rank-8 LoRA on that site
alone for a few steps (from the profiled state), and the Spearman correlation of those drops with
the utility. Results are written after every run and reused on restart (``--fresh`` to redo).

    python scripts/validate_task.py --tasks trec6 --budgets 1.0 --seeds 0 1 2
    python scripts/validate_task.py --tasks trec6 movie_sentiment --budgets 1.0 0.5 --predictive
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from scipy import stats as sps

from layerlens_jax.app.config import load_config
from layerlens_jax.app.pipeline import (_mean_loss, evaluate_accuracy, make_plans, prepare,
                                    run_profile, stats_to_json, train_variant,
                                    write_json)

MAX_LENGTH = {"trec6": 32, "movie_sentiment": 48}  # ~95-99th percentile lengths


def _cfg(task: str, args, scale: float = 1.0):
    overrides = {"data.task": task, "model.max_length": MAX_LENGTH[task],
                 "train.steps": args.steps, "train.eval_every": max(args.steps // 3, 1),
                 "budget.scale": scale, "profile.batches": args.profile_batches,
                 "run.output_dir": str(Path(args.out) / task)}
    from layerlens_jax.app.cli import _parse_set
    overrides.update(_parse_set(args.set))  # explicit --set wins
    return load_config(args.config, overrides)


def predictive_validity(prep, stats, u, steps: int, lr: float) -> dict:
    """Validation-loss drop of training each LoRA-able site alone vs its utility (Spearman)."""
    from layerlens_jax.app.data import iterate_batches
    from layerlens_jax._src.peft import PEFT_FILTER, apply_plan

    sites = [s for s in stats.sites if s.kind == "linear" and s.path.startswith("encoder/")]
    util = {s.path: float(x) for s, x in zip(stats.sites, u)}
    base = prep.build_model(prep.cfg.run.seed)
    model = apply_plan(base, {s.path: ("lora", 8) for s in sites}, inplace=True)
    graphdef, trainable, rest = nnx.split(model, PEFT_FILTER, ...)
    tx = optax.adam(lr)
    paths = [s.path for s in sites]

    def site_of(keypath) -> str:
        parts = [str(getattr(k, "key", getattr(k, "idx", k))) for k in keypath]
        joined = "/".join(parts)
        return next(p for p in paths if joined.startswith(p + "/"))

    leaf_site = [paths.index(site_of(kp)) for kp, _ in
                 jax.tree_util.tree_flatten_with_path(trainable)[0]]

    @jax.jit
    def train(trainable, which, batches):
        mask_leaves = [(jnp.asarray(i) == which).astype(jnp.float32) for i in leaf_site]
        mask = jax.tree.unflatten(jax.tree.structure(trainable), mask_leaves)
        opt = tx.init(trainable)

        def body(carry, batch):
            tr, opt = carry
            loss, g = jax.value_and_grad(
                lambda t: _mean_loss(nnx.merge(graphdef, t, rest), batch))(tr)
            g = jax.tree.map(lambda a, m: a * m, g, mask)
            upd, opt = tx.update(g, opt, tr)
            return (optax.apply_updates(tr, upd), opt), loss

        (tr, _), _ = jax.lax.scan(body, (trainable, opt), batches)
        return tr

    batches = list(iterate_batches(prep.arrays["train"], prep.cfg.data.batch_size, seed=123,
                                   drop_remainder=True))[:steps]
    stacked = jax.tree.map(lambda *a: np.stack(a), *batches)
    val = {k: v[:512] for k, v in prep.arrays["validation"].items()}

    def val_loss(tr):
        return evaluate_accuracy(nnx.merge(graphdef, tr, rest), val, 256)["loss"]

    before = val_loss(trainable)
    gains = {}
    for i, p in enumerate(paths):
        gains[p] = before - val_loss(train(trainable, i, stacked))
    g = np.array([gains[p] for p in paths])
    uu = np.array([util[p] for p in paths])
    rho = sps.spearmanr(g, uu)
    return {"sites": paths, "loss_drop": g.tolist(), "utility": uu.tolist(),
            "val_loss_before": before, "steps": steps, "learning_rate": lr,
            "spearman": float(rho.statistic), "spearman_p": float(rho.pvalue)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--tasks", nargs="+", default=["trec6", "movie_sentiment"])
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+",
                    default=["uniform_lora", "layerlens_lora", "layerlens_mixed", "head_only",
                             "full"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--profile-batches", type=int, default=8)
    ap.add_argument("--predictive", action="store_true")
    ap.add_argument("--predictive-steps", type=int, default=20)
    ap.add_argument("--out", default="runs/validation")
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite validation.md from the stored results")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override, as for `layerlens` (e.g. utility.transform='sqrt')")
    args = ap.parse_args()

    out = Path(args.out)
    store_path = out / "validation.json"
    store = {"runs": [], "plans": {}, "utility": {}, "predictive": {}}
    if store_path.is_file() and not args.fresh:
        store = json.loads(store_path.read_text())
    if args.render:
        md = render(store)
        (out / "validation.md").write_text(md)
        print(md)
        return
    done = {(r["task"], r["budget_scale"], r["variant"], r["seed"]) for r in store["runs"]}
    store["command"] = "python " + " ".join(sys.argv)

    for task in args.tasks:
        cfg = _cfg(task, args)
        prep = prepare(cfg)
        t0 = time.perf_counter()
        stats, u, rep = run_profile(prep, progress=False)
        store["utility"][task] = {**rep.to_dict(), "profile_seconds": time.perf_counter() - t0}
        write_json(out / f"{task}_stats.json", stats_to_json(stats, u, rep))  # to replay plans
        print(f"[{task}] utility: CV {rep.cv:.3f}, r(grad) {rep.grad_corr:.3f}, "
              f"r(fisher) {rep.fisher_corr:.3f}", flush=True)
        if args.predictive and (task not in store["predictive"] or args.fresh):
            t0 = time.perf_counter()
            pv = predictive_validity(prep, stats, u, args.predictive_steps, cfg.train.learning_rate)
            pv["seconds"] = time.perf_counter() - t0
            store["predictive"][task] = pv
            write_json(store_path, store)
            print(f"[{task}] predictive validity: Spearman {pv['spearman']:.3f} "
                  f"(p={pv['spearman_p']:.2g}) over {len(pv['sites'])} sites", flush=True)
        for scale in args.budgets:
            bcfg = _cfg(task, args, scale)
            prep_b = dataclasses.replace(prep, cfg=bcfg)
            plans = make_plans(bcfg, list(stats.sites), u)
            from layerlens_jax._src.plan_metrics import plan_metrics
            store["plans"][f"{task}@{scale}"] = {
                name: {"assignments": {k: list(v) for k, v in p.assignments().items()},
                       "params": p.use["params"],
                       "metrics": plan_metrics(p).to_dict()} for name, p in plans.items()}
            for seed in args.seeds:
                for variant in args.variants:
                    key_scale = scale if variant in plans else 1.0
                    if variant not in plans and scale != args.budgets[0]:
                        continue  # head_only / full: once per task
                    if (task, key_scale, variant, seed) in done:
                        continue
                    res = train_variant(prep_b, variant, plans.get(variant), seed, progress=False)
                    r = {**res.to_json(), "task": task, "budget_scale": key_scale}
                    store["runs"].append(r)
                    done.add((task, key_scale, variant, seed))
                    write_json(store_path, store)
                    print(f"[{task} x{key_scale}] {variant} seed {seed}: test "
                          f"{100 * r['test_accuracy']:.2f}% val {100 * r['val_accuracy']:.2f}% "
                          f"({r['trainable_params']:,} trainable, {r['train_seconds']:.0f}s)",
                          flush=True)
    write_json(store_path, store)  # plans and utility even when every run was already done
    md = render(store)
    (out / "validation.md").write_text(md)
    print(md)


def render(store) -> str:
    lines = [f"# Task validation\n\nreproduce: `{store.get('command', '')}`\n"]
    tasks = list(dict.fromkeys(r["task"] for r in store["runs"]))
    for task in tasks:
        lines.append(f"## {task}\n")
        if task in store["utility"]:
            u = store["utility"][task]
            lines.append(f"Utility: CV {u['cv']:.3f}, Pearson r with grad norm {u['grad_corr']:.3f}, "
                         f"with Fisher trace {u['fisher_corr']:.3f}.\n")
        if task in store.get("predictive", {}):
            p = store["predictive"][task]
            lines.append(f"Predictive validity: Spearman(utility, val-loss drop of training the "
                         f"site alone for {p['steps']} steps) = {p['spearman']:.3f} "
                         f"(p={p['spearman_p']:.2g}, {len(p['sites'])} sites).\n")
        lines.append("| budget | variant | test acc. % (mean ± std) | val acc. % | val loss | seeds | "
                     "adapter params | trainable params | train s | step MiB |")
        lines.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        runs = [r for r in store["runs"] if r["task"] == task]
        groups = list(dict.fromkeys((r["budget_scale"], r["variant"]) for r in runs))
        for scale, variant in sorted(groups, key=lambda g: (-g[0], g[1])):
            rs = [r for r in runs if (r["budget_scale"], r["variant"]) == (scale, variant)]
            acc = 100 * np.array([r["test_accuracy"] for r in rs])
            val = 100 * np.array([r["val_accuracy"] for r in rs])
            vloss = np.array([r["val_loss"] for r in rs])
            mem = rs[0]["step_memory_bytes"]
            lines.append(
                f"| {scale:g} | {variant} | {acc.mean():.2f} ± {acc.std():.2f} | "
                f"{val.mean():.2f} ± {val.std():.2f} | {vloss.mean():.4f} ± {vloss.std():.4f} | "
                f"{len(rs)} | "
                f"{rs[0]['adapter_params'] or '—'} | {rs[0]['trainable_params']:,} | "
                f"{np.mean([r['train_seconds'] for r in rs]):.0f} | "
                f"{'n/a' if mem is None else f'{mem / 2**20:.0f}'} |")
        lines.append("")
        for key, plans in store.get("plans", {}).items():
            if not key.startswith(task + "@") or not plans:
                continue
            lines.append(f"Plan metrics at budget {key.split('@')[1]} (the seed report's):\n")
            lines.append("| plan | sites adapted | methods (lora/adapter/prefix) | params use / budget "
                         "| rank–utility Spearman | consistency | compatibility | constraints met |")
            lines.append("|---|---:|---|---:|---:|---:|---:|---:|")
            for name, p in plans.items():
                if not p:
                    continue
                m = p["metrics"]
                c = m["method_counts"]
                util = m["utilisation"].get("params")
                rho = m["spearman"]
                lines.append(
                    f"| {name} | {m['n_adapted']} | {c['lora']}/{c['adapter']}/{c['prefix']} | "
                    f"{'—' if util is None else f'{100 * util:.1f} %'} | "
                    f"{'—' if rho is None else f'{rho:.3f}'} | {m['consistency_class']:.3f} | "
                    f"{m['compatibility_rate']:.3f} | {m['constraint_satisfaction']:.3f} |")
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
