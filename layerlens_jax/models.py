"""Reference models: a BERT-style encoder classifier in Flax NNX and its Linen twin.

Both twins use the same submodule names, so a site path (``encoder/layers_0/attention/mha/query``)
and a parameter path mean the same thing in either, and ``nnx_params_as_linen(model)`` turns the
NNX parameters into Linen variables that give the same outputs.

Module tree (site kinds in brackets)::

    embeddings/word [embedding]  embeddings/position [embedding]  embeddings/token_type [embedding]
    embeddings/norm [norm]
    encoder/layers_{i}/attention [block]          the self-attention sub-layer F(x), before the residual
    encoder/layers_{i}/attention/mha [attention]  nnx.MultiHeadAttention / nn.MultiHeadDotProductAttention
    encoder/layers_{i}/attention/mha/{query,key,value,out} [linear]
    encoder/layers_{i}/attention_norm [norm]      LayerNorm(x + F(x))  (post-LN, as BERT)
    encoder/layers_{i}/mlp [block]                the feed-forward sub-layer
    encoder/layers_{i}/mlp/{intermediate,output} [linear]
    encoder/layers_{i}/mlp_norm [norm]
    pooler [linear]   classifier [linear]

The block modules carry ``__layerlens_kind__ = "block"``: that is the protocol by which any user
module declares itself an adapter attachment point (see ``layerlens_jax._src.sites``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

__all__ = [
    "BertConfig",
    "BertClassifier",
    "LinenBertClassifier",
    "MLP",
    "LinenMLP",
    "nnx_params_as_linen",
    "padding_mask",
]


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and options of the reference BERT encoder classifier (defaults: MiniLM-L6)."""

    vocab_size: int = 30522  # token vocabulary
    hidden_size: int = 384  # model width H
    num_layers: int = 6  # encoder layers
    num_heads: int = 12  # attention heads (divides hidden_size)
    intermediate_size: int = 1536  # feed-forward width
    max_position: int = 512  # positions of the position embedding
    type_vocab_size: int = 2  # token-type (segment) ids
    num_labels: int = 2  # classifier outputs
    layer_norm_eps: float = 1e-12  # LayerNorm epsilon
    dropout_rate: float = 0.0  # dropout after embeddings and each sub-layer
    pooling: str = "mean"  # "mean" (sentence-transformers) or "cls" (BERT pooler input)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position", "type_vocab_size", "num_labels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"BertConfig.hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"BertConfig.pooling must be 'mean' or 'cls', got {self.pooling!r}")

    @classmethod
    def tiny(cls, **overrides) -> "BertConfig":
        """A few-thousand-parameter config for tests (compiles in seconds on CPU)."""
        base = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_position=32, type_vocab_size=2, num_labels=3)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def minilm_l6(cls, **overrides) -> "BertConfig":
        """The shape of all-MiniLM-L6-v2: 6 layers, hidden 384, 12 heads, FFN 1536."""
        return cls(**overrides)


def padding_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, T) 0/1 token mask -> (B, 1, 1, T) boolean attention mask (keys that may be attended)."""
    return attention_mask.astype(bool)[:, None, None, :]


def _masked_mean(h: jax.Array, attention_mask: jax.Array) -> jax.Array:
    m = attention_mask.astype(h.dtype)[..., None]
    return (h * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1.0)


# ----------------------------------------------------------------------------------------- NNX


class Embeddings(nnx.Module):
    """Word + position + token-type embeddings, then LayerNorm and dropout."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.position = nnx.Embed(cfg.max_position, cfg.hidden_size, embedding_init=init, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                                    rngs=rngs)
        self.norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, input_ids, token_type_ids):
        # positions broadcast to (B, T): the example axis comes first at every site, which is what
        # per-example statistics (layerlens_jax._src.profile) rely on.
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        h = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(h))


class AttentionBlock(nnx.Module):
    """Self-attention sub-layer F(x) = Dropout(MHA(x)) (residual and norm live in the layer)."""

    __layerlens_kind__ = "block"

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.mha = nnx.MultiHeadAttention(
            num_heads=cfg.num_heads, in_features=cfg.hidden_size, qkv_features=cfg.hidden_size,
            out_features=cfg.hidden_size, kernel_init=nnx.initializers.normal(0.02),
            dropout_rate=0.0, decode=False, rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x, mask):
        return self.dropout(self.mha(x, mask=mask))


class FeedForward(nnx.Module):
    """Feed-forward sub-layer F(x) = Dropout(W2 gelu(W1 x))."""

    __layerlens_kind__ = "block"

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        self.intermediate = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, kernel_init=init,
                                       rngs=rngs)
        self.output = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, kernel_init=init,
                                 rngs=rngs)
        self.dropout = nnx.Dropout(cfg.dropout_rate, rngs=rngs)

    def __call__(self, x):
        return self.dropout(self.output(jax.nn.gelu(self.intermediate(x), approximate=False)))


