"""Linen shell: a wrapper that shares the model's scope and runs it inside ``nn.intercept_methods``.

``PeftLinen(model, assignments, options)`` calls ``model`` unchanged; an interceptor matches each
intercepted module's scope path against the plan and, for a match, creates the adapter parameters
*in that module's scope* (``ctx.module.param("peft_lora_a", ...)``, as gemma's ``peft`` does) and
adds the adapter term from :mod:`layerlens_jax._src.peft.functional`. No edit of the user's model code;
the base parameter tree is unchanged (adapter leaves are added next to the site's own parameters,
``<site>/peft_*``) and it works under ``nn.scan`` (adapter parameters get the scan axis).

Prefix tuning swaps the intercepted attention module's ``attention_fn`` for the duration of its
call (Linen has no other hook into it).

A site the model never calls, or a module of the wrong kind at a planned path, raises
``ValueError`` naming the site at the first call (``init``).
"""

from __future__ import annotations

import functools
import inspect
from typing import Mapping

import jax
import jax.numpy as jnp
import flax.errors
from flax import linen as nn

from layerlens_jax._src.einsum import einsum_layout
from layerlens_jax._src.peft import functional
from layerlens_jax._src.methods import METHOD_KINDS, PeftOptions
from layerlens_jax._src.peft.targets import LoRATarget, linen_lora_target
from layerlens_jax._src.peft.tree import flatten_tree, partition_params, unflatten_tree
from layerlens_jax._src.sites import site_kind_of

__all__ = ["PeftLinen", "init_adapters", "merge_linen"]

_he_uniform = nn.initializers.he_uniform()
_zeros = nn.initializers.zeros


def _param(module: nn.Module, name: str, init, shape, dtype):
    """``module.param`` that also works while a setup-style (non-compact) method runs, and when a
    second method of the module uses the same adapter (a tied ``Embed``: ``__call__`` and
    ``attend`` share one LoRA)."""
    try:
        if module._initialization_allowed:  # compact method: the normal case
            return module.param(name, init, shape, dtype)
        state = module._state
        prev = state.in_compact_method
        state.in_compact_method = True  # a setup-style module: allow the adapter's own variables
        try:
            return module.param(name, init, shape, dtype)
        finally:
            state.in_compact_method = prev
    except flax.errors.NameInUseError:  # created by the module's other method in this pass
        return module.get_variable("params", name)


