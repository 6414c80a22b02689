"""AdaLoRA (Zhang et al., ICLR 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning") for NNX ``nnx.Linear`` sites: SVD-form adapters, the importance-driven rank allocator,
the orthogonal regulariser and a train step that runs them.

Reference read: HF PEFT ``src/peft/tuners/adalora/{layer,model,config}.py`` (commit 5d602fd):
``SVDLinear``, ``RankAllocator`` (``update_ipt``, ``_element_score``, ``_combine_ipt``,
``budget_schedule``, ``mask_to_budget``), ``AdaLoraModel.forward`` (orthogonal regulariser) and
``AdaLoraModel.update_and_allocate``.

Adapter per site: ``W x + scale * P diag(E) Q x`` with ``Q`` = HF ``lora_A`` (``r_init x d_in``),
``E`` = HF ``lora_E`` (``r_init``; HF stores ``(r_init, 1)``), ``P`` = HF ``lora_B``
(``d_out x r_init``). Leaves ``peft_adalora_q`` / ``peft_adalora_e`` / ``peft_adalora_p``
(:class:`AdaLoRAWeight`, a :class:`PeftParam`, so ``PEFT_FILTER`` trains them).

Followed exactly:

* init: ``E = 0``, ``Q, P ~ N(0, 0.02^2)`` (``reset_lora_parameters``): the wrapped model equals
  the base at init.
* sensitivity ``I = |theta * grad|`` for every entry of P, E, Q, taken *after* the optimizer step
  with the gradient of that step (HF calls ``update_and_allocate`` after ``optimizer.step()``);
  smoothing ``Ibar <- b1 Ibar + (1-b1) I``; uncertainty ``U <- b2 U + (1-b2) |I - Ibar|`` (with the
  *new* ``Ibar``); element score ``Ibar * U``.
* triplet score ``s_i = S(E_i) + mean_j S(Q_ij) + mean_k S(P_ki)`` (``_combine_ipt``).
* budget (in triplets): ``init = sum of r_init``, ``target = target_rank * #sites``; step <= tinit:
  ``init``, no masking; tinit < step <= T - tfinal: ``int((init - target) * (1 - (step - tinit) /
  (T - tfinal - tinit))**3 + target)`` (Python float64, as HF), mask when ``step % delta_t == 0``;
  step > T - tfinal: ``target``. Importance is updated only while ``step < T - tfinal``; at
  ``step == T - tfinal`` the mask to ``target`` is forced and the importance is reset; after it the
  stored mask is re-applied to E every step (``mask_using_rank_pattern``). ``step`` is the 0-based
  index of the optimizer step just taken (HF's example loop's ``global_step``).
* masking sets E of the masked triplets to 0 in the parameters (the optimizer may revive them
  between allocations, as in HF) and keeps the mask (HF's ``rank_pattern``).
* orthogonal regulariser (default ``orth_reg_form="hf"``): ``orth_reg_weight * mean over all P and
  Q matrices of ||C - I||_F`` (Frobenius norm, *not* squared; ``C = Q Q^T`` or ``P^T P``), added
  to the loss, computed over all ``r_init`` rows, masked ones included.

Differences:

* scale is ``alpha / r_init`` (HF: ``alpha / (ranknum + 1e-5)`` with ``ranknum = r_init``).
* masking keeps *exactly* ``budget`` triplets: the top ``budget`` scores, ties broken by position
  (sites in sorted path order, then index). HF masks every score ``<= kthvalue(k=init-budget)``,
  which masks more on ties and fails for ``k = 0`` (here: nothing is masked).
* ``orth_reg_form="paper"`` gives the paper's ``sum over sites of ||P^T P - I||_F^2 +
  ||Q Q^T - I||_F^2`` instead.
* only ``nnx.Linear`` sites, no dropout on the adapter input, no resizing of the stored factors
  after training (HF neither: its resize is commented out); :func:`merge_adalora` folds them.

Pipeline recipe: ``model = apply_adalora(model, sites, r_init, alpha=..., seed=...)`` then
``step, state = make_adalora_train_step(model, loss_fn, tx, config)`` (same ``step(state, batch)
-> (state, metrics)`` contract and ``TrainState`` as :func:`~layerlens_jax._src.train.
make_functional_train_step`; the allocator rides in ``state.opt_state``), ``write_back`` as usual,
``final_ranks(state)`` and :func:`count_adalora_params` for the report.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from layerlens_jax._src.peft.apply import _site_rngs
from layerlens_jax._src.peft.nnx_modules import PEFT_FILTER, PeftParam
from layerlens_jax._src.sites import get_submodule, join_path, set_submodule
from layerlens_jax._src.train import TrainState, reduce_loss

__all__ = [
    "AdaLoRAWeight", "AdaLoRA", "apply_adalora", "merge_adalora", "AdaLoRAConfig", "Triplet",
    "AllocatorState", "AdaLoRAOptState", "adalora_triplets", "replace_adalora_e", "budgets",
    "budget_schedule", "init_allocator", "update_importance", "triplet_scores", "mask_to_budget",
    "update_and_allocate", "orthogonal_regulariser", "make_adalora_train_step", "final_ranks",
    "AdaLoRAParamCount", "count_adalora_params",
]

LEAF_P, LEAF_E, LEAF_Q = "peft_adalora_p", "peft_adalora_e", "peft_adalora_q"
_LEAVES = {LEAF_P: "p", LEAF_E: "e", LEAF_Q: "q"}
_normal = nnx.initializers.normal(0.02)


class AdaLoRAWeight(PeftParam):
    """AdaLoRA factors ``peft_adalora_p`` / ``peft_adalora_e`` / ``peft_adalora_q``."""


# --------------------------------------------------------------------------------- module


class AdaLoRA(nnx.Module):
    """SVD-form adapter of an ``nnx.Linear``: ``y = base(x) + scale * ((x @ Q^T) * E) @ P^T``.

    ``P: (d_out, r_init)``, ``E: (r_init,)`` (zeros), ``Q: (r_init, d_in)`` (``P``, ``Q`` normal
    0.02), ``scale = alpha / r_init``. Attributes: ``base_module``, the three leaves, static
    ``rank`` (= r_init), ``alpha``, ``scale``, ``site``.
    """

    method = "adalora"

    def __init__(self, base_module: nnx.Linear | nnx.LinearGeneral, rank: int, *,
                 alpha: float = 8.0, param_dtype: Any = jnp.float32, rngs: nnx.Rngs,
                 site: str | None = None):
        where = f"site {site!r}" if site else "this module"
        shapes = _matrix_axes(base_module)
        if shapes is None:
            raise ValueError(f"AdaLoRA on {where}: expected nnx.Linear or an nnx.LinearGeneral "
                             f"contracting its trailing axes, got {type(base_module).__name__}")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"AdaLoRA r_init for {where} must be a positive int, got {rank!r}")
        self.in_shape, self.out_shape = shapes
        d_in, d_out = math.prod(self.in_shape), math.prod(self.out_shape)
        self.base_module = base_module
        self.rank, self.alpha, self.site = rank, float(alpha), site
        self.scale = float(alpha) / rank
        self.peft_adalora_p = AdaLoRAWeight(_normal(rngs.params(), (d_out, rank), param_dtype))
        self.peft_adalora_e = AdaLoRAWeight(jnp.zeros((rank,), param_dtype))
        self.peft_adalora_q = AdaLoRAWeight(_normal(rngs.params(), (rank, d_in), param_dtype))

    @property
    def size(self) -> int:
        return self.rank

    def delta(self, x: jax.Array) -> jax.Array:
        p, e, q = self.peft_adalora_p[...], self.peft_adalora_e[...], self.peft_adalora_q[...]
        lead = x.shape[:x.ndim - len(self.in_shape)]
        xf = x.reshape(lead + (-1,)).astype(q.dtype)
        return (((xf @ q.T) * e) @ p.T * self.scale).reshape(lead + self.out_shape)

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        y = self.base_module(x, *args, **kwargs)
        return y + self.delta(x).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """The base kernel ``(d_in, d_out)`` plus ``scale * (P diag(E) Q)^T``, in its dtype."""
        kernel = self.base_module.kernel[...]
        p, e, q = (v[...].astype(jnp.float32) for v in
                   (self.peft_adalora_p, self.peft_adalora_e, self.peft_adalora_q))
        delta = (((p * e) @ q).T * self.scale).reshape(kernel.shape)
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def _matrix_axes(module: Any) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(in_shape, out_shape)`` of a Linear, or of a LinearGeneral that contracts its input's
    trailing ``len(in_features)`` axes with no batch axes (BERT's per-head projections); else None."""
    if isinstance(module, nnx.Linear):
        return (module.in_features,), (module.out_features,)
    if isinstance(module, nnx.LinearGeneral) and not module.batch_axis:
        n = len(module.in_features)
        if tuple(module.axis) == tuple(range(-n, 0)):
            return tuple(module.in_features), tuple(module.out_features)
    return None


