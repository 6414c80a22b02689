"""EVA (Explained Variance Adaptation, Paischer et al. 2024) for NNX models: data-driven LoRA ranks
and a data-driven LoRA ``A``.

EVA looks at what each target layer actually receives. For every target site it takes the
principal components of the site's *inputs* over a few batches; every site offers up to
``round(rank * rho)`` components; the explained-variance ratios of all sites' components go into
one pool and the ``rank * len(sites)`` largest are kept (the rank budget of uniform LoRA rank
``rank`` on the same targets), so a site ends at rank ``0 .. round(rank * rho)``. ``A`` starts at the
site's top components, ``B = 0`` (the model is unchanged at initialisation).

Pipeline::

    def forward(m, b):
        return m(b["input_ids"], b["attention_mask"])

    stats = eva_statistics(model, batches, target_sites, forward=forward)
    ranks = eva_allocate(stats, rank=8, rho=2.0, sites=target_sites)        # HF PEFT's rule
    plan = eva_plan(all_sites, ranks, peft_options={"lora_alpha": 16.0})
    model = eva_init(apply_plan(model, plan), stats, ranks)

What follows HF PEFT (``src/peft/tuners/lora/eva.py``, ``EvaConfig`` in ``lora/config.py`` and
``utils/incremental_pca.py``, read at commit 5d602fd):

* inputs: everything but the feature axis is flattened into tokens; tokens whose ``attention_mask``
  is 0 are dropped (``prepare_model_inputs_fn_language_modeling`` / ``prepare_layer_inputs_fn_...``);
* components: PCA of the inputs (HF's ``IncrementalPCA`` *centres* them: ``X - mean``), i.e. the
  right-singular vectors of the centred input matrix; ``singular_values`` are its singular values;
* explained-variance ratio: ``S_i**2 / sum(col_var * n)`` = eigenvalue / trace of the centred
  scatter (the trace over *all* directions, not only the kept ones);
* cap per site ``round(rank * rho)`` (Python ``round``, as HF), ``rho >= 1``;
* rank budget ``sum of per-site ranks`` = ``rank * len(sites)`` (no ``rank_pattern`` here);
* allocation: all sites' capped ratios pooled, sorted descending, the top ``budget`` kept, a site's
  rank = how many of its components were kept (0 allowed: the site gets no LoRA);
* sign: HF's ``svd_flip(u_based_decision=False)``: each component's largest-magnitude entry is
  positive;
* ``whiten``: ``A`` columns divided by ``sqrt(singular value)`` -- literally what HF does
  (``u /= singular_values_.sqrt()``), not by the singular value;
* layout: HF's ``lora_A.weight`` is ``(r, in)`` with rows = components; our ``peft_lora_a`` is
  ``(in, r)``, so its *columns* are the components (``delta = scale * x @ A @ B``).

What differs:

* exact instead of incremental: per batch we accumulate masked moments (token count, mean,
  centred scatter; combined across batches in float64 with Chan's parallel formula) and take one
  exact ``eigh`` at the end. Hence no ``tau`` cosine-similarity convergence loop (HF cycles the
  dataloader until the components of the kept ranks are stable; ours is the exact PCA of exactly
  the batches given), no ``svd_lowrank`` approximation, no batches skipped for having fewer
  tokens than components, and no deduplication of layers with equal inputs (query / key / value
  see the same input and get identical statistics; XLA shares the computation);
* ties in the pool are broken deterministically by site order, then component index (HF uses a
  non-stable ``argsort``);
* ``center=False`` is offered (uncentred SVD of the raw inputs); the default ``True`` is HF's;
* ``adjust_scaling_factors`` (HF default True: ``alpha *= new_rank / r`` so every site has scale
  ``alpha / r``) is NOT applied: a plan carries one ``lora_alpha`` and a checkpoint records one, so
  each site keeps ``alpha / rank_site`` (HF's ``adjust_scaling_factors=False``);
* ``use_label_mask`` (drop tokens whose label is -100) is not built in: our tasks label examples,
  not tokens. Pass ``token_mask=lambda b: ...`` for any per-token mask;
* only ``nnx.Linear`` / ``nnx.LinearGeneral`` sites (HF: ``nn.Linear`` / ``Conv1D``); a site called
  several times per forward pass contributes every call's inputs.

Budgets: HF budgets in *rank units* (:func:`eva_allocate`): every rank costs the same. Our
comparisons are at equal *trainable parameters*, where a rank on a site costs
``in_features + out_features``; :func:`eva_allocate_params` keeps components in the same pooled
order but charges each its site's per-rank parameter cost and skips any that no longer fits the
``params`` budget. When all targets have one shape (BERT query / value) the two coincide.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerlens_jax._src.costs import RESOURCES, CostModel, option_costs
from layerlens_jax._src.peft.nnx_modules import LoRA, lora_target_info
from layerlens_jax._src.plan import Plan
from layerlens_jax._src.sites import Site, get_submodule, set_submodule

__all__ = ["EvaStatistics", "eva_statistics", "eva_allocate", "eva_allocate_params", "eva_init",
           "eva_plan", "attention_token_mask"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaStatistics:
    """The principal components of one site's inputs (host numpy, float64)."""

    site: str  # the site path
    singular_values: np.ndarray  # (k,) descending: sqrt of the scatter's eigenvalues
    components: np.ndarray  # (in_features, k): column i is the i-th right-singular vector
    explained_variance_ratio: np.ndarray  # (k,) eigenvalue / trace of the scatter (all directions)
    num_tokens: int  # unmasked tokens seen (every call of the site, every batch)
    centred: bool  # True: PCA of centred inputs (HF); False: SVD of the raw inputs


