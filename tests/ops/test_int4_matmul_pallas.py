"""The Pallas (Triton lowering) 4-bit matmul kernels, run in Pallas interpret mode on the CPU.

CI has no GPU: these run the kernels' logic (tiling, odd N, split-K, the nibble split of K, both
lookups, double-quantized absmax) through `interpret=True`; `benchmarks/bench_int4_matmul.py
--check` runs the same checks compiled on a GPU. Held to (jint8/ops/int4_matmul/checks.py):
- the kernels' dequantized weight equals reference.dequantized_weight bit for bit;
- the output is within checks.output_error_bound of the recipe in float64 on those weights.
Fresh random inputs per run; the seed is in every failure message.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8 import quant4
from jint8.errors import BackendUnavailableError, InvalidConfigError
from jint8.ops.int4_matmul import (
    available_backends, checks, configs, int4_matmul, reference, select_backend,
)
from jint8.ops.int4_matmul.configs import Config
from jint8.ops.int4_matmul.pallas_triton import dequantize_pallas, int4_matmul_pallas, unsupported_shape_reason


N, K = 45, 384  # N odd (a masked last tile); K = 3 x 128: uneven split-K slices; 270 blocks of 64
_WEIGHTS = {}  # one weight per format for the whole module
# jitted: op-by-op they compile one small program per operation (seconds per format on 2 cores)
_quantize = jax.jit(quant4.quantize_4bit, static_argnames=("quant_type", "blocksize", "double_quant"))
_dequantized = jax.jit(reference.dequantized_weight, static_argnums=1)


def _weight(rng, quant_type, double_quant, blocksize):
    key = (quant_type, double_quant, blocksize)
    if key not in _WEIGHTS:
        w = rng.standard_normal((N, K)).astype(np.float32) * rng.uniform(0.01, 3.0, (N, 1)).astype(np.float32)
        _WEIGHTS[key] = _quantize(jnp.asarray(w), quant_type=quant_type, blocksize=blocksize,
                                  double_quant=double_quant)
    return _WEIGHTS[key]


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a.view(np.uint32)


@pytest.mark.parametrize("quant_type,double_quant,blocksize,dtype,lookup", [
    ("nf4", True, 64, jnp.bfloat16, "gather"), ("fp4", False, 128, jnp.float16, "select"),
    ("fp4", True, 64, jnp.float32, "select"), ("nf4", False, 128, jnp.bfloat16, "gather"),
])
def test_dequantized_weight_is_bit_identical_to_reference(rng, quant_type, double_quant, blocksize, dtype, lookup):
    w = _weight(rng, quant_type, double_quant, blocksize)  # blocksize 64: two nested absmax blocks
    # two sub-blocks (absmax) per K step at blocksize 64; at 128, two K steps per absmax block
    config = Config(block_m=128, block_n=32, block_k=128 if blocksize == 64 else 64, route="xla_dot", lookup=lookup)
    got = dequantize_pallas(w, dtype, config=config, interpret=True)
    want = _dequantized(w, dtype)
    assert got.dtype == want.dtype and got.shape == (N, K)
    np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"seed {rng.seed_value}")


# (M, format, config): the decode paths at M = 1 (CUDA-core FMA, both lookups, a K step shorter
# than the absmax block; MMA), small-M MMA tiles with split-K and the swapped MMA, prefill tiles
# (de-interleaved x) and the xla_dot route.
CASES = [
    (1, "nf4", True, 64, Config(block_m=1, block_n=16, block_k=128, dot="fma")),
    (1, "fp4", False, 128, Config(block_m=1, block_n=32, block_k=64, dot="fma", lookup="select", split_k=2)),
    (1, "fp4", True, 64, Config(block_m=16, block_n=16, block_k=64, dot="mma", split_k=3)),
    (5, "nf4", False, 128, Config(block_m=16, block_n=32, block_k=128, dot="mma_swapped", lookup="select")),
    (16, "nf4", True, 64, Config(block_m=16, block_n=16, block_k=128, dot="mma", split_k=2)),
    (64, "fp4", True, 64, Config(block_m=32, block_n=16, block_k=128, dot="mma")),
    (64, "nf4", True, 64, Config(block_m=32, block_n=32, block_k=64, route="xla_dot")),
]


@pytest.mark.parametrize("m,quant_type,double_quant,blocksize,config", CASES,
                         ids=[f"M{m}-{q}-dq{int(d)}-bs{b}-{c.route}-{c.dot}-{c.lookup}-s{c.split_k}"
                              for m, q, d, b, c in CASES])
def test_int4_matmul_kernel_within_bound_of_float64_recipe(rng, m, quant_type, double_quant, blocksize, config):
    w = _weight(rng, quant_type, double_quant, blocksize)
    x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
    bias = jnp.asarray(rng.standard_normal(N), jnp.bfloat16) if m != 16 else None
    y = int4_matmul_pallas(x, w, bias, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16, config=config,
                           interpret=True)
    assert y.shape == (m, N) and y.dtype == jnp.bfloat16
    y64, magnitude = checks.float64_recipe(x, _dequantized(w, jnp.bfloat16), bias, jnp.bfloat16)
    bad = checks.output_errors(y, y64, magnitude, K, jnp.bfloat16, jnp.bfloat16)
    assert bad == 0, f"{bad} elements outside the bound, seed {rng.seed_value}"


@pytest.mark.parametrize("compute_dtype,out_dtype", [(jnp.float32, jnp.float32), (jnp.float16, jnp.float32)])
def test_int4_matmul_kernel_compute_dtypes(rng, compute_dtype, out_dtype):
    m, k = 3, K
    w = _weight(rng, "nf4", True, 64)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(N), jnp.float32)
    config = Config(block_m=16, block_n=16, block_k=128, dot="mma")
    y = int4_matmul_pallas(x, w, bias, compute_dtype=compute_dtype, out_dtype=out_dtype, config=config,
                           interpret=True)
    assert y.dtype == out_dtype
    y64, magnitude = checks.float64_recipe(x, _dequantized(w, compute_dtype), bias, compute_dtype)
    assert checks.output_errors(y, y64, magnitude, k, compute_dtype, out_dtype) == 0, f"seed {rng.seed_value}"


def test_cpu_calls_run_the_xla_reference_and_a_forced_kernel_says_why(rng):
    w = _weight(rng, "nf4", True, 64)
    x = jnp.ones((2, K), jnp.bfloat16)
    # The kernels come first (the GPU default); on a CPU they say why not and XLA runs.
    assert available_backends().index("pallas_triton") < available_backends().index("xla")
    assert select_backend(x, w).name == "xla"
    with pytest.raises(BackendUnavailableError, match="backend='pallas_triton' cannot run this call: not a GPU"):
        int4_matmul(x, w, backend="pallas_triton")


def test_shapes_the_kernels_cannot_read_in_place_fall_back_with_a_reason():
    def weight(k):  # the fields' shapes by Int4Weight's rule (no quantization needed to ask)
        n, blocks = 4 * k, -(-4 * k // 64)
        return quant4.Int4Weight(packed=jnp.zeros(((n + 1) // 2, 1), jnp.uint8), absmax=jnp.ones(blocks),
                                 shape=(4, k), blocksize=64)

    assert "K=65 is odd" in unsupported_shape_reason(weight(65))
    straddling = weight(96)
    assert "K=96 is not a multiple of blocksize=64" in unsupported_shape_reason(straddling)
    assert unsupported_shape_reason(weight(128)) is None
    with pytest.raises(ValueError, match="K=96 is not a multiple"):
        int4_matmul_pallas(jnp.ones((1, 96)), straddling, compute_dtype=jnp.float32, out_dtype=jnp.float32,
                           interpret=True)


def test_default_configs_fill_the_gpu_at_decode_and_fit_any_shape():
    for k, n in ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (8192, 28672)):
        config = configs.default_config(1, k, n, 64)
        programs = -(-n // config.block_n) * config.split_k
        assert programs >= 100 and k % config.block_k == 0 and config.dot == "fma"
        assert configs.default_config(16, k, n, 64).block_m == 16
    assert configs.fit_to_shape(Config(block_m=16, block_n=64, block_k=512), 3, 192, 40, 64).block_k == 64
    assert all(configs.default_config(m, 4096, 4096, 64).route == "xla_dot" for m in (65, 512, 4096))


def test_config_and_table_errors_name_the_field(tmp_path, monkeypatch):
    with pytest.raises(InvalidConfigError, match="block_n=24 must be a power of two"):
        Config(block_m=16, block_n=24, block_k=64)
    with pytest.raises(InvalidConfigError, match="dot='fma' runs one row"):
        Config(block_m=16, block_n=32, block_k=64, dot="fma")
    with pytest.raises(InvalidConfigError, match="lookup='table' must be one of"):
        Config(block_m=16, block_n=32, block_k=64, lookup="table")
    table = {"entries": [{"max_m": 1, "k": 4096, "n": 4096,
                          "config": {"block_m": 1, "block_n": 64, "block_k": 512, "dot": "fma", "split_k": 4}},
                         {"max_m": 16, "config": {"block_m": 16, "block_n": 32, "block_k": 256}}]}
    (tmp_path / "int4_nvidia_h100.json").write_text(json.dumps(table))
    monkeypatch.setenv(configs.TABLES_ENV_VAR, str(tmp_path))
    configs.clear_cache()
    try:
        assert configs.config_for("NVIDIA H100 80GB HBM3", 1, 4096, 4096, 64).split_k == 4
        assert configs.config_for("NVIDIA H100 80GB HBM3", 8, 4096, 1024, 64).block_n == 32
        assert configs.config_for("NVIDIA H100 80GB HBM3", 1, 4096, 1024, 64).block_n == 32  # shape-less entry
        bad_entry = {"entries": [{"max_m": 1, "config": {"block_m": 3}}]}
        (tmp_path / "int4_nvidia_h100.json").write_text(json.dumps(bad_entry))
        configs.clear_cache()
        with pytest.raises(InvalidConfigError, match=r"int4_nvidia_h100.json: entries\[0\]"):
            configs.config_for("NVIDIA H100 80GB HBM3", 1, 4096, 4096, 64)
    finally:
        configs.clear_cache()