def apply_adalora(model: nnx.Module, sites: Iterable[Any], r_init: int, *, alpha: float = 8.0,
                  seed: int = 0, param_dtype: Any = jnp.float32, inplace: bool = False
                  ) -> nnx.Module:
    """Wrap each ``nnx.Linear`` at ``sites`` (paths or objects with ``.path``) in :class:`AdaLoRA`
    with ``r_init`` triplets; a clone unless ``inplace``. Per-site init keys come from
    ``(seed, path)`` as in ``apply_plan``. Raises ``ValueError`` naming a missing or non-Linear site
    before any edit."""
    paths = sorted({str(getattr(s, "path", s)) for s in sites})
    if not paths:
        raise ValueError("apply_adalora: no sites given")
    for path in paths:
        try:
            module = get_submodule(model, path) if path else None
        except (AttributeError, IndexError, ValueError, KeyError, TypeError):
            module = None
        if _matrix_axes(module) is None:
            raise ValueError(f"AdaLoRA site {path!r}: expected an nnx.Linear (or LinearGeneral on "
                             f"trailing axes) in {type(model).__name__}, got "
                             f"{type(module).__name__}")
    target = model if inplace else nnx.clone(model)
    for path in paths:
        set_submodule(target, path, AdaLoRA(get_submodule(target, path), r_init, alpha=alpha,
                                            param_dtype=param_dtype,
                                            rngs=_site_rngs(seed, path), site=path))
    return target


