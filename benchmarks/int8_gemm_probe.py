"""Which int8 GEMM does the GPU run for xq @ wq.T, and how fast: XLA's (under this process's
XLA_FLAGS) against cuBLASLt's through torch._int_mm, on the same shapes.

    XLA_FLAGS=... python3 benchmarks/int8_gemm_probe.py [--ms 256,4096] [--k 8192] [--n 28672] [--torch]

The xla_gemm route's GEMM is XLA's int8 dot (reference.int8_dot: int8 [M, K] x K-major int8
[N, K] -> int32 [M, N]); at M = 256 on 8192x28672 it is 111 of the op's 165 busy us
(profile_op.py). This prints, per M, the kernels XLA ran for it with their GPU time (a profile
of --calls calls) and the wall-clock median per call, then with --torch the same for
torch._int_mm (cuBLASLt's heuristic algorithm; CUDA events). Run it once per XLA_FLAGS setting.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bench_int8_matmul as bench  # noqa: E402
import profile_op  # noqa: E402
import profile_summary  # noqa: E402
from jint8.ops.int8_matmul import reference  # noqa: E402


def wall_ms(call, calls: int, wait) -> float:
    """Median wall ms per call of call(), dispatched back to back (bench.time_calls)."""
    return bench.time_calls(call, [()] * calls, wait, batch_seconds=0.03, samples=5) * 1e3


def xla_case(m, k, n, calls):
    rng = np.random.default_rng(m)
    xq = jnp.asarray(rng.integers(-127, 128, (m, k), dtype=np.int8))
    wq = jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8))
    dot = jax.jit(lambda a, b: reference.int8_dot(a, b, "nk"))
    expected = np.asarray(xq[:4], np.int64) @ np.asarray(wq, np.int64).T
    if not np.array_equal(np.asarray(dot(xq, wq))[:4], expected):
        raise SystemExit(f"M={m}: XLA's int8 dot is not exact")
    trace = profile_op.trace_calls(dot, (xq, wq), calls)
    wall = wall_ms(lambda: dot(xq, wq), calls, jax.block_until_ready)
    print(f"\nXLA int8 dot M={m} K={k} N={n}: wall {wall:.4f} ms/call")
    for path in sorted(pathlib.Path(trace).rglob("*perfetto_trace.json.gz")):
        total, count, _ = profile_summary.gpu_kernel_times(path)
        for name, micros in total.most_common(4):
            print(f"  {name[:90]}: {micros / count[name]:.1f} us x {count[name]}")


def torch_case(m, k, n, calls):
    try:
        import torch
    except ImportError:
        print("torch: not importable")
        return
    if not torch.cuda.is_available():
        print("torch: no CUDA")
        return
    gen = torch.Generator(device="cuda").manual_seed(m)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda", generator=gen)
    b = torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda", generator=gen)
    out = torch._int_mm(a, b.t())
    torch.cuda.synchronize()
    ms = wall_ms(lambda: torch._int_mm(a, b.t()), calls, lambda _: torch.cuda.synchronize())
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        out = torch._int_mm(a, b.t())
    end.record()
    torch.cuda.synchronize()
    print(f"torch._int_mm M={m}: wall {ms:.4f} ms/call, events {start.elapsed_time(end) / calls:.4f}"
          f" ms/call, out {tuple(out.shape)} {out.dtype}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default="256,4096")
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--n", type=int, default=28672)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--torch", action="store_true", help="also time torch._int_mm")
    args = parser.parse_args(argv)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    for m in map(int, args.ms.split(",")):
        xla_case(m, args.k, args.n, args.calls)
        if args.torch:
            torch_case(m, args.k, args.n, args.calls)


if __name__ == "__main__":
    main()
