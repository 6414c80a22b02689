"""The Plan: an immutable record of the method and size chosen per site, with its costs and metrics.

A :class:`Plan` holds one :class:`SiteAllocation` per site (method, size, cost vector, utility,
predicted gain), the budgets and their use, the objective and the Lagrangian dual bound (so every
allocated plan carries its optimality-gap certificate), and the options the PEFT modules need
(``lora_alpha``, ``use_rslora``, ``adapter_activation``, ...).

JSON (``schema_version`` 1)::

    {"schema_version": 1, "solver": "lagrangian", "objective": 3.2, "dual_bound": 3.21,
     "budgets": {"params": 20000}, "use": {"params": 19876, ...},
     "peft_options": {"lora_alpha": 16.0, ...}, "metadata": {...},
     "allocations": [{"site": "encoder/layers_0/attention/mha/query", "kind": "linear",
                      "method": "lora", "size": 8, "cost": {"params": 256, ...},
                      "utility": 0.9, "gain": 0.45, "cost_class": "linear:16x16:hNonexNone:n7",
                      "pinned": false}, ...]}

Loading is strict: unknown or missing keys, wrong types, unknown methods or kinds, duplicate sites
raise ``ValueError`` naming the key and site. Unbounded budgets are written as the string ``"inf"``.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import types
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from layerlens_jax._src.costs import (METHOD_KINDS, METHODS, RESOURCES, Catalogue, CostModel, GainModel,
                                 cost_class, option_costs)
from layerlens_jax._src.fileio import atomic_write_text
from layerlens_jax._src.sites import KINDS, Site

__all__ = [
    "SCHEMA_VERSION",
    "SiteAllocation",
    "Plan",
    "default_peft_options",
    "uniform_assignments",
    "save_plan",
    "load_plan",
    "PlanMetrics",
    "plan_metrics",
    "render_metrics_markdown",
    "to_peft_config",
    "save_peft_config",
    "hf_bert_module_name",
]

SCHEMA_VERSION = 1

_PEFT_OPTION_TYPES: Mapping[str, tuple[type, ...]] = {
    "lora_alpha": (int, float),
    "use_rslora": (bool,),
    "adapter_activation": (str,),
    "lora_dropout": (int, float),
    "prefix_projection": (int,),
}


def default_peft_options() -> dict[str, Any]:
    """``lora_alpha`` 16.0 (scaling alpha/r, or alpha/sqrt(r) with ``use_rslora``), GELU adapters,
    no LoRA dropout, no prefix reparameterisation MLP (``prefix_projection`` = its hidden width)."""
    return {"lora_alpha": 16.0, "use_rslora": False, "adapter_activation": "gelu",
            "lora_dropout": 0.0, "prefix_projection": 0}


def _frozen(d: Mapping) -> Mapping:
    return types.MappingProxyType(dict(d))


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_num(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _num_in(value, where: str, *, allow_inf: bool = False) -> float:
    if allow_inf and value == "inf":
        return math.inf
    if not _is_num(value):
        raise ValueError(f"{where} must be a number, got {value!r}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{where} must be finite, got {value!r}")
    return value


def _num_out(value: float):
    value = float(value)
    if math.isinf(value) and value > 0:
        return "inf"
    if not math.isfinite(value):
        raise ValueError(f"cannot write {value!r} to a plan")
    return value


def _jsonable(x):
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if _is_int(x):
        return int(x)
    if _is_num(x):
        x = float(x)
        return x if math.isfinite(x) else ("inf" if x > 0 else None)
    return x


@dataclasses.dataclass(frozen=True)
class SiteAllocation:
    """The option chosen for one site.

    ``cost`` maps every resource of :data:`~layerlens_jax._src.costs.RESOURCES` to this option's cost,
    ``gain`` is the predicted gain, ``cost_class`` a key shared by sites whose costs are equal for
    every option (:func:`~layerlens_jax._src.costs.cost_class`), ``pinned`` whether the user fixed it.
    """

    site: str
    kind: str
    method: str
    size: int
    cost: Mapping[str, float]
    utility: float
    gain: float
    cost_class: str = ""
    pinned: bool = False

    def __post_init__(self):
        where = f"allocation for site {self.site!r}"
        if not isinstance(self.site, str) or not self.site:
            raise ValueError(f"allocation site must be a non-empty string, got {self.site!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {self.kind!r}; expected one of {KINDS}")
        if self.method not in METHODS:
            raise ValueError(f"{where}: unknown method {self.method!r}; expected one of {METHODS}")
        if not _is_int(self.size) or self.size < 0:
            raise ValueError(f"{where}: size must be an int >= 0, got {self.size!r}")
        if (self.method == "none") != (self.size == 0):
            raise ValueError(f"{where}: size {self.size} does not fit method {self.method!r} "
                             f"(size is 0 exactly for 'none')")
        if self.method != "none" and self.kind not in METHOD_KINDS[self.method]:
            raise ValueError(f"{where}: method {self.method!r} is incompatible with kind "
                             f"{self.kind!r} (compatible: {METHOD_KINDS[self.method]})")
        if not isinstance(self.cost, Mapping):
            raise ValueError(f"{where}: cost must be a mapping, got {type(self.cost).__name__}")
        cost = {}
        for key, value in self.cost.items():
            if key not in RESOURCES:
                raise ValueError(f"{where}: unknown cost resource {key!r}; expected {RESOURCES}")
            cost[key] = _num_in(value, f"{where}: cost[{key!r}]")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "cost", _frozen(cost))
        object.__setattr__(self, "utility", _num_in(self.utility, f"{where}: utility"))
        object.__setattr__(self, "gain", _num_in(self.gain, f"{where}: gain"))
        if not isinstance(self.cost_class, str):
            raise ValueError(f"{where}: cost_class must be a string, got {self.cost_class!r}")
        if not isinstance(self.pinned, (bool, np.bool_)):
            raise ValueError(f"{where}: pinned must be a bool, got {self.pinned!r}")
        object.__setattr__(self, "pinned", bool(self.pinned))

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "method": self.method, "size": self.size,
                "cost": {k: _num_out(v) for k, v in self.cost.items()},
                "utility": self.utility, "gain": self.gain, "cost_class": self.cost_class,
                "pinned": self.pinned}


_ALLOC_REQUIRED = {"site": str, "kind": str, "method": str, "size": int, "cost": dict,
                   "utility": float, "gain": float}
_ALLOC_OPTIONAL = {"cost_class": str, "pinned": bool}
_PLAN_KEYS = ("schema_version", "solver", "objective", "dual_bound", "budgets", "use",
              "peft_options", "metadata", "allocations")


@dataclasses.dataclass(frozen=True)
class Plan:
    """An immutable allocation plan (see the module docstring for its JSON form).

    Attributes:
      allocations: one :class:`SiteAllocation` per site, in site order.
      budgets: the budgets as given (``{resource: limit}``, ``inf`` allowed).
      use: total cost of the plan for every resource.
      dual_bound: upper bound on the best achievable objective under the (effective) budgets, or
        None for a plan built by hand.
      objective: sum of predicted gains.
      peft_options: what the PEFT modules need (see :func:`default_peft_options`).
      schema_version: the JSON schema version.
      solver: ``"lagrangian"``, ``"milp"`` or ``"manual"``.
      metadata: free-form JSON-able record (catalogue, cost and gain models, multipliers, timing).
    """

    allocations: tuple[SiteAllocation, ...]
    budgets: Mapping[str, float]
    use: Mapping[str, float]
    dual_bound: float | None
    objective: float
    peft_options: Mapping[str, Any] = dataclasses.field(default_factory=default_peft_options)
    schema_version: int = SCHEMA_VERSION
    solver: str = "manual"
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        allocations = tuple(self.allocations)
        seen = set()
        for a in allocations:
            if not isinstance(a, SiteAllocation):
                raise ValueError(f"Plan.allocations must hold SiteAllocation records, got "
                                 f"{type(a).__name__}")
            if a.site in seen:
                raise ValueError(f"site {a.site!r} appears twice in the plan")
            seen.add(a.site)
        object.__setattr__(self, "allocations", allocations)
        for field in ("budgets", "use"):
            d = getattr(self, field)
            if not isinstance(d, Mapping):
                raise ValueError(f"Plan.{field} must be a mapping, got {type(d).__name__}")
            out = {}
            for key, value in d.items():
                if key not in RESOURCES:
                    raise ValueError(f"Plan.{field} has unknown resource {key!r}; expected {RESOURCES}")
                out[key] = _num_in(value, f"Plan.{field}[{key!r}]", allow_inf=True)
                if out[key] < 0:
                    raise ValueError(f"Plan.{field}[{key!r}] must be >= 0, got {value!r}")
            object.__setattr__(self, field, _frozen(out))
        if not isinstance(self.peft_options, Mapping):
            raise ValueError(f"Plan.peft_options must be a mapping, got {self.peft_options!r}")
        opts = default_peft_options()
        for key, value in self.peft_options.items():
            if key not in _PEFT_OPTION_TYPES:
                raise ValueError(f"Plan.peft_options has unknown key {key!r}; expected "
                                 f"{sorted(_PEFT_OPTION_TYPES)}")
            types_ = _PEFT_OPTION_TYPES[key]
            ok = isinstance(value, types_) and (bool in types_ or not isinstance(value, bool))
            if not ok:
                raise ValueError(f"Plan.peft_options[{key!r}] must be {'/'.join(t.__name__ for t in types_)}, "
                                 f"got {value!r}")
            opts[key] = float(value) if types_ == (int, float) else value
        object.__setattr__(self, "peft_options", _frozen(opts))
        if self.dual_bound is not None:
            object.__setattr__(self, "dual_bound", _num_in(self.dual_bound, "Plan.dual_bound"))
        object.__setattr__(self, "objective", _num_in(self.objective, "Plan.objective"))
        if not _is_int(self.schema_version):
            raise ValueError(f"Plan.schema_version must be an int, got {self.schema_version!r}")
        if not isinstance(self.solver, str):
            raise ValueError(f"Plan.solver must be a string, got {self.solver!r}")
        if not isinstance(self.metadata, Mapping):
            raise ValueError(f"Plan.metadata must be a mapping, got {type(self.metadata).__name__}")
        object.__setattr__(self, "metadata", _frozen(_jsonable(self.metadata)))

    # ------------------------------------------------------------------------------ queries

    def assignments(self) -> dict[str, tuple[str, int]]:
        """``{site path: (method, size)}`` for every site whose method is not ``"none"``."""
        return {a.site: (a.method, a.size) for a in self.allocations if a.method != "none"}

    def allocation(self, site: str) -> SiteAllocation:
        for a in self.allocations:
            if a.site == site:
                return a
        raise KeyError(f"site {site!r} is not in the plan")

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(a.site for a in self.allocations)

    @property
    def gap(self) -> float | None:
        """Certified relative optimality gap ``(dual_bound - objective) / dual_bound``."""
        if self.dual_bound is None:
            return None
        return (self.dual_bound - self.objective) / self.dual_bound if self.dual_bound > 0 else 0.0

    def check_sites(self, sites: Iterable[Site | str], *, require_all: bool = False) -> None:
        """Raise ``ValueError`` when the plan names sites the model lacks (and, with
        ``require_all``, when a model site is missing from the plan)."""
        known = {s.path if isinstance(s, Site) else str(s) for s in sites}
        extra = [a.site for a in self.allocations if a.site not in known]
        if extra:
            raise ValueError(f"plan site(s) {extra[:5]} are not sites of the model")
        if require_all:
            missing = sorted(known - set(self.sites))
            if missing:
                raise ValueError(f"model site(s) {missing[:5]} are missing from the plan")

    # ------------------------------------------------------------------------------ building

    @classmethod
    def from_assignments(cls, sites: Sequence[Site], assignments: Mapping[str, Any],
                         utility=None, *, budgets: Mapping[str, float] | None = None,
                         cost_model: CostModel | None = None, gain_model: GainModel | None = None,
                         catalogue: Catalogue | None = None,
                         peft_options: Mapping[str, Any] | None = None,
                         solver: str = "manual", metadata: Mapping[str, Any] | None = None) -> "Plan":
        """A plan built by hand: ``{path: (method, size)}``; unlisted sites get ``"none"``.

        Costs and gains come from the same cost and gain models as :func:`allocate` (the reference
        sequence length is taken over all ``sites``), e.g. the uniform-LoRA baseline::

            Plan.from_assignments(sites, uniform_assignments(sites, "lora", 8, ("query", "value")))
        """
        sites = tuple(sites)
        index = {s.path: i for i, s in enumerate(sites)}
        chosen = [("none", 0)] * len(sites)
        for path, value in assignments.items():
            if path not in index:
                raise ValueError(f"assignment names site {path!r}, which is not among the sites")
            if value == "none" or value is None:
                method, size = "none", 0
            else:
                try:
                    method, size = value
                except (TypeError, ValueError):
                    raise ValueError(f"assignment for site {path!r} must be (method, size), got "
                                     f"{value!r}") from None
            if method not in METHODS:
                raise ValueError(f"assignment for site {path!r}: unknown method {method!r}; "
                                 f"expected {METHODS}")
            if not _is_int(size) or size < 0 or (method == "none") != (size == 0):
                raise ValueError(f"assignment for site {path!r}: invalid size {size!r} for "
                                 f"{method!r}")
            kind = sites[index[path]].kind
            compatible = (catalogue.compatible(kind, method) if catalogue is not None
                          else method == "none" or kind in METHOD_KINDS[method])
            if not compatible:
                raise ValueError(f"assignment for site {path!r}: method {method!r} is incompatible "
                                 f"with its kind {kind!r}")
            chosen[index[path]] = (method, int(size))
        u = np.zeros(len(sites)) if utility is None else np.asarray(utility, np.float64)
        if u.shape != (len(sites),):
            raise ValueError(f"utility must have one value per site: shape {u.shape}, "
                             f"{len(sites)} sites")
        options = sorted(set(chosen) | {("none", 0)}, key=lambda o: (METHODS.index(o[0]), o[1]))
        col = {o: j for j, o in enumerate(options)}
        cm = cost_model or CostModel()
        costs = option_costs(sites, options, cm)
        gains = (gain_model or GainModel()).gain(u, options)
        allocations, use = [], np.zeros(len(RESOURCES))
        for i, site in enumerate(sites):
            j = col[chosen[i]]
            use += costs[i, j]
            allocations.append(SiteAllocation(
                site=site.path, kind=site.kind, method=chosen[i][0], size=chosen[i][1],
                cost={r: float(v) for r, v in zip(RESOURCES, costs[i, j])}, utility=float(u[i]),
                gain=float(gains[i, j]), cost_class=cost_class(site)))
        opts = default_peft_options()
        opts["prefix_projection"] = cm.prefix_projection
        opts.update(peft_options or {})
        meta = {"cost_model": cm.to_dict(), "gain_model": (gain_model or GainModel()).to_dict()}
        meta.update(metadata or {})
        return cls(allocations=tuple(allocations), budgets=dict(budgets or {}),
                   use={r: float(v) for r, v in zip(RESOURCES, use)}, dual_bound=None,
                   objective=float(sum(a.gain for a in allocations)), peft_options=opts,
                   solver=solver, metadata=meta)

    # ---------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "solver": self.solver,
            "objective": self.objective,
            "dual_bound": self.dual_bound,
            "budgets": {k: _num_out(v) for k, v in self.budgets.items()},
            "use": {k: _num_out(v) for k, v in self.use.items()},
            "peft_options": dict(self.peft_options),
            "metadata": _jsonable(self.metadata),
            "allocations": [a.to_dict() for a in self.allocations],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """Strict: exactly the schema's keys, of the schema's types."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a plan must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - set(_PLAN_KEYS))
        if unknown:
            raise ValueError(f"plan has unknown key(s) {unknown}; expected {list(_PLAN_KEYS)}")
        missing = [k for k in _PLAN_KEYS if k not in d]
        if missing:
            raise ValueError(f"plan is missing key(s) {missing}")
        version = d["schema_version"]
        if not _is_int(version):
            raise ValueError(f"plan key 'schema_version' must be an int, got {version!r}")
        if version != SCHEMA_VERSION:
            raise ValueError(f"plan schema_version {version} is not supported (this code reads "
                             f"version {SCHEMA_VERSION})")
        for key, typ in (("solver", str), ("budgets", dict), ("use", dict), ("peft_options", dict),
                         ("metadata", dict), ("allocations", list)):
            if not isinstance(d[key], typ):
                raise ValueError(f"plan key {key!r} must be a {typ.__name__}, got "
                                 f"{type(d[key]).__name__}")
        objective = _num_in(d["objective"], "plan key 'objective'")
        bound = None if d["dual_bound"] is None else _num_in(d["dual_bound"], "plan key 'dual_bound'")
        budgets = {k: _num_in(v, f"plan budgets[{k!r}]", allow_inf=True) for k, v in d["budgets"].items()}
        use = {k: _num_in(v, f"plan use[{k!r}]", allow_inf=True) for k, v in d["use"].items()}
        allocations = []
        for n, a in enumerate(d["allocations"]):
            allocations.append(_allocation_from_dict(a, n))
        return cls(allocations=tuple(allocations), budgets=budgets, use=use, dual_bound=bound,
                   objective=objective, peft_options=d["peft_options"], schema_version=version,
                   solver=d["solver"], metadata=d["metadata"])

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(d)


