"""``layerlens``: the command-line front of :mod:`layerlens_jax.app.pipeline`.

    layerlens run      -c configs/default.toml      # profile, plan, train, evaluate, report
    layerlens profile  -c CONFIG                    # each stage alone, reading/writing the run dir
    layerlens plan     -c CONFIG
    layerlens train    -c CONFIG
    layerlens evaluate -c CONFIG
    layerlens report   -c CONFIG

``--set section.key=value`` overrides a config value (TOML syntax for the value, e.g.
``--set train.steps=50 --set compare.seeds=[0,1,2]``).

Run directory (run.output_dir): one command at a time (a second one is refused, naming the PID of
the first). Each stage records its completion and the hashes of its inputs (config sections,
upstream files) in .layerlens/<stage>.json; a stage refuses an upstream stage that is missing,
partial (a file changed or gone) or stale (its inputs changed), and `layerlens run` on an
existing directory skips the stages that are complete and fresh and recomputes the others.
Training reads plans/<variant>.json, the one source of truth for the plans; plan.json is a copy
of the main plan (for reading and export): editing either marks the plan stage partial.

Exit status: 0 done; 1 a stage's input in the run directory (a file of an earlier stage) is
missing, invalid, partial or stale; 2 anything else expected: a bad command line or config
(unknown command, missing or invalid config file, bad ``--set``, unknown key, bad value), data
that cannot train (a split smaller than a batch, labels or token ids out of range), an unusable
or busy run directory, a plan that adapts nothing, or a variant whose training diverged (the
other variants still train and are reported; a diverged main variant leaves no new checkpoint).
Every such failure is reported in one line naming the culprit; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

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


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageContext:
    """What every stage gets: the config, the run directory, logging, and the prepared task
    (loaded on first use: ``layerlens run`` on a complete directory never loads the data)."""

    # the run's configuration
    cfg: Any
    # its to_dict() (what the stage hashes are computed from)
    cfg_dict: dict[str, Any]
    # the run directory (run.output_dir)
    out: Path
    # progress messages (print, or nothing with -q)
    log: Callable[[str], None]
    # whether to show progress bars (not with -q)
    progress: bool

    @functools.cached_property
    def prep(self):
        from layerlens_jax.app.pipeline import prepare
        return prepare(self.cfg)

    def require(self, *stages: str) -> None:
        """StageInputError unless each of ``stages`` is complete and fresh."""
        from layerlens_jax.app.rundir import require_stage
        for stage in stages:
            require_stage(self.out, stage, self.cfg_dict)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageOutcome:
    """What a stage wrote, and what went wrong without stopping it."""

    # the files the stage wrote (recorded, with their hashes, in its completion marker)
    outputs: tuple[Path, ...]
    # one line per problem that did not stop the stage (a non-main variant's divergence)
    problems: tuple[str, ...] = ()


def stage_profile(ctx: StageContext) -> StageOutcome:
    from layerlens_jax.app.pipeline import run_profile, write_json
    from layerlens_jax.app.stats_file import stats_to_json

    t0 = time.perf_counter()
    stats, u, rep = run_profile(ctx.prep, progress=ctx.progress)
    write_json(ctx.out / "stats.json", stats_to_json(stats, u, rep))
    top = sorted(zip(u, (s.path for s in stats.sites)), reverse=True)[:5]
    ctx.log(f"profile: {len(stats.sites)} sites, {stats.num_examples} examples in "
            f"{time.perf_counter() - t0:.1f}s; top utility: "
            + ", ".join(f"{p} {v:.3f}" for v, p in top))
    ctx.log(rep.to_markdown())
    return StageOutcome(outputs=(ctx.out / "stats.json",))


def _load_plans(ctx: StageContext):
    from layerlens_jax._src.plan import load_plan
    from layerlens_jax.app.plans import PLAN_VARIANTS
    from layerlens_jax.app.rundir import StageInputError

    plans = {}
    for v in PLAN_VARIANTS:
        p = ctx.out / "plans" / f"{v}.json"
        if not p.is_file():
            raise StageInputError(f"{p} not found: run `layerlens plan` first")
        try:
            plans[v] = load_plan(p)
        except (ValueError, KeyError, TypeError) as e:
            raise StageInputError(f"{p} is not a valid plan ({e}); rerun `layerlens plan`") \
                from None
    return plans


def stage_plan(ctx: StageContext) -> StageOutcome:
    from layerlens_jax._src.export import hf_bert_module_name, save_peft_config
    from layerlens_jax._src.plan import save_plan
    from layerlens_jax._src.plan_metrics import plan_metrics, render_metrics_markdown
    from layerlens_jax.app.stats_file import read_json, sites_from_json
    from layerlens_jax.app.plans import make_plans, measure_importance, measure_whole_step

    cfg, out = ctx.cfg, ctx.out
    sites, u = sites_from_json(read_json(out / "stats.json", "profile"), out / "stats.json")
    ctx.require("profile")
    step_profile = None
    if cfg.budget.whole_step:
        t0 = time.perf_counter()
        step_profile = measure_whole_step(ctx.prep)
        ctx.log(f"step profile: {len(step_profile.groups)} layer groups, whole-step memory "
                f"{min(step_profile.vram_bytes) / 2**20:.0f}-{max(step_profile.vram_bytes) / 2**20:.0f}"
                f" MiB by lowest adapted group ({time.perf_counter() - t0:.1f}s)")
    measure = None
    if step_profile is not None and math.isfinite(cfg.budget.vram_bytes):
        from layerlens_jax.app.plans import measure_step_memory

        measure = functools.partial(measure_step_memory, ctx.prep)  # compiled-step check
    t0 = time.perf_counter()
    importance = measure_importance(ctx.prep, sites)  # GoRA's, for gora_floor
    ctx.log(f"importance (mean |W * G|) of {len(importance)} linear sites "
            f"({time.perf_counter() - t0:.1f}s)")
    plans = make_plans(cfg, sites, u, step_profile, measure, importance=importance)
    written = [out / "plans" / f"{name}.json" for name in plans]
    for path, plan in zip(written, plans.values()):
        save_plan(plan, path)
    main = plans[cfg.compare.main]
    save_plan(main, out / "plan.json")
    dropped = save_peft_config(main, out, hf_bert_module_name)
    band = tuple(cfg.budget.utilisation) if cfg.budget.utilisation else None
    for name, plan in plans.items():
        counts = {}
        for a in plan.allocations:
            counts[a.method] = counts.get(a.method, 0) + 1
        ctx.log(f"plan {name}: {plan.use['params']:,.0f} / "
                f"{plan.budgets.get('params', float('inf')):,.0f} params; methods {counts}")
    ctx.log(render_metrics_markdown(plan_metrics(main, utilisation_band=band),
                                    title=f"Plan {cfg.compare.main}"))
    if dropped:
        ctx.log(f"adapter_config.json: {len(dropped)} non-LoRA site(s) not exportable to HF PEFT "
                f"LoRA")
    return StageOutcome(outputs=(*written, out / "plan.json", out / "adapter_config.json"))


def _train_all(ctx: StageContext, plans) -> tuple[list, list[dict[str, Any]]]:
    """Train every variant and seed; the main variant's seed-0 model checkpointed as soon as it is
    trained. ``(results, divergence records)``."""
    from layerlens_jax.app.pipeline import DivergenceError, train_variant
    from layerlens_jax.app.rundir import write_checkpoint

    cfg = ctx.cfg
    results, diverged = [], []
    for seed in cfg.compare.seeds:
        for variant in cfg.compare.variants:
            keep = variant == cfg.compare.main and seed == cfg.compare.seeds[0]
            try:
                r = train_variant(ctx.prep, variant, plans.get(variant), seed, keep_model=keep,
                                  progress=ctx.progress)
            except DivergenceError as e:
                diverged.append(e.record)
                ctx.log(f"train {variant} seed {seed}: DIVERGED: {e}")
                continue
            if keep:
                write_checkpoint(ctx.out / "checkpoint", r.model, plan=plans[variant],
                                 head=cfg.train.head, metadata={"variant": variant, "seed": seed})
                r = dataclasses.replace(r, model=None)  # saved: let it go
            results.append(r)
            ctx.log(f"train {variant} seed {seed}: test {r.metric} {100 * r.test_score:.2f}% "
                    f"(val {100 * r.val_score:.2f}%), {r.trainable_params:,} trainable, "
                    f"{r.train_seconds:.1f}s")
    return results, diverged


def stage_train(ctx: StageContext) -> StageOutcome:
    from layerlens_jax.app.pipeline import DivergenceError, write_json
    from layerlens_jax.app.summary import comparison_markdown, summarise
    from layerlens_jax.app.rundir import stage_seconds

    plans = _load_plans(ctx)
    ctx.require("plan")
    t0 = time.perf_counter()
    results, diverged = _train_all(ctx, plans)
    earlier = stage_seconds(ctx.out)
    timings = {"profile_seconds": earlier.get("profile"), "allocate_seconds": earlier.get("plan"),
               "train_seconds": time.perf_counter() - t0}
    summary = summarise(results, plans)
    write_json(ctx.out / "results.json", {"results": [x.to_json() for x in results],
                                          "summary": summary, "diverged": diverged,
                                          "timings": timings})
    if results:
        ctx.log(comparison_markdown(summary))
    problems = tuple(d["message"] for d in diverged)
    main = ctx.cfg.compare.main
    main_seed = ctx.cfg.compare.seeds[0]
    for d in diverged:
        if d["variant"] == main and d["seed"] == main_seed:
            raise DivergenceError(d["message"] + "; no checkpoint written (results.json "
                                  "records it)", **{k: d[k] for k in ("variant", "seed", "step",
                                                                       "loss", "initial_loss")})
    return StageOutcome(outputs=(ctx.out / "results.json",
                                 ctx.out / "checkpoint" / "manifest.json"), problems=problems)


def stage_evaluate(ctx: StageContext) -> StageOutcome:
    from layerlens_jax.app.pipeline import build_variant, evaluate_split, write_json
    from layerlens_jax.app.rundir import load_checkpoint

    cfg, out = ctx.cfg, ctx.out
    (out / "evaluation.json").unlink(missing_ok=True)  # a failed evaluation leaves none
    plans = _load_plans(ctx)
    ctx.require("plan", "train")
    seed = cfg.compare.seeds[0]
    model, _ = build_variant(ctx.prep, cfg.compare.main, plans[cfg.compare.main], seed)
    load_checkpoint(out / "checkpoint", model, head=cfg.train.head)
    result = {split: evaluate_split(model, ctx.prep.arrays[split], cfg.data.eval_batch_size)
              for split in ("validation", "test")}
    result["variant"], result["seed"] = cfg.compare.main, seed
    write_json(out / "evaluation.json", result)
    m = result["test"]["metric"]
    ctx.log(f"evaluate {cfg.compare.main} (checkpoint, seed {seed}): test {m} "
            f"{100 * result['test']['score']:.2f}%, validation {m} "
            f"{100 * result['validation']['score']:.2f}%")
    return StageOutcome(outputs=(out / "evaluation.json",))


def verdict(summary: list[dict[str, Any]]) -> str | None:
    by = {r["variant"]: r for r in summary}
    if "uniform_lora" not in by:
        return None
    base = by["uniform_lora"]
    parts = []
    for v in ("layerlens_lora", "layerlens_mixed"):
        if v in by:
            r = by[v]
            d = r["test_score_mean"] - base["test_score_mean"]
            ratio = (r["adapter_params"] or 0) / max(base["adapter_params"] or 1, 1)
            goal = d >= 1.0 or (d >= 0 and ratio <= 0.5)
            n = len(r.get("seeds", ())) or 1
            points = "accuracy" if r.get("metric", "accuracy") == "accuracy" else "R² x 100"
            parts.append(f"{v} vs uniform_lora: {d:+.2f} {points} points at "
                         f"{100 * ratio:.0f}% of its adapter parameters over {n} seed"
                         f"{'s' if n > 1 else ''} — goal (≥ +1 point, or match at ≤ 50 % params) "
                         f"{'met' if goal else 'NOT met'}"
                         f"{'' if n >= 3 else ' on this run (the goal is stated for 3 seeds)'}.")
    return " ".join(parts)


def timing_summary(seconds: dict[str, float]) -> str | None:
    """``"profile 3.1s, allocate 0.2s, train 10.0s, evaluate 1.0s; profile+allocate 25% of the
    run"`` from ``{stage: seconds}`` (the plan stage is the allocation); None when empty."""
    names = {"profile": "profile", "plan": "allocate", "train": "train", "evaluate": "evaluate"}
    parts = [f"{names[s]} {seconds[s]:.1f}s" for s in names if s in seconds]
    if not parts:
        return None
    total = sum(seconds.get(s, 0.0) for s in names)
    share = (seconds.get("profile", 0.0) + seconds.get("plan", 0.0)) / total if total else 0.0
    return ", ".join(parts) + f"; profile+allocate {100 * share:.0f}% of the run"


