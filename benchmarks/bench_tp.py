"""Tensor-parallel int8 on however many GPUs this machine has: a Llama-3-8B- or 70B-shaped model
with random int8 weights placed column/row/vocab-parallel over a ("data" 1, "model" D) mesh, for
D = 1, 2, 4, 8 (those that fit), and generate()'s prefill and decode against D = 1; then the
collectives one row-parallel layer issues (the row-scale pmax, the int32 and float32 psums of
ops/int8_matmul/sharded.py) timed alone, against NVLink's bandwidth.

    python3 benchmarks/bench_tp.py --shape 8b  --batch 1 32            # 1, 2, 4, 8 GPUs if present
    python3 benchmarks/bench_tp.py --shape 70b --devices 2 4 8 --batch 1 32
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu python3 \
        benchmarks/bench_tp.py --shape tiny --devices 1 2 8 --batch 1 2 --prompt 32 --new-tokens 4  # CPU smoke

The random weights are bench_generate.py's (realistic outlier activations), drawn leaf by leaf on
the first device and moved to the mesh with from_pretrained's rules (loading.kernel_spec), so a
70B build holds one whole leaf at most beyond the device's own shards. generate() runs under
jax.set_mesh of the mesh: each int8 projection runs the kernel on its own shard
(layers.tensor_parallel_layout). One JSON line per (devices, batch); a markdown table at the end.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {  # layers, hidden, intermediate, heads, kv heads, vocab
    "8b": (32, 4096, 14336, 32, 8, 128256),
    "70b": (80, 8192, 28672, 64, 8, 128256),
    "tiny": (2, 256, 512, 8, 8, 1024),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layers", type=int, default=None, help="override the shape's layer count")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="mesh sizes to run (those above the device count are skipped)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=6.0)
    parser.add_argument("--collective-repeats", type=int, default=50)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    layers, hidden, intermediate, heads, kv_heads, vocab = SHAPES[args.shape]
    # bench_generate.build_model's arguments
    extra = dict(layers=args.layers or layers, hidden=hidden, intermediate=intermediate, heads=heads,
                 kv_heads=kv_heads, vocab=vocab, outlier_capacity=64, outlier_features=8, outlier_gain=20.0,
                 activations="realistic", down_outlier_fraction=0.15, quantize_lm_head=True,
                 quantize_embeddings=False)
    for key, value in extra.items():
        setattr(args, key, value)
    return args


def place_on_mesh(params, mesh):
    """Every leaf on mesh with from_pretrained's rules (loading.kernel_spec, quantize.int8_weight_specs)."""
    import jax
    from flax.traverse_util import flatten_dict, unflatten_dict

    import jint8
    from jint8.loading import kernel_spec
    from jint8.quantize import EMBEDDING_NAME, int8_weight_specs

    placed = {}
    flat = flatten_dict(params, is_leaf=lambda _, x: isinstance(x, jint8.Int8Weight))
    for path in list(flat):
        leaf = flat.pop(path)
        if isinstance(leaf, jint8.Int8Weight):
            embedding = path[-1] == EMBEDDING_NAME
            spec = kernel_spec(path, leaf.qvalue.shape if embedding else leaf.shape, mesh)
            q_spec, s_spec = int8_weight_specs(spec, leaf.qvalue.ndim, leaf.in_ndim, embedding=embedding)
            placed[path] = leaf.replace(qvalue=jax.device_put(leaf.qvalue, jax.NamedSharding(mesh, q_spec)),
                                        scale=jax.device_put(leaf.scale, jax.NamedSharding(mesh, s_spec)))
        else:
            placed[path] = jax.device_put(leaf, jax.NamedSharding(mesh, kernel_spec(path, leaf.shape, mesh)))
        jax.block_until_ready(placed[path])
        del leaf  # the first device's whole copy goes now
    return unflatten_dict(placed)


def build_on_mesh(args, mesh):
    """bench_generate's random int8 Llama, one leaf at a time, placed on mesh."""
    import jax

    from bench_generate import build_model

    with jax.default_device(mesh.devices.flat[0]):
        model, params = build_model(args, "int8")
    return model, place_on_mesh(params, mesh)


