"""Sites: the adaptable units of a model, discovered from the model itself.

A *site* is a module named by its path in the module tree (``encoder/layers_3/attention/mha/query``)
with a *kind*:

=============  ===================================================================================
``linear``     Linear / Dense, LinearGeneral / DenseGeneral, Einsum (LoRA attaches here)
``attention``  a multi-head attention module (prefix tuning attaches here)
``block``      a residual sub-layer whose output an adapter may transform (bottleneck adapters)
``embedding``  Embed
``norm``       LayerNorm / RMSNorm / GroupNorm
``conv``       Conv
=============  ===================================================================================

Kinds come from, in order: a class attribute ``__layerlens_kind__ = "block"`` on the user's module
(a protocol any module can opt into), then :func:`register_site_kind` registrations, then the
built-in Flax types, most specific class first. Paths join the attribute / Linen scope names with
``/``; lists (``nnx.List``) contribute their integer index.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
from flax import linen as nn
from flax import nnx

from layerlens_jax._src.einsum import einsum_layout
from layerlens_jax._src.kinds import KINDS  # the site kinds, in the order of the table above
from layerlens_jax._src.stacked import find_stacks, layer_path, stack_root

__all__ = [
    "KINDS",
    "Site",
    "discover_sites",
    "register_site_kind",
    "site_kind_of",
    "get_submodule",
    "set_submodule",
    "join_path",
    "flatten_paths",
]


_BUILTIN_KINDS: list[tuple[type, str]] = [
    (nnx.MultiHeadAttention, "attention"),
    (nnx.Linear, "linear"),
    (nnx.LinearGeneral, "linear"),
    (nnx.Einsum, "linear"),
    (nnx.Embed, "embedding"),
    (nnx.LayerNorm, "norm"),
    (nnx.RMSNorm, "norm"),
    (nnx.GroupNorm, "norm"),
    (nnx.Conv, "conv"),
    (nn.MultiHeadDotProductAttention, "attention"),
    (nn.Dense, "linear"),
    (nn.DenseGeneral, "linear"),
    (nn.Einsum, "linear"),
    (nn.Embed, "embedding"),
    (nn.LayerNorm, "norm"),
    (nn.RMSNorm, "norm"),
    (nn.GroupNorm, "norm"),
    (nn.Conv, "conv"),
]
_USER_KINDS: dict[type, str] = {}


def register_site_kind(module_type: type, kind: str) -> None:
    """Declare that instances of ``module_type`` (NNX or Linen) are sites of ``kind``.

    Overrides the built-in mapping for that type and its subclasses; no library code is edited.
    """
    if not isinstance(module_type, type):
        raise TypeError(f"register_site_kind expects a class, got {module_type!r}")
    if kind not in KINDS:
        raise ValueError(f"unknown site kind {kind!r} for {module_type.__name__}; "
                         f"expected one of {KINDS}")
    _USER_KINDS[module_type] = kind


def site_kind_of(module_or_type: Any) -> str | None:
    """The site kind of a module (instance or class), or None when it is not a site."""
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    declared = getattr(cls, "__layerlens_kind__", None)
    if declared is not None:
        if declared not in KINDS:
            raise ValueError(f"{cls.__name__}.__layerlens_kind__ = {declared!r} is not one of {KINDS}")
        return declared
    for klass in cls.__mro__:  # most specific registration wins
        if klass in _USER_KINDS:
            return _USER_KINDS[klass]
    for klass in cls.__mro__:
        for builtin, kind in _BUILTIN_KINDS:
            if klass is builtin:
                return kind
    return None


def join_path(parts: Iterable[Any]) -> str:
    """Join module-path parts (names or list indices) with ``/``."""
    return "/".join(str(p) for p in parts)


@dataclasses.dataclass(frozen=True)
class Site:
    """One adaptable unit. Static metadata only (no arrays): safe as a jit-static value.

    Attributes:
      path: ``/``-joined module path.
      kind: one of :data:`KINDS`.
      module_type: class name of the module.
      param_shapes: parameter path *relative to the site* -> shape, for every parameter under it.
      num_params: total parameters under the site.
      in_features / out_features: feature sizes of the site's input and output (for an embedding:
        vocabulary size and embedding width; for attention: model width in and out; for an
        einsum: the products of the kernel axes it contracts and of those it outputs). None where
        unknown (a block discovered without example inputs).
      num_heads / head_dim: for attention sites.
      tokens_per_example: positions per example in the site's input (sequence length), when
        discovered with example inputs.
      stacked_module: for one layer of a stack built with ``nnx.vmap`` (path ``layers/3/fc1``), the
        path of the stacked module (``layers/fc1``) whose parameters carry the layer axis; else None.
      build_refusals: ``((method, reason), ...)``: methods of the site's kind that ``apply_plan``
        cannot build on its module (found at discovery by the checks ``apply_plan`` runs);
        ``allocate`` refuses them. Empty for hand-made sites.
      attend_tokens: for an embedding also used as the output layer (``embed.attend(h)``, tied
        weights), the positions per example of that use (its LoRA costs FLOPs there too); None
        when not seen so (discovered without example inputs, or untied).
    """

    path: str
    kind: str
    module_type: str
    param_shapes: Mapping[str, tuple[int, ...]]
    num_params: int
    in_features: int | None = None
    out_features: int | None = None
    num_heads: int | None = None
    head_dim: int | None = None
    tokens_per_example: int | None = None
    stacked_module: str | None = None  # for one layer of an nnx.vmap stack: the stacked module
    build_refusals: tuple[tuple[str, str], ...] = ()
    attend_tokens: int | None = None  # positions per example of an Embed.attend use (tied)

    def __post_init__(self):  # JSON gives lists: keep the record hashable
        object.__setattr__(self, "build_refusals",
                           tuple((str(m), str(r)) for m, r in self.build_refusals))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (parameter shapes as lists)."""
        d = dataclasses.asdict(self)
        d["param_shapes"] = {k: list(v) for k, v in self.param_shapes.items()}
        return d


