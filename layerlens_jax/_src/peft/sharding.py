"""Where new adapter parameters live: shardings derived from the base module's, on JAX's own SPMD.

No distribution layer of our own: an adapter parameter is an ordinary ``jax.Array`` placed with a
``NamedSharding`` on the mesh of the kernel it adapts (and, when the kernel carries flax
partitioning metadata ``out_sharding`` -- from ``nnx.with_partitioning`` -- the adapter variable
carries the matching metadata too, so ``nnx.get_partition_spec`` / ``nnx.get_named_sharding`` cover
it). ``jit`` then propagates these shardings through profile and training steps.

The LoRA rule (the one qwix uses): for a kernel ``(*stack, *in_axes, *out_axes)``

* ``A: (*stack, fan_in, rank)`` is sharded like the stack axes, then like the kernel's first
  *sharded* input axis (fan-in is the flattened input axes), the rank axis replicated;
* ``B: (*stack, rank, fan_out)`` like the stack axes, the rank axis replicated, then like the
  kernel's first sharded output axis.

So an FSDP kernel ``P('fsdp', None)`` gives ``A: P('fsdp', None)``, ``B: P(None, None)``; a
column-parallel kernel ``P(None, 'model')`` gives ``A: P(None, None)``, ``B: P(None, 'model')``.
An axis whose size the mesh axes do not divide is replicated. Bottleneck adapters and prefixes
(no single kernel) are replicated on the mesh of the module they attach to, except that prefix
keys / values take the heads sharding of the attention's key projection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

__all__ = ["Placement", "REPLICATED_NOWHERE", "lora_factor_entries", "lora_placements",
           "module_placement", "prefix_placement", "placed"]

# an entry of a partition spec: a mesh axis name, a tuple of names, or None (replicated)
Entry = Any


@dataclasses.dataclass(frozen=True, kw_only=True)
class Placement:
    """Where one new adapter array goes and which flax metadata its variable carries."""

    # the array's sharding (None: JAX's default device, as for an unsharded model)
    sharding: jax.sharding.Sharding | None = None
    # flax partitioning metadata for the variable (``out_sharding``, ``mesh``, ``sharding_rules``)
    metadata: tuple[tuple[str, Any], ...] = ()

    def variable(self, var_type: type, value: jax.Array) -> nnx.Variable:
        """``var_type(value)`` placed here, with the metadata (eager sharding off: already placed)."""
        if self.sharding is not None and getattr(value, "sharding", None) != self.sharding:
            value = jax.device_put(value, self.sharding)
        if not self.metadata:
            return var_type(value)
        return var_type(value, eager_sharding=False, **dict(self.metadata))


#: The placement of an adapter on a model that is not sharded.
REPLICATED_NOWHERE = Placement()


def _concrete_sharding(var: Any) -> jax.sharding.Sharding | None:
    """The sharding of a variable's concrete array (None under a trace or for abstract values)."""
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if not isinstance(value, jax.Array) or isinstance(value, jax.core.Tracer):
        return None
    try:
        return value.sharding
    except (AttributeError, RuntimeError):
        return None


def _padded(spec: PartitionSpec | tuple, ndim: int) -> tuple[Entry, ...]:
    entries = tuple(spec)
    return entries + (None,) * (ndim - len(entries))


def _mesh_size(mesh: Any, entry: Entry) -> int:
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(int(mesh.shape[n]) for n in names)


def _first_sharded(entries: tuple[Entry, ...]) -> Entry:
    return next((e for e in entries if e is not None), None)


def lora_factor_entries(entries: tuple[Entry, ...], n_stack: int,
                        n_in: int) -> tuple[tuple[Entry, ...], tuple[Entry, ...]]:
    """The spec entries of ``A`` and ``B`` from the kernel's (qwix's rule, see the module doc).

    >>> lora_factor_entries(("fsdp", None), 0, 1)
    (('fsdp', None), (None, None))
    >>> lora_factor_entries(("layers", None, "model"), 1, 1)
    (('layers', None, None), ('layers', None, 'model'))
    """
    stack, layer = entries[:n_stack], entries[n_stack:]
    a = stack + (_first_sharded(layer[:n_in]), None)
    b = stack + (None, _first_sharded(layer[n_in:]))
    return a, b


