"""Per-example squared gradient norms of every parameter unit, from one backward pass.

Method
------
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
* einsum (Einsum with its own equation): the input and output gradient laid out by the equation
  as the dense rule's Xₙ and Gₙ, wherever the example axis sits in the output (a fused
  ``"BSD,CDKH->CBSKH"`` puts it second); a kernel axis shared by input and output squares the
  per-example kernel gradients instead;
* anything else (norms, convs, user modules): a *local* ``vmap`` over examples of the unit's own
  VJP — only that unit's per-example gradients exist, never the whole model's.

Per-site figures sum the units under the site: squared norms add over disjoint parameter sets, so
an attention or block site is exact too. A unit's input has the example axis first, or none (a
broadcast input such as ``self.pos(jnp.arange(T))``); a unit may be called several times per forward
pass when its calls' cross terms are known (tied embeddings: ``embed(ids)`` and ``embed.attend(h)``;
a reused dense layer), else it is refused. Both are :mod:`layerlens_jax._src.unit_calls`.

This module holds the rules, the tap, and the two ways of putting taps into a model:
:func:`tap_nnx` (module surgery on a merged copy) and :func:`tap_linen`
(``nn.intercept_methods``). The driver that accumulates the figures is
:mod:`layerlens_jax._src.profile`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from layerlens_jax._src.einsum import per_example_operands
from layerlens_jax._src.sites import (Site, flatten_paths, get_submodule, join_path,
                                      set_submodule)
from layerlens_jax._src.stacked import (StackedTap, expand_leaf_paths, find_stacks, layer_paths,
                                        leaf_squares_fn)
from layerlens_jax._src.unit_calls import CallProbe, apply_layout, call_spec, shared_tap

__all__ = ["DEFAULT_TAP_PRECISION", "TAP_PRECISIONS", "AttendRule", "DenseRule", "EinsumRule",
           "EmbedRule", "LocalVJPRule", "TappedModel", "is_under", "tap_linen",
           "tap_nnx"]

def _to_bfloat16(a):
    return a.astype(jnp.bfloat16)


def _unchanged(a):
    return a


#: Precision of the taps' dense products: ``name -> (operand cast, lax precision)`` (float32
#: accumulation always). JAX's meaning per backend: "highest" exact float32 everywhere; "high"
#: TF32 on NVIDIA GPUs, three bf16 passes on TPU, exact on CPU; "default" the backend's fastest
#: float32 product (one bf16 pass on TPU; TF32 or exact on GPU; exact on CPU); "bfloat16" bf16
#: operands on every backend (fastest, about 1e-3 relative error: above the bound, an option).
TAP_PRECISIONS: dict[str, tuple[Callable, Any]] = {
    "highest": (_unchanged, jax.lax.Precision.HIGHEST),
    "high": (_unchanged, jax.lax.Precision.HIGH),
    "default": (_unchanged, jax.lax.Precision.DEFAULT),
    "bfloat16": (_to_bfloat16, jax.lax.Precision.DEFAULT),
}
#: The default: the fastest mode within 1e-3 relative of the exact Fisher traces on every backend
#: (TF32 on GPU; tests/test_profile_precision.py emulates TF32 rounding on CPU to check the bound).
DEFAULT_TAP_PRECISION = "high"


def check_tap_precision(precision: str) -> str:
    """``precision`` if it names a row of :data:`TAP_PRECISIONS`, else ``ValueError``."""
    if precision not in TAP_PRECISIONS:
        raise ValueError(f"profile precision must be one of {sorted(TAP_PRECISIONS)}, "
                         f"got {precision!r}")
    return precision


# ------------------------------------------------------------------------------ per-unit rules


def _as_f32(a):
    return a.astype(jnp.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class DenseRule:
    """Ghost norm of a dense unit: Gram or outer-product form, whichever is cheaper."""

    d_in: int  # input features (product of the contracted kernel axes)
    d_out: int  # output features (product of the remaining kernel axes)
    has_bias: bool  # the unit owns a bias, which adds ‖Σₜ gₜ‖²
    precision: str = DEFAULT_TAP_PRECISION  # a key of TAP_PRECISIONS (the products' precision)
    # how the call uses the parameters, for the cross terms of a shared unit (unit_calls)
    table_use = "product"

    def sq_norms(self, x, g, aux):
        """(B,) squared norms of the per-example kernel (and bias) gradients."""
        del aux
        b = x.shape[0]
        xs = _as_f32(x).reshape(b, -1, self.d_in)
        gs = _as_f32(g).reshape(b, -1, self.d_out)
        t = xs.shape[1]
        cast, precision = TAP_PRECISIONS[self.precision]
        xo, go = cast(xs), cast(gs)

        def product(spec, a, c):
            return jnp.einsum(spec, a, c, precision=precision,
                              preferred_element_type=jnp.float32)

        if t * (self.d_in + self.d_out) <= self.d_in * self.d_out:
            xx = product("btd,bsd->bts", xo, xo)
            gg = product("bte,bse->bts", go, go)
            sq = jnp.sum(xx * gg, axis=(1, 2))
        else:
            w = product("btd,bte->bde", xo, go)
            sq = jnp.sum(w * w, axis=(1, 2))
        if self.has_bias:
            sq = sq + jnp.sum(jnp.sum(gs, axis=1) ** 2, axis=-1)
        return sq


@dataclasses.dataclass(frozen=True, eq=False, kw_only=True)
class EinsumRule:
    """Einsum unit (the example axis anywhere in the output, e.g. a fused ``"BSD,CDKH->CBSKH"``):
    its operands laid out by :func:`~layerlens_jax._src.einsum.per_example_operands`, then the
    dense rule; a batched kernel squares the per-example kernel gradients directly."""

    equation: str  # the module's einsum equation
    has_bias: bool  # the unit owns a bias (Flax's layout: the kernel's output axes)
    precision: str = DEFAULT_TAP_PRECISION  # of the dense rule's products
    table_use = None  # no cross terms: an einsum unit may be called once per pass

    def sq_norms(self, x, g, aux):
        """(B,) squared norms of the per-example kernel (and bias) gradients."""
        del aux
        ops = per_example_operands(self.equation, _as_f32(x), _as_f32(g))
        if ops.kernel_grads is not None:
            sq = jnp.sum(ops.kernel_grads.reshape(x.shape[0], -1) ** 2, axis=1)
        else:
            sq = DenseRule(d_in=ops.d_in, d_out=ops.d_out, has_bias=False,
                           precision=self.precision).sq_norms(ops.xs, ops.gs, None)
        if self.has_bias:
            sq = sq + jnp.sum(ops.bias_grads.reshape(x.shape[0], -1) ** 2, axis=1)
        return sq


@dataclasses.dataclass(frozen=True, eq=False)
class EmbedRule:
    """Embedding table: segment-sum the output gradients of equal ids, then square."""

    table_use = "lookup"  # the call gathers rows of the table (unit_calls)

    def sq_norms(self, ids, g, aux):
        """(B,) squared norms of the per-example embedding-table gradients."""
        del aux
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
class AttendRule(DenseRule):
    """``Embed.attend(q) = q Eᵀ``: the dense rule with the table as a transposed kernel
    (``d_in`` the width, ``d_out`` the vocabulary, no bias)."""

    table_use = "attend"


@dataclasses.dataclass(frozen=True, eq=False)
class LocalVJPRule:
    """Per-example VJP of the unit's own parameters, vmapped over examples (exact, local)."""

    apply: Callable[[Any, jax.Array], jax.Array]  # (own params, x with batch 1) -> y with batch 1
    table_use = None  # no cross terms: a unit with this rule may be called once per pass

    def sq_norms(self, x, g, own_params):
        """(B,) squared norms of the per-example gradients of ``own_params``."""
        def one(x_n, g_n):
            _, vjp = jax.vjp(lambda p: self.apply(p, x_n[None]), own_params)
            out_dtype = jax.eval_shape(lambda: self.apply(own_params, x_n[None])).dtype
            (gp,) = vjp(g_n[None].astype(out_dtype))
            return sum(jnp.sum(_as_f32(l) ** 2) for l in jax.tree.leaves(gp))

        return jax.vmap(one)(x, g)


