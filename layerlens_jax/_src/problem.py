"""The allocation problem: validated inputs turned into a sites x options matrix (float64 numpy).

The problem is a multiple-choice, multi-resource knapsack over a sites x options matrix::

    maximise   sum_s g[s, o_s]
    subject to sum_s c[r, s, o_s] <= B[r]   for every budgeted resource r
               o_s in the options allowed for site s (compatible, within min/max size, pinned)

:func:`build_problem` checks the user's sites, utilities, budgets, pins and size limits (errors name
the culprit), builds the option catalogue's mask, costs and gains, scales the budgets by the
utilisation band and groups sites with identical cost rows (for the solver's monotone repair).
Every solver (:mod:`~layerlens_jax._src.solver`, :mod:`~layerlens_jax._src.exact`) reads the
resulting :class:`Problem`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from layerlens_jax._src.methods import METHODS
from layerlens_jax._src.costs import (RESOURCES, Catalogue, CostModel, GainModel,
                                      option_costs, option_mask)
from layerlens_jax._src.sites import Site

__all__ = ["Problem", "allowed_options", "build_problem"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Problem:
    """The numeric allocation problem built from sites (float64 numpy, shared by all solvers)."""

    sites: tuple[Site, ...]  # the sites, in the caller's order
    options: tuple[tuple[str, int], ...]  # [O] (method, size), option 0 is ("none", 0)
    utility: np.ndarray  # [S] utility per site
    gain: np.ndarray  # [S, O] predicted gain (0 where not allowed)
    cost: np.ndarray  # [S, O, len(RESOURCES)]: every resource, for the plan
    mask: np.ndarray  # [S, O] allowed (compatible, sizes, pins, fits the budgets alone)
    resources: tuple[str, ...]  # the budgeted resources, in RESOURCES order
    budget: np.ndarray  # [R] effective budgets (utilisation-scaled)
    budgets: Mapping[str, float]  # as given
    group: np.ndarray  # [S] representative site of each equal-cost group
    pinned: np.ndarray  # [S] bool: the site's option was pinned by the caller
    utilisation: tuple[float, float] | None  # the (low, high) band, if any
    catalogue: Catalogue  # the option catalogue (with pinned off-grid sizes added)
    cost_model: CostModel  # the cost formulas' settings
    gain_model: GainModel  # the gain model

    @property
    def cost_rso(self) -> np.ndarray:
        """Costs of the budgeted resources, resource-major ``[R, S, O]``."""
        idx = [RESOURCES.index(r) for r in self.resources]
        return np.ascontiguousarray(np.moveaxis(self.cost[..., idx], -1, 0))


def allowed_options(cost_rso: np.ndarray, mask: np.ndarray, budget: np.ndarray) -> np.ndarray:
    """Allowed options that also fit each budget on their own (float64)."""
    with np.errstate(invalid="ignore"):
        fits = np.all((cost_rso <= budget[:, None, None]) | (cost_rso == 0), axis=0)
    return np.asarray(mask, bool) & fits


# ----------------------------------------------------------------------------- input checks


def _site_map(sites: Sequence[Site], arg: Mapping, what: str) -> dict[int, Any]:
    index = {s.path: i for i, s in enumerate(sites)}
    out = {}
    for path, value in arg.items():
        if path not in index:
            raise ValueError(f"{what} names site {path!r}, which is not among the sites")
        out[index[path]] = value
    return out


def _check_sites(sites: Sequence[Site]) -> tuple[Site, ...]:
    sites = tuple(sites)
    if not sites:
        raise ValueError("allocate needs at least one site")
    for s in sites:
        if not isinstance(s, Site):
            raise TypeError(f"sites must be layerlens_jax._src.sites.Site records, "
                            f"got {type(s).__name__}")
    paths = [s.path for s in sites]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise ValueError(f"site {dup!r} appears twice in the sites")
    return sites


def _check_utility(sites: tuple[Site, ...], utility) -> np.ndarray:
    u = np.asarray(utility, np.float64)
    if u.shape != (len(sites),):
        raise ValueError(f"utility must have one value per site: shape {u.shape}, "
                         f"{len(sites)} sites")
    bad = np.flatnonzero(~np.isfinite(u) | (u < 0))
    if len(bad):
        raise ValueError(f"utility of site {sites[bad[0]].path!r} is {u[bad[0]]!r}; utilities must "
                         f"be finite and >= 0")
    return u


def _check_budgets(budgets: Mapping[str, float]) -> dict[str, float]:
    if not isinstance(budgets, Mapping) or not budgets:
        raise ValueError(f"budgets must be a non-empty mapping over {RESOURCES}, got {budgets!r}")
    out = {}
    for key, value in budgets.items():
        if key not in RESOURCES:
            raise ValueError(f"unknown budget resource {key!r}; expected one of {RESOURCES}")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"budget {key!r} must be a number, got {value!r}")
        value = float(value)
        if math.isnan(value) or value < 0:
            raise ValueError(f"budget {key!r} must be >= 0 (inf: unconstrained), got {value!r}")
        out[key] = value
    return out


def _check_utilisation(utilisation) -> tuple[float, float] | None:
    if utilisation is None:
        return None
    if isinstance(utilisation, (int, float)) and not isinstance(utilisation, bool):
        band = (0.0, float(utilisation))
    else:
        try:
            lo, hi = utilisation
            band = (float(lo), float(hi))
        except (TypeError, ValueError):
            raise ValueError(f"utilisation must be a fraction or a (low, high) band, got "
                             f"{utilisation!r}") from None
    lo, hi = band
    if not (0.0 <= lo <= hi <= 1.0) or hi == 0.0:
        raise ValueError(f"utilisation band must satisfy 0 <= low <= high <= 1 and high > 0, "
                         f"got {utilisation!r}")
    return band


def _size_limits(sites, value, what) -> dict[int, int]:
    if value is None:
        return {}
    if isinstance(value, Mapping):
        items = _site_map(sites, value, what)
    else:
        items = {i: value for i in range(len(sites))}
    for i, v in items.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{what} for site {sites[i].path!r} must be an int >= 0, got {v!r}")
    return {i: int(v) for i, v in items.items()}


def _parse_pin(path: str, value) -> tuple[str, int]:
    if value is None or value == "none":
        return ("none", 0)
    try:
        method, size = value
    except (TypeError, ValueError):
        raise ValueError(f"pinned[{path!r}] must be 'none' or (method, size), got {value!r}") from None
    if method not in METHODS:
        raise ValueError(f"pinned[{path!r}] has unknown method {method!r}; expected {METHODS}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0 \
            or (method == "none") != (size == 0):
        raise ValueError(f"pinned[{path!r}] has invalid size {size!r} for method {method!r}")
    return (str(method), int(size))


# -------------------------------------------------------------------- the steps of build_problem


def _pins_and_catalogue(sites: tuple[Site, ...], pinned: Mapping[str, Any] | None,
                        catalogue: Catalogue) -> tuple[dict[int, tuple[str, int]], Catalogue]:
    """Parsed pins ``{site index: (method, size)}`` and the catalogue with pinned sizes added."""
    pins = {i: _parse_pin(sites[i].path, v)
            for i, v in _site_map(sites, pinned or {}, "pinned").items()}
    for i, (method, size) in pins.items():
        if method != "none" and not catalogue.compatible(sites[i].kind, method):
            raise ValueError(f"pinned[{sites[i].path!r}] = {method}({size}) is incompatible with its "
                             f"kind {sites[i].kind!r} in this catalogue")
    extra: dict[str, set] = {}
    for method, size in pins.values():
        if method != "none":
            extra.setdefault(method, set()).add(size)
    return pins, (catalogue.with_sizes(extra) if extra else catalogue)


def _refuse_unbuildable(sites: tuple[Site, ...], options, mask: np.ndarray) -> None:
    """ValueError naming the site, its kind and the method when an allowed option is one that
    ``apply_plan`` cannot build on the site's module (:attr:`Site.build_refusals`, found at
    discovery by ``apply_plan``'s own checks)."""
    methods = np.array([m for m, _ in options])
    for i, site in enumerate(sites):
        for method, reason in site.build_refusals:
            if mask[i, methods == method].any():
                raise ValueError(
                    f"site {site.path!r} of kind {site.kind!r} ({site.module_type}): apply_plan "
                    f"cannot build {method} on it ({reason}); leave the site out, pin it to "
                    f"'none' or set max_size={{{site.path!r}: 0}}")