def stage_report(ctx: StageContext) -> StageOutcome:
    from layerlens_jax._src.plan_metrics import plan_metrics, render_metrics_markdown
    from layerlens_jax._src.utility import UtilityReport
    from layerlens_jax.app import report as R
    from layerlens_jax.app.pipeline import write_json
    from layerlens_jax.app.summary import comparison_markdown
    from layerlens_jax.app.stats_file import check_stats_json, read_json
    from layerlens_jax.app.rundir import stage_seconds

    cfg, out = ctx.cfg, ctx.out
    stats_json = check_stats_json(read_json(out / "stats.json", "profile"), out / "stats.json")
    plans = _load_plans(ctx)
    results = read_json(out / "results.json", "train") if (out / "results.json").is_file() else None
    ctx.require("profile", "plan", *(("train",) if results is not None else ()))
    rep = {k: v for k, v in stats_json["utility_report"].items() if k not in ("checks", "passed")}
    utility_md = UtilityReport(**rep).to_markdown()
    band = tuple(cfg.budget.utilisation) if cfg.budget.utilisation else None
    metrics = {name: plan_metrics(p, utilisation_band=band) for name, p in plans.items()}
    sections = {name: render_metrics_markdown(m, title=f"Plan {name}")
                for name, m in metrics.items()}
    comparison = verdict_text = None
    images = [R.plot_utility(stats_json, out / "utility.png"),
              R.plot_allocation(plans, out / "allocation.png"),
              R.plot_budget_use(plans, out / "budget_use.png")]
    if results:
        comparison = comparison_markdown(results["summary"])
        verdict_text = verdict(results["summary"])
        images.append(R.plot_curves(results["results"], out / "curves.png"))
    seconds = stage_seconds(out)
    diverged = (results or {}).get("diverged", [])
    R.write_report(out / "report.md", title=f"LayerLens-JAX run `{cfg.run.name}` "
                   f"({cfg.data.task})", config=cfg.to_dict(), stats_json=stats_json,
                   utility_md=utility_md, plan_sections=sections, comparison_md=comparison,
                   verdict=verdict_text, images=[str(i) for i in images],
                   timings=timing_summary(seconds), diverged=[d["message"] for d in diverged])
    write_json(out / "metrics.json", {
        "utility": stats_json["utility_report"],
        "plans": {name: m.to_dict() if hasattr(m, "to_dict") else str(m)
                  for name, m in metrics.items()},
        "comparison": None if results is None else results["summary"],
        "verdict": verdict_text, "diverged": diverged,
        "stage_seconds": {s: seconds.get(s) for s in ("profile", "plan", "train", "evaluate")}})
    ctx.log(f"report: {out / 'report.md'} ({len(images)} plots)")
    if comparison:
        ctx.log(comparison)
        if verdict_text:
            ctx.log(verdict_text)
    return StageOutcome(outputs=(out / "report.md", out / "metrics.json", *images))


