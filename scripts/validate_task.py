"""Task-performance validation: LayerLens plans vs the uniform configurations a careful user tries,
at the same parameter budget.

For each task (``--tasks``: trec6, trec50, movie_sentiment, tweet_sentiment; ``name:500`` keeps 500
training examples) and each budget (the parameter count of uniform LoRA r=8 on query/value of the
6 layers, times ``--budgets``), fine-tunes the pretrained MiniLM-L6 with the ``--variants``
(:data:`DEFAULT_VARIANTS`): the uniform candidates ``uniform:{qv,qkvo,ffn,all}`` (largest rank
that fits), the allocated plans (``layerlens_lora``, ``layerlens_mixed``, the spectral, tied,
probe, fill and reallocating plans, GoRA's ``gora`` / ``gora_fill`` / ``gora_fill_rs`` /
``gora_gain`` and the job's default ``gora_floor``), EVA-JAX, AdaLoRA-JAX, and ``head_only`` /
``full`` once per task. Every seed pairs the data order, head initialisation and optimizer
settings across variants; every choice is made on validation, the test split only reported.

Results are stored by a hash of each run's settings in ``<out>/validation.json`` after every run:
a rerun continues and never recomputes (``--merge DIR...`` unions worker stores, ``--render``
rewrites ``validation.md``). ``--vmap-seeds N`` trains up to N pending seeds of a variant in one
vmapped step (an accelerator). ``--predictive`` also measures the utility's predictive validity.

    python scripts/validate_task.py --tasks trec6 --budgets 1.0 0.125 --seeds 0 1 2 3 4
    python scripts/validate_task.py --tasks trec6:500 --budgets 1.0 --variants uniform:all gora_floor
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
from layerlens_jax.app.pipeline import (_mean_loss, evaluate_split, prepare, run_profile,
                                        train_variant, write_json)
from layerlens_jax.app.plans import gora_floor_plan, gora_importance, make_plans

MAX_LENGTH = {"trec6": 32, "trec50": 32, "movie_sentiment": 48, "tweet_sentiment": 48}  # ~95-99th pct


def _split_task(spec: str) -> tuple[str, int]:
    """``"trec6"`` -> ("trec6", 0); ``"trec6:500"`` -> ("trec6", 500) (the low-data regime)."""
    task, _, n = spec.partition(":")
    return task, int(n or 0)


def _steps(args, n_train: int | None = None) -> int:
    """Training steps of a run: ``--steps``, or ``--epochs`` passes over ``n_train`` examples at
    the job's batch size (rounded up; the training-length sensitivity runs)."""
    if not args.epochs or n_train is None:
        return args.steps
    return int(np.ceil(args.epochs * n_train / args.batch_size))


