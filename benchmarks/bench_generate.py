"""End-to-end generation benchmark: a Llama-3-8B-shaped model with random weights, bf16 vs LLM.int8
vs 4-bit NF4 / FP4.

    python3 benchmarks/bench_generate.py --layers 32                  # the real shape (one GPU)
    python3 benchmarks/bench_generate.py --layers 32 --batch 1 --variants bf16 int8 nf4
    python3 benchmarks/bench_generate.py --layers 32 --variants bf16 int8 hf-bf16 hf-compile bnb-int8
    python3 benchmarks/bench_generate.py --layers 2 --hidden 256 --intermediate 512 --heads 4 \
        --kv-heads 2 --vocab 1024 --prompt 64 --new-tokens 16         # a smoke run on CPU

Weights are drawn directly on the device, leaf by leaf; int8 kernels are drawn as int8 values and
float32 scales, so the bf16 model is never materialised for the int8 run; 4-bit kernels (nf4 / fp4:
Int4Config, double quantization, blocksize 64, lm_head 16-bit) as uniform random codes whose
dequantized std is the float kernel's. Activations, by
--activations:
- "realistic" (default): what `jint8 inspect` measures on real checkpoints such as SmolLM2. A few
  hidden features get a large RMSNorm weight (--outlier-features, --outlier-gain): systematic
  outlier features in every q/k/v/gate/up input. And gate_proj / up_proj outputs get a spread
  that grows with depth, so down_proj's input silu(gate) * up is heavy-tailed: at 512 tokens
  the last layer has --down-outlier-fraction of its columns (default 0.15) above the threshold,
  the first layer a tenth of that, and the count grows with the batch's rows as in real models.
- "idealised": the planted features only; every projection output is held at std 0.5 so that
  nothing else crosses the threshold (real checkpoints do not look like this: kept to compare).

Per variant and batch size: prefill time (a call with max_new_tokens=1: prefill + first token;
for jint8 the same compiled program, as max_new_tokens is traced), decode tokens/s
(B * (new_tokens - 1) decoded tokens over the full call's time minus the prefill call's; best of
--repeats each), weight bytes and peak device memory. Each variant runs in its own process so
its peak memory is its own. The hf-* / bnb-int8 baselines need torch, transformers and
bitsandbytes; the same random-weight recipe and planted outliers are used there.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import logging
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


TORCH_VARIANTS = ("hf-bf16", "hf-compile", "bnb-int8")
INT4_VARIANTS = ("nf4", "fp4")


def add_shape_arguments(parser, layers: int = 32) -> None:
    """--layers/--hidden/--intermediate/--heads/--kv-heads/--vocab (model_config reads them)."""
    shape = parser.add_argument_group("model shape (default: Llama-3-8B)")
    shape.add_argument("--layers", type=int, default=layers)
    shape.add_argument("--hidden", type=int, default=4096)
    shape.add_argument("--intermediate", type=int, default=14336)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--kv-heads", type=int, default=8)
    shape.add_argument("--vocab", type=int, default=128256)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    work = parser.add_argument_group("workload")
    work.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    work.add_argument("--prompt", type=int, default=512, help="prompt tokens per sequence")
    work.add_argument("--new-tokens", type=int, default=128)
    work.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (best of)")
    work.add_argument("--variants", nargs="+", default=["bf16", "int8"],
                      choices=["bf16", "int8", "int8-auto", *INT4_VARIANTS, *TORCH_VARIANTS],
                      help="jint8 bf16 / int8 / int8-auto (int8 with each projection's threshold chosen as "
                      "Int8Config(mode='auto') chooses it, on this model's activations, and as many down_proj "
                      "in bf16 as its memory budget buys) / nf4 / fp4 "
                      "(4-bit: Int4Config, double quantization), and the PyTorch baselines: hf-bf16 "
                      "(transformers eager), "
                      "hf-compile (static cache + torch.compile), bnb-int8 (bitsandbytes LLM.int8, threshold)")
    quant = parser.add_argument_group("LLM.int8")
    quant.add_argument("--threshold", type=float, default=6.0)
    quant.add_argument("--outlier-capacity", type=int, default=64)
    quant.add_argument("--outlier-features", type=int, default=8, help="hidden features with outlier activations")
    quant.add_argument("--outlier-gain", type=float, default=20.0, help="their RMSNorm weight")
    quant.add_argument("--activations", choices=["realistic", "idealised"], default="realistic",
                       help="activation statistics of the random model (module docstring)")
    quant.add_argument("--down-outlier-fraction", type=float, default=0.15,
                       help="realistic: last layer's share of down_proj input columns with |x| >= "
                            "threshold at 512 tokens")
    quant.add_argument("--quantize-lm-head", action="store_true", help="int8 lm_head too (bitsandbytes skips it)")
    parser.add_argument("--fuse", action="store_true",
                        help="jint8 variants: fuse_projections (one q|k|v and one gate|up matmul per layer)")
    quant.add_argument("--quantize-embeddings", action="store_true",
                       help="the embedding table too: int8 (Int8Config.quantize_embeddings) or, for nf4 / fp4, "
                            "4-bit as bitsandbytes' Embedding4bit (Int4Config.quantize_embeddings)")
    parser.add_argument("--json", help="append one JSON line per measurement to this file")
    parser.add_argument("--profile", metavar="DIR", help="also trace one full call per batch with jax.profiler")
    parser.add_argument("--in-process", action="store_true", help="run all variants in this process")
    parser.add_argument("--inspect", action="store_true",
                        help="only print the bf16 model's outlier columns per projection on one "
                             "--prompt-token prompt (jint8.evaluation.inspect_outliers), then exit")
    return parser.parse_args(argv)


def model_config(args):
    """The Llama-3-8B-shaped LlamaConfig of args' shape fields (bf16)."""
    import jax.numpy as jnp

    from jint8.models import LlamaConfig, RopeConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope=RopeConfig(theta=500000.0), dtype=jnp.bfloat16)