# ------------------------------------------------------------------------------------ the tap


def _zero_cotangent(a):
    if jnp.issubdtype(a.dtype, jnp.integer) or a.dtype == jnp.bool_:
        return np.zeros(a.shape, dtype=jax.dtypes.float0)
    return jnp.zeros_like(a)


@jax.custom_vjp
def _tap(rule_box, y, x, sink, aux):
    del rule_box, x, sink, aux
    return y


def _tap_fwd(rule_box, y, x, sink, aux):
    return y, (rule_box, x, aux)


def _tap_bwd(res, g):
    rule_box, x, aux = res
    sq = rule_box.rule.sq_norms(x, g, aux)
    return (None, g, _zero_cotangent(x), sq, jax.tree.map(jnp.zeros_like, aux))


_tap.defvjp(_tap_fwd, _tap_bwd)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class _RuleBox:
    rule: Any  # a rule object, carried as a static (non-array) argument of the tap


# ------------------------------------------------------------------------------------ units


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Unit:
    path: str  # the unit's module path
    rule: Any  # DenseRule / EmbedRule / LocalVJPRule
    param_paths: tuple[str, ...]  # absolute paths of the unit's own parameters


class _TapContext:
    """Per-trace state: sinks, own params of local-VJP units, the call plan (or a probe recording
    the calls), the earlier calls of shared units, the batch size."""

    def __init__(self, units: Mapping[str, _Unit], sinks, own_params, batch_size: int, plan,
                 precision: str = DEFAULT_TAP_PRECISION):
        self.units, self.sinks, self.own_params = units, sinks, own_params
        self.batch_size, self.plan, self.precision = batch_size, plan, precision
        self.calls: dict[str, int] = {}
        self.earlier: dict[str, list] = {}  # path -> [(rule, x, link)] of a shared unit's calls

    def rule_for(self, path: str, method: str, y, x):
        """The rule of one call: the unit's own, or :class:`AttendRule` for ``Embed.attend``."""
        if method == "attend":
            return AttendRule(d_in=int(x.shape[-1]), d_out=int(y.shape[-1]), has_bias=False,
                              precision=self.precision)
        return self.units[path].rule

    def tap(self, path: str, y, x, method: str = "__call__"):
        index = self.calls.get(path, 0)
        self.calls[path] = index + 1
        if isinstance(self.plan, CallProbe):
            self.plan.record(path, method, x, y)
            return y
        specs = self.plan.get(path, ())
        x, y = apply_layout(call_spec(self.plan, path, index, method), path, x, y,
                            self.batch_size)
        rule = self.rule_for(path, method, y, x)
        aux = self.own_params.get(path, ())
        if len(specs) == 1:
            return _tap(_RuleBox(rule), y, x, self.sinks[path], aux)
        earlier = self.earlier.setdefault(path, [])
        y, link = shared_tap(rule, earlier, y, x, self.sinks[path], aux,
                             last=index == len(specs) - 1)
        earlier.append((rule, x, link))
        return y

    def tap_with(self, path: str, rule, y, x, sink, aux):
        """The tap of one layer of the stacked unit ``path`` (inside the scan body, traced once),
        with the rule, sink slice and own parameters of that layer. Stacked units are neither
        shared nor broadcast: their input must carry the example axis."""
        if isinstance(self.plan, CallProbe):  # the call-planning trace: nothing to plan here
            return y
        self.calls[path] = self.calls.get(path, 0) + 1
        if self.calls[path] > 1:
            raise NotImplementedError(
                f"stacked unit {path!r} is called more than once per layer (weight sharing inside "
                f"a scan body is not supported); exclude it from the sites")
        if not hasattr(x, "shape") or x.ndim == 0 or x.shape[0] != self.batch_size:
            raise ValueError(
                f"stacked unit {path!r} sees an input of shape {getattr(x, 'shape', None)} whose "
                f"leading axis is not the example axis (batch {self.batch_size})")
        return _tap(_RuleBox(rule), y, x, sink, aux)


