"""``apply_plan``, ``merge`` and the trainable-state helpers, for NNX and Linen models.

NNX: module surgery on a clone (``inplace=True`` to edit the given model). LoRA and Adapter
*wrap* the site's module (``site -> LoRA(base_module=site)``), so the base parameters of a
wrapped site move one level down (``.../query/base_module/kernel``); :func:`merge` restores the
original tree for LoRA. Prefix tuning replaces the attention module's ``attention_fn`` with a
:class:`~layerlens_jax._src.peft.Prefix` (nothing is wrapped). Sites are processed deepest first, so a
plan may adapt a block, its attention module and the projections inside it at once.

Linen: :func:`apply_plan` returns a :class:`~layerlens_jax._src.peft.linen.PeftLinen` wrapper that
shares the model's scope and creates adapter parameters inside the intercepted modules (parameter
paths ``<site>/peft_*``, the base tree unchanged). See :mod:`layerlens_jax._src.peft.linen`.

Identity at initialisation: every method's added term is exactly zero at init, so a wrapped model's
outputs equal the base model's bit for bit when run op by op (tested for every method and mixed
plans, NNX and Linen). Under ``jit`` the wrapped and the base model are different XLA programs, and
XLA may fuse (hence round) the shared computation differently: equal to float32 rounding there.

In both, adapter leaves are named ``peft_*`` and live directly under their site, so the
*canonical adapter state* (:func:`adapter_state`: ``{site: {leaf: array}}``) is the same for an NNX
model and its Linen twin: checkpoints move between them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import zlib
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from layerlens_jax._src.methods import ADAPTER_METHODS, METHOD_KINDS, METHODS, PeftOptions
from layerlens_jax._src.peft.linen import PeftLinen, merge_linen
from layerlens_jax._src.peft.nnx_modules import (PEFT_FILTER, Adapter, LoRA, PeftParam, Prefix,
                                                 lora_target_info, prefix_target_info)
from layerlens_jax._src.peft.stacked_lora import StackedLoRA, split_stacked_assignments
from layerlens_jax._src.peft.tree import (PEFT_PREFIX, combine_params, flatten_tree,
                                          partition_params, unflatten_tree)
from layerlens_jax._src.sites import Site, discover_sites, get_submodule, join_path, set_submodule, \
    site_kind_of

__all__ = [
    "METHODS",
    "METHOD_KINDS",
    "PeftOptions",
    "normalize_plan",
    "normalise_plan",
    "apply_plan",
    "applied_plan",
    "merge",
    "is_peft_path",
    "adapter_state",
    "load_adapter_state",
    "trainable_mask",
    "optax_labels",
    "count_trainable",
    "partition_params",
    "combine_params",
]

_OPTION_NAMES = {f.name for f in dataclasses.fields(PeftOptions)}


def normalise_plan(plan: Any, **options) -> tuple[dict[str, tuple[str, int]], PeftOptions]:
    """``(assignments, options)`` from a Plan (``.assignments()`` + ``.peft_options``) or a mapping
    ``{site: (method, size)}`` (or ``{site: {"method": ..., "size": ...}}``). Keyword options
    override the plan's ``peft_options``. Sites with method ``"none"`` are dropped."""
    if hasattr(plan, "assignments") and callable(plan.assignments):
        raw = plan.assignments()
        opts = dict(getattr(plan, "peft_options", None) or {})
    elif isinstance(plan, Mapping):
        raw, opts = plan, {}
    else:
        raise TypeError(f"apply_plan expects a Plan or a mapping {{site: (method, size)}}, "
                        f"got {type(plan).__name__}")
    opts = {k: v for k, v in opts.items() if k in _OPTION_NAMES}
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown PEFT option(s) {sorted(unknown)}; expected {sorted(_OPTION_NAMES)}")
    opts.update({k: v for k, v in options.items() if v is not None})
    out: dict[str, tuple[str, int]] = {}
    for site, entry in raw.items():
        if isinstance(entry, Mapping):
            method, size = entry.get("method"), entry.get("size")
        else:
            try:
                method, size = entry
            except (TypeError, ValueError):
                raise ValueError(f"plan entry for site {site!r} must be (method, size), "
                                 f"got {entry!r}") from None
        if method in (None, "none"):
            continue
        if method not in ADAPTER_METHODS:
            raise ValueError(f"plan assigns unknown method {method!r} to site {site!r}; "
                             f"expected one of {METHODS}")
        if isinstance(size, (np.integer,)):
            size = int(size)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"plan assigns {method} size {size!r} to site {site!r}; "
                             f"expected a positive int")
        out[str(site)] = (method, size)
    return out, PeftOptions(**opts)


