"""The Plan: an immutable record of the method and size chosen per site, with its costs.

A :class:`Plan` holds one :class:`SiteAllocation` per site (method, size, cost vector, utility,
predicted gain), the budgets and their use, the objective and the Lagrangian dual bound (so every
allocated plan carries its optimality-gap certificate), and the PEFT options the plan records
(:data:`~layerlens_jax._src.methods.PLAN_OPTION_NAMES`: ``lora_alpha``, ``use_rslora``, ...).
Metrics and their Markdown are in :mod:`~layerlens_jax._src.plan_metrics`, the HF PEFT export in
:mod:`~layerlens_jax._src.export`.

JSON (``schema_version`` 1)::

    {"schema_version": 1, "solver": "lagrangian", "objective": 3.2, "dual_bound": 3.21,
     "budgets": {"params": 20000}, "use": {"params": 19876, ...},
     "peft_options": {"lora_alpha": 16.0, ..., "prefix_reparam_hidden": null}, "metadata": {...},
     "allocations": [{"site": "encoder/layers_0/attention/mha/query", "kind": "linear",
                      "method": "lora", "size": 8, "cost": {"params": 256, ...},
                      "utility": 0.9, "gain": 0.45, "cost_class": "linear:16x16:hNonexNone:n7",
                      "pinned": false}, ...]}

Loading is strict: unknown or missing keys, wrong types, unknown methods or kinds, duplicate sites
raise ``ValueError`` naming the key and site. Unbounded budgets are written as the string ``"inf"``.
Missing ``peft_options`` keys take their defaults. Compatibility: plans written before the PEFT
options had one record name the prefix reparameterisation width ``prefix_projection`` (an int,
0 = off); loading reads it as ``prefix_reparam_hidden`` (None = off).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from layerlens_jax._src.costs import (RESOURCES, Catalogue, CostModel, GainModel, cost_class,
                                      option_costs)
from layerlens_jax._src.fileio import atomic_write_text
from layerlens_jax._src.methods import (METHOD_KINDS, METHODS, PLAN_OPTION_NAMES,
                                        default_peft_options, peft_options_from_mapping)
from layerlens_jax._src.sites import KINDS, Site

__all__ = [
    "SCHEMA_VERSION",
    "SiteAllocation",
    "Plan",
    "uniform_assignments",
    "save_plan",
    "load_plan",
]

SCHEMA_VERSION = 1
#: The plan-JSON name of ``prefix_reparam_hidden`` before the PEFT options had one record.
_LEGACY_PREFIX_OPTION = "prefix_projection"


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


def to_jsonable(x):
    """``x`` with numpy scalars as Python numbers, tuples as lists, ``inf`` as ``"inf"`` and NaN
    (or ``-inf``) as None: what ``json.dumps(..., allow_nan=False)`` accepts."""
    if isinstance(x, Mapping):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if _is_int(x):
        return int(x)
    if _is_num(x):
        x = float(x)
        return x if math.isfinite(x) else ("inf" if x > 0 else None)
    return x


@dataclasses.dataclass(frozen=True, kw_only=True)
class SiteAllocation:
    """The option chosen for one site.

    The constructor validates only; :meth:`Plan.create` stores a normalised copy
    (:meth:`normalised`) in every plan it builds.
    """

    site: str  # the site's path
    kind: str  # the site's kind (one of sites.KINDS)
    method: str  # one of methods.METHODS
    size: int  # rank / bottleneck / prefix length; 0 exactly for "none"
    cost: Mapping[str, float]  # resource (costs.RESOURCES) -> this option's cost
    utility: float  # the site's utility score
    gain: float  # predicted gain of this option
    cost_class: str = ""  # shared by sites whose costs are equal for every option (costs.cost_class)
    pinned: bool = False  # whether the user fixed this site's option

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
        if self.kind not in METHOD_KINDS[self.method]:
            raise ValueError(f"{where}: method {self.method!r} is incompatible with kind "
                             f"{self.kind!r} (compatible: {METHOD_KINDS[self.method]})")
        if not isinstance(self.cost, Mapping):
            raise ValueError(f"{where}: cost must be a mapping, got {type(self.cost).__name__}")
        for key, value in self.cost.items():
            if key not in RESOURCES:
                raise ValueError(f"{where}: unknown cost resource {key!r}; expected {RESOURCES}")
            _num_in(value, f"{where}: cost[{key!r}]")
        _num_in(self.utility, f"{where}: utility")
        _num_in(self.gain, f"{where}: gain")
        if not isinstance(self.cost_class, str):
            raise ValueError(f"{where}: cost_class must be a string, got {self.cost_class!r}")
        if not isinstance(self.pinned, (bool, np.bool_)):
            raise ValueError(f"{where}: pinned must be a bool, got {self.pinned!r}")

    def normalised(self) -> "SiteAllocation":
        """A copy with Python ``int`` / ``float`` / ``bool`` values and a read-only ``cost``."""
        return dataclasses.replace(
            self, size=int(self.size), cost=_frozen({k: float(v) for k, v in self.cost.items()}),
            utility=float(self.utility), gain=float(self.gain), pinned=bool(self.pinned))

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "kind": self.kind, "method": self.method, "size": int(self.size),
                "cost": {k: _num_out(v) for k, v in self.cost.items()},
                "utility": float(self.utility), "gain": float(self.gain),
                "cost_class": self.cost_class, "pinned": bool(self.pinned)}


_ALLOC_REQUIRED = {"site": str, "kind": str, "method": str, "size": int, "cost": dict,
                   "utility": float, "gain": float}
_ALLOC_OPTIONAL = {"cost_class": str, "pinned": bool}
_PLAN_KEYS = ("schema_version", "solver", "objective", "dual_bound", "budgets", "use",
              "peft_options", "metadata", "allocations")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """An immutable allocation plan (see the module docstring for its JSON form).

    Build plans with :meth:`create` (or :func:`~layerlens_jax._src.allocate.allocate`,
    :meth:`from_assignments`, :meth:`from_dict` / :func:`load_plan`, which call it): it fills the
    PEFT option defaults and stores read-only mappings and Python numbers. The bare constructor
    validates its arguments and stores them as given (so ``dataclasses.replace`` on a created plan
    keeps it normalised).
    """

    allocations: tuple[SiteAllocation, ...]  # one per site, in site order
    budgets: Mapping[str, float]  # the budgets as given ({resource: limit}, inf allowed)
    use: Mapping[str, float]  # total cost of the plan for every resource
    # upper bound on the best achievable objective under the (effective) budgets; None by hand
    dual_bound: float | None
    objective: float  # sum of predicted gains
    # the options the plan records: every name of methods.PLAN_OPTION_NAMES
    peft_options: Mapping[str, Any] = dataclasses.field(default_factory=default_peft_options)
    schema_version: int = SCHEMA_VERSION  # the JSON schema version
    solver: str = "manual"  # "lagrangian", "milp" or "manual"
    # free-form JSON-able record (catalogue, cost and gain models, multipliers, timing)
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.allocations, tuple):
            raise ValueError(f"Plan.allocations must be a tuple, got {type(self.allocations).__name__}")
        seen = set()
        for a in self.allocations:
            if not isinstance(a, SiteAllocation):
                raise ValueError(f"Plan.allocations must hold SiteAllocation records, got "
                                 f"{type(a).__name__}")
            if a.site in seen:
                raise ValueError(f"site {a.site!r} appears twice in the plan")
            seen.add(a.site)
        for field in ("budgets", "use"):
            d = getattr(self, field)
            if not isinstance(d, Mapping):
                raise ValueError(f"Plan.{field} must be a mapping, got {type(d).__name__}")
            for key, value in d.items():
                if key not in RESOURCES:
                    raise ValueError(f"Plan.{field} has unknown resource {key!r}; expected {RESOURCES}")
                if _num_in(value, f"Plan.{field}[{key!r}]", allow_inf=True) < 0:
                    raise ValueError(f"Plan.{field}[{key!r}] must be >= 0, got {value!r}")
        peft_options_from_mapping(self.peft_options, where="Plan.peft_options")
        missing = [k for k in PLAN_OPTION_NAMES if k not in self.peft_options]
        if missing:
            raise ValueError(f"Plan.peft_options is missing key(s) {missing} (Plan.create fills "
                             f"the defaults)")
        if self.dual_bound is not None:
            _num_in(self.dual_bound, "Plan.dual_bound")
        _num_in(self.objective, "Plan.objective")
        if not _is_int(self.schema_version):
            raise ValueError(f"Plan.schema_version must be an int, got {self.schema_version!r}")
        if not isinstance(self.solver, str):
            raise ValueError(f"Plan.solver must be a string, got {self.solver!r}")
        if not isinstance(self.metadata, Mapping):
            raise ValueError(f"Plan.metadata must be a mapping, got {type(self.metadata).__name__}")

    @classmethod
    def create(cls, *, allocations: Iterable[SiteAllocation], budgets: Mapping[str, Any],
               use: Mapping[str, Any], dual_bound: float | None, objective: float,
               peft_options: Mapping[str, Any] | None = None,
               schema_version: int = SCHEMA_VERSION, solver: str = "manual",
               metadata: Mapping[str, Any] | None = None) -> "Plan":
        """A validated, normalised plan.

        Args:
          allocations: one :class:`SiteAllocation` per site, in site order.
          budgets, use: ``{resource: value}``; ``inf`` (or ``"inf"``) allowed.
          dual_bound: the allocator's bound on the objective, None for a plan built by hand.
          objective: sum of predicted gains.
          peft_options: any of :data:`~layerlens_jax._src.methods.PLAN_OPTION_NAMES`; the others
            take their defaults.
          schema_version, solver, metadata: as the fields.

        Returns:
          The plan, with read-only ``budgets`` / ``use`` / ``peft_options`` / ``metadata`` (made
          JSON-able) and Python numbers.

        Raises:
          ValueError: naming the field, key or site that is invalid.
        """
        options = peft_options_from_mapping(peft_options or {}, where="Plan.peft_options")
        checked = cls(allocations=tuple(allocations), budgets=budgets, use=use,
                      dual_bound=dual_bound, objective=objective,
                      peft_options=options.plan_options(), schema_version=schema_version,
                      solver=solver, metadata=metadata if metadata is not None else {})
        return dataclasses.replace(
            checked,
            allocations=tuple(a.normalised() for a in checked.allocations),
            budgets=_frozen({k: _num_in(v, k, allow_inf=True) for k, v in budgets.items()}),
            use=_frozen({k: _num_in(v, k, allow_inf=True) for k, v in use.items()}),
            dual_bound=None if dual_bound is None else float(dual_bound),
            objective=float(objective), peft_options=_frozen(checked.peft_options),
            schema_version=int(schema_version), metadata=_frozen(to_jsonable(checked.metadata)))

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
        _check_stacks_share_options(sites, chosen)
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
        # the prefix MLP the costs assumed (cost model: 0 = off; PEFT options: None = off)
        opts = {"prefix_reparam_hidden": cm.prefix_projection or None, **(peft_options or {})}
        meta = {"cost_model": cm.to_dict(), "gain_model": (gain_model or GainModel()).to_dict()}
        meta.update(metadata or {})
        return cls.create(allocations=allocations, budgets=dict(budgets or {}),
                          use={r: float(v) for r, v in zip(RESOURCES, use)}, dual_bound=None,
                          objective=float(sum(a.gain for a in allocations)), peft_options=opts,
                          solver=solver, metadata=meta)

    # ---------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": int(self.schema_version),
            "solver": self.solver,
            "objective": float(self.objective),
            "dual_bound": None if self.dual_bound is None else float(self.dual_bound),
            "budgets": {k: _num_out(v) for k, v in self.budgets.items()},
            "use": {k: _num_out(v) for k, v in self.use.items()},
            "peft_options": to_jsonable(self.peft_options),
            "metadata": to_jsonable(self.metadata),
            "allocations": [a.to_dict() for a in self.allocations],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Plan":
        """Strict: exactly the schema's keys, of the schema's types (``peft_options`` may omit
        keys, and may use the legacy name ``prefix_projection``: see the module docstring)."""
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
        return cls.create(allocations=allocations, budgets=budgets, use=use, dual_bound=bound,
                          objective=objective, peft_options=_upgraded_options(d["peft_options"]),
                          schema_version=version, solver=d["solver"], metadata=d["metadata"])

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan is not valid JSON: {e}") from e
        return cls.from_dict(d)


def _upgraded_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """Plan-JSON ``peft_options`` with the legacy ``prefix_projection`` (int, 0 = off) read as
    ``prefix_reparam_hidden`` (None = off)."""
    options = dict(options)
    if _LEGACY_PREFIX_OPTION not in options:
        return options
    width = options.pop(_LEGACY_PREFIX_OPTION)
    if not _is_int(width) or width < 0:
        raise ValueError(f"plan peft_options[{_LEGACY_PREFIX_OPTION!r}] must be an int >= 0, "
                         f"got {width!r}")
    if "prefix_reparam_hidden" in options:
        raise ValueError(f"plan peft_options has both {_LEGACY_PREFIX_OPTION!r} and its new name "
                         f"'prefix_reparam_hidden'; keep one")
    options["prefix_reparam_hidden"] = int(width) or None
    return options


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
    """Write the plan's JSON (schema in the module docstring) crash-safely.

    Args:
      plan: the plan to write.
      path: the file; missing parent folders are created. Written to a temporary file in the same
        folder, then renamed over ``path`` (:func:`~layerlens_jax._src.fileio.atomic_write_text`):
        a reader sees the old file or the new one, never a torn one.

    Returns:
      None.
    """
    atomic_write_text(path, plan.to_json() + "\n")


def load_plan(path: str | os.PathLike, sites: Iterable[Site | str] | None = None) -> Plan:
    """Read a plan written by :func:`save_plan`, strictly.

    Args:
      path: the JSON file.
      sites: the model's sites (:class:`Site` records or paths); when given, the plan may name
        only these (a plan may leave model sites out).

    Returns:
      The :class:`Plan`, normalised as :meth:`Plan.create` makes it.

    Raises:
      ValueError: prefixed with ``path``, for invalid JSON, unknown or missing keys, wrong types,
        unknown methods or kinds, duplicate sites, or (with ``sites``) sites the model lacks.
    """
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


def _check_stacks_share_options(sites: Sequence[Site], chosen: Sequence[tuple[str, int]]) -> None:
    """A plan's layers of one ``nnx.scan`` stack must share one option: ``apply_plan`` stores one
    padded LoRA of the largest rank for the whole stack, so uneven per-layer options would cost
    more than the plan reports (``apply_plan`` takes them from a plain dict, unpriced)."""
    seen: dict[str, tuple[str, tuple[str, int]]] = {}
    for site, option in zip(sites, chosen):
        stack = getattr(site, "stacked_module", None)
        if not stack:
            continue
        first = seen.setdefault(stack, (site.path, option))
        if first[1] != option:
            raise ValueError(f"sites {first[0]!r} {first[1]} and {site.path!r} {option} are layers "
                             f"of the stacked module {stack!r}: a Plan gives every layer of a "
                             f"stack one option (it is stored padded to the largest)")