def time_collectives(mesh, rows: int, features: int, repeats: int) -> dict:
    """One row-parallel layer's collectives alone: pmax of [rows] float32 row scales, psum of the
    [rows, features] int32 accumulator and of the float32 outlier stream; microseconds each and
    the bus bandwidth of the psums (nccl-tests' busbw: bytes * 2 (D - 1) / D / time)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    d = int(mesh.shape["model"])
    if d == 1:
        return {}

    def timed(fn, *operands):
        run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
        jax.block_until_ready(run(*operands))
        start = time.perf_counter()
        for _ in range(repeats):
            out = run(*operands)
        jax.block_until_ready(out)
        return (time.perf_counter() - start) / repeats * 1e6

    scales = jnp.ones((rows,), jnp.float32)
    acc = jnp.ones((rows, features), jnp.int32)
    stream = jnp.ones((rows, features), jnp.float32)
    pmax_us = timed(lambda s: jax.lax.pmax(s, "model"), scales)
    psum_int_us = timed(lambda a: jax.lax.psum(a, "model"), acc)
    both_us = timed(lambda a, f: (jax.lax.psum(a, "model"), jax.lax.psum(f, "model")), acc, stream)
    nbytes = rows * features * 4
    return dict(rows=rows, features=features, pmax_us=pmax_us, psum_int32_us=psum_int_us, psum_both_us=both_us,
                busbw_gb_s=nbytes * 2 * (d - 1) / d / (psum_int_us * 1e-6) / 1e9)


def run(args, devices: int) -> list[dict]:
    import jax

    import jint8
    from bench_generate import time_generate

    mesh = jint8.make_mesh(model=devices, devices=jax.devices()[:devices])
    start = time.perf_counter()
    model, params = build_on_mesh(args, mesh)
    print(f"[{devices} devices] weights on the mesh: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    per_device = jint8.param_bytes(params) / devices  # evenly split leaves; replicated ones counted once
    out = []
    for batch in args.batch:
        prompt = np.random.default_rng(batch).integers(0, args.vocab, size=(batch, args.prompt), dtype=np.int32)
        with jax.set_mesh(mesh):
            times = time_generate(model, params, prompt, args.new_tokens, args.repeats)
        device = jax.devices()[0]
        row = dict(shape=args.shape, layers=args.layers, devices=devices, batch=batch, prompt=args.prompt,
                   new_tokens=args.new_tokens, device=device.device_kind, platform=device.platform,
                   jax=jax.__version__, date=datetime.date.today().isoformat(),
                   weight_gib_total=jint8.param_bytes(params) / 2**30, weight_gib_per_device_even=per_device / 2**30,
                   compile_s=times.compile_s, prefill_ms=times.prefill_s * 1e3,
                   decode_tokens_per_s=times.decode_tokens_per_s(batch, args.new_tokens),
                   first_tokens=times.sequences[0, args.prompt:args.prompt + 4].tolist())
        # the collectives of one row-parallel layer at decode (rows = batch) and prefill (batch x prompt)
        row["collectives_decode"] = time_collectives(mesh, batch, args.hidden, args.collective_repeats)
        row["collectives_prefill"] = time_collectives(mesh, batch * args.prompt, args.hidden,
                                                      max(3, args.collective_repeats // 10))
        print(json.dumps(row), flush=True)
        out.append(row)
    del params
    gc.collect()
    return out


def markdown(rows: list[dict]) -> str:
    base = {(r["batch"]): r for r in rows if r["devices"] == 1}
    lines = ["| devices | batch | prefill(%d) ms | x vs 1 | decode tok/s | x vs 1 | AR int32 decode us | AR prefill us, busbw GB/s |"
             % (rows[0]["prompt"] if rows else 0), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        one = base.get(r["batch"])
        speed_p = f"{one['prefill_ms'] / r['prefill_ms']:.2f}" if one else "-"
        speed_d = f"{r['decode_tokens_per_s'] / one['decode_tokens_per_s']:.2f}" if one else "-"
        cd, cp = r["collectives_decode"], r["collectives_prefill"]
        lines.append(f"| {r['devices']} | {r['batch']} | {r['prefill_ms']:.1f} | {speed_p} | "
                     f"{r['decode_tokens_per_s']:.1f} | {speed_d} | "
                     f"{cd.get('psum_int32_us', float('nan')):.1f} | "
                     f"{cp.get('psum_both_us', float('nan')):.0f}, {cp.get('busbw_gb_s', float('nan')):.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import jax

    args = parse_args(argv)
    available = jax.device_count()
    sizes = [d for d in args.devices if d <= available]
    skipped = [d for d in args.devices if d > available]
    if skipped:
        print(f"skipping {skipped} devices: {available} available", file=sys.stderr)
    rows = [row for d in sizes for row in run(args, d)]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))
    # the same random model on every mesh: greedy tokens must agree (up to float regrouping)
    first = {r["batch"]: r["first_tokens"] for r in rows if r["devices"] == min(sizes)}
    for r in rows:
        if r["first_tokens"] != first[r["batch"]]:
            print(f"note: {r['devices']} devices, batch {r['batch']}: first tokens {r['first_tokens']} "
                  f"!= {first[r['batch']]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
