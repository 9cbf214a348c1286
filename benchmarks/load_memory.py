"""Peak host memory of jint8.from_pretrained on a ~1B-parameter random Llama safetensors checkpoint.

    python benchmarks/load_memory.py [--dir /tmp/jint8-1b] [--dtype bfloat16] [--shard-size 1GB]

Writes the checkpoint once (TinyLlama-1.1B shapes, random bf16, sharded), then loads it in a fresh
subprocess per mode (float bf16, int8) and reports that process's peak RSS (ru_maxrss), its RSS
after imports, the bytes of the placed parameters and the largest shard / tensor. On a CPU-only
machine the "device" is host memory too, so peak - baseline - placed is the loader's own overhead
(the issue's target: about one shard + one tensor at most).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from random_checkpoint import write_checkpoint  # noqa: E402

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)


def measure(directory: Path, quantize: bool, dtype: str) -> dict:
    """Run in a subprocess: load, report RSS figures as JSON."""
    code = f"""
import json, resource, sys
import jax, jax.numpy as jnp
import jint8
def rss():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmRSS'))
baseline = rss()
t0 = __import__('time').perf_counter()
model, params = jint8.from_pretrained({str(directory)!r}, dtype=jnp.{dtype},
    quantization=jint8.Int8Config() if {quantize} else None, progress=False)
jax.block_until_ready(params)
seconds = __import__('time').perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
after = rss()
import ctypes, gc; gc.collect(); ctypes.CDLL('libc.so.6').malloc_trim(0)  # what the allocator merely kept
print(json.dumps(dict(baseline=baseline, peak=peak, after=after, trimmed=rss(), placed=jint8.param_bytes(params),
                      seconds=seconds)))
"""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/jint8-1b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shard-size", default="1GB")
    args = parser.parse_args()
    directory = Path(args.dir)
    t0 = time.perf_counter()
    if not (directory / "config.json").exists():
        write_checkpoint(directory, CONFIG, float(args.shard_size.rstrip("GB")) * 1e9)
    files = sorted(directory.glob("*.safetensors"))
    print(f"checkpoint: {directory} ({len(files)} shards, {sum(f.stat().st_size for f in files) / 2**30:.2f} GiB, "
          f"largest shard {max(f.stat().st_size for f in files) / 2**30:.2f} GiB; written in {time.perf_counter() - t0:.0f} s)")
    largest_tensor = 2 * CONFIG["vocab_size"] * CONFIG["hidden_size"]
    print(f"largest tensor: {largest_tensor / 2**20:.0f} MiB bf16 ({2 * largest_tensor / 2**20:.0f} MiB as float32)")
    gib = 2**30
    for quantize in (False, True):
        r = measure(directory, quantize, args.dtype)
        overhead = r["peak"] - r["baseline"] - r["placed"]
        print(f"{'int8' if quantize else args.dtype:>9}: peak RSS {r['peak'] / gib:.2f} GiB, baseline {r['baseline'] / gib:.2f}, "
              f"placed params {r['placed'] / gib:.2f}, loader overhead {overhead / gib:.2f} GiB, "
              f"RSS after {r['after'] / gib:.2f} ({r['trimmed'] / gib:.2f} after malloc_trim), {r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
