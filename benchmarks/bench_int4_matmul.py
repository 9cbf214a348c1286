"""Times jint8's 4-bit int4_matmul (NF4, double quantization, blocksize 64) against XLA bf16 and
jint8's int8 on the Llama-3-8B projection shapes: `python3 benchmarks/bench_int4_matmul.py`.

Columns: "nf4" the public op (on a GPU the pallas_triton backend with the GPU's table or the
default config, named in the last column), "nf4 xla" the same op on the XLA reference backend,
"bf16" XLA's x @ W on the same shape, "int8" jint8's int8_matmul (K-major weights, threshold 6,
8 outlier columns, as benchmarks/bench_int8_matmul.py times it), and at M = 1 the achieved
bandwidth of the 4-bit weight (packed codes + absmax + nested absmax bytes / time). Timing is
bench_int8_matmul's: calls rotate over activation sets and over enough weight copies that twice
the L2 streams, dispatched back to back; the median of 7 batches of ~30 ms. "in one jit": all
rotated calls inside one jitted executable (time_in_one_jit), as a decode step launches them:
always taken for M <= 16 (a decode projection takes microseconds, under the host's per-call
dispatch floor), and there the ratios and the bandwidth are of those times.
Random weights (uniform codes and absmax codes): the kernels' speed does not depend on values.

  --sweep: time candidate Configs per shape and M (--shapes, --ms; default M = 1, 16, 512; in
    one jit for M <= 16) and print the best of each as a table entry; the last line is a whole
    table (JSON) for jint8/ops/int4_matmul/data/<gpu>.json (--write-table PATH writes it, keeping
    the entries of an existing PATH that this run does not re-measure).
  --check: correctness of the kernels compiled on this GPU (tests/ops/test_int4_matmul_pallas.py's
    checks): the dequantized weight bit-identical to the reference's (XLA on the same GPU),
    outputs written into NaN-poisoned buffers within checks.output_error_bound of the float64
    recipe, over both quant types, double quantization on/off, blocksizes 64/128/256, M = 1, 5,
    16, 64, 300, odd N; every config the table picks plus the other dots, lookups and routes.
    Exits 1 on any failure.
Each failing config is reported and skipped; the run goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import pathlib
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_int8_matmul as int8_bench  # noqa: E402
import op_table  # noqa: E402
from jint8 import quant4  # noqa: E402
from jint8.ops.int4_matmul import checks, configs, int4_matmul, reference, select_backend  # noqa: E402
from jint8.ops.int4_matmul.configs import Config  # noqa: E402
from jint8.ops.int4_matmul.pallas_triton import dequantize_pallas, int4_matmul_pallas  # noqa: E402

LLAMA = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096), (8192, 28672)]  # K x N
MS = (1, 16, 256, 512, 4096)
SWEEP_MS = (1, 16, 512)
# Up to this M every op is also timed in one jit (and the sweep times only that way): a decode
# projection takes a few microseconds, under the host's per-call dispatch floor.
IN_JIT_MAX_M = 16
L2_BYTES = 50 * 2**20


def random_int4_weight(key, n, k, *, quant_type="nf4", blocksize=64, double_quant=True):
    """An Int4Weight of shape [N, K] with uniform random codes and absmax codes (speed only)."""
    blocks = -(-n * k // blocksize)
    packed_key, absmax_key = jax.random.split(key)
    packed = jax.random.randint(packed_key, ((n * k + 1) // 2, 1), 0, 256, jnp.int32).astype(jnp.uint8)
    if not double_quant:
        absmax = jax.random.uniform(absmax_key, (blocks,), jnp.float32, 0.01, 0.05)
        return quant4.Int4Weight(packed=packed, absmax=absmax, shape=(n, k), quant_type=quant_type,
                                 blocksize=blocksize, dtype=jnp.dtype(jnp.bfloat16))
    absmax = jax.random.randint(absmax_key, (blocks,), 0, 256, jnp.int32).astype(jnp.uint8)
    nested = jnp.full((-(-blocks // quant4.NESTED_BLOCKSIZE),), 0.02, jnp.float32)
    return quant4.Int4Weight(packed=packed, absmax=absmax, nested_absmax=nested,
                             nested_code=jnp.asarray(quant4.DYNAMIC_MAP), offset=jnp.float32(0.03), shape=(n, k),
                             quant_type=quant_type, blocksize=blocksize, dtype=jnp.dtype(jnp.bfloat16))


def int4_copies(k, n, **fields):
    copies = max(1, min(32, math.ceil(2 * L2_BYTES / (k * n / 2))))
    keys = jax.random.split(jax.random.key(k * 7 + n), copies)
    return [random_int4_weight(key, n, k, **fields) for key in keys]


def bf16_copies(k, n):
    copies = max(1, min(32, math.ceil(2 * L2_BYTES / (k * n * 2))))
    keys = jax.random.split(jax.random.key(n * 7 + k), copies)
    return [jax.random.normal(key, (k, n), jnp.bfloat16) * 0.02 for key in keys]


def _sets(m, k, n, copies):
    """Activation sets to rotate: one per weight copy at least (every copy streams), two where a
    set is large (they stream anyway, and drawing 16 of 4096 x 14336 takes the host longer than
    the timing)."""
    return 2 if m * k > 2**23 else max(copies, min(int8_bench.sets_for(m, k, n), 16))


def _safe(label, fn):
    """fn() or None, printing why it failed (one config that does not compile must not end the run)."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 (reported and skipped)
        print(f"  {label}: FAILED {type(error).__name__}: {str(error)[:400]}", flush=True)
        return None