# ---------------------------------------------------------------------------- NNX path helpers


def get_submodule(model: nnx.Module, path: str) -> Any:
    """The submodule of an NNX model at ``path`` (attribute names or list indices)."""
    node = model
    for part in path.split("/") if path else []:
        node = node[int(part)] if isinstance(node, (nnx.List, list, tuple)) else getattr(node, part)
    return node


def set_submodule(model: nnx.Module, path: str, value: Any) -> None:
    """Replace the submodule at ``path`` (attribute or list index) with ``value``, in place."""
    if not path:
        raise ValueError("cannot replace the root module")
    parent_path, _, leaf = path.rpartition("/")
    parent = get_submodule(model, parent_path)
    if isinstance(parent, (nnx.List, list)):
        parent[int(leaf)] = value
    else:
        setattr(parent, leaf, value)


# -------------------------------------------------------------------------------- discovery


def flatten_paths(tree: Any) -> dict[str, Any]:
    """``{"a/b/c": leaf}`` for a pytree of dicts / lists / dataclasses (``/``-joined key paths)."""
    out = {}
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        out[join_path(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
                      for k in keypath)] = leaf
    return out


def _shape_dict(tree: Any) -> dict[str, tuple[int, ...]]:
    return {k: tuple(int(s) for s in np.shape(v)) for k, v in flatten_paths(tree).items()}


