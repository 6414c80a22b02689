"""What LoRA can wrap: ONE table of module kinds, read by the NNX and the Linen shells.

Each row of :data:`LORA_KINDS` names a kind of LoRA target (``linear``, ``general``, ``einsum``,
``embed``, ``conv``), the NNX and Linen module classes of that kind, how their fan-in / fan-out and
per-layer kernel rank are read, and which :mod:`~layerlens_jax._src.peft.functional` delta function
applies with which static arguments. :func:`nnx_lora_target` and :func:`linen_lora_target` turn a
module into a :class:`LoRATarget`; :meth:`LoRATarget.delta` computes the LoRA term. Adding a kind
means adding one row here, nothing else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import jax
from flax import linen as nn
from flax import nnx

from layerlens_jax._src.einsum import einsum_layout
from layerlens_jax._src.peft import functional

__all__ = ["LoRATarget", "LoRAKind", "LORA_KINDS", "nnx_lora_target", "linen_lora_target",
           "conv_padding"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRATarget:
    """How LoRA wraps one module (hashable: an NNX ``LoRA`` keeps it as a static attribute)."""

    # key of LORA_KINDS: "linear", "general", "einsum", "embed" or "conv"
    kind: str
    # flattened input size of the (per-layer) kernel: rows of the LoRA factor ``a``
    fan_in: int
    # flattened output size of the (per-layer) kernel: columns of the LoRA factor ``b``
    fan_out: int
    # name of the wrapped variable: "kernel", or "embedding" for an embedding table
    kernel_name: str
    # full shape of that variable, stacked leading axes included
    kernel_shape: tuple[int, ...]
    # leading axes of a module built under nnx.vmap (() for an ordinary module)
    stack: tuple[int, ...]
    # how many per-layer kernel axes (after the stack) flatten into fan_in; the rest are outputs
    in_axes: int = 1
    # static keyword arguments of the kind's delta function, as (name, value) pairs
    delta_args: tuple[tuple[str, Any], ...] = ()

    def delta(self, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, *,
              dtype: Any = None, dropout: Callable[[jax.Array], jax.Array] | None = None,
              call_kwargs: Mapping[str, Any] | None = None) -> jax.Array:
        """The LoRA term for input ``x`` (dropout applied to ``x`` where the kind allows it).

        ``call_kwargs``: the keyword arguments of the wrapped module's call; those the kind lets a
        call override (Einsum's ``einsum_str``) replace the static ones.
        """
        row = LORA_KINDS[self.kind]
        args = dict(self.delta_args)
        for k in row.call_args:
            given = (call_kwargs or {}).get(k)
            if given and _normalised(given) != _normalised(args[k]):
                raise ValueError(f"LoRA on {self.kind} module: the call passes {k}={given!r} but "
                                 f"the factors were built for {args[k]!r}")
        if dropout is not None and row.input_dropout:
            x = dropout(x)
        return row.delta(x, a, b, scale, dtype=dtype, **args)

    def delta_kernel(self, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
        """One layer's kernel update ``scale * a @ b`` in the kernel's axis order and shape."""
        row = LORA_KINDS[self.kind]
        args = {k: v for k, v in self.delta_args if k in row.merge_args}
        return row.delta_kernel(a, b, scale, self.kernel_shape[len(self.stack):], **args)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAKind:
    """One row of :data:`LORA_KINDS`."""

    # the kind's name (LoRATarget.kind)
    kind: str
    # name of the wrapped variable
    kernel_name: str
    # NNX module class of this kind (rows are tried in order)
    nnx_type: type
    # Linen module class of this kind
    linen_type: type
    # (module, where, kernel_shape) -> LoRATarget for an NNX module; ValueError naming `where`
    read_nnx: Callable[[Any, str, tuple[int, ...]], LoRATarget]
    # the same for a Linen module (kernel_shape as seen inside the module: no stack axes)
    read_linen: Callable[[Any, str, tuple[int, ...]], LoRATarget]
    # functional.lora_*_delta(x, a, b, scale, *, dtype, **delta_args)
    delta: Callable[..., jax.Array]
    # whether LoRA dropout applies to the input (not to an embedding's integer ids)
    input_dropout: bool = True
    # delta arguments a call of the wrapped module may repeat (they must equal the module's)
    call_args: tuple[str, ...] = ()
    # (a, b, scale, kernel_shape, **merge_args) -> one layer's kernel update, for merging
    delta_kernel: Callable[..., jax.Array] = functional.lora_delta_kernel
    # delta arguments ``delta_kernel`` also takes
    merge_args: tuple[str, ...] = ()


def conv_padding(padding: Any, rank: int) -> str | tuple[tuple[int, int], ...]:
    """Conv ``padding`` as ``lax.conv_general_dilated`` takes it: a string unchanged, an int or a
    sequence of ints / pairs as ``rank`` ``(low, high)`` pairs (a hashable tuple).

    >>> conv_padding(1, 2)
    ((1, 1), (1, 1))
    >>> conv_padding([(0, 1), 2], 2)
    ((0, 1), (2, 2))
    """
    if isinstance(padding, str):
        return padding
    if isinstance(padding, int) and not isinstance(padding, bool):
        return ((padding, padding),) * rank
    if isinstance(padding, Sequence) and len(padding) == rank:
        pairs = []
        for p in padding:
            if isinstance(p, int) and not isinstance(p, bool):
                pairs.append((p, p))
            elif isinstance(p, Sequence) and len(p) == 2 and all(isinstance(q, int) for q in p):
                pairs.append((int(p[0]), int(p[1])))
            else:
                break
        if len(pairs) == rank:
            return tuple(pairs)
    raise ValueError(f"conv padding {padding!r} is not a string, an int or a sequence of {rank} "
                     f"ints or (low, high) pairs")


def _target(kind: str, where: str, full_shape: Sequence[int], layer_rank: int, fan_in: int,
            fan_out: int, /, in_axes: int = 1, **delta_args) -> LoRATarget:
    """A checked :class:`LoRATarget`: ``full_shape`` is the variable's shape, of which the last
    ``layer_rank`` axes are one layer's kernel (the rest are stack axes), its first ``in_axes``
    axes the inputs."""
    shape = tuple(int(d) for d in full_shape)
    name = LORA_KINDS[kind].kernel_name
    if len(shape) < layer_rank:
        raise ValueError(f"LoRA on {where}: {name} shape {shape} is inconsistent with the module")
    return LoRATarget(kind=kind, fan_in=int(fan_in), fan_out=int(fan_out), kernel_name=name,
                      kernel_shape=shape, stack=shape[: len(shape) - layer_rank],
                      in_axes=int(in_axes), delta_args=tuple(sorted(delta_args.items())))


def _as_tuple(v: Any, n: int | None = None) -> tuple:
    """``v`` as a tuple: ``None`` -> ``(1,) * n``; an int -> ``(v,) * n``; else ``tuple(v)``."""
    if v is None:
        return (1,) * (n or 1)
    if isinstance(v, int):
        return (v,) * (n or 1)
    return tuple(v)


# ------------------------------------------------------------------ per-kind readers


def _nnx_linear(m, where, shape):
    return _target("linear", where, shape, 2, m.in_features, m.out_features)


def _linen_linear(m, where, shape):
    return _target("linear", where, shape, 2, shape[-2], shape[-1])


def _nnx_general(m, where, shape):
    if len(m.batch_axis):
        raise ValueError(f"LoRA on {where}: LinearGeneral with batch_axis is not supported")
    return _target("general", where, shape, len(m.in_features) + len(m.out_features),
                   math.prod(m.in_features), math.prod(m.out_features),
                   in_axes=len(m.in_features), axis=tuple(m.axis), out_shape=tuple(m.out_features))


def _linen_general(m, where, shape):
    if m.batch_dims:
        raise ValueError(f"LoRA on {where}: DenseGeneral with batch_dims is not supported")
    feats, axis = _as_tuple(m.features), _as_tuple(m.axis)
    n_out, n_in = len(feats), len(axis)
    in_shape = shape[len(shape) - n_out - n_in: len(shape) - n_out]
    return _target("general", where, shape, n_in + n_out, math.prod(in_shape), math.prod(feats),
                   in_axes=n_in, axis=axis, out_shape=feats)


def _einsum(kernel_shape_attr: str):
    def read(m, where, shape):
        ks = tuple(int(d) for d in getattr(m, kernel_shape_attr))
        if not m.einsum_str:
            raise ValueError(f"LoRA on {where}: the Einsum has no einsum_str of its own (given "
                             f"only at call time); set it on the module")
        layout = einsum_layout(m.einsum_str, ks, where)
        return _target("einsum", where, shape, len(ks), layout.fan_in, layout.fan_out,
                       in_axes=len(layout.in_axes), einsum_str=layout.equation, kernel_shape=ks)
    return read


def _normalised(value: Any) -> Any:
    return value.replace(" ", "") if isinstance(value, str) else value


def _nnx_embed(m, where, shape):
    return _target("embed", where, shape, 2, m.num_embeddings, m.features)


def _linen_embed(m, where, shape):
    return _target("embed", where, shape, 2, shape[-2], shape[-1])


def _conv_args(m, where, n: int) -> dict[str, Any]:
    """Checks shared by NNX and Linen convs, and the static arguments of the conv delta."""
    if m.feature_group_count != 1:
        raise ValueError(f"LoRA on {where}: grouped convolutions are not supported")
    if m.mask is not None:
        raise ValueError(f"LoRA on {where}: masked convolutions are not supported")
    if isinstance(m.padding, str) and m.padding not in ("SAME", "VALID"):
        raise ValueError(f"LoRA on {where}: conv padding {m.padding!r} is not supported "
                         f"(SAME, VALID or explicit pairs are)")
    try:
        padding = conv_padding(m.padding, n)
    except ValueError as e:
        raise ValueError(f"LoRA on {where}: {e}") from None
    return dict(kernel_size=_as_tuple(m.kernel_size), strides=_as_tuple(m.strides or 1, n),
                padding=padding, input_dilation=_as_tuple(m.input_dilation or 1, n),
                kernel_dilation=_as_tuple(m.kernel_dilation or 1, n))


def _nnx_conv(m, where, shape):
    ks = _as_tuple(m.kernel_size)
    args = _conv_args(m, where, len(ks))
    return _target("conv", where, shape, len(ks) + 2, math.prod(ks) * m.in_features,
                   m.out_features, in_axes=len(ks) + 1, **args)


def _linen_conv(m, where, shape):
    ks = _as_tuple(m.kernel_size)
    args = _conv_args(m, where, len(ks))
    n = len(ks)
    return _target("conv", where, shape, n + 2, math.prod(shape[-(n + 2):-1]), shape[-1],
                   in_axes=n + 1, **args)


#: The LoRA target table: every module kind LoRA wraps, for NNX and Linen, in lookup order.
LORA_KINDS: dict[str, LoRAKind] = {row.kind: row for row in (
    LoRAKind(kind="linear", kernel_name="kernel", nnx_type=nnx.Linear, linen_type=nn.Dense,
             read_nnx=_nnx_linear, read_linen=_linen_linear, delta=functional.lora_delta),
    LoRAKind(kind="general", kernel_name="kernel", nnx_type=nnx.LinearGeneral,
             linen_type=nn.DenseGeneral, read_nnx=_nnx_general, read_linen=_linen_general,
             delta=functional.lora_general_delta),
    LoRAKind(kind="einsum", kernel_name="kernel", nnx_type=nnx.Einsum, linen_type=nn.Einsum,
             read_nnx=_einsum("kernel_shape"), read_linen=_einsum("shape"),
             delta=functional.lora_einsum_delta, call_args=("einsum_str",),
             delta_kernel=functional.lora_einsum_delta_kernel, merge_args=("einsum_str",)),
    LoRAKind(kind="embed", kernel_name="embedding", nnx_type=nnx.Embed, linen_type=nn.Embed,
             read_nnx=_nnx_embed, read_linen=_linen_embed, delta=functional.lora_embed_delta,
             input_dropout=False),
    LoRAKind(kind="conv", kernel_name="kernel", nnx_type=nnx.Conv, linen_type=nn.Conv,
             read_nnx=_nnx_conv, read_linen=_linen_conv, delta=functional.lora_conv_delta),
)}

#: Subclasses of a table type that LoRA does not wrap.
_EXCLUDED = (nnx.ConvTranspose, nn.ConvTranspose)


def _row(module: Any, framework: str) -> LoRAKind | None:
    if isinstance(module, _EXCLUDED):
        return None
    for row in LORA_KINDS.values():
        if isinstance(module, getattr(row, f"{framework}_type")):
            return row
    return None


def _expected(framework: str) -> str:
    names = [getattr(row, f"{framework}_type").__name__ for row in LORA_KINDS.values()]
    return f"{framework}." + ", ".join(names[:-1]) + " or " + names[-1]


def nnx_lora_target(module: Any, where: str) -> LoRATarget:
    """The :class:`LoRATarget` of an NNX module; ``ValueError`` naming ``where`` when LoRA cannot
    wrap it."""
    row = _row(module, "nnx")
    if row is None:
        raise ValueError(f"LoRA cannot wrap {where} of type {type(module).__name__}: expected "
                         f"{_expected('nnx')}")
    return row.read_nnx(module, where, tuple(getattr(module, row.kernel_name).shape))


def linen_lora_target(module: Any, where: str) -> LoRATarget:
    """The :class:`LoRATarget` of a bound Linen module whose parameters exist (call it after the
    module ran); ``ValueError`` naming ``where`` when LoRA cannot wrap it."""
    row = _row(module, "linen")
    if row is None:
        raise ValueError(f"LoRA cannot wrap {where} of type {type(module).__name__}: expected "
                         f"{_expected('linen')}")
    shape = tuple(module.get_variable("params", row.kernel_name).shape)
    return row.read_linen(module, where, shape)