def bench_table(shapes, ms, rng, in_jit: bool):
    rows = []
    kind = jax.devices()[0].device_kind
    for k, n in shapes:
        w4 = int4_copies(k, n)
        w16 = bf16_copies(k, n)
        wq, col_scales = int8_bench.weight_copies(rng, k, n)
        wq_nk = [w.T.copy() for w in wq]
        del wq
        int8_op, _, _ = int8_bench.ops_for(col_scales)
        weight_bytes = w4[0].nbytes
        for m in ms:
            xs = int8_bench.activations(rng, m, k, _sets(m, k, n, len(w4)))
            backend = select_backend(xs[0], w4[0]).name
            config = configs.config_for(kind, m, k, n, 64) if backend == "pallas_triton" else None
            t = {}
            t["nf4"] = _safe(f"K={k} N={n} M={m} nf4", lambda: int8_bench.time_op(
                lambda x, w: int4_matmul(x, w), xs, w4))
            t["nf4_xla"] = _safe(f"K={k} N={n} M={m} nf4 xla", lambda: int8_bench.time_op(
                lambda x, w: int4_matmul(x, w, backend="xla"), xs, w4))
            t["bf16"] = _safe(f"K={k} N={n} M={m} bf16", lambda: int8_bench.time_op(lambda x, w: x @ w, xs, w16))
            t["int8"] = _safe(f"K={k} N={n} M={m} int8", lambda: int8_bench.time_op(int8_op, xs, wq_nk))
            if in_jit or m <= IN_JIT_MAX_M:
                t["nf4_in_jit"] = _safe("nf4 in one jit", lambda: int8_bench.time_in_one_jit(
                    lambda x, w: int4_matmul(x, w), xs, w4))
                t["bf16_in_jit"] = _safe("bf16 in one jit", lambda: int8_bench.time_in_one_jit(
                    lambda x, w: x @ w, xs, w16))
                t["int8_in_jit"] = _safe("int8 in one jit", lambda: int8_bench.time_in_one_jit(int8_op, xs, wq_nk))
            seconds = t.get("nf4_in_jit") or t["nf4"]
            gbps = weight_bytes / seconds / 1e9 if m == 1 and seconds else None
            rows.append((k, n, m, t, gbps, backend, config))
            print(op_table.progress_line(k, n, m, t) + (f" {gbps:.0f}GB/s" if gbps else "") + f" | {backend} {config}",
                  flush=True)
        del w4, w16, wq_nk
    return rows


COLUMNS = [("nf4", "jint8 nf4"), ("nf4_xla", "nf4, xla backend"), ("bf16", "XLA bf16"), ("int8", "jint8 int8"),
           ("nf4_in_jit", "nf4, in one jit"), ("bf16_in_jit", "bf16, in one jit"), ("int8_in_jit", "int8, in one jit")]


