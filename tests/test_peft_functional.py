"""Pure adapter maths against obviously-correct references (materialised kernels, naive softmax)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from layerlens_jax._src.peft import functional as F

HI = lax.Precision.HIGHEST


def rnd(key, shape, scale=1.0):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32) * scale


def test_lora_scale():
    assert F.lora_scale(16.0, 4) == 4.0
    assert F.lora_scale(16.0, 4, use_rslora=True) == 8.0
    with pytest.raises(ValueError, match="rank"):
        F.lora_scale(16.0, 0)


def test_lora_delta_matches_materialised_kernel():
    x, a, b = rnd(0, (3, 5, 7)), rnd(1, (7, 2)), rnd(2, (2, 4))
    ref = jnp.einsum("btd,de->bte", x, (a @ b) * 0.5, precision=HI)
    np.testing.assert_allclose(F.lora_delta(x, a, b, 0.5, precision=HI), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(AssertionError):
        F.lora_delta(x, a.T, b, 1.0)


@pytest.mark.parametrize("axis,in_shape,out_shape", [((-1,), (6,), (2, 3)), ((-2, -1), (2, 3), (5,))])
def test_lora_general_delta(axis, in_shape, out_shape):
    x = rnd(0, (4, 3) + in_shape)
    fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)
    a, b = rnd(1, (fan_in, 3)), rnd(2, (3, fan_out))
    kernel = F.lora_delta_kernel(a, b, 2.0, in_shape + out_shape)
    n = len(in_shape)
    ref = lax.dot_general(x, kernel, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())),
                          precision=HI)
    got = F.lora_general_delta(x, a, b, 2.0, axis=axis, out_shape=out_shape, precision=HI)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_lora_embed_and_attend():
    ids = jnp.array([[0, 3, 3], [1, 2, 4]])
    a, b = rnd(1, (5, 2)), rnd(2, (2, 6))
    table = a @ b * 3.0
    np.testing.assert_allclose(F.lora_embed_delta(ids, a, b, 3.0), table[ids], rtol=1e-5, atol=1e-6)
    q = rnd(3, (2, 6))
    np.testing.assert_allclose(F.lora_attend_delta(q, a, b, 3.0), q @ table.T, rtol=1e-5, atol=1e-5)


def test_lora_einsum_delta():
    x, a, b = rnd(0, (2, 3, 4)), rnd(1, (4, 2)), rnd(2, (2, 10))
    ref = jnp.einsum("btd,dnh->btnh", x, (a @ b).reshape(4, 2, 5) * 0.25, precision=HI)
    got = F.lora_einsum_delta(x, a, b, 0.25, einsum_str="btd,dnh->btnh", kernel_shape=(4, 2, 5),
                              precision=HI)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padding,strides,dil", [("SAME", (1, 1), (1, 1)), ("VALID", (2, 1), (1, 2)),
                                                 ([(1, 0), (2, 1)], (1, 2), (1, 1))])
def test_lora_conv_delta_matches_materialised_conv(padding, strides, dil):
    x = rnd(0, (2, 9, 8, 3))
    a, b = rnd(1, (3 * 3 * 3, 2)), rnd(2, (2, 5))
    kernel = F.lora_delta_kernel(a, b, 0.5, (3, 3, 3, 5))
    ref = lax.conv_general_dilated(x, kernel, strides, padding, rhs_dilation=dil,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=HI)
    got = F.lora_conv_delta(x, a, b, 0.5, kernel_size=(3, 3), strides=strides, padding=padding,
                            input_dilation=(1, 1), kernel_dilation=dil, precision=HI)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_adapter_delta():
    h = rnd(0, (2, 3, 6))
    down, db, up, ub = rnd(1, (6, 2)), rnd(2, (2,)), rnd(3, (2, 6)), rnd(4, (6,))
    ref = jax.nn.relu(h @ down + db) @ up + ub
    np.testing.assert_allclose(F.adapter_delta(h, down, db, up, ub, "relu"), ref, rtol=1e-5,
                               atol=1e-5)
    zero = F.adapter_delta(h, down, db, jnp.zeros_like(up), jnp.zeros_like(ub), "gelu")
    assert np.array_equal(np.asarray(zero), np.zeros(h.shape, np.float32))
    with pytest.raises(ValueError, match="activation"):
        F.adapter_delta(h, down, db, up, ub, "nope")


def naive_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d)) v with a boolean (B, H|1, Q, K) mask, in numpy float64."""
    q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.broadcast_to(mask, logits.shape), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", w, v)


