"""`jint8 eval-ppl`: sliding-window perplexity of a float or int8 model on a text (jint8.evaluation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jint8.cli.common import Command, CommandError, add_model_arguments, load_model_and_tokenizer, read_text_file


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: Python's pydoc_data.topics)")
    parser.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="score the first N tokens (default 4096)")
    parser.add_argument("--max-length", type=int, default=512, metavar="L", help="window length (default 512)")
    parser.add_argument("--stride", type=int, default=256, metavar="S", help="window stride (default 256)")


def _run_eval(args: argparse.Namespace) -> int:
    from jint8.assets import default_eval_text
    from jint8.evaluation import perplexity

    if args.text and not Path(args.text).is_file():
        raise CommandError(f"--text {args.text}: no such file")
    text = read_text_file(args.text, "--text") if args.text else default_eval_text()
    if args.max_length < 2:
        raise CommandError(f"--max-length {args.max_length} must be >= 2")
    model, params, tokenizer, path = load_model_and_tokenizer(args)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.max_length > context:
        raise CommandError(f"--max-length {args.max_length} exceeds {path.name}'s context of {context} positions")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
    result = perplexity(model, params, ids, max_length=args.max_length, stride=args.stride)
    setting = f"{args.quantize} from {Path(args.int8_config).name}" if args.int8_config else args.quantize
    print(f"model {path.name} ({setting}, {args.dtype}): perplexity {result.perplexity:.4f} "
          f"± {result.stderr:.4f} over {result.num_tokens} tokens in {result.num_windows} windows")
    return 0


COMMAND = Command(
    "eval-ppl", "sliding-window perplexity of a model (float or int8) on a text",
    _eval_arguments, _run_eval,
    description="Perplexity ± standard error (over windows) with a jit-compiled scoring step.",
)