_STAGE_FNS = {"profile": stage_profile, "plan": stage_plan, "train": stage_train,
              "evaluate": stage_evaluate, "report": stage_report}


def run_stages(ctx: StageContext, command: str) -> tuple[str, ...]:
    """Run ``command``'s stages under the run directory's lock; the problems that did not stop
    them. ``run`` skips a stage that is complete and fresh; a stage named alone always runs."""
    from layerlens_jax.app.pipeline import write_json
    from layerlens_jax.app.rundir import (RunLock, recover_checkpoint, remove_marker,
                                          stage_inputs, stage_status, write_marker)

    problems: list[str] = []
    with RunLock(ctx.out):
        recover_checkpoint(ctx.out / "checkpoint")
        for stage in (STAGES if command == "run" else (command,)):
            inputs = stage_inputs(ctx.cfg_dict, stage, ctx.out)
            if command == "run":
                status, why = stage_status(ctx.out, stage, inputs)
                if status == "complete":
                    ctx.log(f"{stage}: complete and up to date, skipped")
                    continue
                if status != "missing":
                    ctx.log(f"{stage}: {status} ({why}): recomputing")
            remove_marker(ctx.out, stage)
            t0 = time.perf_counter()
            outcome = _STAGE_FNS[stage](ctx)
            write_marker(ctx.out, stage, inputs, outcome.outputs, time.perf_counter() - t0)
            problems += outcome.problems
        write_json(ctx.out / "config.json", ctx.cfg_dict)  # the last command that completed
    return tuple(problems)


