"""Every Pallas kernel lowers to Triton for CUDA, on this CPU machine.

Interpret mode runs a kernel's logic through XLA:CPU and misses what only the Triton lowering
rejects (a load's `other` without a mask went to the GPU twice that way). Lowering with
lowering_platforms=("cuda",) runs jax's Pallas-to-Triton lowering without a GPU, so those
errors fail here, in CI. (PTX compilation and numerics still need the GPU: tools/gpu_check.py
and tools/gpu_check_attention.py.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.ops.attention import decode_attention_step
from jint8.ops.int8_matmul import configs, reference
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas

from int8_plans import FUSED_VARIANTS, PLANS, THRESHOLD, fused_plan


def _lower_for_cuda(fn, *args) -> str:
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("rope,packed", [(True, "array"), (True, None), (False, None),
                                         (True, "partials")])
def test_decode_attention_step_lowers(rope, packed):
    b, n, kv, h, s = 2, 8, 2, 64, 96
    q = jnp.zeros((b, n, h), jnp.bfloat16)
    k_new = jnp.zeros((b, kv, h), jnp.bfloat16)
    cache = jnp.zeros((2, b, s, kv, h), jnp.bfloat16)
    cos = jnp.zeros((b, h), jnp.bfloat16)
    qkv = jnp.zeros((b, (n + 2 * kv) * h), jnp.bfloat16)
    if packed == "partials":  # a q|k|v projection's float32 split-K partials, summed in the kernel
        qkv = jnp.zeros((4, b, (n + 2 * kv) * h), jnp.float32)

    def step(q, k_new, cache, cos, qkv):
        return decode_attention_step(q, k_new, k_new, cache, cache, jnp.ones((b, s), bool), jnp.int32(5),
                                     layer=1, scale=0.125, rope=(cos, cos) if rope else None,
                                     packed=qkv if packed is not None else None)

    text = _lower_for_cuda(step, q, k_new, cache, cos, qkv)
    assert "jint8_decode_attention" in text


@pytest.mark.parametrize("window,softcap", [(None, None), (100, 50.0)])
def test_paged_decode_attention_lowers(window, softcap):
    from jint8.ops.attention.paged_pallas import paged_decode_attention_pallas

    q = jnp.zeros((3, 8, 64), jnp.bfloat16)
    pool = jnp.zeros((2, 20, 16, 2, 64), jnp.bfloat16)
    tables = jnp.zeros((3, 6), jnp.int32)

    def step(q, pool, tables):
        return paged_decode_attention_pallas(q, pool, pool, tables, jnp.array([5, 90, -1], jnp.int32),
                                             layer=1, scale=0.125, sliding_window=window,
                                             logit_softcap=softcap)

    assert "jint8_paged_decode_attention" in _lower_for_cuda(step, q, pool, tables)


def _cases():
    """(plan name, plan, fold): every plan of the tests plain; the fused ones (the only route
    that applies a norm, gate or output gate in its kernel) also with each."""
    for name, plan in PLANS.items():
        yield name, plan, "none"
    for name, variant in FUSED_VARIANTS.items():
        plan = fused_plan(3, **variant)
        for prologue in ("none", "norm", "gate", "output_gate"):
            yield f"fused_{name}", plan, prologue


@pytest.mark.parametrize("name,plan,prologue", list(_cases()),
                         ids=[f"{name}-{prologue}" for name, _, prologue in _cases()])
def test_int8_matmul_plans_lower(name, plan, prologue):
    m, k, n = 3, 70, 45  # not tile multiples
    layout = plan.reads_layout()
    folded, width = {}, k
    if prologue == "norm":
        folded = dict(norm=reference.InputNorm(jnp.ones((k,), jnp.bfloat16), 1e-5))
    elif prologue == "gate":
        folded, width = dict(gate=reference.InputGate("silu")), 2 * k
    elif prologue == "output_gate":  # gate | up: N even, N / 2 not a tile multiple
        folded, n = dict(output_gate=reference.OutputGate("silu")), 46
    x = jnp.zeros((m, width), jnp.bfloat16)
    wq = jnp.zeros((k, n) if layout == "kn" else (n, k), jnp.int8)
    op = functools.partial(int8_matmul_pallas, threshold=THRESHOLD, outlier_capacity=8,
                           weight_layout=layout, plan=plan, **folded)
    text = _lower_for_cuda(lambda x, wq: op(x, wq, jnp.ones((n,), jnp.float32))[0], x, wq)
    assert "__gpu$xla.gpu.triton" in text or "triton" in text.lower()


def test_tuned_h100_decode_plans_lower():
    """The table's own plans for the Llama-3-8B decode shapes (what the GPU runs at batch 1)."""
    for k, n in ((4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)):
        plan = configs.plan_for("NVIDIA H100 80GB HBM3", 1, k, n, "nk")
        x = jnp.asarray(np.zeros((1, k)), jnp.bfloat16)
        wq = jnp.zeros((n, k), jnp.int8)
        gated = dict(output_gate=reference.OutputGate("silu")) if n == 28672 else {}  # gate_up
        op = functools.partial(int8_matmul_pallas, threshold=THRESHOLD, outlier_capacity=64,
                               weight_layout="nk", plan=plan, **gated)
        assert "triton" in _lower_for_cuda(lambda x, wq: op(x, wq, jnp.ones((n,), jnp.float32))[0],
                                           x, wq).lower()


INT4_CONFIGS = {
    "decode_fma_gather": (1, dict(block_m=1, block_n=32, block_k=128, dot="fma", split_k=2)),
    "decode_fma_select": (1, dict(block_m=1, block_n=32, block_k=256, dot="fma", lookup="select")),
    "decode_mma": (5, dict(block_m=16, block_n=32, block_k=128, dot="mma", split_k=2)),
    "decode_mma_swapped": (16, dict(block_m=16, block_n=32, block_k=128, dot="mma_swapped")),
    "prefill_mma": (40, dict(block_m=64, block_n=32, block_k=128, dot="mma")),
    "xla_dot": (40, dict(block_m=64, block_n=32, block_k=128, route="xla_dot")),
}


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("name", sorted(INT4_CONFIGS))
def test_int4_matmul_kernels_lower(name, double_quant):
    from jint8 import quant4
    from jint8.ops.int4_matmul.configs import Config
    from jint8.ops.int4_matmul.pallas_triton import int4_matmul_pallas

    m, fields = INT4_CONFIGS[name]
    n, k = 45, 256  # N not a tile multiple
    w = quant4.quantize_4bit(jnp.ones((n, k), jnp.float32), blocksize=64, double_quant=double_quant)
    op = functools.partial(int4_matmul_pallas, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16,
                           config=Config(**fields))
    text = _lower_for_cuda(lambda x, w: op(x, w, jnp.zeros((n,), jnp.bfloat16)), jnp.zeros((m, k), jnp.bfloat16), w)
    assert "jint8_int4" in text