def build_model(args, variant: str):
    """(model, params) with random weights created on the default device."""
    import jax
    import jax.numpy as jnp

    import jint8
    from jint8.models import LlamaForCausalLM
    from jint8.quant4 import Int4Weight

    model = LlamaForCausalLM(model_config(args))
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    if variant in ("int8", "int8-auto"):
        skip = () if args.quantize_lm_head else ("lm_head",)
        quant = jint8.Int8Config(threshold=args.threshold, outlier_capacity=args.outlier_capacity, skip_modules=skip,
                                 quantize_embeddings=args.quantize_embeddings)
        if variant == "int8-auto":
            quant = dataclasses.replace(quant, skip_modules=skip + auto_float_down_proj(abstract, quant))
        abstract = jax.eval_shape(lambda p: jint8.quantize_params(p, quant), abstract)
    elif variant in INT4_VARIANTS:
        skip = () if args.quantize_lm_head else ("lm_head",)
        quant = jint8.Int4Config(quant_type=variant, double_quant=True, skip_modules=skip,
                                 quantize_embeddings=args.quantize_embeddings)
        abstract = jax.eval_shape(lambda p: jint8.quantize_params(p, quant), abstract)

    is_weight = lambda x: isinstance(x, (jint8.Int8Weight, Int4Weight))  # noqa: E731
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=is_weight)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    filled = [_random_leaf(path, leaf, key, args) for (path, leaf), key in zip(leaves, keys)]
    params = jax.tree_util.tree_unflatten(treedef, filled)
    return model, auto_thresholds(model, params, args) if variant == "int8-auto" else params


