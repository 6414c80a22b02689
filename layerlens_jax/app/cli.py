"""``layerlens``: the command-line front of :mod:`layerlens_jax.app.pipeline`.

    layerlens run      -c configs/default.toml      # profile, plan, train, evaluate, report
    layerlens profile  -c CONFIG                    # each stage alone, reading/writing the run dir
    layerlens plan     -c CONFIG
    layerlens train    -c CONFIG
    layerlens evaluate -c CONFIG
    layerlens report   -c CONFIG

``--set section.key=value`` overrides a config value (TOML syntax for the value, e.g.
``--set train.steps=50 --set compare.seeds=[0,1,2]``).

Exit status: 0 done; 1 a stage failed on its inputs (a file of an earlier stage missing or
invalid); 2 a bad command line or config (unknown command, missing or invalid config file, bad
``--set``, unknown key, bad value), reported in one line that names the culprit.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

__all__ = ["main"]

STAGES = ("profile", "plan", "train", "evaluate", "report")


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``["section.key=value", ...]`` -> ``{"section.key": value}``, the value read as TOML (a bare
    string where it is not TOML). Raises ConfigError for an item without ``=``."""
    from layerlens_jax.app.config import ConfigError

    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw  # a bare string
    return out


def _out(cfg) -> Path:
    return Path(cfg.run.output_dir)


def stage_profile(cfg, prep, log) -> None:
    from layerlens_jax.app.pipeline import run_profile, stats_to_json, write_json

    t0 = time.perf_counter()
    stats, u, rep = run_profile(prep)
    write_json(_out(cfg) / "stats.json", stats_to_json(stats, u, rep))
    top = sorted(zip(u, (s.path for s in stats.sites)), reverse=True)[:5]
    log(f"profile: {len(stats.sites)} sites, {stats.num_examples} examples in "
        f"{time.perf_counter() - t0:.1f}s; top utility: "
        + ", ".join(f"{p} {v:.3f}" for v, p in top))
    log(rep.to_markdown())


def _load_plans(cfg):
    from layerlens_jax.app.pipeline import PLAN_VARIANTS
    from layerlens_jax._src.plan import load_plan

    plans = {}
    for v in PLAN_VARIANTS:
        p = _out(cfg) / "plans" / f"{v}.json"
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: run `layerlens plan` first")
        plans[v] = load_plan(p)
    return plans


def stage_plan(cfg, prep, log) -> None:
    from layerlens_jax.app.pipeline import make_plans, read_json, sites_from_json
    from layerlens_jax._src.export import hf_bert_module_name, save_peft_config
    from layerlens_jax._src.plan import save_plan
    from layerlens_jax._src.plan_metrics import plan_metrics, render_metrics_markdown

    sites, u = sites_from_json(read_json(_out(cfg) / "stats.json", "profile"))
    plans = make_plans(cfg, sites, u)
    for name, plan in plans.items():
        save_plan(plan, _out(cfg) / "plans" / f"{name}.json")
    main = plans[cfg.compare.main]
    save_plan(main, _out(cfg) / "plan.json")
    dropped = save_peft_config(main, _out(cfg), hf_bert_module_name)
    band = tuple(cfg.budget.utilisation) if cfg.budget.utilisation else None
    for name, plan in plans.items():
        counts = {}
        for a in plan.allocations:
            counts[a.method] = counts.get(a.method, 0) + 1
        log(f"plan {name}: {plan.use['params']:,.0f} / {plan.budgets.get('params', float('inf')):,.0f}"
            f" params; methods {counts}")
    log(render_metrics_markdown(plan_metrics(main, utilisation_band=band),
                                title=f"Plan {cfg.compare.main}"))
    if dropped:
        log(f"adapter_config.json: {len(dropped)} non-LoRA site(s) not exportable to HF PEFT LoRA")


