"""Unit calls beyond "once per forward pass, on a batched input": shared units, broadcast inputs.

The per-unit taps of :mod:`layerlens_jax._src.fisher_rules` see one call's input x and output
gradient g per example. Two layouts of real JAX LLM code need more:

Shared units (tied embeddings)
------------------------------
A unit called K times per forward pass (an ``Embed`` used as input embedding ``embed(ids)`` and
as output layer ``embed.attend(h)``; a ``Linear`` reused) has per-example gradient
Pₙ = Σⱼ Pⱼₙ, the sum of every call's contribution, so ‖Pₙ‖² = Σⱼ ‖Pⱼₙ‖² + 2 Σ_{i<j} ⟨Pᵢₙ, Pⱼₙ⟩:
the squared norms alone miss the cross terms. With Jᵢ the Jacobian of call i's output with respect
to the parameters, Pᵢ = Jᵢᵀgᵢ, hence ⟨Pᵢ, Pⱼ⟩ = ⟨gᵢ, Jᵢ Pⱼ⟩: a product of call i's output gradient
with a *link* Qᵢ = Σ_{j>i} Jᵢ Pⱼ shaped like call i's output. Call i's tap outputs a zero link; every
later call j takes the earlier calls' inputs and links as arguments, and its backward pass (which
runs first) returns Jᵢ Pⱼ as the links' cotangents — computed from xᵢ, xⱼ, gⱼ without forming Pⱼ
(:func:`link_cotangent`). Call i's backward pass then adds 2⟨gᵢ, Qᵢ⟩ per example. Supported, exactly:
any mix of embedding lookups and ``attend`` on one table, and dense units (Linear, trailing-axis
LinearGeneral, with or without bias) called several times. Other units called more than once are
refused (naming the unit and the reason).

Broadcast inputs
----------------
A call whose input has no example axis (``self.pos(jnp.arange(T))``) or a singleton one
(``jnp.arange(T)[None]``) is found by tracing the model abstractly at the batch size B and at B+1
(:func:`plan_calls`): an input whose shape does not change with the batch is broadcast. Its tap
hands the model the output with the example axis made explicit — the singleton axis expanded to B,
or an axis B prepended — so the output gradient arrives per example, and the unit's rule sees the
input broadcast likewise: each example's gradient through the broadcast use is exact. The model
must combine that output with batched values by broadcasting (``h + pos``); a B+1 trace with the
broadcasts applied checks that the loss keeps its shape, and a unit whose expanded output does not
broadcast is refused naming it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BATCHED", "SINGLETON", "UNBATCHED", "CallProbe", "CallSpec", "LINKABLE_USES",
           "apply_layout", "link_cotangent", "plan_calls", "shared_tap"]

#: Call layouts: the input's leading axis is the example axis / a singleton axis standing for the
#: examples / the input has no example axis.
BATCHED, SINGLETON, UNBATCHED = "batched", "singleton", "unbatched"

#: Groups of rule uses (a rule's ``table_use``) whose calls on one unit have exact cross terms.
LINKABLE_USES = (frozenset({"lookup", "attend"}), frozenset({"product"}))

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True, kw_only=True)
class CallSpec:
    """How one call of a unit is tapped."""

    method: str  # the unit's method called: "__call__" or "attend"
    layout: str  # BATCHED, SINGLETON or UNBATCHED (see the module docstring)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CallRecord:
    method: str  # the unit's method called
    in_shape: tuple[int, ...]  # the call's input shape
    out_shape: tuple[int, ...]  # the call's output shape


class CallProbe:
    """Stands in for a call plan during an abstract trace: records every tapped call, taps none."""

    def __init__(self):
        self.calls: dict[str, list[_CallRecord]] = {}

    def record(self, path: str, method: str, x, y) -> None:
        self.calls.setdefault(path, []).append(_CallRecord(
            method=method, in_shape=tuple(np.shape(x)), out_shape=tuple(np.shape(y))))


# ------------------------------------------------------------------------------ the call plan


def _with_batch(batch, size: int):
    """``ShapeDtypeStruct``s of ``batch`` with the leading (example) axis of every array ``size``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        (size,) + tuple(np.shape(a))[1:] if np.ndim(a) else (), jnp.result_type(a)), batch)


def _probe(forward: Callable, batch, size: int):
    """Trace ``forward(batch, sinks, plan)`` abstractly at batch ``size`` with a probe: the calls
    recorded, and the loss's abstract output."""
    probe = CallProbe()
    out = jax.eval_shape(lambda b: forward(b, jnp.zeros((size,), jnp.float32), probe),
                         _with_batch(batch, size))
    return probe.calls, out


