"""Serving benchmark: the continuous-batching engine on a Llama-3-8B-shaped model, bf16 vs LLM.int8.

    python3 benchmarks/bench_serve.py                     # GPU: 8B shape, bf16 and int8, 1/8/32/64/128 streams
    python3 benchmarks/bench_serve.py --tiny              # a small smoke run (CPU, under a minute)
    python3 benchmarks/bench_serve.py --variants int8 --streams 64 --prefill-batch 16 --json serve.jsonl

Weights and activation statistics are bench_generate.py's (random weights drawn on the device,
"realistic" activations with systematic outlier features and heavy-tailed down_proj inputs; its
shape and LLM.int8 flags pass through). Per variant, one Engine (jint8.serve) with decode batch
buckets = the stream counts, one prefill chunk = the prompt and prefill calls of 1 or
--prefill-batch prompts (row buckets (1, N): a call of 2..N-1 prompts runs padded to N), every
shape compiled before timing (Engine.warmup compiles the shapes in parallel threads;
`compiled_while_timed` must be 0). Default: both variants, all five stream counts, one command.
Per stream count C: C requests of --prompt random tokens and --new-tokens greedy new tokens are
submitted at once, as C clients of a server would; every token's arrival is timed on the engine
thread where it is produced (the HTTP layer is not in the loop).
Output tokens/s = all generated tokens / (last token - submission); TTFT = first token -
submission; ITL = gaps between a request's consecutive tokens; p50/p99 over requests (TTFT) or
over all gaps (ITL). host_ms_per_iteration: the engine thread's time per iteration outside its
waits for the device's tokens (scheduling, arguments, dispatch, delivery; on the CPU backend a
dispatch may run part of the computation inline): near the ITL, the host is what limits it;
dispatch_ms_per_iteration: the part of it inside JAX's calls (the compiled step's and sampler's
dispatch, which on a GPU launches their kernels, and input transfers), the rest is the engine's
Python; *_prefill_iteration / *_decode_iteration: the same over the iterations begun with prompts
waiting or prefilling (which dispatch a prefill call) and over the rest (decode steps only). One JSON row per (variant, streams); the 1-stream row also has jint8.generate's decode
time per token on the same model (generate_itl_ms) and the ratio.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import bench_generate  # noqa: E402  (the model recipe)

TINY_SHAPE = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2",
              "--vocab", "1024"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a small model and workload for a CPU smoke run (prompt 64 + 16, streams 1 2 4)")
    parser.add_argument("--variants", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    parser.add_argument("--streams", type=int, nargs="+", help="concurrent requests (default 1 8 32 64 128)")
    parser.add_argument("--prompt", type=int, help="prompt tokens per request (default 512)")
    parser.add_argument("--new-tokens", type=int, help="generated tokens per request (default 128)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--prefill-batch", type=int, default=8,
                        help="prompts prefilled together in one call (default 8)")
    parser.add_argument("--compile-threads", type=int,
                        help="threads compiling the engine's shapes before timing (default: one per shape)")
    parser.add_argument("--json", help="append one JSON line per (variant, streams) to this file")
    parser.add_argument("--in-process", action="store_true", help="run all variants in this process")
    args, model_argv = parser.parse_known_args(argv)
    if args.tiny:
        model_argv = TINY_SHAPE + model_argv
    args.streams = args.streams or ([1, 2, 4] if args.tiny else [1, 8, 32, 64, 128])
    args.prompt = args.prompt or (64 if args.tiny else 512)
    args.new_tokens = args.new_tokens or (16 if args.tiny else 128)
    # bench_generate's shape, activation and LLM.int8 flags; its --prompt sizes the planted tails
    args.model_argv = model_argv
    args.model = bench_generate.parse_args([*model_argv, "--prompt", str(args.prompt)])
    return args


def _engine(args, variant: str):
    import jax

    import jint8
    from jint8.serve import Engine, EngineConfig

    model, params = bench_generate.build_model(args.model, variant)
    params = jint8.fuse_projections(params)
    jax.block_until_ready(params)
    context = args.prompt + args.new_tokens
    blocks_per_sequence = math.ceil(context / args.block_size)
    streams = sorted(set(args.streams))
    prefill_batch = min(args.prefill_batch, streams[-1])
    config = EngineConfig(max_batch=streams[-1], max_context=context, block_size=args.block_size,
                          num_blocks=streams[-1] * blocks_per_sequence + 1, prefill_chunk=args.prompt,
                          prefill_tokens_per_step=prefill_batch * args.prompt, prefill_batch=prefill_batch,
                          prefill_batch_buckets=tuple(sorted({1, prefill_batch})), chunk_buckets=(args.prompt,),
                          batch_buckets=tuple(streams), max_queue=streams[-1])
    return Engine(model, params, config), jint8.param_bytes(params)


def _run_streams(engine, args, streams: int) -> dict:
    from jint8.serve import SamplingOptions

    rng = np.random.default_rng(streams)
    prompts = rng.integers(0, args.model.vocab, size=(streams, args.prompt)).tolist()
    times: list[list[float]] = [[] for _ in range(streams)]
    done = threading.Semaphore(0)

    def sink_for(i):
        def sink(tokens, reason):
            times[i].extend([time.perf_counter()] * len(tokens))
            if reason is not None:
                done.release()
        return sink

    options = SamplingOptions(max_tokens=args.new_tokens)
    host_before = _host_counters(engine)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.submit(prompt, options, sink_for(i))
    for _ in range(streams):
        done.acquire()
    end = max(t[-1] for t in times)
    host = {key: after - host_before[key] for key, after in _host_counters(engine).items()}
    iterations = host["iterations", "prefill"] + host["iterations", "decode"]

    def per_iteration_ms(what: str, kind=None) -> float:
        kinds = ("prefill", "decode") if kind is None else (kind,)
        count = sum(host["iterations", k] for k in kinds)
        return sum(host[what, k] for k in kinds) / max(count, 1) * 1e3

    ttft = np.array([t[0] - start for t in times]) * 1e3
    itl = np.concatenate([np.diff(t) for t in times]) * 1e3
    generated = sum(len(t) for t in times)
    return dict(streams=streams, generated_tokens=generated, wall_s=end - start,
                output_tokens_per_s=generated / (end - start),
                ttft_p50_ms=float(np.percentile(ttft, 50)), ttft_p99_ms=float(np.percentile(ttft, 99)),
                itl_p50_ms=float(np.percentile(itl, 50)), itl_p99_ms=float(np.percentile(itl, 99)),
                engine_iterations=int(iterations), host_ms_per_iteration=per_iteration_ms("host"),
                dispatch_ms_per_iteration=per_iteration_ms("dispatch"),
                prefill_iterations=int(host["iterations", "prefill"]),
                host_ms_per_prefill_iteration=per_iteration_ms("host", "prefill"),
                dispatch_ms_per_prefill_iteration=per_iteration_ms("dispatch", "prefill"),
                host_ms_per_decode_iteration=per_iteration_ms("host", "decode"),
                dispatch_ms_per_decode_iteration=per_iteration_ms("dispatch", "decode"))


def _host_counters(engine) -> dict:
    """{(what, kind): value} so far: iterations, engine-thread seconds outside its waits for the
    device ("host") and the part of those in JAX's dispatch calls ("dispatch"), for iterations
    begun with prompts to prefill ("prefill") and the others ("decode"): the host work per step,
    which the device time of a step must cover for the one-call lookahead to hide it."""
    value = engine.metrics.registry.get_sample_value
    names = dict(iterations="jint8_engine_iterations_total", host="jint8_engine_host_seconds_total",
                 dispatch="jint8_engine_dispatch_seconds_total")
    return {(what, kind): value(name, {"kind": kind}) or 0.0 for what, name in names.items()
            for kind in ("prefill", "decode")}


def _generate_baseline(engine, args) -> dict:
    """jint8.generate on one request of the same shape: the batch-1 inter-token latency to hold the
    engine's to (decode time per token, prefill excluded, as bench_generate measures it)."""
    prompt = np.random.default_rng(0).integers(0, args.model.vocab, size=(1, args.prompt), dtype=np.int32)
    times = bench_generate.time_generate(engine.model, engine.params, prompt, args.new_tokens, repeats=3)
    return dict(generate_prefill_ms=times.prefill_s * 1e3,
                generate_itl_ms=(times.full_s - times.prefill_s) / (args.new_tokens - 1) * 1e3)