def print_markdown(rows):
    def ratios(row):
        _, _, _, t, gbps, backend, config = row
        # ratios of the in-one-jit times where there are some (decode), else of the per-call ones
        nf4, bf16, int8 = (t.get(f"{key}_in_jit") or t.get(key) for key in ("nf4", "bf16", "int8"))
        ratio = lambda a, b: "-" if not (a and b) else f"{a / b:.2f}x"  # noqa: E731
        route = backend if config is None else f"{config.route} {config.dot} {config.lookup} bn{config.block_n} " \
                                               f"bk{config.block_k} s{config.split_k}"
        return [ratio(nf4, bf16), ratio(int8, nf4), f"{gbps:.0f}" if gbps else "-", route]

    op_table.print_markdown(rows, COLUMNS, ["nf4 / bf16", "int8 / nf4", "4-bit weight GB/s (M=1, in one jit)",
                                            "nf4 route"], ratios, digits=4, timed_columns_only=True)


def _split_for_programs(config: Config, k: int, n: int, programs: int) -> Config:
    """The config with K split (a power of two, at least one K step per program) until about
    `programs` programs run: decode streams the weight, and more programs keep more bytes in flight."""
    tiles, steps, split_k = -(-n // config.block_n), k // config.block_k, 1
    while tiles * split_k * 2 <= programs and split_k * 2 <= steps:
        split_k *= 2
    return dataclasses.replace(config, split_k=split_k)


def sweep_candidates(m: int, k: int, n: int) -> list[Config]:
    """Configs per M around the default: block_n / block_k / warps / dot / lookup, and at decode
    the number of programs the K split makes (256 to 2048 on an H100's 132 SMs)."""
    base = configs.default_config(m, k, n, 64)
    if m == 1:
        # the FMA path holds a [block_n, block_k / 2] float32 accumulator: these keep it at ~32
        # registers a thread (block_n * block_k / 2 / (32 * warps))
        raw = [dict(block_m=1, block_n=bn, block_k=bk, num_warps=w, num_stages=4, dot="fma", lookup="gather",
                    programs=p)
               for bn, bk, w, p in ((16, 512, 4, 1024), (16, 512, 4, 2048), (32, 512, 8, 512), (32, 512, 8, 1024),
                                    (64, 512, 16, 512), (16, 1024, 8, 1024), (32, 1024, 16, 512),
                                    (32, 1024, 16, 1024), (32, 256, 4, 1024), (32, 256, 4, 2048),
                                    (64, 256, 8, 1024), (16, 256, 2, 2048))]
        raw += [dict(block_m=1, block_n=32, block_k=512, num_warps=8, num_stages=4, dot="fma", lookup="select",
                     programs=1024)]
    elif m <= 16:
        raw = [dict(block_m=16, block_n=bn, block_k=bk, num_warps=w, num_stages=st, dot=dot, lookup=lk, programs=p)
               for bn, bk, w, st, dot, lk, p in ((32, 128, 4, 4, "mma", "gather", 256),
                                                 (32, 128, 4, 4, "mma", "gather", 1024),
                                                 (32, 256, 4, 4, "mma", "gather", 512),
                                                 (32, 256, 8, 4, "mma", "gather", 1024),
                                                 (32, 512, 8, 4, "mma", "gather", 1024),
                                                 (64, 256, 8, 4, "mma", "gather", 512),
                                                 (64, 512, 8, 4, "mma", "gather", 1024),
                                                 (16, 256, 4, 4, "mma", "gather", 1024),
                                                 (32, 256, 4, 4, "mma_swapped", "gather", 512),
                                                 (32, 256, 4, 4, "mma", "select", 512))]
    else:
        raw = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=w, num_stages=st, dot="mma", lookup=lk, split_k=1)
               for bm, bn, bk, w, st, lk in ((128, 128, 128, 8, 3, "gather"), (128, 256, 64, 8, 3, "gather"),
                                             (128, 128, 128, 8, 3, "select"), (64, 128, 128, 4, 3, "gather"))]
        # the dequantized weight as the MMA's A operand (wgmma takes A from registers, B from shared
        # memory); 256-row tiles dequantize each weight tile half as often
        raw += [dict(block_m=bm, block_n=128, block_k=bk, num_warps=8, num_stages=3, dot=dot, split_k=1)
                for bm, bk, dot in ((128, 128, "mma_swapped"), (256, 64, "mma"), (256, 64, "mma_swapped"))]
        raw += [dict(block_m=128, block_n=64, block_k=256, num_warps=4, num_stages=2, route="xla_dot", lookup="gather")]
    out = [base]
    for fields in raw:
        programs = fields.pop("programs", None)
        split = fields.pop("split_k", 1)
        config = configs.fit_to_shape(Config(**fields, split_k=1), m, k, n, 64)
        if programs is not None:
            config = _split_for_programs(config, k, n, programs)
        elif split > 1:
            config = dataclasses.replace(config, split_k=split)
        config = configs.fit_to_shape(config, m, k, n, 64)
        if config not in out:
            out.append(config)
    return out


