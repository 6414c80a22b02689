import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

from layerlens_jax.models import BertClassifier, BertConfig, LinenBertClassifier, nnx_params_as_linen
from layerlens_jax._src.sites import (discover_sites, get_submodule, register_site_kind, set_submodule,
                                 site_kind_of)


@pytest.fixture(scope="module")
def bert():
    cfg = BertConfig.tiny()
    return cfg, BertClassifier(cfg, rngs=nnx.Rngs(0))


def test_nnx_bert_sites_kinds_shapes(bert):
    cfg, model = bert
    ids = jnp.zeros((2, 7), jnp.int32)
    sites = {s.path: s for s in discover_sites(model, example=(ids,))}
    assert len(sites) == 28
    q = sites["encoder/layers_1/attention/mha/query"]
    assert (q.kind, q.in_features, q.out_features, q.num_params, q.tokens_per_example) == \
        ("linear", 16, 16, 16 * 16 + 16, 7)
    assert q.param_shapes == {"kernel": (16, 2, 8), "bias": (2, 8)}
    out = sites["encoder/layers_1/attention/mha/out"]
    assert (out.in_features, out.out_features, out.tokens_per_example) == (16, 16, 7)
    mha = sites["encoder/layers_0/attention/mha"]
    assert (mha.kind, mha.num_heads, mha.head_dim, mha.num_params) == ("attention", 2, 8, 4 * 272)
    blk = sites["encoder/layers_0/mlp"]
    assert (blk.kind, blk.in_features, blk.out_features) == ("block", 16, 16)
    assert blk.num_params == 16 * 32 + 32 + 32 * 16 + 16
    emb = sites["embeddings/word"]
    assert (emb.kind, emb.in_features, emb.out_features, emb.tokens_per_example) == \
        ("embedding", cfg.vocab_size, 16, 7)
    assert sites["embeddings/norm"].kind == "norm"
    # without example inputs the same sites are found; blocks just lack widths
    bare = {s.path: s for s in discover_sites(model)}
    assert set(bare) == set(sites) and bare["encoder/layers_0/mlp"].in_features is None


def test_linen_twin_has_the_same_sites(bert):
    cfg, model = bert
    ids = jnp.zeros((2, 7), jnp.int32)
    a = discover_sites(model, example=(ids,))
    b = discover_sites(LinenBertClassifier(cfg), nnx_params_as_linen(model), example=(ids,))
    key = lambda s: (s.path, s.kind, s.num_params, s.in_features, s.out_features,  # noqa: E731
                     s.num_heads, s.head_dim, s.tokens_per_example)
    assert [key(s) for s in a] == [key(s) for s in b]
    with pytest.raises(ValueError, match="needs example inputs"):
        discover_sites(LinenBertClassifier(cfg), nnx_params_as_linen(model))


def test_filters_and_errors(bert):
    _, model = bert
    assert {s.kind for s in discover_sites(model, kinds=["attention"])} == {"attention"}
    with pytest.raises(ValueError, match="unknown site kind"):
        discover_sites(model, kinds=["mlp"])

    class Empty(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones(3))

    with pytest.raises(ValueError, match="no adaptable sites found in Empty"):
        discover_sites(Empty())
    with pytest.raises(TypeError, match="nnx.Module or linen"):
        discover_sites({"params": {}})


def test_register_and_protocol():
    class MyDense(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.ones((3, 4)))

        def __call__(self, x):
            return x @ self.w

    class MyBlock(nn.Module):
        __layerlens_kind__ = "block"

    assert site_kind_of(MyDense) is None
    register_site_kind(MyDense, "linear")
    assert site_kind_of(MyDense()) == "linear"
    assert site_kind_of(MyBlock) == "block"
    with pytest.raises(ValueError, match="unknown site kind 'dense'"):
        register_site_kind(MyDense, "dense")
    with pytest.raises(TypeError):
        register_site_kind(MyDense(), "linear")


def test_get_set_submodule(bert):
    _, model = bert
    m = nnx.clone(model)
    q = get_submodule(m, "encoder/layers_0/attention/mha/query")
    assert isinstance(q, nnx.LinearGeneral)
    lin = nnx.Linear(16, 16, rngs=nnx.Rngs(0))
    set_submodule(m, "pooler", lin)
    assert m.pooler is lin and model.pooler is not lin
    lst = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])
    holder = nnx.Module()
    holder.ls = lst
    set_submodule(holder, "ls/0", lin)
    assert get_submodule(holder, "ls/0") is lin
    with pytest.raises(ValueError, match="root"):
        set_submodule(m, "", lin)