def _features_from_params(kind: str, module: Any, shapes: Mapping[str, tuple[int, ...]]):
    """(in_features, out_features, num_heads, head_dim) read from a module's own attributes."""
    nh = hd = None
    fin = fout = None
    if kind == "attention":
        nh = getattr(module, "num_heads", None)
        fin = getattr(module, "in_features", None)
        qkv = getattr(module, "qkv_features", None)
        fout = getattr(module, "out_features", None) or fin
        if nh and qkv:
            hd = qkv // nh
        q = shapes.get("query/kernel")
        if q is not None and len(q) == 3:
            fin, nh, hd = q
        o = shapes.get("out/kernel")
        if o is not None and len(o) == 3:
            fout = o[-1]
    elif kind in ("linear", "conv") and "kernel" in shapes:
        k = shapes["kernel"]
        if kind == "conv":
            fin, fout = math.prod(k[:-1]), k[-1]
        else:
            axis = getattr(module, "axis", (-1,))
            n_in = len(axis) if isinstance(axis, tuple) else 1
            if isinstance(module, (nnx.Einsum, nn.Einsum)):
                return (*_einsum_features(module, k), nh, hd)
            fin, fout = math.prod(k[:n_in]), math.prod(k[n_in:])
    elif kind == "embedding" and "embedding" in shapes:
        fin, fout = shapes["embedding"]
    elif kind == "norm":
        size = next(iter(shapes.values()), (None,))
        fin = fout = size[-1] if size else None
    return fin, fout, nh, hd


def _einsum_features(module: Any, kernel: tuple[int, ...]) -> tuple[int | None, int | None]:
    """(contracted, output) sizes of an einsum kernel (its LoRA fan-in / fan-out; the module's own
    kernel shape, so a stacked module's layer); (None, None) when LoRA cannot factor the equation
    (the site's ``build_refusals`` say why)."""
    own = getattr(module, "kernel_shape", None) or getattr(module, "shape", None) or kernel
    try:
        layout = einsum_layout(module.einsum_str or "", own)
    except ValueError:
        return None, None
    return layout.fan_in, layout.fan_out


def _discover_nnx(model: nnx.Module, example: tuple | None) -> list[Site]:
    io_shapes = _nnx_io_shapes(model, example) if example is not None else {}
    stacks = find_stacks(model)  # layers stacked by nnx.vmap: one site per layer
    sites = []
    for parts, module in nnx.iter_modules(model):
        path = join_path(parts)
        kind = site_kind_of(module)
        if kind is None or not path:
            continue
        shapes = _shape_dict(nnx.state(module, nnx.Param).to_pure_dict())
        root = stack_root(path, stacks)
        if root is None:
            sites.append(_make_site(path, kind, module, shapes, io_shapes.get(path),
                                    _refusals(module, kind, path, "nnx")))
            continue
        per_layer = {k: v[1:] for k, v in shapes.items()}  # the layer axis removed
        sites.extend(dataclasses.replace(
            _make_site(layer_path(path, root, i), kind, module, per_layer, io_shapes.get(path)),
            stacked_module=path) for i in range(stacks[root]))
    return sites


def _refusals(module, kind, path, framework) -> tuple[tuple[str, str], ...]:
    # imported here: the peft package imports this module
    from layerlens_jax._src.peft.buildable import build_refusals
    return build_refusals(module, kind, path, framework)


def _make_site(path, kind, module, shapes, io, refusals=()) -> Site:
    fin, fout, nh, hd = _features_from_params(kind, module, shapes)
    tokens = attend_tokens = None
    if io is not None:
        in_shape, out_shape = io[:2]
        attend = io[2] if len(io) > 2 else None
        if kind == "embedding" and attend is not None and len(attend) >= 2:
            attend_tokens = math.prod(attend[1:-1])  # positions between batch and width
        if in_shape is not None and len(in_shape) >= 2:
            if kind == "embedding":
                tokens = math.prod(in_shape[1:])
            else:
                if fin is None or kind in ("block", "attention"):
                    fin = fin or in_shape[-1]
                per_example = math.prod(in_shape[1:])
                # positions = everything between the batch axis and the feature axes
                tokens = (per_example // fin if kind == "linear" and per_example % fin == 0
                          else math.prod(in_shape[1:-1]))
        if out_shape is not None and (fout is None or kind == "block"):
            fout = out_shape[-1]
        if kind == "block" and in_shape is not None:
            fin = in_shape[-1]
    return Site(path=path, kind=kind, module_type=type(module).__name__,
                param_shapes=dict(shapes), num_params=int(sum(math.prod(s) for s in shapes.values())),
                in_features=None if fin is None else int(fin),
                out_features=None if fout is None else int(fout),
                num_heads=None if nh is None else int(nh), head_dim=None if hd is None else int(hd),
                tokens_per_example=None if tokens is None else int(tokens),
                build_refusals=refusals,
                attend_tokens=None if attend_tokens is None else int(attend_tokens))


