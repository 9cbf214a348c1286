"""Tune the int8 kernels on the decode shapes of a fused Llama-3-8B layer (or any K x N).

    python3 tools/tune_decode_shapes.py [--json OUT] [--m 1] [--routes fused pallas xla_gemm]

Per shape (K x N of qkv_proj, o_proj, gate_up_proj, down_proj, lm_head) and candidate tiles
(block_n, block_k, split_k), times the public op as the model runs it, on each route asked for
(--routes, KernelPlan.gemm_path: the one-launch fused kernel, by default; the two-kernel
"pallas" route, activation pass + GEMM; "xla_gemm", activation pass + XLA's int8 GEMM + the
GEMM kernel's epilogue), with COPIES
distinct K-major weights (together > 2x L2, as consecutive layers are) called back to back inside
one jitted while loop (a CUDA graph per iteration, as a decode step), each call's input
depending on the previous output. Prints ms per call
and the bandwidth reached (int8 weight bytes / time), next to the current table's plan, and checks
every candidate's output against the XLA reference (relative max error). The best tiles per shape
go into data/<gpu>.json's "shapes_nk" list (configs.plan_for reads them before the M buckets).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from typing import Optional

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 28672),
          "down_proj": (14336, 4096), "lm_head": (4096, 128256), "layer_8192x28672": (8192, 28672)}
L2_BYTES = 50 * 2**20
REPS = 20
# max |y - reference| / max |reference|: a correct plan is below 1e-2 (its outlier-stream and
# output roundings), a broken one O(1) or NaN
MAX_REL_ERROR = 5e-2


def candidates(k, n, stages=(4,), splits=(1, 2, 4, 8), max_tile_kib=40):
    """Tiles worth timing for K x N at M = 1: 96-1100 programs, >= 4 K steps per program,
    weight tiles of 4-160 KiB over the pipeline stages; split-K partials summed by XLA."""
    for block_n, block_k, split_k, num_stages in itertools.product(
            (16, 32, 64, 128, 256), (128, 256, 512, 1024), splits, stages):
        programs = -(-n // block_n) * split_k
        tile_bytes = block_n * block_k
        if (not 96 <= programs <= 1100
                or -(-k // block_k) < 4 * split_k or not 4096 <= tile_bytes <= max_tile_kib * 1024):
            continue
        yield dict(block_n=block_n, block_k=block_k, split_k=split_k,
                   num_warps=8 if tile_bytes >= 32 * 1024 else 4, num_stages=num_stages)


def _shape(name: str) -> tuple[int, int]:
    """A projection name of SHAPES, or any 'KxN' (another model's layer)."""
    if name in SHAPES:
        return SHAPES[name]
    try:
        k, n = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: {name!r} is neither one of {sorted(SHAPES)} nor KxN") from None
    return k, n


def _tiles(gemm) -> dict:
    """A plan's tile fields, as candidates() names them."""
    return dict(block_n=gemm.block_n, block_k=gemm.block_k, split_k=gemm.split_k,
                split_partials=gemm.split_partials, num_warps=gemm.num_warps,
                num_stages=gemm.num_stages, row_scales=gemm.row_scales)


def route_plans(route, candidate, m, quantize):
    """The KernelPlan of one candidate tile dict on one route (None: the route has no use for it).

    The fused kernel's block_m covers all M rows; the two-kernel GEMM takes the same rows per
    program; xla_gemm runs no K loop, so only its epilogue tiles (block_n, no split) matter."""
    from jint8.ops.int8_matmul import configs

    if route == "xla_gemm" and (candidate["split_k"] != 1 or candidate["block_k"] != 128):
        return None
    gemm = configs.route_config(route, dict(block_m=configs.fused_block_m(m), weight_layout="nk",
                                            outlier_mode="branch", **candidate))
    return configs.KernelPlan(quantize=quantize, gemm=gemm, gemm_path=route)


def main(argv=None):
    from jint8.ops.int8_matmul.configs import GEMM_PATHS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--m", type=int, default=1)
    parser.add_argument("--json")
    parser.add_argument("--shapes", nargs="+", default=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
                        help=f"projections ({', '.join(SHAPES)}) or KxN of any layer")
    parser.add_argument("--stages", nargs="+", type=int, default=[4],
                        help="pipeline depths (num_stages) to try with each tile; with --table-only "
                        "the table's plan is also timed with each")
    parser.add_argument("--splits", nargs="+", type=int, default=[1, 2, 4, 8],
                        help="split_k values to try")
    parser.add_argument("--max-tile-kib", type=int, default=40,
                        help="largest weight tile (block_n x block_k bytes) to try")
    parser.add_argument("--routes", nargs="+", default=["fused"], choices=GEMM_PATHS,
                        help="KernelPlan.gemm_path values whose candidates are timed")
    parser.add_argument("--row-scales", nargs="+", default=["kernel"], choices=["kernel", "input"],
                        help="fused route: where each row's absmax comes from (Config.row_scales); "
                        "with --table-only the table's plan is also timed with each")
    parser.add_argument("--table-only", action="store_true",
                        help="time only the table's plan per shape (A/B runs of kernel changes)")
    parser.add_argument("--norm", action="store_true",
                        help="qkv_proj and gate_up_proj take their RMSNorm in the kernel, as the "
                        "models do at M = 1 (configs.FUSED_NORM_MAX_M)")
    parser.add_argument("--output-gate", action="store_true",
                        help="gate_up_proj gates its own result (OutputGate('silu'), N / 2 outputs), "
                        "as the models run it")
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny shapes in interpret mode")
    parser.add_argument("--write-table", metavar="JSON",
                        help="put each shape's best candidate (if --min-gain faster than the table's plan) "
                        "into this table's shapes_nk (jint8's data/<gpu>.json, or a new file in a "
                        "JINT8_KERNEL_TABLES directory for a GPU without one)")
    parser.add_argument("--min-gain", type=float, default=0.03,
                        help="--write-table's margin over the table's plan (a fraction); a negative "
                        "one writes the best candidate regardless, for an end-to-end A/B of it")
    args = parser.parse_args(argv)
    if args.smoke and args.write_table:
        parser.error("--write-table with --smoke would record interpret-mode times of shrunken shapes")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jint8.ops.int8_matmul import configs, reference
    from jint8.ops.int8_matmul.pallas_triton import int8_matmul_pallas

    device = jax.devices()[0].device_kind
    rng = np.random.default_rng(0)
    print(f"{device}, jax {jax.__version__}, M={args.m}")
    for name in args.shapes:
        k, n = _shape(name)
        if args.smoke:
            k, n = k // 32, n // 32
        copies = max(2, min(16, math.ceil(2 * L2_BYTES / (k * n))))
        ws = [jnp.asarray(rng.integers(-127, 128, (n, k), dtype=np.int8)) for _ in range(copies)]
        scale = jnp.asarray(rng.uniform(0.01, 0.02, n).astype(np.float32))
        x = rng.standard_normal((args.m, k)).astype(np.float32)
        x[:, rng.choice(k, 8, replace=False)] *= 20
        x = jnp.asarray(x, jnp.bfloat16)
        norm = None
        if args.norm and name in ("qkv_proj", "gate_up_proj"):
            norm = reference.InputNorm(jnp.asarray(rng.uniform(0.5, 1.5, k), jnp.bfloat16), 1e-5)
        output_gate = None
        if args.output_gate and name == "gate_up_proj":
            output_gate = reference.OutputGate("silu")
        n_out = n // 2 if output_gate is not None else n
        want = reference.int8_matmul_reference(x, ws[0], scale, threshold=6.0, outlier_capacity=64,
                                               weight_layout="nk", norm=norm,
                                               output_gate=output_gate)[0].astype(jnp.float32)
        table_plan = configs.plan_for("NVIDIA H100" if args.smoke else device, args.m, k, n, "nk")
        plans = [("table", table_plan)]
        for row_scales, stages in itertools.product(args.row_scales, args.stages):
            if table_plan.gemm_path == "fused" and (row_scales, stages) != (
                    table_plan.gemm.row_scales, table_plan.gemm.num_stages):
                gemm = dataclasses.replace(table_plan.gemm, row_scales=row_scales, num_stages=stages)
                plans.append((_tiles(gemm), dataclasses.replace(table_plan, gemm=gemm)))
        chosen = list(candidates(*_shape(name), stages=args.stages, splits=args.splits,
                                 max_tile_kib=args.max_tile_kib))
        if args.table_only:
            chosen = []
        for route, c, row_scales in itertools.product(args.routes, chosen[: 2 if args.smoke else None],
                                                      args.row_scales):
            if route != "fused" and row_scales != "kernel":
                continue  # only the fused kernel sweeps for its row scales
            candidate = dict(c, row_scales=row_scales)
            plan = route_plans(route, candidate, args.m, table_plan.quantize)
            if plan is not None:
                plans.append((candidate, plan))
        # The table's plan is timed first and again last (the min is kept): the first timing
        # of a process runs on a GPU that is still warming up, up to ~10 % slower (on an H200
        # the same tiles read 29.9 us as the table's plan and 26.3 as a candidate: decisions D11).
        plans.append(("table", table_plan))
        results = []
        for label, plan in plans:
            op = lambda x, w, plan=plan: int8_matmul_pallas(  # noqa: E731
                x, w, scale, threshold=6.0, outlier_capacity=64, weight_layout="nk", plan=plan,
                norm=norm, output_gate=output_gate, interpret=args.smoke)[0]

            @jax.jit
            def chain(x, ws):
                # A loop body of `copies` dependent calls, as a decode step runs its layers: XLA
                # records while-loop bodies as CUDA graphs, so host launch cost is not timed.
                def body(_, y):
                    for w in ws:
                        y = op(x + (y[:, :1] * 0).astype(x.dtype), w)
                    return y

                return jax.lax.fori_loop(0, REPS, body, jnp.zeros((x.shape[0], n_out), x.dtype))

            try:
                got = op(x, ws[0]).astype(jnp.float32)
                error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                jax.block_until_ready(chain(x, ws))
                times = []
                for _ in range(5):
                    start = time.perf_counter()
                    jax.block_until_ready(chain(x, ws))
                    times.append((time.perf_counter() - start) / (copies * REPS))
            except Exception as e:  # a tile that does not compile (shared memory, registers)
                print(f"  {name} {label}: failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            ms = sorted(times)[len(times) // 2] * 1e3
            if label == "table" and any(r["plan"] == "table" for r in results):
                first = next(r for r in results if r["plan"] == "table")
                print(f"  {name} table plan: {first['ms'] * 1e3:.1f} us first, {ms * 1e3:.1f} us last")
                first["ms"] = min(first["ms"], ms)
                first["tb_per_s"] = k * n / (first["ms"] * 1e-3) / 1e12
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps(dict(first, plan="table_last", ms=ms), default=str) + "\n")
                continue
            row = dict(shape=name, k=k, n=n, m=args.m, plan=label if label == "table" else "candidate",
                       gemm_path=plan.gemm_path,
                       gemm=plan.gemm.__dict__ if label == "table" else label, ms=ms,
                       tb_per_s=k * n / (ms * 1e-3) / 1e12, rel_error=error, device=device)
            results.append(row)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(row, default=str) + "\n")
        results.sort(key=lambda r: r["ms"])
        table = next(r for r in results if r["plan"] == "table")
        # Only a candidate that computes the recipe may go into a table (MAX_REL_ERROR).
        wrong = [r for r in results if not r["rel_error"] <= MAX_REL_ERROR]
        for r in wrong:
            print(f"  {name}: {r['gemm_path']} {r['gemm']} is WRONG (relative error {r['rel_error']:.1e})")
        best = entry_to_write(results, args.min_gain)
        if args.write_table and best is not None:
            _write_entry(args.write_table, k, n, args.m, best)
        print(f"{name} {k}x{n}: table {table['ms'] * 1e3:.1f} us ({table['tb_per_s']:.2f} TB/s, "
              f"{table['gemm_path']})")
        for r in results[:4]:
            print(f"   {r['ms'] * 1e3:6.1f} us {r['tb_per_s']:.2f} TB/s err {r['rel_error']:.1e} "
                  f"{r['gemm_path']} {r['gemm']}")