def entry_range(m: int) -> tuple[int, int]:
    """The M a config measured at M serves: M = 1 alone, 2-16 (decode tiles), 17-64 (batched
    decode), else M / 2 + 1 .. 2M - 1 (prefill tiles)."""
    if m == 1:
        return 1, 1
    if m <= 16:
        return 2, 16
    if m <= 64:
        return 17, 64
    return max(65, m // 2 + 1), 2 * m - 1


def merged_table(path: pathlib.Path, table: dict) -> dict:
    """table with the entries of the table already at path (if any) that it does not re-measure
    (same k, n and measured_at_m), so separate sweeps (--ms 1,16 then --ms 512) build one file."""
    if not path.is_file():
        return table
    new = {(e["k"], e["n"], e["measured_at_m"]) for e in table["entries"]}
    kept = [e for e in json.loads(path.read_text()).get("entries", ())
            if (e.get("k"), e.get("n"), e.get("measured_at_m")) not in new]
    return dict(table, entries=kept + table["entries"])


def sweep(shapes, ms, rng, in_jit: bool, write_table=None):
    entries = []
    for k, n in shapes:
        w4 = int4_copies(k, n)
        for m in ms:
            xs = int8_bench.activations(rng, m, k, _sets(m, k, n, len(w4)))
            results = []
            print(f"K={k} N={n} M={m}: the default config first, then the candidates", flush=True)
            for config in sweep_candidates(m, k, n):
                def op(x, w, config=config):
                    return int4_matmul_pallas(x, w, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16, config=config)

                timer = int8_bench.time_in_one_jit if in_jit or m <= IN_JIT_MAX_M else int8_bench.time_op
                seconds = _safe(f"M={m} {config}", lambda: timer(op, xs, w4, samples=5))
                if seconds is not None:
                    results.append((seconds, config))
                    gbps = w4[0].nbytes / seconds / 1e9
                    print(f"  M={m} {seconds * 1e3:.4f} ms {gbps:.0f} GB/s {config}", flush=True)
            if results:
                seconds, best = min(results, key=lambda r: r[0])
                min_m, max_m = entry_range(m)
                entry = {"min_m": min_m, "max_m": max_m, "k": k, "n": n, "measured_ms": round(seconds * 1e3, 4),
                         "measured_at_m": m,
                         "config": dataclasses.asdict(best)}
                entries.append(entry)
                print(f"BEST K={k} N={n} M={m}: {seconds * 1e3:.4f} ms {json.dumps(entry)}", flush=True)
        del w4
    table = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
             "date": datetime.date.today().isoformat(),
             "source": "benchmarks/bench_int4_matmul.py --sweep (nf4, double quant, blocksize 64, bf16)",
             "entries": entries}
    print("\nTABLE " + json.dumps(table), flush=True)
    if write_table:
        path = pathlib.Path(write_table)
        path.write_text(json.dumps(merged_table(path, table), indent=1) + "\n")
        print(f"wrote {write_table} (jint8/ops/int4_matmul/data/{configs.device_table_name(table['device_kind'])}"
              ".json reads it)", flush=True)


def _check_configs(m, k, n, blocksize):
    kind = jax.devices()[0].device_kind
    chosen = configs.config_for(kind, m, k, n, blocksize)
    variants = [chosen]
    if m == 1:
        variants.append(Config(block_m=1, block_n=32, block_k=256, dot="fma", lookup="select", split_k=3))
    variants += [Config(block_m=16, block_n=32, block_k=128, dot="mma_swapped", lookup="select", split_k=2)
                 if m <= 16 else Config(block_m=64, block_n=64, block_k=128, dot="mma", lookup="select"),
                 Config(block_m=16 if m <= 16 else 128, block_n=64, block_k=256, dot="mma"),
                 Config(block_m=128, block_n=64, block_k=256, route="xla_dot")]
    out = []
    for config in variants:
        config = configs.fit_to_shape(config, m, k, n, blocksize)
        if config not in out:
            out.append(config)
    return out


