"""Times jint8's int8_matmul against XLA bf16 and XLA naive A8W8: `python3 benchmarks/bench_int8_matmul.py`.

Every op is jitted whole (activation pass, index list, GEMM, epilogue). Calls rotate over several
activation sets (and, where the weights would fit in L2, over weight copies so that >= 2x L2 of
weights streams), dispatched back to back; a sample is (wall time of a ~30 ms batch) / calls
after block_until_ready, and the table shows the median of 7 samples. Inputs: x ~ N(0, 1) with 8 outlier columns
(|x| in [6, 40], one row each), threshold 6, capacity 64; bf16 activations and output.

  --sweep: time candidate tile configs on the K=8192, N=28672 layer (for data/<gpu>.json).
  --shapes layer|llama|all (default all).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jint8.ops.int8_matmul import configs, reference  # noqa: E402
from jint8.ops.int8_matmul.api import int8_matmul  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton_gemm import int8_gemm  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton_quantize import quantize_rows_unmasked  # noqa: E402

THRESHOLD, CAPACITY, NUM_OUTLIER_COLS = 6.0, 64, 8
L2_BYTES = 50 * 2**20
LAYER = (8192, 28672)
LLAMA = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]
MS = (1, 16, 256, 4096)


def activations(rng, m, k, count):
    sets = []
    for _ in range(count):
        x = rng.standard_normal((m, k), dtype=np.float32)
        cols = rng.choice(k, NUM_OUTLIER_COLS, replace=False)
        x[rng.integers(0, m, NUM_OUTLIER_COLS), cols] = rng.uniform(6, 40, NUM_OUTLIER_COLS)
        sets.append(jnp.asarray(x, jnp.bfloat16))
    return sets


def weight_copies(rng, k, n):
    copies = max(1, min(32, math.ceil(2 * L2_BYTES / (k * n))))
    wq = [jnp.asarray(rng.integers(-127, 128, (k, n), dtype=np.int8)) for _ in range(copies)]
    col_scales = jnp.asarray(rng.uniform(0.01, 0.1, n).astype(np.float32))
    return wq, col_scales


def sets_for(m, k, n):
    """Activation sets to rotate: at least one per weight copy, at most ~2 GB of them."""
    copies = max(1, min(32, math.ceil(2 * L2_BYTES / (k * n))))
    return int(max(4, copies, min(16, 2e9 // max(m * k * 2, 1))))


def time_op(op, xs, ws, *, batch_seconds=0.03, samples=7):
    """Median seconds per call of jit(op)(x, w), rotating over (x, w) pairs.

    Calls are dispatched back to back (asynchronously) and the batch is timed from the first
    dispatch to block_until_ready of the last output, so per-call host overhead hides behind
    GPU time whenever a call takes longer than dispatching it (~10 us here; the null-op row of
    the table shows that floor).
    """
    pairs = [(x, ws[i % len(ws)]) for i, x in enumerate(xs)]
    fn = jax.jit(op)
    for x, w in pairs:  # compile + warm up
        out = fn(x, w)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for x, w in pairs:
        out = fn(x, w)
    jax.block_until_ready(out)
    per_call = (time.perf_counter() - start) / len(pairs)
    calls = max(len(pairs), int(batch_seconds / max(per_call, 1e-6)))
    results = []
    for _ in range(samples):
        start = time.perf_counter()
        for i in range(calls):
            out = fn(*pairs[i % len(pairs)])
        jax.block_until_ready(out)
        results.append((time.perf_counter() - start) / calls)
    return statistics.median(results)


def ops_for(col_scales, bf16_weights):
    def jint8(x, wq):
        return int8_matmul(x, wq, col_scales, threshold=THRESHOLD, outlier_capacity=CAPACITY,
                           backend="pallas_triton")

    def naive_a8w8(x, wq):  # vector-wise A8W8 by XLA, no outlier decomposition
        y, _ = reference.int8_matmul_reference(x, wq, col_scales, threshold=0.0,
                                               outlier_capacity=0)
        return y

    def xla_reference_t6(x, wq):  # the reference recipe (outliers, lax.cond) all in XLA
        y, _ = reference.int8_matmul_reference(x, wq, col_scales, threshold=THRESHOLD,
                                               outlier_capacity=CAPACITY)
        return y

    return {"jint8": jint8, "xla_ref_t6": xla_reference_t6, "naive_a8w8": naive_a8w8}


def bench_table(shapes, rng, *, full_columns):
    rows = []
    kind = jax.devices()[0].device_kind
    for k, n in shapes:
        wq, col_scales = weight_copies(rng, k, n)
        wq_nk = [w.T.copy() for w in wq]  # K-major copies, made once outside the timed calls
        w_bf16 = [(w.astype(jnp.float32) * col_scales / 127).astype(jnp.bfloat16) for w in wq]
        for m in MS:
            xs = activations(rng, m, k, sets_for(m, k, n))
            ops = ops_for(col_scales, w_bf16)
            if not full_columns or (k, n) != LAYER:
                del ops["xla_ref_t6"]
            times = {name: time_op(op, xs, wq) for name, op in ops.items()}
            nk_plan = configs.plan_for(kind, m, k, n, weight_layout="nk")
            times["jint8_nk"] = time_op(
                lambda x, w: int8_matmul_pallas(x, w, col_scales, threshold=THRESHOLD,
                                                outlier_capacity=CAPACITY, plan=nk_plan)[0],
                xs, wq_nk)
            times["xla_bf16"] = time_op(lambda x, w: x @ w, xs, w_bf16)
            plan = configs.plan_for(kind, m, k, n)
            if full_columns and (k, n) == LAYER:
                times["null_op"] = time_op(lambda x, w: x[:1, :1] + 1, xs, wq)
                times["quantize_only"] = time_op(
                    lambda x, w: quantize_rows_unmasked(x, threshold=THRESHOLD,
                                                        config=plan.quantize), xs, wq)
            rows.append((k, n, m, times, plan))
            print(f"K={k:5d} N={n:5d} M={m:4d} " + " ".join(
                f"{name}={t * 1e3:.4f}ms" for name, t in times.items())
                + f" | {plan.gemm_path} {plan.gemm}", flush=True)
    return rows


def print_markdown(rows):
    print(f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{datetime.date.today().isoformat()}; median ms per call\n")
    print("| K x N | M | jint8, wq[K,N] (t=6, 8 outlier cols) | jint8, K-major wq | XLA bf16 | "
          "XLA naive A8W8 | XLA reference t=6 | activation pass | null op | jint8 [K,N] vs bf16 "
          "| K-major vs bf16 | GEMM path [K,N] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda t, key: f"{t[key] * 1e3:.3f}" if key in t else "-"
    for k, n, m, t, plan in rows:
        print(f"| {k}x{n} | {m} | {fmt(t, 'jint8')} | {fmt(t, 'jint8_nk')} | "
              f"{fmt(t, 'xla_bf16')} | {fmt(t, 'naive_a8w8')} | {fmt(t, 'xla_ref_t6')} | "
              f"{fmt(t, 'quantize_only')} | {fmt(t, 'null_op')} | "
              f"{t['xla_bf16'] / t['jint8']:.2f}x | {t['xla_bf16'] / t['jint8_nk']:.2f}x | "
              f"{plan.gemm_path} |")


def sweep_candidates(m, k, n):
    """(weight_layout, swap_ab, block_m, block_n, block_k, num_warps, num_stages, split_k)."""
    if m <= 16:
        rows = [("kn", 0, 16, 256, 64, 4, 6, 1), ("kn", 0, 16, 128, 128, 4, 4, 1),
                ("kn", 0, 16, 256, 128, 8, 4, 1), ("kn", 0, 16, 256, 64, 4, 8, 1),
                ("kn", 0, 16, 512, 64, 8, 6, 1), ("kn", 0, 16, 128, 64, 4, 8, 1),
                ("kn", 1, 16, 256, 64, 4, 6, 1), ("kn", 1, 16, 128, 128, 4, 4, 1),
                ("nk", 0, 16, 64, 256, 4, 4, 1), ("nk", 1, 16, 128, 128, 4, 4, 1)]
    elif m <= 64:
        rows = [("kn", 0, 16, 256, 64, 4, 6, 1), ("kn", 0, 32, 128, 128, 4, 4, 1),
                ("kn", 1, 64, 128, 128, 4, 4, 1), ("kn", 1, 32, 256, 64, 4, 4, 1),
                ("nk", 0, 64, 128, 128, 4, 4, 1)]
    elif m <= 256:
        rows = [("kn", 1, 64, 128, 128, 4, 4, 1), ("kn", 1, 128, 128, 128, 8, 3, 1),
                ("kn", 1, 64, 256, 128, 8, 3, 1), ("kn", 0, 128, 64, 128, 4, 4, 1),
                ("nk", 0, 64, 128, 128, 4, 4, 1), ("nk", 0, 128, 128, 128, 8, 3, 1)]
    else:
        rows = [("kn", 1, 128, 128, 128, 8, 3, 1), ("kn", 1, 128, 256, 128, 8, 3, 1),
                ("kn", 1, 128, 128, 64, 4, 4, 1), ("nk", 0, 128, 128, 128, 8, 3, 1),
                ("nk", 0, 128, 256, 128, 8, 3, 1), ("nk", 0, 256, 128, 128, 8, 3, 1)]
    quant = configs.default_plan(m, k, n).quantize
    plans = [configs.KernelPlan(quantize=quant, gemm=configs.Config(
        weight_layout=layout, swap_ab=bool(swap), block_m=bm, block_n=bn, block_k=bk,
        num_warps=w, num_stages=st, split_k=sk))
        for layout, swap, bm, bn, bk, w, st, sk in rows]
    plans.append(configs.KernelPlan(quantize=quant, gemm=plans[0].gemm, gemm_path="xla"))
    return plans


def sweep(rng, ms, table_path=None):
    """Times every candidate; the fastest "kn" plan per M becomes that bucket of the table."""
    k, n = LAYER
    wq, col_scales = weight_copies(rng, k, n)
    wq_nk = [w.T.copy() for w in wq]  # K-major copies, made once outside the timed calls
    buckets = []
    for m in ms:
        xs = activations(rng, m, k, sets_for(m, k, n))
        results = []
        for plan in sweep_candidates(m, k, n):
            op = lambda x, w, plan=plan: int8_matmul_pallas(
                x, w, col_scales, threshold=THRESHOLD, outlier_capacity=CAPACITY, plan=plan)[0]
            weights = wq_nk if plan.gemm.weight_layout == "nk" else wq
            try:
                seconds = time_op(op, xs, weights, samples=5)
            except Exception as error:  # a candidate that does not compile is reported, skipped
                print(f"  M={m} {plan.gemm_path} {plan.gemm}: FAILED {type(error).__name__}: "
                      f"{str(error)[:300]}", flush=True)
                continue
            results.append((seconds, plan))
            print(f"  M={m} {seconds * 1e3:.4f} ms {plan.gemm_path} {plan.gemm}", flush=True)
        best_seconds, best = min(results, key=lambda r: r[0])
        usable = min((r for r in results if r[1].gemm.weight_layout == "kn"),
                     key=lambda r: r[0])
        print(f"BEST M={m}: {best_seconds * 1e3:.4f} ms {best}", flush=True)
        print(f"BEST kn M={m}: {usable[0] * 1e3:.4f} ms {usable[1]}", flush=True)
        breakdown(xs, wq_nk if best.gemm.weight_layout == "nk" else wq, col_scales, best)
        buckets.append({
            "max_m": m if m != ms[-1] else 1 << 30, "measured_ms": round(usable[0] * 1e3, 4),
            "gemm_path": usable[1].gemm_path, "gemm": dataclasses.asdict(usable[1].gemm)})
    if table_path:
        table = {"device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
                 "date": datetime.date.today().isoformat(),
                 "layer": {"k": k, "n": n}, "buckets": buckets}
        pathlib.Path(table_path).write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {table_path}", flush=True)


def breakdown(xs, weights, col_scales, plan):
    """Times of the activation pass alone and of the GEMM kernel alone (inputs precomputed)."""
    quant = lambda x, w: quantize_rows_unmasked(x, threshold=THRESHOLD, config=plan.quantize)
    q_seconds = time_op(quant, xs, weights, samples=5)
    line = f"  breakdown: activation pass {q_seconds * 1e3:.4f} ms"
    if plan.gemm_path == "pallas":
        prepared = [quantize_rows_unmasked(x, threshold=THRESHOLD, config=plan.quantize)
                    for x in xs]
        zero_bias = jnp.zeros(col_scales.shape, jnp.float32)
        inputs = []
        for x, (xq, row_scales, flags) in zip(xs, prepared):
            slots, valid = reference.outlier_columns(flags > 0, CAPACITY)
            inputs.append((x, xq, row_scales, flags, slots, valid.astype(jnp.int32)))

        def gemm(prepared_inputs, w):
            x, xq, row_scales, flags, slots, valid = prepared_inputs
            return int8_gemm(xq, w, row_scales, col_scales, zero_bias, x, slots, valid, flags,
                             jnp.zeros((1,), jnp.int32), config=plan.gemm,
                             out_dtype=jnp.bfloat16, has_bias=False, has_outliers=True,
                             dense_fallback=True)

        g_seconds = time_op(gemm, inputs, weights, samples=5)
        line += f", GEMM kernel {g_seconds * 1e3:.4f} ms"
    print(line, flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-ms", default="1,16,64,256,4096")
    parser.add_argument("--write-table", default=None,
                        help="with --sweep: write the per-bucket best plans to this json")
    parser.add_argument("--shapes", choices=("layer", "llama", "all"), default="all")
    parser.add_argument("--brief", action="store_true",
                        help="leave out the reference, null-op and activation-pass columns")
    args = parser.parse_args()
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    if args.sweep:
        sweep(rng, [int(m) for m in args.sweep_ms.split(",")], args.write_table)
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("bitsandbytes not importable here: its column is left out", flush=True)
    shapes = {"layer": [LAYER], "llama": LLAMA, "all": [LAYER] + LLAMA}[args.shapes]
    print_markdown(bench_table(shapes, rng, full_columns=not args.brief))


if __name__ == "__main__":
    main()
