"""The numbers everything in jint8 shares: bitsandbytes' constants and quantization multiplier,
the roundings kernels and references agree on, RMSNorm and the gated activations.

The bottom layer: it imports nothing from jint8, so ops, quantize, layers and models all take
these definitions from here and compute the same bits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes' literal constants, kept bit-for-bit: 1/127^2 and 1/127 as float32.
INV_127_SQ = 6.200124e-05
INV_127 = 7.874015718698502e-3

# get_4bit_type("nf4"): quantiles of N(0, 1), create_normal_map(0.9677083), hardcoded there too.
NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    np.float32,
)  # fmt: skip
# get_4bit_type("fp4"): sign, 2 exponent bits (bias 2), 1 mantissa bit, in bit-pattern order,
# divided by its absmax 12 in float32 as bitsandbytes does. Code 8 ("-0" there, an integer
# literal) is +0.0, as in bitsandbytes' stored quant_map and its AVX512 table.
FP4_CODE = np.array(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32
) / np.float32(12)
CODE_BOOKS = {"nf4": NF4_CODE, "fp4": FP4_CODE}  # by bitsandbytes' quant_type


def mul_then_add(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """a * b + c with the product rounded to float32 before the add (two roundings, no FMA).

    XLA's CPU backend (and LLVM's, under a Triton kernel) contracts a * b + c into one FMA (one
    rounding); bitsandbytes rounds the product in its kernel and adds in torch. The select keeps
    the product its own instruction and changes no value (b NaN makes a * b NaN already).
    """
    product = jnp.where(jnp.isnan(b), b, a * b)
    return product + c


def quantization_multiplier(scales: jax.Array) -> jax.Array:
    """127 / s as bitsandbytes computes it, bit for bit; 0 where s == 0 (no NaN).

    bitsandbytes writes `A * (127.0 / row_stats)`, and torch evaluates `127.0 / t` as
    `t.reciprocal() * 127`: two float32 roundings. At exact ties (x / s == k + 0.5, common for
    16-bit inputs) the last bit decides the int8 value, so we round the same way.
    """
    safe = jnp.where(scales > 0, scales, 1.0)
    return jnp.where(scales > 0, (1.0 / safe) * 127.0, 0.0)


def round_to(value: jax.Array, dtype, *, explicit: bool) -> jax.Array:
    """value (float32) rounded to dtype (round to nearest even; float32 as it is).

    explicit: round with reduce_precision before the cast. XLA (interpret mode runs a kernel body
    through XLA:CPU; a jitted reference runs through XLA:GPU) may drop a float32 -> 16-bit ->
    float32 round trip under its excess-precision rule, but never a reduce_precision; Triton keeps
    every cast and has no such op, so kernels pass explicit=interpret. reduce_precision flushes
    what would be subnormal in dtype to zero, so those values (float16 below 2^-14) are rounded to
    a multiple of dtype's smallest subnormal instead, by adding and subtracting 1.5 * 2^23 of it.
    """
    finfo = jnp.finfo(dtype)
    if explicit and finfo.bits < 32:  # a float32 "rounding" is the identity: nothing to keep
        rounded = jax.lax.reduce_precision(value, finfo.nexp, finfo.nmant)
        magic = 1.5 * 2.0**23 * float(finfo.smallest_subnormal)
        if magic < 1.0:  # dtype's subnormals are normal float32 numbers (float16; not bfloat16)
            subnormal = (value + magic) - magic
            rounded = jnp.where(jnp.abs(value) < float(finfo.smallest_normal), subnormal, rounded)
        value = rounded
    return value.astype(dtype)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float, unit_offset: bool, dtype) -> jax.Array:
    """x / rms(x) * scale in float32 like transformers; the one definition jint8's models use.

    Llama casts the normalised activations to dtype first, then multiplies by scale in dtype;
    Gemma (unit_offset) multiplies by (1 + scale) in float32, then casts.
    """
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return (xf * (1.0 + scale.astype(jnp.float32))).astype(dtype)
    return scale.astype(dtype) * xf.astype(dtype)


# transformers' hidden_act names of the gated activations an InputGate applies. silu's float32
# ops (exp, an add, a division, a product) leave a compiler no multiply-add to contract into an
# FMA: XLA gives the same bits under jit and op by op, and a kernel can give them too (a GPU's
# exp or division may still differ between XLA and Triton in the last bit; gpu_check --gate
# counts it). The tanh GELU is left out: XLA:CPU alone gives other bits for
# x + 0.044715 * x**3 under jit (a contracted FMA) than op by op, so no kernel can match it.
GATE_ACTIVATIONS = {"silu": jax.nn.silu, "swish": jax.nn.silu}

# XLA:GPU's jitted act(gate) * up dropped the float32 -> dtype -> float32 round trip of act in
# about a quarter of the elements (tools/gpu_check.py --gate) under its excess-precision
# rule; reduce_precision is a rounding it keeps.
_explicit_round = functools.partial(round_to, explicit=True)


def gated_activation(gate: jax.Array, up: jax.Array, activation: str, dtype,
                     rounding=_explicit_round) -> jax.Array:
    """act(gate) * up with transformers' roundings in a 16-bit dtype: act in float32, rounded to
    dtype (torch's opmath), then the product of the two dtype values rounded (exact in float32
    before that one rounding). This rounds as torch's silu(gate) * up does (the same bits
    wherever their float32 silu round alike); jnp's own bfloat16 silu(gate) * up rounds its
    sigmoid and each product as well. rounding(value, dtype): how float32 is rounded to dtype
    (default round_to(explicit=True), which XLA cannot drop; a kernel passes its own).
    """
    act = GATE_ACTIVATIONS[activation](gate.astype(jnp.float32))
    act = rounding(act, dtype).astype(jnp.float32)
    return rounding(act * up.astype(jnp.float32), dtype)


__all__ = [
    "CODE_BOOKS",
    "FP4_CODE",
    "NF4_CODE",
    "GATE_ACTIVATIONS",
    "INV_127",
    "INV_127_SQ",
    "gated_activation",
    "mul_then_add",
    "quantization_multiplier",
    "rms_norm",
    "round_to",
]
