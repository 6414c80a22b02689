"""Per-site gradient statistics from one backward pass per batch, jit-compiled once.

For every site, :func:`profile` computes over an iterable of batches

* ``grad_norm``: ‖∇θ L‖₂ over the site's parameters θ, where L is the mean per-example loss over
  *all* examples seen (the per-batch gradient sums are accumulated, then divided by the total
  example count, then normed — so it is the norm of the full-data mean gradient, not a mean of
  per-batch norms);
* ``fisher_trace``: the empirical Fisher trace, (1/N) Σₙ ‖∇θ ℓₙ‖², per-example exact;
* optionally ``fisher_trace_sampled``: the same with labels sampled from the model's predictive
  distribution (the "true" Fisher, one Monte-Carlo sample per example);
* the number of examples and tokens seen.

How per-example squared norms are computed without per-example gradients of the model
-------------------------------------------------------------------------------------------
Each *parameter unit* (a module that owns parameters directly: a Linear, an Embed, a LayerNorm…)
is wrapped, inside the traced function only, by a tap ``y ↦ tap(y, x, sink)``: a ``custom_vjp``
identity whose backward pass receives gₙ = ∂ℓₙ/∂yₙ and returns, as the cotangent of a zero
``sink`` of shape (B,), the per-example squared gradient norms of the unit's own parameters
(the ghost-norm trick of paxml / BackPACK). The rules:

* dense (Linear, LinearGeneral/DenseGeneral over trailing axes): with Xₙ (T×d_in) the inputs and
  Gₙ (T×d_out) the output gradients of example n, ∇Wₙ = XₙᵀGₙ and
  ‖∇Wₙ‖² = Σₜₛ (xₜ·xₛ)(gₜ·gₛ) (Gram form, O(T²(d_in+d_out))) or ‖XₙᵀGₙ‖² (outer-product form,
  O(T·d_in·d_out)), whichever is cheaper; the bias adds ‖Σₜ gₜ‖²;
* embedding: ∇Eₙ adds gₜ to row idₜ; sort the ids, segment-sum the gₜ of equal ids, square;
* anything else (norms, convs, user modules): a *local* ``vmap`` over examples of the unit's own
  VJP — only that unit's per-example gradients exist, never the whole model's.

Per-site figures sum the units under the site: squared norms add over disjoint parameter sets, so
an attention or block site is exact too. Batches must put the example axis first at every site
(checked) and each unit must be called once per forward pass (weight sharing is detected and
rejected, since its cross terms would be lost).

Conventions: ``loss_fn(model, batch)`` returns per-example losses of shape (B,) (for Linen:
``loss_fn(variables, batch)`` calling ``module.apply``). A batch that is a mapping may carry an
``example_mask`` (B,) of 0/1 — padding examples are excluded from every statistic — and an
``attention_mask`` (B, T) used to count tokens. A non-finite statistic raises ``FloatingPointError``
naming the site and the batch index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax import struct

from layerlens_jax._src.sites import (Site, discover_sites, flatten_paths as _flat, get_submodule,
                                 join_path, set_submodule)

__all__ = ["LayerStats", "ProfileStep", "profile", "sampled_label_loss"]

_HIGHEST = jax.lax.Precision.HIGHEST


@struct.dataclass
class LayerStats:
    """Per-site statistics, arrays in the order of ``sites`` (float64 numpy on the host)."""

    grad_norm: np.ndarray
    fisher_trace: np.ndarray
    fisher_trace_sampled: np.ndarray | None
    num_examples: int = struct.field(pytree_node=False)
    num_tokens: int = struct.field(pytree_node=False)
    num_batches: int = struct.field(pytree_node=False)
    sites: tuple[Site, ...] = struct.field(pytree_node=False)

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(s.path for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_examples": self.num_examples,
            "num_tokens": self.num_tokens,
            "num_batches": self.num_batches,
            "sites": [
                {"site": s.path, "kind": s.kind, "num_params": s.num_params,
                 "grad_norm": float(self.grad_norm[i]), "fisher_trace": float(self.fisher_trace[i]),
                 **({} if self.fisher_trace_sampled is None
                    else {"fisher_trace_sampled": float(self.fisher_trace_sampled[i])})}
                for i, s in enumerate(self.sites)
            ],
        }

    def table(self) -> str:
        lines = ["| site | kind | params | grad_norm | fisher_trace |", "|---|---|---:|---:|---:|"]
        for i, s in enumerate(self.sites):
            lines.append(f"| {s.path} | {s.kind} | {s.num_params} | {self.grad_norm[i]:.4e} | "
                         f"{self.fisher_trace[i]:.4e} |")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ per-unit rules


def _as_f32(a):
    return a.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class _DenseRule:
    d_in: int
    d_out: int
    has_bias: bool

    def sq_norms(self, x, g, aux):
        b = x.shape[0]
        xs = _as_f32(x).reshape(b, -1, self.d_in)
        gs = _as_f32(g).reshape(b, -1, self.d_out)
        t = xs.shape[1]
        if t * (self.d_in + self.d_out) <= self.d_in * self.d_out:
            xx = jnp.einsum("btd,bsd->bts", xs, xs, precision=_HIGHEST)
            gg = jnp.einsum("bte,bse->bts", gs, gs, precision=_HIGHEST)
            sq = jnp.sum(xx * gg, axis=(1, 2))
        else:
            w = jnp.einsum("btd,bte->bde", xs, gs, precision=_HIGHEST)
            sq = jnp.sum(w * w, axis=(1, 2))
        if self.has_bias:
            sq = sq + jnp.sum(jnp.sum(gs, axis=1) ** 2, axis=-1)
        return sq


@dataclasses.dataclass(frozen=True, eq=False)
class _EmbedRule:
    def sq_norms(self, ids, g, aux):
        b = ids.shape[0]
        ids = ids.reshape(b, -1)
        gs = _as_f32(g).reshape(b, ids.shape[1], -1)

        def one(ids_n, g_n):
            order = jnp.argsort(ids_n)
            sid = ids_n[order]
            seg = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                   jnp.cumsum(sid[1:] != sid[:-1]).astype(jnp.int32)])
            rows = jax.ops.segment_sum(g_n[order], seg, num_segments=ids_n.shape[0])
            return jnp.sum(rows * rows)

        return jax.vmap(one)(ids, gs)


@dataclasses.dataclass(frozen=True, eq=False)
class _VmapRule:
    """Per-example VJP of the unit's own parameters, vmapped over examples (exact, local)."""

    apply: Callable[[Any, jax.Array], jax.Array]  # (own params, x with batch 1) -> y with batch 1

    def sq_norms(self, x, g, own_params):
        def one(x_n, g_n):
            _, vjp = jax.vjp(lambda p: self.apply(p, x_n[None]), own_params)
            (gp,) = vjp(g_n[None].astype(jax.eval_shape(lambda: self.apply(own_params, x_n[None])).dtype))
            return sum(jnp.sum(_as_f32(l) ** 2) for l in jax.tree.leaves(gp))

        return jax.vmap(one)(x, g)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jnp.zeros_like(a)


