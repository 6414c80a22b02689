"""The plan variants of a run, and the whole-step memory checks behind its VRAM budget.

* :func:`make_plans`: the reference uniform LoRA (its parameter count is the budget), the widest
  uniform LoRA that fits, the two allocated plans (LoRA-only, mixed) and, given GoRA's importance
  (:func:`measure_importance`), ``gora_floor`` (:func:`gora_floor_plan`: rank 1 on the widest
  uniform set that fits, the rest by importance -- the validated default);
* :func:`measure_whole_step`: the run's :class:`~layerlens_jax.StepProfile` (whole-step budgets
  and predictions);
* :func:`measure_step_memory` / :func:`within_measured_memory`: a plan's compiled train step, and
  re-allocation until it fits a ``vram_bytes`` budget.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from layerlens_jax._src.sites import Site
from layerlens_jax.app.config import RunConfig
from layerlens_jax.app.pipeline import (Prepared, _endless_batches, build_variant,
                                        step_memory, task_loss, variant_step)

__all__ = ["PLAN_VARIANTS", "make_plans", "gora_importance", "measure_importance",
           "gora_floor_plan", "measure_whole_step", "measure_step_memory",
           "within_measured_memory"]

PLAN_VARIANTS = ("uniform_lora", "uniform_widest", "layerlens_lora", "layerlens_mixed",
                 "gora_floor")



def measure_whole_step(prep: Prepared):
    """The :class:`~layerlens_jax.StepProfile` of the run's train step (a training batch of
    ``data.batch_size``, the seed's model): what makes ``vram_bytes`` / ``train_flops`` budgets
    and predictions mean the whole step."""
    from layerlens_jax._src.step_cost import measure_step_profile

    cfg = prep.cfg
    n = min(cfg.data.batch_size, prep.sizes["train"])
    batch = {k: jnp.asarray(v[:n]) for k, v in prep.arrays["train"].items()}
    return measure_step_profile(
        prep.build_model(cfg.run.seed), lambda m, b: task_loss(m, b).mean(), batch,
        example=(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))


def make_plans(cfg: RunConfig, sites: list[Site], u: np.ndarray,
               step_profile=None, measure: Callable[[str, Any], float | None] | None = None,
               importance: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The plan variants at the same trainable-parameter budget: the reference uniform LoRA, the
    widest uniform LoRA that fits (:func:`~layerlens_jax.app.sweep.widest_uniform`), the two
    allocated plans and, with ``importance`` (:func:`measure_importance`), ``gora_floor``
    (:func:`gora_floor_plan`, the validated default).

    With ``step_profile`` (:func:`measure_whole_step`) the ``vram_bytes`` / ``train_flops`` budgets
    are of the whole train step, and every plan's ``use`` is its whole-step prediction. With
    ``measure(variant, plan) -> bytes`` as well (:func:`measure_step_memory`), an allocated plan
    under a ``vram_bytes`` budget is checked against its compiled step and re-allocated until it
    fits (:func:`within_measured_memory`)."""
    from layerlens_jax._src.allocate import allocate
    from layerlens_jax._src.costs import Catalogue
    from layerlens_jax._src.plan import Plan, uniform_assignments
    from layerlens_jax._src.step_cost import with_step_use
    from layerlens_jax.app.sweep import widest_uniform

    b, a = cfg.budget, cfg.allocate
    peft_options = {"lora_alpha": a.lora_alpha, "use_rslora": a.use_rslora}
    reference_options = {"lora_alpha": b.reference_alpha, "use_rslora": False}
    # per-site costs at the profile's batch shape, with its measured LoRA input fraction
    cost_model = None if step_profile is None else step_profile.cost_model()

    def uniform_plan(target_names, lora_rank, **metadata):  # standard LoRA (baselines' scaling)
        return Plan.from_assignments(sites, uniform_assignments(sites, "lora", lora_rank,
                                                                target_names), u,
                                     peft_options=reference_options, metadata=metadata,
                                     cost_model=cost_model)

    uniform = uniform_plan(b.reference_targets, b.reference_rank, variant="uniform_lora")
    params_budget = uniform.use["params"] * b.scale
    budgets = {"params": params_budget}
    for r in ("train_flops", "infer_flops", "vram_bytes", "latency"):
        if math.isfinite(getattr(b, r)):
            budgets[r] = getattr(b, r)
    if b.scale != 1.0:  # the uniform baseline at a smaller budget: the same targets, rank scaled
        rank = max(1, int(round(b.reference_rank * b.scale)))
        uniform = uniform_plan(b.reference_targets, rank, variant="uniform_lora")
    utilisation = tuple(b.utilisation) if b.utilisation else None
    lora_only = Catalogue.from_sizes(lora=a.lora_ranks)
    mixed = Catalogue.from_sizes(lora=a.lora_ranks, adapter=a.adapter_sizes,
                                 prefix=a.prefix_lengths)
    plans = {"uniform_lora": uniform}
    gain = a.gain_model()
    with warnings.catch_warnings():  # an empty plan is reported below, as the job's own error
        warnings.filterwarnings("ignore", message="allocate returned an empty plan")
        tie = a.tie or None
        # the depth term only matters to whole-step budgets; otherwise predict after allocating
        whole = step_profile if set(budgets) & {"vram_bytes", "train_flops", "latency"} else None
        common = dict(gain_model=gain, utilisation=utilisation, peft_options=peft_options,
                      tie=tie, step_profile=whole, cost_model=cost_model)
        extra = {"layerlens_lora": dict(catalogue=lora_only),
                 "layerlens_mixed": dict(catalogue=mixed, exclusive_nesting=a.exclusive_nesting)}
        for name, kw in extra.items():
            def allocate_at(vram, kw=kw):
                limits = budgets if vram is None else {**budgets, "vram_bytes": vram}
                return allocate(sites, u, limits, **kw, **common)
            if measure is not None and whole is not None and "vram_bytes" in budgets:
                plans[name] = within_measured_memory(
                    allocate_at, budgets["vram_bytes"], lambda p, n=name: measure(n, p))
            else:
                plans[name] = allocate_at(None)
    for name, catalogue in (("layerlens_lora", lora_only), ("layerlens_mixed", mixed)):
        if all(x.method == "none" for x in plans[name].allocations):
            raise ValueError(_adapts_nothing(cfg, name, sites, catalogue, params_budget))
    widest = widest_uniform(sites, params_budget)
    if widest is None:
        raise ValueError(f"plan uniform_widest adapts no site: no uniform LoRA target set fits "
                         f"the parameter budget {params_budget:,.6g}; raise budget.scale")
    name, targets, rank, _ = widest
    plans = {"uniform_lora": uniform,
             "uniform_widest": uniform_plan(targets, rank, variant="uniform_widest",
                                            targets=name, rank=rank),
             **{k: v for k, v in plans.items() if k != "uniform_lora"}}
    if importance is not None:
        plans["gora_floor"] = gora_floor_plan(sites, u, importance, params_budget,
                                              peft_options=reference_options,
                                              cost_model=cost_model)
    if step_profile is not None:  # every plan's use is its whole-step prediction
        plans = {name: plan if "step_cost" in plan.metadata
                 else with_step_use(plan, sites, step_profile) for name, plan in plans.items()}
    return plans


