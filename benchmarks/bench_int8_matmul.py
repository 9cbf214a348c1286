"""Times jint8's int8_matmul against XLA bf16, XLA naive A8W8 and bitsandbytes' Linear8bitLt:
`python3 benchmarks/bench_int8_matmul.py`.

The "jint8" column is the public op on K-major weights (weight_layout="nk", what Int8Weight
stores); "jint8, wq[K,N]" the same op on [K, N] weights (big layer only); bitsandbytes
(threshold 6, has_fp16_weights=False) is timed when it imports. Every op is jitted whole. Calls rotate over several
activation sets (and, where the weights would fit in L2, over weight copies so that >= 2x L2 of
weights streams), dispatched back to back; a sample is (wall time of a ~30 ms batch) / calls
after block_until_ready, and the table shows the median of 7 samples. Inputs: x ~ N(0, 1) with 8 outlier columns
(|x| in [6, 40], one row each), threshold 6, capacity 64; bf16 activations and output.

  --sweep: time candidate K-major plans on the K=8192, N=28672 layer (for data/<gpu>.json).
  --sweep-split-k: split_k / block_n / block_k of the table's fused or K-loop plan on the Llama
    layers (or --shapes) at M = 1, 16 (or --sweep-ms when given).
  --sweep-in-jit: either sweep times its candidates in one jit (time_in_one_jit).
  --outlier-sweep: the op at outlier column counts 0, 8, 64, 256, 1024, K/4 and K (--shapes, --ms).
  --shapes layer|llama|all (default all); --ms 1,16,256,4096.
"In one jit" columns: all rotated calls inside one jitted executable, as a jitted model issues
them (time_in_one_jit): GPU time and in-executable launch gaps, without the host's per-call
dispatch floor that sets the plain columns of the small layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import op_table  # noqa: E402
from jint8.ops.int8_matmul import configs, reference  # noqa: E402
from jint8.ops.int8_matmul.api import int8_matmul  # noqa: E402
from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas  # noqa: E402

THRESHOLD, CAPACITY, NUM_OUTLIER_COLS = 6.0, 64, 8
L2_BYTES = 50 * 2**20
LAYER = (8192, 28672)
LLAMA = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]
MS = (1, 16, 256, 4096)
SWEEP_MS = "1,16,64,256,4096"


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


def bf16_weights(wq, col_scales):
    """XLA bf16's weights: each int8 [K, N] copy dequantized (the same values, 16-bit)."""
    return [(w.astype(jnp.float32) * col_scales / 127).astype(jnp.bfloat16) for w in wq]


