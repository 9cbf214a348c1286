"""The fused decode kernel's prologues and epilogue gate, in Pallas interpret mode on the CPU: an
RMSNorm (InputNorm) or a gated activation (InputGate) folded into the kernel of the projection
after it, and a fused gate|up projection gating its own result (OutputGate).

Held to: on inputs where every rounding of the reference is well defined (checks.exact_norm_inputs,
checks.exact_gate_inputs) the kernel's op input has the reference's bits, so its int32
accumulator equals reference.int8_dot on the reference's norm(x) / gate(x) and its output lies
within checks.output_error_bound of the recipe on it; every route without the fused kernel
applies the norm or gate first and gives int8_matmul's bits on norm(x) / gate(x).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint8
from jint8.errors import InvalidConfigError, ShapeError
from jint8.models import LlamaConfig, LlamaForCausalLM
from jint8.models.common import init_cache
from jint8.ops.int8_matmul import api, checks, int8_matmul, pallas_triton, reference
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas
from jint8.ops.int8_matmul.testing import int8_accumulator_pallas
from int8_plans import FUSED_VARIANTS, PLANS, THRESHOLD, fused_plan

@pytest.mark.parametrize("m,k,n,split_k,row_scales", [
    (1, 77, 45, 1, "kernel"), (3, 200, 129, 3, "kernel"), (16, 1500, 20, 1, "kernel"),
    (3, 200, 129, 3, "input"),  # a plan asking for XLA's row absmax: with a norm the kernel sweeps
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("unit_offset", [False, True])
def test_fused_kernel_folds_the_input_norm_exactly(rng, m, k, n, split_k, row_scales, dtype, unit_offset):
    """int8_matmul(x, norm=n) on the fused route: the kernel's prologue normalises x as
    reference.rms_norm does (Llama's two roundings, Gemma's one), so its int32 accumulator equals
    the reference's on n(x), and its output matches int8_matmul_reference(x, norm=n)."""
    x, scale, wq = checks.exact_norm_inputs(rng, m, k, n, dtype)
    norm = reference.InputNorm(scale, 1e-5, unit_offset)
    plan = fused_plan(m, split_k=split_k, row_scales=row_scales)
    acc = int8_accumulator_pallas(x, wq, threshold=THRESHOLD, plan=plan,
                                  norm=norm, interpret=True)
    xq, _, col_mask = reference.quantize_rows(norm(x), THRESHOLD)
    assert int(col_mask.sum()) >= 1
    want = reference.int8_dot(xq, wq, "nk")
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(want), err_msg=f"seed {rng.seed_value}")
    col_scales = jnp.asarray(rng.uniform(0.01, 2.0, n), jnp.float32)
    y, stats = int8_matmul_pallas(x, wq, col_scales, threshold=THRESHOLD, outlier_capacity=64,
                                  weight_layout="nk", norm=norm, plan=plan, interpret=True)
    y_ref, ref_stats = reference.int8_matmul_reference(
        x, wq, col_scales, threshold=THRESHOLD, outlier_capacity=64, weight_layout="nk", norm=norm)
    assert int(stats.num_outlier_columns) == int(ref_stats.num_outlier_columns)
    y, y_ref = np.asarray(y, np.float64), np.asarray(y_ref, np.float64)
    # The two differ only in the outlier stream's rounding (fused_int8_matmul_reference).
    assert np.max(np.abs(y - y_ref)) <= 2e-2 * np.max(np.abs(y_ref)), f"seed {rng.seed_value}"