def _allocation_from_dict(a: Any, n: int) -> SiteAllocation:
    if not isinstance(a, Mapping):
        raise ValueError(f"plan allocations[{n}] must be an object, got {type(a).__name__}")
    site = a.get("site", f"allocations[{n}]")
    where = f"plan allocation for site {site!r}"
    unknown = sorted(set(a) - set(_ALLOC_REQUIRED) - set(_ALLOC_OPTIONAL))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}")
    missing = [k for k in _ALLOC_REQUIRED if k not in a]
    if missing:
        raise ValueError(f"{where} is missing key(s) {missing}")
    for key, typ in {**_ALLOC_REQUIRED, **_ALLOC_OPTIONAL}.items():
        if key not in a:
            continue
        value = a[key]
        ok = (_is_int(value) if typ is int else _is_num(value) if typ is float
              else isinstance(value, typ))
        if not ok:
            raise ValueError(f"{where}: key {key!r} must be {typ.__name__}, got {value!r}")
    return SiteAllocation(site=a["site"], kind=a["kind"], method=a["method"], size=a["size"],
                          cost=a["cost"], utility=a["utility"], gain=a["gain"],
                          cost_class=a.get("cost_class", ""), pinned=a.get("pinned", False))


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    """Write the plan's JSON atomically (temporary file in the same folder, then ``os.replace``)."""
    atomic_write_text(path, plan.to_json() + "\n")