def _option_mask(sites: tuple[Site, ...], options, catalogue: Catalogue,
                 pins: Mapping[int, tuple[str, int]], min_size, max_size) -> np.ndarray:
    """Allowed options ``[S, O]``: compatible, pinned, within ``min_size`` / ``max_size``."""
    mask = option_mask(sites, options, catalogue)
    for i, pin in pins.items():  # a pinned size is allowed even above the full-rank cap
        mask[i] = False
        mask[i, options.index(pin)] = True
    sizes = np.array([s for _, s in options])
    adaptable = mask[:, 1:].any(axis=1)
    mins = _size_limits(sites, min_size, "min_size")
    maxs = _size_limits(sites, max_size, "max_size")
    strict = isinstance(min_size, Mapping)
    for i, k in mins.items():
        if i in pins or k == 0 or (not strict and not adaptable[i]):
            continue
        mask[i] &= sizes >= k
        mask[i, 0] = False
    for i, k in maxs.items():
        if i in pins:
            continue
        mask[i] &= sizes <= k
    for i in set(mins) & set(maxs):
        if mins[i] > maxs[i]:
            raise ValueError(f"site {sites[i].path!r}: min_size {mins[i]} > max_size {maxs[i]}")
    _refuse_unbuildable(sites, options, mask)
    empty = np.flatnonzero(~mask.any(axis=1))
    if len(empty):
        s = sites[empty[0]]
        raise ValueError(f"site {s.path!r} ({s.kind}) has no allowed option: check its min_size / "
                         f"max_size / pin against the catalogue's sizes for its kind")
    return mask