def auto_float_down_proj(abstract, quant) -> tuple[str, ...]:
    """The down_proj modules int8-auto would keep in 16 bits on this shape: as many as its memory
    budget buys (jint8.auto_int8.skip_memory_budget, one extra byte per weight), spread evenly
    over the layers. Auto picks them by simulated error, which random weights do not have; for
    timing only their number matters."""
    from flax import traverse_util

    from jint8.auto_int8 import skip_memory_budget

    flat = traverse_util.flatten_dict(abstract)
    down = sorted((path[:-1] for path in flat if path[-2:] == ("down_proj", "kernel")),
                  key=lambda path: [int(c.rpartition("_")[2]) if c.startswith("layers_") else 0 for c in path])
    if not down:
        return ()
    count = min(len(down), int(skip_memory_budget(abstract, quant) // np.prod(flat[down[0] + ("kernel",)].shape)))
    return tuple("/".join(down[round(i * len(down) / count)]) for i in range(count))


def auto_thresholds(model, params, args):
    """The int8 tree with each projection's threshold and capacity as Int8Config(mode="auto")
    sets them (jint8.auto_int8: at most 5 % of the input features per 512-token call in 16 bits,
    never above 6), measured on this model's activations for one random 512-token prompt.

    What auto changes in the decode graph is these per-layer settings (its scale migration only
    changes weight and norm values, and q/k/v and gate/up keep one threshold each, so they still
    fuse): this variant times that graph on the random weights."""
    import math

    import numpy as np
    from flax import traverse_util

    import jint8
    from jint8.auto_int8 import MAX_THRESHOLD, OUTLIER_BUDGET, site_outlier_budget
    from jint8.calibration import budget_threshold
    from jint8.evaluation import inspect_outliers

    prompt = np.random.default_rng(0).integers(0, args.vocab, size=(1, 512), dtype=np.int32)
    flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, jint8.Int8Weight))
    for layer in inspect_outliers(model, params, [prompt], threshold=MAX_THRESHOLD):
        key = tuple(layer.path.split("/")) + ("kernel",)
        weight = flat.get(key)
        if not isinstance(weight, jint8.Int8Weight):
            continue
        # down_proj is the consumer of the mlp_out site (act(gate) * up), whose budget auto raises
        budget = site_outlier_budget("mlp_out") if layer.path.endswith("/down_proj") else OUTLIER_BUDGET
        capacity = min(layer.num_features, max(1, math.ceil(budget * layer.num_features)))
        threshold = min(budget_threshold(layer.column_absmax, capacity), MAX_THRESHOLD)
        flat[key] = weight.replace(threshold=threshold, outlier_capacity=min(layer.num_features, 2 * capacity))
    return traverse_util.unflatten_dict(flat)


def _weight_std(fan_in: int, args) -> float:
    """Projection outputs get std ~0.5 whatever the planted features add, so only those features
    cross the threshold (random weights would otherwise spread |x| >= 6 tail events over every
    column of o_proj / down_proj at prefill sizes, which real checkpoints do not do)."""
    energy = fan_in + args.outlier_features * (args.outlier_gain**2 - 1)
    return 0.5 * energy**-0.5


REFERENCE_ROWS = 512  # tokens at which --down-outlier-fraction holds


@functools.cache
def gated_output_std(fraction: float, threshold: float, rows: int = REFERENCE_ROWS) -> float:
    """The std s of gate and up outputs for which silu(g) * u, g and u ~ N(0, s^2), has
    `fraction` of its columns with |x| >= threshold in at least one of `rows` rows (bisection on
    a fixed sample)."""
    if fraction <= 0:
        return 0.5
    per_element = 1.0 - (1.0 - fraction) ** (1.0 / rows)
    g, u = np.random.default_rng(0).standard_normal((2, 1_000_000))
    lo, hi = 0.05, 8.0
    for _ in range(25):
        s = (lo + hi) / 2
        x = s * g / (1.0 + np.exp(-s * g)) * (s * u)
        lo, hi = (s, hi) if np.mean(np.abs(x) >= threshold) < per_element else (lo, s)
    return hi


def _projection_std(name: str, fan_in: int, args) -> float:
    """A kernel's std: outputs at std 0.5 (_weight_std), except, with realistic activations,
    gate_proj / up_proj, whose outputs get gated_output_std of their layer's share of down_proj
    outlier columns (rising linearly from a tenth of --down-outlier-fraction to all of it)."""
    std = _weight_std(fan_in, args)
    if args.activations != "realistic" or not ("gate_proj" in name or "up_proj" in name):
        return std
    layer = int(name.split("layers_")[1].split("/")[0])
    share = args.down_outlier_fraction * (0.1 + 0.9 * layer / max(args.layers - 1, 1))
    return std * gated_output_std(share, args.threshold) / 0.5


def _random_leaf(path, leaf, key, args):
    import jax
    import jax.numpy as jnp

    import jint8

    from jint8.quant4 import Int4Weight

    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if isinstance(leaf, Int4Weight):  # leaf.shape is the torch Linear's [out, in]; a table keeps std 1
        std = 1.0 if name.endswith("embedding") else _projection_std(name, leaf.shape[1], args)
        return _random_int4(leaf, key, std)
    if isinstance(leaf, jint8.Int8Weight):
        # uniform int8 in [-127, 127] has std ~73.3: scale so the dequantized std is _weight_std
        # leaf.shape is the float kernel's [in, out]; an int8 embedding table gets the float one's std 1
        std = 1.0 if name.endswith("embedding") else _projection_std(name, leaf.shape[0], args)
        qvalue, scale = _jit_by_shape(_int8_uniform)(key, leaf.qvalue.shape, leaf.scale.shape, 127.0 / 73.3 * std)
        return dataclasses.replace(leaf, qvalue=qvalue, scale=scale)
    shape, dtype = leaf.shape, leaf.dtype
    if name.endswith("scale"):  # RMSNorm weights: 1, with a few outlier features
        gain = args.outlier_gain if ("layernorm" in name) else 1.0
        weights = jnp.ones(shape, dtype).at[: args.outlier_features].set(gain)
        return weights
    std = 1.0 if "embed" in name else _projection_std(name, shape[0], args)
    return _jit_by_shape(_normal)(key, shape, jnp.dtype(dtype), std)


