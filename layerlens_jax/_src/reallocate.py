"""In-training reallocation of LoRA ranks (NNX): re-solve the plan, resize the adapters in place.

The loop a caller runs after a fraction of training (``state`` from
:func:`~layerlens_jax._src.train.make_functional_train_step`)::

    write_back(model, state)                                    # current factors into the model
    u = merged_utility(model, per_example_loss, batches, sites)  # re-profile the merged model
    new_plan = reallocate_plan(model, plan, sites, u)            # same budgets, LoRA only
    resize_lora(model, lora_ranks(new_plan), seed=step)          # keep / shrink / grow / drop / add
    step_fn, fresh = make_functional_train_step(model, tx, loss_fn)   # one recompile
    state = fresh._replace(step=state.step, opt_state=transfer_optimizer_state(
        tx, state.trainable, state.opt_state, fresh.trainable))

What each rank change does to a site's factors (``delta = scale_r * A @ B``, :class:`LoRA`):

* kept: nothing (the factors and their optimizer state stay bit for bit);
* shrunk to ``r' >= 1``: the best rank-``r'`` approximation of ``delta`` (truncated SVD, computed
  in float64 from QR factors of ``A`` and ``B``: no SVD of the full kernel), the singular values
  split evenly (square root on each side) between ``A'`` and ``B'``; the optimizer state restarts
  at zero (the basis rotated);
* grown: ``A``'s columns are kept and ``B``'s rows rescaled by ``scale_r / scale_r'``, so the delta
  is unchanged; the new columns of ``A`` are He-uniform as at LoRA init, the new rows of ``B``
  zero. ``A``'s gradient is then unchanged, ``B``'s scales by ``scale_r' / scale_r``; Adam's
  ``mu / sqrt(nu)`` is invariant to that, so copying the moments is sound;
* dropped (rank 0): the delta is folded into the base kernel (as :func:`merge` does) and the
  wrapper removed;
* added: a fresh LoRA (zero ``B``: the function is unchanged) with the model's LoRA options.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from layerlens_jax._src.allocate import allocate
from layerlens_jax._src.costs import Catalogue, MethodSpec
from layerlens_jax._src.methods import PeftOptions
from layerlens_jax._src.peft.apply import _site_rngs, merge
from layerlens_jax._src.peft.nnx_modules import Adapter, LoRA, Prefix, lora_target_info
from layerlens_jax._src.peft.stacked_lora import StackedLoRA
from layerlens_jax._src.plan import Plan
from layerlens_jax._src.profile import profile
from layerlens_jax._src.sites import Site, get_submodule, join_path, set_submodule
from layerlens_jax._src.utility import UtilityConfig, utility as site_utility

__all__ = ["lora_ranks", "resize_lora", "transfer_optimizer_state", "merged_utility",
           "reallocate_plan"]

#: Salt of the keys that draw the new columns of a grown ``A`` (apart from the apply_plan keys).
_GROW_SALT = "#resize"


def lora_ranks(plan: Plan) -> dict[str, int]:
    """``{site: rank}`` for every site of a LoRA-only plan (0 where the method is ``"none"``): the
    ``ranks`` argument of :func:`resize_lora`. ``ValueError`` naming a site with another method."""
    ranks = {}
    for a in plan.allocations:
        if a.method not in ("lora", "none"):
            raise ValueError(f"lora_ranks: site {a.site!r} has method {a.method!r}; in-training "
                             f"reallocation handles LoRA-only plans")
        ranks[a.site] = int(a.size)
    return ranks


def _lora_modules(model: nnx.Module) -> dict[str, LoRA]:
    return {join_path(p): m for p, m in nnx.iter_modules(model) if isinstance(m, LoRA)}


def _check_lora_only(module: Any, site: str) -> None:
    """``ValueError`` naming ``site`` when it carries anything but one plain (unstacked) LoRA."""
    if isinstance(module, StackedLoRA) or (isinstance(module, LoRA) and module.stack):
        raise ValueError(f"site {site!r} carries a stacked (nnx.scan) LoRA; resizing stacked "
                         f"LoRA is not supported")
    if isinstance(module, Adapter) or isinstance(getattr(module, "attention_fn", None), Prefix):
        method = "an adapter" if isinstance(module, Adapter) else "a prefix"
        raise ValueError(f"site {site!r} carries {method}; in-training reallocation handles "
                         f"LoRA only")


def _site_module(model: nnx.Module, site: str) -> Any:
    try:
        module = get_submodule(model, site) if site else None
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        module = None
    if not isinstance(module, nnx.Module):
        raise ValueError(f"resize_lora: {type(model).__name__} has no site {site!r} (a site under "
                         f"an adapter or prefix wrapper cannot be resized)")
    return module


def _checked_rank(site: str, rank: Any) -> int:
    if isinstance(rank, np.integer):
        rank = int(rank)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"resize_lora: rank for site {site!r} must be an int >= 0, got {rank!r}")
    return rank


def _lora_options(loras: Mapping[str, LoRA], given: PeftOptions | Mapping | None) -> dict:
    """The LoRA options (alpha, rslora, dropout, param dtype) a new LoRA gets: ``given``, else
    those every LoRA of the model shares (``ValueError`` naming two sites that differ), else the
    :class:`PeftOptions` defaults."""
    if given is not None:
        opts = given if isinstance(given, PeftOptions) else PeftOptions(**dict(given))
        return dict(alpha=float(opts.lora_alpha), use_rslora=bool(opts.use_rslora),
                    dropout=float(opts.lora_dropout), param_dtype=opts.param_dtype)
    seen: dict[tuple, str] = {}
    for site, m in loras.items():
        rate = 0.0 if m.dropout is None else float(m.dropout.rate)
        seen.setdefault((m.alpha, m.use_rslora, rate, jnp.dtype(m.peft_lora_a[...].dtype)), site)
    if len(seen) > 1:
        (o1, s1), (o2, s2) = list(seen.items())[:2]
        raise ValueError(f"resize_lora: LoRA sites {s1!r} and {s2!r} differ in options (alpha, "
                         f"rslora, dropout, dtype) {o1} vs {o2}; pass peft_options")
    if not seen:
        return _lora_options({}, PeftOptions())
    alpha, use_rslora, rate, dtype = next(iter(seen))
    return dict(alpha=alpha, use_rslora=use_rslora, dropout=rate, param_dtype=dtype)


def _checked_changes(model: nnx.Module, ranks: Mapping[str, Any]) -> dict[str, tuple[str, int]]:
    """``{site: (status, rank)}``, every site checked before any edit (ValueError naming it)."""
    changes = {}
    for site, rank in ranks.items():
        rank = _checked_rank(site, rank)
        module = _site_module(model, site)
        _check_lora_only(module, site)
        if isinstance(module, LoRA):
            status = ("dropped" if rank == 0 else "kept" if rank == module.rank
                      else "shrunk" if rank < module.rank else "grown")
            if status in ("shrunk", "grown") and module.alpha == 0:
                raise ValueError(f"resize_lora: site {site!r} has lora_alpha 0 (scale 0), so its "
                                 f"factors cannot be rescaled to another rank")
        elif rank > 0:
            lora_target_info(module, site)  # ValueError naming the site if LoRA cannot wrap it
            status = "added"
        else:
            status = "kept"  # not adapted, and stays so
        changes[site] = (status, rank)
    return changes


def _refactored(a: np.ndarray, b: np.ndarray, scale: float, new_scale: float, rank: int,
                fresh_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``(A', B')`` of rank ``rank`` with ``new_scale * A' @ B'`` the best rank-``rank``
    approximation of ``scale * a @ b`` (float64).

    A rank no smaller than ``a``'s keeps ``a`` in the leading columns and rescales ``b`` (the
    product exactly preserved, the remaining columns of ``A'`` from ``fresh_a``, rows of ``B'``
    zero); a smaller one truncates the SVD, taken from QR factors of ``a`` and ``b.T`` (only an
    ``r x r`` SVD), singular values split evenly between the two sides. Components beyond the
    delta's numerical rank (float32 tolerance) get ``fresh_a`` columns and zero ``B'`` rows, as at
    LoRA init, not zero columns on both sides (which would never receive a gradient)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    r = a.shape[1]
    new_a = np.array(fresh_a, np.float64)
    new_b = np.zeros((rank, b.shape[1]), np.float64)
    if rank >= r:
        new_a[:, :r] = a
        new_b[:r] = b * (scale / new_scale)
        return new_a, new_b
    qa, ra = np.linalg.qr(a)
    qb, rb = np.linalg.qr(b.T)
    u, sv, vt = np.linalg.svd(scale * ra @ rb.T)
    tol = sv[:1].max(initial=0.0) * max(a.shape[0], b.shape[1]) * np.finfo(np.float32).eps
    k = int(np.count_nonzero(sv[:rank] > tol))
    root = np.sqrt(sv[:k] / abs(new_scale))
    new_a[:, :k] = (qa @ u[:, :k]) * root
    new_b[:k] = ((qb @ vt[:k].T) * (root * np.sign(new_scale))).T
    return new_a, new_b


def _resized(old: LoRA, site: str, rank: int, seed: int) -> LoRA:
    """A LoRA of ``rank`` on ``old``'s base module, same options, factors from :func:`_refactored`."""
    rate = 0.0 if old.dropout is None else float(old.dropout.rate)
    dtype = old.peft_lora_a[...].dtype
    new = LoRA(old.base_module, rank, alpha=old.alpha, use_rslora=old.use_rslora, dropout=rate,
               dtype=old.dtype, param_dtype=dtype, rngs=_site_rngs(seed, site + _GROW_SALT),
               site=site)
    new.dropout = old.dropout  # keep its rng stream
    a, b = _refactored(np.asarray(old.peft_lora_a[...]), np.asarray(old.peft_lora_b[...]),
                       old.scale, new.scale, rank, np.asarray(new.peft_lora_a[...]))
    for var, value in ((new.peft_lora_a, a), (new.peft_lora_b, b)):
        var[...] = jax.device_put(jnp.asarray(value, dtype), var[...].sharding)  # init placement
    return new