def _layout(path: str, index: int, rec, rec_more, n: int) -> str:
    """The layout of call ``index`` of unit ``path`` from its records at batch n and n+1."""
    shape = rec.in_shape
    if rec_more is None:  # no n+1 trace: the leading axis decides
        return BATCHED if shape and shape[0] == n else (
            SINGLETON if shape and shape[0] == 1 and rec.out_shape[:1] == (1,) else UNBATCHED)
    more = rec_more.in_shape
    if shape and more and shape[0] == n and more[0] == n + 1 and shape[1:] == more[1:]:
        return BATCHED
    if shape == more:
        return SINGLETON if shape and shape[0] == 1 and rec.out_shape[:1] == (1,) else UNBATCHED
    raise ValueError(
        f"site unit {path!r} (call {index + 1}) sees an input of shape {shape} at batch {n} and "
        f"{more} at batch {n + 1}: its leading axis is neither the example axis nor independent "
        "of the batch; per-example statistics need the example axis first at every site "
        "(e.g. do not flatten examples and positions into one axis)")


def _check_linkable(path: str, uses: list[str | None]) -> None:
    if len(uses) > 1 and not any(set(uses) <= group for group in LINKABLE_USES):
        raise NotImplementedError(
            f"site unit {path!r} is called {len(uses)} times per forward pass (weight sharing) "
            f"through rules {uses}: the cross terms of its per-example gradient are exact only "
            "for embedding lookups with attend, or dense units; exclude it from the sites")


def plan_calls(forward: Callable, batch, n: int, use_of: Callable[[str, str], str | None],
               check_output: Callable[[Any], None] = lambda out: None
               ) -> dict[str, tuple[CallSpec, ...]]:
    """``{unit path: one CallSpec per call}`` from abstract traces of ``forward`` at batch n, n+1.

    ``forward(batch, sinks, plan)`` runs the tapped loss with a call plan (or a probe);
    ``use_of(path, method)`` is the ``table_use`` of the rule for that call (None: no cross terms).
    When the n+1 trace fails (a model tied to one batch size), a call's layout is read from its
    leading axis alone. ``check_output`` sees the loss's abstract output of the batch-n trace
    (the model untapped: probes tap nothing) before anything else is checked. Raises
    ``ValueError`` / ``NotImplementedError`` naming the unit.
    """
    calls, out = _probe(forward, batch, n)
    check_output(out)
    try:
        more = _probe(forward, batch, n + 1)[0]
    except Exception:  # noqa: BLE001 -- any failure: fall back to the leading axis
        more = None
    plan = {}
    for path, recs in calls.items():
        recs_more = None if more is None else more.get(path, [])
        if recs_more is not None and len(recs_more) != len(recs):
            raise ValueError(f"site unit {path!r} is called {len(recs)} times at batch {n} but "
                             f"{len(recs_more)} times at batch {n + 1}")
        plan[path] = tuple(
            CallSpec(method=r.method,
                     layout=_layout(path, i, r, None if recs_more is None else recs_more[i], n))
            for i, r in enumerate(recs))
        _check_linkable(path, [use_of(path, r.method) for r in recs])
    broadcast = [p for p, specs in plan.items() if any(s.layout != BATCHED for s in specs)]
    if broadcast and more is not None:
        try:
            out = jax.eval_shape(lambda b: forward(b, jnp.zeros((n + 1,), jnp.float32), plan),
                                 _with_batch(batch, n + 1))
        except Exception as e:  # noqa: BLE001 -- name the units, keep the cause
            raise ValueError(f"site units {broadcast} see inputs without the example axis, and "
                             f"their outputs with the example axis made explicit do not broadcast "
                             f"in the model ({type(e).__name__}: {str(e)[:200]})") from e
        if getattr(out, "shape", None) != (n + 1,):
            raise ValueError(f"site units {broadcast} see inputs without the example axis, and "
                             f"their outputs with the example axis made explicit change the "
                             f"loss shape to {getattr(out, 'shape', None)}")
    return plan


def apply_layout(spec: CallSpec, path: str, x, y, n: int):
    """``(x, y)`` with the example axis explicit (size n) for a broadcast call; checked for a
    batched one (``ValueError`` naming the unit)."""
    if spec.layout == BATCHED:
        if not hasattr(x, "shape") or x.ndim == 0 or x.shape[0] != n:
            raise ValueError(
                f"site unit {path!r} sees an input of shape {getattr(x, 'shape', None)} whose "
                f"leading axis is not the example axis (batch {n}); per-example statistics need "
                "the example axis first at every site")
        return x, y
    if spec.layout == SINGLETON:
        return (jnp.broadcast_to(x, (n,) + x.shape[1:]), jnp.broadcast_to(y, (n,) + y.shape[1:]))
    x = jnp.asarray(x)
    return jnp.broadcast_to(x, (n,) + x.shape), jnp.broadcast_to(y, (n,) + y.shape)


# ------------------------------------------------------------------------- the cross terms


def _f32(a):
    return a.astype(jnp.float32)


