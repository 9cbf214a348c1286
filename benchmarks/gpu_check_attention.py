"""GPU check and timing of the decode-attention kernel (jint8/ops/attention).

    python3 benchmarks/gpu_check_attention.py

For Llama-3-8B's decode shapes (32/8 heads, head_dim 128, a 640-slot cache, batch 1 and 8) and a
few odd ones: the kernel's output against the jnp reference (max error relative to max |out|),
then the time per call of the kernel and of the XLA attention it replaces (the models' path:
jax.nn.dot_product_attention over the layer's cache), each in a jitted loop of 32 layers.
Exits 1 if any case is off by more than 2e-2.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.attention import decode_attention_reference, unsupported_reason  # noqa: E402
from jint8.ops.attention.pallas_triton import decode_attention_pallas  # noqa: E402

CASES = [  # batch, heads, kv heads, head_dim, slots, slots in use, left padding of sequence 0
    (1, 32, 8, 128, 640, 600, 0), (8, 32, 8, 128, 640, 513, 7), (1, 9, 3, 64, 2048, 77, 3),
    (4, 16, 16, 64, 300, 300, 0), (2, 12, 2, 128, 4096, 1000, 100),
]
LAYERS = 32


def main():
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    failures = 0
    for b, n, kv, h, s, used, pad in CASES:
        q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((2, b, s, kv, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((2, b, s, kv, h)), jnp.bfloat16)
        valid = np.broadcast_to(np.arange(s) < used, (b, s)).copy()
        valid[0, :pad] = False
        valid = jnp.asarray(valid)
        reason = unsupported_reason(q, k)
        got = decode_attention_pallas(q, k, v, valid, jnp.int32(used), layer=1, scale=h ** -0.5)
        want = decode_attention_reference(q, k, v, valid, layer=1, scale=h ** -0.5)
        err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)))
                    / jnp.max(jnp.abs(want.astype(jnp.float32))))
        failures += not err <= 2e-2
        print(f"B={b} N={n} K={kv} H={h} S={s} used={used}: err {err:.2e} "
              f"{'ok' if err <= 2e-2 else 'FAIL'} (dispatch: {reason or 'kernel'})", flush=True)
    for b in (1, 8):
        n, kv, h, s, used = 32, 8, 128, 640, 600
        q = jnp.asarray(rng.standard_normal((b, n, h)), jnp.bfloat16)
        k = jnp.asarray(rng.standard_normal((LAYERS, b, s, kv, h)), jnp.bfloat16)
        v = jnp.asarray(rng.standard_normal((LAYERS, b, s, kv, h)), jnp.bfloat16)
        valid = jnp.broadcast_to(jnp.arange(s) < used, (b, s))

        def xla(q, layer):
            mask = valid[:, None, None, :]
            return jax.nn.dot_product_attention(q[:, None], k[layer], v[layer], mask=mask,
                                                scale=h ** -0.5)[:, 0]

        def kernel(q, layer):
            return decode_attention_pallas(q, k, v, valid, jnp.int32(used), layer=layer,
                                           scale=h ** -0.5)

        for name, fn in (("xla", xla), ("kernel", kernel)):
            @jax.jit
            def loop(q, fn=fn):
                def body(_, q):
                    for layer in range(LAYERS):
                        q = fn(q, layer)
                    return q
                return jax.lax.fori_loop(0, 10, body, q)

            jax.block_until_ready(loop(q))
            times = []
            for _ in range(5):
                start = time.perf_counter()
                jax.block_until_ready(loop(q))
                times.append((time.perf_counter() - start) / (10 * LAYERS))
            print(f"decode attention B={b} S={s} used={used}: {name} {np.median(times) * 1e6:.1f} us "
                  f"per layer", flush=True)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