def _cfg(spec: str, args, scale: float = 1.0, n_train: int | None = None):
    task, train_examples = _split_task(spec)
    steps = _steps(args, n_train)
    overrides = {"data.task": task, "data.train_examples": train_examples,
                 "model.max_length": MAX_LENGTH.get(task, 48),
                 "train.steps": steps, "train.eval_every": max(steps // 3, 1),
                 "budget.scale": scale, "profile.batches": args.profile_batches,
                 "run.output_dir": str(Path(args.out) / spec.replace(":", "_"))}
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
        return evaluate_split(nnx.merge(graphdef, tr, rest), val, 256)["loss"]

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


PLAN_VARIANTS = ("layerlens_lora", "layerlens_mixed", "spectral_frobenius", "spectral_nuclear",
                 "spectral_breadth", "tied_lora", "tied_spectral", "probe_lora", "probe_tied",
                 "fill_lora", "fill_tied", "realloc_fill", "realloc_lora", "eva", "eva_rho2",
                 "adalora", "gora", "gora_fill", "gora_fill_rs", "gora_floor", "gora_gain")
DEFAULT_VARIANTS = ("uniform:qv", "uniform:qkvo", "uniform:ffn", "uniform:all") + PLAN_VARIANTS + (
    "head_only", "full")


def sweep_plans(bcfg, sites, u, spectra, variants, eva=None, probe=None) -> dict:
    """Every plan variant at ``bcfg``'s budget: the uniform candidates and the allocated plans,
    each with its allocation seconds in ``metadata['allocate_seconds']`` (uniform: 0)."""
    from layerlens_jax._src.allocate import allocate
    from layerlens_jax._src.costs import Catalogue
    from layerlens_jax._src.plan import Plan, uniform_assignments
    from layerlens_jax._src.spectral import SpectralGain
    from layerlens_jax.app.sweep import uniform_candidates, widest_floor

    plans = make_plans(bcfg, list(sites), u)  # uniform_lora / _widest, layerlens_lora / _mixed
    budget = plans["layerlens_lora"].budgets["params"]  # the reference budget times the scale
    ref_opts = {"lora_alpha": bcfg.budget.reference_alpha, "use_rslora": False}
    out = {}
    for name, (targets, rank, _) in uniform_candidates(sites, budget).items():
        if name in variants:
            out[name] = Plan.from_assignments(
                sites, uniform_assignments(sites, "lora", rank, targets), u,
                peft_options=ref_opts, metadata={"variant": name, "rank": rank})
    a = bcfg.allocate
    for name in ("layerlens_lora", "layerlens_mixed"):
        if name in variants:
            out[name] = plans[name]
    for name, norm, ranks, tie in (("spectral_frobenius", "frobenius", a.lora_ranks, None),
                                   ("spectral_nuclear", "nuclear", a.lora_ranks, None),
                                   ("spectral_breadth", "frobenius", (1,), None),
                                   ("tied_lora", None, a.lora_ranks, "layers"),
                                   ("tied_spectral", "frobenius", a.lora_ranks, "layers")):
        if name in variants:
            t0 = time.perf_counter()
            gain = a.gain_model() if norm is None else SpectralGain(
                spectra=spectra, norm=norm, fallback=a.gain_model())
            out[name] = allocate(sites, u, {"params": budget},
                                 catalogue=Catalogue.from_sizes(lora=ranks), gain_model=gain,
                                 peft_options={"lora_alpha": a.lora_alpha,
                                               "use_rslora": a.use_rslora}, tie=tie)
            out[name] = dataclasses.replace(out[name], metadata={
                **out[name].metadata, "allocate_seconds": time.perf_counter() - t0})
    importance = gora_importance(sites, spectra)  # {path: mean |W * G|} of the linear targets
    rs_opts = {"lora_alpha": a.lora_alpha, "use_rslora": a.use_rslora}
    if "gora_floor" in variants and importance:
        # coverage first (rank 1 on the widest uniform set that fits), then GoRA: the job's plan
        out["gora_floor"] = gora_floor_plan(sites, u, importance, budget, peft_options=ref_opts)
    for name, fill, opts in (("gora", False, ref_opts), ("gora_fill", True, ref_opts),
                             ("gora_fill_rs", True, rs_opts)):
        # GoRA (layerlens_jax._src.gora): ranks by share of the importance; gora_fill spends what
        # its floor leaves by the largest remainder; gora_fill_rs: gora_fill's ranks at the
        # utility plans' LoRA scaling (allocate.lora_alpha, rsLoRA) -- signal vs scale
        if name in variants and importance:
            from layerlens_jax._src.gora import gora_ranks
            t0 = time.perf_counter()
            targets = [x for x in sites if x.path in importance]
            ranks = gora_ranks(targets, [importance[x.path] for x in targets], budget, fill=fill)
            out[name] = Plan.from_assignments(
                sites, {path: ("lora", r) for path, r in ranks.items() if r > 0}, u,
                peft_options=opts, metadata={"variant": name,
                                                 "allocate_seconds": time.perf_counter() - t0})
    if "gora_gain" in variants and importance:
        # GoRA's importance as the utility of LayerLens's allocator (its gain model and LoRA
        # ranks) over the same linear targets, at gora_fill's LoRA scaling: signal vs rule
        t0 = time.perf_counter()
        ug = np.array([importance.get(x.path, 0.0) for x in sites])
        out["gora_gain"] = allocate(sites, ug / ug.max(), {"params": budget},
                                    catalogue=Catalogue.from_sizes(lora=a.lora_ranks),
                                    gain_model=a.gain_model(), peft_options=ref_opts)
        out["gora_gain"] = dataclasses.replace(out["gora_gain"], metadata={
            **out["gora_gain"].metadata, "allocate_seconds": time.perf_counter() - t0})
    floor = widest_floor(sites, budget)
    for name, tie in (("fill_lora", None), ("fill_tied", "layers")):
        # the widest uniform set at rank 1 is mandatory; utility spends the rest of the budget.
        # Standard LoRA scaling (the baselines'), so an empty fill is exactly uniform_widest's r1.
        if (name in variants or name == "fill_lora" and "realloc_fill" in variants) and floor:
            t0 = time.perf_counter()
            out[name] = allocate(sites, u, {"params": budget},
                                 catalogue=Catalogue.from_sizes(lora=a.lora_ranks),
                                 gain_model=a.gain_model(), min_size=floor,
                                 peft_options=ref_opts, tie=tie)
            out[name] = dataclasses.replace(out[name], metadata={
                **out[name].metadata, "allocate_seconds": time.perf_counter() - t0,
                "floor": sorted(floor)})
    # in-training reallocation (train_variant's hook) starts from these plans
    made = {**plans, **out}
    for name, start in (("realloc_fill", "fill_lora"), ("realloc_lora", "layerlens_lora")):
        if name in variants and start in made:
            p = made[start]
            out[name] = dataclasses.replace(p, metadata={**p.metadata, "variant": name,
                                                         "floor": sorted(floor)})
    for name, tie in (("probe_lora", None), ("probe_tied", "layers")):
        if name in variants and probe is not None:
            t0 = time.perf_counter()
            out[name] = allocate(sites, probe.utility, {"params": budget},
                                 catalogue=Catalogue.from_sizes(lora=a.lora_ranks),
                                 gain_model=a.gain_model(),
                                 peft_options={"lora_alpha": a.lora_alpha,
                                               "use_rslora": a.use_rslora}, tie=tie)
            out[name] = dataclasses.replace(out[name], metadata={
                **out[name].metadata, "allocate_seconds": time.perf_counter() - t0,
                "probe_seconds": probe.seconds})
    for name, rho in (("eva", 1.0), ("eva_rho2", 2.0)):
        if name in variants and eva is not None:
            from layerlens_jax._src.eva import eva_allocate_params, eva_plan
            targets = [x for x in sites if x.path in eva]
            rank = max(1, int(round(bcfg.budget.reference_rank * bcfg.budget.scale)))
            t0 = time.perf_counter()
            ranks = eva_allocate_params(eva, params_budget=budget, rank=rank, rho=rho,
                                        sites=targets)
            out[name] = eva_plan(sites, ranks, u, peft_options=ref_opts,
                                 metadata={"variant": name, "rho": rho,
                                           "allocate_seconds": time.perf_counter() - t0})
    return out


def _eva_adapt(prep, plan, eva):
    """EVA's model: the plan's LoRA, A initialised from the inputs' principal components."""
    from layerlens_jax._src.eva import eva_init
    from layerlens_jax._src.peft import apply_plan

    ranks = {site: size for site, (_, size) in plan.assignments().items()}

    def adapt(base, seed):
        model = apply_plan(base, plan, inplace=True, example=prep.example())
        return eva_init(model, eva, ranks, inplace=True)
    return adapt


def _adalora(bcfg, sites):
    """AdaLoRA on query+value from rank 1.5x the uniform rank down to it (HF's 12 -> 8)."""
    from layerlens_jax._src import adalora as ad

    target = max(1, int(round(bcfg.budget.reference_rank * bcfg.budget.scale)))
    r_init = int(np.ceil(1.5 * target))
    names = set(bcfg.budget.reference_targets)
    targets = [x.path for x in sites if x.kind == "linear" and x.path.rsplit("/", 1)[-1] in names]
    steps = bcfg.train.steps
    config = ad.AdaLoRAConfig(target_rank=target, total_step=steps, tinit=max(1, steps // 10),
                              tfinal=max(1, steps // 5), delta_t=1)

    def adapt(base, seed):
        return ad.apply_adalora(base, targets, r_init, alpha=bcfg.budget.reference_alpha,
                                seed=seed, inplace=True)

    def make_step(model, tx, loss_fn, wrt):
        return ad.make_adalora_train_step(model, loss_fn, tx, config, wrt=wrt)
    return adapt, make_step


def _reallocation(prep, variant, plan, sites, args):
    """``(reallocate, built)`` for train_variant (``built[0]``: the run's log of reallocations
    once trained): re-profile and re-solve at ``--realloc-at``
    fractions of training with the initial plan's settings (its floor, gain model, options)."""
    from layerlens_jax.app.reallocation import reallocation_hook

    a = prep.cfg.allocate
    options = {"gain_model": a.gain_model()}
    if plan.metadata.get("floor") and variant == "realloc_fill":
        options["min_size"] = {path: 1 for path in plan.metadata["floor"]}
    built = []  # the log of the hook train_variant builds (one per run)

    def reallocate(wrt):
        hook, log = reallocation_hook(prep, variant, plan, sites, at=args.realloc_at, wrt=wrt,
                                      allocate_options=options)
        built.append(log)
        return hook
    return reallocate, built


def _eva_statistics(prep, stats):
    """EVA's input statistics of the uniform target sites on the profiling batches."""
    from layerlens_jax._src.eva import eva_statistics
    from layerlens_jax._src.plan import uniform_assignments
    from layerlens_jax.app.data import iterate_batches

    cfg = prep.cfg
    sites = list(stats.sites)
    chosen = uniform_assignments(sites, "lora", 1, cfg.budget.reference_targets)
    targets = [x for x in sites if x.path in chosen]
    batches = iterate_batches(prep.arrays["train"], cfg.data.batch_size, seed=cfg.run.seed,
                              epoch=10_000)
    batches = [b for _, b in zip(range(cfg.profile.batches), batches)]
    return eva_statistics(prep.build_model(cfg.run.seed), batches, targets, forward=_forward)


def _forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def _settings(spec, scale, variant, seed, args, steps: int) -> dict:
    return {"task": spec, "budget": scale, "variant": variant, "seed": seed, "steps": steps,
            **({"epochs": args.epochs} if args.epochs else {}),
            "profile_batches": args.profile_batches, "config": args.config,
            "set": sorted(args.set), "protocol": 3,
            **({"probe_steps": args.probe_steps} if variant.startswith("probe_") else {}),
            **({"realloc_at": list(args.realloc_at)} if variant.startswith("realloc_") else {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--tasks", nargs="+", default=["trec6", "movie_sentiment"],
                    help="task names; task:N keeps N training examples (low-data regime)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.125, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--epochs", type=float, default=0.0,
                    help="train this many passes over each task's training split instead of "
                         "--steps (training-length sensitivity)")
    ap.add_argument("--profile-batches", type=int, default=8)
    ap.add_argument("--vmap-seeds", type=int, default=1, metavar="N",
                    help="train up to N pending seeds of a variant in one vmapped step (an "
                         "accelerator; on a CPU it gains nothing); the stored runs and their keys "
                         "are the same as one seed at a time")
    ap.add_argument("--predictive", action="store_true")
    ap.add_argument("--predictive-steps", type=int, default=20)
    ap.add_argument("--out", default="runs/validation")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite validation.md from the stored results")
    ap.add_argument("--probe-steps", type=int, default=30,
                    help="steps of the probe run of the probe_* variants (part of their cost)")
    ap.add_argument("--realloc-at", type=float, nargs="+", default=[1 / 3],
                    help="fractions of training after which the realloc_* variants reallocate")
    ap.add_argument("--plans-only", action="store_true",
                    help="profile and allocate, store and print the plans, train nothing")
    ap.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                    help="merge the stores of these sweep folders into --out, then render")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="config override, as for `layerlens` (e.g. utility.transform='sqrt')")
    args = ap.parse_args()

    from layerlens_jax.app.sweep import run_key, upgrade_runs
    out = Path(args.out)
    store_path = out / "validation.json"
    store = {"runs": {}, "plans": {}, "utility": {}, "predictive": {}, "timing": {}}
    if store_path.is_file():
        store = {**store, **json.loads(store_path.read_text())}
        store["runs"] = upgrade_runs(store["runs"])
    if args.merge:
        for d in args.merge:
            if not (Path(d) / "validation.json").is_file():
                print(f"{d}: no validation.json (no finished run), skipped", file=sys.stderr)
                continue
            other = json.loads((Path(d) / "validation.json").read_text())
            other["runs"] = upgrade_runs(other.get("runs", {}))
            for field in ("runs", "utility", "predictive", "timing"):
                store[field] = {**store.get(field, {}), **other.get(field, {})}
            plans = store.setdefault("plans", {})  # per task@budget, the union of the variants
            for key, by_variant in other.get("plans", {}).items():
                plans[key] = {**plans.get(key, {}), **by_variant}
            store.setdefault("commands", []).append(other.get("command", ""))
        store["command"] = "merged: " + "; ".join(c for c in store.get("commands", []) if c)
        write_json(store_path, store)
    if args.render or args.merge:
        md = render(store)
        (out / "validation.md").write_text(md)
        print(md)
        return
    store["command"] = "python " + " ".join(sys.argv)

    for spec in args.tasks:
        cfg = _cfg(spec, args)
        args.batch_size = cfg.data.batch_size
        prep = prepare(cfg)
        n_train = len(prep.arrays["train"]["labels"])
        if args.epochs:
            cfg = _cfg(spec, args, n_train=n_train)
            prep = dataclasses.replace(prep, cfg=cfg)
        steps = cfg.train.steps
        t0 = time.perf_counter()
        stats, u, rep = run_profile(prep, progress=False)
        profile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        spectra = _spectra(prep, stats)
        spectra_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        eva = _eva_statistics(prep, stats) if {"eva", "eva_rho2"} & set(args.variants) else None
        eva_s = time.perf_counter() - t0
        probe = (_probe(prep, stats, args.probe_steps)
                 if {"probe_lora", "probe_tied"} & set(args.variants) else None)
        store["utility"][spec] = rep.to_dict()
        store["timing"][spec] = {"profile_seconds": profile_s, "spectra_seconds": spectra_s,
                                 "eva_seconds": eva_s,
                                 "probe_seconds": probe.seconds if probe else 0.0}
        if probe is not None:
            store.setdefault("probe", {})[spec] = probe.to_dict()
        print(f"[{spec}] utility: CV {rep.cv:.3f}, r(grad) {rep.grad_corr:.3f}, "
              f"r(fisher) {rep.fisher_corr:.3f}; profile {profile_s:.1f}s, spectra "
              f"{spectra_s:.1f}s", flush=True)
        if args.predictive and spec not in store["predictive"]:
            pv = predictive_validity(prep, stats, u, args.predictive_steps, cfg.train.learning_rate)
            store["predictive"][spec] = pv
            write_json(store_path, store)
        for scale in args.budgets:
            bcfg = _cfg(spec, args, scale, n_train=n_train)
            prep_b = dataclasses.replace(prep, cfg=bcfg)
            plans = sweep_plans(bcfg, list(stats.sites), u, spectra, args.variants, eva, probe)
            from layerlens_jax._src.plan_metrics import plan_metrics
            store["plans"][f"{spec}@{scale}"] = {
                name: {"assignments": {k: list(v) for k, v in p.assignments().items()},
                       "params": p.use["params"],
                       "allocate_seconds": p.metadata.get("allocate_seconds", 0.0),
                       "metrics": plan_metrics(p).to_dict()} for name, p in plans.items()}
            if args.plans_only:
                for name, p in plans.items():
                    print(f"[{spec} x{scale}] {name} ({p.use['params']:,.0f} params): "
                          f"{_summarise_assignments(p.assignments())}", flush=True)
                continue
            pending = []  # (variant, seed, key, key scale), seed-major: paired seeds finish first
            for seed in args.seeds:
                for variant in args.variants:
                    if variant in ("head_only", "full"):
                        if scale != args.budgets[0]:
                            continue  # once per task
                        key_scale = 0.0
                    elif variant in plans or variant == "adalora":
                        key_scale = scale
                    else:
                        continue  # a uniform target set whose rank 1 does not fit
                    key = run_key(_settings(spec, key_scale, variant, seed, args, steps))
                    if key not in store["runs"]:
                        pending.append((variant, seed, key, key_scale))
            for group in _groups(pending, args.vmap_seeds):
                variant, key_scale = group[0][0], group[0][3]
                hooks = {}
                if variant in ("eva", "eva_rho2"):
                    hooks["adapt"] = _eva_adapt(prep_b, plans[variant], eva)
                elif variant == "adalora":
                    hooks["adapt"], hooks["make_step"] = _adalora(bcfg, list(stats.sites))
                elif variant.startswith("realloc_"):
                    hooks["reallocate"], built = _reallocation(prep_b, variant, plans[variant],
                                                             list(stats.sites), args)
                if len(group) > 1:  # the seeds of one configuration in one vmapped step
                    from layerlens_jax.app.seeds import train_seeds
                    results = train_seeds(prep_b, variant, plans.get(variant),
                                          [g[1] for g in group], **hooks)
                else:
                    results = [train_variant(prep_b, variant, plans.get(variant), group[0][1],
                                             progress=False, **hooks)]
                for (_, seed, key, _), res in zip(group, results):
                    r = {**res.to_json(), "task": spec, "budget_scale": key_scale}
                    if len(group) > 1:
                        r["seeds_together"] = len(group)
                    if variant.startswith("realloc_"):
                        log = built[0] if built else []
                        r["reallocations"] = [x.to_json() for x in log]
                        r["reallocate_seconds"] = sum(x.seconds for x in log)
                    store["runs"][key] = r
                    print(f"[{spec} x{key_scale}] {variant} seed {seed}: test "
                          f"{100 * r['test_score']:.2f}% val {100 * r['val_score']:.2f}% "
                          f"({r['trainable_params']:,} trainable, {r['train_seconds']:.0f}s)",
                          flush=True)
                write_json(store_path, store)
    write_json(store_path, store)
    md = render(store)
    (out / "validation.md").write_text(md)
    print(md)


def _groups(pending, vmap_seeds: int):
    """The runs to train, in groups: one run each (``vmap_seeds <= 1``), else up to ``vmap_seeds``
    pending seeds of one stackable variant together (app.seeds), variant by variant."""
    from layerlens_jax.app.seeds import stackable

    if vmap_seeds <= 1:
        return [[p] for p in pending]
    out = []
    for variant in dict.fromkeys(p[0] for p in pending):
        mine = [p for p in pending if p[0] == variant]
        if variant == "adalora" or not stackable(variant):
            out += [[p] for p in mine]
        else:
            out += [mine[i:i + vmap_seeds] for i in range(0, len(mine), vmap_seeds)]
    return out


def _summarise_assignments(assignments: dict) -> str:
    """``value r4 x6, query r1 x2``: the plan's options per site kind (layer indices dropped)."""
    from collections import Counter

    from layerlens_jax._src.ties import tie_key

    counts = Counter((tie_key(path), f"{m} {size}") for path, (m, size) in assignments.items())
    return ", ".join(f"{key} {opt} x{n}" for (key, opt), n in sorted(counts.items()))


def _probe(prep, stats, steps):
    """Probe utility (layerlens_jax._src.probe): rank-1 LoRA on every LoRA-able site and the task
    head trained together for ``steps`` batches with the run's optimizer (AdamW at the plans'
    learning rate, constant), each site credited with its adapter's first-order loss decrease."""
    import optax
    from flax import nnx

    from layerlens_jax._src.peft.nnx_modules import PEFT_FILTER
    from layerlens_jax._src.probe import probe_utility
    from layerlens_jax.app.data import iterate_batches
    from layerlens_jax.app.pipeline import _mean_loss
    from layerlens_jax.app.rundir import head_filter

    cfg = prep.cfg
    batches = iterate_batches(prep.arrays["train"], cfg.data.batch_size, seed=cfg.run.seed,
                              epoch=10_000)
    tx = optax.adamw(cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    return probe_utility(prep.build_model(cfg.run.seed), _mean_loss, batches, list(stats.sites), tx,
                         steps=steps, wrt=nnx.Any(PEFT_FILTER, head_filter(cfg.train.head)),
                         peft_options={"lora_alpha": cfg.allocate.lora_alpha,
                                       "use_rslora": cfg.allocate.use_rslora})


def _spectra(prep, stats):
    """Gradient spectra of the profiled sites on the profiling batches (same order and count)."""
    from layerlens_jax._src.spectral import gradient_spectra
    from layerlens_jax.app.data import iterate_batches
    from layerlens_jax.app.pipeline import task_loss

    cfg = prep.cfg
    model = prep.build_model(cfg.run.seed)
    batches = iterate_batches(prep.arrays["train"], cfg.data.batch_size, seed=cfg.run.seed,
                              epoch=10_000)
    return gradient_spectra(model, task_loss, batches, list(stats.sites),
                            max_batches=cfg.profile.batches)


def _profile_seconds(timing: dict, variant: str) -> float:
    """The task-level measurement a variant's plan needs: utility profile, plus the gradient
    spectra (spectral / GoRA plans), EVA's input statistics or the probe run; 0 for uniform."""
    if variant.startswith("uniform") or variant in ("head_only", "full", "adalora"):
        return 0.0
    extra = {"spectral": "spectra_seconds", "tied_spectral": "spectra_seconds",
             "gora": "spectra_seconds", "eva": "eva_seconds", "probe": "probe_seconds"}
    key = next((k for prefix, k in extra.items() if variant.startswith(prefix)), None)
    return timing.get("profile_seconds", 0.0) + (timing.get(key, 0.0) if key else 0.0)


def _plan_table(store, spec, scale, runs, variants) -> list[str]:
    """Plan metrics (plan_metrics) and the wall clock split of each variant at one budget."""
    plans = store.get("plans", {}).get(f"{spec}@{scale}", {})
    timing = store.get("timing", {}).get(spec, {})
    rows = []
    for v in variants:
        if v not in plans:
            continue
        m = plans[v].get("metrics", {})
        vr = [r for r in runs if r["variant"] == v]
        train = float(np.mean([r["train_seconds"] for r in vr]))
        realloc = float(np.mean([r.get("reallocate_seconds", 0.0) for r in vr]))
        prof, alloc = _profile_seconds(timing, v), plans[v].get("allocate_seconds", 0.0)
        over = (prof + alloc + realloc) / train if train > 0 else float("nan")
        def num(key, scale=1.0, digits=2):
            x = m.get(key)
            return "—" if x is None or not np.isfinite(x) else f"{scale * x:.{digits}f}"
        rows.append(f"| {v} | {m.get('n_adapted', '—')} | {num('binding_utilisation', 100, 1)} | "
                    f"{num('spearman')} | {num('consistency_overall')} | "
                    f"{num('compatibility_rate')} | {m.get('method_diversity', '—')} | "
                    f"{prof:.1f} | {alloc:.2f} | {realloc:.1f} | {train:.0f} | {100 * over:.1f} |")
    if not rows:
        return []
    return ["Plans (plan_metrics) and wall clock (seconds; profile: the task's measurement the plan "
            "needs, shared by its seeds and budgets; overhead = (profile + allocate + reallocate) "
            "/ train):\n",
            "| variant | adapted sites | budget used % | rank–utility Spearman | consistency | "
            "compatibility | methods | profile s | allocate s | reallocate s | train s | "
            "overhead % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, ""]


def render(store) -> str:
    from layerlens_jax.app.sweep import best_by_validation, paired_difference, pooled_difference

    runs = list(store["runs"].values()) if isinstance(store["runs"], dict) else store["runs"]
    lines = [f"# Task validation\n\nreproduce: `{store.get('command', '')}`\n",
             "Test accuracy % (mean ± std over seeds), validation in brackets. *best uniform*: the "
             "uniform configuration with the best mean validation accuracy at that budget. "
             "Δ: paired difference to it over the shared seeds, with the 95 % paired-t interval.\n"]
    summary = []
    for spec in dict.fromkeys(r["task"] for r in runs):
        lines.append(f"## {spec}\n")
        if spec in store.get("utility", {}):
            u = store["utility"][spec]
            lines.append(f"Utility: CV {u['cv']:.3f}, Pearson r with grad norm {u['grad_corr']:.3f}, "
                         f"with Fisher trace {u['fisher_corr']:.3f}.\n")
        task_runs = [r for r in runs if r["task"] == spec]
        for scale in sorted({r["budget_scale"] for r in task_runs}, reverse=True):
            rs = [r for r in task_runs if r["budget_scale"] == scale]
            variants = list(dict.fromkeys(r["variant"] for r in rs))
            best = best_by_validation(rs, [v for v in variants if v.startswith("uniform")])
            lines.append(f"### budget {scale:g}" + (f" — best uniform: `{best}`" if best else "")
                         + "\n")
            lines.append("| variant | test % | val % | val loss | seeds | adapter params | train s "
                         "| Δ test vs best uniform [95 % CI] |")
            lines.append("|---|---:|---:|---:|---:|---:|---:|---|")
            for v in variants:
                vr = [r for r in rs if r["variant"] == v]
                acc = 100 * np.array([r["test_score"] for r in vr])
                val = 100 * np.array([r["val_score"] for r in vr])
                vloss = np.array([r["val_loss"] for r in vr])
                d = paired_difference(vr, [r for r in rs if r["variant"] == best]) \
                    if best and v != best else None
                ci = "" if d is None else (f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
                                           + (" *" if d.excludes_zero else ""))
                if d is not None and not v.startswith("uniform") and scale > 0:
                    summary.append((spec, scale, v, d, (vr, [r for r in rs if r["variant"] == best])))
                lines.append(f"| {v} | {acc.mean():.2f} ± {acc.std():.2f} | ({val.mean():.2f}) | "
                             f"{vloss.mean():.4f} | {len(vr)} | {vr[0]['adapter_params'] or '—'} | "
                             f"{np.mean([r['train_seconds'] for r in vr]):.0f} | {ci} |")
            lines.append("")
            lines += _plan_table(store, spec, scale, rs, variants)
    if summary:
        lines.append("## Mean over tasks: plan − best uniform\n")
        lines.append("Per seed, the mean over the tasks of the paired difference; the interval is the "
                     "95 % paired-t interval of those per-seed means (seeds shared by every task "
                     "only). Validation: the same on the validation split.\n")
        lines.append("| budget | variant | tasks | mean Δ test [95 % CI] | mean Δ val [95 % CI] "
                     "| seeds | per task (test) |")
        lines.append("|---:|---|---:|---|---|---:|---|")
        for scale in sorted({s for _, s, _, _, _ in summary}, reverse=True):
            for v in dict.fromkeys(v for _, s, v, _, _ in summary if s == scale):
                rows = [(t, d, pair) for t, s, vv, d, pair in summary if s == scale and vv == v]
                pairs = [pair for _, _, pair in rows]
                test, val = pooled_difference(pairs), pooled_difference(pairs, key="val_score")
                per = ", ".join(f"{t} {d.mean:+.2f}" for t, d, _ in rows)
                cell = lambda d: "—" if d is None else (
                    f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" + (" *" if d.excludes_zero else ""))
                lines.append(f"| {scale:g} | {v} | {len(rows)} | {cell(test)} | {cell(val)} | "
                             f"{len(test.seeds) if test else 0} | {per} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