def normalize_plan(plan: Any, **options) -> tuple[dict[str, tuple[str, int]], PeftOptions]:
    """Deprecated spelling of :func:`normalise_plan` (kept for one release)."""
    warnings.warn("normalize_plan is deprecated; use normalise_plan", DeprecationWarning,
                  stacklevel=2)
    return normalise_plan(plan, **options)


@jax.jit
def _site_keys(seed, salt):
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), salt))


def _site_rngs(seed: int, site: str) -> nnx.Rngs:
    """Per-site keys from (seed, path): a site's init does not depend on the rest of the plan."""
    k1, k2 = _site_keys(jnp.uint32(seed), jnp.uint32(zlib.crc32(site.encode()) & 0x7FFFFFFF))
    return nnx.Rngs(params=k1, dropout=k2)


def _block_width(site: str, sites: Mapping[str, Site]) -> int:
    s = sites.get(site)
    width = None if s is None else (s.out_features or s.in_features)
    if width is None:
        raise ValueError(f"adapter on block site {site!r}: its width is unknown; pass "
                         f"example=(inputs...) to apply_plan so sites are discovered with shapes, "
                         f"or sites=discover_sites(model, example=...)")
    return int(width)


def _check_nnx_plan(model: nnx.Module, assignments: Mapping[str, tuple[str, int]],
                    example: Any, sites: Iterable[Site] | None) -> dict[str, Site]:
    """Validate every site of the plan against ``model`` (ValueError naming the site) and return
    the discovered block sites adapters need for their widths (empty without adapters)."""
    for site, (method, size) in assignments.items():
        try:
            module = get_submodule(model, site) if site else None
        except (AttributeError, IndexError, ValueError, KeyError, TypeError):
            module = None
        if module is None or not isinstance(module, nnx.Module):
            raise ValueError(f"plan names site {site!r} ({method}) which {type(model).__name__} "
                             f"does not have")
        if isinstance(module, (LoRA, Adapter)) or isinstance(getattr(module, "attention_fn", None),
                                                             Prefix) and method == "prefix":
            raise ValueError(f"site {site!r} already carries a {getattr(module, 'method', 'prefix')}"
                             f" adapter; apply a plan to the base model")
        kind = site_kind_of(module)
        if kind not in METHOD_KINDS[method]:
            raise ValueError(f"plan assigns {method} to site {site!r} of kind {kind!r} "
                             f"({type(module).__name__}); {method} needs a site of kind "
                             f"{' or '.join(METHOD_KINDS[method])}")
        if method == "lora":
            lora_target_info(module, site)
        elif method == "prefix":
            prefix_target_info(module, site)
    site_info: dict[str, Site] = {}
    if any(m == "adapter" for m, _ in assignments.values()):
        found = list(sites) if sites is not None else discover_sites(
            model, example=example, kinds=("block",))
        site_info = {s.path: s for s in found}
        for site, (method, _) in assignments.items():
            if method == "adapter":
                _block_width(site, site_info)
    return site_info


