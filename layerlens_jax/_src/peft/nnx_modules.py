"""Flax NNX shells: ``LoRA``, ``Adapter``, ``Prefix`` and the adapter variable types.

Every adapter leaf is a :class:`PeftParam` (a subclass of ``nnx.LoRAParam``) whose attribute name
starts with :data:`PEFT_PREFIX` (``"peft_"``). So one filter selects what trains
(``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` works unchanged, as does
``nnx.DiffState(0, nnx.LoRAParam)``), and one name predicate selects the same leaves in a Linen
parameter dict, an optax label tree or a checkpoint. Careful: ``nnx.Param`` matches them too; the
frozen base is ``nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))`` (:data:`BASE_FILTER`).

The maths lives in :mod:`layerlens_jax._src.peft.functional`; these classes hold variables and
dispatch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layerlens_jax._src.peft import functional
from layerlens_jax._src.peft.sharding import (lora_placements, module_placement, placed,
                                              prefix_placement)
from layerlens_jax._src.peft.targets import LoRATarget, nnx_lora_target
from layerlens_jax._src.peft.tree import PEFT_PREFIX

__all__ = [
    "PEFT_PREFIX",
    "PeftParam",
    "LoRAWeight",
    "AdapterWeight",
    "PrefixWeight",
    "PEFT_FILTER",
    "BASE_FILTER",
    "LoRA",
    "Adapter",
    "Prefix",
    "lora_target_info",
    "prefix_target_info",
]

class PeftParam(nnx.LoRAParam):
    """Base type of every layerlens adapter variable (a subclass of ``nnx.LoRAParam``)."""


class LoRAWeight(PeftParam):
    """LoRA factors ``peft_lora_a`` / ``peft_lora_b``."""


class AdapterWeight(PeftParam):
    """Bottleneck adapter kernels and biases ``peft_adapter_*``."""


class PrefixWeight(PeftParam):
    """Prefix keys / values (or their reparameterisation) ``peft_prefix_*``."""


#: Selects exactly the adapter state (all methods).
PEFT_FILTER = PeftParam
#: Selects the frozen base parameters.
BASE_FILTER = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))

_zeros = nnx.initializers.zeros

#: Flat sizes drawn by a bucketed initialiser: 2**15 * 8**k, the smallest that holds the shape
#: (a few compiles per model; drawing up to 8x the values needed costs microseconds).
_MIN_BUCKET = 1 << 15
_BUCKET_GROWTH = 8


@dataclasses.dataclass(frozen=True, kw_only=True)
class BucketedInit:
    """A default initialiser whose draws compile once per size bucket, not once per shape.

    ``base(key, shape, dtype)`` is the JAX initialiser (what calling this object does). With JAX's
    partitionable threefry (its default) element ``i`` of a random draw depends only on the key
    and ``i``, so the first ``n`` values of a draw of size ``N >= n`` are the draw of size ``n``:
    :func:`_init` draws ``noise(key, (N,)) * factor`` in a program compiled once per noise and
    bucket ``N`` (the factor a runtime scalar) and keeps the first ``n`` values: equal bit for bit
    to ``jax.jit(base)`` (tested).
    """

    # the JAX initialiser this stands for
    base: Callable = dataclasses.field(compare=False)
    # "uniform": U(-1, 1) times sqrt(3 * scale / fan_in) (He / variance scaling, 2-D shapes);
    # "normal": N(0, 1) times ``scale`` (a fixed standard deviation)
    noise: str
    # the variance scale (uniform) or the standard deviation (normal)
    scale: float

    def __call__(self, key, shape, dtype=jnp.float32):
        return self.base(key, shape, dtype)

    def factor(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The scalar ``base`` multiplies its unit noise by, computed in ``dtype`` as JAX does."""
        if self.noise == "normal":
            return np.asarray(self.scale, dtype)
        variance = np.asarray(self.scale / shape[-2], dtype)  # fan_in of a 2-D kernel
        return np.sqrt(np.asarray(3, dtype) * variance)


_default_a_init = BucketedInit(base=nnx.initializers.he_uniform(), noise="uniform", scale=2.0)
_prefix_key_init = BucketedInit(base=nnx.initializers.normal(0.02), noise="normal", scale=0.02)