@jax.custom_vjp
def _tap_impl(rule_box, y, x, sink, aux):
    del rule_box, x, sink, aux
    return y


def _tap_fwd(rule_box, y, x, sink, aux):
    return y, (rule_box, x, aux)


def _tap_bwd(res, g):
    rule_box, x, aux = res
    sq = rule_box.rule.sq_norms(x, g, aux)
    return (None, g, _zero_cotangent(x), sq, jax.tree.map(jnp.zeros_like, aux))


_tap_impl.defvjp(_tap_fwd, _tap_bwd)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class _RuleBox:
    rule: Any


# ------------------------------------------------------------------------------------ units


@dataclasses.dataclass(frozen=True)
class _Unit:
    path: str
    rule: Any
    param_paths: tuple[str, ...]  # absolute paths of the unit's own parameters


class _TapContext:
    """Per-trace state: sinks, own params of vmap units, call counts, the batch size."""

    def __init__(self, units: Mapping[str, _Unit], sinks, own_params, batch_size: int):
        self.units, self.sinks, self.own_params = units, sinks, own_params
        self.batch_size = batch_size
        self.calls: dict[str, int] = {}

    def tap(self, path: str, y, x):
        unit = self.units[path]
        self.calls[path] = self.calls.get(path, 0) + 1
        if self.calls[path] > 1:
            raise NotImplementedError(
                f"site unit {path!r} is called more than once per forward pass (weight sharing): "
                "its per-example Fisher would miss the cross terms; exclude it from the sites")
        if not hasattr(x, "shape") or x.ndim == 0 or x.shape[0] != self.batch_size:
            raise ValueError(
                f"site unit {path!r} sees an input of shape {getattr(x, 'shape', None)} whose leading "
                f"axis is not the example axis (batch {self.batch_size}); per-example statistics "
                "need the example axis first at every site (broadcast e.g. position ids to (B, T))")
        aux = self.own_params.get(path, ())
        return _tap_impl(_RuleBox(unit.rule), y, x, self.sinks[path], aux)