def run_variant(args, variant: str) -> list[dict]:
    import jax

    start = time.perf_counter()
    engine, weight_bytes = _engine(args, variant)
    engine.warmup(threads=args.compile_threads)
    compile_s = time.perf_counter() - start
    compiled = engine.compile_count
    engine.start()
    # one untimed request first: a compiled program's first runs pay one-time costs (allocation,
    # the first pass over the weights) that the 1-stream row would otherwise carry
    _run_streams(engine, args, 1)
    device = jax.devices()[0]
    rows = []
    for streams in args.streams:
        row = dict(variant=variant, prompt=args.prompt, new_tokens=args.new_tokens,
                   prefill_batch=engine.prefill_batch, layers=args.model.layers,
                   hidden=args.model.hidden, activations=args.model.activations, device=device.device_kind,
                   platform=device.platform, jax=jax.__version__, date=datetime.date.today().isoformat(),
                   weight_gib=weight_bytes / 2**30, build_and_compile_s=compile_s,
                   **_run_streams(engine, args, streams))
        row["compiled_shapes"] = engine.compile_count
        row["compiled_while_timed"] = engine.compile_count - compiled  # 0: every shape was warmed up
        if streams == 1:  # the bar: batch-1 ITL within 10 % of jint8.generate's
            row.update(_generate_baseline(engine, args))
            row["itl_p50_over_generate"] = row["itl_p50_ms"] / row["generate_itl_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    engine.shutdown()
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| variant | streams | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | "
             "host ms / iteration | of it dispatch | prefill / decode iterations: host ms (dispatch) | "
             "generate ms/token | ITL p50 / generate |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        baseline = (f"{r['generate_itl_ms']:.2f} | {r['itl_p50_over_generate']:.2f}x" if "generate_itl_ms" in r
                    else " | ")
        lines.append(f"| {r['variant']} | {r['streams']} | {r['output_tokens_per_s']:.1f} | {r['ttft_p50_ms']:.1f} | "
                     f"{r['ttft_p99_ms']:.1f} | {r['itl_p50_ms']:.2f} | {r['itl_p99_ms']:.2f} | "
                     f"{r['host_ms_per_iteration']:.2f} | {r['dispatch_ms_per_iteration']:.2f} | "
                     f"{r['host_ms_per_prefill_iteration']:.2f} ({r['dispatch_ms_per_prefill_iteration']:.2f}) / "
                     f"{r['host_ms_per_decode_iteration']:.2f} ({r['dispatch_ms_per_decode_iteration']:.2f}) | "
                     f"{baseline} |")
    by_variant = {r["variant"]: r for r in rows if r["streams"] == 64}
    if {"int8", "bf16"} <= set(by_variant):
        int8, bf16 = by_variant["int8"]["output_tokens_per_s"], by_variant["bf16"]["output_tokens_per_s"]
        lines.append(f"\n64 streams: int8 {int8:.0f} tok/s = {int8 / bf16:.2f}x bf16 ({bf16:.0f}); target >= 3000 and "
                     "above bf16")
    for r in rows:
        if "itl_p50_over_generate" in r:
            lines.append(f"{r['variant']} batch 1: ITL p50 {r['itl_p50_ms']:.2f} ms = "
                         f"{r['itl_p50_over_generate']:.2f}x jint8.generate's {r['generate_itl_ms']:.2f} ms/token "
                         "(target <= 1.10x)")
    compile_s = {r["variant"]: r["build_and_compile_s"] for r in rows}
    lines.append("build + compile before timing: " + ", ".join(f"{v} {t:.0f} s" for v, t in compile_s.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    rows: list[dict] = []
    if args.in_process or len(args.variants) == 1:
        for variant in args.variants:
            rows += run_variant(args, variant)
        if args.json:
            with open(args.json, "a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    else:  # one process per variant: each gets the device memory to itself
        base = list(argv if argv is not None else sys.argv[1:])
        for variant in args.variants:
            child = [sys.executable, os.path.abspath(__file__), *base, "--variants", variant, "--in-process"]
            done = subprocess.run(child, stdout=subprocess.PIPE, text=True)
            rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0:
                print(f"variant {variant} failed with exit status {done.returncode}", file=sys.stderr)
    if rows:
        r = rows[0]
        print(f"\n{r['device']} ({r['platform']}), {r['date']}: {r['layers']} layers, hidden {r['hidden']}, "
              f"prompt {r['prompt']} + {r['new_tokens']} new tokens per request, greedy, {r['activations']} "
              "activations")
        print(_markdown(rows))
        print(f"whole run: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
