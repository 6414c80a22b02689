"""Gradient-spectrum gains: a concave, data-derived gain curve in LoRA rank for every linear site.

For a linear site with kernel ``W`` (``d_in x d_out``) let ``G = dL/dW`` be the gradient of the
mean loss over the profiling batches, with singular values ``s_1 >= s_2 >= ...``. A rank-``r``
update ``dW`` changes the loss to first order by ``<G, dW>``; its best value over updates of a
bounded size is a norm of the top-``r`` part of ``G``:

* Frobenius-bounded step (``||dW||_F <= eta``, plain gradient descent):
  ``eta * sqrt(s_1^2 + ... + s_r^2)`` -- ``"frobenius"``;
* spectral-norm-bounded step (``||dW||_2 <= eta``: every direction moves by the same amount, as
  sign-like optimisers such as Adam tend to do): ``eta * (s_1 + ... + s_r)`` -- ``"nuclear"``.

Either curve is increasing and concave in ``r`` (its increments ``s_r`` or
``sqrt(E_r) - sqrt(E_{r-1})`` fall with ``r``), reaches the site's whole gradient norm at full rank
and, unlike a utility times a guessed saturation, knows where a site's gradient is concentrated in
few directions: a query projection with a small trace but a rank-1 gradient gets its rank-1 gain
in full. :class:`SpectralGain` turns the curves into the allocator's gain matrix.

:func:`gradient_spectra` computes them with one jit-compiled backward pass per batch (the gradient
sum is accumulated, then divided by the example count, as ``profile``'s ``grad_norm``), and one
batched SVD per kernel shape (sites of the same shape are stacked, not looped over).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerlens_jax._src.costs import GainModel
from layerlens_jax._src.sites import Site, flatten_paths

__all__ = ["GradientSpectra", "gradient_spectra", "SpectralGain", "spectral_curve", "NORMS"]

NORMS = ("frobenius", "nuclear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GradientSpectra:
    """Top singular values of the mean-loss gradient of every linear site's kernel."""

    sites: tuple[str, ...]  # site paths, in the order of ``values``' rows
    values: np.ndarray  # [S, K] float64, descending; zero-padded; NaN rows: no 2-D kernel
    num_examples: int  # examples the mean gradient was taken over
    # [S] mean |W * G| over the kernel's entries (GoRA's importance, layerlens_jax._src.gora);
    # NaN where ``values`` is NaN
    weight_gradient: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "num_examples": self.num_examples,
                **({} if self.weight_gradient is None else {"weight_gradient": [
                    None if not np.isfinite(x) else float(x) for x in self.weight_gradient]}),
                "values": [[None if not np.isfinite(x) else float(x) for x in row]
                           for row in self.values]}


def _kernel_matrix_shape(site: Site) -> tuple[int, int] | None:
    """``(d_in, d_out)`` of a linear site's kernel as a matrix, or None (no spectrum).

    A 2-D kernel is used as is. A ``LinearGeneral`` / ``Einsum`` kernel (``in_axes + out_axes``,
    e.g. ``(d, heads, head_dim)``) is read as the matrix from its leading axes whose product is the
    site's ``in_features`` to the rest; where no such split exists the site gets no spectrum.
    """
    shape = site.param_shapes.get("kernel") if site.kind == "linear" else None
    if shape is None or len(shape) < 2:
        return None
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    for k in range(1, len(shape)):
        d_in, d_out = int(np.prod(shape[:k])), int(np.prod(shape[k:]))
        if d_in == site.in_features and d_out == site.out_features:
            return d_in, d_out
    return None