class _NNXTap:
    """Stands in for a parameter unit of an NNX model inside the traced function."""

    def __init__(self, inner, path: str, ctx: _TapContext):
        self._inner, self._path, self._ctx = inner, path, ctx

    def __call__(self, x, *args, **kwargs):
        if args or any(v is not None for v in kwargs.values()):
            if not isinstance(self._ctx.units[self._path].rule, (_DenseRule, _EmbedRule)):
                raise NotImplementedError(f"site unit {self._path!r} is called with extra arguments; "
                                          "only single-input units are supported")
        return self._ctx.tap(self._path, self._inner(x, *args, **kwargs), x)

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if callable(value) and not isinstance(value, (nnx.Variable, nnx.Module)):
            raise NotImplementedError(f"site unit {self._path!r} is used through method {name!r}; "
                                      "only __call__ is supported for per-example statistics")
        return value


def _own_param_names_nnx(module) -> list[str]:
    return sorted(k for k, v in vars(module).items() if isinstance(v, nnx.Param))


def _trailing(axis) -> bool:
    axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    return all(a < 0 for a in axis) and tuple(sorted(axis)) == tuple(range(-len(axis), 0))


def _rule_for_nnx(module, own) -> Any:
    shapes = {k: tuple(getattr(module, k).value.shape) for k in own}
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral)) and set(own) <= {"kernel", "bias"} \
            and "kernel" in own:
        k = shapes["kernel"]
        n_in = 1 if isinstance(module, nnx.Linear) else len(module.axis)
        if isinstance(module, nnx.Linear) or (_trailing(module.axis) and not module.batch_axis):
            return _DenseRule(math.prod(k[:n_in]), math.prod(k[n_in:]), "bias" in own)
    if isinstance(module, nnx.Embed) and own == ["embedding"]:
        return _EmbedRule()
    graphdef, _, rest = nnx.split(module, lambda p, v: isinstance(v, nnx.Param) and len(p) == 1
                                  and p[0] in own, ...)

    def apply(own_params, x):
        return nnx.merge(graphdef, own_params, rest)(x)

    return _VmapRule(apply)


def _nnx_units(model: nnx.Module, sites: list[Site]) -> dict[str, _Unit]:
    units = {}
    for parts, module in nnx.iter_modules(model):
        path = join_path(parts)
        own = _own_param_names_nnx(module)
        if not own or not any(_under(path, s.path) for s in sites):
            continue
        rule = _rule_for_nnx(module, own)
        units[path] = _Unit(path, rule, tuple(_child(path, k) for k in own))
    return units


def _under(path: str, site_path: str) -> bool:
    return path == site_path or path.startswith(site_path + "/")


