"""The axes of an einsum projection ``y = einsum("<x>,<kernel>-><y>", x, kernel)``, for LoRA.

A kernel axis is one of:

* **contracted**: its letter is in the input and not in the output (``N``, ``H`` of
  ``"BTNH,NHD->BTD"``, ``D`` of ``"BSD,CDKH->CBSKH"``): LoRA's ``A`` maps these, flattened in
  kernel order, to the rank;
* **output**: its letter is in the output and not in the input (``D`` of ``"BTNH,NHD->BTD"``;
  ``C``, ``K``, ``H`` of ``"BSD,CDKH->CBSKH"``): ``B`` maps the rank to these, flattened in kernel
  order.

So ``"BTNH,NHD->BTD"`` gets ``A: (N*H, r)``, ``B: (r, D)``, and the fused key-value projection
``"BSD,CDKH->CBSKH"`` gets ``A: (D, r)``, ``B: (r, C*K*H)``: **one joint low-rank map** from the
model width to keys and values together (as Gemma's own ``gemma.peft`` and Hugging Face PEFT on a
fused ``c_attn`` do; the rule does not depend on where an axis sits in the kernel or the output).
The update is ``scale * A @ B`` reshaped to ``(contracted..., output...)`` and transposed to the
kernel's axis order, and the LoRA term is computed through the rank
(``einsum(einsum(x, A), B)``), never through the materialised update; the trainable count is
``r * (fan_in + fan_out)``, what the cost model charges.

Equations LoRA cannot factor exactly are refused (``ValueError`` naming the site and the
equation): a kernel axis whose letter is in both the input and the output (a batched kernel,
``"BNH,NHD->BND"``: a per-slice update no single ``A @ B`` expresses), a kernel axis in neither
(summed over the kernel alone), no contracted axis, an ellipsis in the kernel, a letter repeated
within one operand (a diagonal), or not exactly two operands.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["EinsumLayout", "einsum_layout", "per_example_operands"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EinsumLayout:
    """How LoRA factors one einsum kernel (see the module docstring)."""

    # the equation without spaces, "<x>,<kernel>-><y>"
    equation: str
    # the input, kernel and output subscripts ("..." kept in the input and output)
    x_spec: str
    kernel_spec: str
    out_spec: str
    # the kernel's shape
    kernel_shape: tuple[int, ...]
    # kernel axes contracted with the input, in kernel order (A's rows, flattened)
    in_axes: tuple[int, ...]
    # kernel axes carried to the output, in kernel order (B's columns, flattened)
    out_axes: tuple[int, ...]
    # a letter of no subscript: the rank axis in the factored equations
    rank_letter: str

    @property
    def fan_in(self) -> int:
        """Rows of ``A``: the product of the contracted kernel axes."""
        return math.prod(self.kernel_shape[i] for i in self.in_axes)

    @property
    def fan_out(self) -> int:
        """Columns of ``B``: the product of the output kernel axes."""
        return math.prod(self.kernel_shape[i] for i in self.out_axes)

    @property
    def in_letters(self) -> str:
        return "".join(self.kernel_spec[i] for i in self.in_axes)

    @property
    def out_letters(self) -> str:
        return "".join(self.kernel_spec[i] for i in self.out_axes)

    def _factors(self, a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``a`` as ``(contracted..., r)`` and ``b`` as ``(r, output...)``."""
        if a.shape[-2:-1] != (self.fan_in,) or b.shape[-1:] != (self.fan_out,) \
                or a.shape[-1] != b.shape[-2]:
            raise ValueError(f"LoRA factors {a.shape} and {b.shape} do not fit einsum "
                             f"{self.equation!r} with kernel {self.kernel_shape}: expected "
                             f"({self.fan_in}, r) and (r, {self.fan_out})")
        r = a.shape[-1]
        sizes = self.kernel_shape
        return (a.reshape(tuple(sizes[i] for i in self.in_axes) + (r,)),
                b.reshape((r,) + tuple(sizes[i] for i in self.out_axes)))

    def delta(self, x: jax.Array, a: jax.Array, b: jax.Array, scale: float, *,
              precision: Any = None) -> jax.Array:
        """``scale * einsum(x, (A @ B) as the kernel)``, computed through the rank."""
        a_k, b_k = self._factors(a, b)
        r = self.rank_letter
        out_letters = set(self.out_letters)
        h_spec = "".join(c for c in self.out_spec.replace("...", "\0")
                         if c not in out_letters).replace("\0", "...") + r
        h = jnp.einsum(f"{self.x_spec},{self.in_letters}{r}->{h_spec}", x, a_k,
                       precision=precision)
        y = jnp.einsum(f"{h_spec},{r}{self.out_letters}->{self.out_spec}", h, b_k,
                       precision=precision)
        return y * jnp.asarray(scale, y.dtype)

    def delta_kernel(self, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
        """The kernel update ``scale * A @ B`` in the kernel's axis order and shape."""
        a_k, b_k = self._factors(a, b)
        r = self.rank_letter
        return jnp.einsum(f"{self.in_letters}{r},{r}{self.out_letters}->{self.kernel_spec}",
                          a_k, b_k, precision=lax.Precision.HIGHEST) * scale

    def bias_broadcast_shape(self) -> tuple[int, ...] | None:
        """The shape a bias is reshaped to before it is added (Flax's rule: the kernel's size for
        an output letter of the kernel, 1 elsewhere); None when the output has an ellipsis."""
        if "..." in self.out_spec:
            return None
        where = {c: i for i, c in enumerate(self.kernel_spec)}
        return tuple(self.kernel_shape[where[c]] if c in where else 1 for c in self.out_spec)


def _refuse(where: str, equation: str, why: str) -> ValueError:
    return ValueError(f"LoRA on {where}: einsum {equation!r} {why}")


def _letters(spec: str) -> str:
    return spec.replace("...", "")


@functools.lru_cache(maxsize=256)
def _layout(equation: str, kernel_shape: tuple[int, ...], where: str) -> EinsumLayout:
    eq = equation.replace(" ", "")
    if eq.count("->") != 1 or eq.split("->")[0].count(",") != 1:
        raise _refuse(where, eq, "must be explicit with exactly two operands ('<x>,<kernel>->"
                                 "<y>')")
    lhs, out = eq.split("->")
    x_spec, k_spec = lhs.split(",")
    if "..." in k_spec:
        raise _refuse(where, eq, "has an ellipsis in the kernel's subscripts")
    for name, spec in (("input", x_spec), ("kernel", k_spec), ("output", out)):
        letters = _letters(spec)
        if not letters.isalpha() and letters:
            raise _refuse(where, eq, f"has a non-letter subscript in the {name}")
        if len(set(letters)) != len(letters):
            raise _refuse(where, eq, f"repeats a letter in the {name} (a diagonal)")
    if len(k_spec) != len(kernel_shape):
        raise _refuse(where, eq, f"names {len(k_spec)} kernel axes but the kernel has shape "
                                 f"{kernel_shape}")
    x_l, o_l = set(_letters(x_spec)), set(_letters(out))
    if o_l - x_l - set(k_spec):
        raise _refuse(where, eq, "has an output letter in neither operand")
    batched = [c for c in k_spec if c in x_l and c in o_l]
    if batched:
        raise _refuse(where, eq, f"carries kernel axis {batched[0]!r} from the input to the output "
                                 f"(a batched kernel): one low-rank update A @ B cannot express "
                                 f"it; LoRA supports contracted and output kernel axes only")
    alone = [c for c in k_spec if c not in x_l and c not in o_l]
    if alone:
        raise _refuse(where, eq, f"sums kernel axis {alone[0]!r} over the kernel alone")
    in_axes = tuple(i for i, c in enumerate(k_spec) if c in x_l)
    if not in_axes:
        raise _refuse(where, eq, "contracts no kernel axis with the input")
    out_axes = tuple(i for i, c in enumerate(k_spec) if c in o_l)
    used = set(_letters(x_spec)) | set(k_spec) | o_l
    rank_letter = next(c for c in string.ascii_letters if c not in used)
    return EinsumLayout(equation=eq, x_spec=x_spec, kernel_spec=k_spec, out_spec=out,
                        kernel_shape=tuple(kernel_shape), in_axes=in_axes, out_axes=out_axes,
                        rank_letter=rank_letter)


def einsum_layout(equation: str, kernel_shape: Sequence[int], where: str = "this einsum"
                  ) -> EinsumLayout:
    """The :class:`EinsumLayout` of ``equation`` with a kernel of ``kernel_shape`` (per layer);
    ``ValueError`` naming ``where`` and the equation when LoRA cannot factor it exactly.

    >>> lay = einsum_layout("BTNH,NHD->BTD", (4, 8, 32))
    >>> lay.in_axes, lay.out_axes, lay.fan_in, lay.fan_out
    ((0, 1), (2,), 32, 32)
    >>> lay = einsum_layout("BSD,CDKH->CBSKH", (2, 32, 1, 8))
    >>> lay.in_axes, lay.out_axes, lay.fan_in, lay.fan_out
    ((1,), (0, 2, 3), 32, 16)
    """
    return _layout(str(equation), tuple(int(d) for d in kernel_shape), str(where))


# ------------------------------------------------------- per-example gradients (the profile)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerExampleOperands:
    """An einsum unit's input and output cotangent laid out for per-example gradient norms."""

    # (B, positions..., contracted...) and (B, positions..., kernel-output...) when no kernel axis
    # is shared by input and output: example n's kernel gradient is xs[n]^T gs[n] (flattened);
    # else None
    xs: jax.Array | None
    gs: jax.Array | None
    # the products of the contracted / output kernel axes (the dense rule's d_in, d_out)
    d_in: int
    d_out: int
    # (B, kernel...) per-example kernel gradients, formed only for a batched kernel; else None
    kernel_grads: jax.Array | None
    # (B, output kernel axes...) per-example bias gradients (Flax's bias layout)
    bias_grads: jax.Array


def per_example_operands(equation: str, x: jax.Array, g: jax.Array) -> PerExampleOperands:
    """For ``y = einsum(equation, x, W) (+ bias)`` with ``g`` the cotangent of ``y``: the
    operands whose per-example products give each example's kernel and bias gradients.

    The example axis is ``x``'s first; it may sit anywhere in ``y`` (``"BSD,CDKH->CBSKH"`` puts it
    second). Input axes the equation sums over ``x`` alone are summed first (``y`` depends only on
    that sum). ``ValueError`` naming the equation when the example axis does not reach the output
    or is a kernel axis (per-example gradients are then not separable).
    """
    lhs, out = equation.replace(" ", "").split("->")
    x_spec, k_spec = lhs.split(",")
    spare = "".join(c for c in string.ascii_letters if c not in equation)
    n_ell = x.ndim - (len(x_spec) - 3) if "..." in x_spec else 0
    x_full, out_full = x_spec.replace("...", spare[:n_ell]), out.replace("...", spare[:n_ell])
    e = x_full[0]
    if e not in out_full or e in k_spec:
        raise ValueError(f"einsum {equation!r}: the example axis (the input's first, {e!r}) must "
                         f"reach the output and stay out of the kernel for per-example statistics")
    kept = "".join(c for c in out_full if c in k_spec)
    bias_grads = jnp.einsum(f"{out_full}->{e}{kept}", g)
    contracted = "".join(c for c in k_spec if c in x_full and c not in out_full)
    outs = "".join(c for c in k_spec if c in out_full and c not in x_full)
    size = dict(zip(x_full, x.shape)) | dict(zip(out_full, g.shape))
    d_in = math.prod(size[c] for c in contracted)
    d_out = math.prod(size[c] for c in outs)
    if any(c in x_full and c in out_full for c in k_spec):  # a batched kernel
        grads = jnp.einsum(f"{x_full},{out_full}->{e}{k_spec}", x, g,
                           precision=lax.Precision.HIGHEST)
        return PerExampleOperands(xs=None, gs=None, d_in=d_in, d_out=d_out,
                                  kernel_grads=grads, bias_grads=bias_grads)
    positions = "".join(c for c in x_full[1:] if c in out_full and c not in k_spec)
    return PerExampleOperands(xs=jnp.einsum(f"{x_full}->{e}{positions}{contracted}", x),
                              gs=jnp.einsum(f"{out_full}->{e}{positions}{outs}", g),
                              d_in=d_in, d_out=d_out, kernel_grads=None, bias_grads=bias_grads)