def merge_adalora(model: nnx.Module, *, inplace: bool = False) -> nnx.Module:
    """Fold every :class:`AdaLoRA` into its base kernel and put the base module back."""
    target = model if inplace else nnx.clone(model)
    for path, module in [(join_path(p), m) for p, m in nnx.iter_modules(target)
                         if isinstance(m, AdaLoRA)]:
        module.base_module.kernel[...] = module.merged_kernel()
        set_submodule(target, path, module.base_module)
    return target


# --------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRAConfig:
    """The allocator's settings (HF ``AdaLoraConfig`` names in brackets)."""

    target_rank: int  # average final rank per site [target_r]; final budget = target_rank * #sites
    total_step: int  # optimizer steps of the whole run [total_step]
    tinit: int = 0  # initial warm-up steps without masking [tinit]
    tfinal: int = 0  # final steps at the target budget, mask fixed [tfinal]
    delta_t: int = 1  # steps between two allocations in the cubic phase [deltaT]
    beta1: float = 0.85  # EMA of the sensitivity [beta1]
    beta2: float = 0.85  # EMA of the uncertainty [beta2]
    orth_reg_weight: float = 0.5  # weight of the orthogonal regulariser [orth_reg_weight]
    orth_reg_form: str = "hf"  # "hf": mean of ||.||_F over matrices; "paper": sum of ||.||_F^2

    def __post_init__(self):
        for name in ("target_rank", "total_step", "delta_t"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"AdaLoRAConfig.{name} must be a positive int, got {v!r}")
        for name in ("tinit", "tfinal"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"AdaLoRAConfig.{name} must be an int >= 0, got {v!r}")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"AdaLoRAConfig: tinit={self.tinit} leaves no budgeting phase before "
                             f"total_step - tfinal = {self.total_step - self.tfinal}")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"AdaLoRAConfig.{name} must be in (0, 1), got {getattr(self, name)}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"AdaLoRAConfig.orth_reg_weight must be >= 0, got "
                             f"{self.orth_reg_weight}")
        if self.orth_reg_form not in ("hf", "paper"):
            raise ValueError(f"AdaLoRAConfig.orth_reg_form must be 'hf' or 'paper', got "
                             f"{self.orth_reg_form!r}")