def _child(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


# ----------------------------------------------------------------------------- the engine


def _batch_masks(batch, example_mask_key, token_mask_key, n):
    w = jnp.ones((n,), jnp.float32)
    tokens = None
    if isinstance(batch, Mapping):
        if example_mask_key in batch:
            w = jnp.asarray(batch[example_mask_key], jnp.float32).reshape(n)
        if token_mask_key in batch:
            tm = jnp.asarray(batch[token_mask_key], jnp.float32)
            tokens = jnp.sum(tm.reshape(n, -1) * w[:, None])
    if tokens is None:
        tokens = jnp.sum(w)
    return w, tokens


def _membership(sites, unit_paths, param_paths):
    """0/1 matrices site x unit and site x parameter leaf (a unit / leaf lies under the site)."""
    site_unit = np.array([[_under(u, s.path) for u in unit_paths] for s in sites], np.float64)
    site_leaf = np.array([[_under(p.rpartition("/")[0], s.path) for p in param_paths]
                          for s in sites], np.float64).reshape(len(sites), len(param_paths))
    missing = [s.path for s, row in zip(sites, site_leaf) if s.num_params and not row.any()]
    if missing:
        raise ValueError(f"sites {missing} have parameters the profiler cannot find")
    return site_unit.reshape(len(sites), len(unit_paths)), site_leaf


def _check_finite(batch_index, site_paths, values: Mapping[str, np.ndarray]):
    for name, vec in values.items():
        bad = np.flatnonzero(~np.isfinite(vec))
        if bad.size:
            raise FloatingPointError(
                f"non-finite {name} at site {site_paths[bad[0]]!r} in batch {batch_index} "
                f"(value {vec[bad[0]]}); {bad.size} site(s) affected")


class ProfileStep:
    """The compiled per-batch function of :func:`profile`, for custom loops and benchmarks.

    ``step(batch, key=None)`` returns ``(grad_sum, fisher_sum, grad_sq, fisher_sum_sampled,
    num_examples, num_tokens)``: the parameter-gradient pytree of the batch's summed loss, and per
    site the summed per-example squared gradient norms, the squared norm of this batch's gradient
    sum, the sampled-label counterpart (or None), and the counts. Compiles once per batch shape.
    """

    def __init__(self, model, loss_fn, first_batch, *, variables=None, sites=None,
                 sample_loss_fn=None, example_mask_key="example_mask",
                 token_mask_key="attention_mask"):
        is_nnx = isinstance(model, nnx.Module)
        if not is_nnx and not isinstance(model, nn.Module):
            raise TypeError(f"profile expects an nnx.Module or a linen Module, "
                            f"got {type(model).__name__}")
        if not is_nnx and variables is None:
            raise ValueError("profile of a Linen module needs its variables")
        if sites is None:
            example = None
            if isinstance(first_batch, Mapping) and "input_ids" in first_batch:
                example = {"args": (first_batch["input_ids"],),
                           "kwargs": {k: first_batch[k] for k in ("attention_mask",)
                                      if k in first_batch}}
            sites = discover_sites(model, variables, example=example)
        self.sites = tuple(sites)
        if not self.sites:
            raise ValueError("profile got an empty list of sites")
        build = _build_nnx if is_nnx else _build_linen
        forward_losses, unit_paths, param_paths, self._params, self._rest = build(
            model, variables, list(self.sites))
        self._step = _make_step(forward_losses, loss_fn, sample_loss_fn, unit_paths,
                                _infer_batch_size(first_batch), example_mask_key, token_mask_key)
        self.site_unit, self.site_leaf = _membership(self.sites, unit_paths, param_paths)
        self._site_unit = jnp.asarray(self.site_unit, jnp.float32)
        self._site_leaf = jnp.asarray(self.site_leaf, jnp.float32)

    def __call__(self, batch, key=None):
        grads, fisher, gsq, fisher_s, ex, tok = self._step(
            self._params, self._rest, batch, key, self._site_unit, self._site_leaf)
        return grads, fisher, gsq, fisher_s, ex, tok

    def lower(self, batch, key=None):
        """``jax.jit(...).lower`` of the step, e.g. for ``.compile().memory_analysis()``."""
        return self._step.lower(self._params, self._rest, batch, key, self._site_unit,
                                self._site_leaf)


def profile(
    model: Any,
    loss_fn: Callable[..., jax.Array],
    batches: Iterable[Any],
    *,
    variables: Mapping | None = None,
    sites: list[Site] | None = None,
    sample_loss_fn: Callable[..., jax.Array] | None = None,
    rng: jax.Array | None = None,
    example_mask_key: str = "example_mask",
    token_mask_key: str = "attention_mask",
    max_batches: int | None = None,
    progress: bool = False,
) -> LayerStats:
    """Profile every site of ``model`` over ``batches``; see the module docstring.

    Args:
      model: an ``nnx.Module`` or a Linen module (then also pass ``variables``).
      loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses (Linen:
        ``loss_fn(variables, batch)``).
      batches: any iterable of batches (pytrees of arrays with a fixed shape: the step compiles once
        per distinct shape).
      sites: the sites to report (default: :func:`discover_sites` on the first batch, when the
        batch is a mapping holding ``input_ids``, else all sites found without example inputs).
      sample_loss_fn: ``sample_loss_fn(model, batch, key) -> (B,)`` losses with labels sampled from
        the model (see :func:`sampled_label_loss`); adds ``fisher_trace_sampled``. Needs ``rng``.
      max_batches: stop after this many batches.
      progress: show a tqdm progress bar.
    """
    if sample_loss_fn is not None and rng is None:
        raise ValueError("sample_loss_fn needs rng (a jax PRNG key) to sample labels")
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("profile got no batches") from None
    step = ProfileStep(model, loss_fn, first, variables=variables, sites=sites,
                       sample_loss_fn=sample_loss_fn, example_mask_key=example_mask_key,
                       token_mask_key=token_mask_key)
    sites, paths = step.sites, [s.path for s in step.sites]

    grad_acc = None
    fisher = np.zeros(len(sites), np.float64)
    fisher_s = np.zeros(len(sites), np.float64) if sample_loss_fn is not None else None
    n_ex = 0.0
    n_tok = 0.0
    n_batches = 0

    def all_batches():
        yield first
        yield from iterator

    it = all_batches()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="profile", unit="batch", total=max_batches)
    for b_idx, batch in enumerate(it):
        if max_batches is not None and b_idx >= max_batches:
            break
        key = None if rng is None else jax.random.fold_in(rng, b_idx)
        batch_grads, site_fisher, site_gsq, site_fisher_s, ex, tok = step(batch, key)
        checks = {"fisher_trace": np.asarray(site_fisher), "gradient": np.asarray(site_gsq)}
        if site_fisher_s is not None:
            checks["fisher_trace_sampled"] = np.asarray(site_fisher_s)
        _check_finite(b_idx, paths, checks)
        fisher += checks["fisher_trace"].astype(np.float64)
        if fisher_s is not None:
            fisher_s += checks["fisher_trace_sampled"].astype(np.float64)
        grad_acc = batch_grads if grad_acc is None else _tree_add(grad_acc, batch_grads)
        n_ex += float(ex)
        n_tok += float(tok)
        n_batches += 1
    if n_ex <= 0:
        raise ValueError("profile saw no examples (every example_mask was 0)")
    leaf_sq = np.asarray(_leaf_sq_jit(grad_acc), np.float64)
    grad_norm = np.sqrt(step.site_leaf @ leaf_sq) / n_ex
    _check_finite(n_batches - 1, paths, {"grad_norm": grad_norm})
    return LayerStats(grad_norm=grad_norm, fisher_trace=fisher / n_ex,
                      fisher_trace_sampled=None if fisher_s is None else fisher_s / n_ex,
                      num_examples=int(round(n_ex)), num_tokens=int(round(n_tok)),
                      num_batches=n_batches, sites=tuple(sites))