@functools.cache
def _jit_by_shape(draw):
    """draw jit-compiled once per shape and dtype (its arguments 1 and 2): the weights of an 8B
    model took 4 minutes on an H100 when every leaf compiled a closure of its own."""
    import jax

    return jax.jit(draw, static_argnums=(1, 2))


def _int8_uniform(key, qshape, scale_shape, scale_value):
    """Uniform int8 in [-127, 127], and scales within 10 % of scale_value."""
    import jax
    import jax.numpy as jnp

    qkey, skey = jax.random.split(key)
    qvalue = jax.random.randint(qkey, qshape, -127, 128, jnp.int32).astype(jnp.int8)
    return qvalue, scale_value * jax.random.uniform(skey, scale_shape, jnp.float32, 0.9, 1.1)


def _random_int4(leaf, key, std):
    """leaf (an abstract Int4Weight) with uniform random codes and every block's absmax equal to
    std / std(code book): the dequantized kernel has the float kernel's std. With double
    quantization every absmax code is the dynamic map's 0, so absmax = offset exactly."""
    import jax.numpy as jnp
    import numpy as np

    from jint8 import quant4

    book = quant4.code_book(leaf.quant_type)
    absmax = jnp.float32(std / float(np.sqrt(np.mean(book.astype(np.float64) ** 2))))
    packed = _jit_by_shape(_uniform_bytes)(key, leaf.packed.shape, jnp.dtype(jnp.uint8))
    if leaf.nested_absmax is None:
        return dataclasses.replace(leaf, packed=packed, absmax=jnp.full(leaf.absmax.shape, absmax, jnp.float32))
    zero = int(np.argmin(np.abs(quant4.DYNAMIC_MAP)))
    return dataclasses.replace(
        leaf, packed=packed, absmax=jnp.full(leaf.absmax.shape, zero, jnp.uint8),
        nested_absmax=jnp.full(leaf.nested_absmax.shape, absmax, jnp.float32),
        nested_code=jnp.asarray(quant4.DYNAMIC_MAP), offset=absmax)


def _uniform_bytes(key, shape, dtype):
    import jax
    import jax.numpy as jnp

    return jax.random.randint(key, shape, 0, 256, jnp.int32).astype(dtype)


def _normal(key, shape, dtype, std):
    import jax
    import jax.numpy as jnp

    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _best_seconds(fn, repeats: int) -> float:
    """Best of `repeats` wall times: the least disturbed run (other processes only add time)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timing_config(new_tokens: int):
    """The GenerationConfig every jint8 generate() timing here uses. One output bucket for the full
    and the prefill-only call (max_new_tokens=1), so the prefill-only call runs the already
    compiled program (a 64-token bucket made it compile a second one)."""
    import jint8

    return jint8.GenerationConfig(max_new_tokens=new_tokens, prompt_length_bucket=64, new_tokens_bucket=new_tokens)


@dataclasses.dataclass(frozen=True)
class GenerateTimes:
    """Seconds of one prompt batch's generate() calls (time_generate)."""

    compile_s: float  # the first full call: compiles, then runs
    prefill_s: float  # best prefill-only call: prefill + first token
    full_s: float  # best full call
    sequences: np.ndarray  # [batch, prompt + new_tokens] of the first call

    def decode_tokens_per_s(self, batch: int, new_tokens: int) -> float:
        """B * (new_tokens - 1) decoded tokens over the full call's time minus the prefill call's."""
        return batch * (new_tokens - 1) / (self.full_s - self.prefill_s) if self.full_s > self.prefill_s else float("nan")