# ------------------------------------------------------------------------ pytree plumbing


class Triplet(NamedTuple):
    """One site's ``(P, E, Q)`` (or per-entry statistics of the same shapes)."""

    p: jax.Array
    e: jax.Array
    q: jax.Array


def _leaf_site(path) -> tuple[str, str] | None:
    names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
    for i, name in enumerate(names):
        if str(name) in _LEAVES:
            return "/".join(str(n) for n in names[:i]), _LEAVES[str(name)]
    return None


def adalora_triplets(tree: Any) -> dict[str, Triplet]:
    """``{site: Triplet(P, E, Q)}`` from any pytree holding AdaLoRA leaves (an ``nnx.State`` of the
    trainable state, its gradient, a pure dict); sites are the ``/``-joined parent paths."""
    found: dict[str, dict[str, jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        hit = _leaf_site(path)
        if hit is not None:
            found.setdefault(hit[0], {})[hit[1]] = leaf
    for site, parts in found.items():
        if len(parts) != 3:
            raise ValueError(f"AdaLoRA site {site!r} lacks {sorted({'p', 'e', 'q'} - set(parts))}")
    return {site: Triplet(**found[site]) for site in sorted(found)}


def replace_adalora_e(tree: Any, e: Mapping[str, jax.Array]) -> Any:
    """``tree`` with each site's E leaf replaced by ``e[site]`` (other leaves untouched)."""
    def swap(path, leaf):
        hit = _leaf_site(path)
        return e[hit[0]] if hit is not None and hit[1] == "e" else leaf
    return jax.tree_util.tree_map_with_path(swap, tree)


# ------------------------------------------------------------------------ rank allocator


class AllocatorState(NamedTuple):
    """The allocator's jit-carried state: per-entry EMAs of sensitivity (``ipt``, HF
    ``exp_avg_ipt``) and uncertainty (``unc``, HF ``exp_avg_unc``), the kept-triplet mask per site
    and the current budget (triplets)."""

    ipt: dict[str, Triplet]
    unc: dict[str, Triplet]
    mask: dict[str, jax.Array]
    budget: jax.Array


def budgets(config: AdaLoRAConfig, num_sites: int, init_budget: int) -> tuple[int, int]:
    """``(init_budget, target_budget)``; raises ``ValueError`` if the target exceeds the init."""
    target = config.target_rank * num_sites
    if target > init_budget:
        raise ValueError(f"AdaLoRA target budget {target} (target_rank {config.target_rank} x "
                         f"{num_sites} sites) exceeds the initial budget {init_budget}")
    return init_budget, target


def budget_schedule(step: int, config: AdaLoRAConfig, init_budget: int, target_budget: int
                    ) -> tuple[int, bool]:
    """``(budget, mask now)`` at ``step``: HF ``RankAllocator.budget_schedule`` (Python floats)."""
    tinit, tfinal, total = config.tinit, config.tfinal, config.total_step
    if step <= tinit:
        return init_budget, False
    if step > total - tfinal:
        return target_budget, True
    coeff = 1 - (step - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * coeff ** 3 + target_budget), step % config.delta_t == 0


@functools.lru_cache(maxsize=64)
def _schedule_table(config: AdaLoRAConfig, init_budget: int, target_budget: int):
    rows = [budget_schedule(s, config, init_budget, target_budget)
            for s in range(config.total_step + 1)]
    return (np.array([b for b, _ in rows], np.int32), np.array([m for _, m in rows], bool))


def init_allocator(params: Mapping[str, Triplet]) -> AllocatorState:
    """Zero EMAs, nothing masked, budget = the initial one."""
    zeros = {s: Triplet(*(jnp.zeros(x.shape, jnp.float32) for x in t)) for s, t in params.items()}
    return AllocatorState(ipt=zeros, unc=jax.tree.map(jnp.copy, zeros),
                          mask={s: jnp.ones(t.e.shape, bool) for s, t in params.items()},
                          budget=jnp.asarray(sum(t.e.shape[0] for t in params.values()), jnp.int32))


@functools.partial(jax.jit, static_argnames=("beta1", "beta2"))
def update_importance(ipt, unc, params, grads, *, beta1: float, beta2: float):
    """HF ``update_ipt`` on matching trees: ``(new ipt EMA, new uncertainty EMA)``."""
    sens = jax.tree.map(lambda p, g: jnp.abs(p * g).astype(jnp.float32), params, grads)
    new_ipt = jax.tree.map(lambda a, s: beta1 * a + (1 - beta1) * s, ipt, sens)
    new_unc = jax.tree.map(lambda u, s, a: beta2 * u + (1 - beta2) * jnp.abs(s - a),
                           unc, sens, new_ipt)
    return new_ipt, new_unc


@jax.jit
def triplet_scores(ipt: Mapping[str, Triplet], unc: Mapping[str, Triplet]) -> dict[str, jax.Array]:
    """``{site: s}`` with ``s_i = S(E_i) + mean_j S(Q_ij) + mean_k S(P_ki)``, ``S = ipt * unc``."""
    return {s: ipt[s].e * unc[s].e + jnp.mean(ipt[s].q * unc[s].q, axis=1)
            + jnp.mean(ipt[s].p * unc[s].p, axis=0) for s in ipt}


@jax.jit
def mask_to_budget(scores: Mapping[str, jax.Array], budget: jax.Array) -> dict[str, jax.Array]:
    """Keep exactly ``min(budget, total)`` triplets, the highest scores over all sites (ties: the
    earlier site in sorted order, then the lower index); ``{site: bool mask}``."""
    sites = sorted(scores)
    flat = jnp.concatenate([scores[s] for s in sites])
    order = jnp.argsort(-flat, stable=True)
    keep = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.size) < budget)
    out, start = {}, 0
    for s in sites:
        out[s] = keep[start:start + scores[s].size]
        start += scores[s].size
    return out


