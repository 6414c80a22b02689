"""Cost and gain models against hand-computed numbers."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerlens_jax._src.costs import (RESOURCES, Catalogue, CostModel, GainModel, MethodSpec,
                                 calibrate_latency, option_costs, option_mask, site_option_cost,
                                 trainable_params)
from layerlens_jax.models import BertClassifier, BertConfig
from layerlens_jax._src.sites import Site, discover_sites


@pytest.fixture(scope="module")
def sites():
    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    return {s.path: s for s in discover_sites(model, example=(jnp.zeros((2, 7), jnp.int32),))}


def test_trainable_params_exact(sites):
    q = sites["encoder/layers_0/attention/mha/query"]  # LinearGeneral 16 -> (2, 8)
    assert trainable_params(q, "lora", 8) == 8 * (16 + 16)
    assert trainable_params(sites["encoder/layers_0/mlp/intermediate"], "lora", 4) == 4 * (16 + 32)
    assert trainable_params(sites["classifier"], "lora", 2) == 2 * (16 + 3)
    assert trainable_params(sites["embeddings/word"], "lora", 2) == 2 * (50 + 16)
    assert trainable_params(sites["encoder/layers_1/mlp"], "adapter", 4) == 2 * 16 * 4 + 4 + 16
    mha = sites["encoder/layers_0/attention/mha"]
    assert trainable_params(mha, "prefix", 3) == 2 * 3 * 2 * 8
    assert trainable_params(mha, "prefix", 3, prefix_projection=5) == 3 * 16 + 16 * 5 + 5 + 5 * 32 + 32
    assert trainable_params(q, "none", 0) == 0
    conv = Site("conv", "conv", "Conv", {"kernel": (3, 3, 4, 8), "bias": (8,)}, 296, 36, 8)
    assert trainable_params(conv, "lora", 2) == 2 * (36 + 8)


def test_incompatible_and_unknown_methods_name_the_site(sites):
    with pytest.raises(ValueError, match="embeddings/norm.*norm"):
        trainable_params(sites["embeddings/norm"], "lora", 4)
    with pytest.raises(ValueError, match="unknown method 'ia3'"):
        trainable_params(sites["classifier"], "ia3", 4)
    with pytest.raises(ValueError, match="classifier"):
        site_option_cost(sites["classifier"], "adapter", 4)


def test_cost_vector_hand_computed(sites):
    all_sites = list(sites.values())
    q = sites["encoder/layers_0/attention/mha/query"]
    cm = CostModel(batch_size=8)
    c = site_option_cost(q, "lora", 8, cm, sites=all_sites)
    fwd = 2 * 8 * (16 + 16) + 2 * 16  # per position; n = T = 7
    assert c["params"] == 256
    assert c["train_flops"] == pytest.approx(3 * fwd)
    assert c["infer_flops"] == 0.0 and c["latency"] == 0.0  # merged LoRA
    # weights + grads + 2 adam slots (fp32) + saved activations (x and xA) for 8 x 7 positions
    assert c["vram_bytes"] == pytest.approx(256 * (4 + 4 + 2 * 4) + 8 * 7 * (16 + 8) * 4)
    unmerged = site_option_cost(q, "lora", 8, dataclasses.replace(cm, merge_lora=False), sites=all_sites)
    assert unmerged["infer_flops"] == pytest.approx(fwd)
    assert unmerged["latency"] == pytest.approx(3 * cm.latency_overhead_ms + 8 * 7 * fwd / cm.flops_per_ms)

    # the classifier sees one position per example: per-token FLOPs scale by n / T = 1 / 7
    cls = site_option_cost(sites["classifier"], "lora", 2, cm, sites=all_sites)
    assert cls["train_flops"] == pytest.approx(3 * (2 * 2 * 19 + 2 * 3) / 7)

    block = site_option_cost(sites["encoder/layers_0/mlp"], "adapter", 4, cm, sites=all_sites)
    a_fwd = 4 * 16 * 4 + 2 * 4 + 2 * 16
    assert block["params"] == 148
    assert block["train_flops"] == pytest.approx(3 * a_fwd)
    assert block["infer_flops"] == pytest.approx(a_fwd)
    assert block["latency"] == pytest.approx(4 * cm.latency_overhead_ms + 8 * 7 * a_fwd / cm.flops_per_ms)
    assert block["vram_bytes"] == pytest.approx(148 * 16 + 8 * 7 * (16 + 2 * 4) * 4)

    pre = site_option_cost(sites["encoder/layers_0/attention/mha"], "prefix", 4, cm, sites=all_sites)
    p_fwd = 4 * 4 * 2 * 8 + 3 * 4 * 2
    assert pre["params"] == 2 * 4 * 2 * 8
    assert pre["infer_flops"] == pytest.approx(p_fwd)
    assert pre["vram_bytes"] == pytest.approx(128 * 16 + 8 * 7 * (4 * 2) * 4)

    emb = site_option_cost(sites["embeddings/word"], "lora", 2, cm, sites=all_sites)
    assert emb["params"] == 2 * 66
    assert emb["train_flops"] == pytest.approx(3 * (2 * 2 * 16 + 2 * 16))
    assert emb["vram_bytes"] == pytest.approx(132 * 16 + 8 * 7 * 2 * 4)


def test_dtypes_and_optimizer_slots(sites):
    q = sites["encoder/layers_0/attention/mha/value"]
    cm = CostModel(batch_size=2, param_dtype="bfloat16", activation_dtype="bfloat16",
                   optimizer="sgd", seq_len=7)
    c = site_option_cost(q, "lora", 4, cm)
    assert c["vram_bytes"] == pytest.approx(128 * (2 + 2) + 2 * 7 * (16 + 4) * 2)
    cm = dataclasses.replace(cm, optimizer="adamw", optimizer_state_dtype="float32")
    assert site_option_cost(q, "lora", 4, cm)["vram_bytes"] == pytest.approx(
        128 * (2 + 2 + 2 * 4) + 2 * 7 * (16 + 4) * 2)


def test_cost_model_validation():
    with pytest.raises(ValueError, match="optimizer='sgdw'"):
        CostModel(optimizer="sgdw")
    with pytest.raises(ValueError, match="batch_size"):
        CostModel(batch_size=0)
    with pytest.raises(ValueError, match="param_dtype"):
        CostModel(param_dtype="float99")
    with pytest.raises(ValueError, match="flops_per_ms"):
        CostModel(flops_per_ms=0.0)


def test_missing_features_name_the_site():
    block = Site("enc/block", "block", "Block", {}, 0)
    with pytest.raises(ValueError, match="enc/block.*out_features"):
        option_costs([block], [("none", 0), ("adapter", 8)])
    # a site whose only options are 'none' needs no features
    assert option_costs([block], [("none", 0)]).sum() == 0


def test_catalogue_options_and_caps(sites):
    cat = Catalogue.from_sizes(lora=(1, 4, 16, 32), adapter=(8, 32), prefix=(2,))
    opts = cat.options()
    assert opts == (("none", 0), ("lora", 1), ("lora", 4), ("lora", 16), ("lora", 32),
                    ("adapter", 8), ("adapter", 32), ("prefix", 2))
    order = ["classifier", "encoder/layers_0/attention/mha/query", "encoder/layers_0/mlp",
             "encoder/layers_0/attention/mha", "embeddings/norm"]
    mask = option_mask([sites[p] for p in order], opts, cat)
    np.testing.assert_array_equal(mask, [
        [1, 1, 0, 0, 0, 0, 0, 0],  # 16 -> 3: ranks above 3 add nothing
        [1, 1, 1, 1, 0, 0, 0, 0],  # 16 -> 16
        [1, 0, 0, 0, 0, 1, 0, 0],  # block of width 16: bottleneck <= 16
        [1, 0, 0, 0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 0],
    ])
    with pytest.raises(ValueError, match="unknown method 'ia3'"):
        MethodSpec("ia3", (1,))
    with pytest.raises(ValueError, match="cannot attach to 'norm'"):
        MethodSpec("lora", (1,), kinds=("norm",))
    with pytest.raises(ValueError, match="positive ints"):
        MethodSpec("lora", (0, 2))
    assert cat.with_sizes({"lora": [5]}).method("lora").sizes == (1, 4, 5, 16, 32)


def test_gain_model_concave_increasing():
    k = np.arange(0, 129, dtype=float)
    for sat in ("hyperbolic", "exp", "log"):
        gm = GainModel(saturation=sat, scale={"lora": 8.0})  # exp reaches 1.0 in float64 at 37 x
        opts = [("none", 0)] + [("lora", int(x)) for x in k[1:]]
        shape = gm.shape(opts)
        assert shape[0] == 0
        assert np.all(np.diff(shape) > 0)
        assert np.all(np.diff(shape, 2) <= 1e-15)  # concave on the integer grid
        g = gm.gain(np.array([0.5, 1.0]), opts)
        np.testing.assert_allclose(g[0], 0.5 * shape)
    gm = GainModel()  # the calibrated defaults: LoRA 1.0 / saturation 1, adapter 0.95 / 2
    assert gm.shape([("lora", 8)])[0] == pytest.approx(1.0 * 8 / (8 + 1))
    assert gm.shape([("adapter", 16)])[0] == pytest.approx(0.95 * 8 / (8 + 1))
    assert gm.shape([("prefix", 2)])[0] == pytest.approx(0.7 * 0.5)
    with pytest.raises(ValueError, match="saturation"):
        GainModel(saturation="linear")
    with pytest.raises(ValueError, match="scale\\['lora'\\]"):
        GainModel(scale={"lora": 0.0})


def test_option_costs_shape_and_consistency(sites):
    all_sites = list(sites.values())
    cat = Catalogue()
    opts = cat.options()
    costs = option_costs(all_sites, opts, CostModel(), mask=option_mask(all_sites, opts, cat))
    assert costs.shape == (len(all_sites), len(opts), len(RESOURCES))
    assert (costs[:, 0] == 0).all()

    def cost(path, option):
        return dict(zip(RESOURCES, costs[list(sites).index(path), opts.index(option)]))

    # Hand-computed with the default CostModel: B = 8 examples, T = 7 positions, fp32 (4 bytes)
    # weights, grads and 2 AdamW slots (16 bytes per parameter), merged LoRA, latency
    # n_ops * 0.005 ms + B * n * fwd / 1e10 FLOP/ms.
    # LoRA r=6 on a 16 -> 16 projection (n = 7): params r*(d_in + d_out); fwd 2r(d_in + d_out) + 2d_out;
    # saved activations per position d_in + r; merged: no inference cost.
    assert cost("encoder/layers_1/attention/mha/key", ("lora", 6)) == pytest.approx(dict(
        params=6 * 32, train_flops=3 * (2 * 6 * 32 + 2 * 16), infer_flops=0.0,
        vram_bytes=6 * 32 * 16 + 8 * 7 * (16 + 6) * 4, latency=0.0))
    # LoRA r=2 on the classifier 16 -> 3, which sees n = 1 of T = 7 positions (FLOPs x 1/7)
    assert cost("classifier", ("lora", 2)) == pytest.approx(dict(
        params=2 * 19, train_flops=3 * (2 * 2 * 19 + 2 * 3) / 7, infer_flops=0.0,
        vram_bytes=2 * 19 * 16 + 8 * 1 * (16 + 2) * 4, latency=0.0))
    # adapter b=8 on a block of width 16: params 2db + b + d; fwd 4db + 2b + 2d; saved d + 2b; 4 ops
    a_fwd = 4 * 16 * 8 + 2 * 8 + 2 * 16
    assert cost("encoder/layers_1/mlp", ("adapter", 8)) == pytest.approx(dict(
        params=2 * 16 * 8 + 8 + 16, train_flops=3 * a_fwd, infer_flops=a_fwd,
        vram_bytes=(2 * 16 * 8 + 8 + 16) * 16 + 8 * 7 * (16 + 2 * 8) * 4,
        latency=4 * 0.005 + 8 * 7 * a_fwd / 1e10))
    # prefix p=4 on 2 heads of 8: params 2pHh; fwd 4pHh + 3pH; saved pH; 2 ops
    p_fwd = 4 * 4 * 2 * 8 + 3 * 4 * 2
    assert cost("encoder/layers_1/attention/mha", ("prefix", 4)) == pytest.approx(dict(
        params=2 * 4 * 2 * 8, train_flops=3 * p_fwd, infer_flops=p_fwd,
        vram_bytes=2 * 4 * 2 * 8 * 16 + 8 * 7 * 4 * 2 * 4, latency=2 * 0.005 + 8 * 7 * p_fwd / 1e10))
    # masked options cost nothing: rank 4 > min(16, 3) on the classifier, an adapter on a linear
    assert sum(cost("classifier", ("lora", 4)).values()) == 0.0
    assert sum(cost("encoder/layers_1/attention/mha/key", ("adapter", 8)).values()) == 0.0


def test_calibrate_latency_fits_positive_coefficients():
    cm = calibrate_latency(CostModel(), widths=(32, 64), sizes=(2, 8), tokens=64, repeats=2)
    assert cm.flops_per_ms > 0 and cm.latency_overhead_ms >= 0
    assert cm.batch_size == CostModel().batch_size


def test_calibrate_latency_recovers_the_timed_model():
    """With a fake clock whose timings follow t = n_ops * overhead + flops / throughput exactly,
    the fit returns that overhead and throughput (a unit or formula error of 10x fails)."""
    overhead_ms, flops_per_ms = 0.01, 1.0e6
    widths, sizes, tokens, repeats = (32, 64), (2, 8), 16, 3

    def ms(ops, flops):
        return ops * overhead_ms + flops / flops_per_ms

    timings_ms = []  # in the order calibrate_latency times: per width, per size
    dispatch = 0.2  # every jit call pays it; the fit must take it off (first timing per width)
    for d in widths:
        timings_ms.append(dispatch)
        for r in sizes:
            heads, hd = 1, d  # widths below 128 give one head of the whole width
            plain_attention = 0.5
            timings_ms += [  # unmerged LoRA: x@A, @B, scale+add; adapter: matmuls, biases, act, add
                dispatch + ms(3, tokens * (2 * r * d + 2 * r * d + 2 * d)),
                dispatch + ms(4, tokens * (4 * d * r + 2 * r + 2 * d)),
                plain_attention,  # attention without the prefix ...
                plain_attention + ms(2, tokens * (4 * r * heads * hd + 3 * r * heads)),  # ... with it
            ]
    clock = []  # the timer's readings: start and end of every repeat, in seconds
    now = 100.0
    for t in timings_ms:
        for _ in range(repeats):
            clock += [now, now + t / 1e3]
            now += 1.0
    readings = iter(clock)
    cm = calibrate_latency(CostModel(batch_size=3), widths=widths, sizes=sizes, tokens=tokens,
                           repeats=repeats, timer=lambda: next(readings))
    assert next(readings, None) is None  # every reading was used
    assert cm.latency_overhead_ms == pytest.approx(overhead_ms, rel=1e-6)
    assert cm.flops_per_ms == pytest.approx(flops_per_ms, rel=1e-6)
    assert cm.batch_size == 3