def apply_plan(model: Any, plan: Any, *, inplace: bool = False, example: Any = None,
               sites: Iterable[Site] | None = None, **options) -> Any:
    """Wrap the plan's sites of ``model`` with LoRA / Adapter / Prefix.

    Args:
      model: an ``nnx.Module`` or a Linen ``nn.Module``.
      plan: a Plan (``.assignments()``, ``.peft_options``) or ``{site: (method, size)}``; sites with
        method ``"none"`` are skipped.
      inplace: NNX only: edit ``model`` itself instead of an ``nnx.clone``.
      example: NNX only, needed when the plan has adapters (to know block widths): example inputs
        of the model's ``__call__``.
      sites: NNX only, an alternative to ``example``: already-discovered sites (with widths).
      **options: :class:`PeftOptions` fields, overriding the plan's ``peft_options``.

    Returns:
      The wrapped NNX model (adapters initialised, the identity at init), or a
      :class:`~layerlens_jax._src.peft.linen.PeftLinen` (initialise its adapters with
      :func:`~layerlens_jax._src.peft.linen.init_adapters`).

    Raises:
      ValueError: naming the site, for a site the model lacks, a method its kind cannot take, a bad
        size, an adapter whose width is unknown, or a site already adapted; raised before any
        edit, so the model is untouched. Also for ``inplace=True`` with a Linen model.
      TypeError: for a model or plan of the wrong type, or an unknown option.

    >>> from flax import nnx
    >>> from layerlens_jax.models import MLP
    >>> model = MLP((4, 8, 2), rngs=nnx.Rngs(0))
    >>> wrapped = apply_plan(model, {"layers_0": ("lora", 2)})
    >>> type(wrapped.layers_0).__name__, count_trainable(wrapped)  # 2 * (4 + 8)
    ('LoRA', 24)
    >>> type(model.layers_0).__name__  # the model itself is unchanged (a clone was wrapped)
    'Linear'
    """
    assignments, opts = normalise_plan(plan, **options)
    if isinstance(model, nn.Module):
        if inplace:
            raise ValueError("inplace=True has no meaning for a Linen module (they are immutable)")
        return PeftLinen.create(model, assignments, opts)
    if not isinstance(model, nnx.Module):
        raise TypeError(f"apply_plan expects a flax nnx.Module or linen Module, "
                        f"got {type(model).__name__}")
    if isinstance(opts.seed, bool) or not isinstance(opts.seed, int):
        raise ValueError(f"seed must be an int, got {opts.seed!r}")
    assignments, stacked = split_stacked_assignments(model, assignments)  # per-layer LoRA
    site_info = _check_nnx_plan(model, assignments, example, sites)  # before any edit
    for path in stacked:
        lora_target_info(get_submodule(model, path), path)
    target = model if inplace else nnx.clone(model)
    for path, (ranks, layer_sites) in stacked.items():
        set_submodule(target, path, StackedLoRA(
            get_submodule(target, path), ranks, alpha=opts.lora_alpha, use_rslora=opts.use_rslora,
            dropout=opts.lora_dropout, param_dtype=opts.param_dtype,
            rngs=_site_rngs(opts.seed, path), site=path, layer_sites=layer_sites))
    for site in sorted(assignments, key=lambda p: (-p.count("/"), p)):
        method, size = assignments[site]
        module = get_submodule(target, site)
        rngs = _site_rngs(opts.seed, site)
        if method == "lora":
            wrapped = LoRA(module, size, alpha=opts.lora_alpha, use_rslora=opts.use_rslora,
                           dropout=opts.lora_dropout, param_dtype=opts.param_dtype, rngs=rngs,
                           site=site)
            set_submodule(target, site, wrapped)
        elif method == "adapter":
            wrapped = Adapter(module, size, features=_block_width(site, site_info),
                              activation=opts.adapter_activation, param_dtype=opts.param_dtype,
                              rngs=rngs, site=site)
            set_submodule(target, site, wrapped)
        else:
            info = prefix_target_info(module, site)
            module.attention_fn = nnx.data(Prefix(
                size, info["num_heads"], info["head_dim"], base_fn=module.attention_fn,
                mode=opts.prefix_mode, reparam_hidden=opts.prefix_reparam_hidden,
                embed_features=getattr(module, "in_features", None),
                param_dtype=opts.param_dtype, rngs=rngs, site=site, attention=module))
    return target


def _peft_modules(model: nnx.Module):
    for _, m in nnx.iter_modules(model):
        if isinstance(m, (LoRA, Adapter, Prefix)):
            yield m


def applied_plan(model: Any) -> dict[str, tuple[str, int]]:
    """``{site: (method, size)}`` of the adapters a wrapped model carries (NNX model or
    :class:`~layerlens_jax._src.peft.linen.PeftLinen`)."""
    if isinstance(model, nn.Module):
        return dict((s, (m, z)) for s, m, z in getattr(model, "assignments", ()))
    out = {}
    for m in _peft_modules(model):
        out.update(m.layer_assignments() if isinstance(m, StackedLoRA) else {m.site: (m.method, m.size)})
    return out


