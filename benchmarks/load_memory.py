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

CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5)


def write_checkpoint(directory: Path, shard_size: str) -> None:
    """Random bf16 weights with the shapes transformers' LlamaForCausalLM would save, written shard by shard."""
    import ml_dtypes
    import numpy as np
    import transformers
    from safetensors.numpy import save_file

    if (directory / "config.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(**CONFIG)
    d, f = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,),
              "lm_head.weight": (config.vocab_size, d)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    limit = int(float(shard_size.rstrip("GB")) * 1e9)
    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for name, shape in shapes.items():
        current[name] = shape
        size += 2 * int(np.prod(shape))
        if size >= limit:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for index, shard in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard.items():
            values = np.ones(shape, np.float32) if len(shape) == 1 else rng.standard_normal(shape, np.float32) * 0.02
            tensors[name] = values.astype(ml_dtypes.bfloat16)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        del tensors
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)


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
    write_checkpoint(directory, args.shard_size)
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
