"""quantize_params and int8_matmul on arrays sharded over 8 fake CPU devices (a subprocess, since
the test process's jax already started with one device)."""

import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "sharded_quantize.py")


def test_quantize_keeps_sharding_and_sharded_matmul_equals_unsharded():
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SHARDED OK" in result.stdout


def test_sharded_int8_matmul_equals_unsharded_on_explicit_and_auto_axes():
    """tests/scripts/sharded_int8_ops.py: column-, row-parallel, fused q|k|v and gate|up, gated
    down_proj, Int8Dense and the Pallas kernels (interpret mode) per shard, against one device."""
    script = os.path.join(os.path.dirname(__file__), "scripts", "sharded_int8_ops.py")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