class _NNXTap:
    """Stands in for a parameter unit of an NNX model inside the traced function."""

    def __init__(self, inner, path: str, ctx: _TapContext):
        self._inner, self._path, self._ctx = inner, path, ctx

    def __call__(self, x, *args, **kwargs):
        if args or any(v is not None for v in kwargs.values()):
            if not isinstance(self._ctx.units[self._path].rule, (DenseRule, EmbedRule)):
                raise NotImplementedError(f"site unit {self._path!r} is called with extra arguments; "
                                          "only single-input units are supported")
        return self._ctx.tap(self._path, self._inner(x, *args, **kwargs), x)

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if name == "attend" and isinstance(self._inner, nnx.Embed):  # a tied output layer
            return lambda query, **kw: self._ctx.tap(self._path, value(query, **kw), query,
                                                     "attend")
        if callable(value) and not isinstance(value, (nnx.Variable, nnx.Module)):
            raise NotImplementedError(f"site unit {self._path!r} is used through method {name!r}; "
                                      "only __call__ is supported for per-example statistics")
        return value


def is_under(path: str, site_path: str) -> bool:
    """Whether module ``path`` is the site ``site_path`` or lies below it."""
    return path == site_path or path.startswith(site_path + "/")


def _child(path: str, name: str) -> str:
    return f"{path}/{name}" if path else name


