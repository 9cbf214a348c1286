"""Load time of a Llama-shaped bf16 safetensors checkpoint: transformers against jint8 bf16, int8
and the restore of a saved jint8 int8 checkpoint.

    python benchmarks/bench_load.py --preset llama3-8b --device cuda   # one GPU, ~15 GiB, ~4 min
    python benchmarks/bench_load.py                                    # CPU, 0.39 B (RESULTS.md)
    python benchmarks/bench_load.py --preset tiny --repeats 1          # a quick check of the script
    python benchmarks/bench_load.py --preset llama3-8b --device cuda --systems 'jint8 int8' --profile

Writes a random bf16 Llama checkpoint (safetensors shards + index; numpy random values tiled from
one block, written by safetensors: seconds, where transformers' init takes minutes for 8B), saves
the int8 tree of it once with jint8.save_quantized, reads every file once so the page cache is
warm for every system alike, then times each system in a fresh subprocess per run and prints the
best of --repeats as a markdown table:
- call: the load call alone. Every process imports torch and transformers (and jax and jint8 for
  jint8) before the clock starts; what a call imports lazily (transformers' modeling code, its
  config classes) is counted, as is jax compilation. A call ends when the weights are usable
  (torch.cuda.synchronize / jax.block_until_ready).
- GB/s: the bytes read (the bf16 files, or the int8 checkpoint's) over the call.
- process: the whole `python -c "import ...; load(...)"` run, interpreter start and imports included.
- peak device memory: torch.cuda.max_memory_allocated / jax's peak_bytes_in_use (GPU only).
Systems: transformers from_pretrained(dtype=bfloat16[, device_map="cuda"]); jint8 bf16; jint8 int8
(Int8Config(skip_modules=("lm_head",))); jint8 restore of the saved int8 checkpoint
(from_pretrained of its directory, CRC-32C checked, and again with verify_checksums=False);
--bnb adds transformers + bitsandbytes load_in_8bit. What this run wrote is deleted at the end
unless --keep (the 8B preset needs ~24 GiB of disk: 15 GiB bf16 + 8 GiB int8).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from random_checkpoint import checkpoint_bytes, write_checkpoint  # noqa: E402

PRESETS = {
    # Llama-3-8B: 8.03 B parameters, 14.96 GiB bf16
    "llama3-8b": dict(shards=4, config=dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False)),
    # the CPU row of RESULTS.md: 0.39 B parameters, 24 layers of hidden 1024 / MLP 3584, GQA, 32k vocab
    "0.4b": dict(shards=3, config=dict(
        hidden_size=1024, intermediate_size=3584, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
    # seconds on a CPU: checks the script, measures nothing
    "tiny": dict(shards=2, config=dict(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False)),
}
INT8_CONFIG = 'jint8.Int8Config(skip_modules=("lm_head",))'

_TORCH_SYNC = "torch.cuda.synchronize() if torch.cuda.is_available() else None\n"
_TORCH_PEAK = "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None\n"
_JAX_PEAK = "peak = (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use')\n"
_TIMED = {
    "transformers bf16": ("bf16", """
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.bfloat16, **DEVICE_MAP)
""" + _TORCH_SYNC + "seconds = time.perf_counter() - t0\n" + _TORCH_PEAK),
    "transformers + bitsandbytes int8": ("bf16", """
t0 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(
    DIR, dtype=torch.bfloat16, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), **DEVICE_MAP)
""" + _TORCH_SYNC + "seconds = time.perf_counter() - t0\n" + _TORCH_PEAK),
    "jint8 bf16": ("bf16", """