@functools.partial(jax.jit, donate_argnums=0)
def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _leaf_sq(tree):
    """Sum of squares of every leaf, in tree-flattening order (the order of ``param_paths``)."""
    return jnp.stack([jnp.sum(jnp.square(l.astype(jnp.float32))) for l in jax.tree.leaves(tree)])


_leaf_sq_jit = jax.jit(_leaf_sq)


def _reduce(sinks_grad, sinks_grad_s, param_grads, unit_paths, site_unit, site_leaf):
    """Per-site Fisher sums, squared gradient norms and sampled Fisher sums of one batch."""
    def fisher(sinks):
        return None if sinks is None else site_unit @ jnp.stack(
            [jnp.sum(sinks[u]) for u in unit_paths])

    return fisher(sinks_grad), site_leaf @ _leaf_sq(param_grads), fisher(sinks_grad_s)


def _build_nnx(model, variables, sites):
    del variables
    units = _nnx_units(model, sites)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_paths = tuple(_flat(params.to_pure_dict()).keys())
    unit_paths = tuple(sorted(units))
    covered = {p for u in units.values() for p in u.param_paths}
    uncovered = [p for p in param_paths if p not in covered and
                 any(_under(p.rpartition("/")[0], s.path) for s in sites)]
    if uncovered:
        raise NotImplementedError(f"parameters {uncovered[:3]} under a site are not owned by a "
                                  "module the profiler can tap")

    def forward_losses(params, rest, sinks, batch, key, fn):
        m = nnx.merge(graphdef, params, rest, copy=True)
        own = {path: _own_state(get_submodule(m, path)) for path, unit in units.items()
               if isinstance(unit.rule, _VmapRule)}
        ctx = _TapContext(units, sinks, own, _batch_size_of(sinks))
        for path in sorted(units, key=lambda p: -p.count("/")):
            if path:
                set_submodule(m, path, _NNXTap(get_submodule(m, path), path, ctx))
        losses = fn(m, batch) if key is None else fn(m, batch, key)
        return _checked_losses(losses, ctx.batch_size)

    return forward_losses, unit_paths, param_paths, params, rest


