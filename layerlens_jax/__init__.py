"""LayerLens-JAX: profile every adaptable layer of a Flax model, allocate PEFT methods and sizes
under budgets, apply them without editing the model, train, merge and validate.

    sites = discover_sites(model, example=batch["input_ids"])
    stats = profile(model, loss_fn, batches)            # grad norm + per-example exact Fisher
    u = utility(stats)                                  # one score per site
"""

from layerlens_jax.models import BertClassifier, BertConfig, LinenBertClassifier
from layerlens_jax.profile import LayerStats, ProfileStep, profile, sampled_label_loss
from layerlens_jax.sites import KINDS, Site, discover_sites, register_site_kind, site_kind_of
from layerlens_jax.utility import UtilityConfig, UtilityReport, utility, utility_report

__version__ = "0.1.0"

__all__ = [
    "BertClassifier", "BertConfig", "LinenBertClassifier",
    "LayerStats", "ProfileStep", "profile", "sampled_label_loss",
    "KINDS", "Site", "discover_sites", "register_site_kind", "site_kind_of",
    "UtilityConfig", "UtilityReport", "utility", "utility_report",
]