def update_and_allocate(alloc: AllocatorState, params: Any, grads: Any, step: jax.Array,
                        config: AdaLoRAConfig) -> tuple[AllocatorState, Any]:
    """HF ``AdaLoraModel.update_and_allocate`` after the optimizer step ``step`` (0-based):
    ``(allocator, params with E masked)``. ``params`` / ``grads``: trees holding the AdaLoRA leaves
    (e.g. the trainable ``nnx.State`` and its gradient); jittable (``step`` may be traced)."""
    tp, tg = adalora_triplets(params), adalora_triplets(grads)
    init_b, target_b = budgets(config, len(tp), sum(t.e.shape[0] for t in tp.values()))
    table_b, table_m = _schedule_table(config, init_b, target_b)
    step = jnp.asarray(step, jnp.int32)
    idx = jnp.clip(step, 0, config.total_step)
    budget, mask_flag = jnp.asarray(table_b)[idx], jnp.asarray(table_m)[idx]
    final = config.total_step - config.tfinal
    new_ipt, new_unc = update_importance(alloc.ipt, alloc.unc, tp, tg,
                                         beta1=config.beta1, beta2=config.beta2)
    learning = step < final
    ipt = jax.tree.map(lambda n, o: jnp.where(learning, n, o), new_ipt, alloc.ipt)
    unc = jax.tree.map(lambda n, o: jnp.where(learning, n, o), new_unc, alloc.unc)
    allocate = (learning & mask_flag) | (step == final)
    fresh = mask_to_budget(triplet_scores(ipt, unc), budget)
    mask = {s: jnp.where(allocate, fresh[s], alloc.mask[s]) for s in tp}
    apply = allocate | (step > final)
    e = {s: jnp.where(apply & ~mask[s], jnp.zeros_like(tp[s].e), tp[s].e) for s in tp}
    reset = step == final  # HF reset_ipt() after the final allocation
    ipt, unc = (jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), t)
                for t in (ipt, unc))
    new_budget = jnp.where(allocate, jnp.minimum(budget, init_b), alloc.budget)
    return AllocatorState(ipt, unc, mask, new_budget.astype(jnp.int32)), replace_adalora_e(params, e)