def _own_state(module):
    own = _own_param_names_nnx(module)
    return {k: getattr(module, k).value for k in own}


def _batch_size_of(sinks) -> int:
    return next(iter(sinks.values())).shape[0]


def _checked_losses(losses, n):
    losses = jnp.asarray(losses)
    if losses.shape != (n,):
        raise ValueError(f"loss_fn must return per-example losses of shape ({n},), got "
                         f"{losses.shape}; return the unreduced losses")
    return losses


def _make_step(forward_losses, loss_fn, sample_loss_fn, unit_paths, n, ex_key,
               tok_key):
    """The jitted per-batch function: one backward pass for gradients and per-example norms."""
    sinks0 = {u: jnp.zeros((n,), jnp.float32) for u in unit_paths}

    def step(params, rest, batch, key, site_unit, site_leaf):
        w, tokens = _batch_masks(batch, ex_key, tok_key, n)

        def total(params, sinks, fn, key):
            return jnp.sum(forward_losses(params, rest, sinks, batch, key, fn) * w)

        param_grads, sink_grads = jax.grad(total, argnums=(0, 1))(params, sinks0, loss_fn, None)
        sink_grads_s = None
        if sample_loss_fn is not None:
            sink_grads_s = jax.grad(total, argnums=1)(jax.lax.stop_gradient(params), sinks0,
                                                      sample_loss_fn, key)
        if isinstance(param_grads, nnx.State):
            param_grads = param_grads.to_pure_dict()
        reduced = _reduce(sink_grads, sink_grads_s, param_grads, unit_paths, site_unit,
                          site_leaf)
        return (param_grads, *reduced, jnp.sum(w), tokens)

    return jax.jit(step)


def _infer_batch_size(first) -> int:
    sizes = {int(np.shape(l)[0]) for l in jax.tree.leaves(first) if np.ndim(l) >= 1}
    if len(sizes) != 1:
        raise ValueError(f"every array in a batch needs the same leading (example) axis; got "
                         f"sizes {sorted(sizes) or 'none'}")
    return sizes.pop()


