"""`jint8 inspect`: which input features of the int8 layers reach the outlier threshold, as a table and a
PNG heat-map (jint8.evaluation). Not named inspect.py: run as a script, that would shadow the stdlib module."""

from __future__ import annotations

import argparse
from pathlib import Path

from jint8.cli.common import (
    DEMO_PROMPTS,
    Command,
    CommandError,
    add_model_arguments,
    check_output_file,
    load_model_and_tokenizer,
    read_text_file,
)


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompts", metavar="FILE", help="one prompt per line (default: four built-in prompts)")
    parser.add_argument("--png", default="outliers.png", metavar="FILE", help="heat-map output (default outliers.png)")


def _run_inspect(args: argparse.Namespace) -> int:
    from jint8.evaluation import format_outlier_table, inspect_outliers, plot_outlier_heatmap

    if args.prompts and not Path(args.prompts).is_file():
        raise CommandError(f"--prompts {args.prompts}: no such file")
    check_output_file(args.png, "--png")
    prompts = ([line for line in read_text_file(args.prompts, "--prompts").splitlines() if line.strip()]
               if args.prompts else list(DEMO_PROMPTS))
    threshold = args.threshold if args.threshold > 0 else 6.0
    model, params, tokenizer, path = load_model_and_tokenizer(args)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    layers = inspect_outliers(model, params, ids, threshold=threshold)
    print(format_outlier_table(layers))
    plot_outlier_heatmap(layers, args.png, title=f"{path.name}: max |x| per input feature, {len(prompts)} prompts")
    print(f"wrote {args.png}")
    return 0


COMMAND = Command(
    "inspect", "per-layer outlier features of the int8 layers' inputs, as a table and a PNG heat-map",
    _inspect_arguments, _run_inspect,
    description="Which input features reach the LLM.int8() threshold on a few prompts, per projection.",
)