# ------------------------------------------------------------------------ regulariser


def orthogonal_regulariser(params: Any, form: str = "hf") -> jax.Array:
    """``R(P, Q)`` over every AdaLoRA site in ``params`` (unweighted). ``"hf"``: mean over all P and
    Q matrices of ``||C - I||_F`` (HF PEFT); ``"paper"``: ``sum_sites ||P^T P - I||_F^2 +
    ||Q Q^T - I||_F^2``."""
    covs = []
    for t in adalora_triplets(params).values():
        p, q = t.p.astype(jnp.float32), t.q.astype(jnp.float32)
        eye = jnp.eye(p.shape[1], dtype=jnp.float32)
        covs += [p.T @ p - eye, q @ q.T - eye]
    if not covs:
        return jnp.zeros((), jnp.float32)
    squares = [jnp.sum(c * c) for c in covs]
    if form == "paper":
        return sum(squares)
    if form == "hf":
        return sum(jnp.sqrt(jnp.maximum(s, 1e-30)) for s in squares) / len(squares)
    raise ValueError(f"orth_reg form must be 'hf' or 'paper', got {form!r}")


# ------------------------------------------------------------------------ training


class AdaLoRAOptState(NamedTuple):
    """``TrainState.opt_state`` of :func:`make_adalora_train_step`: the optax state and the
    allocator."""

    tx: Any
    allocator: AllocatorState