def _build_linen(module, variables, sites):
    params0 = variables["params"]
    rest0 = {k: v for k, v in variables.items() if k != "params"}
    param_paths = tuple(_flat(params0).keys())
    # units: modules owning parameter leaves directly
    owners: dict[str, list[str]] = {}
    for p in param_paths:
        owner, _, name = p.rpartition("/")
        if any(_under(owner, s.path) for s in sites):
            owners.setdefault(owner, []).append(name)
    units: dict[str, _Unit] = {}
    unit_paths = tuple(sorted(owners))
    rules: dict[str, Any] = {}

    def rule_for(mod, path):
        if path in rules:
            return rules[path]
        own = sorted(owners[path])
        sub = _subtree(params0, path)
        if isinstance(mod, nn.Dense) and set(own) <= {"kernel", "bias"}:
            k = sub["kernel"].shape
            rule = _DenseRule(k[0], k[1], "bias" in own)
        elif isinstance(mod, nn.DenseGeneral) and set(own) <= {"kernel", "bias"} \
                and _trailing(mod.axis) and not mod.batch_dims:
            k = sub["kernel"].shape
            n_in = len(mod.axis) if isinstance(mod.axis, (tuple, list)) else 1
            rule = _DenseRule(math.prod(k[:n_in]), math.prod(k[n_in:]), "bias" in own)
        elif isinstance(mod, nn.Embed) and own == ["embedding"]:
            rule = _EmbedRule()
        else:
            clone = mod.clone(parent=None)
            children = {k: v for k, v in sub.items() if k not in own}

            def apply(own_params, x, clone=clone, children=children):
                return clone.apply({"params": {**children, **own_params}}, x)

            rule = _VmapRule(apply)
        rules[path] = rule
        units[path] = _Unit(path, rule, tuple(_child(path, k) for k in own))
        return rule

    def forward_losses(params, rest, sinks, batch, key, fn):
        variables = {**rest, "params": params}
        n = _batch_size_of(sinks)
        ctx = _TapContext(units, sinks, {}, n)

        def interceptor(next_fun, args, kwargs, c):
            out = next_fun(*args, **kwargs)
            if c.method_name != "__call__":
                return out
            path = join_path(c.module.scope.path)
            if path in owners and args:
                rule = rule_for(c.module, path)
                if isinstance(rule, _VmapRule):
                    sub = c.module.variables.get("params", {})
                    ctx.own_params[path] = {k: sub[k] for k in owners[path]}
                out = ctx.tap(path, out, args[0])
            return out

        with nn.intercept_methods(interceptor):
            losses = fn(variables, batch) if key is None else fn(variables, batch, key)
        missing = [u for u in unit_paths if u not in ctx.calls]
        if missing:
            raise ValueError(f"parameter units {missing[:3]} were never called through __call__ "
                             "during the loss: their statistics cannot be computed")
        return _checked_losses(losses, n)

    return forward_losses, unit_paths, param_paths, params0, rest0


def _subtree(tree, path):
    for part in path.split("/") if path else []:
        tree = tree[part]
    return tree


def sampled_label_loss(logits_fn: Callable[..., jax.Array], *, token_mask_key: str | None = None):
    """Build ``sample_loss_fn(model, batch, key)`` for the sampled-label ("true") Fisher.

    ``logits_fn(model, batch)`` returns (B, C) or (B, T, C) logits; labels are drawn from the
    model's own softmax (held fixed, ``stop_gradient``) and the loss is their negative
    log-likelihood, summed over tokens where ``batch[token_mask_key]`` is 1 for (B, T, C) logits.
    """

    def fn(model, batch, key):
        logits = logits_fn(model, batch)
        labels = jax.random.categorical(key, jax.lax.stop_gradient(logits), axis=-1)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
        if nll.ndim == 2:
            mask = (jnp.ones_like(nll) if token_mask_key is None
                    else jnp.asarray(batch[token_mask_key], nll.dtype))
            nll = jnp.sum(nll * mask, axis=1)
        return nll

    return fn