def time_generate(model, params, prompt, new_tokens: int, repeats: int, on_compiled=None) -> GenerateTimes:
    """jint8.generate of prompt [batch, length] under timing_config: one call that compiles
    (on_compiled() runs after it), then the best of `repeats` prefill-only and full calls."""
    import jint8

    config = timing_config(new_tokens)
    prefill_only = dataclasses.replace(config, max_new_tokens=1)
    start = time.perf_counter()
    sequences = jint8.generate(model, params, prompt, config=config).sequences
    compile_s = time.perf_counter() - start
    if on_compiled is not None:
        on_compiled()
    prefill = _best_seconds(lambda: jint8.generate(model, params, prompt, config=prefill_only), repeats)
    full = _best_seconds(lambda: jint8.generate(model, params, prompt, config=config), repeats)
    return GenerateTimes(compile_s=compile_s, prefill_s=prefill, full_s=full, sequences=sequences)


class _OverflowCounter(logging.Filter):
    """Counts jint8's outlier-capacity warnings and lets only the first one through."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if "outlier_capacity" not in record.getMessage():
            return True
        self.count += 1
        return self.count == 1


def _phase(variant: str, what: str, since: float) -> None:
    """One progress line on stderr (flushed): a run cut short by a time limit still says which
    phase (weights, compile, timing) took the time."""
    print(f"[{variant}] {what}: {time.perf_counter() - since:.1f} s", file=sys.stderr, flush=True)


def inspect_activations(args) -> None:
    """The generator's activation statistics as `jint8 inspect` reports them for a checkpoint:
    outlier columns (|x| >= threshold in any row) per projection input, one random prompt."""
    import numpy as np

    from jint8.evaluation import inspect_outliers

    model, params = build_model(args, "bf16")
    prompt = np.random.default_rng(1).integers(0, args.vocab, size=(1, args.prompt), dtype=np.int32)
    print(f"outlier columns at {args.prompt} tokens, {args.activations} activations:")
    for layer in inspect_outliers(model, params, [prompt[0]], threshold=args.threshold):
        count = layer.max_outlier_columns
        print(f"  {layer.path}: {count} of {layer.num_features} ({count / layer.num_features:.1%})")


def run_variant(args, variant: str) -> list[dict]:
    import jax
    import numpy as np

    import jint8

    overflows = _OverflowCounter()
    logging.getLogger("jint8").addFilter(overflows)
    device = jax.devices()[0]
    start = time.perf_counter()
    model, params = build_model(args, variant)
    if args.fuse:
        params = jint8.fuse_projections(params)
    jax.block_until_ready(params)
    _phase(variant, "random weights built", start)
    weight_bytes = jint8.param_bytes(params)
    rows = []
    for batch in args.batch:
        prompt = np.random.default_rng(batch).integers(0, args.vocab, size=(batch, args.prompt), dtype=np.int32)
        start = time.perf_counter()
        times = time_generate(model, params, prompt, args.new_tokens, args.repeats,
                              on_compiled=lambda: _phase(variant, f"batch {batch}: compiled and ran once", start))
        stats = device.memory_stats() or {}
        rows.append(dict(
            variant=variant, batch=batch, prompt=args.prompt, new_tokens=args.new_tokens, layers=args.layers,
            hidden=args.hidden, device=device.device_kind, platform=device.platform, jax=jax.__version__,
            date=datetime.date.today().isoformat(), weight_gib=weight_bytes / 2**30,
            compile_s=times.compile_s, prefill_ms=times.prefill_s * 1e3,
            prefill_tokens_per_s=batch * args.prompt / times.prefill_s,
            decode_tokens_per_s=times.decode_tokens_per_s(batch, args.new_tokens),
            total_s=times.full_s,
            peak_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30 if stats else None,
            threshold=args.threshold if variant == "int8" else "per layer" if variant == "int8-auto" else None,
            capacity_overflow_warnings=overflows.count, fused=bool(args.fuse),
            quantized_embeddings=bool(args.quantize_embeddings) and variant not in ("bf16", *TORCH_VARIANTS),
            activations=args.activations,
        ))
        print(json.dumps(rows[-1]), flush=True)
        if args.profile:  # one more full call under the profiler: GPU kernel times per op
            trace_dir = os.path.join(args.profile, f"{variant}_b{batch}")
            os.makedirs(trace_dir, exist_ok=True)
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            jint8.generate(model, params, prompt, config=timing_config(args.new_tokens))  # host arrays: synchronous
            jax.profiler.stop_trace()
            print(f"profile of one call: {trace_dir} (summarise with tools/profile_summary.py)", flush=True)
    return rows


def build_torch_model(args, variant: str):
    """The same shape and planted outlier features as a transformers LlamaForCausalLM (bf16)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                # transformers' names (model.layers.3.mlp.gate_proj) in jint8's path form
                path = name.replace("layers.", "layers_").replace(".", "/")
                module.weight.normal_(0.0, _projection_std(path, module.in_features, args))
            elif name.endswith("layernorm"):
                module.weight.fill_(1.0)[: args.outlier_features] = args.outlier_gain
        model.model.embed_tokens.weight.normal_(0.0, 1.0)
    if variant == "bnb-int8":
        import bitsandbytes as bnb

        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and (child_name != "lm_head" or args.quantize_lm_head):
                    layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False,
                                                has_fp16_weights=False, threshold=args.threshold)
                    layer.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False,
                                                     has_fp16_weights=False)
                    setattr(parent, child_name, layer.to(device).eval())  # quantizes on the move
        if device == "cuda":
            torch.cuda.empty_cache()
    if variant == "hf-compile":
        # A static cache makes transformers' generate compile the forward itself (torch.compile,
        # "reduce-overhead", CUDA graphs). Compiling model.forward by hand on top of that failed
        # on the H100 (torch 2.11, transformers 5.17): "accessing tensor output of CUDAGraphs that
        # has been overwritten by a subsequent run".
        model.generation_config.cache_implementation = "static"
    return model, device