class _Moments(NamedTuple):
    """Masked moments of one site's inputs in one batch (jit output)."""

    count: jax.Array  # () number of kept tokens
    mean: jax.Array  # (d,) mean of kept tokens (0 when none)
    scatter: jax.Array  # (d, d) sum over kept tokens of (x - mean)(x - mean)^T


# ------------------------------------------------------------------------------- capture


def attention_token_mask(batch: Any) -> jax.Array | None:
    """The default token mask: ``batch["attention_mask"]`` when the batch is a mapping with one."""
    if isinstance(batch, Mapping) and "attention_mask" in batch:
        return batch["attention_mask"]
    return None


def _feature_axes(model: nnx.Module, path: str) -> tuple[int, ...]:
    """The input axes a site contracts (trailing, negative), or ValueError naming the site."""
    try:
        module = get_submodule(model, path)
    except (AttributeError, IndexError, KeyError, ValueError, TypeError):
        raise ValueError(f"EVA site {path!r} is not a submodule of {type(model).__name__}") from None
    if isinstance(module, LoRA):
        module = module.base_module
    if isinstance(module, nnx.Linear):
        axes: tuple[int, ...] = (-1,)
    elif isinstance(module, nnx.LinearGeneral) and not len(module.batch_axis):
        axis = tuple(module.axis) if isinstance(module.axis, (tuple, list)) else (module.axis,)
        axes = tuple(range(-len(axis), 0))
        if tuple(sorted(axis)) != axes:
            raise ValueError(f"EVA site {path!r}: LinearGeneral contracting axes {module.axis} "
                             f"are not the trailing ones written as negative axes")
    else:
        raise ValueError(f"EVA site {path!r} is a {type(module).__name__}; EVA supports "
                         f"nnx.Linear and nnx.LinearGeneral (without batch_axis) sites")
    if lora_target_info(module, path).stack:
        raise ValueError(f"EVA site {path!r}: stacked (vmapped) modules are not supported")
    return axes


