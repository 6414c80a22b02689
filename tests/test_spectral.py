"""Gradient-spectrum gains (layerlens_jax._src.spectral) against direct SVDs of reference gradients."""

from __future__ import annotations

import numpy as np
import optax
import pytest
from flax import nnx

from layerlens_jax import BertClassifier, BertConfig, Catalogue, GainModel, Site, allocate
from layerlens_jax._src.sites import discover_sites, flatten_paths
from layerlens_jax._src.spectral import SpectralGain, gradient_spectra, spectral_curve


def _loss(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])


def test_planted_spectrum_gives_the_expected_curves():
    values = np.array([[3.0, 1.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    frob = spectral_curve(values, [1, 2, 3, 8], "frobenius")
    np.testing.assert_allclose(frob, [[3, np.sqrt(10), np.sqrt(10), np.sqrt(10)],
                                      [2, np.sqrt(8), np.sqrt(12), 4]])
    nuc = spectral_curve(values, [1, 2, 3, 8], "nuclear")
    np.testing.assert_allclose(nuc, [[3, 4, 4, 4], [2, 4, 6, 8]])
    with pytest.raises(ValueError, match="norm must be one of"):
        spectral_curve(values, [1], "max")


def test_planted_rank_two_gradient_of_a_dense_layer():
    """loss_n = <x_n W, c_n>: the mean gradient is sum_n x_n c_n^T / N, a planted rank-2 matrix."""

    class Net(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(6, 5, use_bias=False, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.dense(x)

    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(6, 2)))
    v, _ = np.linalg.qr(rng.normal(size=(5, 2)))
    x = np.stack([4.0 * u[:, 0], 2.0 * u[:, 1]]).astype(np.float32)  # G = (4 u0 v0 + 2 u1 v1) / 2
    c = np.stack([v[:, 0], v[:, 1]]).astype(np.float32)
    model = Net()
    sites = discover_sites(model)
    spectra = gradient_spectra(model, lambda m, b: (m(b["x"]) * b["c"]).sum(-1),
                               [{"x": x, "c": c}], sites, top_k=4)
    row = spectra.values[[s.path for s in sites].index("dense")]
    np.testing.assert_allclose(row, [2.0, 1.0, 0.0, 0.0], atol=1e-6)
    assert spectra.num_examples == 2


def test_gradient_spectra_match_svd_of_the_reference_gradient():
    model = BertClassifier(BertConfig.tiny(), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    batches = [{"input_ids": rng.integers(1, 50, (4, 6)).astype(np.int32),
                "attention_mask": np.ones((4, 6), np.int32),
                "labels": rng.integers(0, 2, (4,)).astype(np.int32),
                "example_mask": np.array([1, 1, 1, 0], np.float32)} for _ in range(3)]
    sites = discover_sites(model, example=batches[0]["input_ids"])
    spectra = gradient_spectra(model, _loss, batches + batches, sites, max_batches=3, top_k=8)
    assert spectra.num_examples == 9  # padding rows count zero; max_batches stops at 3

    def mean_loss(m):
        return sum((_loss(m, b) * b["example_mask"]).sum() for b in batches) / 9.0

    grads = {k.removesuffix("/value"): np.asarray(v, np.float64)
             for k, v in flatten_paths(nnx.state(nnx.grad(mean_loss)(model))).items()}
    weights = {k.removesuffix("/value"): np.asarray(v, np.float64)
               for k, v in flatten_paths(nnx.state(model, nnx.Param)).items()}
    checked = 0
    for i, site in enumerate(sites):
        if site.kind != "linear":
            assert np.isnan(spectra.values[i]).all(), site.path
            continue
        g = grads[f"{site.path}/kernel"].reshape(site.in_features, -1)
        ref = np.linalg.svd(g, compute_uv=False)[:8]
        np.testing.assert_allclose(spectra.values[i, :len(ref)], ref, rtol=2e-4,
                                   atol=1e-6 * ref[0], err_msg=site.path)
        w = weights[f"{site.path}/kernel"].reshape(g.shape)
        np.testing.assert_allclose(spectra.weight_gradient[i], np.abs(w * g).mean(), rtol=2e-4,
                                   err_msg=site.path)  # GoRA's importance, same mean gradient
        checked += 1
    assert np.isnan(spectra.weight_gradient[[s.kind != "linear" for s in sites]]).all()
    assert checked >= 10  # query/key/value (3-D LinearGeneral kernels), out, FFN, pooler, head


def _dense_site(path):
    return Site(path=path, kind="linear", module_type="Linear",
                param_shapes={"kernel": (8, 8)}, num_params=64, in_features=8, out_features=8)


def test_spectral_gain_allocates_by_the_curves_not_by_utility():
    """Equal costs, equal utility: a rank-1 gradient gets rank 1, a flat spectrum the rest."""
    from layerlens_jax._src.spectral import GradientSpectra

    sites = [_dense_site("a"), _dense_site("b")]
    spectra = GradientSpectra(sites=("a", "b"), num_examples=1,
                              values=np.array([[1.0, 0, 0, 0], [0.6, 0.6, 0.6, 0.6]]))
    gain = SpectralGain(spectra=spectra, fallback=GainModel())
    budget = {"params": 3 * 16}  # exactly three ranks of an 8 x 8 LoRA: a:1 + b:2 fills it

    plan = allocate(sites, np.ones(2), budget, catalogue=Catalogue.from_sizes(lora=[1, 2, 3]),
                    gain_model=gain)
    # frobenius gains: a = 1, 1, 1; b = 0.6, 0.85, 1.04 -> a:1 + b:2 (1.85) beats every other split
    assert plan.assignments() == {"a": ("lora", 1), "b": ("lora", 2)}
    g = gain.gain(np.ones(2), [("none", 0), ("lora", 1), ("lora", 3)])
    top = np.sqrt(1.08)  # the largest rank-3 gain (site b) normalises to LoRA's efficiency, 1
    np.testing.assert_allclose(g, [[0, 1 / top, 1 / top], [0, 0.6 / top, 1.0]])
    with pytest.raises(ValueError, match="spectra for 2 sites but the allocator has 3"):
        gain.gain(np.ones(3), [("lora", 1)])
