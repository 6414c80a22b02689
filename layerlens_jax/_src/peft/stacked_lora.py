"""LoRA with a different rank per layer inside a stack (layers built with ``nnx.vmap``).

Design (padding + masks): a plan that names per-layer sites of one stacked module
(``layers/0/fc1: ("lora", 4)``, ``layers/2/fc1: ("lora", 1)``) wraps that module once with a
:class:`StackedLoRA` whose factors carry the layer axis, ``A: (L, fan_in, R)`` and
``B: (L, R, fan_out)`` with ``R`` the largest rank of the stack, so ``nnx.scan`` runs unchanged.
A non-trainable :class:`LoRAMask` ``(L, R)`` holds, per layer, the layer's LoRA scale on its first
``r_i`` columns and 0 on the padding; the term is ``x @ (A * mask) @ B``, so a padded column's
output and its factors' gradients are exactly zero (its A columns are stored as zeros too), and a
layer without LoRA has an all-zero mask. Created trainable parameters (what ``count_trainable``
counts and :func:`stacked_lora_params` predicts): ``L * R * (fan_in + fan_out)`` per stacked
module, padding included, whatever the per-layer ranks. Adapters and prefixes on per-layer sites
are refused (a per-layer method would change the structure of one scan iteration).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerlens_jax._src.peft import functional
from layerlens_jax._src.peft.nnx_modules import LoRA, lora_target_info
from layerlens_jax._src.stacked import find_stacks, layer_path, parse_layer_path, stack_root

__all__ = ["LoRAMask", "StackedLoRA", "split_stacked_assignments", "stacked_lora_params"]


class LoRAMask(nnx.Variable):
    """Per-layer, per-rank-column LoRA scale of a :class:`StackedLoRA` (0 on padded columns);
    not trained (not an ``nnx.Param``)."""


class StackedLoRA(LoRA):
    """LoRA on a stacked module with per-layer ranks ``ranks`` (0: no LoRA on that layer), padded to
    ``max(ranks)`` with a per-layer mask (see the module docstring). ``layer_sites``: the per-layer
    site paths, for :meth:`layer_assignments`."""

    def __init__(self, base_module: nnx.Module, ranks: tuple[int, ...], *, alpha: float = 16.0,
                 use_rslora: bool = False, dropout: float = 0.0, param_dtype: Any = jnp.float32,
                 rngs: nnx.Rngs, site: str, layer_sites: tuple[str, ...]):
        target = lora_target_info(base_module, site)
        if target.stack != (len(ranks),) or len(layer_sites) != len(ranks):
            raise ValueError(f"stacked LoRA on {site!r}: {len(ranks)} per-layer ranks for a module "
                             f"stacked as {target.stack}")
        if any(not isinstance(r, int) or r < 0 for r in ranks) or max(ranks) <= 0:
            raise ValueError(f"stacked LoRA on {site!r}: per-layer ranks must be ints >= 0, one "
                             f"> 0, got {ranks}")
        super().__init__(base_module, max(ranks), alpha=alpha, use_rslora=use_rslora,
                         dropout=dropout, param_dtype=param_dtype, rngs=rngs, site=site)
        width = max(ranks)
        mask = np.array([[functional.lora_scale(alpha, r, use_rslora) if j < r else 0.0
                          for j in range(width)] for r in ranks], np.float32)
        self.lora_mask = LoRAMask(jnp.asarray(mask))
        a = self.peft_lora_a[...]
        self.peft_lora_a[...] = a * jnp.asarray(mask != 0, a.dtype)[:, None, :]  # padding: zeros
        self.ranks = tuple(int(r) for r in ranks)
        self.layer_sites = tuple(layer_sites)
        self.scale = 1.0  # per layer, in the mask

    def masked_a(self) -> jax.Array:
        """``A * mask``: one layer's ``(fan_in, R)`` inside a scan, ``(L, fan_in, R)`` outside."""
        a = self.peft_lora_a[...]
        return a * jnp.expand_dims(self.lora_mask[...], -2).astype(a.dtype)

    def delta(self, x: jax.Array, **kwargs) -> jax.Array:
        """The LoRA term of the layer the scan passes in (scale and padding in the mask)."""
        return self.target.delta(x, self.masked_a(), self.peft_lora_b[...], 1.0, dtype=self.dtype,
                                 dropout=self.dropout, call_kwargs=kwargs)

    def merged_kernel(self) -> jax.Array:
        """The stacked base kernel plus each layer's folded update, in the kernel's dtype."""
        kernel = getattr(self.base_module, self.target.kernel_name)[...]
        a = self.masked_a().astype(jnp.float32)
        fn = functools.partial(functional.lora_delta_kernel, scale=1.0,
                               kernel_shape=kernel.shape[1:])
        return (kernel.astype(jnp.float32) + jax.vmap(fn)(a, self.peft_lora_b[...].astype(
            jnp.float32))).astype(kernel.dtype)

    def layer_assignments(self) -> dict[str, tuple[str, int]]:
        """``{per-layer site: ("lora", rank)}`` for the layers with a rank > 0."""
        return {s: ("lora", r) for s, r in zip(self.layer_sites, self.ranks) if r}