def load_plan(path: str | os.PathLike, sites: Iterable[Site | str] | None = None) -> Plan:
    """Read a plan strictly; with ``sites``, also check it names only sites of the model."""
    with open(path) as f:
        text = f.read()
    try:
        plan = Plan.from_json(text)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from e
    if sites is not None:
        plan.check_sites(sites)
    return plan


def uniform_assignments(sites: Sequence[Site], method: str = "lora", size: int = 8,
                        names: Iterable[str] | None = ("query", "value")) -> dict[str, tuple[str, int]]:
    """``{path: (method, size)}`` for every compatible site whose last path component is in
    ``names`` (None: every compatible site): the uniform baselines (LoRA r=8 on query/value)."""
    names = None if names is None else set(names)
    out = {}
    for s in sites:
        if method != "none" and s.kind not in METHOD_KINDS[method]:
            continue
        if names is None or s.path.rsplit("/", 1)[-1] in names:
            out[s.path] = (method, int(size))
    if not out:
        raise ValueError(f"no site matches {names} for method {method!r}")
    return out


# ------------------------------------------------------------------------------------- metrics


@dataclasses.dataclass(frozen=True)
class PlanMetrics:
    """The seed report's plan metrics (see :func:`plan_metrics` for definitions)."""

    utilisation: Mapping[str, float]
    binding_resource: str | None
    binding_utilisation: float
    utilisation_band: tuple[float, float] | None
    constraints: Mapping[str, tuple[float, float, bool]]  # resource -> (use, budget, satisfied)
    constraint_satisfaction: float
    spearman: float
    spearman_p: float
    consistency_class: float
    consistency_class_incl_none: float
    consistency_overall: float
    compatibility_rate: float
    method_diversity: int
    method_counts: Mapping[str, int]
    size_min: int
    size_max: int
    size_mean: float
    adapted_size_min: int
    adapted_size_max: int
    adapted_size_mean: float
    trainable_params: float
    objective: float
    dual_bound: float | None
    gap: float | None
    n_sites: int
    n_adapted: int

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