class PeftLinen(nn.Module):
    """A Linen model with LoRA / Adapter / Prefix at the planned sites (see module docstring).

    Use like the model: ``variables = init_adapters(wrapped, rng, base_variables, *example)``,
    then ``wrapped.apply(variables, *inputs)``. ``wrapped.apply(variables, *a, method_name="embed")``
    runs another method of the model (``method_name`` defaults to ``"__call__"``).
    Set ``deterministic=False`` (``wrapped.clone(deterministic=False)``) and pass
    ``rngs={"dropout": key}`` for LoRA dropout.
    """

    model: nn.Module
    assignments: tuple[tuple[str, str, int], ...]
    options: PeftOptions = PeftOptions()
    deterministic: bool = True

    @classmethod
    def create(cls, model: nn.Module, assignments: Mapping[str, tuple[str, int]],
               options: PeftOptions) -> "PeftLinen":
        return cls(model=model, options=options,
                   assignments=tuple(sorted((s, m, int(z)) for s, (m, z) in assignments.items())))

    def setup(self):
        nn.share_scope(self, self.model)

    def __call__(self, *args, method_name: str = "__call__", **kwargs):
        table = {s: (m, z) for s, m, z in self.assignments}
        seen: set[str] = set()
        interceptor = functools.partial(self._intercept, table, seen)
        with nn.intercept_methods(interceptor):
            out = getattr(self.model, method_name)(*args, **kwargs)
        if method_name == "__call__":
            missing = sorted(set(table) - seen)
            if missing:
                raise ValueError(f"plan names site(s) {missing} which {type(self.model).__name__} "
                                 f"does not have (no module at that path was called)")
        return out

    # ------------------------------------------------------------------ interception
    @nn.nowrap
    def _intercept(self, table, seen, next_fun, args, kwargs, ctx):
        module = ctx.module
        scope = module.scope
        path = "/".join(scope.path) if scope is not None else None
        entry = table.get(path) if path else None
        if entry is None:
            return next_fun(*args, **kwargs)
        method, size = entry
        kind = site_kind_of(module)
        if kind not in METHOD_KINDS[method]:
            raise ValueError(f"plan assigns {method} to site {path!r} of kind {kind!r} "
                             f"({type(module).__name__}); {method} needs a site of kind "
                             f"{' or '.join(METHOD_KINDS[method])}")
        if method == "lora" and ctx.method_name == "attend" and isinstance(module, nn.Embed):
            seen.add(path)
            y = next_fun(*args, **kwargs)
            target = linen_lora_target(module, f"site {path!r}")
            a, b, scale = self._lora_params(module, target, size)
            return y + functional.lora_attend_delta(args[0], a, b, scale).astype(y.dtype)
        if ctx.method_name != "__call__":
            return next_fun(*args, **kwargs)
        seen.add(path)
        if method == "lora":
            return self._lora(module, path, size, next_fun, args, kwargs)
        if method == "adapter":
            h = next_fun(*args, **kwargs)
            if not hasattr(h, "shape"):
                raise TypeError(f"adapter on site {path!r} expects the block to return one array, "
                                f"got {type(h).__name__}")
            d, opts = h.shape[-1], self.options
            down = _param(module, "peft_adapter_down", _he_uniform, (d, size), opts.param_dtype)
            down_b = _param(module, "peft_adapter_down_bias", _zeros, (size,), opts.param_dtype)
            up = _param(module, "peft_adapter_up", _zeros, (size, d), opts.param_dtype)
            up_b = _param(module, "peft_adapter_up_bias", _zeros, (d,), opts.param_dtype)
            return h + functional.adapter_delta(h, down, down_b, up, up_b,
                                       opts.adapter_activation).astype(h.dtype)
        return self._prefix(module, path, size, next_fun, args, kwargs)

    @nn.nowrap
    def _lora_params(self, module, target: LoRATarget, size):
        opts = self.options
        a = _param(module, "peft_lora_a", _he_uniform, (target.fan_in, size), opts.param_dtype)
        b = _param(module, "peft_lora_b", _zeros, (size, target.fan_out), opts.param_dtype)
        return a, b, functional.lora_scale(opts.lora_alpha, size, opts.use_rslora)

    @nn.nowrap
    def _dropout(self, module, x):
        rate = self.options.lora_dropout
        if rate <= 0.0 or self.deterministic:
            return x
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
        return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)

    @nn.nowrap
    def _lora(self, module, path, size, next_fun, args, kwargs):
        y = next_fun(*args, **kwargs)
        x = args[0] if args else kwargs.get("inputs")
        target = linen_lora_target(module, f"site {path!r}")
        _check_linen_mergeable(target, path)
        a, b, scale = self._lora_params(module, target, size)
        delta = target.delta(x, a, b, scale, dropout=functools.partial(self._dropout, module),
                             call_kwargs=kwargs)
        return y + delta.astype(y.dtype)

    @nn.nowrap
    def _prefix(self, module, path, size, next_fun, args, kwargs):
        if not hasattr(module, "attention_fn"):
            raise ValueError(f"prefix cannot attach to site {path!r}: {type(module).__name__} has "
                             f"no `attention_fn`")
        opts = self.options
        orig = module.attention_fn
        orig_params = inspect.signature(orig).parameters
        accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in orig_params.values())

        def prefix_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                      dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                      precision=None, module=None, force_fp32_for_softmax=False,
                      qk_attn_weights_einsum=None, attn_weights_value_einsum=None):
            given = dict(bias=bias, broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
                         dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype,
                         precision=precision, module=module,
                         force_fp32_for_softmax=force_fp32_for_softmax,
                         qk_attn_weights_einsum=qk_attn_weights_einsum,
                         attn_weights_value_einsum=attn_weights_value_einsum)
            base_kwargs = {k: v for k, v in given.items()
                           if (k in orig_params or accepts_var_kw) and (
                               v is not None or k in ("dtype", "precision"))}
            pk, pv = self._prefix_kv(mod, size, key.shape[-2], key.shape[-1], d_in, opts)
            return functional.prefix_attention(query, key, value, pk, pv, base_fn=orig, mode=opts.prefix_mode,
                                      mask=mask, is_causal=False, pass_is_causal=False,
                                      base_kwargs=base_kwargs)

        mod = module
        inputs_q = args[0] if args else kwargs.get("inputs_q")
        d_in = inputs_q.shape[-1]
        object.__setattr__(module, "attention_fn", prefix_fn)
        try:
            return next_fun(*args, **kwargs)
        finally:
            object.__setattr__(module, "attention_fn", orig)

    @nn.nowrap
    def _prefix_kv(self, module, length, heads, head_dim, d_in, opts):
        dt = opts.param_dtype
        shape = (length, heads, head_dim)
        if opts.prefix_reparam_hidden is None:
            k = _param(module, "peft_prefix_key", nn.initializers.normal(0.02), shape, dt)
            v = _param(module, "peft_prefix_value", _zeros, shape, dt)
            return k, v
        d, h = heads * head_dim, int(opts.prefix_reparam_hidden)
        lecun = nn.initializers.lecun_normal()

        def w2_init(key, shape, dtype):
            return jnp.concatenate([lecun(key, (h, d), dtype), jnp.zeros((h, d), dtype)], axis=1)

        e = _param(module, "peft_prefix_embed", nn.initializers.normal(0.02), (length, d_in), dt)
        w1 = _param(module, "peft_prefix_mlp_w1", lecun, (d_in, h), dt)
        b1 = _param(module, "peft_prefix_mlp_b1", _zeros, (h,), dt)
        w2 = _param(module, "peft_prefix_mlp_w2", w2_init, (h, 2 * d), dt)
        b2 = _param(module, "peft_prefix_mlp_b2", _zeros, (2 * d,), dt)
        return functional.prefix_reparam(e, w1, b1, w2, b2, heads, head_dim)


