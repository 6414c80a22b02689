"""A Llama / Gemma-style reference decoder in Flax NNX, and its causal-LM loss.

RMSNorm (pre-norm), rotary position embeddings (RoPE, rotate-half convention), grouped-query
attention (``num_heads`` query heads sharing ``num_kv_heads`` key/value heads), a SwiGLU MLP,
optional tied embeddings (``embed.attend`` as the output layer) and ``param_dtype="bfloat16"``.
Every projection is a plain ``nnx.Linear`` without bias.

Two layouts of the same maths, switched by ``DecoderConfig.scan_layers``:

* unscanned (default): ``layers`` is an ``nnx.List`` of blocks, so every projection is its own
  site (``layers/0/attn/q_proj``, ...);
* scanned: the blocks are created with ``nnx.vmap`` (parameters stacked on a leading layer axis,
  ``layers/attn/q_proj/kernel`` has shape ``(num_layers, D, H * head_dim)``) and applied with
  ``nnx.scan``, the way MaxText / tunix models are written.

:func:`stack_layers` and :func:`unstack_layers` convert a base model between the two layouts
(same weights, same logits).

Module tree (site kinds in brackets; the scanned layout drops the ``{i}``)::

    embed [embedding]
    layers/{i}/attn_norm [norm]    layers/{i}/attn [block]    layers/{i}/attn/{q,k,v,o}_proj
    layers/{i}/mlp_norm [norm]     layers/{i}/mlp [block]     layers/{i}/mlp/{gate,up,down}_proj
    final_norm [norm]              lm_head [linear]  (absent with tie_embeddings)
    every *_proj is [linear]

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from layerlens_jax.decoder import Decoder, DecoderConfig, causal_lm_loss
  >>> model = Decoder(DecoderConfig.tiny(), rngs=nnx.Rngs(0))
  >>> ids = jnp.zeros((2, 8), jnp.int32)
  >>> model(ids).shape
  (2, 8, 64)
  >>> causal_lm_loss(model, {"input_ids": ids}).shape
  (2,)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "DecoderConfig",
    "Decoder",
    "DecoderBlock",
    "Attention",
    "SwiGLU",
    "causal_lm_loss",
    "rope_angles",
    "apply_rope",
    "attention_mask_bias",
    "stack_layers",
    "unstack_layers",
]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Shape and options of the reference decoder (defaults: a small byte-level model)."""

    vocab_size: int = 256  # token vocabulary (256: bytes)
    hidden_size: int = 256  # model width D
    num_layers: int = 4  # decoder blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (divides num_heads; == num_heads: multi-head)
    head_dim: int | None = None  # per-head width (None: hidden_size // num_heads)
    intermediate_size: int = 768  # SwiGLU hidden width
    rope_theta: float = 10_000.0  # RoPE base wavelength
    norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_embeddings: bool = False  # output logits = embed.attend(h) (no lm_head)
    scan_layers: bool = False  # stack the blocks (nnx.vmap) and apply them with nnx.scan
    param_dtype: str = "float32"  # parameter storage: "float32", "bfloat16" or "float16"
    dtype: str = "float32"  # activation / matmul dtype (softmax and logits are float32)
    init_std: float = 0.02  # std of the normal initialiser of every kernel and the embedding

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DecoderConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"DecoderConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"DecoderConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}; set head_dim")
        if self.head_size % 2:
            raise ValueError(f"DecoderConfig.head_dim={self.head_size} must be even (RoPE rotates "
                             f"pairs)")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"DecoderConfig.{name}={getattr(self, name)!r} is not one of "
                                 f"{sorted(_DTYPES)}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DecoderConfig.{name} must be a finite positive number, got "
                                 f"{value!r}")

    @property
    def head_size(self) -> int:
        """The per-head width actually used."""
        return self.hidden_size // self.num_heads if self.head_dim is None else self.head_dim

    @classmethod
    def tiny(cls, **overrides) -> "DecoderConfig":
        """A few-ten-thousand-parameter config for tests (compiles in seconds on CPU)."""
        base = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64)
        base.update(overrides)
        return cls(**base)


# ------------------------------------------------------------------------------ pure maths


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, shape ``positions.shape + (head_dim // 2,)``, of angles p / theta^(2j/d)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` (..., T, heads, head_dim) by position: pair ``(x_j, x_{j+d/2})`` by angle j.

    ``cos``/``sin`` are (T, head_dim // 2) from :func:`rope_angles` (rotate-half convention, as
    Llama and Gemma). Computed in float32, returned in ``x``'s dtype.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    c, s = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def attention_mask_bias(seq_len: int, attention_mask: jax.Array | None) -> jax.Array:
    """Boolean (B or 1, 1, 1, T, T) mask: query t may attend key s iff s <= t and key s is real."""
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
    if attention_mask is None:
        return causal[None, None, None]
    return causal[None, None, None] & attention_mask.astype(bool)[:, None, None, None, :]


def _init(cfg: DecoderConfig):
    return nnx.initializers.normal(cfg.init_std)


def _linear(cfg: DecoderConfig, d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=_init(cfg),
                      dtype=_DTYPES[cfg.dtype], param_dtype=_DTYPES[cfg.param_dtype], rngs=rngs)


def _rms_norm(cfg: DecoderConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
    return nnx.RMSNorm(cfg.hidden_size, epsilon=cfg.norm_eps, dtype=_DTYPES[cfg.dtype],
                       param_dtype=_DTYPES[cfg.param_dtype], rngs=rngs)


# ---------------------------------------------------------------------------------- modules


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE: query head h reads key/value head h // groups."""

    __layerlens_kind__ = "block"

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_heads, cfg.num_kv_heads,
                                                            cfg.head_size)
        d, hd = cfg.hidden_size, cfg.head_size
        self.q_proj = _linear(cfg, d, cfg.num_heads * hd, rngs)
        self.k_proj = _linear(cfg, d, cfg.num_kv_heads * hd, rngs)
        self.v_proj = _linear(cfg, d, cfg.num_kv_heads * hd, rngs)
        self.o_proj = _linear(cfg, cfg.num_heads * hd, d, rngs)

    def __call__(self, x, cos, sin, mask):
        b, t, _ = x.shape
        kv, groups, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, self.num_heads, hd), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, kv, hd), cos, sin)
        v = self.v_proj(x).reshape(b, t, kv, hd)
        q = q.reshape(b, t, kv, groups, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(hd)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.num_heads * hd)
        return self.o_proj(out)


