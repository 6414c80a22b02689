"""Layers stacked along a leading layer axis (``nnx.vmap`` to build, ``nnx.scan`` to run).

A *stack* is a module built under ``nnx.vmap`` (``nnx.vmap(lambda k: Block(rngs=nnx.Rngs(k)))``):
every parameter under it has one extra leading axis, the layer axis, of size ``L``. Its *root* is
the highest module (below the model) under which every parameter has that leading axis and every
module whose per-layer parameter rank is known (Linear, LinearGeneral, Einsum, Embed, Conv,
LayerNorm, RMSNorm, GroupNorm) carries exactly that one extra axis; one module of known rank with
no extra axis (or a leaf without the axis) ends the walk up.

Sites inside a stack are per layer: the layer index goes right after the root, so the module
``layers/fc1`` under the root ``layers`` of 3 layers gives the sites ``layers/0/fc1``,
``layers/1/fc1``, ``layers/2/fc1`` with the per-layer shapes (the layer axis removed). Profiling
taps a stacked unit with a :class:`StackedTap` (an ``nnx.Module``, so it travels through
``nnx.scan``) whose sink Variable ``(L, B)`` is sliced by the scan like the layer's parameters:
each layer's tap writes its per-example squared norms into its own row. Gradient norms split the
stacked gradient leaf by its layer axis. More than one layer axis (nested stacks) is refused.

This module only reads the model; it imports nothing else of the library (sites, the profiler and
the PEFT code import it).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["find_stacks", "stack_root", "layer_path", "layer_paths", "parse_layer_path",
           "expand_leaf_paths", "leaf_squares_fn", "StackedTap", "TapSink"]


def _join(parts) -> str:
    return "/".join(str(p) for p in parts)


def _per_layer_rank(module) -> tuple[str, int] | None:
    """``(variable name, axes of one layer's variable)`` for module types of known layout."""
    if isinstance(module, nnx.Linear):
        return "kernel", 2
    if isinstance(module, nnx.LinearGeneral):
        return "kernel", len(module.in_features) + len(module.out_features)
    if isinstance(module, nnx.Einsum):
        return "kernel", len(tuple(module.kernel_shape))
    if isinstance(module, nnx.Embed):
        return "embedding", 2
    if isinstance(module, nnx.Conv):
        return "kernel", len(tuple(module.kernel_size)) + 2
    if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)) and \
            isinstance(vars(module).get("scale"), nnx.Param):
        return "scale", 1
    return None


def _module_stack(module) -> tuple[int, ...] | None:
    """The extra leading axes of a module of known layout (``()``: not stacked), else None."""
    known = _per_layer_rank(module)
    if known is None:
        return None
    name, rank = known
    var = vars(module).get(name)
    if not isinstance(var, nnx.Variable):
        return None
    shape = tuple(var.shape)
    return shape[: max(len(shape) - rank, 0)]


def _leading_axis_everywhere(module, size: int) -> bool:
    leaves = jax.tree.leaves(nnx.state(module, nnx.Param))
    return bool(leaves) and all(l.ndim >= 1 and l.shape[0] == size for l in leaves)


def find_stacks(model: nnx.Module) -> dict[str, int]:
    """``{stack root path: layer count}`` of an NNX model (empty when nothing is stacked).

    Raises ``ValueError`` naming the module for more than one stacked axis (nested stacks).
    """
    modules = {_join(p): m for p, m in nnx.iter_modules(model)}
    stacks = {p: s for p, m in modules.items() if p and (s := _module_stack(m)) is not None}

    def qualifies(path: str, size: int) -> bool:
        under = [s for q, s in stacks.items() if q == path or q.startswith(path + "/")]
        return all(s == (size,) for s in under) and _leading_axis_everywhere(modules[path], size)

    roots: dict[str, int] = {}
    for path, stack in stacks.items():
        if not stack:
            continue
        if len(stack) != 1:
            raise ValueError(f"module {path!r} has {len(stack)} stacked leading axes {stack}; only "
                             f"one layer axis (one nnx.vmap) is supported")
        root, parts = path, path.split("/")
        for k in range(len(parts) - 1, 0, -1):
            parent = "/".join(parts[:k])
            if not qualifies(parent, stack[0]):
                break
            root = parent
        roots[root] = stack[0]
    return {r: n for r, n in roots.items()
            if not any(r != q and r.startswith(q + "/") for q in roots)}