def split_stacked_assignments(model: nnx.Module, assignments: Mapping[str, tuple[str, int]]):
    """``(plain assignments, {stacked module path: (ranks per layer, per-layer site paths)})``.

    Per-layer sites (``layers/3/fc1``) are grouped by their stacked module; every other entry is
    returned unchanged. ``ValueError`` naming the site for a method other than LoRA on a layer of a
    stack, or a plan naming both a stacked module and one of its layers.
    """
    stacks = find_stacks(model)
    if not stacks:
        return dict(assignments), {}
    plain, groups = {}, {}
    for site, (method, size) in assignments.items():
        parsed = parse_layer_path(site, stacks)
        if parsed is None:
            root = stack_root(site, stacks)
            if root is not None and method != "lora":
                raise ValueError(f"plan assigns {method} to site {site!r} inside the stack {root!r} "
                                 f"(built with nnx.vmap): only LoRA is supported on stacked layers")
            plain[site] = (method, size)
            continue
        module_path, root, index = parsed
        if method != "lora":
            raise ValueError(f"plan assigns {method} to site {site!r}, a layer of the stack "
                             f"{root!r} (built with nnx.vmap): only LoRA is supported on stacked "
                             f"layers (a per-layer {method} would change one scan iteration)")
        ranks, paths = groups.setdefault(module_path, ([0] * stacks[root], [
            layer_path(module_path, root, i) for i in range(stacks[root])]))
        ranks[index] = int(size)
    clash = sorted(set(plain) & set(groups))
    if clash:
        raise ValueError(f"plan names the stacked module {clash[0]!r} and also some of its layers; "
                         f"give either one entry for the whole stack or per-layer entries")
    return plain, {m: (tuple(r), tuple(p)) for m, (r, p) in groups.items()}


def stacked_lora_params(assignments: Mapping[str, tuple[str, int]], sites) -> dict[str, int]:
    """Trainable parameters :func:`apply_plan` creates per stacked module for ``assignments``
    (per-layer sites, :class:`~layerlens_jax._src.sites.Site` records from ``discover_sites``):
    ``L * max(ranks) * (d_in + d_out)``, padding included (``L`` the layers of the stack)."""
    by_path = {s.path: s for s in sites}
    layers: dict[str, int] = {}
    for s in sites:
        if s.stacked_module is not None:
            layers[s.stacked_module] = layers.get(s.stacked_module, 0) + 1
    out: dict[str, tuple[int, int]] = {}
    for path, (method, size) in assignments.items():
        site = by_path.get(path)
        if site is None or site.stacked_module is None or method != "lora":
            continue
        width = max(int(size), out.get(site.stacked_module, (0, 0))[0])
        out[site.stacked_module] = (width, site.in_features + site.out_features)
    return {m: layers[m] * width * fan for m, (width, fan) in out.items()}
