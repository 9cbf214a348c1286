"""The sharded int8 op on the GPUs of this machine (any count, one included): Llama-3-8B's layers
column- and row-parallel over a "model" axis of every device, through int8_matmul(layout=) (the
shard_map path, ops/int8_matmul/sharded.py), against the unsharded call on one device; then the
time of each. With one GPU the mesh axis has size 1: the shard_map, the Pallas kernels inside it
and the row-parallel recipe still compile and run, so a multi-GPU run meets no new lowering.

    python3 tools/gpu_check_sharded.py [--rows 1 16 512] [--repeats 20]

Prints one line per (layer, rows, split); exits 1 if a result differs from the unsharded call
beyond its rule (column-parallel: bitwise; row-parallel: the float32 outlier stream regrouped).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

LAYERS = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
SPLITS = {"qkv": "column", "o": "row", "gate_up": "column", "down": "row"}


def main(argv=None) -> int:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import jint8
    from jint8.ops.int8_matmul import available_backends, layout_for, select_backend

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16, 512])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    devices = jax.devices()
    mesh = jint8.make_mesh(model=len(devices))
    probe = jnp.zeros((1, 64), jnp.bfloat16), jnp.zeros((64, 64), jnp.int8)
    print(f"{len(devices)} x {devices[0].device_kind}, jax {jax.__version__}, backends {available_backends()}, "
          f"chosen {select_backend(*probe).name}")
    rng = np.random.default_rng(0)
    failures = 0

    def timed(fn, *a):
        jax.block_until_ready(fn(*a))
        start = time.perf_counter()
        for _ in range(args.repeats):
            out = fn(*a)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / args.repeats * 1e3

    for name, (k, n) in LAYERS.items():
        kernel = jnp.asarray(rng.standard_normal((k, n), np.float32) * 0.02)
        q = jint8.quantize_params({"w": {"kernel": kernel}}, jint8.Int8Config(min_size=0))["w"]["kernel"]
        wq, s = q.as_matrix()
        split = SPLITS[name]
        w_spec = P("model", None) if split == "column" else P(None, "model")
        x_spec = P() if split == "column" else P(None, "model")
        wq_m = jax.device_put(wq, NamedSharding(mesh, w_spec))
        s_m = jax.device_put(s, NamedSharding(mesh, P("model") if split == "column" else P()))
        layout = layout_for(mesh, x_spec, w_spec)
        plain = jax.jit(lambda x, w, c: jint8.int8_matmul(x, w, c, weight_layout="nk"))
        sharded = jax.jit(lambda x, w, c: jint8.int8_matmul(x, w, c, weight_layout="nk", layout=layout))
        for rows in args.rows:
            x = rng.standard_normal((rows, k)).astype(np.float32)
            x[:, [7, k // 2 + 3]] = 20.0  # outlier columns on two K shards when K is split in two
            x = jnp.asarray(x, jnp.bfloat16)
            expected = np.asarray(plain(x, wq, s).astype(jnp.float32))
            x_m = jax.device_put(x, NamedSharding(mesh, x_spec))
            got = np.asarray(sharded(x_m, wq_m, s_m).astype(jnp.float32))
            diff = float(np.max(np.abs(got - expected)))
            # row-parallel: the float32 outlier stream regrouped by shard, then one bf16 rounding
            bound = 0.0 if split == "column" else 2**-7 * float(np.max(np.abs(expected)))
            ok = diff <= bound
            failures += not ok
            print(f"{name:8s} {k}x{n} {split:6s} rows={rows:4d}: max|diff|={diff:.3g} (bound {bound:.3g}) "
                  f"{'ok' if ok else 'FAIL'}; unsharded {timed(plain, x, wq, s):.3f} ms, "
                  f"sharded {timed(sharded, x_m, wq_m, s_m):.3f} ms", flush=True)
    print("FAILED" if failures else "OK")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
