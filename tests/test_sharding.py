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