def _trailing(axis) -> bool:
    axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    return all(a < 0 for a in axis) and tuple(sorted(axis)) == tuple(range(-len(axis), 0))


def _batch_size_of(sinks) -> int:
    return next(iter(sinks.values())).shape[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TappedModel:
    """A model split for profiling, with a forward pass that runs every unit through its tap."""

    # forward_losses(params, rest, sinks, batch, key, loss_fn, plan) -> per-example losses; the
    # gradient with respect to ``sinks`` ({unit path: zeros (B,)}) is the per-example squared
    # norms; ``plan``: {unit path: CallSpec per call} (unit_calls.plan_calls), or a CallProbe
    forward_losses: Callable[..., jax.Array]
    unit_paths: tuple[str, ...]  # sorted paths of the parameter units (one sink each)
    param_paths: tuple[str, ...]  # parameter leaf paths, in tree-flattening order of ``params``
    params: Any  # the parameters (differentiated)
    rest: Any  # every other variable (held fixed)
    # tree -> squared norm per entry of ``param_paths`` (a stacked leaf: one per layer slice);
    # None: one per leaf
    leaf_squares: Callable[[Any], jax.Array] | None = None
    # unit path -> its rule (for Linen, known once a forward pass has been traced)
    rule_of: Callable[[str], Any] = lambda path: None


# ------------------------------------------------------------------------------------ NNX


def _own_param_names_nnx(module) -> list[str]:
    return sorted(k for k, v in vars(module).items() if isinstance(v, nnx.Param))


def _own_state_nnx(module):
    return {k: getattr(module, k).value for k in _own_param_names_nnx(module)}


def _rule_for_nnx(module, own, precision: str = DEFAULT_TAP_PRECISION) -> Any:
    shapes = {k: tuple(getattr(module, k).value.shape) for k in own}
    if isinstance(module, (nnx.Linear, nnx.LinearGeneral)) and set(own) <= {"kernel", "bias"} \
            and "kernel" in own:
        k = shapes["kernel"]
        n_in = 1 if isinstance(module, nnx.Linear) else len(module.axis)
        if isinstance(module, nnx.Linear) or (_trailing(module.axis) and not module.batch_axis):
            return DenseRule(d_in=math.prod(k[:n_in]), d_out=math.prod(k[n_in:]),
                             has_bias="bias" in own, precision=precision)
    if isinstance(module, nnx.Embed) and own == ["embedding"]:
        return EmbedRule()
    if isinstance(module, nnx.Einsum) and _einsum_owns(module.einsum_str, own, shapes):
        return EinsumRule(equation=module.einsum_str, has_bias="bias" in own, precision=precision)
    graphdef, _, rest = nnx.split(module, lambda p, v: isinstance(v, nnx.Param) and len(p) == 1
                                  and p[0] in own, ...)

    def apply(own_params, x):
        return nnx.merge(graphdef, own_params, rest)(x)

    return LocalVJPRule(apply)


def _einsum_owns(equation, own, shapes) -> bool:
    """An einsum unit the einsum rule covers: its own equation, a kernel of that many axes (not a
    stacked one) and at most a bias besides."""
    if not equation or "kernel" not in own or not set(own) <= {"kernel", "bias"}:
        return False
    kernel_spec = equation.replace(" ", "").split("->")[0].split(",")[-1]
    return len(kernel_spec) == len(shapes["kernel"])


def _nnx_units(model: nnx.Module, sites: list[Site], precision: str,
               stacks: Mapping[str, int]) -> dict[str, _Unit]:
    """The parameter units under ``sites``; a stacked unit (rule None: chosen per layer, inside
    the scan) is kept when one of its per-layer paths lies under a site."""
    units = {}
    for parts, module in nnx.iter_modules(model):
        path = join_path(parts)
        own = _own_param_names_nnx(module)
        per_layer = layer_paths(path, stacks)
        if not own or not any(is_under(q, s.path) for q in per_layer for s in sites):
            continue
        rule = None if per_layer != [path] else _rule_for_nnx(module, own, precision)
        units[path] = _Unit(path=path, rule=rule, param_paths=tuple(_child(path, k) for k in own))
    return units


def _stacked_tap(ctx: _TapContext, path: str, precision: str):
    """The per-layer tap of the stacked unit ``path`` (see :class:`StackedTap`): its rule and own
    parameters are read from the layer slice the scan passes in."""
    def tap(inner, x, y, sink, extra):
        own = _own_param_names_nnx(inner)
        rule = _rule_for_nnx(inner, own, precision)
        if extra and not isinstance(rule, (DenseRule, EmbedRule)):
            raise NotImplementedError(f"site unit {path!r} is called with extra arguments; only "
                                      "single-input units are supported")
        if tuple(sink.shape) != (ctx.batch_size,):
            raise ValueError(f"stacked unit {path!r} received its per-layer sink with shape "
                             f"{tuple(sink.shape)}, not ({ctx.batch_size},): the model must run the "
                             f"stack through nnx.scan (or a loop) slicing every variable of the "
                             f"layer along axis 0")
        aux = _own_state_nnx(inner) if isinstance(rule, LocalVJPRule) else ()
        return ctx.tap_with(path, rule, y, x, sink, aux)

    return tap


def tap_nnx(model: nnx.Module, sites: list[Site], *,
            precision: str = DEFAULT_TAP_PRECISION) -> TappedModel:
    """Split an NNX model; its forward pass swaps every unit under ``sites`` for a tap
    (``precision``: of the dense taps' products, a key of :data:`TAP_PRECISIONS`)."""
    stacks = find_stacks(model)
    units = _nnx_units(model, sites, check_tap_precision(precision), stacks)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    param_paths = tuple(flatten_paths(params.to_pure_dict()).keys())
    layer_param_paths, layer_counts = expand_leaf_paths(param_paths, stacks)
    sink_paths = {path: layer_paths(path, stacks) for path in units}
    covered = {p for u in units.values() for p in u.param_paths}
    uncovered = [p for p in param_paths if p not in covered and
                 any(is_under(p.rpartition("/")[0], s.path) for s in sites)]
    if uncovered:
        raise NotImplementedError(f"parameters {uncovered[:3]} under a site are not owned by a "
                                  "module the profiler can tap")

    def forward_losses(params, rest, sinks, batch, key, fn, plan):
        m = nnx.merge(graphdef, params, rest, copy=True)
        own = {path: _own_state_nnx(get_submodule(m, path)) for path, unit in units.items()
               if isinstance(unit.rule, LocalVJPRule)}
        ctx = _TapContext(units, sinks, own, _batch_size_of(sinks), plan, precision)
        for path in sorted(units, key=lambda p: -p.count("/")):
            if units[path].rule is None:  # stacked: per-layer sinks (L, B), sliced by the scan
                sink = jnp.stack([sinks[q] for q in sink_paths[path]])
                set_submodule(m, path, StackedTap(get_submodule(m, path), sink,
                                                  _stacked_tap(ctx, path, precision)))
            elif path:
                set_submodule(m, path, _NNXTap(get_submodule(m, path), path, ctx))
        return fn(m, batch) if key is None else fn(m, batch, key)

    return TappedModel(forward_losses=forward_losses,
                       unit_paths=tuple(sorted(q for qs in sink_paths.values() for q in qs)),
                       param_paths=layer_param_paths, params=params, rest=rest,
                       leaf_squares=leaf_squares_fn(layer_counts),
                       rule_of=lambda path: units[path].rule)


# ---------------------------------------------------------------------------------- Linen


def _subtree(tree, path):
    for part in path.split("/") if path else []:
        tree = tree[part]
    return tree


def _rule_for_linen(mod: nn.Module, own: list[str], sub: Mapping,
                    precision: str = DEFAULT_TAP_PRECISION) -> Any:
    """The rule of a bound Linen unit owning parameters ``own`` within its subtree ``sub``."""
    if isinstance(mod, nn.Dense) and set(own) <= {"kernel", "bias"}:
        k = sub["kernel"].shape
        return DenseRule(d_in=k[0], d_out=k[1], has_bias="bias" in own, precision=precision)
    if isinstance(mod, nn.DenseGeneral) and set(own) <= {"kernel", "bias"} \
            and _trailing(mod.axis) and not mod.batch_dims:
        k = sub["kernel"].shape
        n_in = len(mod.axis) if isinstance(mod.axis, (tuple, list)) else 1
        return DenseRule(d_in=math.prod(k[:n_in]), d_out=math.prod(k[n_in:]),
                         has_bias="bias" in own, precision=precision)
    if isinstance(mod, nn.Embed) and own == ["embedding"]:
        return EmbedRule()
    if isinstance(mod, nn.Einsum) and _einsum_owns(mod.einsum_str, own,
                                                   {k: sub[k].shape for k in own}):
        return EinsumRule(equation=mod.einsum_str, has_bias="bias" in own, precision=precision)
    clone = mod.clone(parent=None)
    children = {k: v for k, v in sub.items() if k not in own}

    def apply(own_params, x):
        return clone.apply({"params": {**children, **own_params}}, x)

    return LocalVJPRule(apply)


def _refuse_linen_stack(mod: nn.Module, path: str, params0: Mapping, sites: list[Site]) -> None:
    """``ValueError`` naming the site when unit ``path`` runs inside ``nn.scan`` / ``nn.vmap``: its
    stored parameters carry a layer axis the module does not see (not supported for Linen)."""
    seen = mod.variables.get("params", {})
    stored = _subtree(params0, path)
    for name, value in seen.items():
        if name in stored and not isinstance(value, Mapping) and \
                tuple(np.shape(stored[name])) != tuple(np.shape(value)):
            site = next((s.path for s in sites if is_under(path, s.path)), path)
            raise ValueError(f"site {site!r}: unit {path!r} runs inside a Linen nn.scan / nn.vmap "
                             f"(stored {name} {tuple(np.shape(stored[name]))}, one layer sees "
                             f"{tuple(np.shape(value))}); stacked Linen layers are not supported by "
                             f"profile: build the stack with nnx.vmap + nnx.scan, or unroll it")


def tap_linen(module: nn.Module, variables: Mapping, sites: list[Site], *,
              precision: str = DEFAULT_TAP_PRECISION) -> TappedModel:
    """Split Linen variables; the forward pass taps every unit under ``sites`` by interception
    (``precision`` as for :func:`tap_nnx`).

    Units are the modules owning parameter leaves directly; their rules are chosen on first call
    (Linen binds submodules only then). A unit never called through ``__call__`` is an error.
    """
    check_tap_precision(precision)
    params0 = variables["params"]
    rest0 = {k: v for k, v in variables.items() if k != "params"}
    param_paths = tuple(flatten_paths(params0).keys())
    owners: dict[str, list[str]] = {}
    for p in param_paths:
        owner, _, name = p.rpartition("/")
        if any(is_under(owner, s.path) for s in sites):
            owners.setdefault(owner, []).append(name)
    units: dict[str, _Unit] = {}
    unit_paths = tuple(sorted(owners))

    def rule_for(mod, path):
        if path not in units:
            own = sorted(owners[path])
            rule = _rule_for_linen(mod, own, _subtree(params0, path), precision)
            units[path] = _Unit(path=path, rule=rule,
                                param_paths=tuple(_child(path, k) for k in own))
        return units[path].rule

    def forward_losses(params, rest, sinks, batch, key, fn, plan):
        variables = {**rest, "params": params}
        ctx = _TapContext(units, sinks, {}, _batch_size_of(sinks), plan, precision)

        def interceptor(next_fun, args, kwargs, c):
            out = next_fun(*args, **kwargs)
            method = c.method_name
            if method != "__call__" and not (method == "attend" and isinstance(c.module, nn.Embed)):
                return out
            path = join_path(c.module.scope.path)
            if path in owners and args:
                _refuse_linen_stack(c.module, path, params0, sites)
                if isinstance(rule_for(c.module, path), LocalVJPRule):
                    sub = c.module.variables.get("params", {})
                    ctx.own_params[path] = {k: sub[k] for k in owners[path]}
                out = ctx.tap(path, out, args[0], method)
            return out

        with nn.intercept_methods(interceptor):
            losses = fn(variables, batch) if key is None else fn(variables, batch, key)
        missing = [u for u in unit_paths if u not in ctx.calls]
        if missing:
            raise ValueError(f"parameter units {missing[:3]} were never called (__call__ or attend) "
                             "during the loss: their statistics cannot be computed")
        return losses

    return TappedModel(forward_losses=forward_losses, unit_paths=unit_paths,
                       param_paths=param_paths, params=params0, rest=rest0,
                       rule_of=lambda path: units[path].rule)