def _divisible(mesh: Any, entries: tuple[Entry, ...], shape: tuple[int, ...]) -> PartitionSpec:
    """``entries`` as a spec, replicating an axis the mesh axes do not divide."""
    return PartitionSpec(*(e if e is None or shape[i] % _mesh_size(mesh, e) == 0 else None
                           for i, e in enumerate(entries)))


def _metadata(var: Any, out_sharding: tuple[Entry, ...] | None) -> tuple[tuple[str, Any], ...]:
    """Flax partitioning metadata for a new variable beside ``var`` (none when ``var`` has none)."""
    if out_sharding is None:
        return ()
    meta = var.get_metadata() if isinstance(var, nnx.Variable) else {}
    out = [("out_sharding", out_sharding)]
    out += [(k, meta[k]) for k in ("mesh", "sharding_rules") if meta.get(k) is not None]
    return tuple(out)


def lora_placements(kernel: Any, *, n_stack: int, n_in: int, a_shape: tuple[int, ...],
                    b_shape: tuple[int, ...]) -> tuple[Placement, Placement]:
    """Placements of LoRA's ``A`` and ``B`` next to ``kernel`` (an ``nnx.Variable`` or array).

    ``n_stack``: leading stack axes of the kernel; ``n_in``: its per-layer input axes.
    """
    meta = var_names = None
    if isinstance(kernel, nnx.Variable):
        names = kernel.get_metadata().get("out_sharding")
        if names:
            var_names = _padded(names, len(kernel.shape))
    if var_names is not None:
        meta = lora_factor_entries(var_names, n_stack, n_in)
    sharding = _concrete_sharding(kernel)
    if isinstance(sharding, NamedSharding):
        a_e, b_e = lora_factor_entries(_padded(sharding.spec, len(kernel.shape)), n_stack, n_in)
        a_s = NamedSharding(sharding.mesh, _divisible(sharding.mesh, a_e, a_shape))
        b_s = NamedSharding(sharding.mesh, _divisible(sharding.mesh, b_e, b_shape))
    elif isinstance(sharding, SingleDeviceSharding):
        a_s = b_s = sharding
    else:
        a_s = b_s = None
    return (Placement(sharding=a_s, metadata=_metadata(kernel, meta and meta[0])),
            Placement(sharding=b_s, metadata=_metadata(kernel, meta and meta[1])))


def _param_shardings(module: Any):
    if module is None:
        return
    for _, var in nnx.iter_graph(module):
        if isinstance(var, nnx.Param):
            sharding = _concrete_sharding(var)
            if sharding is not None:
                yield sharding


def module_placement(module: Any) -> Placement:
    """Replicated on the mesh of ``module``'s first sharded parameter (or its device)."""
    for sharding in _param_shardings(module):
        if isinstance(sharding, NamedSharding):
            return Placement(sharding=NamedSharding(sharding.mesh, PartitionSpec()))
        if isinstance(sharding, SingleDeviceSharding):
            return Placement(sharding=sharding)
    return REPLICATED_NOWHERE


def prefix_placement(attention: Any, num_heads: int) -> Placement:
    """Prefix keys / values ``(length, heads, head_dim)``: the heads axis sharded like the key
    projection's heads axis (a ``(in, heads, head_dim)`` kernel), else replicated on the mesh."""
    base = module_placement(attention)
    key = getattr(getattr(attention, "key", None), "kernel", None)
    sharding = _concrete_sharding(key) if key is not None else None
    if not isinstance(sharding, NamedSharding) or len(key.shape) != 3:
        return base
    heads = _padded(sharding.spec, 3)[1]
    spec = _divisible(sharding.mesh, (None, heads, None), (1, num_heads, 1))
    return Placement(sharding=NamedSharding(sharding.mesh, spec))


def placed(placement: Placement | None, var_type: type, value: jax.Array) -> nnx.Variable:
    """``var_type(value)`` at ``placement`` (``None``: the default)."""
    return (placement or REPLICATED_NOWHERE).variable(var_type, value)
