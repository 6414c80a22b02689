"""Synthetic allocation instances for tests and benchmarks (not used by the library itself).

* :data:`PRIOR_GAIN`: the old prior gain model (slowly saturating: half of LoRA's gain at rank 8),
  a harder, less integral knapsack than the calibrated default.
* :func:`tiny_bert_sites`: the 20 nested sites of the tiny reference BERT.
* :func:`block_utility` / :func:`nesting_instance`: utilities in which a block carries the sum of
  its layers' (as the profiler reports), with a parameter budget: the exclusive-nesting instances.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from layerlens_jax._src.costs import Catalogue, GainModel
from layerlens_jax._src.plan import Plan, uniform_assignments
from layerlens_jax._src.sites import Site

__all__ = ["NESTING_CATALOGUE", "PRIOR_GAIN", "block_utility", "nesting_instance",
           "tiny_bert_sites"]

#: The slowly saturating prior gain model (half of LoRA's gain at rank 8).
PRIOR_GAIN = GainModel(efficiency={"lora": 1.0, "adapter": 0.9, "prefix": 0.5},
                       scale={"lora": 8.0, "adapter": 16.0, "prefix": 16.0})

#: A small catalogue for the exclusive-nesting instances (every method, a few sizes).
NESTING_CATALOGUE = Catalogue.from_sizes(lora=(1, 2, 4, 8), adapter=(2, 4, 8), prefix=(2, 4))


def tiny_bert_sites() -> list[Site]:
    """The sites of ``BertClassifier(BertConfig.tiny())``, discovered with a (2, 7) token batch."""
    import jax.numpy as jnp
    from flax import nnx

    from layerlens_jax._src.sites import discover_sites
    from layerlens_jax.models import BertClassifier, BertConfig

    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    return discover_sites(model, example=(jnp.zeros((2, 7), jnp.int32),))


def block_utility(sites: Sequence[Site], seed: int) -> np.ndarray:
    """Random leaf utilities in ``[0.05, 1)``; every site carries the sum over itself and the sites
    nested in it (paths nest by ``"/"``), normalised to a maximum of 1."""
    rng = np.random.default_rng(seed)
    leaf = {s.path: rng.uniform(0.05, 1.0) for s in sites}
    u = np.array([sum(v for p, v in leaf.items() if p == s.path or p.startswith(s.path + "/"))
                  for s in sites])
    return u / u.max()


def nesting_instance(sites: Sequence[Site], seed: int) -> tuple[np.ndarray, dict[str, float]]:
    """``(utility, budgets)``: :func:`block_utility` and a parameter budget of 0.5, 1 or 1.5 times
    (by ``seed % 3``) the parameters of the uniform baseline (LoRA rank 8 on query and value)."""
    u = block_utility(sites, seed)
    base = Plan.from_assignments(sites, uniform_assignments(sites, "lora", 8), u)
    return u, {"params": base.use["params"] * (0.5 + 0.5 * (seed % 3))}
