"""The `jint8` console script: one entry point, one subcommand per task, one module per subcommand.

    jint8 demo                                   # SmolLM2-135M-Instruct, bf16 vs int8, side by side
    jint8 generate --model PATH_OR_GGUF --prompt "Hello" [--quantize int8|none] ...
    jint8 serve [--model PATH_OR_GGUF] [--port 8000] [--max-batch N]   # OpenAI-compatible HTTP server
    jint8 quantize SRC OUT                       # write an int8 (Orbax) checkpoint
    jint8 eval-ppl [--model ...] [--quantize none|int8|int8-no-outliers]   # perplexity
    jint8 inspect [--model ...] [--prompts FILE]  # outlier features per layer, PNG heat-map
    jint8 calibrate [--model ...] --out cfg.json  # per-layer thresholds (+ skip list) as Int8Config JSON

Each command module defines a `COMMAND` and imports only `jint8.cli.common`; this package registers them,
and other code adds its own through `register_command` without touching the parser. Heavy imports (jax,
transformers) happen inside the commands so `jint8 --help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from jint8.cli import calibrate, demo, eval_ppl, generate, inspect_outliers, quantize, serve
from jint8.cli.common import Command, CommandError

_COMMANDS: dict[str, Command] = {}


def register_command(command: Command) -> None:
    """Add (or replace) a subcommand of the `jint8` script."""
    _COMMANDS[command.name] = command


for _module in (demo, generate, serve, quantize, eval_ppl, inspect_outliers, calibrate):  # the order of `jint8 --help`
    register_command(_module.COMMAND)


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
    parser = argparse.ArgumentParser(
        prog="jint8", description="LLM.int8() inference for JAX: int8 weights and activations with "
        "outlier decomposition.", epilog="Run `jint8 COMMAND --help` for a command's options.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in _COMMANDS.values():
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


__all__ = ["Command", "CommandError", "build_parser", "main", "register_command"]