t0 = time.perf_counter()
model, params = jint8.from_pretrained(DIR, dtype=jnp.bfloat16, progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
""" + _JAX_PEAK),
    "jint8 int8": ("bf16", f"""
t0 = time.perf_counter()
model, params = jint8.from_pretrained(DIR, dtype=jnp.bfloat16, quantization={INT8_CONFIG}, progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
""" + _JAX_PEAK),
    "jint8 int8 restore (save_quantized checkpoint)": ("int8", """
t0 = time.perf_counter()
model, params = jint8.from_pretrained(CKPT, progress=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
""" + _JAX_PEAK),
    "jint8 int8 restore, verify_checksums=False": ("int8", """
t0 = time.perf_counter()
model, params = jint8.from_pretrained(CKPT, progress=False, verify_checksums=False)
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
""" + _JAX_PEAK),
}

_SAVE_INT8 = f"""
model, params = jint8.from_pretrained(DIR, dtype=jnp.bfloat16, quantization={INT8_CONFIG}, progress=False)
jint8.save_quantized(CKPT, params, quant_config={INT8_CONFIG}, model_config=model.config)
"""


def warm_page_cache(directory: Path) -> int:
    """Read every file under directory once; returns the bytes read."""
    total = 0
    for file in sorted(p for p in directory.rglob("*") if p.is_file()):
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                total += len(chunk)
    return total


def _environment(device: str) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu" if device == "cpu" else env.get("JAX_PLATFORMS", "cuda")
    return env


def _run(code: str, device: str, what: str, env: dict | None = None) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**_environment(device), **(env or {})})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-3000:]}")
    if env:  # profiled: jax's compile log is on stderr
        compiles = [line for line in result.stderr.splitlines() if "Finished XLA compilation" in line]
        print(f"{what}: {len(compiles)} XLA compilations:\n  " + "\n  ".join(c[-160:] for c in compiles),
              file=sys.stderr, flush=True)
        for line in result.stderr.splitlines():
            if "loading pipeline" in line:
                print(f"{what}: {line}", file=sys.stderr, flush=True)
    return result.stdout, seconds


def _prelude(system: str, directory: Path, checkpoint: Path, device: str) -> str:
    imports = "import torch, transformers\n"
    if "jint8" in system:
        imports += "import jax, jax.numpy as jnp, jint8\n"
    device_map = "dict(device_map='cuda')" if device == "cuda" else "dict()"
    return (f"import time\n{imports}DIR = {str(directory)!r}\nCKPT = {str(checkpoint)!r}\n"
            f"DEVICE_MAP = {device_map}\n")


_PROFILED = """
import cProfile, io, logging, pstats
logging.basicConfig(level=logging.WARNING)
logging.getLogger("jint8").setLevel(logging.DEBUG)  # the loading pipeline's waits and busy times
_profile = cProfile.Profile()
_profile.enable()
{timed}
_profile.disable()
_text = io.StringIO()
pstats.Stats(_profile, stream=_text).sort_stats("cumulative").print_stats(40)
pstats.Stats(_profile, stream=_text).sort_stats("tottime").print_stats(25)
print(_text.getvalue())
"""


def time_once(directory: Path, checkpoint: Path, system: str, device: str,
              profile: bool = False) -> tuple[float, float, int | None]:
    """(call seconds, process seconds, peak device bytes or None) of one run in a fresh interpreter;
    profile: the call under cProfile (its 40 largest cumulative and 25 largest own-time entries, jax's
    compile log and the loading pipeline's waits and busy times are printed; the times then include
    the profiler's overhead). On Python 3.12+ cProfile records every thread (sys.monitoring), so
    the reader and compiler threads' time is added into the totals: read the pipeline line instead."""
    timed = _PROFILED.format(timed=_TIMED[system][1]) if profile else _TIMED[system][1]
    code = _prelude(system, directory, checkpoint, device) + timed + "print('RESULT', seconds, peak)\n"
    stdout, process = _run(code, device, system, env={"JAX_LOG_COMPILES": "1"} if profile else None)
    if profile:
        print(stdout.split("RESULT")[0], file=sys.stderr, flush=True)
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT"))
    _, seconds, peak = line.split()
    return float(seconds), process, None if peak == "None" else int(peak)


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="0.4b")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: transformers loads with device_map='cuda', jax runs on its CUDA backend")
    parser.add_argument("--dir", type=Path, default=None, help="where the checkpoints go (default: a new temp dir)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per system (default 1 for llama3-8b, else 3)")
    parser.add_argument("--bnb", action="store_true", help="also time transformers + bitsandbytes 8-bit")
    parser.add_argument("--systems", nargs="*", default=None, help=f"a subset of {list(_TIMED)}")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (reused by a later run with --dir)")
    parser.add_argument("--profile", action="store_true",
                        help="run each system under cProfile and print where its call spends its time (and "
                             "jax's compilations); the times then include the profiler's overhead")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    repeats = args.repeats or (1 if args.preset == "llama3-8b" else 3)
    systems = args.systems or [s for s in _TIMED if args.bnb or "bitsandbytes" not in s]
    unknown = [s for s in systems if s not in _TIMED]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(_TIMED)}")

    root = args.dir or Path(tempfile.mkdtemp(prefix="jint8-bench-load-"))
    directory, checkpoint = root / f"{args.preset}-bf16", root / f"{args.preset}-int8"
    wrote = []
    try:
        t0 = time.perf_counter()
        if not (directory / "config.json").exists():
            write_checkpoint(directory, preset["config"], checkpoint_bytes(preset["config"]) / preset["shards"])
            wrote.append(directory)
        written = time.perf_counter() - t0
        if any(_TIMED[s][0] == "int8" for s in systems) and not checkpoint.exists():
            _run(_prelude("jint8", directory, checkpoint, args.device) + _SAVE_INT8, args.device, "save_quantized")
            wrote.append(checkpoint)
        saved = time.perf_counter() - t0 - written
        sizes = {"bf16": warm_page_cache(directory), "int8": warm_page_cache(checkpoint) if checkpoint.exists() else 0}
        print(f"checkpoint {directory}: {preset['shards']} shards, {sizes['bf16'] / 2**30:.2f} GiB bf16 "
              f"(written in {written:.0f} s); int8 checkpoint {sizes['int8'] / 2**30:.2f} GiB (saved in {saved:.0f} s); "
              f"device {args.device}", flush=True)
        best = {}
        for system in systems:
            runs = [time_once(directory, checkpoint, system, args.device, args.profile) for _ in range(repeats)]
            best[system] = min(runs)
            print(f"{system}: call " + ", ".join(f"{c:.2f}" for c, _, _ in runs) + " s; process "
                  + ", ".join(f"{p:.2f}" for _, p, _ in runs) + " s", file=sys.stderr, flush=True)
    finally:
        if not args.keep:
            for path in wrote:
                shutil.rmtree(path, ignore_errors=True)
            if args.dir is None:
                shutil.rmtree(root, ignore_errors=True)
    reference = best.get("transformers bf16")
    print(f"\n{args.preset}, {args.device}, best of {repeats} (a fresh process each):\n")
    print("| system | call | GB/s | vs transformers bf16 | process | peak device memory |")
    print("|---|---|---|---|---|---|")
    for system, (call, process, peak) in best.items():
        ratio = f"{call / reference[0]:.2f}x" if reference else "-"
        rate = sizes[_TIMED[system][0]] / call / 1e9
        print(f"| {system} | {call:.2f} s | {rate:.3g} | {ratio} | {process:.2f} s | {_gib(peak)} |")


if __name__ == "__main__":
    main()