CHECK_CASES = [  # (M, K, N, quant_type, double_quant, blocksize)
    (1, 4096, 4096, "nf4", True, 64), (1, 14336, 4096, "nf4", True, 64), (1, 384, 45, "fp4", False, 128),
    (5, 4096, 1024, "fp4", True, 64), (16, 4096, 14336, "nf4", False, 256), (16, 512, 777, "nf4", True, 128),
    (64, 1024, 333, "fp4", True, 64), (300, 4096, 4096, "nf4", True, 64), (300, 768, 1001, "fp4", False, 256),
    (1, 8192, 28672, "nf4", True, 64),
]


def check(rng, cases) -> int:
    failures = []
    for m, k, n, quant_type, double_quant, blocksize in cases:
        scale = rng.uniform(0.01, 2.0, (n, 1)).astype(np.float32)
        w = quant4.quantize_4bit(jnp.asarray(rng.standard_normal((n, k)).astype(np.float32) * scale),
                                 quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
        bias = jnp.asarray(rng.standard_normal(n), jnp.bfloat16)
        label = f"M={m} K={k} N={n} {quant_type} dq={double_quant} bs={blocksize}"
        want = np.asarray(jax.jit(reference.dequantized_weight, static_argnums=1)(w, jnp.bfloat16)).view(np.uint16)
        y64, magnitude = checks.float64_recipe(x, want.view(jnp.bfloat16), bias, jnp.bfloat16)
        for lookup in ("gather", "select"):
            got = _safe(f"{label} dequantize {lookup}", lambda: np.asarray(dequantize_pallas(
                w, jnp.bfloat16, config=Config(block_m=128, block_n=64, block_k=256, route="xla_dot", lookup=lookup),
                poison_output=True)).view(np.uint16))
            bad = -1 if got is None else int(np.sum(got != want))
            print(f"  ok? {bad == 0}  {label} dequantize ({lookup}): {bad} elements differ", flush=True)
            if bad:
                failures.append(f"{label} dequantize {lookup}")
        for config in _check_configs(m, k, n, blocksize):
            y = _safe(f"{label} {config}", lambda: int4_matmul_pallas(
                x, w, bias, compute_dtype=jnp.bfloat16, out_dtype=jnp.bfloat16, config=config, poison_output=True))
            bad = -1 if y is None else checks.output_errors(y, y64, magnitude, k, jnp.bfloat16, jnp.bfloat16)
            print(f"  ok? {bad == 0}  {label} {config}: {bad} elements outside the bound", flush=True)
            if bad:
                failures.append(f"{label} {config}")
        y = _safe(f"{label} public op", lambda: int4_matmul(x, w, bias))
        backend = select_backend(x, w).name
        bad = -1 if y is None else checks.output_errors(y, y64, magnitude, k, jnp.bfloat16, jnp.bfloat16)
        print(f"  ok? {bad == 0}  {label} public op ({backend}): {bad} elements outside the bound", flush=True)
        if bad:
            failures.append(f"{label} public op")
    print(f"\n{len(failures)} failures" + "".join(f"\n  {f}" for f in failures), flush=True)
    return 1 if failures else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--shapes", default="llama", help="llama, or comma-separated KxN (e.g. 4096x4096)")
    parser.add_argument("--ms", help="comma-separated M (default 1,16,256,512,4096; --sweep 1,16,512)")
    parser.add_argument("--in-jit", action="store_true", help="also time in one jit (time_in_one_jit)")
    parser.add_argument("--write-table", metavar="PATH", help="--sweep: also write the table (JSON) to PATH")
    parser.add_argument("--interpret", action="store_true",
                        help="--check / --sweep run the kernels in Pallas interpret mode (a CPU smoke run)")
    args = parser.parse_args()
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    shapes = LLAMA if args.shapes == "llama" else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    if args.interpret:
        global int4_matmul_pallas, dequantize_pallas
        int4_matmul_pallas = functools.partial(int4_matmul_pallas, interpret=True)
        dequantize_pallas = functools.partial(dequantize_pallas, interpret=True)
    if args.check:
        sys.exit(check(rng, CHECK_CASES if shapes is LLAMA else [
            (m, k, n, q, d, b) for k, n in shapes for m, q, d, b in ((1, "nf4", True, 64), (40, "fp4", False, 64))]))
    ms = tuple(int(m) for m in args.ms.split(",")) if args.ms else (SWEEP_MS if args.sweep else MS)
    try:
        if args.sweep:
            sweep(shapes, ms, rng, args.in_jit, args.write_table)
        else:
            print_markdown(bench_table(shapes, ms, rng, args.in_jit))
    except Exception:  # noqa: BLE001 (the rows so far are printed above; say where it stopped)
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
