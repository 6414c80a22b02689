"""LayerLens-JAX: profile every adaptable layer of a Flax model, allocate PEFT methods and sizes
under budgets, apply them without editing the model, train, merge and validate.

    sites = discover_sites(model, example=batch["input_ids"])
    stats = profile(model, loss_fn, batches)            # grad norm + per-example exact Fisher
    u = utility(stats)                                  # one score per site
    plan = allocate(sites, u, {"params": 100_000})      # method + size per site under budgets
    model = apply_plan(model, plan)                     # wraps the sites; only adapters train
"""

from layerlens_jax.allocate import allocate, allocate_curve, allocate_exact
from layerlens_jax.checkpoint import CheckpointError, restore_adapters, save_adapters
from layerlens_jax.costs import Catalogue, CostModel, GainModel, calibrate_latency
from layerlens_jax.models import BertClassifier, BertConfig, LinenBertClassifier
from layerlens_jax.peft import (BASE_FILTER, PEFT_FILTER, Adapter, LoRA, PeftParam, Prefix,
                                apply_plan, count_trainable, merge)
from layerlens_jax.plan import Plan, SiteAllocation, load_plan, plan_metrics, save_plan, to_peft_config
from layerlens_jax.profile import LayerStats, ProfileStep, profile, sampled_label_loss
from layerlens_jax.sites import KINDS, Site, discover_sites, register_site_kind, site_kind_of
from layerlens_jax.train import make_functional_train_step, make_optimizer, make_train_step
from layerlens_jax.utility import UtilityConfig, UtilityReport, utility, utility_report

__version__ = "0.1.0"

__all__ = [
    "BertClassifier", "BertConfig", "LinenBertClassifier",
    "LayerStats", "ProfileStep", "profile", "sampled_label_loss",
    "KINDS", "Site", "discover_sites", "register_site_kind", "site_kind_of",
    "UtilityConfig", "UtilityReport", "utility", "utility_report",
    "LoRA", "Adapter", "Prefix", "PeftParam", "PEFT_FILTER", "BASE_FILTER", "apply_plan", "merge",
    "count_trainable", "make_optimizer", "make_train_step", "make_functional_train_step",
    "save_adapters", "restore_adapters", "CheckpointError",
    "allocate", "allocate_exact", "allocate_curve", "Catalogue", "CostModel", "GainModel",
    "calibrate_latency", "Plan", "SiteAllocation", "load_plan", "save_plan", "plan_metrics",
    "to_peft_config",
]