def sets_for(m, k, n):
    """Activation sets to rotate: at least one per weight copy, at most ~2 GB of them."""
    copies = max(1, min(32, math.ceil(2 * L2_BYTES / (k * n))))
    return int(max(4, copies, min(16, 2e9 // max(m * k * 2, 1))))


def time_op(op, xs, ws, *, batch_seconds=0.03, samples=7):
    """Median seconds per call of jit(op)(x, w), rotating over (x, w) pairs (time_calls)."""
    pairs = [(x, ws[i % len(ws)]) for i, x in enumerate(xs)]
    return time_calls(jax.jit(op), pairs, jax.block_until_ready, batch_seconds=batch_seconds,
                      samples=samples)


def time_calls(call, pairs, wait, *, batch_seconds, samples):
    """Median seconds per call(*pair), rotating over pairs; wait(last output) blocks until done.

    Calls are dispatched back to back (asynchronously) and the batch is timed from the first
    dispatch to the wait on the last output, so per-call host overhead hides behind GPU time
    whenever a call takes longer than dispatching it (~10 us here; the null-op row of the table
    shows that floor). One pass warms up (compiles), one sizes the batch to ~batch_seconds.
    """
    for _ in range(2):
        start = time.perf_counter()
        for pair in pairs:
            out = call(*pair)
        wait(out)
    per_call = (time.perf_counter() - start) / len(pairs)
    calls = max(len(pairs), int(batch_seconds / max(per_call, 1e-6)))
    results = []
    for _ in range(samples):
        start = time.perf_counter()
        for i in range(calls):
            out = call(*pairs[i % len(pairs)])
        wait(out)
        results.append((time.perf_counter() - start) / calls)
    return statistics.median(results)


def time_in_one_jit(op, xs, ws, *, samples=7):
    """Median seconds per op when all (x, w) pairs run inside one jitted executable.

    One dispatch per len(pairs) ops: this is how a jitted model's decode step launches its
    projections, so small layers show GPU time and in-executable launch gaps instead of the
    host's per-call dispatch floor.
    """
    pairs = [(x, ws[i % len(ws)]) for i, x in enumerate(xs)]
    fn = jax.jit(lambda pairs: [op(x, w) for x, w in pairs])
    jax.block_until_ready(fn(pairs))
    results = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(4):
            out = fn(pairs)
        jax.block_until_ready(out)
        results.append((time.perf_counter() - start) / (4 * len(pairs)))
    return statistics.median(results)


def activations_with_outliers(rng, m, k, count, sets):
    """`sets` x [M, K] ~ N(0, 1) with exactly `count` outlier columns (|x| >= THRESHOLD in at
    least one row): each chosen column gets one element in [6, 40] in a random row, the rest of
    the batch stays below the threshold (|x| < 6 is clipped to 5.9)."""
    out = []
    for _ in range(sets):
        x = np.clip(rng.standard_normal((m, k), dtype=np.float32), -5.9, 5.9)
        cols = rng.choice(k, count, replace=False)
        x[rng.integers(0, m, count), cols] = rng.choice([-1.0, 1.0], count) * rng.uniform(6, 40, count)
        out.append(jnp.asarray(x, jnp.bfloat16))
    return out


def outlier_counts(k):
    return (0, 8, 64, 256, 1024, k // 4, k)


def outlier_sweep(rng, shapes, ms):
    """The op (public int8_matmul, K-major weights) at outlier column counts 0 .. K per shape
    and M, against XLA bf16 on the same weights; one compiled op per shape and M serves every
    count. Prints a markdown table: ms per call (ratio to bf16)."""
    header = "| K x N | M | bf16 ms | " + " | ".join(f"c={c}" for c in ("0", "8", "64", "256",
                                                                        "1024", "K/4", "K")) + " |"
    print("\noutlier columns: ms per call (int8 / bf16)\n" + header)
    print("|" + "---|" * 10, flush=True)
    for k, n in shapes:
        wq, col_scales = weight_copies(rng, k, n)
        wq_nk = [w.T.copy() for w in wq]
        bf16 = bf16_weights(wq, col_scales)
        jint8, _, _ = ops_for(col_scales)
        del wq
        for m in ms:
            # Large batches stream their activations anyway: two sets keep host setup short.
            sets = 2 if m * k > 2**23 else min(sets_for(m, k, n), 8)
            base = activations_with_outliers(rng, m, k, 0, sets)
            t_bf16 = time_op(lambda x, w: x @ w, base, bf16)
            cells = []
            for count in outlier_counts(k):
                xs = activations_with_outliers(rng, m, k, count, sets)
                t = time_op(jint8, xs, wq_nk)
                cells.append(f"{t * 1e3:.3f} ({t / t_bf16:.2f})")
            print(f"| {k}x{n} | {m} | {t_bf16 * 1e3:.3f} | " + " | ".join(cells) + " |", flush=True)
        del wq_nk, bf16


def ops_for(col_scales):
    def jint8(x, wq_nk):  # the public op on K-major weights, what Int8Weight stores
        return int8_matmul(x, wq_nk, col_scales, threshold=THRESHOLD, outlier_capacity=CAPACITY,
                           weight_layout="nk", backend="pallas_triton")

    def jint8_kn(x, wq_kn):  # the public op on [K, N] weights (the old layout)
        return int8_matmul(x, wq_kn, col_scales, threshold=THRESHOLD, outlier_capacity=CAPACITY,
                           weight_layout="kn", backend="pallas_triton")

    def naive_a8w8(x, wq_nk):  # vector-wise A8W8 by XLA, no outlier decomposition
        y, _ = reference.int8_matmul_reference(x, wq_nk, col_scales, threshold=0.0,
                                               outlier_capacity=0, weight_layout="nk")
        return y

    return jint8, jint8_kn, naive_a8w8


def bnb_timer(k, n, copies):
    """seconds-per-call function of bitsandbytes' Linear8bitLt (threshold 6, int8 weights),
    or None when bitsandbytes does not import here."""
    try:
        import bitsandbytes as bnb
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    layers = [bnb.nn.Linear8bitLt(k, n, bias=False, has_fp16_weights=False,
                                  threshold=THRESHOLD).cuda() for _ in range(copies)]

    def timer(xs, *, batch_seconds=0.03, samples=7):
        tx = [torch.from_numpy(np.asarray(x.astype(jnp.float32))).cuda().to(torch.bfloat16)
              for x in xs]
        pairs = [(x, layers[i % len(layers)]) for i, x in enumerate(tx)]
        with torch.inference_mode():
            return time_calls(lambda x, layer: layer(x), pairs, lambda _: torch.cuda.synchronize(),
                              batch_seconds=batch_seconds, samples=samples)

    return timer


def bench_table(shapes, rng, *, full_columns, ms=MS):
    rows = []
    for k, n in shapes:
        wq, col_scales = weight_copies(rng, k, n)
        wq_nk = [w.T.copy() for w in wq]  # K-major copies, made once outside the timed calls
        w_bf16 = bf16_weights(wq, col_scales)
        jint8, jint8_kn, naive_a8w8 = ops_for(col_scales)
        bnb_time = bnb_timer(k, n, len(wq))
        for m in ms:
            xs = activations(rng, m, k, sets_for(m, k, n))
            times = {"jint8": time_op(jint8, xs, wq_nk)}
            if (k, n) == LAYER:
                times["jint8_kn"] = time_op(jint8_kn, xs, wq)
            times["xla_bf16"] = time_op(lambda x, w: x @ w, xs, w_bf16)
            times["naive_a8w8"] = time_op(naive_a8w8, xs, wq_nk)
            if bnb_time is not None:
                times["bnb"] = bnb_time(xs)
            times["jint8_in_jit"] = time_in_one_jit(jint8, xs, wq_nk)
            times["bf16_in_jit"] = time_in_one_jit(lambda x, w: x @ w, xs, w_bf16)
            if full_columns and (k, n) == LAYER:
                times["null_op"] = time_op(lambda x, w: x[:1, :1] + 1, xs, wq)
            plan = configs.plan_for(jax.devices()[0].device_kind, m, k, n, "nk")
            rows.append((k, n, m, times, plan))
            print(op_table.progress_line(k, n, m, times) + f" | {plan.gemm_path} {plan.gemm}", flush=True)
        del wq, wq_nk, w_bf16
    return rows


COLUMNS = [("jint8", "jint8 (public op, K-major wq)"), ("jint8_kn", "jint8, wq[K,N]"),
           ("xla_bf16", "XLA bf16"), ("naive_a8w8", "XLA naive A8W8"),
           ("bnb", "bnb Linear8bitLt t=6"), ("jint8_in_jit", "jint8, in one jit"),
           ("bf16_in_jit", "bf16, in one jit"), ("null_op", "null op")]


def print_markdown(rows):
    def ratios(row):
        _, _, _, t, plan = row
        in_jit = f"{t['bf16_in_jit'] / t['jint8_in_jit']:.2f}x" if "jint8_in_jit" in t else "-"
        return [f"{t['xla_bf16'] / t['jint8']:.2f}x", in_jit, plan.gemm_path]

    op_table.print_markdown(rows, COLUMNS, ["jint8 vs bf16", "in one jit: vs bf16", "jint8 route"], ratios, digits=3)


def sweep_candidates(m, k=LAYER[0], n=LAYER[1]):
    """K-major plans to time at this M: (gemm_path, block_n, block_k, warps, stages, mode,
    block_m (pallas and xla_gemm only)). xla_gemm's block_k only steps its overflow sweep."""
    if m <= 16:
        rows = [("fused", 128, 128, 4, 4, "branch"), ("fused", 128, 128, 4, 4, "dense"),
                ("fused", 128, 128, 4, 6, "branch"), ("fused", 256, 64, 4, 6, "branch"),
                ("fused", 256, 128, 8, 3, "branch"), ("fused", 128, 64, 4, 8, "branch"),
                ("fused", 128, 256, 8, 3, "branch"), ("fused", 256, 128, 8, 4, "branch"),
                ("pallas", 64, 256, 4, 4, "branch", 16), ("pallas", 128, 128, 4, 4, "branch", 16)]
    elif m <= 64:
        rows = [("fused", 128, 128, 4, 4, "branch"), ("fused", 256, 64, 8, 4, "branch"),
                ("fused", 128, 64, 4, 6, "branch"), ("pallas", 128, 128, 4, 4, "branch", 64),
                ("pallas", 128, 128, 4, 4, "branch", 32)]
    elif m <= 256:
        rows = [("pallas", 128, 128, 4, 4, "branch", 64), ("pallas", 128, 128, 8, 3, "branch", 128),
                ("pallas", 256, 128, 8, 3, "branch", 128), ("pallas", 256, 128, 8, 3, "branch", 64),
                ("pallas", 128, 256, 8, 3, "branch", 64), ("pallas", 64, 128, 4, 4, "branch", 128),
                ("pallas", 128, 64, 4, 5, "branch", 128)]
    else:
        rows = [("pallas", 128, 128, 8, 3, "branch", 128), ("pallas", 256, 128, 8, 3, "branch", 128),
                ("pallas", 128, 128, 8, 3, "branch", 256), ("pallas", 256, 64, 8, 4, "branch", 128),
                ("pallas", 256, 128, 8, 4, "branch", 128), ("pallas", 128, 64, 4, 4, "branch", 128)]
    if m > 16:  # XLA's int8 GEMM + the epilogue kernel, against the Triton K loop
        rows += [("xla_gemm", 128, 128, 4, 2, "branch", 64), ("xla_gemm", 128, 128, 8, 2, "branch", 128),
                 ("xla_gemm", 256, 128, 8, 2, "branch", 64), ("xla_gemm", 64, 128, 4, 2, "branch", 64),
                 ("xla_gemm", 128, 128, 4, 2, "branch", 32)]
    plans = []
    for path, bn, bk, warps, stages, mode, *bm in rows:
        block_m = configs.fused_block_m(m) if path == "fused" else bm[0]
        plans.append(configs.KernelPlan(
            quantize=configs.default_plan(m, k, n).quantize, gemm_path=path,
            gemm=configs.route_config(path, dict(
                block_m=block_m, block_n=bn, block_k=bk, num_warps=warps, num_stages=stages,
                weight_layout="nk", outlier_mode=mode))))
    return plans


def _time_plan(m, plan, xs, weights, col_scales, in_jit=False):
    op = lambda x, w, plan=plan: int8_matmul_pallas(
        x, w, col_scales, threshold=THRESHOLD, outlier_capacity=CAPACITY,
        weight_layout=plan.reads_layout(), plan=plan)[0]
    try:
        seconds = (time_in_one_jit(op, xs, weights, samples=5) if in_jit
                   else time_op(op, xs, weights, samples=5))
    except Exception as error:  # a candidate that does not compile is reported, skipped
        print(f"  M={m} {plan.gemm_path} {plan.gemm}: FAILED {type(error).__name__}: "
              f"{str(error)[:300]}", flush=True)
        return None
    print(f"  M={m} {seconds * 1e3:.4f} ms {plan.gemm_path} {plan.gemm}", flush=True)
    return seconds


def _sweep_cases(rng, shapes, ms):
    """(k, n, m, activation sets, K-major weight copies, col_scales, the table's plan) per case."""
    for k, n in shapes:
        wq, col_scales = weight_copies(rng, k, n)
        wq_nk = [w.T.copy() for w in wq]
        del wq
        for m in ms:
            xs = activations(rng, m, k, sets_for(m, k, n))
            table = configs.plan_for(jax.devices()[0].device_kind, m, k, n, "nk")
            yield k, n, m, xs, wq_nk, col_scales, table


def sweep(rng, ms, shapes=(LAYER,), paths=configs.GEMM_PATHS, in_jit=False):
    """Times every K-major candidate (of these gemm paths) per shape; prints the best per M.
    in_jit: time each in one jitted executable (time_in_one_jit), not per call: the small
    layers' per-call times are the host's dispatch floor."""
    for k, n, m, xs, wq_nk, col_scales, table in _sweep_cases(rng, shapes, ms):
        print(f"K={k} N={n}: the table's plan, then the candidates", flush=True)
        candidates = [table] + [p for p in sweep_candidates(m, k, n) if p.gemm_path in paths]
        results = [(s, p) for p in candidates
                   if (s := _time_plan(m, p, xs, wq_nk, col_scales, in_jit)) is not None]
        best_seconds, best = min(results, key=lambda r: r[0])
        print(f"BEST K={k} N={n} M={m}: {best_seconds * 1e3:.4f} ms {best}", flush=True)


def sweep_split_k(rng, shapes, ms=(1, 16), in_jit=False):
    """split_k / block_n / block_k of the table's fused or K-loop ("pallas") plan on the
    smaller layers (few output tiles or long K loops)."""
    for k, n, m, xs, wq_nk, col_scales, base in _sweep_cases(rng, shapes, ms):
        if base.gemm_path not in ("fused", "pallas"):
            continue
        print(f"K={k} N={n} M={m}: the table's plan, then split_k x block_n x block_k", flush=True)
        _time_plan(m, base, xs, wq_nk, col_scales, in_jit)
        for split_k, block_n, block_k in ((1, 32, 256), (1, 64, 256), (1, 128, 128),
                                          (2, 64, 256), (2, 128, 128), (4, 64, 256),
                                          (4, 128, 128)):
            plan = dataclasses.replace(base, gemm=dataclasses.replace(
                base.gemm, split_k=split_k, block_n=block_n, block_k=block_k))
            print(f"  K={k} N={n}", end="")
            _time_plan(m, plan, xs, wq_nk, col_scales, in_jit)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-ms", default=SWEEP_MS)
    parser.add_argument("--sweep-paths", default=",".join(configs.GEMM_PATHS),
                        help="gemm paths the sweep times (comma-separated)")
    parser.add_argument("--sweep-in-jit", action="store_true",
                        help="the sweep times candidates in one jit (time_in_one_jit)")
    parser.add_argument("--sweep-split-k", action="store_true",
                        help="time split_k on the Llama layers (fused or K-loop plans; at --sweep-ms"
                        " when given, else M = 1, 16)")
    parser.add_argument("--shapes", default="all",
                        help="layer, llama, all, or comma-separated KxN (e.g. 4096x4096,8192x28672)")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--brief", action="store_true", help="leave out the null-op column")
    parser.add_argument("--outlier-sweep", action="store_true",
                        help="outlier column counts 0 .. K per shape and M (--shapes, --ms)")
    args = parser.parse_args()
    rng = np.random.default_rng(int(time.time_ns() % 2**31))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    named = {"layer": [LAYER], "llama": LLAMA, "all": [LAYER] + LLAMA}
    shapes = named.get(args.shapes) or [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    if args.sweep:
        sweep(rng, [int(m) for m in args.sweep_ms.split(",")], shapes,
              tuple(args.sweep_paths.split(",")), in_jit=args.sweep_in_jit)
    if args.sweep_split_k:
        split_ms = (1, 16) if args.sweep_ms == SWEEP_MS else tuple(map(int, args.sweep_ms.split(",")))
        sweep_split_k(rng, shapes if args.shapes != "all" else LLAMA, split_ms, args.sweep_in_jit)
    if args.outlier_sweep:
        outlier_sweep(rng, shapes, tuple(int(m) for m in args.ms.split(",")))
    if args.sweep or args.sweep_split_k or args.outlier_sweep:
        return
    try:
        import bitsandbytes
        print(f"bitsandbytes {bitsandbytes.__version__}", flush=True)
    except ImportError:
        print("bitsandbytes not importable here: its column is left out", flush=True)
    print_markdown(bench_table(shapes, rng, full_columns=not args.brief,
                               ms=tuple(int(m) for m in args.ms.split(","))))


if __name__ == "__main__":
    main()