def _effective_budgets(budgets: Mapping[str, float], band: tuple[float, float] | None
                       ) -> tuple[tuple[str, ...], np.ndarray]:
    """The budgeted resources in :data:`RESOURCES` order and their limits scaled by ``band[1]``."""
    resources = tuple(r for r in RESOURCES if r in budgets)
    hi = band[1] if band else 1.0
    return resources, np.array([budgets[r] * hi for r in resources])


def _check_feasible(sites: tuple[Site, ...], resources: tuple[str, ...], budget: np.ndarray,
                    c_rso: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Options that fit the budgets alone; errors when a site has none or the mandatory minimum of
    all sites together exceeds a budget."""
    allowed = allowed_options(c_rso, mask, budget)
    empty = np.flatnonzero(~allowed.any(axis=1))
    if len(empty):
        i = int(empty[0])
        cheapest = {r: float(c_rso[k, i][mask[i]].min()) for k, r in enumerate(resources)}
        raise ValueError(f"site {sites[i].path!r}: even its cheapest allowed option exceeds a budget "
                         f"(cheapest cost {cheapest}, effective budgets "
                         f"{dict(zip(resources, budget.tolist()))})")
    for k, r in enumerate(resources):
        floor = np.where(allowed, c_rso[k], np.inf).min(axis=1)
        if floor.sum() > budget[k] * (1 + 1e-12):
            top = np.argsort(-floor)[:3]
            who = ", ".join(f"{sites[i].path!r} ({floor[i]:.4g})" for i in top if floor[i] > 0)
            raise ValueError(f"budget {r!r} = {budget[k]:.6g} (effective) is smaller than the "
                             f"mandatory minimum {floor.sum():.6g} of pinned / min_size sites "
                             f"(largest: {who})")
    return allowed


def _equal_cost_groups(u: np.ndarray, c_rso: np.ndarray, allowed: np.ndarray,
                       pins: Mapping[int, Any], gain: np.ndarray) -> np.ndarray:
    """For each site the representative (largest utility) of the unpinned sites with identical
    cost rows, allowed options and gain rows proportional to each other (the monotone repair's
    premise: true for a utility-times-shape gain model, not for per-site curves such as
    :class:`~layerlens_jax._src.spectral.SpectralGain`); a pinned site is its own group."""
    keys: dict[bytes, list[int]] = {}
    top = np.max(np.abs(gain), axis=1, keepdims=True)
    shape = np.round(np.divide(gain, top, out=np.zeros_like(gain), where=top > 0), 9)
    for i in range(len(u)):
        if i in pins:
            continue
        key = c_rso[:, i].tobytes() + allowed[i].tobytes() + shape[i].tobytes()
        keys.setdefault(key, []).append(i)
    group = np.arange(len(u))
    for members in keys.values():
        group[members] = members[int(np.argmax(u[members]))]
    return group


def build_problem(sites: Sequence[Site], utility, budgets: Mapping[str, float], *,
                  catalogue: Catalogue | None = None, cost_model: CostModel | None = None,
                  gain_model: GainModel | None = None, pinned: Mapping[str, Any] | None = None,
                  min_size: int | Mapping[str, int] | None = None,
                  max_size: int | Mapping[str, int] | None = None,
                  utilisation: float | tuple[float, float] | None = None) -> Problem:
    """Validate the inputs and build the sites x options matrices.

    ``pinned``: ``{path: "none" | (method, size)}`` fixes those sites (sizes off the grid are added
    to it). ``min_size`` / ``max_size``: an int for every site, or ``{path: int}``; a positive
    ``min_size`` makes adaptation mandatory (an int applies only to sites with a compatible method;
    a per-site value is strict), ``max_size = 0`` forbids it. ``utilisation``: a fraction ``hi`` or a
    band ``(lo, hi)``: every budget is scaled by ``hi`` (``lo`` is checked by :func:`plan_metrics`).
    """
    sites = _check_sites(sites)
    u = _check_utility(sites, utility)
    budgets = _check_budgets(budgets)
    band = _check_utilisation(utilisation)
    cost_model = cost_model or CostModel()
    gain_model = gain_model or GainModel()
    pins, catalogue = _pins_and_catalogue(sites, pinned, catalogue or Catalogue())
    options = catalogue.options()
    mask = _option_mask(sites, options, catalogue, pins, min_size, max_size)
    cost = option_costs(sites, options, cost_model, mask=mask)
    resources, budget = _effective_budgets(budgets, band)
    c_rso = np.moveaxis(cost[..., [RESOURCES.index(r) for r in resources]], -1, 0)
    allowed = _check_feasible(sites, resources, budget, c_rso, mask)
    gain = np.where(allowed, gain_model.gain(u, options), 0.0)
    pinned_flags = np.zeros(len(sites), bool)
    pinned_flags[list(pins)] = True
    return Problem(sites=sites, options=options, utility=u, gain=gain, cost=cost, mask=allowed,
                   resources=resources, budget=budget, budgets=budgets,
                   group=_equal_cost_groups(u, c_rso, allowed, pins, gain), pinned=pinned_flags,
                   utilisation=band, catalogue=catalogue, cost_model=cost_model,
                   gain_model=gain_model)