def resize_lora(model: nnx.Module, ranks: Mapping[str, int], *, seed: int = 0,
                peft_options: PeftOptions | Mapping[str, Any] | None = None) -> dict[str, str]:
    """Set the LoRA rank of every site in ``ranks`` of an adapted NNX model, in place, keeping
    the model's function (see the module docstring for what each change does).

    Args:
      model: an NNX model adapted by :func:`~layerlens_jax._src.peft.apply_plan` (LoRA sites).
      ranks: ``{site: rank}``; 0 drops (folds) a site's LoRA, a positive rank on an unadapted site
        adds LoRA (e.g. :func:`lora_ranks` of a new plan). Sites not named are untouched.
      seed: base of the keys drawing the new ``A`` columns of grown and added sites (pass a new
        one per reallocation, e.g. the step count).
      peft_options: the LoRA options of added sites; default: those all the model's LoRA sites
        share (``PeftOptions`` defaults when there are none).

    Returns:
      ``{site: "kept" | "shrunk" | "grown" | "dropped" | "added"}`` for every site of ``ranks``
      (``"kept"`` also for a rank-0 site that was not adapted).

    Raises:
      ValueError: naming the site, for a bad rank, a site the model lacks, one carrying an adapter,
        a prefix or a stacked LoRA, one LoRA cannot wrap, or LoRA sites with differing options;
        raised before any edit, so the model is untouched.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"resize_lora: seed must be an int, got {seed!r}")
    changes = _checked_changes(model, ranks)
    options = _lora_options(_lora_modules(model), peft_options) if any(
        s == "added" for s, _ in changes.values()) else None
    for site, (status, rank) in changes.items():
        module = get_submodule(model, site)
        if status in ("shrunk", "grown"):
            set_submodule(model, site, _resized(module, site, rank, int(seed)))
        elif status == "dropped":
            base = module.base_module
            getattr(base, module.target.kernel_name)[...] = module.merged_kernel()
            set_submodule(model, site, base)
        elif status == "added":
            set_submodule(model, site, LoRA(module, rank, **options,
                                            rngs=_site_rngs(int(seed), site), site=site))
    return {site: status for site, (status, _) in changes.items()}


# ------------------------------------------------------------------------- optimizer state


def _leaves_by_path(tree: Any) -> dict[tuple, Any]:
    return dict(jax.tree_util.tree_flatten_with_path(tree)[0])


def _param_suffix(path: tuple, param_paths: Mapping[tuple, Any]) -> tuple | None:
    """The key path of the parameter an optimizer-state leaf at ``path`` mirrors, if any."""
    for k in range(len(path)):
        if path[k:] in param_paths:
            return path[k:]
    return None


def _carried(fresh: jax.Array, old: jax.Array, old_param, new_param) -> jax.Array:
    """One optimizer-state leaf: ``old`` when nothing changed shape, ``old`` in the leading slice
    of ``fresh`` when its parameter grew, ``fresh`` when it shrank or is new."""
    if old is None or old_param is None:
        return fresh
    if np.shape(old_param) == np.shape(new_param) and np.shape(old) == np.shape(fresh):
        return jnp.array(old, dtype=fresh.dtype, copy=True)
    grew = (np.ndim(old) == np.ndim(fresh) and np.shape(old) == np.shape(old_param)
            and np.shape(fresh) == np.shape(new_param)
            and all(o <= n for o, n in zip(np.shape(old), np.shape(fresh))))
    if not grew:
        return fresh
    return fresh.at[tuple(slice(0, d) for d in np.shape(old))].set(old.astype(fresh.dtype))


def transfer_optimizer_state(tx: optax.GradientTransformation, old_params: Any, old_opt_state: Any,
                             new_params: Any) -> Any:
    """The optimizer state for ``new_params`` carrying over what ``old_opt_state`` learned.

    ``tx.init(new_params)``, then every leaf found at the same key path in ``old_opt_state``:
    a leaf mirroring a parameter (Adam's ``mu`` / ``nu``, matched by the parameter's key path as a
    suffix of the leaf's) is copied when the parameter kept its shape, copied into the leading
    slice when it grew (a grown LoRA factor keeps its old rows / columns first), and left at its
    fresh value (zeros for Adam) when it shrank or is new; any other leaf (step counts) is copied,
    ``ValueError`` naming its path if its shape changed. Copies, never the old buffers (the new
    state may be donated).
    """
    old_p, new_p = _leaves_by_path(old_params), _leaves_by_path(new_params)
    old_leaves = _leaves_by_path(old_opt_state)
    fresh_flat, treedef = jax.tree_util.tree_flatten_with_path(tx.init(new_params))
    out = []
    for path, fresh in fresh_flat:
        old = old_leaves.get(path)
        param = _param_suffix(path, new_p)
        if param is not None:
            out.append(_carried(fresh, old, old_p.get(param), new_p[param]))
        elif old is None:
            out.append(fresh)
        elif np.shape(old) != np.shape(fresh):
            raise ValueError(f"transfer_optimizer_state: leaf {jax.tree_util.keystr(path)} is not "
                             f"parameter-shaped and changed shape {np.shape(old)} -> "
                             f"{np.shape(fresh)}")
        else:
            out.append(jnp.array(old, dtype=jnp.asarray(fresh).dtype, copy=True))
    return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------- utility and plan


def merged_utility(model: nnx.Module, loss_fn: Callable, batches: Any, sites: Sequence[Site], *,
                   config: UtilityConfig | None = None, **profile_options) -> np.ndarray:
    """Utility per site (in the order of ``sites``) of the adapted ``model`` as it stands: its
    LoRA folded into the kernels of a merged clone (``model`` untouched), profiled over
    ``batches`` with ``loss_fn(model, batch) -> (B,)`` (keyword options of
    :func:`~layerlens_jax._src.profile.profile`), scored by
    :func:`~layerlens_jax._src.utility.utility`. ``sites``: the base model's sites (the paths
    a plan names)."""
    for path, m in nnx.iter_modules(model):
        _check_lora_only(m, join_path(path))
    merged = merge(model)
    stats = profile(merged, loss_fn, batches, sites=list(sites), **profile_options)
    u = site_utility(stats, config)
    order = {p: i for i, p in enumerate(stats.paths)}
    missing = [s.path for s in sites if s.path not in order]
    if missing:
        raise ValueError(f"merged_utility: profile reported no statistics for site {missing[0]!r}")
    return np.asarray([u[order[s.path]] for s in sites], np.float64)


def _lora_catalogue(plan: Plan, catalogue: Catalogue | None) -> Catalogue:
    """``catalogue`` (LoRA only, checked), else the LoRA row of the plan's recorded catalogue,
    else the default LoRA sizes."""
    if catalogue is not None:
        other = [m.name for m in catalogue.methods if m.name != "lora"]
        if other or catalogue.method("lora") is None:
            raise ValueError(f"reallocate_plan: the catalogue must offer LoRA only, it offers "
                             f"{[m.name for m in catalogue.methods]}")
        return catalogue
    recorded = dict(plan.metadata.get("catalogue") or {})
    row = (recorded.get("methods") or {}).get("lora")
    if not row:
        return Catalogue((Catalogue().method("lora"),))
    kinds = row.get("kinds")
    return Catalogue((MethodSpec("lora", tuple(int(s) for s in row["sizes"]),
                                 tuple(kinds) if kinds else None),),
                     bool(recorded.get("cap_sizes", True)))


def reallocate_plan(model: nnx.Module, plan: Plan, sites: Sequence[Site], utility: Any, *,
                    catalogue: Catalogue | None = None, **allocate_options) -> Plan:
    """A new LoRA-only plan for ``model`` under ``plan``'s budgets, from a fresh utility.

    Args:
      model: the adapted NNX model, current state written back; it must carry plain LoRA only,
        on sites of ``sites``.
      plan: the plan being trained: its budgets (all of them), PEFT options, utilisation band and
        LoRA size grid (``metadata["catalogue"]``) are reused; its pinned sites stay pinned.
      sites: the base model's sites (e.g. the first profile's ``stats.sites``).
      utility: one score per site in the order of ``sites`` (e.g. :func:`merged_utility`), or a
        function ``utility(model) -> scores``.
      catalogue: a LoRA-only catalogue overriding the plan's LoRA sizes.
      **allocate_options: further :func:`~layerlens_jax._src.allocate.allocate` settings
        (``gain_model``, ``cost_model``, ``min_size``, ``tie``, ``utilisation`` ...), as given to
        the first allocation.

    Returns:
      :func:`~layerlens_jax._src.allocate.allocate`'s plan: ``use`` within every budget of
      ``plan``; apply it with ``resize_lora(model, lora_ranks(new_plan))``.
    """
    for path, m in nnx.iter_modules(model):
        _check_lora_only(m, join_path(path))
    paths = {s.path for s in sites}
    for site in _lora_modules(model):
        if site not in paths:
            raise ValueError(f"reallocate_plan: the model's LoRA site {site!r} is not among the "
                             f"sites, so its parameters would escape the budget")
    scores = utility(model) if callable(utility) else utility
    options = dict(allocate_options)
    if "utilisation" not in options and plan.metadata.get("utilisation"):
        options["utilisation"] = tuple(plan.metadata["utilisation"])
    pins = {a.site: (a.method, a.size) if a.method != "none" else "none"
            for a in plan.allocations if a.pinned}
    if pins and "pinned" not in options:
        options["pinned"] = pins
    options.setdefault("peft_options", dict(plan.peft_options))
    return allocate(sites, np.asarray(scores, np.float64), dict(plan.budgets),
                    catalogue=_lora_catalogue(plan, catalogue), **options)
