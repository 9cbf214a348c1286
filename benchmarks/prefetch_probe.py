"""Does the decode-attention kernel's L2 prefetch of o_proj's weight speed up attention + o_proj?

    python3 benchmarks/prefetch_probe.py [--layers 16] [--batch 1]

Llama-3-8B's decode shapes (32 / 8 heads, head_dim 128, a 640-slot cache with 600 slots in use,
int8 o_proj 4096x4096 per layer, distinct per layer: together far more than the 50 MiB L2): per
layer the attention kernel (jint8.ops.attention, RoPE and the cache write folded) and then
int8_matmul on its output with o_proj's weight (the table's plan), the next layer's q|k|v built
from that output, LAYERS layers unrolled in one jitted while-loop body (a CUDA graph per
iteration, as a decode step). Times that loop with the kernel's prefetch of the next o_proj
weight and without (A/B/A/B, best of REPEATS each), prints us per layer, and checks that both
give the same bits. Exits 1 if they differ.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.attention.pallas_triton import Columns, decode_attention_pallas  # noqa: E402
from jint8.ops.int8_matmul import int8_matmul  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, SLOTS, USED, HIDDEN = 32, 8, 128, 640, 600, 4096
ITERATIONS, REPEATS = 10, 5


def build(layers: int, batch: int, prefetch: bool):
    columns = Columns(q=0, k=HEADS * HEAD_DIM, v=(HEADS + KV_HEADS) * HEAD_DIM)
    qkv_width = (HEADS + 2 * KV_HEADS) * HEAD_DIM

    def body(_, carry):
        x, k_cache, v_cache, weights, scales, valid, cos, sin = carry
        for layer in range(layers):
            qkv = jnp.concatenate([x, x[:, :qkv_width - HIDDEN]], axis=1)
            out, k_cache, v_cache = decode_attention_pallas(
                qkv, qkv, qkv, k_cache, v_cache, valid, jnp.int32(USED - 1), cos, sin,
                weights[layer] if prefetch else None, columns=columns, num_heads=HEADS,
                layer=layer, scale=HEAD_DIM ** -0.5)
            x = int8_matmul(out.reshape(batch, -1), weights[layer], scales[layer], weight_layout="nk")
        return x, k_cache, v_cache, weights, scales, valid, cos, sin

    @jax.jit
    def run(*carry):
        return jax.lax.fori_loop(0, ITERATIONS, body, carry)[:3]

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rng = np.random.default_rng(0)
    b = args.batch
    weights = [jnp.asarray(rng.integers(-127, 128, (HIDDEN, HIDDEN), dtype=np.int8)) for _ in range(args.layers)]
    scales = [jnp.asarray(rng.uniform(0.5, 2.0, HIDDEN), jnp.float32) for _ in range(args.layers)]
    cache_shape = (args.layers, b, SLOTS, KV_HEADS, HEAD_DIM)
    k_cache = jnp.asarray(rng.standard_normal(cache_shape), jnp.bfloat16)
    v_cache = jnp.asarray(rng.standard_normal(cache_shape), jnp.bfloat16)
    valid = jnp.asarray(np.arange(SLOTS)[None, :].repeat(b, 0) < USED)
    angles = rng.uniform(0, 50, (b, HEAD_DIM // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.asarray(np.cos(angles), jnp.bfloat16), jnp.asarray(np.sin(angles), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((b, HIDDEN)) * 0.02, jnp.bfloat16)
    carry = (x, k_cache, v_cache, weights, scales, valid, cos, sin)

    runs, results, times = {}, {}, {"off": [], "on": []}
    for name, prefetch in (("off", False), ("on", True)):
        start = time.perf_counter()
        runs[name] = build(args.layers, b, prefetch)
        results[name] = jax.block_until_ready(runs[name](*carry))
        print(f"prefetch {name}: compiled and ran in {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(2):  # A/B/A/B
        for name in ("off", "on"):
            for _ in range(REPEATS):
                start = time.perf_counter()
                jax.block_until_ready(runs[name](*carry))
                times[name].append(time.perf_counter() - start)
    per_layer = {name: min(t) / (ITERATIONS * args.layers) * 1e6 for name, t in times.items()}
    print(f"batch {b}, {args.layers} layers: attention + int8 o_proj per layer: "
          f"without prefetch {per_layer['off']:.2f} us, with {per_layer['on']:.2f} us "
          f"({per_layer['off'] - per_layer['on']:+.2f} us saved)", flush=True)
    same = all(np.array_equal(np.asarray(a), np.asarray(c)) for a, c in zip(results["off"], results["on"]))
    print(f"same bits with and without: {same}", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
