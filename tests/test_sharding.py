"""Multi-device SPMD: 8 simulated CPU devices in a subprocess (XLA's device count is fixed at
start-up, so the rest of the suite keeps its single device). The assertions live in
``tests/sharding_check.py``: per-site statistics (rtol 1e-5), the plan (equal) and the training
losses (rtol 1e-5) on a (data, fsdp, model) mesh against the one-device run, and the shardings of
new LoRA / adapter / prefix parameters on FSDP- and tensor-parallel-sharded kernels."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharding_check.py")],
                          cwd=os.path.dirname(HERE), env=env, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "SHARDING OK" in proc.stdout, out[-4000:]
    for line in ("adapter shardings", "flax partitioning metadata: ok", "stacked layers: ok",
                 "plan", "losses"):
        assert line in proc.stdout, (line, out[-4000:])


@pytest.mark.parametrize("shape", [(384, 7), (1536, 13), (5, 3), (30522, 2)])
def test_bucketed_default_initialisers_equal_jax(shape):
    """The default initialisers compile once per size bucket (not per shape, which made
    apply_plan's first call slow) and give exactly jax.jit(initialiser)'s values."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from layerlens_jax._src.peft import nnx_modules

    key = jax.random.key(11)
    for init in (nnx_modules._default_a_init, nnx_modules._prefix_key_init):
        got = np.asarray(nnx_modules._init(init, key, shape, jnp.float32))
        want = np.asarray(jax.jit(init.base, static_argnums=(1, 2))(key, shape, jnp.float32))
        assert got.shape == shape and np.array_equal(got, want), (init.noise, shape)
    prefix_shape = (4, 2, 8)  # (length, heads, head_dim)
    got = nnx_modules._init(nnx_modules._prefix_key_init, key, prefix_shape, jnp.float32)
    want = jax.jit(nnx_modules._prefix_key_init.base, static_argnums=(1, 2))(key, prefix_shape,
                                                                              jnp.float32)
    assert np.array_equal(np.asarray(got), np.asarray(want))