class _InputRecorder:
    """Stands in for a site during the traced forward pass; keeps every input it is called with."""

    def __init__(self, inner, record: list):
        self._inner, self._record = inner, record

    def __call__(self, x, *args, **kwargs):
        self._record.append(x)
        return self._inner(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def _masked_moments(x: jax.Array, axes: tuple[int, ...], mask: jax.Array | None,
                    path: str) -> _Moments:
    tokens_shape = x.shape[: x.ndim - len(axes)]
    flat = x.reshape((-1, int(np.prod(x.shape[x.ndim - len(axes):])))).astype(jnp.float32)
    if mask is None:
        w = jnp.ones((flat.shape[0],), jnp.float32)
    else:
        if tuple(mask.shape) != tuple(tokens_shape):
            raise ValueError(f"EVA site {path!r}: token mask of shape {tuple(mask.shape)} does not "
                             f"match the site's token axes {tuple(tokens_shape)} (input "
                             f"{tuple(x.shape)}); pass token_mask=None or a mask per site token")
        w = jnp.asarray(mask).reshape(-1).astype(jnp.float32)
        w = (w > 0).astype(jnp.float32)
    count = jnp.sum(w)
    mean = (w @ flat) / jnp.maximum(count, 1.0)
    centred = (flat - mean) * w[:, None]
    scatter = jnp.matmul(centred.T, centred, precision=jax.lax.Precision.HIGHEST)
    return _Moments(count, mean, scatter)


@functools.partial(jax.jit, static_argnames=("graphdef", "paths", "axes", "forward", "token_mask"))
def _batch_moments(state, batch, *, graphdef, paths, axes, forward, token_mask):
    """{path: [moments per call]} of the target sites' inputs for one batch (one compiled pass)."""
    model = nnx.merge(graphdef, state)
    model.eval()
    records: dict[str, list] = {p: [] for p in paths}
    for path in sorted(paths, key=lambda p: -p.count("/")):
        set_submodule(model, path, _InputRecorder(get_submodule(model, path), records[path]))
    forward(model, batch)
    mask = None if token_mask is None else token_mask(batch)
    out = {}
    for path, ax in zip(paths, axes):
        if not records[path]:
            raise ValueError(f"EVA site {path!r} was not called by forward(model, batch)")
        out[path] = [_masked_moments(x, ax, mask, path) for x in records[path]]
    return out


def _combine(acc: tuple | None, m: _Moments) -> tuple:
    """Chan's parallel update of (count, mean, centred scatter), float64 on the host."""
    n_b = float(m.count)
    mu_b = np.asarray(m.mean, np.float64)
    s_b = np.asarray(m.scatter, np.float64)
    if acc is None:
        return n_b, mu_b, s_b
    n, mu, s = acc
    total = n + n_b
    if total == 0:
        return acc
    delta = mu_b - mu
    return total, mu + delta * (n_b / total), s + s_b + np.outer(delta, delta) * (n * n_b / total)


def _principal(path: str, acc: tuple, center: bool, max_components: int | None) -> EvaStatistics:
    n, mu, scatter = acc
    if n <= 0:
        raise ValueError(f"EVA site {path!r}: no unmasked token reached it in the given batches")
    if not center:
        scatter = scatter + n * np.outer(mu, mu)
    scatter = (scatter + scatter.T) / 2
    eigval, eigvec = np.linalg.eigh(scatter)
    order = np.argsort(-eigval, kind="stable")
    eigval, eigvec = np.clip(eigval[order], 0.0, None), eigvec[:, order]
    rows = np.argmax(np.abs(eigvec), axis=0)  # svd_flip(u_based_decision=False)
    eigvec = eigvec * np.sign(eigvec[rows, np.arange(eigvec.shape[1])])[None, :]
    total = float(np.sum(eigval))
    ratio = eigval / total if total > 0 else np.zeros_like(eigval)
    k = eigval.shape[0] if max_components is None else min(int(max_components), eigval.shape[0])
    return EvaStatistics(site=path, singular_values=np.sqrt(eigval[:k]),
                         components=eigvec[:, :k], explained_variance_ratio=ratio[:k],
                         num_tokens=int(round(n)), centred=bool(center))


def _paths(sites: Iterable[Site | str]) -> tuple[str, ...]:
    paths = tuple(s.path if isinstance(s, Site) else str(s) for s in sites)
    if not paths:
        raise ValueError("EVA needs at least one target site")
    if len(set(paths)) != len(paths):
        repeated = sorted(p for p in set(paths) if paths.count(p) > 1)
        raise ValueError(f"EVA target sites repeat: {repeated}")
    return paths


def eva_statistics(model: nnx.Module, batches: Iterable[Any], sites: Iterable[Site | str], *,
                   forward: Callable[[nnx.Module, Any], Any],
                   token_mask: Callable[[Any], jax.Array | None] | None = attention_token_mask,
                   center: bool = True,
                   max_components: int | None = None) -> dict[str, EvaStatistics]:
    """The principal components of every target site's inputs over ``batches``.

    Args:
      model: an NNX model (not modified: the forward pass runs on a merged copy in eval mode).
      batches: the calibration batches (each passed to ``forward`` and ``token_mask``).
      sites: the target sites (``Site`` or paths): ``nnx.Linear`` / ``nnx.LinearGeneral``.
      forward: ``forward(model, batch)`` runs the model (its output is ignored). Hashable (a
        module-level function or a stored lambda) so the pass compiles once per batch shape.
      token_mask: ``token_mask(batch)`` -> 0/1 array over the sites' token axes (everything but
        the feature axes), or None to keep every token; default ``batch["attention_mask"]``.
      center: PCA of the centred inputs (HF PEFT) or, False, SVD of the raw inputs.
      max_components: keep only this many leading components per site (all by default).

    Returns ``{path: EvaStatistics}`` in the order of ``sites``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"eva_statistics expects an nnx.Module, got {type(model).__name__}")
    paths = _paths(sites)
    axes = tuple(_feature_axes(model, p) for p in paths)
    graphdef, state = nnx.split(model)
    acc: dict[str, tuple | None] = {p: None for p in paths}
    seen = 0
    for batch in batches:
        moments = _batch_moments(state, batch, graphdef=graphdef, paths=paths, axes=axes,
                                 forward=forward, token_mask=token_mask)
        for path in paths:
            for m in moments[path]:
                acc[path] = _combine(acc[path], m)
        seen += 1
    if not seen:
        raise ValueError("eva_statistics got no batches")
    return {p: _principal(p, acc[p], center, max_components) for p in paths}


# ---------------------------------------------------------------------------- allocation


def _check_rank_rho(rank: int, rho: float) -> int:
    if not isinstance(rank, (int, np.integer)) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"EVA rank must be a positive int, got {rank!r}")
    if not np.isfinite(rho) or rho < 1.0:
        raise ValueError(f"EVA rho must be >= 1 (HF EvaConfig), got {rho!r}")
    return int(round(rank * rho))


def _pooled_order(stats: Mapping[str, EvaStatistics], paths: Sequence[str],
                  cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(site index, ratio) of every offered component, best first; ties: site order, then index."""
    site_idx, comp_idx, ratios = [], [], []
    for i, path in enumerate(paths):
        if path not in stats:
            raise ValueError(f"EVA has no statistics for site {path!r}")
        r = np.asarray(stats[path].explained_variance_ratio, np.float64)[:cap]
        site_idx.append(np.full(r.shape, i))
        comp_idx.append(np.arange(r.shape[0]))
        ratios.append(r)
    site_idx, comp_idx, ratios = map(np.concatenate, (site_idx, comp_idx, ratios))
    order = np.lexsort((comp_idx, site_idx, -ratios))
    return site_idx[order], ratios[order]


def eva_allocate(stats: Mapping[str, EvaStatistics], *, rank: int, rho: float,
                 sites: Iterable[Site | str]) -> dict[str, int]:
    """HF PEFT's EVA rank redistribution, in rank units.

    Every site offers its first ``round(rank * rho)`` explained-variance ratios; the pooled
    ``rank * len(sites)`` largest are kept; a site's rank is how many of its own were kept (0..cap).
    With ``rho = 1`` every site that has ``rank`` components gets exactly ``rank``.

    Returns ``{path: rank}`` for every site (zeros included), in the order of ``sites``.
    """
    paths = _paths(sites)
    cap = _check_rank_rho(rank, rho)
    site_order, _ = _pooled_order(stats, paths, cap)
    kept = site_order[: int(rank) * len(paths)]
    counts = np.bincount(kept, minlength=len(paths))
    return {p: int(c) for p, c in zip(paths, counts)}


def eva_allocate_params(stats: Mapping[str, EvaStatistics], *, params_budget: float, rank: int,
                        rho: float, sites: Sequence[Site],
                        cost_model: CostModel | None = None) -> dict[str, int]:
    """EVA at a trainable-parameter budget.

    The same pooled order as :func:`eva_allocate` (each site capped at ``round(rank * rho)``), but
    each kept component costs its site's LoRA parameters per rank (``in + out`` under the cost
    model); a component that no longer fits the remaining budget is skipped and later (cheaper)
    ones are still tried. A site's components come in its own descending order and all cost the
    same, so every site keeps a leading block. The sum of costs never exceeds ``params_budget``.
    """
    sites = tuple(sites)
    if not all(isinstance(s, Site) for s in sites):
        raise TypeError("eva_allocate_params needs Site objects (their shapes price a rank)")
    paths = _paths(sites)
    cap = _check_rank_rho(rank, rho)
    if not np.isfinite(params_budget) or params_budget < 0:
        raise ValueError(f"EVA params_budget must be a finite number >= 0, got {params_budget!r}")
    per_rank = option_costs(sites, [("lora", 1)], cost_model or CostModel())[:, 0,
                                                                          RESOURCES.index("params")]
    for s, c in zip(sites, per_rank):
        if not c > 0:
            raise ValueError(f"EVA site {s.path!r} ({s.kind}) has no LoRA parameter cost; "
                             f"is it a linear site with known features?")
    site_order, _ = _pooled_order(stats, paths, cap)
    counts, left = np.zeros(len(paths), int), float(params_budget)
    for i in site_order:
        if per_rank[i] <= left:
            counts[i] += 1
            left -= per_rank[i]
    return {p: int(c) for p, c in zip(paths, counts)}


# ---------------------------------------------------------------------------- plan + init


def eva_plan(sites: Sequence[Site], ranks: Mapping[str, int], utility=None, *,
             peft_options: Mapping[str, Any] | None = None,
             metadata: Mapping[str, Any] | None = None) -> Plan:
    """A :class:`Plan` with LoRA of rank ``ranks[path]`` on each site (rank 0: no adapter)."""
    assignments = {p: ("lora", int(r)) for p, r in ranks.items() if int(r) > 0}
    bad = {p: r for p, r in ranks.items() if int(r) < 0}
    if bad:
        raise ValueError(f"EVA ranks must be >= 0, got {bad}")
    meta = {"method": "eva", "eva_ranks": {p: int(r) for p, r in ranks.items()}}
    meta.update(metadata or {})
    return Plan.from_assignments(sites, assignments, utility, peft_options=peft_options,
                                 solver="eva", metadata=meta)


def eva_init(model: nnx.Module, stats: Mapping[str, EvaStatistics], ranks: Mapping[str, int], *,
             whiten: bool = False, inplace: bool = False) -> nnx.Module:
    """Set each LoRA's ``A`` (``(in, r)``) to the site's top ``r`` components (as columns) and
    ``B`` to zero, so the model's outputs are unchanged.

    ``model`` is the model after ``apply_plan(eva_plan(...))``: every site with ``ranks[path] > 0``
    must carry a LoRA of exactly that rank. ``whiten`` divides component ``i`` by
    ``sqrt(singular_values[i])`` (HF's ``whiten``). Edits a clone unless ``inplace``.
    """
    target = model if inplace else nnx.clone(model)
    for path, r in ranks.items():
        r = int(r)
        if r <= 0:
            continue
        try:
            module = get_submodule(target, path)
        except (AttributeError, IndexError, KeyError, ValueError, TypeError):
            module = None
        if not isinstance(module, LoRA):
            raise ValueError(f"EVA site {path!r} has rank {r} but carries no LoRA "
                             f"(apply_plan(model, eva_plan(...)) first)")
        if module.rank != r or module.stack:
            raise ValueError(f"EVA site {path!r}: LoRA rank {module.rank} (stack {module.stack}) "
                             f"but EVA assigned rank {r}")
        st = stats.get(path)
        if st is None:
            raise ValueError(f"EVA has no statistics for site {path!r}")
        a_old = module.peft_lora_a[...]
        if st.components.shape[0] != a_old.shape[0] or st.components.shape[1] < r:
            raise ValueError(f"EVA site {path!r}: statistics hold {st.components.shape[1]} "
                             f"components of width {st.components.shape[0]}; LoRA A needs "
                             f"{a_old.shape}")
        a = st.components[:, :r]
        if whiten:
            a = a / np.sqrt(np.maximum(st.singular_values[:r], np.finfo(np.float64).tiny))[None, :]
        module.peft_lora_a[...] = jnp.asarray(a, a_old.dtype)
        module.peft_lora_b[...] = jnp.zeros_like(module.peft_lora_b[...])
    return target
