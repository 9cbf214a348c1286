"""On-disk size of a jint8 quantized checkpoint vs the same model as bf16 safetensors.

A random ~1B-parameter Linen tree (default: 16 layers x 4 Dense kernels of 4096x4096, plus a
bf16 norm scale per layer) is written twice: as bf16 safetensors (what a transformers
checkpoint of it would be) and, quantized, with jint8.save_quantized. Issue 5's bar: the
jint8 checkpoint <= 0.52x the bf16 safetensors. Also times save and load.

    python benchmarks/checkpoint_size.py [--layers 16] [--hidden 4096] [--keep DIR]

Not part of the test suite (about a minute on a 2-core CPU machine; ~4 GiB of RAM and disk).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import tempfile
import time

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

import jint8

KERNELS = ("q_proj", "k_proj", "v_proj", "o_proj")


def directory_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def build_trees(layers: int, hidden: int, config: jint8.Int8Config, seed: int = 0):
    """(bf16 safetensors dict, quantized Linen params): one kernel at a time, never the whole float32 model."""
    rng = np.random.default_rng(seed)
    flat_bf16, params = {}, {}
    for layer in range(layers):
        block = params.setdefault(f"layer_{layer}", {})
        for name in KERNELS:
            kernel = rng.standard_normal((hidden, hidden), dtype=np.float32) * hidden**-0.5
            kernel_bf16 = kernel.astype(ml_dtypes.bfloat16)
            # Both checkpoints hold the same weights: quantize the bf16 values.
            flat_bf16[f"layer_{layer}.{name}.kernel"] = kernel_bf16
            block[name] = jint8.quantize_params({"kernel": jax.numpy.asarray(kernel_bf16)}, config)
        norm = (1.0 + 0.1 * rng.standard_normal(hidden, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        flat_bf16[f"layer_{layer}.norm.scale"] = norm
        block["norm"] = {"scale": jax.numpy.asarray(norm)}
    return flat_bf16, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="write here and keep the files")
    args = parser.parse_args()

    config = jint8.Int8Config()
    workdir = args.keep or pathlib.Path(tempfile.mkdtemp(prefix="jint8-ckpt-size-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        flat_bf16, params = build_trees(args.layers, args.hidden, config)
        n_params = sum(a.size for a in flat_bf16.values())
        build_s = time.perf_counter() - start

        safetensors_path = workdir / "model.safetensors"
        save_file(flat_bf16, str(safetensors_path))
        del flat_bf16

        start = time.perf_counter()
        jint8.save_quantized(workdir / "int8", params, quant_config=config, overwrite=True)
        save_s = time.perf_counter() - start

        start = time.perf_counter()
        restored, _ = jint8.load_quantized(workdir / "int8")
        jax.block_until_ready(restored)
        load_s = time.perf_counter() - start
        pairs = zip(jax.tree.leaves(restored), jax.tree.leaves(params))
        exact = all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in pairs)

        bf16_bytes, int8_bytes = directory_bytes(safetensors_path), directory_bytes(workdir / "int8")
        result = {
            "params": int(n_params),
            "layers": args.layers,
            "hidden": args.hidden,
            "bf16_safetensors_bytes": bf16_bytes,
            "jint8_checkpoint_bytes": int8_bytes,
            "in_memory_quantized_bytes": jint8.param_bytes(params),
            "ratio": round(int8_bytes / bf16_bytes, 4),
            "target_ratio": 0.52,
            "bit_exact_reload": exact,
            "build_quantize_s": round(build_s, 1),
            "save_s": round(save_s, 1),
            "load_s": round(load_s, 1),
            "jax": jax.__version__,
        }
        print(json.dumps(result, indent=1))
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
