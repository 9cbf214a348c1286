"""`Int8Config(mode="auto")`: per-layer LLM.int8() settings chosen at load, from built-in text.

Steps (calibrate_auto), all on the float model in float32:
1. run the built-in calibration text (jint8/data/calibration_text.txt: written for jint8, not any
   evaluation text) through the model once, keeping every projection group's input;
2. at each scale-migration site (jint8.smoothing: the norms before q/k/v and gate/up, v_proj
   before o_proj, up_proj before down_proj) try SmoothQuant's power-of-two scales for a few
   alphas, and no migration, and keep the one whose simulated LLM.int8() output (that site's
   budget threshold, vector-wise int8, 16-bit outlier columns) is closest to the float output:
   the sum over the site's projections of |y_int8 - y|^2 / |y|^2 on the calibration tokens;
3. fold the chosen scales into the float params (exact: the float model is unchanged), then
   choose each projection's threshold on the migrated activations (calibration.calibrate_layers'
   rule: the lowest threshold that keeps at most the site's outlier budget of the input features
   per call in 16 bits, at most 6.0; SITE_OUTLIER_BUDGETS, else OUTLIER_BUDGET), from step 1's per-feature maxima divided by s (exact for powers of
   two, so no second forward);
4. keep the down_proj whose simulated int8 output error (step 2's score at the chosen candidate)
   is largest in 16 bits, while the extra bytes stay within SKIP_MEMORY_BUDGET of the int8 model;
5. round every other migration-site projection to int8 with GPTQ (jint8.gptq) against the
   Hessian of its migrated calibration inputs, in bitsandbytes' format and scale:
   error-compensating rounding instead of round-to-nearest, the same bytes.

The result is the migrated params (those kernels already Int8Weight) and a plain Int8Config
(mode "fixed", thresholds and capacities per exact module path, the skip list, `calibration`
naming the method) that quantize_params and
save_quantized use as any other: a saved checkpoint reloads as it is, without recalibrating.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import logging
import math
import time
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jint8.calibration import budget_threshold, layers_from_column_absmax, layers_to_config
from jint8.errors import InvalidConfigError
from jint8.gptq import gptq_int8, input_hessian
from jint8.layers import Int8Dense, as_array
from jint8.numerics import INV_127, INV_127_SQ
from jint8.quantize import Int8Config
from jint8.sensitivity import token_windows
from jint8.smoothing import MigrationSite, fold_scales, llama_sites, smoothing_exponents

_logger = logging.getLogger("jint8")

AUTO_METHOD = "auto-v3"  # Int8Config.calibration of a resolved auto config: this method, this text
ALPHAS = (0.3, 0.5, 0.7)  # SmoothQuant migration strengths tried per site, besides no migration
WINDOW = 512  # tokens per calibration call (the outlier columns of a call are its tokens' union)
OUTLIER_BUDGET = 0.05  # fraction of a projection's input features allowed through 16 bits per call
# per-site exceptions to OUTLIER_BUDGET: {site kind: fraction}. down_proj's input (act(gate) * up,
# 1536 heavy-tailed features on SmolLM2) is where int8 activations cost most: 35 % of its features
# in 16 bits per call cut the held-out KL by 16-19 % on three texts (15 %: 7-11 %), at no weight
# bytes; on the GPU a decode step's outlier columns cost little, a long prefill's more
# (docs/ACCURACY.md, round 3)
SITE_OUTLIER_BUDGETS = {"mlp_out": 0.35}
MAX_THRESHOLD = 6.0  # bitsandbytes' default: never a higher threshold than it
# GPTQ's damping, as a fraction of the Hessian's mean diagonal: 0.01 (GPTQ's default) fitted the
# 1580 tokens of the first calibration text too closely (held-out KL worse than round-to-nearest on the license
# text); 0.1 was better than round-to-nearest on both texts it was tried on (docs/ACCURACY.md)
GPTQ_DAMPING = 0.1
# down_proj kept in 16 bits, worst first, while their extra bytes (2 per weight in bf16 against 1 in
# int8) stay within this fraction of the int8 model's weight bytes: with every down_proj in float
# the KL of SmolLM2 on the calibration text halved (0.0044 -> 0.0020), no other projection group
# moved it by more than 8 %
SKIP_MEMORY_BUDGET = 0.05
# act-order (gptq_int8): KL ~6 % lower on two held-out texts, within half an s.e., and docstrings
# not run (docs/ACCURACY.md), so it stays off
GPTQ_ACT_ORDER = False
SKIP_SITE = "mlp_out"
SCORE_STRIDE = 8  # the search scores every 8th calibration token (its cost; thresholds see all)
_CAPTURE = "auto_int8_inputs"


def builtin_calibration_text() -> str:
    """The calibration text shipped with jint8 (prose, dialogue, a recipe, code, SQL, notes)."""
    return importlib.resources.files("jint8").joinpath("data/calibration_text.txt").read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class SiteChoice:
    """What calibrate_auto chose at one migration site: alpha (None: no migration) and the
    simulated relative output error of each candidate tried ({alpha or None: error})."""

    site: str
    alpha: Optional[float]
    errors: dict


@dataclasses.dataclass(frozen=True)
class AutoCalibration:
    """calibrate_auto's result: params (migrated; the migration sites' kernels already GPTQ-rounded
    Int8Weight leaves, the rest float) with config quantize exactly as chosen."""

    params: object
    config: Int8Config
    sites: tuple[SiteChoice, ...]
    num_tokens: int
    exponents: dict = dataclasses.field(default_factory=dict)  # {site name: [scales] int8}: s = 2**e folded


def _capture_inputs(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and args and isinstance(context.module, (nn.Dense, Int8Dense)):
        context.module.sow(_CAPTURE, "x", as_array(args[0]).astype(jnp.float32))
    return next_fun(*args, **kwargs)


def _module_key(key_path) -> str:
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path]
    return "/".join(names[: names.index("x")])


def _capture(model: nn.Module, params, windows, sites: Sequence[MigrationSite]):
    """One float forward per window: ({site name: [window's consumer input [T, K] float32]},
    {projection path: [windows, K] max |x| per input feature}, every projection in param-tree
    order, as jint8.evaluation.inspect_outliers lists them)."""
    wanted = {site.consumers[0]: site.name for site in sites}

    @jax.jit
    def forward(params, ids):
        with nn.intercept_methods(_capture_inputs):
            _, state = model.apply({"params": params}, ids, mutable=[_CAPTURE])
        captured = jax.tree_util.tree_flatten_with_path(state[_CAPTURE])[0]
        # only the site inputs leave the program; every projection's column maxima do
        inputs = {_module_key(k): x.reshape(-1, x.shape[-1]) for k, x in captured if _module_key(k) in wanted}
        maxima = {_module_key(k): jnp.max(jnp.abs(x).reshape(-1, x.shape[-1]), axis=0) for k, x in captured}
        return inputs, maxima

    inputs, maxima = {site.name: [] for site in sites}, {}
    for window in windows:
        window_inputs, window_maxima = jax.device_get(forward(params, jnp.asarray(window)))
        for module, x in window_inputs.items():
            inputs[wanted[module]].append(np.asarray(x, np.float32))
        for module, m in window_maxima.items():
            maxima.setdefault(module, []).append(np.asarray(m, np.float32))
    order = sorted(maxima, key=lambda path: path.split("/"))  # a nested dict's flattening order
    return inputs, {module: np.stack(maxima[module]) for module in order}


def _vectorwise_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values as float32 [K, N], absmax per output column [N]) of a kernel, bitsandbytes' rounding."""
    w_scale = np.abs(w).max(axis=0)
    return np.rint(w * _multiplier(w_scale)).astype(np.float32), w_scale


def _multiplier(scales: np.ndarray) -> np.ndarray:
    """numerics.quantization_multiplier in numpy: (1 / s) * 127 in two float32 roundings (torch's
    127 / s), 0 where s == 0. 127 / s in one rounding differs in the last bit, which flips an
    int8 code at an exact tie."""
    scales = np.asarray(scales, np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))
    return np.where(scales > 0, (np.float32(1) / safe) * np.float32(127), np.float32(0))


def simulated_int8_output(x: np.ndarray, w: np.ndarray, threshold: float,
                          outliers: Optional[np.ndarray] = None, quantized_w=None) -> np.ndarray:
    """LLM.int8() of x [T, K] and w [K, N] as jint8.ops.int8_matmul computes it (float32, up to
    summation order): outlier columns ([K] bool; default: those with any |x| >= threshold, the
    rows of this call) in 16 bits against the dequantized int8 weight rows; the rest vector-wise
    int8, each row's scale its max |x| over the elements below the threshold. quantized_w:
    _vectorwise_int8(w), when the caller has it already."""
    if outliers is None:
        outliers = (np.abs(x) >= threshold).any(axis=0) if threshold > 0 else np.zeros(x.shape[1], bool)
    wq, w_scale = _vectorwise_int8(w) if quantized_w is None else quantized_w
    magnitude = np.abs(x)
    x_scale = np.where(magnitude >= threshold, 0, magnitude).max(axis=1, keepdims=True) if threshold > 0 \
        else magnitude.max(axis=1, keepdims=True)
    xq = np.rint(x * _multiplier(x_scale)).astype(np.float32)
    xq[:, outliers] = 0
    # the op's float32 order: acc * (s_x * s_w) * (1 / 127^2), then + x_O @ (wq_O * s_w * (1 / 127))
    y = (xq @ wq) * (x_scale * w_scale) * np.float32(INV_127_SQ)
    if outliers.any():
        y += x[:, outliers] @ (wq[outliers] * w_scale * np.float32(INV_127))
    return y


def _site_error(windows_x, weights, references, threshold, outliers) -> float:
    """Sum over the site's projections of |y_int8 - y|^2 / |y|^2 on the scored tokens."""
    error = 0.0
    for w, refs in zip(weights, references):
        quantized_w = _vectorwise_int8(w)  # once per candidate, not once per window
        num = sum(float(np.square(simulated_int8_output(x, w, threshold, o, quantized_w) - y).sum())
                  for x, y, o in zip(windows_x, refs, outliers))
        den = sum(float(np.square(y).sum()) for y in refs)
        error += num / max(den, float(np.finfo(np.float32).tiny))
    return error


def choose_site(site: MigrationSite, windows_x: Sequence[np.ndarray], kernels: Sequence[np.ndarray],
                alphas: Sequence[float] = ALPHAS) -> tuple[np.ndarray, SiteChoice]:
    """The exponents (and the record) of the candidate with the least simulated int8 error.

    windows_x: per calibration window the consumers' input [T, K]; kernels: the consumers'
    float kernels [K, N_j]. Ties keep the earlier candidate, no migration first."""
    k = windows_x[0].shape[1]
    capacity = min(k, max(1, math.ceil(site_outlier_budget(site.name) * k)))
    # the error is scored on every SCORE_STRIDE-th token (the cost of the search), while each
    # window's threshold and outlier columns come from all its tokens, as in the real call
    scored = [x[::SCORE_STRIDE] for x in windows_x]
    references = [[x @ w for x in scored] for w in kernels]
    column_absmax = np.stack([np.abs(x).max(axis=0) for x in windows_x])  # [windows, K]
    act_absmax = column_absmax.max(axis=0)
    weight_absmax = np.max([np.abs(w).max(axis=1) for w in kernels], axis=0)
    best, best_error, errors = None, math.inf, {}
    for alpha in (None, *alphas):
        e = (np.zeros(site.num_scales, np.int8) if alpha is None
             else smoothing_exponents(act_absmax, weight_absmax, alpha, site.expand))
        s = np.ldexp(np.float32(1), e[site.expand].astype(np.int32))
        threshold = min(budget_threshold(column_absmax / s, capacity), MAX_THRESHOLD)
        outliers = list(column_absmax / s >= np.float32(threshold))
        error = _site_error([x / s for x in scored], [w * s[:, None] for w in kernels], references,
                            threshold, outliers)
        errors[alpha] = error
        if error < best_error:
            best, best_error = (alpha, e), error
    return best[1], SiteChoice(site.name, best[0], errors)


def _kernel(params, path: str) -> np.ndarray:
    node = params
    for name in path.split("/"):
        node = node[name]
    return np.asarray(node["kernel"], np.float32)


def calibrate_auto(model: nn.Module, params, base: Optional[Int8Config] = None,
                   text: Optional[str] = None, tokenizer=None, token_ids: Optional[Sequence[int]] = None,
                   alphas: Sequence[float] = ALPHAS) -> AutoCalibration:
    """Int8Config(mode="auto")'s calibration of a float model: migrated float params and the
    resolved config (see the module docstring). token_ids, else `tokenizer(text)` (default: the
    built-in text), are the calibration tokens; base: the config whose other fields are kept."""
    from jint8.sensitivity import _with_compute_dtype

    base = dataclasses.replace(base or Int8Config(), mode="fixed", calibration="")
    if token_ids is None:
        if tokenizer is None:
            raise InvalidConfigError("calibrate_auto needs token_ids or a tokenizer for the calibration text")
        token_ids = tokenizer(text or builtin_calibration_text(), add_special_tokens=False)["input_ids"]
    window = min(WINDOW, len(token_ids), getattr(model.config, "max_position_embeddings", WINDOW))
    windows = token_windows(token_ids, window)
    f32_model, f32_params = _with_compute_dtype(model, params, jnp.float32)
    sites = llama_sites(f32_params, model.config) if _is_llama(model) else []
    if not sites:
        _logger.info("int8-auto: %s has no scale-migration sites; per-layer thresholds only", type(model).__name__)
    clock = _PhaseClock()
    inputs, column_absmax = _capture(f32_model, f32_params, windows, sites)
    clock.lap("capture")
    choices, exponents = [], {}
    for site in sites:
        e, choice = choose_site(site, inputs[site.name], [_kernel(f32_params, p) for p in site.consumers], alphas)
        choices.append(choice)
        if choice.alpha is not None:
            exponents[site.name] = e
    clock.lap("migration search")
    # folded once, in float32 (thresholds and GPTQ read it); the params' own dtype is a cast of it:
    # a power-of-two scale commutes with rounding, so the cast equals folding in that dtype
    f32_migrated = fold_scales(f32_params, sites, exponents)
    migrated = jax.tree.map(lambda folded, p: folded.astype(p.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                            f32_migrated, params)
    clock.lap("fold")
    # the migrated model's inputs are the captured ones divided by s, exactly (powers of two):
    # the thresholds follow from the captured maxima without another forward
    layers = _thresholds(_migrated_maxima(column_absmax, sites, exponents), f32_migrated, sites, base)
    # capacity only sizes the XLA backend's gather (CPU); room for twice the calibration count
    # keeps unseen text off its dense fallback (same result, more work, a warning) in most calls
    layers = [dataclasses.replace(layer, capacity=min(layer.num_features, 2 * layer.capacity)) for layer in layers]
    skip = _skip_list(params, sites, choices, base)
    config = dataclasses.replace(layers_to_config(layers, base, skip), calibration=AUTO_METHOD)
    clock.lap("thresholds")
    migrated = _with_gptq_kernels(migrated, f32_migrated, sites, inputs, exponents, config)
    clock.lap("Hessians and GPTQ")
    _logger.info("int8-auto: %d tokens, %d of %d sites migrated, thresholds %s, 16-bit %s; %s", len(token_ids),
                 len(exponents), len(sites), _threshold_summary(layers), list(skip), clock)
    return AutoCalibration(migrated, config, tuple(choices), len(token_ids), exponents)


class _PhaseClock:
    """Wall seconds per calibration phase, for the log line."""

    def __init__(self):
        self._last, self.phases = time.perf_counter(), {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase], self._last = now - self._last, now

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.phases.items())


def site_outlier_budget(site_name: str) -> float:
    """The outlier budget of a migration site's consumers (SITE_OUTLIER_BUDGETS, else OUTLIER_BUDGET)."""
    return SITE_OUTLIER_BUDGETS.get(site_name.rsplit("/", 1)[-1], OUTLIER_BUDGET)


def _thresholds(column_absmax: dict, params, sites, base: Int8Config) -> list:
    """calibration.layers_from_column_absmax with each projection's site budget (OUTLIER_BUDGET for
    projections of no site), in column_absmax's order."""
    budget_of = {path: site_outlier_budget(site.name) for site in sites for path in site.consumers}
    chosen = {}
    for budget in sorted(set(budget_of.values()) | {OUTLIER_BUDGET}):
        group = {path: m for path, m in column_absmax.items() if budget_of.get(path, OUTLIER_BUDGET) == budget}
        if group:
            chosen.update((layer.path, layer) for layer in layers_from_column_absmax(
                group, params, outlier_budget=budget, max_threshold=MAX_THRESHOLD, base=base))
    return [chosen[path] for path in column_absmax if path in chosen]


def _migrated_maxima(column_absmax: dict, sites, exponents) -> dict:
    """column_absmax of the migrated model: each site consumer's maxima divided by its site's s."""
    scales = {}
    for site in sites:
        if site.name in exponents:
            s = np.ldexp(np.float32(1), exponents[site.name][site.expand].astype(np.int32))
            scales.update((path, s) for path in site.consumers)
    return {path: maxima / scales[path] if path in scales else maxima for path, maxima in column_absmax.items()}


def skip_memory_budget(params, base: Int8Config) -> float:
    """The extra bytes the 16-bit kernels may take: SKIP_MEMORY_BUDGET of the int8 tree's bytes
    (the kernels base quantizes at one byte a weight, every other parameter in bf16). params:
    the float tree, of arrays or jax.ShapeDtypeStructs."""
    from jint8.quantize import leaf_quantization

    elements = {"int8": 0, "float": 0}

    def count(key_path, leaf):
        names = tuple(str(getattr(k, "key", k)) for k in key_path)
        shape = getattr(leaf, "shape", ())
        plan = leaf_quantization(names, shape, base)
        elements["int8" if plan is not None and plan.quantized else "float"] += int(np.prod(shape))

    jax.tree_util.tree_map_with_path(count, params)
    return SKIP_MEMORY_BUDGET * (elements["int8"] + 2 * elements["float"])


def _skip_list(params, sites, choices, base: Int8Config) -> tuple[str, ...]:
    """The SKIP_SITE consumers to keep in 16 bits: largest chosen simulated error first, while
    their extra bf16 bytes (one more per weight than int8's) fit in skip_memory_budget."""
    budget = skip_memory_budget(params, base)
    by_error = sorted(((c.errors[c.alpha], s) for c, s in zip(choices, sites) if s.name.endswith("/" + SKIP_SITE)),
                      key=lambda pair: -pair[0])
    skip = []
    for _, site in by_error:
        size = sum(int(np.prod(_module(params, path)["kernel"].shape)) for path in site.consumers)
        if size > budget:
            break
        budget -= size  # one extra byte per weight: bf16's 2 against int8's 1
        skip.extend(site.consumers)
    return tuple(skip)


def _with_gptq_kernels(params, f32_params, sites, inputs, exponents, config: Int8Config):
    """params with each site consumer's kernel (that config quantizes as a 2-D int8 matrix) an
    Int8Weight rounded by GPTQ from its float32 kernel (f32_params: migrated); the consumers of
    one site share the Hessian of their migrated inputs (inputs: the site's unmigrated captures,
    exponents: the folded scales), so they are rounded as one [sum N, K] matrix. A site whose
    consumers all stay in 16 bits builds no Hessian."""
    from flax.core import FrozenDict, freeze, unfreeze

    from jint8.quantize import Int8Weight, _keep_sharding, leaf_quantization

    if isinstance(params, FrozenDict):
        return freeze(_with_gptq_kernels(unfreeze(params), f32_params, sites, inputs, exponents, config))
    params = _copy_tree(params)
    for site in sites:
        kernels = {path: _kernel(f32_params, path) for path in site.consumers}
        plans = {path: leaf_quantization((*path.split("/"), "kernel"), w.shape, config) for path, w in kernels.items()}
        paths = [p for p in site.consumers if plans[p] is not None and plans[p].quantized and plans[p].int4 is None
                 and not plans[p].embedding and kernels[p].ndim == 2]
        if not paths:
            continue
        # the consumers see x / s after the fold: their Hessian is of those inputs
        e = exponents.get(site.name, np.zeros(site.num_scales, np.int8))
        s = np.ldexp(np.float32(1), e[site.expand].astype(np.int32))
        hessian = input_hessian([x / s for x in inputs[site.name]])
        qvalue, scale = gptq_int8(np.concatenate([kernels[p].T for p in paths]), hessian, damping=GPTQ_DAMPING,
                                  act_order=GPTQ_ACT_ORDER)
        start = 0
        for path in paths:
            n = kernels[path].shape[1]
            node = _module(params, path)
            weight = Int8Weight(qvalue[start:start + n], scale[start:start + n], 1, plans[path].threshold,
                                plans[path].outlier_capacity)
            node["kernel"] = _keep_sharding(node["kernel"], weight)
            start += n
    return params


def _module(params, path: str):
    for name in path.split("/"):
        params = params[name]
    return params


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _is_llama(model) -> bool:
    from jint8.models.llama import LlamaForCausalLM

    return isinstance(model, LlamaForCausalLM)


def _threshold_summary(layers) -> str:
    values = np.array([layer.threshold for layer in layers])
    return f"median {np.median(values):.2f} (range {values.min():.2f}-{values.max():.2f})"


def load_auto_int8(path, config: Int8Config, *, dtype=jnp.bfloat16, mesh=None, max_memory=None,
                   progress: Optional[bool] = None):
    """from_pretrained(quantization=Int8Config(mode="auto")) of a float checkpoint: (model,
    params, resolved config). The float model is loaded in float32 (twice bf16's memory while
    calibrating), calibrated, quantized from the migrated float32 kernels, and its remaining
    float parameters cast to dtype."""
    from jint8.loading import load_tokenizer
    from jint8.loading.pretrained import from_pretrained
    from jint8.quantize import Int8Weight, quantize_params
    from jint8.quant4 import Int4Weight
    from jint8.sensitivity import _with_compute_dtype

    if config.mode != "auto":
        raise InvalidConfigError(f"load_auto_int8 needs Int8Config(mode='auto'), got mode={config.mode!r}")
    model, params = from_pretrained(path, quantization=None, dtype=jnp.float32, mesh=mesh, max_memory=max_memory,
                                    progress=progress)
    quantized = lambda x: isinstance(x, (Int8Weight, Int4Weight))  # noqa: E731
    if any(quantized(leaf) for leaf in jax.tree.leaves(params, is_leaf=quantized)):
        raise InvalidConfigError(f"{path} holds quantized (bitsandbytes) kernels; Int8Config(mode='auto') "
                                 "calibrates a float checkpoint")
    start, cpu_start = time.perf_counter(), time.process_time()
    calibration = calibrate_auto(model, params, config, tokenizer=load_tokenizer(path))
    _logger.info("int8-auto: calibrated in %.1f s (%.1f s of CPU time in this process)", time.perf_counter() - start,
                 time.process_time() - cpu_start)
    del params
    int8 = quantize_params(calibration.params, calibration.config)
    cast = lambda x: x if quantized(x) or not jnp.issubdtype(x.dtype, jnp.floating) else x.astype(dtype)  # noqa: E731
    model, _ = _with_compute_dtype(model, {}, dtype)
    return model, jax.tree.map(cast, int8, is_leaf=quantized), calibration.config