@functools.lru_cache(maxsize=None)
def _jitted_init(init: Callable) -> Callable:
    return jax.jit(init, static_argnums=(1, 2))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _scaled_noise(key: jax.Array, noise: str, size: int, dtype, factor: jax.Array) -> jax.Array:
    """``size`` draws of unit noise times ``factor``, the product taken in the same compiled
    program as the draws, as the JAX initialiser's (XLA may fuse it: results follow the program)."""
    if noise == "uniform":
        unit = jax.random.uniform(key, (size,), dtype, -1.0)
    else:
        unit = jax.random.normal(key, (size,), dtype)
    return unit * factor


def _bucketed(init: BucketedInit, key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    n = math.prod(shape)
    size = _MIN_BUCKET
    while size < n:
        size *= _BUCKET_GROWTH
    flat = _scaled_noise(key, init.noise, size, dtype, init.factor(shape, dtype))
    if isinstance(flat, jax.core.Tracer):  # under jit / eval_shape: slice in the traced program
        return flat[:n].reshape(shape)
    return jax.device_put(np.asarray(flat)[:n].reshape(shape))


def _init(init: Callable, key: jax.Array, shape, dtype) -> jax.Array:
    """``init(key, shape, dtype)`` as one compiled computation (eager initialisers otherwise
    compile each of their primitives separately for every new shape); the library's default
    initialisers compile once per size bucket (:class:`BucketedInit`), zeros not at all."""
    shape, dtype = tuple(int(d) for d in shape), jnp.dtype(dtype)
    if init is _zeros:
        return _zeros_array(shape, dtype)
    if (isinstance(init, BucketedInit) and dtype == jnp.float32
            and (len(shape) == 2 or init.noise == "normal")
            and jax.config.jax_threefry_partitionable):
        return _bucketed(init, key, shape, dtype)
    try:
        return _jitted_init(init)(key, shape, dtype)
    except TypeError:  # an unhashable initialiser
        return init(key, shape, dtype)


def _zeros_array(shape, dtype) -> jax.Array:
    """Zeros built on the host and transferred: no compiled computation per new shape
    (``jax.device_put``; ``jnp.asarray`` of a host array compiles a copy per shape)."""
    return jax.device_put(np.zeros(tuple(int(d) for d in shape), jnp.dtype(dtype)))


def _site_name(site):
    return f"site {site!r}" if site else "this module"


def lora_target_info(module: Any, site: str | None = None) -> LoRATarget:
    """How LoRA wraps ``module``: its :class:`~layerlens_jax._src.peft.targets.LoRATarget` (kind,
    fan-in / fan-out, kernel name and shape, stack, static delta arguments), read through the one
    table :data:`~layerlens_jax._src.peft.targets.LORA_KINDS`.

    ``fan_in`` / ``fan_out`` come from the module's declared features, so a module built under
    ``nnx.vmap`` (layers stacked for ``nnx.scan``) whose kernel has extra leading axes is recognised:
    ``stack`` is the tuple of those leading sizes (``()`` for an ordinary module) and the LoRA factors
    get the same leading axes. Raises ``ValueError`` naming the site when the module cannot carry
    LoRA.
    """
    return nnx_lora_target(module, _site_name(site))


def _stacked_init(init: Callable, key: jax.Array, stack: tuple[int, ...], shape, dtype):
    """``init`` for one layer, or independently per layer (split keys) for a stacked module."""
    if not stack or init is _zeros:
        return _init(init, key, tuple(stack) + tuple(shape), dtype)
    keys = jax.random.split(key, math.prod(stack))
    flat = jax.vmap(lambda k: init(k, tuple(shape), dtype))(keys)
    return flat.reshape(tuple(stack) + tuple(shape))


class LoRA(nnx.Module):
    """Low-rank adaptation of a linear / einsum / embedding / conv module.

    ``y = base(x) + scale * (dropout(x) @ A) @ B`` with ``A: (fan_in, rank)`` (He-uniform),
    ``B: (rank, fan_out)`` (zeros) and ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with
    ``use_rslora``). ``fan_in`` / ``fan_out`` are the flattened input / output sizes of the base kernel,
    so the trainable count is ``rank * (fan_in + fan_out)`` (no LoRA bias).

    Compared with ``nnx.LoRALinear``: wraps any existing module instance (no re-creation, the base
    Variables are shared), has alpha scaling and rsLoRA, supports LinearGeneral / Einsum / Embed
    (also ``attend``) / Conv, and :func:`layerlens_jax._src.peft.merge` folds it back into the kernel.

    Attributes: ``base_module`` (the wrapped module), ``peft_lora_a``, ``peft_lora_b``
    (:class:`LoRAWeight`), static ``rank``, ``alpha``, ``use_rslora``, ``scale``, ``site`` and
    ``target`` (its :class:`~layerlens_jax._src.peft.targets.LoRATarget`; ``kind``,
    ``kernel_shape``, ``stack`` repeat its fields).
    """

    method = "lora"

    def __init__(self, base_module: nnx.Module, rank: int, *, alpha: float = 16.0,
                 use_rslora: bool = False, dropout: float = 0.0, dtype: Any = None,
                 param_dtype: Any = jnp.float32, a_init: Callable = _default_a_init,
                 b_init: Callable = _zeros, rngs: nnx.Rngs, site: str | None = None):
        if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
            raise ValueError(f"LoRA rank for {_site_name(site)} must be a positive int, got {rank!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout for {_site_name(site)} must be in [0, 1), got {dropout}")
        target = lora_target_info(base_module, site)
        self.base_module = base_module
        self.target = target
        self.kind = target.kind
        self.kernel_shape = target.kernel_shape
        self.stack = target.stack
        self.rank = rank
        self.alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scale = functional.lora_scale(alpha, rank, use_rslora)
        self.dtype = dtype
        self.site = site
        a_shape, b_shape = (target.fan_in, rank), (rank, target.fan_out)
        a_at, b_at = lora_placements(getattr(base_module, target.kernel_name),
                                     n_stack=len(self.stack), n_in=target.in_axes,
                                     a_shape=self.stack + a_shape, b_shape=self.stack + b_shape)
        self.peft_lora_a = placed(a_at, LoRAWeight, _stacked_init(a_init, rngs.params(), self.stack,
                                                                  a_shape, param_dtype))
        self.peft_lora_b = placed(b_at, LoRAWeight, _stacked_init(b_init, rngs.params(), self.stack,
                                                                  b_shape, param_dtype))
        self.dropout = nnx.data(nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None)

    @property
    def size(self) -> int:
        return self.rank

    def delta(self, x: jax.Array, **kwargs) -> jax.Array:
        """The LoRA term alone for input ``x`` (what is added to the base output); ``kwargs`` are
        the base call's keyword arguments (an Einsum's ``einsum_str`` override is honoured)."""
        return self.target.delta(x, self.peft_lora_a[...], self.peft_lora_b[...], self.scale,
                                 dtype=self.dtype, dropout=self.dropout, call_kwargs=kwargs)

    def __call__(self, x: jax.Array, *args, **kwargs) -> jax.Array:
        y = self.base_module(x, *args, **kwargs)
        return y + self.delta(x, **kwargs).astype(y.dtype)

    def attend(self, query: jax.Array, **kwargs) -> jax.Array:
        """``Embed.attend`` with the adapted table (tied output projections)."""
        if self.kind != "embed":
            raise AttributeError(f"attend() exists only for an embedding LoRA, not {self.kind}")
        y = self.base_module.attend(query, **kwargs)
        return y + functional.lora_attend_delta(query, self.peft_lora_a[...], self.peft_lora_b[...],
                                       self.scale, dtype=self.dtype).astype(y.dtype)

    def merged_kernel(self) -> jax.Array:
        """The base kernel plus the folded LoRA update, in the kernel's dtype (per layer for a
        stacked module)."""
        kernel = getattr(self.base_module, self.target.kernel_name)[...]
        a = self.peft_lora_a[...].astype(jnp.float32)
        b = self.peft_lora_b[...].astype(jnp.float32)
        n = len(self.stack) if a.ndim > 2 else 0
        fn = functools.partial(self.target.delta_kernel, scale=self.scale)
        for _ in range(n):
            fn = jax.vmap(fn)
        delta = fn(a, b)
        return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


class Adapter(nnx.Module):
    """Bottleneck adapter on a block's output: ``h + up(act(down(h)))`` with ``h = base(*args)``.

    ``down: (width, bottleneck)`` (He-uniform) + bias, ``up: (bottleneck, width)`` + bias, both zero,
    so the trainable count is ``2 * width * bottleneck + bottleneck + width`` and the wrapped block is
    the identity at initialisation.

    Placement: the adapter transforms the output of a *sub-layer* (attention or feed-forward
    ``F(x)``) before the model's own residual add and norm. A plan with adapters on both the
    attention and feed-forward blocks of a layer is Houlsby et al. (2019); on the feed-forward
    block only, Pfeiffer et al. (2021). With ``base_module=None`` it is a standalone layer
    ``h -> h + delta(h)``.
    """

    method = "adapter"

    def __init__(self, base_module: nnx.Module | None, bottleneck: int, *, features: int,
                 activation: str = "gelu", dtype: Any = None, param_dtype: Any = jnp.float32,
                 down_init: Callable = _default_a_init, rngs: nnx.Rngs,
                 site: str | None = None):
        if not isinstance(bottleneck, int) or isinstance(bottleneck, bool) or bottleneck <= 0:
            raise ValueError(f"adapter bottleneck for {_site_name(site)} must be a positive int, "
                             f"got {bottleneck!r}")
        if not isinstance(features, int) or features <= 0:
            raise ValueError(f"adapter width for {_site_name(site)} must be a positive int, "
                             f"got {features!r}")
        functional.activation_fn(activation)  # validate early
        self.base_module = nnx.data(base_module)
        self.bottleneck = bottleneck
        self.features = features
        self.activation = activation
        self.dtype = dtype
        self.site = site
        at = module_placement(base_module)  # replicated on the block's mesh
        self.peft_adapter_down = placed(at, AdapterWeight, _init(
            down_init, rngs.params(), (features, bottleneck), param_dtype))
        self.peft_adapter_down_bias = placed(at, AdapterWeight, _zeros_array((bottleneck,),
                                                                             param_dtype))
        self.peft_adapter_up = placed(at, AdapterWeight, _zeros_array((bottleneck, features),
                                                                      param_dtype))
        self.peft_adapter_up_bias = placed(at, AdapterWeight, _zeros_array((features,),
                                                                           param_dtype))

    @property
    def size(self) -> int:
        return self.bottleneck

    def delta(self, h: jax.Array) -> jax.Array:
        if not isinstance(h, jax.Array) and not hasattr(h, "shape"):
            raise TypeError(f"adapter on {_site_name(self.site)} expects the block to return one "
                            f"array, got {type(h).__name__}")
        if h.shape[-1] != self.features:
            raise ValueError(f"adapter on {_site_name(self.site)} was built for width "
                             f"{self.features} but the block returned shape {h.shape}")
        return functional.adapter_delta(h, self.peft_adapter_down[...], self.peft_adapter_down_bias[...],
                               self.peft_adapter_up[...], self.peft_adapter_up_bias[...],
                               self.activation, dtype=self.dtype)

    def __call__(self, *args, **kwargs) -> jax.Array:
        h = args[0] if self.base_module is None else self.base_module(*args, **kwargs)
        return h + self.delta(h).astype(h.dtype)


_ATTN_KWARGS_WITHOUT_CAUSAL = object()


class Prefix(nnx.Module):
    """Learned prefix keys and values for a multi-head attention module.

    An instance is an ``attention_fn``: assign it to ``nnx.MultiHeadAttention.attention_fn`` (what
    :func:`layerlens_jax._src.peft.apply_plan` does) and it is called as
    ``prefix(query, key, value, mask=..., is_causal=..., **kwargs)`` with ``query`` shaped
    ``(batch..., length, heads, head_dim)``; it calls the module's previous ``attention_fn``
    (``base_fn``) for the sequence part. See :func:`layerlens_jax._src.peft.functional.prefix_attention`
    for the two modes (``"parallel"``: identity at init, the default; ``"joint"``: one softmax).

    **Opt-in protocol for user attention modules**: a module can take a prefix when it has an
    ``attention_fn`` attribute that it calls as above, and ``num_heads`` plus ``head_dim`` (or
    ``qkv_features``) attributes (``num_kv_heads`` for grouped-query attention). Declare the module a
    prefix site with ``__layerlens_kind__ = "attention"``.

    Trainable count: ``2 * length * kv_heads * head_dim``; with ``reparam_hidden=m`` (the MLP of Li &
    Liang, an explicit option) it is ``length*E + E*m + m + m*2D + 2D`` with ``D = kv_heads*head_dim``
    and ``E = embed_features`` (the attention's input width when applied by ``apply_plan``; default
    ``D``): a prefix embedding, then ``tanh`` MLP to keys and values. The value half of the last
    layer starts at zero, so the ``parallel`` mode is still the identity at initialisation.
    """

    method = "prefix"

    def __init__(self, length: int, num_heads: int, head_dim: int, *,
                 base_fn: Callable[..., jax.Array] = nnx.dot_product_attention,
                 mode: str = "parallel", reparam_hidden: int | None = None,
                 embed_features: int | None = None, key_init: Callable = _prefix_key_init,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs, site: str | None = None,
                 attention: nnx.Module | None = None):
        if not isinstance(length, int) or isinstance(length, bool) or length <= 0:
            raise ValueError(f"prefix length for {_site_name(site)} must be a positive int, "
                             f"got {length!r}")
        if mode not in ("parallel", "joint"):
            raise ValueError(f"prefix mode for {_site_name(site)} must be 'parallel' or 'joint', "
                             f"got {mode!r}")
        if isinstance(base_fn, Prefix):
            raise ValueError(f"{_site_name(site)} already has a prefix")
        self.length, self.num_heads, self.head_dim = length, int(num_heads), int(head_dim)
        self.base_fn = base_fn
        self.mode = mode
        self.reparam_hidden = reparam_hidden
        self.site = site
        shape = (length, self.num_heads, self.head_dim)
        if reparam_hidden is None:
            at = prefix_placement(attention, self.num_heads)  # heads like the key projection's
            self.peft_prefix_key = placed(at, PrefixWeight, _init(key_init, rngs.params(), shape,
                                                                  param_dtype))
            self.peft_prefix_value = placed(at, PrefixWeight, _zeros_array(shape, param_dtype))
        else:
            at = module_placement(attention)  # replicated on the attention's mesh
            d, h = self.num_heads * self.head_dim, int(reparam_hidden)
            e = int(embed_features or d)
            init = nnx.initializers.lecun_normal()
            self.peft_prefix_embed = placed(at, PrefixWeight, _init(key_init, rngs.params(),
                                                                    (length, e), param_dtype))
            self.peft_prefix_mlp_w1 = placed(at, PrefixWeight, _init(init, rngs.params(), (e, h),
                                                                     param_dtype))
            self.peft_prefix_mlp_b1 = placed(at, PrefixWeight, _zeros_array((h,), param_dtype))
            w2_keys = _init(init, rngs.params(), (h, d), param_dtype)  # value half zero: identity at init
            self.peft_prefix_mlp_w2 = placed(at, PrefixWeight, jnp.concatenate(
                [w2_keys, _zeros_array((h, d), param_dtype)], axis=1))
            self.peft_prefix_mlp_b2 = placed(at, PrefixWeight, _zeros_array((2 * d,), param_dtype))

    @property
    def size(self) -> int:
        return self.length

    def key_value(self) -> tuple[jax.Array, jax.Array]:
        """The prefix keys and values, each ``(length, kv_heads, head_dim)``."""
        if self.reparam_hidden is None:
            return self.peft_prefix_key[...], self.peft_prefix_value[...]
        return functional.prefix_reparam(self.peft_prefix_embed[...], self.peft_prefix_mlp_w1[...],
                                self.peft_prefix_mlp_b1[...], self.peft_prefix_mlp_w2[...],
                                self.peft_prefix_mlp_b2[...], self.num_heads, self.head_dim)

    def __call__(self, query, key, value, bias=None, mask=None, *,
                 is_causal: Any = _ATTN_KWARGS_WITHOUT_CAUSAL, **kwargs):
        pk, pv = self.key_value()
        if bias is not None:
            if self.mode == "joint":
                raise ValueError(f"prefix on {_site_name(self.site)}: an attention bias is not "
                                 f"supported in 'joint' mode")
            kwargs["bias"] = bias
        passed = is_causal is not _ATTN_KWARGS_WITHOUT_CAUSAL
        return functional.prefix_attention(query, key, value, pk, pv, base_fn=self.base_fn, mode=self.mode,
                                  mask=mask, is_causal=bool(is_causal) if passed else False,
                                  pass_is_causal=passed, base_kwargs=kwargs)


def prefix_target_info(module: Any, site: str | None = None) -> dict[str, int]:
    """``{"num_heads", "head_dim"}`` (key/value heads) for a prefix on ``module``; ``ValueError``
    naming the site when the module does not follow the attention protocol."""
    where = _site_name(site)
    if not hasattr(module, "attention_fn"):
        raise ValueError(f"prefix cannot attach to {where} of type {type(module).__name__}: it has "
                         f"no `attention_fn` attribute (see the Prefix docstring for the protocol)")
    if isinstance(module.attention_fn, Prefix):
        raise ValueError(f"{where} already has a prefix")
    nh = getattr(module, "num_kv_heads", None) or getattr(module, "num_heads", None)
    hd = getattr(module, "head_dim", None)
    if hd is None and getattr(module, "qkv_features", None) and getattr(module, "num_heads", None):
        hd = module.qkv_features // module.num_heads
    if not nh or not hd:
        raise ValueError(f"prefix on {where}: cannot read num_heads / head_dim from "
                         f"{type(module).__name__}")
    return dict(num_heads=int(nh), head_dim=int(hd))
