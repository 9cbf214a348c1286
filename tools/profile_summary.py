"""Summarise jax.profiler traces (perfetto_trace.json.gz) by GPU kernel: where decode time goes.

    python3 tools/profile_summary.py DIR [--tokens N] [--top 30] [--sequence N --skip I]

Reads every perfetto_trace.json.gz under DIR; per trace, sums the duration of the complete events
on GPU streams (processes whose name mentions a GPU, not the host) by kernel name, and prints the
largest groups with their share, call count and time per generated token (--tokens).
--sequence N also prints N kernels in launch order from --skip on, each with its duration and
the idle gap before it: one layer's chain of kernels, and where the GPU waits.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re


def gpu_kernel_events(path: pathlib.Path) -> list[tuple[float, float, str]]:
    """(start us, duration us, name) of every kernel on the trace's GPU streams, in start order."""
    events = json.loads(gzip.open(path).read())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu = {pid for pid, name in names.items() if re.search(r"gpu|GPU|stream", name) and "host" not in name.lower()}
    # Device processes also carry derived "XLA Ops"/"XLA Modules" lines over the same time: keep
    # the stream lines (the kernels themselves) when the trace names its threads.
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in gpu}
    streams = {key for key, name in threads.items() if "stream" in name.lower()}
    kernels = []
    for e in events:
        if e.get("ph") != "X" or e.get("pid") not in gpu or "dur" not in e:
            continue
        if streams and (e["pid"], e.get("tid")) not in streams:
            continue
        name = re.sub(r"[._]\d+$", "", str(e.get("name", "?")))
        kernels.append((float(e["ts"]), float(e["dur"]), name))
    return sorted(kernels)


def gpu_kernel_times(path: pathlib.Path) -> tuple[collections.Counter, collections.Counter, float]:
    return kernel_times(gpu_kernel_events(path))


def kernel_times(kernels) -> tuple[collections.Counter, collections.Counter, float]:
    """Total duration and count per kernel name, and the span from first start to last end."""
    total, count = collections.Counter(), collections.Counter()
    first, last = float("inf"), 0.0
    for start, duration, name in kernels:
        total[name] += duration
        count[name] += 1
        first, last = min(first, start), max(last, start + duration)
    return total, count, (last - first if last > first else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated in the traced call")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--sequence", type=int, default=0, metavar="N",
                        help="also print N kernels in launch order, with the idle gap before each")
    parser.add_argument("--skip", type=int, default=0, help="--sequence: start at this kernel")
    args = parser.parse_args(argv)
    for path in sorted(pathlib.Path(args.directory).rglob("*perfetto_trace.json.gz")):
        kernels = gpu_kernel_events(path)  # the trace is parsed once for both tables
        total, count, span = kernel_times(kernels)
        busy = sum(total.values())
        print(f"\n{path}: GPU busy {busy / 1e3:.2f} ms over a {span / 1e3:.2f} ms span, {sum(count.values())} kernels, "
              f"{busy / 1e3 / args.tokens:.3f} ms busy per token")
        print("| kernel | total ms | share | calls | us per call | ms per token |")
        print("|---|---|---|---|---|---|")
        for name, micros in total.most_common(args.top):
            print(f"| {name[:70]} | {micros / 1e3:.2f} | {micros / busy:.1%} | {count[name]} | "
                  f"{micros / count[name]:.1f} | {micros / 1e3 / args.tokens:.3f} |")
        if args.sequence:
            print(f"\nkernels {args.skip}..{args.skip + args.sequence} in launch order:")
            print("| # | gap before us | us | kernel |")
            print("|---|---|---|---|")
            for i in range(args.skip, min(len(kernels), args.skip + args.sequence)):
                start, duration, name = kernels[i]
                gap = start - (kernels[i - 1][0] + kernels[i - 1][1]) if i else 0.0
                print(f"| {i} | {gap:.1f} | {duration:.1f} | {name[:90]} |")


if __name__ == "__main__":
    main()
