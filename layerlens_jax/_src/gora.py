"""GoRA's rank allocation (He et al., 2025, "GoRA: Gradient-driven Adaptive Low Rank Adaptation"),
as a comparison point for LayerLens's gains.

GoRA scores every target linear layer by the mean of ``|W * G|`` over its kernel (``W`` the frozen
weight, ``G`` the loss gradient averaged over a few batches: :func:`~layerlens_jax._src.spectral.
gradient_spectra` returns it as ``weight_gradient``), normalises the scores to shares ``p_i`` that
sum to one, and gives layer ``i`` the share ``p_i`` of the parameter budget ``B`` (uniform LoRA of
the reference rank on all targets in the paper): ``rank_i = round(B * p_i) // (d_in + d_out)``,
so a layer whose share buys less than one rank gets none. The official implementation
(``compute_importance(type="union_mean")``, ``get_allocated_rank`` with the default "moderate"
rounding) is what this follows; not reproduced here: its optional softmax / temperature
normalisation, its gradient-compressing initialisation of ``B`` and its scale ``alpha / r_ref``
shared by all layers (this project's sweep trains the ranks with the baselines' LoRA scaling).

A rank is clipped to ``max_rank``; should rounding put the plan over ``B`` (at most half a
parameter per layer before the floor), ranks are taken back from the lowest-share layers until
it fits, so the plan never exceeds the budget.

The floor leaves much of a small budget unspent (MiniLM-L6's 36 linear layers at 9,216
parameters, a third of a rank each: GoRA's rule spends 17 %). ``fill=True`` spends the rest by
the largest-remainder method: one rank at a time to the layer whose share is furthest above its
rank (``B * p_i / (d_in + d_out) - rank_i``) among those it still fits, until none fits -- the
same proportional principle at the same budget as the other plans.

``floor={path: rank}`` makes those ranks mandatory ("coverage first"): every site starts at least
at its floor, ranks above the floor are given back (lowest shares first) until the plan fits, and
the rest of the budget is filled by the largest remainder as above.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from layerlens_jax._src.costs import trainable_params
from layerlens_jax._src.sites import Site

__all__ = ["gora_ranks"]


def gora_ranks(sites: Sequence[Site], importance: Sequence[float], budget_params: float, *,
               max_rank: int = 64, fill: bool = False,
               floor: Mapping[str, int] | None = None) -> dict[str, int]:
    """``{path: rank}`` (rank 0 included) for the LoRA-able ``sites`` by GoRA's rule.

    Args:
      sites: the target sites (``linear``); their order matches ``importance``.
      importance: each site's GoRA importance (mean ``|W * G|``), finite and >= 0.
      budget_params: the LoRA parameter budget ``B``.
      max_rank: the largest rank a site gets.
      fill: spend what the rule leaves by the largest remainder (module docstring).
      floor: ``{path: rank}`` each site gets at least (sites not named: 0); implies ``fill``.

    Raises:
      ValueError: lengths differ, an importance is negative or not finite (naming the site), all
        importances are zero, the floor names a site not in ``sites`` or does not fit the budget.
    """
    imp = np.asarray(importance, np.float64)
    if imp.shape != (len(sites),):
        raise ValueError(f"gora_ranks: {len(sites)} sites but {imp.shape} importances")
    bad = ~np.isfinite(imp) | (imp < 0)
    if bad.any():
        raise ValueError(f"gora_ranks: importance of site {sites[int(np.argmax(bad))].path!r} is "
                         f"{imp[int(np.argmax(bad))]} (needs a finite value >= 0)")
    if imp.sum() <= 0:
        raise ValueError("gora_ranks: every importance is zero")
    share = imp / imp.sum()
    per_rank = np.array([trainable_params(s, "lora", 1) for s in sites], np.int64)
    ranks = np.minimum(np.round(budget_params * share).astype(np.int64) // per_rank, max_rank)
    low = np.zeros(len(sites), np.int64)
    if floor:
        index = {s.path: i for i, s in enumerate(sites)}
        unknown = sorted(set(floor) - set(index))
        if unknown:
            raise ValueError(f"gora_ranks: floor names {unknown[0]!r}, not one of the sites")
        for path, r in floor.items():
            low[index[path]] = min(int(r), max_rank)
        if (low * per_rank).sum() > budget_params:
            raise ValueError(f"gora_ranks: the floor needs {int((low * per_rank).sum()):,} "
                             f"parameters, over the budget {budget_params:,.0f}")
        ranks, fill = np.maximum(ranks, low), True
    for i in np.argsort(share, kind="stable"):  # the lowest shares give back first
        if (ranks * per_rank).sum() <= budget_params:
            break
        while ranks[i] > low[i] and (ranks * per_rank).sum() > budget_params:
            ranks[i] -= 1
    if fill:
        ideal = budget_params * share / per_rank
        while True:
            left = budget_params - (ranks * per_rank).sum()
            fits = (per_rank <= left) & (ranks < max_rank)
            if not fits.any():
                break
            i = int(np.argmax(np.where(fits, ideal - ranks, -np.inf)))
            ranks[i] += 1
    return {s.path: int(r) for s, r in zip(sites, ranks)}
