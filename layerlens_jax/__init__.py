"""LayerLens-JAX: profile every adaptable layer of a Flax model, allocate PEFT methods and sizes
under budgets, apply them without editing the model, train, merge and validate.

The data flow, and the public name for each step::

    sites = discover_sites(model, example=batch["input_ids"])   # adaptable layers
    stats = profile(model, loss_fn, batches)          # grad norm + per-example exact Fisher
    u = utility(stats)                                # one score per site
    plan = allocate(stats.sites, u, {"params": 100_000})   # method + size per site under budgets
    model = apply_plan(model, plan, example=batch["input_ids"])  # example: adapters' widths
    opt = make_optimizer(model, optax.adamw(1e-3))    # only the adapters train
    step = make_train_step(lambda m, b: loss_fn(m, b).mean())
    metrics = step(model, opt, batch)                 # one step, in place
    model = merge(model)                              # fold LoRA back into the base kernels

(``loss_fn(model, batch)`` returns per-example losses; ``apply_plan`` needs ``example=`` (the
model's inputs) for an NNX model when the plan has adapters, to know the blocks' widths.)

This module is the library's one contract: everything here is public and stable; the code lives
in private modules under ``layerlens_jax._src``. Reference models are in
:mod:`layerlens_jax.models`; the ``layerlens`` application (config, data, report, CLI) is the
separate subpackage :mod:`layerlens_jax.app`, which the core never imports.
"""

# 1. sites: what can be adapted
from layerlens_jax._src.sites import KINDS, Site, discover_sites, register_site_kind, site_kind_of
# 2. profile and utility: how much each site matters
from layerlens_jax._src.profile import LayerStats, ProfileStep, profile, sampled_label_loss
from layerlens_jax._src.utility import UtilityConfig, UtilityReport, utility, utility_report
# 3. costs and allocation: which method and size per site, under budgets
from layerlens_jax._src.costs import Catalogue, CostModel, GainModel, calibrate_latency
from layerlens_jax._src.spectral import GradientSpectra, SpectralGain, gradient_spectra
from layerlens_jax._src.probe import ProbeResult, probe_utility
from layerlens_jax._src.step_cost import StepProfile, measure_step_profile
from layerlens_jax._src.allocate import allocate, allocate_curve
from layerlens_jax._src.exact import allocate_exact
# 4. the plan: record, JSON, metrics, HF PEFT export
from layerlens_jax._src.plan import Plan, SiteAllocation, load_plan, save_plan
from layerlens_jax._src.plan_metrics import plan_metrics
from layerlens_jax._src.export import to_peft_config
# 5. PEFT: apply the plan, train only the adapters, merge
from layerlens_jax._src.peft import (BASE_FILTER, PEFT_FILTER, Adapter, LoRA, PeftParam, Prefix,
                                     apply_plan, count_trainable, init_adapters, merge)
from layerlens_jax._src.train import (linen_variables, make_functional_train_step,
                                      make_linen_train_step, make_optimizer, make_train_step,
                                      stack_train_states, unstack_train_state)
from layerlens_jax._src.checkpoint import CheckpointError, restore_adapters, save_adapters
# 6. in-training reallocation: re-solve part-way, resize LoRA ranks keeping what was learned
from layerlens_jax._src.reallocate import (lora_ranks, merged_utility, reallocate_plan,
                                           resize_lora, transfer_optimizer_state)
# reference models (BERT-style encoder, NNX and Linen)
from layerlens_jax.models import BertClassifier, BertConfig, LinenBertClassifier

__version__ = "0.2.0"

__all__ = [
    "KINDS", "Site", "discover_sites", "register_site_kind", "site_kind_of",
    "LayerStats", "ProfileStep", "profile", "sampled_label_loss",
    "UtilityConfig", "UtilityReport", "utility", "utility_report",
    "Catalogue", "CostModel", "GainModel", "calibrate_latency",
    "GradientSpectra", "SpectralGain", "gradient_spectra", "StepProfile", "measure_step_profile",
    "ProbeResult", "probe_utility",
    "allocate", "allocate_curve", "allocate_exact",
    "Plan", "SiteAllocation", "load_plan", "plan_metrics", "save_plan", "to_peft_config",
    "BASE_FILTER", "PEFT_FILTER", "Adapter", "LoRA", "PeftParam", "Prefix",
    "apply_plan", "count_trainable", "init_adapters", "merge",
    "make_functional_train_step", "make_linen_train_step", "linen_variables", "make_optimizer",
    "make_train_step", "stack_train_states", "unstack_train_state",
    "CheckpointError", "restore_adapters", "save_adapters",
    "lora_ranks", "merged_utility", "reallocate_plan", "resize_lora", "transfer_optimizer_state",
    "BertClassifier", "BertConfig", "LinenBertClassifier",
]
