"""`jint8 quantize SRC OUT`: write an int8 or 4-bit (Orbax) checkpoint."""

from __future__ import annotations

import argparse
import dataclasses

from jint8.cli.common import Command, CommandError, int8_config_from_args

QUANTIZE_CHOICES = ("int8", "int8-auto", "nf4", "fp4")


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a transformers checkpoint directory or a .gguf file")
    parser.add_argument("out", help="directory of the quantized checkpoint to write")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="int8: LLM.int8() (bitsandbytes' numerics); int8-auto: per-layer settings calibrated "
                             "while loading, stored so the checkpoint reloads without recalibrating; nf4 / fp4: "
                             "4-bit (the same as --bits 4 --quant-type T). Default: from --bits")
    parser.add_argument("--bits", type=int, choices=(8, 4), default=None,
                        help="8: LLM.int8() (default); 4: bitsandbytes' NF4/FP4 with double quantization")
    parser.add_argument("--quant-type", choices=("nf4", "fp4"), default="nf4", help="4-bit code book (default nf4)")
    parser.add_argument("--threshold", type=float, default=6.0, help="int8 outlier threshold (default 6.0)")
    parser.add_argument("--skip-modules", nargs="*", default=(), metavar="PATTERN",
                        help="module paths kept in floating point (e.g. lm_head)")
    parser.add_argument("--quantize-embeddings", action="store_true",
                        help="embedding tables too (bitsandbytes keeps them 16-bit): int8 with one scale per token "
                             "row, or with --bits 4 as bitsandbytes' Embedding4bit stores them (a table tied to the "
                             "output head stays 16-bit while lm_head is skipped)")
    parser.add_argument("--int8-config", metavar="FILE",
                        help="Int8Config JSON (from `jint8 calibrate`); replaces --threshold and --skip-modules")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _resolve_quantize(args: argparse.Namespace) -> None:
    """--quantize and --bits / --quant-type name the same choice: fill in one from the other, or refuse
    a contradiction."""
    if args.quantize is None:
        args.bits = args.bits or 8
        args.quantize = "int8" if args.bits == 8 else args.quant_type
        return
    bits = 4 if args.quantize in ("nf4", "fp4") else 8
    if args.bits is not None and args.bits != bits:
        raise CommandError(f"--quantize {args.quantize} is {bits}-bit, but --bits {args.bits} was given")
    args.bits = bits
    if bits == 4:
        args.quant_type = args.quantize


def _run_quantize(args: argparse.Namespace) -> int:
    import jint8

    try:
        from jint8.checkpoint import quantize_checkpoint
    except ImportError:
        raise CommandError("this build of jint8 cannot write quantized checkpoints yet "
                           "(jint8.checkpoint.quantize_checkpoint is missing)") from None
    _resolve_quantize(args)
    if args.bits == 4:
        if args.int8_config:
            raise CommandError("--int8-config is an int8 option; not with --bits 4")
        skip = {"skip_modules": tuple(args.skip_modules)} if args.skip_modules else {}  # default: lm_head
        config = jint8.Int4Config(quant_type=args.quant_type, quantize_embeddings=args.quantize_embeddings, **skip)
        out = quantize_checkpoint(args.src, args.out, quant_config=config, progress=True, overwrite=args.overwrite)
        print(f"wrote {out}")
        return 0
    if args.quantize == "int8-auto":
        if args.int8_config:
            raise CommandError("--int8-config needs --quantize int8, got --quantize int8-auto")
        config = jint8.Int8Config(mode="auto", skip_modules=tuple(args.skip_modules))
    else:
        config = int8_config_from_args(args) or jint8.Int8Config(threshold=args.threshold,
                                                                 skip_modules=tuple(args.skip_modules))
    if args.quantize_embeddings:
        config = dataclasses.replace(config, quantize_embeddings=True)
    out = quantize_checkpoint(args.src, args.out, quant_config=config, progress=True, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


COMMAND = Command(
    "quantize", "write an int8 or 4-bit checkpoint (Orbax) from a checkpoint or GGUF file", _quantize_arguments,
    _run_quantize, "Load SRC with LLM.int8() (or --bits 4: NF4/FP4) quantization and save the quantized "
                   "parameters to OUT.")