@pytest.mark.parametrize("m,k,n,split_k,outliers,row_scales", [
    (1, 77, 45, 1, True, "kernel"),      # decode: M = 1, odd K and N
    (1, 77, 45, 1, False, "kernel"),     # no outlier columns
    (3, 200, 129, 3, True, "kernel"),    # split-K
    (8, 64, 33, 1, False, "kernel"),
    (16, 1500, 20, 1, True, "kernel"),   # unrolled absmax sweep with a ragged last chunk
    (8, 64, 33, 1, True, "input"),       # a plan asking for XLA's row absmax: with a gate the kernel sweeps
])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_fused_kernel_folds_the_input_gate_exactly(rng, m, k, n, split_k, outliers, row_scales, dtype):
    """int8_matmul(x, gate=g) on the fused route, x [M, 2K] = gate | up: the kernel forms
    silu(gate) * up from the gate and up tiles with reference.gated_activation's two roundings,
    so its int32 accumulator equals the reference's on g(x) and its output lies within the
    derived bound of the recipe on g(x)."""
    x, wq = checks.exact_gate_inputs(rng, m, k, n, dtype, outliers=outliers)
    gate = reference.InputGate("silu")
    h = gate(x)
    assert x.shape == (m, 2 * k) and h.shape == (m, k)
    plan = fused_plan(m, split_k=split_k, row_scales=row_scales)
    acc = int8_accumulator_pallas(x, wq, threshold=THRESHOLD, plan=plan,
                                  gate=gate, interpret=True)
    xq, _, col_mask = reference.quantize_rows(h, THRESHOLD)
    num_outliers = int(col_mask.sum())
    assert (num_outliers >= 1) == outliers
    want = reference.int8_dot(xq, wq, "nk")
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(want), err_msg=f"seed {rng.seed_value}")

    col_scales = jnp.asarray(rng.uniform(0.01, 2.0, n), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    y, stats = int8_matmul_pallas(x, wq, col_scales, bias, threshold=THRESHOLD, outlier_capacity=64,
                                  weight_layout="nk", gate=gate, plan=plan, interpret=True)
    assert y.dtype == dtype and y.shape == (m, n)
    assert int(stats.num_outlier_columns) == num_outliers and not bool(stats.capacity_overflow)
    y64, magnitude = checks.float64_recipe(h, wq.T, col_scales, bias, threshold=THRESHOLD)
    rounding = checks.weight_rounding(h, wq.T, col_scales, threshold=THRESHOLD)
    # Float terms of the stream per element: one per flagged column, one partial per K step.
    stream_terms = num_outliers + -(-k // plan.gemm.block_k) + 2
    ratio = checks.max_bound_violation(y, y64, magnitude, dtype, stream_terms=stream_terms,
                                       split_k=split_k, weight_rounding=rounding)
    assert ratio <= 1.0, f"error {ratio:.3g} x the bound, seed {rng.seed_value}"


@pytest.mark.parametrize("m,dtype", [(1, jnp.bfloat16), (5, jnp.float16)])
def test_fused_kernel_gate_on_random_inputs_equals_gating_first(rng, m, dtype):
    """Any x: interpret mode runs the kernel body through XLA:CPU, whose float32 silu has the
    same bits as the reference's (under jit and op by op), so the accumulators are equal here
    too; on a GPU the exp and division may differ in the last bit (gpu_check --gate)."""
    k, n = 130, 40
    x = jnp.asarray(rng.standard_normal((m, 2 * k)) * 3.0, dtype)
    wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    gate = reference.InputGate("silu")
    plan = fused_plan(m)
    acc = int8_accumulator_pallas(x, wq, threshold=THRESHOLD, plan=plan,
                                  gate=gate, interpret=True)
    want = reference.int8_dot(reference.quantize_rows(gate(x), THRESHOLD)[0], wq, "nk")
    np.testing.assert_array_equal(np.asarray(acc), np.asarray(want), err_msg=f"seed {rng.seed_value}")


@pytest.mark.parametrize("kind", ["norm", "gate"])
def test_routes_without_the_fused_kernel_apply_the_prologue_first(rng, kind):
    """Routes without the fused kernel (the two-kernel and XLA-GEMM routes, the XLA backend on
    batched x) call norm(x) / gate(x) and then run as before: same bits, same stats."""
    m, k, n = 70, 129, 33
    if kind == "norm":
        x, scale, wq = checks.exact_norm_inputs(rng, m, k, n, jnp.bfloat16)
        x = x + jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.bfloat16)  # any x here
        folded = {"norm": reference.InputNorm(scale, 1e-6)}
    else:
        x = jnp.asarray(rng.standard_normal((m, 2 * k)) * 3.0, jnp.bfloat16)  # gate | up
        wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
        folded = {"gate": reference.InputGate("silu")}
    # Under jit as the routes do: jit-compiled XLA divides by K as a product with 1 / K.
    op_input = jax.jit(functools.partial(reference.op_input, **folded))(x)
    col_scales = jnp.asarray(rng.uniform(0.01, 2.0, n), jnp.float32)
    for name in ("nk", "nk_xla_gemm"):
        kwargs = dict(threshold=THRESHOLD, outlier_capacity=64, weight_layout="nk",
                      plan=PLANS[name], interpret=True)
        applied, _ = int8_matmul_pallas(x, wq, col_scales, **folded, **kwargs)
        first, _ = int8_matmul_pallas(op_input, wq, col_scales, **kwargs)
        np.testing.assert_array_equal(np.asarray(applied), np.asarray(first), err_msg=name)
    kwargs = dict(weight_layout="nk", backend="xla", return_stats=True)
    applied, stats = int8_matmul(x.reshape(2, 35, -1), wq, col_scales, **folded, **kwargs)
    first, first_stats = int8_matmul(op_input.reshape(2, 35, k), wq, col_scales, **kwargs)
    assert applied.shape == (2, 35, n)
    np.testing.assert_array_equal(np.asarray(applied), np.asarray(first))
    assert int(stats.num_outlier_columns) == int(first_stats.num_outlier_columns) > 0


_GATE_CASES = [("nk_branch", 1, 77, 90, jnp.bfloat16), ("nk_branch", 3, 200, 130, jnp.float16),
               ("nk_branch", 16, 100, 40, jnp.float32)]
_GATE_CASES += [(name, 5, 64, 66, jnp.bfloat16) for name in FUSED_VARIANTS if name != "nk_branch"]


@pytest.mark.parametrize("variant,m,k,n,dtype", _GATE_CASES)
def test_fused_kernel_gates_its_output_exactly(rng, variant, m, k, n, dtype):
    """int8_matmul(x, wq [2I, K], output_gate=g) on the fused route: the kernel's epilogue
    (split_k == 1; XLA after the split-K sum otherwise) gives exactly g of the same plan's
    [M, 2I] result, and that is the recipe's g(y) up to the fused kernel's stream rounding."""
    x = jnp.asarray(rng.standard_normal((m, k)) * 2.0, dtype).at[:, 3].set(9.0)  # an outlier column
    wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    col_scales = jnp.asarray(rng.uniform(0.01, 2.0, n), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    layout = FUSED_VARIANTS[variant].get("layout", "nk")
    w = wq if layout == "nk" else wq.T
    output_gate = reference.OutputGate("silu")
    plan = fused_plan(m, **FUSED_VARIANTS[variant])
    kwargs = dict(threshold=THRESHOLD, outlier_capacity=64, weight_layout=layout, interpret=True)
    y, stats = int8_matmul_pallas(x, w, col_scales, bias, output_gate=output_gate, plan=plan,
                                  **kwargs)
    # A gating program streams block_n / 2 columns of gate and of up: the product's plan with
    # that width sums every output in the same order (float32's stream dot depends on it).
    half = dataclasses.replace(plan, gemm=dataclasses.replace(plan.gemm, block_n=plan.gemm.block_n // 2))
    product, _ = int8_matmul_pallas(x, w, col_scales, bias, plan=half, **kwargs)
    assert y.shape == (m, n // 2) and y.dtype == dtype and int(stats.num_outlier_columns) >= 1
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(output_gate(product), np.float32),
                                  err_msg=f"seed {rng.seed_value}")
    want, _ = reference.int8_matmul_reference(x, wq, col_scales, bias, threshold=THRESHOLD,
                                              outlier_capacity=64, weight_layout="nk",
                                              output_gate=output_gate)
    want = np.asarray(want, np.float64)
    assert np.max(np.abs(np.asarray(y, np.float64) - want)) <= 2e-2 * np.max(np.abs(want))


def test_routes_without_the_fused_kernel_gate_the_product(rng):
    """The two-kernel and XLA-GEMM routes and the XLA backend gate their [..., 2I] result in
    XLA: the same bits as output_gate(int8_matmul(...)), shape [..., I]."""
    m, k, n = 70, 129, 66
    x = jnp.asarray(rng.standard_normal((m, k)) * 3.0, jnp.bfloat16)
    wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    col_scales = jnp.asarray(rng.uniform(0.01, 2.0, n), jnp.float32)
    output_gate = reference.OutputGate("silu")
    for name in ("nk", "nk_xla_gemm"):
        kwargs = dict(threshold=THRESHOLD, outlier_capacity=64, weight_layout="nk",
                      plan=PLANS[name], interpret=True)
        gated, _ = int8_matmul_pallas(x, wq, col_scales, output_gate=output_gate, **kwargs)
        product, _ = int8_matmul_pallas(x, wq, col_scales, **kwargs)
        np.testing.assert_array_equal(np.asarray(gated), np.asarray(output_gate(product)), err_msg=name)
    kwargs = dict(weight_layout="nk", backend="xla")
    gated = int8_matmul(x.reshape(2, 35, k), wq, col_scales, output_gate=output_gate, **kwargs)
    assert gated.shape == (2, 35, n // 2)
    product = int8_matmul(x.reshape(2, 35, k), wq, col_scales, **kwargs)
    np.testing.assert_array_equal(np.asarray(gated), np.asarray(output_gate(product)))


def test_output_gate_bad_inputs_raise_clear_errors():
    x = jnp.ones((2, 8), jnp.bfloat16)
    wq = jnp.ones((5, 8), jnp.int8)
    with pytest.raises(ShapeError, match=r"output_gate=.*needs an even N"):
        int8_matmul(x, wq, jnp.ones((5,), jnp.float32), weight_layout="nk",
                    output_gate=reference.OutputGate("silu"))
    with pytest.raises(InvalidConfigError, match="OutputGate.activation='relu'"):
        reference.OutputGate("relu")


def test_input_norm_scale_must_match_k():
    x = jnp.ones((2, 8), jnp.bfloat16)
    wq = jnp.ones((4, 8), jnp.int8)
    with pytest.raises(ShapeError, match="norm.scale.shape"):
        int8_matmul(x, wq, jnp.ones((4,), jnp.float32), weight_layout="nk",
                    norm=reference.InputNorm(jnp.ones((7,), jnp.bfloat16), 1e-6))


def test_input_gate_bad_inputs_raise_clear_errors():
    wq = jnp.ones((4, 8), jnp.int8)
    col_scales = jnp.ones((4,), jnp.float32)
    gate = reference.InputGate("silu")
    with pytest.raises(ShapeError, match=r"gate=.*must end in 2 \* K = 16"):
        int8_matmul(jnp.ones((2, 8), jnp.bfloat16), wq, col_scales, weight_layout="nk", gate=gate)
    with pytest.raises(InvalidConfigError, match="norm= and gate= cannot be combined"):
        int8_matmul(jnp.ones((2, 16), jnp.bfloat16), wq, col_scales, weight_layout="nk", gate=gate,
                    norm=reference.InputNorm(jnp.ones((16,), jnp.bfloat16), 1e-6))
    with pytest.raises(InvalidConfigError, match="InputGate.activation='relu'"):
        reference.InputGate("relu")


def _tiny_int8_llama(dtype):
    """A tiny Llama (4/2 heads of 16, hidden 64) with live outliers, fused (one q|k|v and one
    gate|up projection, as fuse_projections makes them) and quantized; 6 token ids."""
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=32,
                         dtype=dtype)
    model = LlamaForCausalLM(config)
    params = model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda p: p * 2.0 if p.ndim == 2 else p + 0.5, params)  # live outliers
    params = jint8.quantize_params(jint8.fuse_projections(params),
                                   jint8.Int8Config(min_size=0, outlier_capacity=64))
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 96, (1, 6)), jnp.int32)
    return config, model, params, ids


def test_llama_decode_folds_its_norms_and_gate_into_the_fused_kernel(monkeypatch):
    """A tiny int8 Llama (fused q|k|v and gate|up, as fuse_projections makes them) decoded with
    the Pallas backend in interpret mode: the qkv and gate_up projections get the layer's
    RMSNorm folded into the fused kernel's prologue and gate_up gates silu(gate) * up in its
    epilogue (neither a normalised x nor the [1, 2I] product materialised), and the logits match
    the XLA backend's, which applies the norm first and gates the product."""
    config, model, params, ids = _tiny_int8_llama(jnp.float32)

    def decode_logits():  # batch 1: the op folds norms only up to FUSED_NORM_MAX_M rows
        _, cache = model.apply({"params": params}, ids[:, :5],
                               cache=init_cache(config, 1, 16, jnp.float32), cache_index=0)
        logits, _ = model.apply({"params": params}, ids[:, 5:], cache=cache, cache_index=5)
        return np.asarray(logits[:, -1], np.float64)

    monkeypatch.setenv("JINT8_BACKEND", "xla")
    want = decode_logits()
    folded = []  # per traced fused call: (norm folded, output gated, x's width, output width)
    fused = pallas_triton.fused_int8_matmul

    def spy(x, w, col_scales, bias, norm=None, gate=None, output_gate=None, **kwargs):
        y = fused(x, w, col_scales, bias, norm, gate, output_gate, **kwargs)
        folded.append((norm is not None, output_gate is not None, x.shape[-1], y.shape[-1]))
        return y

    monkeypatch.setattr(pallas_triton, "fused_int8_matmul", spy)
    interpret = api.Backend("interpret", functools.partial(pallas_triton.int8_matmul_pallas,
                                                           interpret=True), lambda x, w: None)
    monkeypatch.setattr(api, "_BACKENDS", [interpret, *api._BACKENDS])
    monkeypatch.setenv("JINT8_BACKEND", "interpret")
    got = decode_logits()
    # Traced once per shape: decode's qkv folds its norm; gate_up folds its norm and gates
    # [1, 2 * 96] into [1, 96] (so does the 5-row prefill's gate_up, without the norm: more
    # rows than FUSED_NORM_MAX_M); o, down and lm_head fold nothing.
    qkv_width = (4 + 2 * 2) * 16
    assert sorted(f for f in folded if f[0] or f[1]) == [(False, True, 64, 96), (True, False, 64, qkv_width),
                                                         (True, True, 64, 96)]
    assert sum(not (norm or gated) for norm, gated, _, _ in folded) >= 3
    np.testing.assert_allclose(got, want, atol=2e-3 * np.max(np.abs(want)))


def test_llama_decode_hands_qkv_split_partials_to_the_attention_kernel(monkeypatch):
    """A qkv decode plan with split_partials: the fused q|k|v projection's split-K
    partials go to the decode-attention kernel unsummed ([S, B, W]), which adds them where it
    loads q, k, v; the decode logits are those of the same plan summed by XLA first."""
    from jint8.ops import attention as attention_ops

    config, model, params, ids = _tiny_int8_llama(jnp.bfloat16)
    qkv_width = (4 + 2 * 2) * 16
    packed_shapes = []
    attention_step = attention_ops.decode_attention_step

    def interpret_attention(*args, **kwargs):
        packed_shapes.append(kwargs["packed"].shape)
        return attention_step(*args, **kwargs, interpret=True)

    monkeypatch.setattr(attention_ops, "unsupported_reason", lambda q, k: None)
    monkeypatch.setattr(attention_ops, "decode_attention_step", interpret_attention)
    interpret = functools.partial(int8_matmul_pallas, interpret=True)
    backend = api.Backend("interpret", interpret, lambda x, w: None,
                          partials_impl=functools.partial(interpret, split_partials=True))
    monkeypatch.setattr(api, "_BACKENDS", [backend, *api._BACKENDS])
    monkeypatch.setenv("JINT8_BACKEND", "interpret")
    plan_for = pallas_triton.plan_for

    def decode_logits(split_partials):
        qkv_plan = fused_plan(1, split_k=2, split_partials=split_partials)
        monkeypatch.setattr(pallas_triton, "plan_for", lambda kind, m, k, n, layout: (
            qkv_plan if (m, k, n) == (1, 64, qkv_width) else plan_for(kind, m, k, n, layout)))
        _, cache = model.apply({"params": params}, ids[:, :5],
                               cache=init_cache(config, 1, 16, jnp.bfloat16), cache_index=0)
        logits, _ = model.apply({"params": params}, ids[:, 5:], cache=cache, cache_index=5)
        return np.asarray(logits[:, -1], np.float64)

    summed = decode_logits(False)
    assert packed_shapes == [(1, 1, qkv_width)] * 2  # one per layer: the summed array
    packed_shapes.clear()
    got = decode_logits(True)
    assert packed_shapes == [(2, 1, qkv_width)] * 2  # the two partials
    np.testing.assert_array_equal(got, summed)