# ------------------------------------------------------------------------------- merge


def merge(model: Any, variables: Mapping | None = None, *, inplace: bool = False):
    """Fold every LoRA into its base kernel: ``kernel + scale * A @ B``.

    Adapters and prefixes are *not mergeable* (an adapter's nonlinearity and a prefix's extra
    softmax keys are not linear maps of the base weights): they stay as they are.

    Args:
      model: a wrapped NNX model (from :func:`apply_plan`), or a
        :class:`~layerlens_jax._src.peft.linen.PeftLinen`.
      variables: Linen only: the wrapper's variables (with the ``peft_*`` leaves).
      inplace: NNX only: edit ``model`` itself instead of an ``nnx.clone``.

    Returns:
      NNX: the model with each ``LoRA`` replaced by its base module carrying the merged kernel
      (computed in float32, stored in the kernel's dtype). Linen: ``(module, variables)`` where
      ``module`` is the bare model when only LoRA was applied, else a wrapper with the remaining
      methods.

    Raises:
      ValueError: a Linen wrapper without ``variables``, or variables lacking a site's LoRA factors.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from layerlens_jax.models import MLP
    >>> model = MLP((4, 8, 2), rngs=nnx.Rngs(0))
    >>> wrapped = apply_plan(model, {"layers_0": ("lora", 2), "layers_1": ("lora", 1)})
    >>> wrapped.layers_0.peft_lora_b[...] = jnp.ones((2, 8))  # a non-zero update
    >>> merged = merge(wrapped)
    >>> type(merged.layers_0).__name__, count_trainable(merged)
    ('Linear', 0)
    >>> x = jnp.ones((3, 4))
    >>> bool(jnp.allclose(merged(x), wrapped(x), atol=1e-5))
    True
    """
    if isinstance(model, nn.Module):
        if variables is None:
            raise ValueError("merge of a Linen wrapper needs its variables: merge(module, variables)")
        return merge_linen(model, variables)
    target = model if inplace else nnx.clone(model)
    loras = [(join_path(p), m) for p, m in nnx.iter_modules(target) if isinstance(m, LoRA)]
    for path, lora in sorted(loras, key=lambda pm: -pm[0].count("/")):
        base = lora.base_module
        var = getattr(base, lora.target.kernel_name)
        var[...] = lora.merged_kernel()
        set_submodule(target, path, base)
    return target


# ---------------------------------------------------------------- trainable separation


def is_peft_path(path: Iterable[Any]) -> bool:
    """True for a parameter path whose leaf is an adapter leaf (``peft_*``)."""
    parts = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    return bool(parts) and str(parts[-1]).startswith(PEFT_PREFIX)


def trainable_mask(params: Any) -> Any:
    """A bool pytree (optax mask) with True exactly at adapter leaves, for a Linen params dict or
    an ``nnx.State`` / pure dict of NNX state."""
    if isinstance(params, nnx.State):
        params = params.to_pure_dict()
    return jax.tree_util.tree_map_with_path(lambda p, _: is_peft_path(p), params)


def optax_labels(params: Any, trainable: str = "trainable", frozen: str = "frozen") -> Any:
    """Labels for ``optax.multi_transform``: ``trainable`` at adapter leaves, ``frozen`` elsewhere.

    Prefer differentiating only the adapter partition (:func:`partition_params`,
    :mod:`layerlens_jax._src.train`): ``optax.set_to_zero`` on frozen leaves still rewrites ``-0.0``.
    """
    return jax.tree.map(lambda m: trainable if m else frozen, trainable_mask(params))


def count_trainable(model_or_params: Any) -> int:
    """Number of adapter parameters of an NNX model, an ``nnx.State`` or a Linen params dict."""
    if isinstance(model_or_params, nnx.Module):
        leaves = jax.tree.leaves(nnx.state(model_or_params, PEFT_FILTER))
    else:
        if isinstance(model_or_params, nnx.State):
            model_or_params = model_or_params.to_pure_dict()
        if isinstance(model_or_params, Mapping) and "params" in model_or_params:
            model_or_params = model_or_params["params"]
        leaves = [v for k, v in flatten_tree(model_or_params).items() if k[-1].startswith(PEFT_PREFIX)]
    return int(sum(math.prod(np.shape(x)) for x in leaves))


