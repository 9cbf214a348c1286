"""Load time of a Llama-shaped bf16 safetensors checkpoint: transformers against jint8 bf16 and int8.

    python benchmarks/bench_load.py [--dir DIR] [--repeats 3] [--shard-size 300MB] [--bnb]

Writes a random ~0.39B-parameter Llama checkpoint with transformers' own save_pretrained (bf16,
sharded with an index) once, reads every file once so the page cache is warm for every system
alike, then times each system in a fresh subprocess per run and prints the best of --repeats as
a markdown table, two numbers per system:
- call: the from_pretrained call alone. Every process imports torch and transformers (and jax and
  jint8 for jint8) before the clock starts; what a call imports lazily (transformers' modeling
  code, its config classes) is counted, as is jax compilation. jint8's call ends when the weights
  are usable (jax.block_until_ready).
- process: the whole `python -c "import ...; from_pretrained(...)"` run, interpreter start and
  every import included: what a script pays.
--bnb adds transformers + bitsandbytes load_in_8bit (slow on a CPU; off by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# ~0.39B parameters: 24 layers of hidden 1024 / MLP 3584 with GQA (4 KV heads), untied 32k vocab
CONFIG = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16,
              num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
              tie_word_embeddings=False)

_TIMED = {
    "transformers bf16": """
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16)
seconds = time.perf_counter() - t0
""",
    "transformers + bitsandbytes int8": """
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(
    DIR, dtype=torch.bfloat16, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True))
seconds = time.perf_counter() - t0
""",
    "jint8 bf16": """
t0 = time.perf_counter()
model, params = jint8.from_pretrained(DIR, dtype=jnp.bfloat16, progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
""",
    "jint8 int8": """
t0 = time.perf_counter()
model, params = jint8.from_pretrained(DIR, dtype=jnp.bfloat16, quantization=jint8.Int8Config(), progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
""",
}


def write_checkpoint(directory: Path, shard_size: str) -> None:
    """A random bf16 LlamaForCausalLM saved by transformers (safetensors shards + index)."""
    import torch
    import transformers

    if (directory / "config.json").exists():
        return
    config = transformers.LlamaConfig(**CONFIG)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=shard_size)


def warm_page_cache(directory: Path) -> int:
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                total += len(chunk)
    return total


def time_once(directory: Path, system: str) -> tuple[float, float]:
    """(call seconds, process seconds) of one run in a fresh interpreter."""
    imports = "import torch, transformers\n" + ("import jax, jax.numpy as jnp, jint8\n" if "jint8" in system else "")
    code = f"import time\n{imports}DIR = {str(directory)!r}\n" + _TIMED[system] + "print('SECONDS', seconds)\n"
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    process = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{result.stderr[-3000:]}")
    line = next(line for line in result.stdout.splitlines() if line.startswith("SECONDS"))
    return float(line.split()[1]), process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "jint8-bench-load-0.4b")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shard-size", default="300MB")
    parser.add_argument("--bnb", action="store_true", help="also time transformers + bitsandbytes 8-bit")
    parser.add_argument("--systems", nargs="*", default=None, help=f"a subset of {list(_TIMED)}")
    args = parser.parse_args()

    t0 = time.perf_counter()
    write_checkpoint(args.dir, args.shard_size)
    files = sorted(args.dir.glob("*.safetensors"))
    size = warm_page_cache(args.dir)
    params = json.loads((args.dir / "model.safetensors.index.json").read_text())["metadata"].get("total_parameters")
    print(f"checkpoint {args.dir}: {len(files)} shards, {size / 1e9:.2f} GB bf16"
          + (f", {int(params) / 1e9:.2f} B parameters" if params else "")
          + f" (ready in {time.perf_counter() - t0:.0f} s)")
    systems = args.systems or [s for s in _TIMED if args.bnb or "bitsandbytes" not in s]
    best = {}
    for system in systems:
        runs = [time_once(args.dir, system) for _ in range(args.repeats)]
        best[system] = (min(call for call, _ in runs), min(process for _, process in runs))
        print(f"{system}: call " + ", ".join(f"{c:.2f}" for c, _ in runs) + " s; process "
              + ", ".join(f"{p:.2f}" for _, p in runs) + " s", file=sys.stderr)
    reference = best.get("transformers bf16")
    print(f"\n| system (best of {args.repeats}, a fresh process each) | call | vs transformers bf16 | process "
          "| vs transformers bf16 |")
    print("|---|---|---|---|---|")
    for system, (call, process) in best.items():
        ratios = (f"{call / reference[0]:.2f}x", f"{process / reference[1]:.2f}x") if reference else ("-", "-")
        print(f"| {system} | {call:.2f} s | {ratios[0]} | {process:.2f} s | {ratios[1]} |")


if __name__ == "__main__":
    main()