def _dpa(query, key, value, bias=None, mask=None, is_causal=False, **kw):
    return jax.nn.dot_product_attention(query, key, value, bias, mask, is_causal=is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_prefix_joint_matches_naive_concat(is_causal):
    b, t, h, d, p = 2, 5, 2, 4, 3
    q, k, v = rnd(0, (b, t, h, d)), rnd(1, (b, t, h, d)), rnd(2, (b, t, h, d))
    pk, pv = rnd(3, (p, h, d)), rnd(4, (p, h, d))
    valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)
    mask = valid[:, None, None, :]
    got = F.prefix_attention(q, k, v, pk, pv, base_fn=_dpa, mode="joint", mask=jnp.asarray(mask),
                             is_causal=is_causal)
    kk = np.concatenate([np.broadcast_to(pk, (b, p, h, d)), k], 1)
    vv = np.concatenate([np.broadcast_to(pv, (b, p, h, d)), v], 1)
    seq_mask = mask & (np.tril(np.ones((t, t), bool)) if is_causal else True)
    full = np.concatenate([np.ones((b, 1, t, p), bool), np.broadcast_to(seq_mask, (b, 1, t, t))], -1)
    np.testing.assert_allclose(got, naive_attention(q, kk, vv, full), rtol=1e-5, atol=1e-5)


def test_prefix_always_attendable_even_if_every_key_is_masked():
    q, k, v = rnd(0, (1, 2, 1, 4)), rnd(1, (1, 2, 1, 4)), rnd(2, (1, 2, 1, 4))
    pk, pv = rnd(3, (1, 1, 4)), rnd(4, (1, 1, 4))
    mask = jnp.zeros((1, 1, 1, 2), bool)  # no sequence key attendable
    got = F.prefix_attention(q, k, v, pk, pv, base_fn=_dpa, mode="joint", mask=mask)
    # the only attendable position is the single prefix slot: output == its value
    np.testing.assert_allclose(got, np.broadcast_to(pv, (1, 2, 1, 4)), rtol=1e-6, atol=1e-6)


def test_prefix_parallel_is_base_plus_prefix_softmax_and_identity_when_values_zero():
    b, t, h, d, p = 2, 4, 2, 4, 3
    q, k, v = rnd(0, (b, t, h, d)), rnd(1, (b, t, h, d)), rnd(2, (b, t, h, d))
    pk, pv = rnd(3, (p, h, d)), rnd(4, (p, h, d))
    mask = jnp.asarray(np.array([[1, 1, 1, 1], [1, 1, 0, 0]], bool)[:, None, None, :])
    base = _dpa(q, k, v, mask=mask)
    got = F.prefix_attention(q, k, v, pk, pv, base_fn=_dpa, mode="parallel", mask=mask)
    extra = naive_attention(q, np.broadcast_to(pk, (b, p, h, d)), np.broadcast_to(pv, (b, p, h, d)),
                            np.ones((1, 1, 1, p), bool))
    np.testing.assert_allclose(got, np.asarray(base) + extra, rtol=1e-5, atol=1e-5)
    same = F.prefix_attention(q, k, v, pk, jnp.zeros_like(pv), base_fn=_dpa, mask=mask)
    assert np.array_equal(np.asarray(same), np.asarray(base))


def test_prefix_rejects_bad_shapes_and_modes():
    q = rnd(0, (1, 2, 2, 4))
    with pytest.raises(ValueError, match="mode"):
        F.prefix_attention(q, q, q, rnd(1, (1, 2, 4)), rnd(1, (1, 2, 4)), base_fn=_dpa, mode="x")
    with pytest.raises(ValueError, match="does not match"):
        F.prefix_attention(q, q, q, rnd(1, (1, 3, 4)), rnd(1, (1, 3, 4)), base_fn=_dpa)


def test_causal_mask_offset():
    m = np.asarray(F.causal_mask(2, 4))
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_prefix_reparam_shapes_and_zero_values():
    e, w1, b1 = rnd(0, (3, 8)), rnd(1, (8, 5)), rnd(2, (5,))
    w2 = jnp.concatenate([rnd(3, (5, 8)), jnp.zeros((5, 8))], 1)
    k, v = F.prefix_reparam(e, w1, b1, w2, jnp.zeros((16,)), 2, 4)
    assert k.shape == v.shape == (3, 2, 4)
    assert not np.any(np.asarray(v))


def test_prefix_reparam_is_the_tanh_mlp_of_li_and_liang():
    """Against a float64 numpy ``tanh(E W1 + b1) W2 + b2``, split into keys then values. The
    pre-activations are large (unit-variance inputs, width 8), so another nonlinearity (relu,
    gelu, identity) misses by far more than the tolerance."""
    e, w1, b1 = rnd(0, (3, 8)), rnd(1, (8, 5)), rnd(2, (5,))
    w2, b2 = rnd(3, (5, 16)), rnd(4, (16,))
    k, v = F.prefix_reparam(e, w1, b1, w2, b2, 2, 4)
    E, W1, B1, W2, B2 = (np.asarray(x, np.float64) for x in (e, w1, b1, w2, b2))
    kv = np.tanh(E @ W1 + B1) @ W2 + B2
    np.testing.assert_allclose(np.asarray(k), kv[:, :8].reshape(3, 2, 4), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(v), kv[:, 8:].reshape(3, 2, 4), rtol=1e-5, atol=1e-5)
    relu = np.maximum(E @ W1 + B1, 0) @ W2 + B2
    assert np.abs(relu[:, :8].reshape(3, 2, 4) - np.asarray(k)).max() > 0.1  # the check can fail