# ------------------------------------------------------------- canonical adapter state


def adapter_state(model: Any, variables: Mapping | None = None) -> dict[str, dict[str, jax.Array]]:
    """``{site: {leaf_name: array}}`` for an NNX model, or a Linen wrapper and its variables.

    The same structure for an NNX model and its Linen twin, whatever nesting the NNX wrappers add.
    """
    if isinstance(model, nn.Module) or variables is not None:
        if variables is None:
            raise ValueError("adapter_state of a Linen model needs its variables")
        params = variables.get("params", variables)
        out: dict[str, dict[str, Any]] = {}
        for k, v in flatten_tree(params).items():
            if k[-1].startswith(PEFT_PREFIX):
                out.setdefault("/".join(k[:-1]), {})[k[-1]] = v
        return out
    out = {}
    for m in _peft_modules(model):
        leaves = {name: var[...] for name, var in vars(m).items()
                  if name.startswith(PEFT_PREFIX) and isinstance(var, PeftParam)}
        out[m.site] = leaves
    return out


def _adapter_vars(model: nnx.Module) -> dict[str, dict[str, PeftParam]]:
    return {m.site: {name: var for name, var in vars(m).items()
                     if name.startswith(PEFT_PREFIX) and isinstance(var, PeftParam)}
            for m in _peft_modules(model)}


def check_adapter_state(expected: Mapping[str, Mapping[str, Any]],
                        given: Mapping[str, Mapping[str, Any]], what: str = "state") -> None:
    """Raise ``ValueError`` naming the first site / leaf where two adapter states differ in
    structure, shape or dtype."""
    missing = sorted(set(expected) - set(given))
    extra = sorted(set(given) - set(expected))
    if missing or extra:
        raise ValueError(f"adapter {what} does not match the model's plan: sites missing from the "
                         f"{what}: {missing}; sites the model lacks: {extra}")
    for site in sorted(expected):
        e, g = expected[site], given[site]
        if set(e) != set(g):
            raise ValueError(f"adapter {what} for site {site!r} has leaves {sorted(g)}, the model "
                             f"has {sorted(e)}")
        for leaf in sorted(e):
            es, gs = tuple(np.shape(e[leaf])), tuple(np.shape(g[leaf]))
            if es != gs:
                raise ValueError(f"adapter {what} for site {site!r} leaf {leaf!r} has shape {gs}, "
                                 f"the model expects {es}")
            ed, gd = jnp.dtype(getattr(e[leaf], "dtype", None)), jnp.dtype(
                getattr(g[leaf], "dtype", None))
            if ed != gd:
                raise ValueError(f"adapter {what} for site {site!r} leaf {leaf!r} has dtype {gd}, "
                                 f"the model expects {ed}")


def load_adapter_state(model: Any, state: Mapping[str, Mapping[str, Any]],
                       variables: Mapping | None = None):
    """Write a canonical adapter state into a model, after checking it matches exactly.

    NNX: updates ``model`` in place and returns it. Linen: returns new variables. On any mismatch
    raises ``ValueError`` and changes nothing.
    """
    if isinstance(model, nn.Module) or variables is not None:
        if variables is None:
            raise ValueError("load_adapter_state of a Linen model needs its variables")
        check_adapter_state(adapter_state(model, variables), state)
        params = variables["params"]
        flat = flatten_tree(params)
        for site, leaves in state.items():
            for leaf, v in leaves.items():
                flat[tuple(site.split("/")) + (leaf,)] = jnp.asarray(v)
        return {**variables, "params": unflatten_tree(flat)}
    current = _adapter_vars(model)
    check_adapter_state({s: {k: v[...] for k, v in d.items()} for s, d in current.items()}, state)
    for site, leaves in current.items():
        for leaf, var in leaves.items():
            var[...] = jnp.asarray(state[site][leaf])
    return model
