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

The per-example squared norms come from ``custom_vjp`` taps on every parameter unit, without
per-example gradients of the model: the method (ghost norms for dense layers, segment sums for
embeddings, a local per-example VJP for the rest) is in :mod:`layerlens_jax._src.fisher_rules`.
This module is the driver: one jitted step per batch, streaming accumulation on the host, checks.

Conventions: ``loss_fn(model, batch)`` returns per-example losses of shape (B,) (for Linen:
``loss_fn(variables, batch)`` calling ``module.apply``). A batch that is a mapping may carry an
``example_mask`` (B,) of 0/1 — padding examples are excluded from every statistic — and an
``attention_mask`` (B, T) used to count tokens. A non-finite statistic raises ``FloatingPointError``
naming the site and the batch index.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from layerlens_jax._src.fisher_rules import (DEFAULT_TAP_PRECISION, TappedModel, is_under,
                                             tap_linen, tap_nnx)
from layerlens_jax._src.sites import Site, discover_sites
from layerlens_jax._src.unit_calls import plan_calls

__all__ = ["LayerStats", "ProfileStep", "profile", "sampled_label_loss"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerStats:
    """Per-site statistics, arrays in the order of ``sites`` (float64 numpy on the host)."""

    grad_norm: np.ndarray  # (S,) norm of the full-data mean gradient over each site's parameters
    fisher_trace: np.ndarray  # (S,) empirical Fisher trace (1/N) Σₙ ‖∇θ ℓₙ‖² per site
    fisher_trace_sampled: np.ndarray | None  # (S,) the same with sampled labels, or None
    num_examples: int  # examples seen (those with example_mask 1)
    num_tokens: int  # tokens seen (attention_mask of the counted examples; else the examples)
    num_batches: int  # batches consumed
    sites: tuple[Site, ...]  # the profiled sites, in the order of the arrays

    @property
    def paths(self) -> tuple[str, ...]:
        """The site paths, in the order of the arrays."""
        return tuple(s.path for s in self.sites)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the counts and one record per site."""
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
        """A markdown table: site, kind, parameters, grad_norm, fisher_trace."""
        lines = ["| site | kind | params | grad_norm | fisher_trace |", "|---|---|---:|---:|---:|"]
        for i, s in enumerate(self.sites):
            lines.append(f"| {s.path} | {s.kind} | {s.num_params} | {self.grad_norm[i]:.4e} | "
                         f"{self.fisher_trace[i]:.4e} |")
        return "\n".join(lines)


# ------------------------------------------------------------------------- the compiled step


class ProfileStep:
    """The compiled per-batch function of :func:`profile`, for custom loops and benchmarks.

    ``step(batch, key=None)`` returns ``(grad_sum, fisher_sum, grad_sq, fisher_sum_sampled,
    num_examples, num_tokens)``: the parameter-gradient pytree of the batch's summed loss, and per
    site the summed per-example squared gradient norms, the squared norm of this batch's gradient
    sum, the sampled-label counterpart (or None), and the counts. Compiles once per batch shape.
    ``site_unit`` and ``site_leaf`` are the 0/1 membership matrices (site × parameter unit,
    site × parameter leaf) that turn per-unit and per-leaf figures into per-site ones.

    Raises:
      TypeError: ``model`` is neither an ``nnx.Module`` nor a Linen module.
      ValueError: a Linen module without ``variables``, an empty ``sites``, a site whose
        parameters cannot be found, or a batch whose arrays disagree on the leading axis.
      NotImplementedError: parameters under a site that no tappable module owns.
    """

    def __init__(self, model, loss_fn, first_batch, *, variables=None, sites=None,
                 sample_loss_fn=None, example_mask_key="example_mask",
                 token_mask_key="attention_mask", precision=DEFAULT_TAP_PRECISION,
                 example=None):
        is_nnx = isinstance(model, nnx.Module)
        if not is_nnx and not isinstance(model, nn.Module):
            raise TypeError(f"profile expects an nnx.Module or a linen Module, "
                            f"got {type(model).__name__}")
        if not is_nnx and variables is None:
            raise ValueError("profile of a Linen module needs its variables")
        if sites is None:
            if example is None:
                example = _example_inputs(first_batch)
            if example is None and not is_nnx:
                raise ValueError("profile of a Linen module needs example inputs to find its "
                                 "sites: pass example=(inputs...) (the model's call arguments) "
                                 "or sites=discover_sites(module, variables, example=...)")
            sites = discover_sites(model, variables, example=example)
        self.sites = tuple(sites)
        if not self.sites:
            raise ValueError("profile got an empty list of sites")
        n = _infer_batch_size(first_batch)
        tapped = (tap_nnx(model, list(self.sites), precision=precision) if is_nnx
                  else tap_linen(model, variables, list(self.sites), precision=precision))
        self._params, self._rest = tapped.params, tapped.rest
        self.leaf_squares = jax.jit(tapped.leaf_squares or _leaf_sq)  # per entry of param_paths
        self.call_plan = _plan_calls(tapped, loss_fn, first_batch, n)
        self._step = _make_step(tapped, loss_fn, sample_loss_fn, self.call_plan,
                                example_mask_key, token_mask_key)
        self.site_unit, self.site_leaf = _membership(self.sites, tapped.unit_paths,
                                                     tapped.param_paths)
        self._site_unit = jnp.asarray(self.site_unit, jnp.float32)
        self._site_leaf = jnp.asarray(self.site_leaf, jnp.float32)

    def __call__(self, batch, key=None):
        """Run the step on one batch (``key``: the PRNG key for sampled labels, or None)."""
        return self._step(self._params, self._rest, batch, key, self._site_unit, self._site_leaf)

    def lower(self, batch, key=None):
        """``jax.jit(...).lower`` of the step, e.g. for ``.compile().memory_analysis()``."""
        return self._step.lower(self._params, self._rest, batch, key, self._site_unit,
                                self._site_leaf)


def _plan_calls(tapped: TappedModel, loss_fn, first_batch, n):
    """How each unit is called (layouts, shared units): see :func:`unit_calls.plan_calls`. Its
    first abstract trace (taps recording only) also checks the loss's shape and dtype, so a wrong
    loss is named before the taps can fail on it."""
    def forward(batch, sink, plan):
        sinks = {u: sink for u in tapped.unit_paths}
        return tapped.forward_losses(tapped.params, tapped.rest, sinks, batch, None, loss_fn,
                                     plan)

    def use_of(path, method):
        return "attend" if method == "attend" else tapped.rule_of(path).table_use

    def check_output(out):
        if not isinstance(out, (tuple, list)) and not hasattr(out, "dtype"):
            out = jax.eval_shape(jnp.asarray, out)
        _check_loss_type(out, n)

    return plan_calls(forward, first_batch, n, use_of, check_output)


def _example_inputs(first_batch):
    """Model inputs for site discovery: ``input_ids`` (and ``attention_mask``) of a mapping."""
    if isinstance(first_batch, Mapping) and "input_ids" in first_batch:
        return {"args": (first_batch["input_ids"],),
                "kwargs": {k: first_batch[k] for k in ("attention_mask",) if k in first_batch}}
    return None


def _infer_batch_size(first) -> int:
    sizes = {int(np.shape(l)[0]) for l in jax.tree.leaves(first) if np.ndim(l) >= 1}
    if len(sizes) != 1:
        raise ValueError(f"every array in a batch needs the same leading (example) axis; got "
                         f"sizes {sorted(sizes) or 'none'}")
    return sizes.pop()


def _membership(sites, unit_paths, param_paths):
    """0/1 matrices site x unit and site x parameter leaf (a unit / leaf lies under the site)."""
    site_unit = np.array([[is_under(u, s.path) for u in unit_paths] for s in sites], np.float64)
    site_leaf = np.array([[is_under(p.rpartition("/")[0], s.path) for p in param_paths]
                          for s in sites], np.float64).reshape(len(sites), len(param_paths))
    missing = [s.path for s, row in zip(sites, site_leaf) if s.num_params and not row.any()]
    if missing:
        raise ValueError(f"sites {missing} have parameters the profiler cannot find")
    return site_unit.reshape(len(sites), len(unit_paths)), site_leaf


def _batch_masks(batch, example_mask_key, token_mask_key, n):
    """Example weights (B,) and the token count of one batch."""
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


def _check_loss_type(losses, n):
    """TypeError / ValueError unless ``losses`` (an array or ShapeDtypeStruct) is float of (n,)."""
    if isinstance(losses, (tuple, list)):
        raise TypeError(f"loss_fn must return one array of per-example losses of shape ({n},), "
                        f"got a {type(losses).__name__} of {len(losses)}")
    if not jnp.issubdtype(losses.dtype, jnp.floating):
        raise TypeError(f"loss_fn must return floating per-example losses, got dtype "
                        f"{losses.dtype}; cast the loss to float32")
    if tuple(losses.shape) != (n,):
        raise ValueError(f"loss_fn must return per-example losses of shape ({n},) for a batch of "
                         f"{n}, got {tuple(losses.shape)}; return the unreduced losses, one per "
                         f"example")


def _checked_losses(losses, n):
    if not isinstance(losses, (tuple, list)):
        losses = jnp.asarray(losses)
    _check_loss_type(losses, n)
    return losses


def _leaf_sq(tree):
    """Sum of squares of every leaf, in tree-flattening order (the order of ``param_paths``)."""
    return jnp.stack([jnp.sum(jnp.square(l.astype(jnp.float32))) for l in jax.tree.leaves(tree)])



def _site_sums(membership, values, xp=jnp):
    """Per site, the sum of ``values`` over its members (a 0/1 site × member matrix).

    Not ``membership @ values``: that would spread a NaN of one member to every site (0 · NaN is
    NaN), and the non-finite error must name the site that holds it.
    """
    return xp.sum(xp.where(membership > 0, values[None, :], 0.0), axis=1)


def _reduce(sinks_grad, sinks_grad_s, param_grads, unit_paths, site_unit, site_leaf,
            leaf_squares=_leaf_sq):
    """Per-site Fisher sums, squared gradient norms and sampled Fisher sums of one batch."""
    def fisher(sinks):
        return None if sinks is None else _site_sums(
            site_unit, jnp.stack([jnp.sum(sinks[u]) for u in unit_paths]))

    return (fisher(sinks_grad), _site_sums(site_leaf, leaf_squares(param_grads)),
            fisher(sinks_grad_s))


def _make_step(tapped: TappedModel, loss_fn, sample_loss_fn, call_plan, ex_key, tok_key):
    """The jitted per-batch function: one backward pass for gradients and per-example norms.
    Each batch may have its own size (a smaller last batch): the step compiles once per size."""

    def step(params, rest, batch, key, site_unit, site_leaf):
        n = _infer_batch_size(batch)
        sinks0 = {u: jnp.zeros((n,), jnp.float32) for u in tapped.unit_paths}
        w, tokens = _batch_masks(batch, ex_key, tok_key, n)

        def total(params, sinks, fn, key):
            losses = tapped.forward_losses(params, rest, sinks, batch, key, fn, call_plan)
            return jnp.sum(_checked_losses(losses, n) * w)

        param_grads, sink_grads = jax.grad(total, argnums=(0, 1))(params, sinks0, loss_fn, None)
        sink_grads_s = None
        if sample_loss_fn is not None:
            sink_grads_s = jax.grad(total, argnums=1)(jax.lax.stop_gradient(params), sinks0,
                                                      sample_loss_fn, key)
        if isinstance(param_grads, nnx.State):
            param_grads = param_grads.to_pure_dict()
        reduced = _reduce(sink_grads, sink_grads_s, param_grads, tapped.unit_paths, site_unit,
                          site_leaf, tapped.leaf_squares or _leaf_sq)
        return (param_grads, *reduced, jnp.sum(w), tokens)

    return jax.jit(step)


# ------------------------------------------------------------------------------ accumulation


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Totals:
    """Sums over the batches seen (host float64, except the gradient pytree on the device)."""

    grad_sum: Any  # parameter-gradient pytree of the summed loss
    fisher: np.ndarray  # (S,) summed per-example squared norms
    fisher_sampled: np.ndarray | None  # (S,) the sampled-label counterpart, or None
    num_examples: float  # weighted example count
    num_tokens: float  # token count
    num_batches: int  # batches consumed


@functools.partial(jax.jit, donate_argnums=0)
def _tree_add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _check_finite(batch_index, site_paths, values: Mapping[str, np.ndarray]):
    """Raise ``FloatingPointError`` naming the statistic, first bad site and batch."""
    for name, vec in values.items():
        bad = np.flatnonzero(~np.isfinite(vec))
        if bad.size:
            raise FloatingPointError(
                f"non-finite {name} at site {site_paths[bad[0]]!r} in batch {batch_index} "
                f"(value {vec[bad[0]]}); {bad.size} site(s) affected")


def _accumulate(step: ProfileStep, batches: Iterator[Any], *, sampled: bool, rng,
                max_batches: int | None) -> _Totals:
    """Run ``step`` over ``batches`` (at most ``max_batches``) and sum its outputs."""
    paths = [s.path for s in step.sites]
    grad_sum = None
    fisher = np.zeros(len(paths), np.float64)
    fisher_s = np.zeros(len(paths), np.float64) if sampled else None
    n_ex = n_tok = 0.0
    n_batches = 0
    for b_idx, batch in enumerate(batches):
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
        grad_sum = batch_grads if grad_sum is None else _tree_add(grad_sum, batch_grads)
        n_ex += float(ex)
        n_tok += float(tok)
        n_batches += 1
    return _Totals(grad_sum=grad_sum, fisher=fisher, fisher_sampled=fisher_s, num_examples=n_ex,
                   num_tokens=n_tok, num_batches=n_batches)


# -------------------------------------------------------------------------------- the driver


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
    precision: str = DEFAULT_TAP_PRECISION,
    example: Any = None,
) -> LayerStats:
    """Profile every site of ``model`` over ``batches``: gradient norms and Fisher traces.

    One jitted backward pass per batch gives the batch's parameter gradients and, through taps
    on every parameter unit, each example's squared gradient norm per site (see the module
    docstring and :mod:`layerlens_jax._src.fisher_rules`).

    Args:
      model: an ``nnx.Module`` or a Linen module (then also pass ``variables``).
      loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses (Linen:
        ``loss_fn(variables, batch)``).
      batches: any iterable of batches (pytrees of arrays, the example axis first in every array);
        batches may differ in size (a smaller last batch is fine: the statistics are sums over
        examples), the step compiles once per distinct shape.
      variables: the Linen module's variables (``{"params": ...}``); ignored for NNX.
      sites: the sites to report (default: :func:`discover_sites` with ``example``, else with the
        first batch's ``input_ids`` (and ``attention_mask``) when it is a mapping holding them,
        else without example inputs: then sites lack the shapes only a forward pass shows, such
        as a block's width and the positions per example, which ``allocate`` may need).
      sample_loss_fn: ``sample_loss_fn(model, batch, key) -> (B,)`` losses with labels sampled from
        the model (see :func:`sampled_label_loss`); adds ``fisher_trace_sampled``. Needs ``rng``.
      rng: PRNG key for the sampled labels (folded with the batch index).
      example_mask_key: the batch key of the (B,) 0/1 mask of real examples.
      token_mask_key: the batch key of the (B, T) 0/1 mask counting tokens.
      max_batches: stop after this many batches.
      progress: show a tqdm progress bar.
      precision: of the dense taps' products (a key of
        :data:`~layerlens_jax._src.fisher_rules.TAP_PRECISIONS`): ``"high"`` (default: TF32 on
        NVIDIA GPUs, three bf16 passes on TPU, exact on CPU; Fisher traces within 1e-3 relative
        of exact), ``"highest"`` exact float32 everywhere, ``"default"``, ``"bfloat16"``
        (faster, about 1e-3 relative error). Gradient norms are unaffected.
      example: example inputs of the model's call for site discovery, as for
        :func:`discover_sites` (one array, a tuple of positional arguments, or
        ``{"args": (...), "kwargs": {...}}``), for any batch structure: e.g. ``batch["image"]``.
        Needed for a Linen module whose batches hold no ``input_ids``. Ignored with ``sites``.

    Returns:
      :class:`LayerStats` with ``grad_norm``, ``fisher_trace`` (and ``fisher_trace_sampled``) per
      site, in the order of ``stats.sites``, and the example, token and batch counts.

    Raises:
      ValueError: no batches, no examples, ``sample_loss_fn`` without ``rng``, losses not of shape
        (B,) (names the expected and the returned shape), or a unit whose input has neither the
        example axis first nor a shape independent of the batch (names the unit). Inputs without
        the example axis (``self.pos(jnp.arange(T))``) are broadcast over the examples, exactly
        (see :mod:`layerlens_jax._src.unit_calls`).
      TypeError: ``model`` is neither an ``nnx.Module`` nor a Linen module, ``batches`` is a single
        mapping (wrap it in a list), or ``loss_fn`` returns a non-float loss or a tuple.
      FloatingPointError: a non-finite statistic (names the statistic, the site and the batch).
      NotImplementedError: a unit called more than once per forward pass whose cross terms are
        not known (tied embeddings -- lookups and ``Embed.attend`` -- and dense layers are exact),
        or called through a method other than ``__call__`` (or ``attend`` of an ``Embed``).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> from layerlens_jax import profile
      >>> from layerlens_jax.models import MLP
      >>> model = MLP((4, 8, 2), rngs=nnx.Rngs(0))
      >>> def loss_fn(model, batch):  # per-example squared error, shape (B,)
      ...     return jnp.sum((model(batch["x"]) - batch["y"]) ** 2, axis=-1)
      >>> rng = np.random.default_rng(0)
      >>> batches = [{"x": rng.normal(size=(8, 4)).astype(np.float32),
      ...             "y": rng.normal(size=(8, 2)).astype(np.float32)} for _ in range(3)]
      >>> stats = profile(model, loss_fn, batches)
      >>> stats.paths, stats.num_examples, stats.num_batches
      (('layers_0', 'layers_1'), 24, 3)
      >>> bool(np.all(stats.fisher_trace >= stats.grad_norm ** 2))  # E‖gₙ‖² ≥ ‖E gₙ‖²
      True
    """
    if sample_loss_fn is not None and rng is None:
        raise ValueError("sample_loss_fn needs rng (a jax PRNG key) to sample labels")
    if isinstance(batches, Mapping):
        raise TypeError(f"batches must be an iterable of batches, got a single "
                        f"{type(batches).__name__} (keys {sorted(map(str, batches))[:4]}); wrap "
                        f"it in a list: profile(model, loss_fn, [batch])")
    iterator = iter(batches)
    try:
        first = next(iterator)
    except StopIteration:
        raise ValueError("profile got no batches") from None
    step = ProfileStep(model, loss_fn, first, variables=variables, sites=sites,
                       sample_loss_fn=sample_loss_fn, example_mask_key=example_mask_key,
                       token_mask_key=token_mask_key, precision=precision, example=example)

    def all_batches():
        yield first
        yield from iterator

    it = all_batches()
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc="profile", unit="batch", total=max_batches)
    totals = _accumulate(step, it, sampled=sample_loss_fn is not None, rng=rng,
                         max_batches=max_batches)
    return _finish(step, totals)


def _finish(step: ProfileStep, totals: _Totals) -> LayerStats:
    """Divide the sums by the example count; norm the accumulated gradient per site."""
    n_ex = totals.num_examples
    if n_ex <= 0:
        raise ValueError("profile saw no examples (every example_mask was 0)")
    leaf_sq = np.asarray(step.leaf_squares(totals.grad_sum), np.float64)
    grad_norm = np.sqrt(_site_sums(step.site_leaf, leaf_sq, xp=np)) / n_ex
    _check_finite(totals.num_batches - 1, [s.path for s in step.sites], {"grad_norm": grad_norm})
    return LayerStats(grad_norm=grad_norm, fisher_trace=totals.fisher / n_ex,
                      fisher_trace_sampled=(None if totals.fisher_sampled is None
                                            else totals.fisher_sampled / n_ex),
                      num_examples=int(round(n_ex)), num_tokens=int(round(totals.num_tokens)),
                      num_batches=totals.num_batches, sites=tuple(step.sites))


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
