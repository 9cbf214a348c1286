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