def stack_root(path: str, stacks: Mapping[str, int]) -> str | None:
    """The root of the stack that module ``path`` lies in, or None."""
    for root in stacks:
        if path == root or path.startswith(root + "/"):
            return root
    return None


def layer_path(path: str, root: str, index: int) -> str:
    """The per-layer path of module ``path`` of the stack ``root``: the index after the root."""
    return f"{root}/{index}{path[len(root):]}"


def layer_paths(path: str, stacks: Mapping[str, int]) -> list[str]:
    """``[path]`` for an unstacked module, else its per-layer paths in layer order."""
    root = stack_root(path, stacks)
    if root is None:
        return [path]
    return [layer_path(path, root, i) for i in range(stacks[root])]


def parse_layer_path(site: str, stacks: Mapping[str, int]) -> tuple[str, str, int] | None:
    """``(module path, stack root, layer index)`` of a per-layer site path, or None when ``site``
    names no layer of a stack. ``ValueError`` naming the site for an index out of range."""
    for root, size in stacks.items():
        if not site.startswith(root + "/"):
            continue
        head, _, rest = site[len(root) + 1:].partition("/")
        if not head.isdigit():
            continue
        index = int(head)
        if index >= size:
            raise ValueError(f"site {site!r} names layer {index} of the stack {root!r}, which has "
                             f"{size} layers")
        return (f"{root}/{rest}" if rest else root), root, index
    return None


# ------------------------------------------------------------------------ gradient norms


def expand_leaf_paths(param_paths, stacks: Mapping[str, int]) -> tuple[tuple[str, ...],
                                                                       tuple[int, ...]]:
    """Per-layer parameter leaf paths (a stacked leaf becomes L paths) and, per original leaf, its
    layer count (0 for an unstacked leaf), in the order of ``param_paths``."""
    paths, counts = [], []
    for p in param_paths:
        owner, _, name = p.rpartition("/")
        root = stack_root(owner, stacks)
        counts.append(0 if root is None else stacks[root])
        paths.extend([f"{q}/{name}" for q in layer_paths(owner, stacks)] if root else [p])
    return tuple(paths), tuple(counts)


def leaf_squares_fn(counts: tuple[int, ...]) -> Callable[[Any], jax.Array]:
    """``tree -> squared norms`` per leaf in flattening order, a stacked leaf (``counts[i] = L``)
    contributing one square per layer slice: the order of :func:`expand_leaf_paths`."""
    def leaf_squares(tree):
        out = []
        for leaf, n in zip(jax.tree.leaves(tree), counts, strict=True):
            sq = jnp.square(leaf.astype(jnp.float32))
            out.append(jnp.sum(sq.reshape(n, -1), axis=1) if n else jnp.sum(sq)[None])
        return jnp.concatenate(out)

    return leaf_squares


# ------------------------------------------------------------------------------ the tap


class TapSink(nnx.Variable):
    """The per-layer, per-example sinks ``(L, B)`` of a stacked unit (zeros; their gradient is the
    per-example squared norms); stacked like the layer's parameters, so ``nnx.scan`` slices it."""


class StackedTap(nnx.Module):
    """Stands in for a stacked parameter unit inside the traced profile function.

    ``tap(inner, x, y, sink, extra_args)`` (a static callable from the profiler) returns the tapped
    output for one layer: inside ``nnx.scan`` ``inner`` and ``sink`` are that layer's slices.
    """

    def __init__(self, inner: nnx.Module, sink: jax.Array, tap: Callable):
        self.inner = inner
        self.sink = TapSink(sink)
        self.tap = tap

    def __call__(self, x, *args, **kwargs):
        y = self.inner(x, *args, **kwargs)
        extra = bool(args) or any(v is not None for v in kwargs.values())
        return self.tap(self.inner, x, y, self.sink[...], extra)

    def __getattr__(self, name):
        inner = vars(self).get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)