def _pair_consistency(u: np.ndarray, size: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Share of pairs (i, j) with u_i > u_j (same group if given) that have size_i >= size_j."""
    n = len(u)
    if n < 2:
        return float("nan")
    good = total = 0
    for start in range(0, n, 2048):  # chunked O(n^2) pair count
        ui, si = u[start:start + 2048, None], size[start:start + 2048, None]
        pair = ui > u[None, :]
        if groups is not None:
            pair &= groups[start:start + 2048, None] == groups[None, :]
        total += int(pair.sum())
        good += int((pair & (si >= size[None, :])).sum())
    return good / total if total else float("nan")


def plan_metrics(plan: Plan, *, utilisation_band: tuple[float, float] | None = None) -> PlanMetrics:
    """The seed report's metrics of a plan.

    * **Budget utilisation** per budgeted resource: ``use / budget`` (budgets as given, not the
      utilisation-scaled ones); the *binding* resource is the most utilised one.
    * **Constraint satisfaction**: share of budgets with ``use <= budget``.
    * **Rank–utility Spearman**: Spearman's rho (and its p-value) between size and utility over the
      adapted (non-``none``) sites; NaN with fewer than 3 or constant values.
    * **Rank–utility consistency**: among ordered pairs of sites with ``u_i > u_j``, the share with
      ``size_i >= size_j``. ``consistency_class``: pairs adapted with the same method and in the same
      cost class (equal costs for every option), pinned sites excluded: the allocator guarantees
      100 % here unless per-site size limits differ within a class. ``consistency_class_incl_none``:
      the same with ``none`` counted as size 0. ``consistency_overall``: all pairs of adapted sites,
      sizes compared across methods as numbers (the seed's definition).
    * **Compatibility rate**: share of sites whose method may attach to their kind.
    * **Method diversity**: number of distinct methods used, ``none`` included (the seed's count),
      with the distribution; **size range and mean** over all sites (``none`` = 0) and adapted ones.
    * **Gap**: ``(dual_bound - objective) / dual_bound``, the certified optimality gap.
    """
    from scipy import stats

    allocs = plan.allocations
    u = np.array([a.utility for a in allocs])
    size = np.array([a.size for a in allocs], np.float64)
    adapted = np.array([a.method != "none" for a in allocs], bool)
    utilisation, constraints = {}, {}
    for r, b in plan.budgets.items():
        used = plan.use.get(r, 0.0)
        utilisation[r] = used / b if b > 0 and math.isfinite(b) else (0.0 if used == 0 or b > 0 else math.inf)
        constraints[r] = (used, b, used <= b * (1 + 1e-9))
    binding = max(utilisation, key=utilisation.get) if utilisation else None
    band = utilisation_band
    if band is None and plan.metadata.get("utilisation"):
        band = tuple(plan.metadata["utilisation"])
    rho = p = float("nan")
    if adapted.sum() >= 3 and np.ptp(size[adapted]) > 0 and np.ptp(u[adapted]) > 0:
        res = stats.spearmanr(size[adapted], u[adapted])
        rho, p = float(res.statistic), float(res.pvalue)
    free = ~np.array([a.pinned for a in allocs], bool)
    cls_names = sorted({a.cost_class for a in allocs})
    cls = np.array([cls_names.index(a.cost_class) for a in allocs])
    meth = np.array([METHODS.index(a.method) for a in allocs])
    sel = adapted & free
    cons_class = _pair_consistency(u[sel], size[sel], cls[sel] * len(METHODS) + meth[sel])
    cons_class0 = _pair_consistency(u[free], size[free], cls[free])
    cons_all = _pair_consistency(u[adapted], size[adapted])
    compat = np.mean([a.method == "none" or a.kind in METHOD_KINDS[a.method] for a in allocs])
    counts = collections.Counter(a.method for a in allocs)
    counts = {m: counts.get(m, 0) for m in METHODS}
    sa = size[adapted]
    return PlanMetrics(
        utilisation=utilisation, binding_resource=binding,
        binding_utilisation=utilisation[binding] if binding else float("nan"),
        utilisation_band=band, constraints=constraints,
        constraint_satisfaction=(np.mean([c[2] for c in constraints.values()])
                                 if constraints else 1.0),
        spearman=rho, spearman_p=p, consistency_class=cons_class,
        consistency_class_incl_none=cons_class0, consistency_overall=cons_all,
        compatibility_rate=float(compat), method_diversity=sum(1 for v in counts.values() if v),
        method_counts=counts, size_min=int(size.min()), size_max=int(size.max()),
        size_mean=float(size.mean()),
        adapted_size_min=int(sa.min()) if len(sa) else 0,
        adapted_size_max=int(sa.max()) if len(sa) else 0,
        adapted_size_mean=float(sa.mean()) if len(sa) else 0.0,
        trainable_params=plan.use.get("params", 0.0), objective=plan.objective,
        dual_bound=plan.dual_bound, gap=plan.gap, n_sites=len(allocs), n_adapted=int(adapted.sum()))


_RESOURCE_LABEL = {"params": "Params", "train_flops": "Train FLOPs/token",
                   "infer_flops": "Infer FLOPs/token", "vram_bytes": "VRAM (bytes)",
                   "latency": "Latency (ms)"}


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("✅ Pass" if ok else "⚠️ Below")


def _fmt(x: float, pct: bool = False, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.2f}%" if pct else f"{x:.{digits}f}"


def render_metrics_markdown(metrics: PlanMetrics, *, title: str = "LayerLens plan metrics",
                            spearman_target: float = 0.70, overall_consistency_target: float = 0.85,
                            compatibility_target: float = 0.98, diversity_target: int = 3,
                            gap_target: float = 0.005, fill_target: float = 0.97) -> str:
    """The metrics as Markdown in the seed report's style (target / achieved / status)."""
    m = metrics

    def ge(x, t):
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x >= t

    if m.utilisation_band and m.utilisation_band[0] > 0:
        lo, hi = m.utilisation_band
        util_target = f"{100 * lo:.0f}–{100 * hi:.0f}%"
        util_ok = None if m.binding_resource is None else lo <= m.binding_utilisation <= hi * (1 + 1e-9)
    else:
        hi = m.utilisation_band[1] if m.utilisation_band else 1.0
        util_target = f"≥ {100 * fill_target * hi:.0f}%"
        util_ok = None if m.binding_resource is None else m.binding_utilisation >= fill_target * hi
    binding = f" ({m.binding_resource})" if m.binding_resource else ""
    rows = [
        ("Budget Utilization" + binding, util_target, _fmt(m.binding_utilisation, True), util_ok),
        ("Constraint Satisfaction", "100%", _fmt(m.constraint_satisfaction, True),
         m.constraint_satisfaction == 1.0),
        ("Rank-Utility Correlation (Spearman)", f"≥ {spearman_target:.2f}",
         _fmt(m.spearman) + (f" (p={m.spearman_p:.2g})" if not math.isnan(m.spearman_p) else ""),
         ge(m.spearman, spearman_target)),
        ("Rank-Utility Consistency (same method & cost class)", "100%",
         _fmt(m.consistency_class, True), ge(m.consistency_class, 1.0 - 1e-12)),
        ("Rank-Utility Consistency (overall)", f"≥ {100 * overall_consistency_target:.0f}%",
         _fmt(m.consistency_overall, True), ge(m.consistency_overall, overall_consistency_target)),
        ("Compatibility Rate", f"≥ {100 * compatibility_target:.0f}%",
         _fmt(m.compatibility_rate, True), m.compatibility_rate >= compatibility_target),
        ("Method Diversity", f"≥ {diversity_target}", str(m.method_diversity),
         m.method_diversity >= diversity_target),
        ("Optimality Gap (certified)", f"≤ {100 * gap_target:.1f}%", _fmt(m.gap, True),
         None if m.gap is None else m.gap <= gap_target),
    ]
    lines = [f"# {title}", "", "| Metric | Target | Achieved | Status |",
             "|--------|--------|----------|--------|"]
    lines += [f"| **{name}** | {target} | {value} | {_status(ok)} |" for name, target, value, ok in rows]
    lines += ["", "## Constraint satisfaction", ""]
    for r, (used, budget, ok) in m.constraints.items():
        lines.append(f"- **{_RESOURCE_LABEL.get(r, r)}:** {used:.4g} / {budget:.4g} "
                     f"({_fmt(m.utilisation[r], True)}) {'✅' if ok else '❌'}")
    dist = ", ".join(f"{k} ({v})" for k, v in m.method_counts.items())
    lines += ["", "## Methods and sizes", "",
              f"- **Distribution:** {dist}",
              f"- **Sizes:** {m.size_min} – {m.size_max} (avg: {m.size_mean:.2f}); adapted sites "
              f"{m.adapted_size_min} – {m.adapted_size_max} (avg: {m.adapted_size_mean:.2f})",
              f"- **Consistency within cost class, `none` as size 0:** "
              f"{_fmt(m.consistency_class_incl_none, True)}",
              f"- **Trainable parameters:** {m.trainable_params:,.0f}",
              f"- **Objective / dual bound:** {m.objective:.6g} / "
              f"{'n/a' if m.dual_bound is None else f'{m.dual_bound:.6g}'}",
              f"- **Sites:** {m.n_sites} ({m.n_adapted} adapted)", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------- PEFT export


def hf_bert_module_name(path: str) -> str | None:
    """Site path of :mod:`layerlens_jax.models`' BERT -> module name in HF ``BertModel``.

    ``encoder/layers_3/attention/mha/query`` -> ``encoder.layer.3.attention.self.query``; sites
    without a PyTorch counterpart give None.
    """
    import re

    fixed = {"embeddings/word": "embeddings.word_embeddings",
             "embeddings/position": "embeddings.position_embeddings",
             "embeddings/token_type": "embeddings.token_type_embeddings",
             "pooler": "pooler.dense", "classifier": "classifier"}
    if path in fixed:
        return fixed[path]
    m = re.fullmatch(r"encoder/layers_(\d+)/(.+)", path)
    if not m:
        return None
    i, rest = m.groups()
    sub = {"attention/mha/query": "attention.self.query", "attention/mha/key": "attention.self.key",
           "attention/mha/value": "attention.self.value", "attention/mha/out": "attention.output.dense",
           "mlp/intermediate": "intermediate.dense", "mlp/output": "output.dense"}.get(rest)
    return None if sub is None else f"encoder.layer.{i}.{sub}"


def to_peft_config(plan: Plan, module_name_map: Mapping[str, str] | Callable[[str], str | None] | None = None,
                   *, task_type: str | None = None, base_model_name_or_path: str | None = None,
                   alpha_pattern: Mapping[str, float] | None = None
                   ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """HF PEFT ``LoraConfig``-compatible ``adapter_config.json`` content for the plan's LoRA part.

    ``module_name_map`` maps site paths to PyTorch module names (a mapping, or a callable returning
    None for sites without one; default: ``/`` -> ``.``; :func:`hf_bert_module_name` for the BERT of
    :mod:`layerlens_jax.models`). ``r`` is the most common rank, other ranks go to ``rank_pattern``;
    ``alpha_pattern`` (site -> alpha) holds per-site alphas differing from ``lora_alpha`` (PEFT's
    scaling is ``alpha / r`` per module, or ``alpha / sqrt(r)`` with ``use_rslora``, as ours).

    Returns ``(config, dropped)``; ``dropped`` lists ``{"site", "method", "size", "reason"}`` for
    adapted sites that are not in the config (non-LoRA methods, unmapped modules).
    """
    if module_name_map is None:
        def name_of(p):
            return p.replace("/", ".")
    elif callable(module_name_map):
        name_of = module_name_map
    else:
        name_of = module_name_map.get
    alpha = float(plan.peft_options["lora_alpha"])
    alphas = dict(alpha_pattern or {})
    unknown = sorted(set(alphas) - set(plan.sites))
    if unknown:
        raise ValueError(f"alpha_pattern names site(s) {unknown} not in the plan")
    dropped, ranks, apat, names = [], {}, {}, {}
    for a in plan.allocations:
        if a.method == "none":
            continue
        if a.method != "lora":
            dropped.append({"site": a.site, "method": a.method, "size": a.size,
                            "reason": f"{a.method} is not expressible in a LoraConfig"})
            continue
        name = name_of(a.site)
        if not name:
            dropped.append({"site": a.site, "method": a.method, "size": a.size,
                            "reason": "no PyTorch module name for this site"})
            continue
        if name in names:
            raise ValueError(f"sites {names[name]!r} and {a.site!r} map to one module name {name!r}")
        names[name] = a.site
        ranks[name] = a.size
        if a.site in alphas and float(alphas[a.site]) != alpha:
            apat[name] = float(alphas[a.site])
    counts = collections.Counter(ranks.values())
    r0 = min(counts, key=lambda r: (-counts[r], r)) if counts else 8
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": False,
        "r": int(r0),
        "lora_alpha": alpha,
        "lora_dropout": float(plan.peft_options.get("lora_dropout", 0.0)),
        "use_rslora": bool(plan.peft_options["use_rslora"]),
        "target_modules": sorted(ranks),
        "rank_pattern": {n: int(r) for n, r in sorted(ranks.items()) if r != r0},
        "alpha_pattern": dict(sorted(apat.items())),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return config, dropped


def save_peft_config(plan: Plan, directory: str | os.PathLike, module_name_map=None,
                     **kwargs) -> list[dict[str, Any]]:
    """Write ``directory/adapter_config.json`` (atomically); returns what was dropped."""
    config, dropped = to_peft_config(plan, module_name_map, **kwargs)
    atomic_write_text(os.path.join(os.fspath(directory), "adapter_config.json"),
                  json.dumps(config, indent=2) + "\n")
    return dropped
