"""What verifying a jint8 checkpoint's per-array CRC-32C costs at load time, on SmolLM2-135M.

The bundled SmolLM2-135M-Instruct GGUF is quantized once with `quantize_checkpoint` (default
Int8Config) into --dir; then `jint8.from_pretrained(dir)` and `load_quantized(dir)` are timed
with verify_checksums on and off, alternating, --repeats times each (a warm-up first, so file
pages are cached for both). Reports medians and the verification's share of the load.

    python benchmarks/checksum_cost.py [--dir /tmp/jint8-smollm2-int8] [--repeats 7]

Not part of the test suite (about a minute on a 2-core CPU machine).
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import tempfile
import time

import jax

import jint8
from jint8.assets import smollm2_gguf_path
from jint8.checkpoint import is_jint8_checkpoint, quantize_checkpoint, restore
from jint8.checkpoint.integrity import array_checksum


def timed(load, verify: bool) -> tuple[float, object]:
    start = time.perf_counter()
    params = load(verify)
    jax.block_until_ready(params)
    return time.perf_counter() - start, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "jint8-smollm2-int8")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if not is_jint8_checkpoint(args.dir):
        quantize_checkpoint(smollm2_gguf_path(), args.dir, progress=False, overwrite=True)
    nbytes = sum(f.stat().st_size for f in (args.dir / "arrays").rglob("*") if f.is_file())

    loads = {
        "from_pretrained": lambda verify: jint8.from_pretrained(args.dir, verify_checksums=verify)[1],
        "load_quantized": lambda verify: jint8.load_quantized(args.dir, verify_checksums=verify)[0],
    }
    print(f"{args.dir}: {nbytes / 2**20:.1f} MiB of arrays, {jax.devices()[0].platform}")
    for name, load in loads.items():
        timed(load, True)  # warm-up: page cache, imports, compiles
        times = {True: [], False: []}
        for _ in range(args.repeats):
            for verify in (False, True):
                seconds, params = timed(load, verify)
                times[verify].append(seconds)
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"{name:>15}: verify on {on:.3f} s, off {off:.3f} s (medians of {args.repeats}); "
              f"verification {on - off:+.3f} s = {100 * (on - off) / off:+.1f} % of the unverified load")
    # the verification step itself, timed inside loads (the A/B difference above carries the
    # noise of a shared machine)
    spent, verify = [], restore.verify_checksums

    def timed_verify(*args):
        start = time.perf_counter()
        verify(*args)
        spent.append(time.perf_counter() - start)

    restore.verify_checksums = timed_verify
    loads_s = [timed(loads["load_quantized"], True)[0] for _ in range(args.repeats)]
    restore.verify_checksums = verify
    share = statistics.median(spent) / (statistics.median(loads_s) - statistics.median(spent))
    print(f"verify_checksums inside load_quantized: median {statistics.median(spent):.3f} s of a "
          f"{statistics.median(loads_s):.3f} s load = {100 * share:.1f} % of the unverified load")
    leaves = jax.tree.leaves(params)
    start = time.perf_counter()
    for leaf in leaves:
        array_checksum(leaf)
    seconds = time.perf_counter() - start
    total = sum(leaf.nbytes for leaf in leaves)
    print(f"checksums alone: {seconds:.3f} s over {total / 2**20:.1f} MiB ({total / seconds / 2**30:.2f} GiB/s, "
          "device_get included)")


if __name__ == "__main__":
    main()