def link_cotangent(earlier, x_i, later, x_j, g_j, link_shape) -> jax.Array:
    """Jᵢ Pⱼ per example, shaped ``link_shape`` (call i's output): the direction in call i's output
    space whose product with gᵢ is ⟨Pᵢ, Pⱼ⟩, for rules ``earlier`` (call i) and ``later`` (call j).

    Per example, with E the table (V×D): a lookup's output is E[ids], attend's q Eᵀ; a dense unit's
    x K (+ b). Pⱼ is never formed: the products below are (positions × positions) or gathers.
    """
    b = link_shape[0]
    out = link_shape[-1]
    ui, uj = earlier.table_use, later.table_use
    gj = _f32(g_j).reshape(b, -1, g_j.shape[-1])
    if ui == "lookup":
        ids_i = x_i.reshape(b, -1)
        if uj == "lookup":  # P_j[ids_i]: rows of equal id
            same = _f32(ids_i[:, :, None] == x_j.reshape(b, -1)[:, None, :])
            q = jnp.einsum("bts,bsd->btd", same, gj, precision=_HIGHEST)
        else:  # attend: P_j = g_jᵀ q_j (V×D), its rows ids_i
            cols = jnp.take_along_axis(gj, ids_i[:, None, :], axis=2)  # (b, S_j, T_i)
            q = jnp.einsum("bst,bsd->btd", cols, _f32(x_j).reshape(b, -1, x_j.shape[-1]),
                           precision=_HIGHEST)
        return q.reshape(link_shape)
    xi = _f32(x_i).reshape(b, -1, x_i.shape[-1])
    if uj == "lookup":  # attend after a lookup: q_i P_jᵀ with P_j the rows of g_j at ids_j
        m = jnp.einsum("bsd,btd->bst", xi, gj, precision=_HIGHEST)
        ids_j = x_j.reshape(b, -1)
        q = jax.vmap(lambda m_n, ids_n: jnp.zeros((m_n.shape[0], out), jnp.float32)
                     .at[:, ids_n].add(m_n))(m, ids_j)
        return q.reshape(link_shape)
    # dense / attend after dense / attend: x_i (x_jᵀ g_j) (+ Σₜ g_j for a bias)
    xj = _f32(x_j).reshape(b, -1, x_j.shape[-1])
    gram = jnp.einsum("bsd,btd->bst", xi, xj, precision=_HIGHEST)
    q = jnp.einsum("bst,bte->bse", gram, gj, precision=_HIGHEST)
    if getattr(later, "has_bias", False):
        q = q + jnp.sum(gj, axis=1, keepdims=True)
    return q.reshape(link_shape)


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jnp.zeros_like(a)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class _SharedBox:
    rule: Any  # this call's rule
    earlier_rules: tuple  # the rules of the unit's earlier calls
    link_shapes: tuple  # the output shapes of the earlier calls (their links)
    has_link: bool  # whether a later call follows (this call outputs a link)


@jax.custom_vjp
def _shared(box, y, x, sink, aux, earlier_x, earlier_links):
    del x, sink, aux, earlier_x, earlier_links
    return y, (jnp.zeros(y.shape, jnp.float32) if box.has_link else None)


def _shared_fwd(box, y, x, sink, aux, earlier_x, earlier_links):
    del sink, earlier_links
    link = jnp.zeros(y.shape, jnp.float32) if box.has_link else None
    return (y, link), (box, x, aux, earlier_x)


def _shared_bwd(res, cotangents):
    box, x, aux, earlier_x = res
    g, g_link = cotangents
    sq = box.rule.sq_norms(x, g, aux)
    if g_link is not None:  # 2⟨gⱼ, Σ_{k>j} Jⱼ Pₖ⟩: the cross terms with the later calls
        sq = sq + 2.0 * jnp.sum((_f32(g) * g_link).reshape(g.shape[0], -1), axis=1)
    links = tuple(link_cotangent(r, xi, box.rule, x, g, s)
                  for r, xi, s in zip(box.earlier_rules, earlier_x, box.link_shapes))
    return (None, g, _zero_cotangent(x), sq, jax.tree.map(jnp.zeros_like, aux),
            jax.tree.map(_zero_cotangent, earlier_x), links)


_shared.defvjp(_shared_fwd, _shared_bwd)


def shared_tap(rule, earlier: list, y, x, sink, aux, *, last: bool):
    """Tap one call of a unit called several times. ``earlier``: ``[(rule, x, link)]`` of the
    unit's earlier calls; returns ``(y, link)`` (link None for the ``last`` call)."""
    box = _SharedBox(rule=rule, earlier_rules=tuple(r for r, _, _ in earlier),
                     link_shapes=tuple(tuple(l.shape) for _, _, l in earlier), has_link=not last)
    return _shared(box, y, x, sink, aux, tuple(xi for _, xi, _ in earlier),
                   tuple(l for _, _, l in earlier))


def call_spec(plan: Mapping[str, tuple[CallSpec, ...]], path: str, index: int,
              method: str) -> CallSpec:
    """The plan's spec of call ``index`` of unit ``path`` (``ValueError`` if the trace differs)."""
    specs = plan.get(path, ())
    if index >= len(specs) or specs[index].method != method:
        raise ValueError(f"site unit {path!r} is called differently than when profile traced it "
                         f"(call {index + 1} through {method!r}; traced "
                         f"{[s.method for s in specs]}): the forward pass must not depend on the "
                         "batch's values")
    return specs[index]
