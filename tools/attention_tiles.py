"""Times the decode-attention kernel's launch parameters at Llama-3-8B's decode shape.

    python3 tools/attention_tiles.py [--batch 1 8] [--smoke]

For each (block_s, num_warps, num_stages, target_programs) the decode step's attention (RoPE,
cache write, flash-decoding kernel, XLA's combine) of 32 layers (32/8 heads, head_dim 128, a
640-slot cache with 600 in use, q|k|v read from the fused projection's array) runs in a jitted
loop, as gpu_check_attention.py times it; its output is checked against the default parameters'
(a different split count only reorders the combine's float32 sums). Prints us per layer, fastest
first, then one line per batch `best B=<b> <block_s>,<num_warps>,<num_stages>,<target_programs>
<us> default <us>` for a shell script to read.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.attention import pallas_triton  # noqa: E402
from jint8.ops.attention.pallas_triton import Columns, decode_attention_pallas  # noqa: E402

LAYERS, HEADS, KV_HEADS, HEAD_DIM, SLOTS, USED = 32, 32, 8, 128, 640, 600
DEFAULT = (pallas_triton.BLOCK_S, 4, 2, pallas_triton._TARGET_PROGRAMS)
GRID = list(itertools.product((32, 64, 128), (2, 4), (2,), (128, 256)))


def time_per_layer(b, params, qkv, caches, valid, cos, sin, *, layers=LAYERS, interpret=False):
    block_s, num_warps, num_stages, target = params
    n, kv, h = HEADS, KV_HEADS, HEAD_DIM
    columns = Columns(q=0, k=n * h, v=(n + kv) * h)

    def step(qkv, caches, layer):
        out, *caches = decode_attention_pallas(
            qkv, qkv, qkv, *caches, valid, jnp.int32(USED - 1), cos, sin, columns=columns,
            num_heads=n, layer=layer, scale=h ** -0.5, block_s=block_s, num_warps=num_warps,
            num_stages=num_stages, target_programs=target, interpret=interpret)
        return out, tuple(caches)

    @jax.jit
    def loop(qkv, caches):
        def body(_, carry):
            qkv, caches, _ = carry
            for layer in range(layers):
                out, caches = step(qkv, caches, layer)
                qkv = qkv + (out[:, :1, :1] * 0).reshape(b, 1).astype(qkv.dtype)
            return qkv, caches, out
        return jax.lax.fori_loop(0, 10, body, (qkv, caches, jnp.zeros((b, n, h), qkv.dtype)))

    out = jax.block_until_ready(loop(qkv, caches))[2]
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(loop(qkv, caches))
        times.append((time.perf_counter() - start) / (10 * layers))
    return float(np.median(times)), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", nargs="+", type=int, default=[1])
    parser.add_argument("--smoke", action="store_true",
                        help="CPU: interpret mode, 2 layers, the first 2 parameter sets")
    args = parser.parse_args()
    layers = 2 if args.smoke else LAYERS
    grid = GRID[:2] if args.smoke else GRID
    timed = dict(layers=layers, interpret=args.smoke)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    for b in args.batch:
        n, kv, h = HEADS, KV_HEADS, HEAD_DIM
        qkv = jnp.asarray(rng.standard_normal((b, (n + 2 * kv) * h)), jnp.bfloat16)
        caches = tuple(jnp.asarray(rng.standard_normal((layers, b, SLOTS, kv, h)), jnp.bfloat16)
                       for _ in range(2))
        valid = jnp.broadcast_to(jnp.arange(SLOTS) < USED, (b, SLOTS))
        angles = (USED - 1.0) / (500000.0 ** (np.arange(0, h, 2) / h))
        angles = np.concatenate([angles, angles])
        cos, sin = (jnp.asarray(np.broadcast_to(f(angles), (b, h)), jnp.bfloat16) for f in (np.cos, np.sin))
        results = {}
        default_time, want = time_per_layer(b, DEFAULT, qkv, caches, valid, cos, sin, **timed)
        want = np.asarray(want, np.float32)
        for params in grid:
            try:
                seconds, out = time_per_layer(b, params, qkv, caches, valid, cos, sin, **timed)
            except Exception as error:  # noqa: BLE001 (a launch Triton rejects: shared memory)
                print(f"B={b} {params}: {type(error).__name__}: {str(error)[:120]}", flush=True)
                continue
            err = float(np.max(np.abs(np.asarray(out, np.float32) - want)) / np.max(np.abs(want)))
            ok = err <= 2e-2
            print(f"B={b} block_s={params[0]} warps={params[1]} stages={params[2]} "
                  f"target={params[3]}: {seconds * 1e6:.2f} us per layer, err {err:.1e}"
                  f"{'' if ok else ' FAIL'}", flush=True)
            if ok:
                results[params] = seconds
        best = min(results, key=results.get)
        print(f"best B={b} {','.join(map(str, best))} {results[best] * 1e6:.2f} "
              f"default {default_time * 1e6:.2f}", flush=True)


if __name__ == "__main__":
    main()
