"""`jint8 eval-ppl`: sliding-window perplexity of a float or int8 model on texts (jint8.evaluation), and
with --reference f32 the paired comparison against the same checkpoint in float32."""

from __future__ import annotations

import argparse
from pathlib import Path

from jint8.cli.common import Command, CommandError, add_model_arguments, load_model, load_model_and_tokenizer, read_text_file

REFERENCE_CHOICES = ("none", "f32")


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--text", metavar="FILE", action="append",
                        help="UTF-8 text to score; repeat for several texts, each reported on its own "
                             "(default: Python's pydoc_data.topics)")
    parser.add_argument("--max-tokens", type=int, default=4096, metavar="N", help="score the first N tokens (default 4096)")
    parser.add_argument("--max-length", type=int, default=512, metavar="L", help="window length (default 512)")
    parser.add_argument("--stride", type=int, default=256, metavar="S", help="window stride (default 256)")
    parser.add_argument("--reference", choices=REFERENCE_CHOICES, default="none",
                        help="f32: also load the checkpoint unquantized in float32 and report the paired "
                             "perplexity difference and mean KL against it, with per-window standard errors")


def _texts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(name, text) of each --text file, or the default text."""
    from jint8.assets import default_eval_text

    if not args.text:
        return [("pydoc_data.topics", default_eval_text())]
    for name in args.text:
        if not Path(name).is_file():
            raise CommandError(f"--text {name}: no such file")
    return [(name, read_text_file(name, "--text")) for name in args.text]


def _print_comparison(name: str, setting: str, dtype: str, result) -> None:
    print(f"text {name}: {result.num_tokens} tokens in {result.num_windows} windows")
    print(f"  quantized ({setting}, {dtype}): perplexity {result.perplexity.perplexity:.4f} "
          f"± {result.perplexity.stderr:.4f}")
    print(f"  reference (none, float32): perplexity {result.reference.perplexity:.4f} "
          f"± {result.reference.stderr:.4f}")
    print(f"  paired difference {result.percent_diff:+.3f} % ± {result.percent_diff_stderr:.3f} % (per-window s.e.)")
    print(f"  mean KL(reference || quantized) {result.mean_kl:.6f} ± {result.kl_stderr:.6f} nats/token")


def _run_eval(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from jint8.evaluation import compare_to_reference, perplexity

    texts = _texts(args)
    if args.max_length < 2:
        raise CommandError(f"--max-length {args.max_length} must be >= 2")
    if not 0 < args.stride <= args.max_length:
        raise CommandError(f"--stride {args.stride} must be in (0, --max-length {args.max_length}]")
    if args.max_tokens < 2:
        raise CommandError(f"--max-tokens {args.max_tokens} must be >= 2 (one token has nothing to predict it)")
    model, params, tokenizer, path = load_model_and_tokenizer(args)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and args.max_length > context:
        raise CommandError(f"--max-length {args.max_length} exceeds {path.name}'s context of {context} positions")
    if args.reference == "f32":
        ref_model, ref_params = load_model(path, "none", jnp.float32)
    setting = f"{args.quantize} from {Path(args.int8_config).name}" if args.int8_config else args.quantize
    for name, text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: args.max_tokens]
        if len(ids) < 2:
            raise CommandError(f"--text {name}: {len(ids)} token(s); at least 2 are needed")
        if args.reference == "f32":
            result = compare_to_reference(model, params, ref_params, ids, ref_model=ref_model,
                                          max_length=args.max_length, stride=args.stride)
            _print_comparison(name, setting, args.dtype, result)
            continue
        result = perplexity(model, params, ids, max_length=args.max_length, stride=args.stride)
        # one text keeps the line it always printed; several name theirs
        on_text = f" on {name}" if len(texts) > 1 else ""
        print(f"model {path.name} ({setting}, {args.dtype}){on_text}: perplexity {result.perplexity:.4f} "
              f"± {result.stderr:.4f} over {result.num_tokens} tokens in {result.num_windows} windows")
    return 0


COMMAND = Command(
    "eval-ppl", "sliding-window perplexity of a model (float or int8) on texts, optionally paired with float32",
    _eval_arguments, _run_eval,
    description="Perplexity ± standard error (over windows) with a jit-compiled scoring step; --reference f32 "
                "adds the paired difference to the float32 model and the mean KL, with per-window standard errors.",
)