def _check_linen_mergeable(target: LoRATarget, path: str) -> None:
    """:func:`merge_linen` folds ``a @ b`` reshaped to the kernel's shape (it sees only the
    variables, not the module): an einsum whose contracted kernel axes are not its leading axes
    (``"BSD,CDKH->CBSKH"``) needs a transpose it cannot know, so its LoRA is refused here (the NNX
    ``LoRA`` supports it)."""
    if target.kind != "einsum":
        return
    args = dict(target.delta_args)
    layout = einsum_layout(args["einsum_str"], args["kernel_shape"], f"site {path!r}")
    if layout.in_axes != tuple(range(len(layout.in_axes))):
        raise ValueError(f"LoRA on site {path!r}: Linen LoRA needs the einsum's contracted kernel "
                         f"axes first, and {layout.equation!r} contracts kernel axes "
                         f"{layout.in_axes}; use the NNX model, or put them first in the kernel")


def init_adapters(wrapped: PeftLinen, rng: jax.Array, variables: Mapping, *args, **kwargs) -> dict:
    """Variables for ``wrapped``: the given base ``variables`` plus freshly initialised adapters.

    Runs ``wrapped.apply(variables, *args, mutable="params")`` (jit-compiled) on example inputs: the
    base parameters are used as they are, only the missing ``peft_*`` leaves are created (with
    ``rng`` as the ``params`` stream). Raises ``ValueError`` when the base variables lack a parameter
    the model creates or a shape differs.
    """
    def run(v, r, a, k):
        return wrapped.apply(v, *a, rngs={"params": r}, mutable=["params"], **k)[1]

    try:
        fresh = jax.jit(run)(dict(variables), rng, args, kwargs)
    except Exception as e:  # Linen reports a base shape mismatch as a ScopeParamShapeError
        if "ScopeParamShapeError" in type(e).__name__ or "shape" in str(e).lower() and \
                "param" in str(e).lower():
            raise ValueError(f"base variables do not match the model: {e}") from e
        raise
    adapters, base = partition_params(fresh["params"])
    given = flatten_tree(variables["params"])
    made = flatten_tree(base)
    if set(given) != set(made):
        extra = sorted("/".join(k) for k in set(given) ^ set(made))[:5]
        raise ValueError(f"base variables do not match the model: differing parameters {extra}")
    params = unflatten_tree({**given, **flatten_tree(adapters)})
    return {**variables, "params": params}


def merge_linen(wrapped: PeftLinen, variables: Mapping) -> tuple[nn.Module, dict]:
    """Fold LoRA into the base kernels of a Linen model: ``(module, variables)``; the module is the
    bare model when nothing else remains, else a ``PeftLinen`` with the adapters / prefixes left."""
    flat = flatten_tree(variables["params"])
    remaining = []
    for site, method, size in wrapped.assignments:
        if method != "lora":
            remaining.append((site, method, size))
            continue
        key = tuple(site.split("/"))
        a = flat.pop(key + ("peft_lora_a",), None)
        b = flat.pop(key + ("peft_lora_b",), None)
        if a is None or b is None:
            raise ValueError(f"variables have no LoRA factors for site {site!r}; initialise them "
                             f"with init_adapters first")
        name = "embedding" if key + ("embedding",) in flat else "kernel"
        kernel = flat[key + (name,)]
        scale = functional.lora_scale(wrapped.options.lora_alpha, size, wrapped.options.use_rslora)
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST) * scale
        flat[key + (name,)] = (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(
            kernel.dtype)
    out = {**variables, "params": unflatten_tree(flat)}
    if not remaining:
        return wrapped.model, out
    return wrapped.clone(assignments=tuple(remaining)), out
