"""GPU check and timing of the paged decode-attention kernel (jint8/ops/attention/paged_pallas.py).

    python3 tools/gpu_check_paged_attention.py

For the serving engine's decode shapes (Llama-3-8B: 32/8 heads, head_dim 128, 16-slot blocks;
batch 1 to 64, context 512 to 4096; SmolLM2's 9/3 heads; a sliding window): the kernel against
paged_attention_reference (max error relative to max |out|, must stay under 2e-2 as in the CPU
test), then the time per layer of the kernel and of the reference's gather + attention it
replaces, each in a jitted loop over 32 layers. Exits 1 if any check fails.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.attention import paged_attention_reference  # noqa: E402
from jint8.ops.attention.paged_pallas import paged_decode_attention_pallas  # noqa: E402

CASES = [  # batch, heads, kv heads, head_dim, block size, context (positions per sequence), window
    (1, 32, 8, 128, 16, 640, None), (8, 32, 8, 128, 16, 640, None), (32, 32, 8, 128, 16, 640, None),
    (64, 32, 8, 128, 16, 640, None), (8, 32, 8, 128, 16, 4096, None), (16, 9, 3, 64, 16, 2048, None),
    (8, 32, 8, 128, 16, 4096, 1024),
]
LAYERS = 32


def _inputs(rng, b, n, kv, h, z, context, layers):
    blocks_per_seq = -(-context // z)
    pool_blocks = 1 + b * blocks_per_seq
    k = jnp.asarray(rng.standard_normal((layers, pool_blocks, z, kv, h)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((layers, pool_blocks, z, kv, h)), jnp.bfloat16)
    tables = jnp.asarray(rng.permutation(np.arange(1, pool_blocks)).reshape(b, blocks_per_seq), jnp.int32)
    # ragged lengths: each sequence somewhere in the last quarter of the context, one at its end
    positions = rng.integers(3 * context // 4, context, b).astype(np.int32)
    positions[0] = context - 1
    q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.bfloat16)
    return q, k, v, tables, jnp.asarray(positions)


def _time_per_layer(fn, q, k, v, tables, positions) -> float:
    @jax.jit
    def loop(q, k, v):
        def body(_, q):
            for layer in range(LAYERS):
                q = q + (fn(q, k, v, tables, positions, layer) * 0).astype(q.dtype)
            return q
        return jax.lax.fori_loop(0, 10, body, q)

    jax.block_until_ready(loop(q, k, v))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(loop(q, k, v))
        times.append((time.perf_counter() - start) / (10 * LAYERS))
    return float(np.median(times))


def main():
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    failures = 0
    for b, n, kv, h, z, context, window in CASES:
        q, k, v, tables, positions = _inputs(rng, b, n, kv, h, z, context, layers=2)
        scale = h ** -0.5
        got = paged_decode_attention_pallas(q, k, v, tables, positions, layer=1, scale=scale,
                                            sliding_window=window)
        want = paged_attention_reference(q[:, None], k, v, tables, positions[:, None], layer=1, scale=scale,
                                         sliding_window=window)[:, 0]
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                    / jnp.max(jnp.abs(want.astype(jnp.float32))))
        ok = err < 2e-2
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} B={b} N={n}/{kv} H={h} Z={z} context={context} window={window}: "
              f"max err {err:.2e} of max |out|", flush=True)
        q, k, v, tables, positions = _inputs(rng, b, n, kv, h, z, context, layers=LAYERS)
        del k  # one pool read twice keeps the 32-layer pools within memory at B=64
        kernel = _time_per_layer(lambda q, k, v, t, p, layer: paged_decode_attention_pallas(
            q, k, v, t, p, layer=layer, scale=scale, sliding_window=window), q, v, v, tables, positions)
        reference = _time_per_layer(lambda q, k, v, t, p, layer: paged_attention_reference(
            q[:, None], k, v, t, p[:, None], layer=layer, scale=scale, sliding_window=window)[:, 0],
            q, v, v, tables, positions)
        kv_bytes = 2 * int(jnp.sum(positions + 1)) * kv * h * 2  # the K and V slots read
        print(f"     per layer: kernel {kernel * 1e6:.1f} us ({kv_bytes / kernel / 1e9:.0f} GB/s of K+V), "
              f"reference {reference * 1e6:.1f} us", flush=True)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