def gradient_spectra(model: nnx.Module, loss_fn: Callable, batches: Iterable[Mapping[str, Any]],
                     sites: Sequence[Site], *, max_batches: int | None = None,
                     top_k: int = 64) -> GradientSpectra:
    """Top-``top_k`` singular values of each linear site's mean-loss gradient.

    Args:
      model: an NNX model (not modified).
      loss_fn: ``loss_fn(model, batch) -> (B,)`` per-example losses, as for ``profile``; a batch's
        ``example_mask`` (B,), if present, weights them (padding rows count zero).
      batches: an iterable of batch mappings.
      sites: the sites; those that are not ``linear`` with a 2-D ``kernel`` get a NaN row.
      max_batches: stop after this many batches.
      top_k: how many singular values to keep per site.

    Returns:
      :class:`GradientSpectra` with rows in the order of ``sites`` (``weight_gradient``: each
      site's mean ``|W * G|``, from the same mean gradient).

    Raises:
      ValueError: no batch, no example, or a non-finite gradient (naming the site).
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weights = {k.removesuffix("/value"): v for k, v in flatten_paths(params).items()}

    @jax.jit
    def batch_grad(params, rest, batch):
        def total(p):
            losses = loss_fn(nnx.merge(graphdef, p, rest), batch)
            w = batch.get("example_mask", jnp.ones(losses.shape[0], losses.dtype))
            return jnp.sum(losses * w), jnp.sum(w)
        (_, count), grads = jax.value_and_grad(total, has_aux=True)(params)
        return grads, count

    acc, n = None, 0.0
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        g, count = batch_grad(params, rest, dict(batch))
        acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
        n += float(count)
    if acc is None or n <= 0:
        raise ValueError("gradient_spectra: no batch (or no example) was given")
    flat = {k.removesuffix("/value"): v for k, v in flatten_paths(acc).items()}
    values = np.full((len(sites), top_k), np.nan)
    weight_gradient = np.full(len(sites), np.nan)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, site in enumerate(sites):
        shape = _kernel_matrix_shape(site)
        if shape is not None and f"{site.path}/kernel" in flat:
            by_shape.setdefault(shape, []).append(i)
    svd = jax.jit(jax.vmap(lambda m: jnp.linalg.svd(m, compute_uv=False)))
    mean_abs = jax.jit(jax.vmap(lambda w, g: jnp.mean(jnp.abs(w * g))))
    for shape, idx in by_shape.items():
        stacked = jnp.stack([flat[f"{sites[i].path}/kernel"].reshape(shape) for i in idx])
        stacked = stacked.astype(jnp.float32) / n
        s = np.asarray(svd(stacked), np.float64)
        w = jnp.stack([weights[f"{sites[i].path}/kernel"].reshape(shape) for i in idx])
        weight_gradient[idx] = np.asarray(mean_abs(w.astype(jnp.float32), stacked), np.float64)
        bad = ~np.isfinite(s).all(axis=1)
        if bad.any():
            raise ValueError(f"gradient_spectra: non-finite gradient at site "
                             f"{sites[idx[int(np.argmax(bad))]].path!r}")
        k = min(top_k, s.shape[1])
        values[idx, :] = 0.0
        values[idx, :k] = s[:, :k]
    return GradientSpectra(sites=tuple(s.path for s in sites), values=values, num_examples=int(n),
                           weight_gradient=weight_gradient)


def spectral_curve(values: np.ndarray, ranks: Sequence[int], norm: str = "frobenius") -> np.ndarray:
    """``[S, len(ranks)]`` gain of the best rank-``r`` step per site (see the module docstring).

    ``values``: ``[S, K]`` descending singular values; ranks beyond ``K`` get the rank-``K`` gain.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    v = np.asarray(values, np.float64)
    cum = np.cumsum(v ** 2, axis=1) if norm == "frobenius" else np.cumsum(v, axis=1)
    idx = np.minimum(np.asarray(ranks, int), v.shape[1]) - 1
    out = cum[:, idx]
    return np.sqrt(out) if norm == "frobenius" else out


@dataclasses.dataclass(frozen=True, kw_only=True)
class SpectralGain:
    """A gain model whose LoRA gains are the sites' gradient-spectrum curves.

    ``gain(utility, options)`` (the interface of :class:`~layerlens_jax.GainModel`): for a
    ``("lora", r)`` option, ``efficiency * curve(site, r) / max over sites of curve(site, r_max)``
    (so gains lie in [0, efficiency], like a utility-based gain); sites without a spectrum (not a
    2-D linear kernel) and the other methods take ``fallback``'s utility-based gain. The rows of
    ``spectra`` must follow the site order given to the allocator.
    """

    spectra: GradientSpectra  # from gradient_spectra, rows in the allocator's site order
    norm: str = "frobenius"  # "frobenius" or "nuclear": the step-size bound (module docstring)
    fallback: GainModel = dataclasses.field(default_factory=GainModel)  # non-spectral gains

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"SpectralGain.norm must be one of {NORMS}, got {self.norm!r}")

    def gain(self, utility: np.ndarray, options: Sequence[tuple[str, int]]) -> np.ndarray:
        """Predicted gains ``[S, O]`` (float64)."""
        g = self.fallback.gain(utility, options)
        values = self.spectra.values
        if values.shape[0] != g.shape[0]:
            raise ValueError(f"SpectralGain has spectra for {values.shape[0]} sites but the "
                             f"allocator has {g.shape[0]}: compute them for the same site list")
        lora = [j for j, (m, _) in enumerate(options) if m == "lora"]
        has = np.isfinite(values).all(axis=1)
        if not lora or not has.any():
            return g
        ranks = [options[j][1] for j in lora]
        curve = spectral_curve(np.where(has[:, None], values, 0.0), ranks, self.norm)
        top = spectral_curve(np.where(has[:, None], values, 0.0), [max(ranks)], self.norm).max()
        eff = self.fallback.efficiency.get("lora", 1.0)
        scaled = eff * curve / top if top > 0 else np.zeros_like(curve)
        g[np.ix_(has, lora)] = scaled[has]
        return g

    def to_dict(self) -> dict[str, Any]:
        return {"source": "spectral", "norm": self.norm, "fallback": self.fallback.to_dict(),
                "num_examples": self.spectra.num_examples}
