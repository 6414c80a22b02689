"""Probe utility: where LoRA actually lowers the loss, measured along a short training run.

Profiling measures gradients of the *base* weights before any training; a site whose gradient is
small at the start may still be where an adapter helps most (attention queries: their effect goes
through the softmax, which a first-order signal at initialisation barely sees). The probe asks the
question the allocation is about directly: give every LoRA-able site a small adapter (rank
``rank``), train them all together for a few steps with the real optimizer, and credit each site
with the first-order loss decrease its own adapter produced,

    contribution[s] = - sum_t < g_t[s], u_t[s] >,

``g_t[s]`` the gradient of the step's mean loss w.r.t. site ``s``'s adapter leaves and ``u_t[s]``
the optimizer's update of them at step ``t`` (for plain gradient descent ``lr * |g|^2``: the
first-order decrease of the loss; the sum over sites is the first-order estimate of the whole
run's decrease). This is the path-integral attribution of Zenke et al. (2017, "synaptic
intelligence") over adapter parameters. The probe's adapters are thrown away: the plan is then
trained from scratch.

:func:`probe_utility` is one jit-compiled step over the split model (no Python loop over sites:
per-leaf inner products are segment-summed into sites).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from layerlens_jax._src.methods import METHOD_KINDS
from layerlens_jax._src.peft.apply import apply_plan
from layerlens_jax._src.peft.nnx_modules import PEFT_FILTER
from layerlens_jax._src.peft.tree import PEFT_PREFIX
from layerlens_jax._src.sites import Site
from layerlens_jax._src.train import reduce_loss

__all__ = ["ProbeResult", "probe_utility"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeResult:
    """Per-site loss decrease credited to each site's probe adapter."""

    sites: tuple[str, ...]  # site paths, in the order given (non-LoRA-able sites included)
    contribution: np.ndarray  # [S] float64: - sum_t <g_t, u_t> over the site's adapter; 0 if none
    probed: np.ndarray  # [S] bool: the site had a probe adapter
    losses: np.ndarray  # [T] train loss of every probe step
    rank: int  # the probe adapters' LoRA rank
    seconds: float  # wall clock of the probe (compile included)

    @property
    def utility(self) -> np.ndarray:
        """``[S]`` the contributions clipped at 0 (a site whose adapter raised the loss gets 0)."""
        return np.maximum(self.contribution, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "contribution": self.contribution.tolist(),
                "probed": self.probed.tolist(), "losses": self.losses.tolist(),
                "rank": self.rank, "seconds": self.seconds}


def _leaf_sites(trainable: Any, paths: Sequence[str]) -> np.ndarray:
    """For every leaf of ``trainable`` (in ``jax.tree.leaves`` order) its site index, or -1 (a
    trainable leaf that is not an adapter, e.g. a task head)."""
    index = {p: i for i, p in enumerate(paths)}
    out = []
    for keypath, _ in jax.tree_util.tree_leaves_with_path(trainable):
        parts = [str(k.key if isinstance(k, jax.tree_util.DictKey) else k.idx)
                 for k in keypath if not isinstance(k, jax.tree_util.GetAttrKey)]  # Variable.value
        leaf = next((j for j, p in enumerate(parts) if p.startswith(PEFT_PREFIX)), None)
        out.append(-1 if leaf is None else index.get("/".join(parts[:leaf]), -1))
    return np.asarray(out, np.int32)


def probe_utility(model: nnx.Module, loss_fn: Callable, batches: Iterable[Mapping[str, Any]],
                  sites: Sequence[Site], tx: optax.GradientTransformation, *, steps: int,
                  rank: int = 1, wrt: Any = PEFT_FILTER, example: Any = None,
                  peft_options: Mapping[str, Any] | None = None,
                  has_aux: bool = False) -> ProbeResult:
    """Train a rank-``rank`` LoRA on every LoRA-able site of ``model`` for ``steps`` batches and
    credit each site with its adapter's first-order loss decrease (module docstring).

    Args:
      model: the base NNX model (not modified: the probe works on a wrapped clone).
      loss_fn: ``loss_fn(model, batch)``: a scalar or per-example losses (averaged).
      batches: training batches; the first ``steps`` are used.
      sites: from ``discover_sites`` / ``profile`` (``stats.sites``); those of a LoRA kind get an
        adapter, the others contribution 0.
      tx: the optimizer (use the one the plan will be trained with).
      steps: probe steps (a fraction of the training run: its cost).
      rank: the probe adapters' rank. wrt: what trains (default the adapters; pass a filter that
        also selects a task head to train it alongside, as the real run does).
      example / peft_options: passed to ``apply_plan``.

    Raises:
      ValueError: no LoRA-able site, ``steps < 1``, fewer batches than steps, a stacked site
        (not supported yet), or a non-finite loss (naming the step).
    """
    if steps < 1:
        raise ValueError(f"probe_utility: steps must be >= 1, got {steps}")
    for s in sites:
        if getattr(s, "stacked_module", None):
            raise ValueError(f"probe_utility: site {s.path!r} is a layer of the stacked module "
                             f"{s.stacked_module!r}; stacked layers are not supported by the probe")
    probed = np.array([s.kind in METHOD_KINDS["lora"] for s in sites])
    if not probed.any():
        raise ValueError("probe_utility: no site of a LoRA kind among the sites")
    t0 = time.perf_counter()
    wrapped = apply_plan(model, {s.path: ("lora", rank) for s, p in zip(sites, probed) if p},
                         example=example, **dict(peft_options or {}))
    graphdef, trainable, frozen, other = nnx.split(wrapped, wrt, nnx.Param, ...)
    ids = jnp.asarray(_leaf_sites(trainable, [s.path for s in sites]))
    valid = ids >= 0
    n = len(sites)

    @jax.jit
    def step(trainable, opt_state, other, total, batch):
        def f(tr):
            m = nnx.merge(graphdef, tr, frozen, other)
            loss, _ = reduce_loss(loss_fn(m, batch), has_aux)
            return loss, nnx.state(m, nnx.Not(nnx.Param))

        (loss, new_other), grads = jax.value_and_grad(f, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        inner = jnp.stack([-jnp.vdot(g, u).real.astype(jnp.float32) for g, u in
                           zip(jax.tree.leaves(grads), jax.tree.leaves(updates))])
        total = total + jax.ops.segment_sum(jnp.where(valid, inner, 0.0),
                                            jnp.where(valid, ids, 0), num_segments=n)
        return optax.apply_updates(trainable, updates), opt_state, new_other, total, loss

    opt_state = tx.init(trainable)
    total = jnp.zeros(n, jnp.float32)
    losses = []
    it = iter(batches)
    for t in range(steps):
        try:
            batch = next(it)
        except StopIteration:
            raise ValueError(f"probe_utility: {steps} steps asked for but the batches ran out "
                             f"after {t}") from None
        trainable, opt_state, other, total, loss = step(trainable, opt_state, other, total, batch)
        losses.append(loss)
    losses = np.asarray(jax.device_get(losses), np.float64)
    if not np.isfinite(losses).all():
        raise ValueError(f"probe_utility: non-finite loss at probe step "
                         f"{int(np.argmin(np.isfinite(losses)))}; lower the learning rate")
    return ProbeResult(sites=tuple(s.path for s in sites),
                       contribution=np.asarray(jax.device_get(total), np.float64),
                       probed=probed, losses=losses, rank=rank,
                       seconds=time.perf_counter() - t0)