class EncoderLayer(nnx.Module):
    """One post-LN encoder layer: attention and feed-forward sub-layers with residuals."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.attention = AttentionBlock(cfg, rngs=rngs)
        self.attention_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)
        self.mlp_norm = nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, rngs=rngs)

    def __call__(self, x, mask):
        x = self.attention_norm(x + self.attention(x, mask))
        return self.mlp_norm(x + self.mlp(x))


class Encoder(nnx.Module):
    """``num_layers`` encoder layers named ``layers_{i}``."""

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.num_layers = cfg.num_layers
        for i in range(cfg.num_layers):  # named layers_{i}, the same as Linen's auto-naming
            setattr(self, f"layers_{i}", EncoderLayer(cfg, rngs=rngs))

    def __call__(self, x, mask):
        for i in range(self.num_layers):
            x = getattr(self, f"layers_{i}")(x, mask)
        return x


class BertClassifier(nnx.Module):
    """BERT-style encoder + pooler + classifier, Flax NNX.

    ``model(input_ids, attention_mask=None, token_type_ids=None) -> logits (B, num_labels)``.
    """

    def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        init = nnx.initializers.normal(0.02)
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.pooler = nnx.Linear(cfg.hidden_size, cfg.hidden_size, kernel_init=init, rngs=rngs)
        self.classifier = nnx.Linear(cfg.hidden_size, cfg.num_labels, kernel_init=init, rngs=rngs)

    def encode(self, input_ids, attention_mask=None, token_type_ids=None):
        """Token hidden states (B, T, H)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        h = self.embeddings(input_ids, token_type_ids)
        return self.encoder(h, padding_mask(attention_mask))

    def embed(self, input_ids, attention_mask=None, token_type_ids=None):
        """Sentence embedding (B, H): masked mean of token states (sentence-transformers pooling)."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        return _masked_mean(self.encode(input_ids, attention_mask, token_type_ids), attention_mask)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        h = self.encode(input_ids, attention_mask, token_type_ids)
        pooled = _masked_mean(h, attention_mask) if self.config.pooling == "mean" else h[:, 0]
        return self.classifier(jnp.tanh(self.pooler(pooled)))


class MLP(nnx.Module):
    """A plain MLP (``layers_{i}`` Linear + gelu), for tests and small examples."""

    def __init__(self, features: tuple[int, ...], *, rngs: nnx.Rngs):
        self.num_layers = len(features) - 1
        for i, (a, b) in enumerate(zip(features[:-1], features[1:])):
            setattr(self, f"layers_{i}", nnx.Linear(a, b, rngs=rngs))

    def __call__(self, x):
        for i in range(self.num_layers):
            x = getattr(self, f"layers_{i}")(x)
            if i < self.num_layers - 1:
                x = jax.nn.gelu(x)
        return x


# --------------------------------------------------------------------------------------- Linen


class LinenEmbeddings(nn.Module):
    """The Linen twin of :class:`Embeddings`."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, token_type_ids, deterministic=True):
        cfg, init = self.cfg, nn.initializers.normal(0.02)
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        h = (nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word")(input_ids)
             + nn.Embed(cfg.max_position, cfg.hidden_size, embedding_init=init,
                        name="position")(positions)
             + nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                        name="token_type")(token_type_ids))
        h = nn.LayerNorm(epsilon=cfg.layer_norm_eps, name="norm")(h)
        return nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)


class LinenAttentionBlock(nn.Module):
    """The Linen twin of :class:`AttentionBlock` (a ``block`` site)."""

    cfg: BertConfig
    __layerlens_kind__ = "block"

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        cfg = self.cfg
        y = nn.MultiHeadDotProductAttention(
            num_heads=cfg.num_heads, qkv_features=cfg.hidden_size, out_features=cfg.hidden_size,
            kernel_init=nn.initializers.normal(0.02), dropout_rate=0.0, deterministic=True,
            name="mha")(x, x, mask=mask)
        return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class LinenFeedForward(nn.Module):
    """The Linen twin of :class:`FeedForward` (a ``block`` site)."""

    cfg: BertConfig
    __layerlens_kind__ = "block"

    @nn.compact
    def __call__(self, x, deterministic=True):
        cfg, init = self.cfg, nn.initializers.normal(0.02)
        h = jax.nn.gelu(nn.Dense(cfg.intermediate_size, kernel_init=init, name="intermediate")(x),
                        approximate=False)
        y = nn.Dense(cfg.hidden_size, kernel_init=init, name="output")(h)
        return nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)


class LinenEncoderLayer(nn.Module):
    """The Linen twin of :class:`EncoderLayer`."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        eps = self.cfg.layer_norm_eps
        x = nn.LayerNorm(epsilon=eps, name="attention_norm")(
            x + LinenAttentionBlock(self.cfg, name="attention")(x, mask, deterministic))
        return nn.LayerNorm(epsilon=eps, name="mlp_norm")(
            x + LinenFeedForward(self.cfg, name="mlp")(x, deterministic))


class LinenEncoder(nn.Module):
    """The Linen twin of :class:`Encoder`."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, x, mask, deterministic=True):
        for i in range(self.cfg.num_layers):
            x = LinenEncoderLayer(self.cfg, name=f"layers_{i}")(x, mask, deterministic)
        return x


class LinenBertClassifier(nn.Module):
    """The Linen twin of :class:`BertClassifier` (same submodule names and maths)."""

    cfg: BertConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, deterministic=True):
        cfg, init = self.cfg, nn.initializers.normal(0.02)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
        h = LinenEmbeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
        h = LinenEncoder(cfg, name="encoder")(h, padding_mask(attention_mask), deterministic)
        pooled = _masked_mean(h, attention_mask) if cfg.pooling == "mean" else h[:, 0]
        pooled = jnp.tanh(nn.Dense(cfg.hidden_size, kernel_init=init, name="pooler")(pooled))
        return nn.Dense(cfg.num_labels, kernel_init=init, name="classifier")(pooled)


class LinenMLP(nn.Module):
    """The Linen twin of :class:`MLP` (``layers_{i}`` Dense + gelu)."""

    features: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        n = len(self.features) - 1
        for i, f in enumerate(self.features[1:]):
            x = nn.Dense(f, name=f"layers_{i}")(x)
            if i < n - 1:
                x = jax.nn.gelu(x)
        return x


def nnx_params_as_linen(model: nnx.Module) -> dict[str, Any]:
    """Linen variables ``{"params": ...}`` holding an NNX twin's parameters (same names)."""
    return {"params": nnx.state(model, nnx.Param).to_pure_dict()}
