"""Per-example squared gradient norms of an einsum unit (``nnx.Einsum`` / ``nn.Einsum``), exact.

For ``y = einsum("<x>,<kernel>-><y>", x, W) (+ bias)`` the gradient of example ``n``'s loss with
respect to ``W`` is ``einsum("<x>,<y>-><kernel>", x_n, g_n)``, ``g_n`` the output cotangent of
example ``n``. The example axis is the input's first axis; it may sit anywhere in the output (the
fused key-value projection ``"BSD,CDKH->CBSKH"`` puts it second), so a per-example VJP vmapped over
the leading axis of both (the local rule) does not apply. Here the example axis is found by its
letter and:

* without a kernel axis shared by input and output, ``x`` is laid out as ``(B, positions,
  contracted)`` and ``g`` as ``(B, positions, kernel-output)`` and the dense ghost-norm rule
  (:class:`~layerlens_jax._src.fisher_rules.DenseRule`) gives the norms; input axes the equation
  sums over ``x`` alone are summed first (the output depends only on that sum);
* with one (a batched kernel), the per-example kernel gradients are formed with one einsum;
* a bias (Flax's layout: the kernel's output axes, in output order) adds the squared norm of ``g``
  summed over every other output axis but the example's.

An equation that sums over the example axis, or whose kernel carries it, is refused
(``ValueError`` naming the equation): its per-example gradients are not separable.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp

from layerlens_jax._src.fisher_rules import DenseRule, _as_f32

__all__ = ["EinsumRule"]


def _explicit(spec: str, ndim: int, fill: str) -> str:
    """``spec`` with its ellipsis (if any) replaced by letters of ``fill`` for an ``ndim`` array."""
    if "..." not in spec:
        return spec
    n = ndim - (len(spec) - 3)
    return spec.replace("...", fill[:n])


@dataclasses.dataclass(frozen=True, eq=False)
class EinsumRule:
    """Einsum unit: per-example squared norms of the kernel (and bias) gradients."""

    equation: str  # the module's einsum equation
    has_bias: bool  # the unit owns a bias
    precision: str  # a key of TAP_PRECISIONS, passed to the dense rule

    def _specs(self, x_ndim: int) -> tuple[str, str, str]:
        lhs, out = self.equation.replace(" ", "").split("->")
        x_spec, k_spec = lhs.split(",")
        free = "".join(c for c in string.ascii_letters if c not in self.equation)
        n_ell = x_ndim - (len(x_spec) - 3) if "..." in x_spec else 0
        x_full = _explicit(x_spec, x_ndim, free)
        out_full = out.replace("...", free[:n_ell])
        e = x_full[0]
        if e not in out_full or e in k_spec:
            raise ValueError(f"einsum {self.equation!r}: the example axis (the input's first, "
                             f"{e!r}) must reach the output and stay out of the kernel for "
                             f"per-example statistics")
        return x_full, k_spec, out_full

    def sq_norms(self, x, g, aux):
        """(B,) squared norms of the per-example kernel (and bias) gradients."""
        del aux
        x_full, k_spec, out_full = self._specs(x.ndim)
        e = x_full[0]
        xf, gf = _as_f32(x), _as_f32(g)
        carried = [c for c in k_spec if c in x_full and c in out_full]
        if carried:
            w = jnp.einsum(f"{x_full},{out_full}->{e}{k_spec}", xf, gf,
                           precision=jax.lax.Precision.HIGHEST)
            sq = jnp.sum(w.reshape(w.shape[0], -1) ** 2, axis=1)
        else:
            contracted = "".join(c for c in k_spec if c in x_full)
            outs = "".join(c for c in k_spec if c in out_full)
            positions = "".join(c for c in x_full[1:] if c in out_full and c not in k_spec)
            xs = jnp.einsum(f"{x_full}->{e}{positions}{contracted}", xf)
            gs = jnp.einsum(f"{out_full}->{e}{positions}{outs}", gf)
            rule = DenseRule(d_in=_size(xs, contracted), d_out=_size(gs, outs), has_bias=False,
                             precision=self.precision)
            sq = rule.sq_norms(xs, gs, None)
        if self.has_bias:
            kept = "".join(c for c in out_full if c in k_spec)
            gb = jnp.einsum(f"{out_full}->{e}{kept}", gf)
            sq = sq + jnp.sum(gb.reshape(gb.shape[0], -1) ** 2, axis=1)
        return sq


def _size(a: jax.Array, trailing: str) -> int:
    """The product of ``a``'s last ``len(trailing)`` axes."""
    return math.prod(int(d) for d in a.shape[a.ndim - len(trailing):]) if trailing else 1