def _save_head(path: Path, model, head) -> None:
    import numpy as np
    from flax import nnx

    from layerlens_jax.app.pipeline import _head_filter
    from layerlens_jax._src.sites import flatten_paths as _flat

    flat = {k: np.asarray(v) for k, v in _flat(nnx.state(model, _head_filter(head))
                                                 .to_pure_dict()).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    os.close(fd)
    np.savez(tmp, **flat)
    os.replace(tmp, path)


def _load_head(path: Path, model, head) -> None:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from layerlens_jax.app.pipeline import _head_filter
    from layerlens_jax._src.sites import flatten_paths as _flat

    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `layerlens train` first")
    state = nnx.state(model, _head_filter(head))
    want = _flat(state.to_pure_dict())
    with np.load(path) as z:
        got = {k: z[k] for k in z.files}
    if set(got) != set(want):
        raise ValueError(f"{path}: head parameters {sorted(got)} do not match the model's "
                         f"{sorted(want)}")
    for k, v in want.items():
        if got[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {got[k].shape}, the model {v.shape}")
    pure = state.to_pure_dict()

    def fill(tree, prefix=""):
        return {k: (fill(v, f"{prefix}{k}/") if isinstance(v, dict)
                    else jnp.asarray(got[f"{prefix}{k}"])) for k, v in tree.items()}

    state.replace_by_pure_dict(fill(pure))
    nnx.update(model, state)


def stage_train(cfg, prep, log) -> None:
    from layerlens_jax._src.checkpoint import save_adapters
    from layerlens_jax.app.pipeline import (comparison_markdown, summarise, train_variant,
                                        write_json)

    plans = _load_plans(cfg)
    results = []
    for seed in cfg.compare.seeds:
        for variant in cfg.compare.variants:
            keep = variant == cfg.compare.main and seed == cfg.compare.seeds[0]
            r = train_variant(prep, variant, plans.get(variant), seed, keep_model=keep)
            if keep:
                save_adapters(_out(cfg) / "checkpoint" / "adapters", r.model,
                              plan=plans[variant], overwrite=True,
                              metadata={"variant": variant, "seed": seed})
                _save_head(_out(cfg) / "checkpoint" / "head.npz", r.model, cfg.train.head)
                r = dataclasses.replace(r, model=None)  # saved: let it go
            results.append(r)
            log(f"train {variant} seed {seed}: test acc {100 * r.test_accuracy:.2f}% "
                f"(val {100 * r.val_accuracy:.2f}%), {r.trainable_params:,} trainable, "
                f"{r.train_seconds:.1f}s")
            write_json(_out(cfg) / "results.json", {"results": [x.to_json() for x in results],
                                                    "summary": summarise(results)})
    log(comparison_markdown(summarise(results)))


def stage_evaluate(cfg, prep, log) -> None:
    from layerlens_jax._src.checkpoint import restore_adapters
    from layerlens_jax.app.pipeline import build_variant, evaluate_accuracy, write_json

    plans = _load_plans(cfg)
    seed = cfg.compare.seeds[0]
    model, _ = build_variant(prep, cfg.compare.main, plans[cfg.compare.main], seed)
    restore_adapters(_out(cfg) / "checkpoint" / "adapters", model)
    _load_head(_out(cfg) / "checkpoint" / "head.npz", model, cfg.train.head)
    out = {split: evaluate_accuracy(model, prep.arrays[split], cfg.data.eval_batch_size)
           for split in ("validation", "test")}
    out["variant"], out["seed"] = cfg.compare.main, seed
    write_json(_out(cfg) / "evaluation.json", out)
    log(f"evaluate {cfg.compare.main} (checkpoint, seed {seed}): test acc "
        f"{100 * out['test']['accuracy']:.2f}%, validation acc "
        f"{100 * out['validation']['accuracy']:.2f}%")


def verdict(summary: list[dict[str, Any]]) -> str | None:
    by = {r["variant"]: r for r in summary}
    if "uniform_lora" not in by:
        return None
    base = by["uniform_lora"]
    parts = []
    for v in ("layerlens_lora", "layerlens_mixed"):
        if v in by:
            r = by[v]
            d = r["test_accuracy_mean"] - base["test_accuracy_mean"]
            ratio = (r["adapter_params"] or 0) / max(base["adapter_params"] or 1, 1)
            goal = d >= 1.0 or (d >= 0 and ratio <= 0.5)
            n = len(r.get("seeds", ())) or 1
            parts.append(f"{v} vs uniform_lora: {d:+.2f} accuracy points at "
                         f"{100 * ratio:.0f}% of its adapter parameters over {n} seed"
                         f"{'s' if n > 1 else ''} — goal (≥ +1 point, or match at ≤ 50 % params) "
                         f"{'met' if goal else 'NOT met'}"
                         f"{'' if n >= 3 else ' on this run (the goal is stated for 3 seeds)'}.")
    return " ".join(parts)


def stage_report(cfg, prep, log) -> None:
    from layerlens_jax.app import report as R
    from layerlens_jax.app.pipeline import comparison_markdown, read_json, write_json
    from layerlens_jax._src.plan_metrics import plan_metrics, render_metrics_markdown
    from layerlens_jax._src.utility import UtilityReport

    out = _out(cfg)
    stats_json = read_json(out / "stats.json", "profile")
    plans = _load_plans(cfg)
    rep = {k: v for k, v in stats_json["utility_report"].items() if k not in ("checks", "passed")}
    utility_md = UtilityReport(**rep).to_markdown()
    band = tuple(cfg.budget.utilisation) if cfg.budget.utilisation else None
    metrics = {name: plan_metrics(p, utilisation_band=band) for name, p in plans.items()}
    sections = {name: render_metrics_markdown(m, title=f"Plan {name}")
                for name, m in metrics.items()}
    results = read_json(out / "results.json", "train") if (out / "results.json").is_file() else None
    comparison = verdict_text = None
    images = [R.plot_utility(stats_json, out / "utility.png"),
              R.plot_allocation(plans, out / "allocation.png"),
              R.plot_budget_use(plans, out / "budget_use.png")]
    if results:
        comparison = comparison_markdown(results["summary"])
        verdict_text = verdict(results["summary"])
        images.append(R.plot_curves(results["results"], out / "curves.png"))
    R.write_report(out / "report.md", title=f"LayerLens-JAX run `{cfg.run.name}` "
                   f"({cfg.data.task})", config=cfg.to_dict(), stats_json=stats_json,
                   utility_md=utility_md, plan_sections=sections, comparison_md=comparison,
                   verdict=verdict_text, images=[str(i) for i in images])
    write_json(out / "metrics.json", {
        "utility": stats_json["utility_report"],
        "plans": {name: m.to_dict() if hasattr(m, "to_dict") else str(m)
                  for name, m in metrics.items()},
        "comparison": None if results is None else results["summary"],
        "verdict": verdict_text})
    log(f"report: {out / 'report.md'} ({len(images)} plots)")
    if comparison:
        log(comparison)
        if verdict_text:
            log(verdict_text)


_STAGE_FNS = {"profile": stage_profile, "plan": stage_plan, "train": stage_train,
              "evaluate": stage_evaluate, "report": stage_report}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="layerlens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=STAGES + ("run",))
    ap.add_argument("-c", "--config", default="configs/default.toml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only the final summary")
    args = ap.parse_args(argv)

    from layerlens_jax.app.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, _parse_set(args.set))
    except ConfigError as e:
        print(f"layerlens: config error: {e}", file=sys.stderr)
        return 2
    log = (lambda msg: None) if args.quiet else print
    from layerlens_jax.app.pipeline import prepare, write_json

    t0 = time.perf_counter()
    try:
        prep = prepare(cfg) if args.command != "report" else None
        _out(cfg).mkdir(parents=True, exist_ok=True)
        write_json(_out(cfg) / "config.json", cfg.to_dict())
        for stage in (STAGES if args.command == "run" else (args.command,)):
            _STAGE_FNS[stage](cfg, prep, log)
    except (FileNotFoundError, ValueError) as e:
        print(f"layerlens {args.command}: error: {e}", file=sys.stderr)
        return 1
    print(f"layerlens {args.command} done in {time.perf_counter() - t0:.0f}s: {_out(cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