def make_adalora_train_step(model: nnx.Module, loss_fn: Callable, tx: optax.GradientTransformation,
                            config: AdaLoRAConfig, *, wrt: Any = PEFT_FILTER,
                            has_aux: bool = False, donate: bool = True
                            ) -> tuple[Callable, TrainState]:
    """``(step, state)`` like ``make_functional_train_step``, with AdaLoRA: the loss is
    ``loss_fn(model, batch) + orth_reg_weight * R(P, Q)``, and after each optimizer update
    :func:`update_and_allocate` runs with that step's gradient (``state.step`` before the update is
    the 0-based step). ``state.opt_state`` is an :class:`AdaLoRAOptState`; ``step.jitted`` has the
    same signature as there. Metrics: ``loss`` (the total), ``task_loss``, ``orth_reg``,
    ``grad_norm``, ``budget``."""
    graphdef, trainable, frozen, other = nnx.split(model, wrt, nnx.Param, ...)
    if donate:
        trainable, other = jax.tree.map(jnp.copy, (trainable, other))
    triplets = adalora_triplets(trainable)
    if not triplets:
        raise ValueError("make_adalora_train_step: the model's trainable state has no AdaLoRA "
                         "leaves; apply_adalora first (and train them: wrt must include "
                         "PEFT_FILTER)")
    budgets(config, len(triplets), sum(t.e.shape[0] for t in triplets.values()))
    opt = AdaLoRAOptState(tx.init(trainable), init_allocator(triplets))
    state = TrainState(trainable, frozen, other, opt, jnp.zeros((), jnp.int32))

    def step(trainable, opt_state, other, count, frozen, batch):
        def f(tr):
            m = nnx.merge(graphdef, tr, frozen, other)
            task, aux = reduce_loss(loss_fn(m, batch), has_aux)
            reg = orthogonal_regulariser(tr, config.orth_reg_form)
            return task + config.orth_reg_weight * reg, (task, reg, aux,
                                                         nnx.state(m, nnx.Not(nnx.Param)))

        (loss, (task, reg, aux, new_other)), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        updates, tx_state = tx.update(grads, opt_state.tx, trainable)
        trainable = optax.apply_updates(trainable, updates)
        alloc, trainable = update_and_allocate(opt_state.allocator, trainable, grads, count, config)
        metrics = {"loss": loss, "task_loss": task, "orth_reg": reg,
                   "grad_norm": optax.global_norm(grads), "budget": alloc.budget}
        if aux is not None:
            metrics["aux"] = aux
        return trainable, AdaLoRAOptState(tx_state, alloc), new_other, count + 1, metrics

    jitted = jax.jit(step, donate_argnums=(0, 1, 2) if donate else ())

    def run(state: TrainState, batch) -> tuple[TrainState, dict]:
        tr, opt_state, oth, count, metrics = jitted(state.trainable, state.opt_state, state.other,
                                                    state.step, state.frozen, batch)
        return TrainState(tr, state.frozen, oth, opt_state, count), metrics

    run.jitted = jitted
    return run, state


def final_ranks(state: TrainState | AllocatorState) -> dict[str, int]:
    """``{site: kept triplets}`` from a train state (or an :class:`AllocatorState`)."""
    alloc = state.opt_state.allocator if isinstance(state, TrainState) else state
    return {s: int(np.sum(jax.device_get(m))) for s, m in alloc.mask.items()}


# ------------------------------------------------------------------------ parameter counts


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoRAParamCount:
    """AdaLoRA parameter counts; a site of shape ``d_in -> d_out`` with rank r holds
    ``r * (d_in + d_out + 1)``."""

    allocated: int  # stored (and trained) parameters: r_init per site (what HF PEFT reports)
    effective: int  # parameters of the kept triplets (all of them when no mask is given)
    target: int  # target_rank * (d_in + d_out + 1) summed over sites (0 without target_rank)
    ranks: Mapping[str, int]  # kept triplets per site


def count_adalora_params(model: nnx.Module, mask: Mapping[str, Any] | None = None, *,
                         target_rank: int | None = None) -> AdaLoRAParamCount:
    """Count AdaLoRA parameters of ``model``. ``mask``: ``{site: bool mask}`` (e.g.
    ``state.opt_state.allocator.mask``) for the effective count; ``target_rank``: for the count at
    a uniform target rank (what a LoRA of that rank would hold, plus one E per rank)."""
    allocated = effective = target = 0
    ranks = {}
    for path, m in nnx.iter_modules(model):
        if not isinstance(m, AdaLoRA):
            continue
        site = join_path(path)
        width = m.base_module.in_features + m.base_module.out_features + 1
        if mask is not None and site not in mask:
            raise ValueError(f"count_adalora_params: mask lacks AdaLoRA site {site!r}")
        rank = m.rank if mask is None else int(np.sum(jax.device_get(mask[site])))
        ranks[site] = rank
        allocated += m.rank * width
        effective += rank * width
        target += (target_rank or 0) * width
    return AdaLoRAParamCount(allocated=allocated, effective=effective, target=target, ranks=ranks)