def gora_importance(sites: Sequence[Site], spectra) -> dict[str, float]:
    """GoRA's importance (mean ``|W * G|``, :func:`~layerlens_jax._src.spectral.gradient_spectra`'s
    ``weight_gradient``) of the sites of the "all" uniform target set (every linear layer of the
    encoder) that have a finite one; {} without it."""
    from layerlens_jax.app.sweep import TARGET_SETS, targeted

    wg = getattr(spectra, "weight_gradient", None)
    if wg is None:
        return {}
    row = {path: i for i, path in enumerate(spectra.sites)}
    return {x.path: float(wg[row[x.path]]) for x in targeted(sites, TARGET_SETS["all"])
            if x.path in row and np.isfinite(wg[row[x.path]])}


def measure_importance(prep: Prepared, sites: Sequence[Site]) -> dict[str, float]:
    """:func:`gora_importance` measured on the profiling batches (same order and count as the
    profile, fresh model of ``run.seed``): one pass of mean gradients of the linear layers."""
    from layerlens_jax._src.spectral import gradient_spectra
    from layerlens_jax.app.data import iterate_batches
    from layerlens_jax.app.sweep import TARGET_SETS, targeted

    cfg = prep.cfg
    targets = targeted(sites, TARGET_SETS["all"])
    if not targets:
        return {}
    batches = iterate_batches(prep.arrays["train"], cfg.data.batch_size, seed=cfg.run.seed,
                              epoch=10_000)  # the profile's batches
    spectra = gradient_spectra(prep.build_model(cfg.run.seed), task_loss, batches, targets,
                               max_batches=cfg.profile.batches)
    return gora_importance(targets, spectra)