def entry_to_write(results, min_gain: float):
    """The candidate --write-table records: the fastest correct one (rel_error <= MAX_REL_ERROR)
    if it beats the table's plan by min_gain (a fraction); with a negative min_gain the fastest
    correct candidate whatever the table's time (an end-to-end A/B of it). None: keep the table.
    results: rows sorted by time, one of them plan == "table"."""
    table = next(r for r in results if r["plan"] == "table")
    correct = [r for r in results if r["plan"] == "candidate" and r["rel_error"] <= MAX_REL_ERROR]
    if not correct:
        return None
    best = correct[0]
    return best if min_gain < 0 or best["ms"] < (1 - min_gain) * table["ms"] else None


def _measured_at(entry) -> Optional[int]:
    """The M an entry was tuned at (its "measured": {"m": M, "us": ...}, or an older table's
    measured_us_m<M> key), None if it does not say."""
    if isinstance(entry.get("measured"), dict) and "m" in entry["measured"]:
        return entry["measured"]["m"]
    found = [int(key[len("measured_us_m"):]) for key in entry if key.startswith("measured_us_m")]
    return found[0] if found else None


def _write_entry(path, k, n, m, best):
    """Put the best candidate for (K, N) at M = m into the table: it replaces the entry whose M
    range holds m and keeps that range, except where that entry was tuned at another M: then the
    range is split between the two tuned Ms, each entry keeping its own side (a table tuned at
    M = 1, then at M = 8, keeps its M = 1 plan for M = 1). Without one, the new entry covers
    M = 1-16 less the shape's other entries' ranges."""
    import datetime

    from jint8.ops.int8_matmul import configs

    data = json.loads(open(path).read()) if os.path.exists(path) else {}  # a new table: its shapes
    covers = lambda e: (e["k"], e["n"]) == (k, n) and e.get("min_m", 1) <= m <= e["max_m"]  # noqa: E731
    replaced = [e for e in data.get("shapes_nk", []) if covers(e)]
    entries = [e for e in data.get("shapes_nk", []) if not covers(e)]
    if replaced:
        lo, hi = replaced[0].get("min_m", 1), replaced[0]["max_m"]
    else:  # M = 1-16, less what the shape's other entries cover
        same = [e for e in entries if (e["k"], e["n"]) == (k, n)]
        lo = 1 + max([e["max_m"] for e in same if e["max_m"] < m], default=0)
        hi = min([e.get("min_m", 1) for e in same if e.get("min_m", 1) > m] + [max(17, m + 1)]) - 1
    other = _measured_at(replaced[0]) if replaced else None
    if other is not None and other != m and lo <= other <= hi:
        kept = dict(replaced[0])
        if other < m:  # the old entry keeps [lo, other], the new one takes [other + 1, hi]
            kept.update(min_m=lo, max_m=other)
            lo = other + 1
        else:  # the new entry takes [lo, m], the old one keeps [m + 1, hi]
            kept.update(min_m=m + 1, max_m=hi)
            hi = m
        entries.append(kept)
    # The fused route's block_m is set per call (configs.fused_block_m); the others keep this one.
    gemm = dict(block_m=max(16, 1 << (m - 1).bit_length()), weight_layout="nk",
                outlier_mode="branch", **best["gemm"])
    if "split_reduce" in gemm:  # an older spelling: the table schema's split_partials
        gemm["split_partials"] = configs.route_config("fused", gemm).split_partials
        del gemm["split_reduce"]
    if not gemm.get("split_partials", True):
        del gemm["split_partials"]  # the default
    entries.append(dict(k=k, n=n, min_m=lo, max_m=hi, gemm_path=best["gemm_path"], gemm=gemm,
                        measured={"m": m, "us": round(best["ms"] * 1e3, 1)},
                        note=f"tune_decode_shapes.py, M={m}, {best['device']}, {datetime.date.today().isoformat()}"))
    data["shapes_nk"] = sorted(entries, key=lambda e: (e["k"], e["n"], e["max_m"]))
    with open(path, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")

if __name__ == "__main__":
    main()