class _Record(dict):
    """The recorder's results, a static (hashed by identity) attribute of an NNX module; ``attend``:
    ``{path: query shape}`` of the first ``attend`` call of each site."""

    def __init__(self):
        super().__init__()
        self.attend: dict[str, tuple | None] = {}

    __hash__ = object.__hash__
    __eq__ = object.__eq__


class _CallRecorder(nnx.Module):
    """Stands in for a site module during an abstract trace; records, in the order the sites are
    *entered* (a block before the layers inside it), the first call's input shape and dtype and its
    output shape. An ``nnx.Module``, so it travels through ``nnx.scan`` / ``nnx.vmap``."""

    def __init__(self, inner, path, record):
        self._inner, self._path, self._record = inner, path, record

    def __call__(self, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        first = self._path not in self._record
        if first:
            self._record[self._path] = (getattr(x, "shape", None), getattr(x, "dtype", None), None)
        out = self._inner(*args, **kwargs)
        if first:
            self._record[self._path] = self._record[self._path][:2] + (getattr(out, "shape", None),)
        return out

    def __getattr__(self, name):
        inner = vars(self).get("_inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        value = getattr(inner, name)
        if name == "attend" and callable(value):  # a tied output layer: record its positions
            def attend(query, *args, **kwargs):
                self._record.attend.setdefault(self._path, getattr(query, "shape", None))
                return value(query, *args, **kwargs)
            return attend
        return value


def split_example(example) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of example inputs given as ``{"args": ..., "kwargs": ...}``, a tuple of
    positional arguments, or a single argument."""
    if isinstance(example, dict) and set(example) <= {"args", "kwargs"}:
        return tuple(example.get("args", ())), dict(example.get("kwargs", {}))
    if isinstance(example, tuple):
        return example, {}
    return (example,), {}


def trace_site_calls(model: nnx.Module, example) -> dict[str, tuple]:
    """``{site path: (input shape, input dtype, output shape)}`` of one abstract forward pass of
    ``model(*example)``, in the order the sites are entered."""
    return dict(_trace_calls(model, example))


def _trace_calls(model: nnx.Module, example) -> "_Record":
    args, kwargs = split_example(example)
    graphdef, state = nnx.split(model)
    record: dict[str, tuple] = _Record()

    def run(state, args, kwargs):
        m = nnx.merge(graphdef, state)
        paths = [join_path(p) for p, mod in nnx.iter_modules(m) if p and site_kind_of(mod)]
        for path in sorted(paths, key=lambda p: -p.count("/")):
            set_submodule(m, path, _CallRecorder(get_submodule(m, path), path, record))
        return m(*args, **kwargs)

    jax.eval_shape(run, state, args, kwargs)
    return record


def _nnx_io_shapes(model: nnx.Module, example) -> dict[str, tuple]:
    """``{path: (input shape, output shape, attend query shape or None)}``."""
    record = _trace_calls(model, example)
    return {p: (ins, outs, record.attend.get(p)) for p, (ins, _, outs) in record.items()}


def _discover_linen(module: nn.Module, variables: Mapping, example) -> list[Site]:
    if example is None:
        raise ValueError("discover_sites for a Linen module needs example inputs "
                         "(example=(input_ids, ...)): Linen builds its submodules only when called")
    args, kwargs = split_example(example)
    found: dict[str, tuple] = {}
    attend: dict[str, tuple] = {}

    def interceptor(next_fun, a, kw, ctx):
        out = next_fun(*a, **kw)
        if ctx.method_name == "attend" and a:  # a tied output layer
            attend.setdefault(join_path(ctx.module.scope.path), getattr(a[0], "shape", None))
        if ctx.method_name == "__call__":
            kind = site_kind_of(ctx.module)
            path = join_path(ctx.module.scope.path)
            if kind is not None and path and path not in found:
                x = a[0] if a else None
                found[path] = (kind, type(ctx.module), getattr(x, "shape", None),
                               getattr(out, "shape", None), ctx.module,
                               _refusals(ctx.module, kind, path, "linen"))
        return out

    def run(variables):
        with nn.intercept_methods(interceptor):
            return module.apply(variables, *args, **kwargs)

    jax.eval_shape(run, variables)
    params = variables.get("params", {})
    sites = []
    for path, (kind, cls, in_shape, out_shape, mod, refusals) in found.items():
        sub = params
        for part in path.split("/"):
            sub = sub.get(part, {}) if isinstance(sub, Mapping) else {}
        shapes = _shape_dict(sub)
        sites.append(_make_site(path, kind, mod, shapes, (in_shape, out_shape, attend.get(path)),
                                refusals))
    return sorted(sites, key=lambda s: s.path)


def discover_sites(model: Any, variables: Mapping | None = None, *, example: Any = None,
                   kinds: Iterable[str] | None = None,
                   include: Callable[[Site], bool] | None = None) -> list[Site]:
    """Find every adaptable unit of a model.

    Args:
      model: an ``nnx.Module``, or a Linen ``nn.Module`` (then pass ``variables`` and ``example``).
      variables: Linen variables (``{"params": ...}``).
      example: example inputs of the model's ``__call__``: one array, a tuple of positional
        arguments, or ``{"args": (...), "kwargs": {...}}``. With it, each site also records the
        sequence length it sees and its input/output widths (needed for ``block`` sites).
      kinds: keep only these kinds.
      include: an extra predicate over sites.

    Returns:
      The sites, sorted by path.

    Raises:
      ValueError: an unknown kind, a Linen module without ``variables`` or ``example``, or no
        site at all (after ``kinds`` and ``include``).
      TypeError: ``model`` is neither an ``nnx.Module`` nor a Linen module.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from layerlens_jax import BertClassifier, BertConfig, discover_sites
      >>> from layerlens_jax.models import MLP
      >>> [(s.path, s.kind, s.num_params) for s in discover_sites(MLP((4, 8, 2), rngs=nnx.Rngs(0)))]
      [('layers_0', 'linear', 40), ('layers_1', 'linear', 18)]
      >>> bert = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
      >>> sites = discover_sites(bert, example=jnp.zeros((2, 7), jnp.int32), kinds=["attention"])
      >>> [(s.path, s.num_heads, s.head_dim, s.tokens_per_example) for s in sites]
      [('encoder/layers_0/attention/mha', 2, 8, 7), ('encoder/layers_1/attention/mha', 2, 8, 7)]
    """
    if kinds is not None:
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown site kind(s) {bad}; expected a subset of {KINDS}")
    if isinstance(model, nnx.Module):
        sites = _discover_nnx(model, example)
    elif isinstance(model, nn.Module):
        if variables is None:
            raise ValueError("discover_sites for a Linen module needs its variables")
        sites = _discover_linen(model, variables, example)
    else:
        raise TypeError(f"discover_sites expects a flax nnx.Module or linen Module, "
                        f"got {type(model).__name__}")
    if kinds is not None:
        sites = [s for s in sites if s.kind in kinds]
    if include is not None:
        sites = [s for s in sites if include(s)]
    if not sites:
        raise ValueError(f"no adaptable sites found in {type(model).__name__}: it has no module of "
                         f"a known kind {KINDS}; register yours with register_site_kind(cls, kind)")
    return sorted(sites, key=lambda s: s.path)