def gora_floor_plan(sites: Sequence[Site], u, importance: Mapping[str, float],
                    params_budget: float, *, peft_options: Mapping[str, Any] | None = None,
                    cost_model=None):
    """Coverage first, then importance: LoRA rank 1 on every site of the widest uniform target set
    whose rank 1 fits (:func:`~layerlens_jax.app.sweep.widest_floor`: all linear layers at the
    reference budget, query + value at 1/8 of it), and the rest of the budget by GoRA's
    proportional rule on ``importance`` (:func:`~layerlens_jax._src.gora.gora_ranks` with
    ``floor``). Where the floor takes the whole budget the plan is that uniform rank 1.
    ``ValueError`` naming the budget when no target set's rank 1 fits."""
    from layerlens_jax._src.gora import gora_ranks
    from layerlens_jax._src.plan import Plan
    from layerlens_jax.app.sweep import widest_floor

    t0 = time.perf_counter()
    floor = widest_floor(sites, params_budget)
    if not floor:
        raise ValueError(f"plan gora_floor adapts no site: no uniform LoRA target set's rank 1 fits "
                         f"the parameter budget {params_budget:,.6g}; raise budget.scale")
    targets = [s for s in sites if s.path in importance]
    missing = sorted(set(floor) - {s.path for s in targets})
    if missing:
        raise ValueError(f"plan gora_floor: no importance for site {missing[0]!r} of the floor")
    ranks = gora_ranks(targets, [importance[s.path] for s in targets], params_budget,
                       floor=floor)
    return Plan.from_assignments(
        sites, {path: ("lora", r) for path, r in ranks.items() if r > 0}, u,
        budgets={"params": params_budget}, peft_options=peft_options, cost_model=cost_model,
        metadata={"variant": "gora_floor", "floor": sorted(floor),
                  "allocate_seconds": time.perf_counter() - t0})


def _adapts_nothing(cfg: RunConfig, name: str, sites: list[Site], catalogue,
                    params_budget: float) -> str:
    """The error of a plan that adapts no site: the budget and the cheapest option's cost."""
    from layerlens_jax._src.costs import option_costs, option_mask

    options = [o for o in catalogue.options() if o[0] != "none"]
    mask = option_mask(sites, options, catalogue)
    params = np.where(mask, option_costs(sites, options, mask=mask)[..., 0], np.inf)
    i, j = np.unravel_index(int(np.argmin(params)), params.shape)
    method, size = options[j]
    return (f"plan {name} adapts no site: its parameter budget is {params_budget:,.6g} "
            f"(budget.scale = {cfg.budget.scale} x uniform LoRA rank {cfg.budget.reference_rank})"
            f", but the cheapest option, {method} {size} on {sites[i].path}, costs "
            f"{params[i, j]:,.0f} parameters; raise budget.scale")


def measure_step_memory(prep: Prepared, variant: str, plan, seed: int | None = None
                        ) -> float | None:
    """XLA's compiled memory (bytes) of the train step ``train_variant`` would run for ``plan``
    (one compile, no step run); None where the backend does not report it."""
    seed = prep.cfg.run.seed if seed is None else seed
    model, wrt = build_variant(prep, variant, plan, seed)
    step, state = variant_step(prep, variant, model, wrt)
    return step_memory(step, state, next(_endless_batches(prep, seed, prefetch=1)))


def within_measured_memory(allocate_at: Callable[[float], Any], budget: float,
                           measure: Callable[[Any], float | None], rounds: int = 6):
    """The plan of ``allocate_at(effective VRAM budget)`` whose *compiled* step fits ``budget``.

    The whole-step cost model predicts XLA's memory within about 10 % (README "Whole-step
    budgets"), so a plan allocated at the budget itself can compile a few per cent over it, and
    the error sits mostly in the fixed part of the lowest adapted layer group: shaving the per-site
    budget barely helps, the lowest group must move up. So: allocate at the budget; if the
    compiled step (``measure``, one compile) is over, search the effective budget in
    ``[budget / 2, budget]`` -- first the prediction corrected by the measured ratio, then by
    bisection, keeping the largest effective budget whose plan fits -- for at most ``rounds``
    compiles. ``ValueError`` when none fits (naming the measured and the budgeted bytes). The plan
    records the measured bytes, the rounds and the effective budget, and the user's budget."""
    lo, hi, effective = 0.5 * budget, budget, budget
    best, last = None, None
    for k in range(rounds):
        try:
            plan = allocate_at(effective)
        except ValueError:  # below the frozen model's own step: search higher
            lo, plan = effective, None
        if plan is not None:
            measured = last = measure(plan)
            if measured is None or measured <= budget:
                best = (plan, measured, effective, k + 1)
                if measured is None or effective >= budget:
                    break
                lo = effective
            else:
                hi = effective
        if best is not None and hi - lo <= 0.01 * budget:
            break
        mid = 0.5 * (lo + hi)
        effective = mid if best is not None or plan is None else min(
            effective * budget / last, mid)
    if best is None:
        raise ValueError(f"no plan found whose compiled train step fits vram_bytes = {budget:,.0f} "
                         f"bytes in {rounds} rounds (last measured: "
                         f"{last if last is None else f'{last:,.0f}'} bytes); raise "
                         f"budget.vram_bytes")
    plan, measured, effective, used = best
    meta = {**plan.metadata, "measured_step_bytes": measured, "vram_rounds": used,
            "effective_vram_bytes": effective}
    return dataclasses.replace(plan, metadata=meta, budgets={**plan.budgets, "vram_bytes": budget})