class SwiGLU(nnx.Module):
    """The gated feed-forward sub-layer ``down(silu(gate(x)) * up(x))``."""

    __layerlens_kind__ = "block"

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.up_proj = _linear(cfg, cfg.hidden_size, cfg.intermediate_size, rngs)
        self.down_proj = _linear(cfg, cfg.intermediate_size, cfg.hidden_size, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """One pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.attn_norm = _rms_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = _rms_norm(cfg, rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, mask):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask)
        return x + self.mlp(self.mlp_norm(x))


@nnx.scan(in_axes=(nnx.Carry, 0, None, None, None), out_axes=nnx.Carry)
def _scan_blocks(x, block, cos, sin, mask):
    return block(x, cos, sin, mask)


def _stacked_blocks(cfg: DecoderConfig, rngs: nnx.Rngs) -> DecoderBlock:
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
        return DecoderBlock(cfg, rngs=rngs)

    return create(rngs)


class Decoder(nnx.Module):
    """Causal decoder-only LM. ``model(input_ids, attention_mask=None) -> logits (B, T, vocab)``.

    ``attention_mask`` (B, T) 0/1 hides padded keys (on top of the causal mask); logits are
    float32 whatever ``param_dtype`` / ``dtype``.
    """

    def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=_init(cfg),
                               dtype=_DTYPES[cfg.dtype], param_dtype=_DTYPES[cfg.param_dtype],
                               rngs=rngs)
        if cfg.scan_layers:
            self.layers = _stacked_blocks(cfg, rngs)
        else:
            self.layers = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _rms_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, cfg.hidden_size, cfg.vocab_size, rngs)

    def __call__(self, input_ids, attention_mask=None):
        cfg = self.config
        t = input_ids.shape[1]
        cos, sin = rope_angles(jnp.arange(t), cfg.head_size, cfg.rope_theta)
        mask = attention_mask_bias(t, attention_mask)
        x = self.embed(input_ids)
        if cfg.scan_layers:
            x = _scan_blocks(x, self.layers, cos, sin, mask)
        else:
            for block in self.layers:
                x = block(x, cos, sin, mask)
        x = self.final_norm(x)
        logits = self.embed.attend(x) if cfg.tie_embeddings else self.lm_head(x)
        return logits.astype(jnp.float32)


# ------------------------------------------------------------------------------------- loss


def causal_lm_loss(model: Any, batch: Mapping[str, Any]) -> jax.Array:
    """Per-example mean next-token cross-entropy, shape (B,).

    ``batch["input_ids"]`` (B, T); optional ``batch["attention_mask"]`` (B, T) 0/1. Position t
    predicts token t + 1; a prediction counts only where both tokens are real. An example with no
    counted prediction has loss 0.
    """
    ids = jnp.asarray(batch["input_ids"])
    real = batch.get("attention_mask")
    logits = model(ids, real)
    real = jnp.ones(ids.shape, jnp.float32) if real is None else jnp.asarray(real, jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    counted = real[:, 1:] * real[:, :-1]
    return jnp.sum(nll * counted, axis=1) / jnp.maximum(jnp.sum(counted, axis=1), 1.0)


# --------------------------------------------------------------------------- layout changes


def _check_base(model: Any, scan_layers: bool, name: str) -> DecoderConfig:
    if not isinstance(model, Decoder):
        raise TypeError(f"{name} expects a Decoder, got {type(model).__name__}")
    if model.config.scan_layers != scan_layers:
        layout = "scanned" if model.config.scan_layers else "unscanned"
        raise ValueError(f"{name}: the model is already {layout}")
    if jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) or jax.tree.leaves(
            nnx.state(model, nnx.LoRAParam)):
        raise ValueError(f"{name}: the model holds state other than base parameters (adapters? "
                         f"convert the base model, or merge first)")
    return model.config


def _relayout(model: Decoder, cfg: DecoderConfig, layers: Any) -> Decoder:
    target = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(target)
    params = nnx.state(model, nnx.Param).to_pure_dict()
    params["layers"] = layers
    state.replace_by_pure_dict(params)
    return nnx.merge(graphdef, state)


def stack_layers(model: Decoder) -> Decoder:
    """The scanned twin of an unscanned base decoder: every block parameter stacked on axis 0."""
    cfg = _check_base(model, False, "stack_layers")
    layers = nnx.state(model.layers, nnx.Param).to_pure_dict()
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[layers[i] for i in range(cfg.num_layers)])
    return _relayout(model, dataclasses.replace(cfg, scan_layers=True), stacked)


def unstack_layers(model: Decoder) -> Decoder:
    """The unscanned twin of a scanned base decoder: block ``i`` holds slice ``i`` of the stack."""
    cfg = _check_base(model, True, "unstack_layers")
    stacked = nnx.state(model.layers, nnx.Param).to_pure_dict()
    layers = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.num_layers)}
    return _relayout(model, dataclasses.replace(cfg, scan_layers=False), layers)