def run_torch_variant(args, variant: str) -> list[dict]:
    import torch
    import transformers

    model, device = build_torch_model(args, variant)
    weight_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])

    def timed(ids, new_tokens):
        synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        synchronize()
        return time.perf_counter() - start

    rows = []
    for batch in args.batch:
        ids = torch.tensor(np.random.default_rng(batch).integers(0, args.vocab, size=(batch, args.prompt)),
                           device=device)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        timed(ids, args.new_tokens)
        timed(ids, args.new_tokens)  # torch.compile's CUDA graphs record on a later call
        compile_seconds = time.perf_counter() - start
        # Whether generate's auto-compile engaged (hf-compile): frames dynamo compiled so far.
        compiled_graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        prefill = min(timed(ids, 1) for _ in range(args.repeats))
        full = min(timed(ids, args.new_tokens) for _ in range(args.repeats))
        rows.append(dict(
            variant=variant, batch=batch, prompt=args.prompt, new_tokens=args.new_tokens, layers=args.layers,
            hidden=args.hidden, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
            platform=device, jax=f"torch {torch.__version__}, transformers {transformers.__version__}",
            date=datetime.date.today().isoformat(), weight_gib=weight_bytes / 2**30, compile_s=compile_seconds,
            prefill_ms=prefill * 1e3, prefill_tokens_per_s=batch * args.prompt / prefill,
            decode_tokens_per_s=batch * (args.new_tokens - 1) / (full - prefill) if full > prefill else float("nan"),
            total_s=full, peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            threshold=args.threshold if variant == "bnb-int8" else None, torch_compiled_graphs=compiled_graphs,
        ))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = ["| variant | activations | batch | weights GiB | prefill ms | prefill tok/s | decode tok/s | whole call s | peak GiB | software |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        software = r["jax"] if r["jax"].startswith("torch") else f"jint8, jax {r['jax']}"
        lines.append(f"| {r['variant']}{' fused' if r.get('fused') else ''} | {r.get('activations', '-')} | {r['batch']} | "
                     f"{r['weight_gib']:.3f} | {r['prefill_ms']:.1f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['decode_tokens_per_s']:.1f} | {r['total_s']:.3f} | {peak} | {software} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.inspect:
        inspect_activations(args)
        return 0
    rows: list[dict] = []
    in_process = args.in_process or len(args.variants) == 1
    if in_process:
        for variant in args.variants:
            rows += (run_torch_variant if variant in TORCH_VARIANTS else run_variant)(args, variant)
    else:  # one process per variant: peak_bytes_in_use cannot be reset inside a process
        base = list(argv if argv is not None else sys.argv[1:])
        for variant in args.variants:
            child = [sys.executable, os.path.abspath(__file__), *base, "--variants", variant, "--in-process"]
            done = subprocess.run(child, stdout=subprocess.PIPE, text=True)
            rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
            if done.returncode != 0:  # e.g. out of memory, or a baseline package missing: go on
                print(f"variant {variant} failed with exit status {done.returncode}", file=sys.stderr)
    if args.json and in_process:  # a child process has written its own rows
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    if rows:
        r = rows[0]
        print(f"\n{r['device']} ({r['platform']}), {r['date']}: {r['layers']} layers, hidden "
              f"{r['hidden']}, prompt {r['prompt']}, {r['new_tokens']} new tokens, greedy")
        print(_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
