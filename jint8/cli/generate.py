"""`jint8 generate`: text from a checkpoint or GGUF file, streamed for one prompt, batched for several;
an encoder-decoder checkpoint (T5) takes the prompt as its encoder input."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from jint8.cli.common import (
    DTYPE_CHOICES,
    Command,
    chat_inputs,
    compute_dtype,
    eos_ids,
    int8_config_from_args,
    load_model,
    tokenizer_for,
)


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


def _generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_GGUF",
                        help="a transformers checkpoint directory (safetensors / Flax msgpack) or a .gguf file")
    parser.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                        help="a prompt; repeat the flag to generate for several prompts as one batch")
    parser.add_argument("--quantize", choices=("int8", "int8-auto", "nf4", "fp4", "none"), default="int8",
                        help="quantization while loading: LLM.int8() (bitsandbytes' numerics), int8-auto "
                             "(LLM.int8() with per-layer settings calibrated at load), or bitsandbytes 4-bit "
                             "nf4 / fp4 (default int8)")
    parser.add_argument("--threshold", type=float, default=6.0, help="int8 outlier threshold (default 6.0)")
    parser.add_argument("--int8-config", metavar="FILE",
                        help="Int8Config JSON (from `jint8 calibrate`); replaces --threshold")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="bfloat16",
                        help="compute dtype (default bfloat16)")
    parser.add_argument("--no-chat", dest="chat", action="store_false",
                        help="feed the prompt as raw text instead of through the tokenizer's chat template")
    _add_sampling_arguments(parser)


def _run_generate(args: argparse.Namespace) -> int:
    import jint8

    config = jint8.GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, prompt_lookup_num_tokens=args.prompt_lookup,
        num_assistant_tokens=args.assistant_tokens)  # validates before the slow load
    int8_config = int8_config_from_args(args)
    tokenizer = tokenizer_for(args.model)
    model, params = load_model(args.model, args.quantize, compute_dtype(args.dtype), args.threshold,
                               int8_config=int8_config, fuse=True)
    assistant = {}
    if args.assistant:
        assistant_model, assistant_params = load_model(args.assistant, args.quantize, compute_dtype(args.dtype),
                                                       args.threshold, fuse=True)
        assistant = dict(assistant_model=assistant_model, assistant_params=assistant_params)
    config = dataclasses.replace(config, eos_token_id=eos_ids(tokenizer))
    encoder_decoder = getattr(model, "IS_ENCODER_DECODER", False)
    if encoder_decoder:
        # T5: the prompt is the encoder's input, with the tokenizer's own special tokens (its
        # closing </s>); the output sequences are the decoder's, after its start token
        encoded = tokenizer(list(args.prompt), padding=True, return_tensors="np")
        ids, mask, first_new = encoded["input_ids"], encoded["attention_mask"], 1
    else:
        ids, mask = chat_inputs(tokenizer, args.prompt, args.chat)
        first_new = ids.shape[1]

    streamed: list = []
    stream = None
    if len(args.prompt) == 1 and not encoder_decoder:  # one prompt: print text as the compiled loop produces it
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
    elif len(args.prompt) == 1:
        print(tokenizer.decode(result.sequences[0, first_new:], skip_special_tokens=True))
    else:
        for prompt, row in zip(args.prompt, result.sequences):
            print(f"### {prompt}\n{tokenizer.decode(row[first_new:], skip_special_tokens=True)}\n")
    speculation = ""
    if args.assistant or args.prompt_lookup:
        speculation = f", {result.accepted_tokens_per_step:.2f} drafted tokens accepted per step"
    print(f"[{int(result.num_new_tokens.sum())} tokens in {seconds:.2f} s including compilation{speculation}]",
          file=sys.stderr)
    return 0


COMMAND = Command(
    "generate", "generate text from a checkpoint or GGUF file", _generate_arguments, _run_generate,
    "Generate text with a jint8 model (int8 by default). Several --prompt flags run as one batch.")