def _exit_code(e: BaseException) -> int | None:
    """1 for a stage's input in the run directory, 2 for other expected failures, None for a bug
    (its traceback is shown)."""
    from layerlens_jax._src.checkpoint import CheckpointError
    from layerlens_jax.app.rundir import StageInputError

    if isinstance(e, (StageInputError, CheckpointError)):
        return 1
    if isinstance(e, (ValueError, TypeError, OSError, FloatingPointError)):
        return 2
    return None


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and e.filename:
        return f"{e.filename}: {e.strerror}"
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())  # one line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="layerlens", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=STAGES + ("run",))
    ap.add_argument("-c", "--config", default="configs/default.toml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="print only the final summary (no progress messages or bars)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = ap.parse_args(argv)

    from layerlens_jax.app.config import ConfigError, load_config
    from layerlens_jax.app.rundir import open_run_directory, stage_seconds

    try:
        cfg = load_config(args.config, _parse_set(args.set))
    except ConfigError as e:
        if args.debug:
            raise
        print(f"layerlens: config error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        out = open_run_directory(cfg.run.output_dir)
        ctx = StageContext(cfg=cfg, cfg_dict=cfg.to_dict(), out=out,
                           log=(lambda msg: None) if args.quiet else print,
                           progress=not args.quiet)
        problems = run_stages(ctx, args.command)
    except Exception as e:  # noqa: BLE001 - expected failures end in one line, bugs re-raise
        code = _exit_code(e)
        if args.debug or code is None:
            raise
        print(f"layerlens {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return code
    timing = timing_summary(stage_seconds(out))
    print(f"layerlens {args.command} done in {time.perf_counter() - t0:.0f}s"
          f"{f' ({timing})' if timing else ''}: {out}")
    if problems:
        print(f"layerlens {args.command}: error: " + " | ".join(problems), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
