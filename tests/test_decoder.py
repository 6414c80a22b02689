"""The reference decoder (layerlens_jax.decoder): maths against independent references, the two
layouts against each other, and the unscanned model end to end through the library."""

import dataclasses
import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from layerlens_jax import (Catalogue, allocate, apply_plan, count_trainable, make_optimizer,
                           make_train_step, merge, profile, utility)
from layerlens_jax import decoder
from layerlens_jax.decoder import (Decoder, DecoderConfig, apply_rope, causal_lm_loss,
                                   rope_angles, stack_layers, unstack_layers)

CFG = DecoderConfig.tiny()  # vocab 64, width 32, 2 layers, 4 query heads, 2 kv heads, head 8


def _ids(shape=(2, 10), seed=1, vocab=CFG.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _params(model):
    return jax.tree.map(np.asarray, nnx.state(model, nnx.Param).to_pure_dict())


# ------------------------------------------------------------------ an independent reference


def _np_rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _np_rope(x, pos, theta):
    """Rotate pairs (x_j, x_{j+d/2}) as complex numbers z_j times exp(i * pos * theta^(-2j/d))."""
    d = x.shape[-1]
    z = x[..., : d // 2] + 1j * x[..., d // 2:]
    z = z * np.exp(1j * pos * theta ** (-np.arange(0, d, 2) / d))
    return np.concatenate([z.real, z.imag], axis=-1)


def _np_attention(p, x, cfg):
    """Loops over query heads and positions; query head h reads kv head h // (H / H_kv)."""
    t, hd, groups = x.shape[0], cfg.head_size, cfg.num_heads // cfg.num_kv_heads
    q = (x @ p["q_proj"]["kernel"]).reshape(t, cfg.num_heads, hd)
    k = (x @ p["k_proj"]["kernel"]).reshape(t, cfg.num_kv_heads, hd)
    v = (x @ p["v_proj"]["kernel"]).reshape(t, cfg.num_kv_heads, hd)
    out = np.zeros((t, cfg.num_heads, hd))
    for h in range(cfg.num_heads):
        for i in range(t):
            qi = _np_rope(q[i, h], i, cfg.rope_theta)
            keys = np.stack([_np_rope(k[j, h // groups], j, cfg.rope_theta) for j in range(i + 1)])
            s = keys @ qi / np.sqrt(hd)
            w = np.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ v[: i + 1, h // groups]
    return out.reshape(t, -1) @ p["o_proj"]["kernel"]


def _np_decoder(params, ids, cfg):
    """Logits of one sequence from the parameter dict, in float64 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = p["embed"]["embedding"][np.asarray(ids)]
    for i in range(cfg.num_layers):
        blk = p["layers"][i]
        x = x + _np_attention(blk["attn"], _np_rms(x, blk["attn_norm"]["scale"], cfg.norm_eps), cfg)
        h = _np_rms(x, blk["mlp_norm"]["scale"], cfg.norm_eps)
        m = blk["mlp"]
        gate = h @ m["gate_proj"]["kernel"]
        swish = gate / (1 + np.exp(-gate))
        x = x + (swish * (h @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]
    x = _np_rms(x, p["final_norm"]["scale"], cfg.norm_eps)
    return x @ (p["embed"]["embedding"].T if cfg.tie_embeddings else p["lm_head"]["kernel"])


@pytest.mark.parametrize("tied", [False, True])
def test_forward_matches_numpy_reference(tied):
    cfg = dataclasses.replace(CFG, tie_embeddings=tied)
    model = Decoder(cfg, rngs=nnx.Rngs(0))
    ids = _ids((2, 7))
    logits = np.asarray(model(ids))
    assert logits.shape == (2, 7, cfg.vocab_size) and logits.dtype == np.float32
    for b in range(2):
        np.testing.assert_allclose(logits[b], _np_decoder(_params(model), ids[b], cfg),
                                   rtol=1e-4, atol=1e-5)


def test_parameter_shapes_and_counts_tied_vs_untied():
    d, hd, f, v = CFG.hidden_size, CFG.head_size, CFG.intermediate_size, CFG.vocab_size
    per_layer = (d * CFG.num_heads * hd + 2 * d * CFG.num_kv_heads * hd  # q, k, v
                 + CFG.num_heads * hd * d + 3 * d * f + 2 * d)  # o, SwiGLU, two norms
    untied = Decoder(CFG, rngs=nnx.Rngs(0))
    tied = Decoder(dataclasses.replace(CFG, tie_embeddings=True), rngs=nnx.Rngs(0))
    n = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n(tied) == v * d + CFG.num_layers * per_layer + d == 20_640
    assert n(untied) == n(tied) + d * v
    assert not hasattr(tied, "lm_head")
    attn = untied.layers[1].attn
    assert attn.k_proj.kernel.shape == attn.v_proj.kernel.shape == (d, CFG.num_kv_heads * hd)
    assert attn.q_proj.kernel.shape == (d, CFG.num_heads * hd)


def test_bfloat16_parameters_compute_like_float32_on_the_same_values():
    model = Decoder(dataclasses.replace(CFG, param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    ref = Decoder(CFG, rngs=nnx.Rngs(1))  # float32, then given the bf16 values
    nnx.update(ref, jax.tree.map(lambda x: x.astype(jnp.float32), nnx.state(model, nnx.Param)))
    ids = _ids()
    np.testing.assert_allclose(model(ids), ref(ids), rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        DecoderConfig.tiny(num_kv_heads=3)
    with pytest.raises(ValueError, match="param_dtype"):
        DecoderConfig.tiny(param_dtype="int8")
    with pytest.raises(ValueError, match="num_layers"):
        DecoderConfig.tiny(num_layers=0)


# ----------------------------------------------------------------------------- properties


def test_changing_a_future_token_never_changes_earlier_logits():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = _ids((1, 12))
    base = np.asarray(model(ids))
    for k in (0, 5, 11):
        changed = np.asarray(model(ids.at[0, k].set((ids[0, k] + 7) % CFG.vocab_size)))
        np.testing.assert_array_equal(changed[:, :k], base[:, :k])
        assert np.abs(changed[:, k] - base[:, k]).max() > 1e-4  # the changed token is seen


def test_left_padding_with_mask_equals_the_unpadded_sequence():
    # RoPE scores depend only on relative positions, and masked keys get no weight: so a
    # left-padded sequence gives the unpadded logits at its real positions.
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = _ids((1, 6))
    padded = jnp.concatenate([jnp.full((1, 3), 5, jnp.int32), ids], axis=1)
    mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(model(padded, mask)[:, 3:], model(ids), rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv_heads():
    gqa = Decoder(CFG, rngs=nnx.Rngs(0))
    mha_cfg = dataclasses.replace(CFG, num_kv_heads=CFG.num_heads)
    mha = Decoder(mha_cfg, rngs=nnx.Rngs(1))
    params = nnx.state(gqa, nnx.Param).to_pure_dict()
    groups, hd = CFG.num_heads // CFG.num_kv_heads, CFG.head_size

    def repeat_heads(kernel):  # (D, Hkv * hd) -> (D, H * hd): query head h reads kv head h // g
        d = kernel.shape[0]
        return jnp.repeat(kernel.reshape(d, CFG.num_kv_heads, hd), groups, axis=1).reshape(d, -1)

    for i in range(CFG.num_layers):
        for name in ("k_proj", "v_proj"):
            kernel = params["layers"][i]["attn"][name]["kernel"]
            params["layers"][i]["attn"][name]["kernel"] = repeat_heads(kernel)
    state = nnx.state(mha, nnx.Param)
    state.replace_by_pure_dict(params)
    nnx.update(mha, state)
    ids = _ids()
    assert not np.allclose(gqa(ids), Decoder(mha_cfg, rngs=nnx.Rngs(1))(ids), atol=1e-3)
    np.testing.assert_allclose(mha(ids), gqa(ids), rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    hd, theta = 16, 10_000.0
    q, k = np.random.default_rng(0).normal(size=(2, hd)).astype(np.float32)

    def rotated(x, pos):  # one position, one head
        cos, sin = rope_angles(jnp.asarray([pos]), hd, theta)
        return np.asarray(apply_rope(jnp.asarray(x)[None, None, :], cos, sin))[0, 0]

    for m, n in ((3, 1), (7, 7), (2, 9)):
        score = rotated(q, m) @ rotated(k, n)
        np.testing.assert_allclose(rotated(q, m + 13) @ rotated(k, n + 13), score, rtol=1e-4)
        np.testing.assert_allclose(rotated(q, m), _np_rope(q, m, theta), rtol=1e-5, atol=1e-5)
    assert abs(rotated(q, 3) @ rotated(k, 1) - rotated(q, 4) @ rotated(k, 1)) > 1e-3


def test_causal_lm_loss_is_the_per_example_mean_over_real_next_tokens():
    model = Decoder(CFG, rngs=nnx.Rngs(0))
    ids = _ids((2, 6))
    mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], np.int32)
    loss = np.asarray(causal_lm_loss(model, {"input_ids": ids, "attention_mask": mask}))
    logits = np.asarray(model(ids, mask), np.float64)
    for b, n_real in ((0, 6), (1, 3)):
        nll = [np.log(np.exp(logits[b, t]).sum()) - logits[b, t, ids[b, t + 1]]
               for t in range(n_real - 1)]
        np.testing.assert_allclose(loss[b], np.mean(nll), rtol=1e-5)
    assert loss.shape == (2,)


# -------------------------------------------------------------------------------- layouts


def test_scanned_and_unscanned_layouts_give_the_same_logits():
    ids = _ids()
    listed = Decoder(CFG, rngs=nnx.Rngs(0))
    stacked = stack_layers(listed)
    assert stacked.config.scan_layers
    kernel = stacked.layers.attn.q_proj.kernel
    assert kernel.shape == (CFG.num_layers, CFG.hidden_size, CFG.num_heads * CFG.head_size)
    np.testing.assert_array_equal(kernel[1], listed.layers[1].attn.q_proj.kernel)
    np.testing.assert_allclose(stacked(ids), listed(ids), rtol=1e-5, atol=1e-6)
    # a natively scanned model (nnx.vmap-created) and its unstacked twin
    native = Decoder(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(3))
    back = unstack_layers(native)
    np.testing.assert_allclose(back(ids), native(ids), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(back(ids)[0], _np_decoder(_params(back), ids[0], CFG),
                               rtol=1e-4, atol=1e-5)
    assert jax.tree.all(jax.tree.map(np.array_equal, _params(unstack_layers(stacked)),
                                     _params(listed)))
    with pytest.raises(ValueError, match="already scanned"):
        stack_layers(native)


# ------------------------------------------------------------------------- end to end


def _pattern_batches(n, seed):
    """Sequences of a learnable pattern (arithmetic progressions mod vocab), padded at the end."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start, stride = rng.integers(0, CFG.vocab_size, (2, 8, 1))
        ids = ((start + stride * np.arange(16)) % CFG.vocab_size).astype(np.int32)
        mask = np.ones((8, 16), np.int32)
        mask[0, 12:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_scanned_profile_equals_the_unscanned_twins_per_layer():
    """The same weights in both layouts: per-layer sites, shapes, grad norms and Fisher traces
    of the nnx.scan stack equal those of the plain list of blocks."""
    flat = Decoder(CFG, rngs=nnx.Rngs(0))
    scanned = stack_layers(flat)
    batches = _pattern_batches(2, seed=0)
    a, b = profile(flat, causal_lm_loss, batches), profile(scanned, causal_lm_loss, batches)
    assert a.paths == b.paths and "layers/1/mlp/down_proj" in b.paths
    assert [s.param_shapes for s in a.sites] == [s.param_shapes for s in b.sites]
    np.testing.assert_allclose(b.fisher_trace, a.fisher_trace, rtol=2e-4)
    np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=2e-4)


@pytest.mark.parametrize("scan_layers, tied", [(False, False), (True, True)])
def test_decoder_end_to_end_profile_allocate_apply_train_merge(scan_layers, tied):
    model = Decoder(dataclasses.replace(CFG, scan_layers=scan_layers, tie_embeddings=tied),
                    rngs=nnx.Rngs(0))
    batches = _pattern_batches(2, seed=0)
    stats = profile(model, causal_lm_loss, batches)
    assert "layers/1/attn/q_proj" in stats.paths and ("lm_head" in stats.paths) != tied
    assert stats.num_tokens == 2 * (8 * 16 - 4)  # 4 padded positions per batch
    plan = allocate(stats.sites, utility(stats), {"params": 1_500},
                    catalogue=Catalogue.from_sizes(lora=(1, 2, 4, 8)))
    assert {a.method for a in plan.allocations} == {"lora", "none"}
    peft = apply_plan(model, plan)
    assert count_trainable(peft) == plan.use["params"] <= 1_500
    base_before = _params(model)

    batch = batches[0]
    initial = float(causal_lm_loss(peft, batch).mean())
    np.testing.assert_allclose(initial, float(causal_lm_loss(model, batch).mean()), rtol=1e-6)
    opt = make_optimizer(peft, optax.adam(1e-2))
    step = make_train_step(causal_lm_loss)
    for _ in range(10):
        step(peft, opt, batch)
    trained = float(causal_lm_loss(peft, batch).mean())
    assert trained < initial - 0.05, (initial, trained)
    assert jax.tree.all(jax.tree.map(np.array_equal, _params(model), base_before))

    merged = merge(peft)
    assert count_trainable(merged) == 0
    np.testing.assert_allclose(merged(batch["input_ids"], batch["attention_mask"]),
                               peft(batch["input_ids"], batch["attention_mask"]),
                               rtol=1e-5, atol=1e-5)


def test_module_docstring_example_runs():
    result = doctest.testmod(decoder, optionflags=doctest.ELLIPSIS, report=True, verbose=False)
    assert result.attempted >= 5 and result.failed == 0
