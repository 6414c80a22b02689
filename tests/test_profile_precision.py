"""Precision of the profile taps, against the exact vmap(grad) reference.

The default is the fastest mode whose Fisher traces stay within 1e-3 relative of the exact ones:
``"high"`` (TF32 products on NVIDIA GPUs, three bf16 passes on TPU, exact float32 on CPU). On
this CPU every lax precision computes exact float32, so the accelerator rounding is emulated:
``tf32`` rounds the tap operands to TF32's 10-bit mantissa (what a TF32 product multiplies; three
bf16 passes are finer), ``"bfloat16"`` (a real option) to bf16 -- which misses the bound, hence
is not the default.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from layerlens_jax.models import BertClassifier, BertConfig, MLP
from layerlens_jax._src import fisher_rules
from layerlens_jax._src.fisher_rules import DEFAULT_TAP_PRECISION, TAP_PRECISIONS
from layerlens_jax._src.profile import profile
from test_profile import bert_loss, make_batches, nnx_per_example_grad, reference_stats

BOUND = 1e-3  # relative to the exact Fisher traces: what the default must meet
EXACT_RTOL = 2e-4  # test_profile's tolerance for exact float32


def round_to_tf32(a):
    """Round float32 to TF32 (10 explicit mantissa bits), to nearest, ties away from zero."""
    bits = jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.uint32)
    bits = (bits + jnp.uint32(1 << 12)) & jnp.uint32(0xFFFFE000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


@pytest.fixture
def with_tf32(monkeypatch):
    monkeypatch.setitem(TAP_PRECISIONS, "tf32", (round_to_tf32, jax.lax.Precision.HIGHEST))
    return "tf32"


@pytest.fixture(scope="module")
def bert_reference():
    cfg = BertConfig.tiny()
    model = BertClassifier(cfg, rngs=nnx.Rngs(0))
    batches = make_batches(cfg, n_batches=2, b=4, t=6, pad_last_example=True)
    stats = profile(model, bert_loss, batches, precision="highest")
    gn, fi = reference_stats(nnx_per_example_grad(model, bert_loss), batches, stats.sites)
    return model, batches, gn, fi


def mlp_case():
    rng = np.random.default_rng(0)
    model = MLP((64, 96, 3), rngs=nnx.Rngs(0))
    batch = {"x": rng.normal(size=(8, 64)).astype(np.float32),
             "y": rng.normal(size=(8, 3)).astype(np.float32)}

    def loss(m, b):
        return ((m(b["x"]) - b["y"]) ** 2).sum(-1)

    return model, loss, [batch]


def test_round_to_tf32():
    x = jnp.asarray([1.0, 1.0 + 2.0 ** -11, 1.0 + 2.0 ** -10, 1.0 + 3 * 2.0 ** -12, -3.0])
    np.testing.assert_array_equal(np.asarray(round_to_tf32(x)),
                                  [1.0, 1.0 + 2.0 ** -10, 1.0 + 2.0 ** -10, 1.0 + 2.0 ** -10, -3.0])


@pytest.mark.parametrize("precision", sorted(TAP_PRECISIONS))
def test_exact_on_cpu_for_lax_precisions_and_bf16_near(bert_reference, precision):
    model, batches, gn, fi = bert_reference
    stats = profile(model, bert_loss, batches, precision=precision)
    rtol = 2e-3 if precision == "bfloat16" else EXACT_RTOL  # CPU: lax precisions are float32
    np.testing.assert_allclose(stats.fisher_trace, fi, rtol=rtol, atol=1e-9)
    np.testing.assert_allclose(stats.grad_norm, gn, rtol=EXACT_RTOL, atol=1e-9)  # not tapped


def test_tf32_rounding_within_bound_on_bert(bert_reference, with_tf32):
    model, batches, _, fi = bert_reference
    stats = profile(model, bert_loss, batches, precision=with_tf32)
    rel = np.abs(stats.fisher_trace / fi - 1)
    assert rel.max() < BOUND, rel.max()


def test_tf32_within_bound_and_bf16_not_on_mlp(with_tf32):
    """The default's accelerator rounding (TF32) meets the bound; bf16 does not (not vacuous:
    both differ from exact)."""
    model, loss, batches = mlp_case()
    exact = profile(model, loss, batches, precision="highest").fisher_trace
    tf32 = np.abs(profile(model, loss, batches, precision=with_tf32).fisher_trace / exact - 1)
    bf16 = np.abs(profile(model, loss, batches, precision="bfloat16").fisher_trace / exact - 1)
    assert 1e-7 < tf32.max() < BOUND, tf32
    assert bf16.max() > BOUND, bf16


def test_default_is_high_and_unknown_name_rejected():
    assert DEFAULT_TAP_PRECISION == "high"
    assert fisher_rules.DenseRule(d_in=2, d_out=2, has_bias=False).precision == "high"
    model = MLP((4, 3), rngs=nnx.Rngs(0))
    batch = {"x": np.ones((2, 4), np.float32)}
    with pytest.raises(ValueError, match="precision must be one of .* got 'fp8'"):
        profile(model, lambda m, b: m(b["x"]).sum(-1), [batch], precision="fp8")
