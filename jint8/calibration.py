"""Calibration: per-layer LLM.int8() thresholds from activation statistics, and a measured skip list.

LLM.int8()'s one global threshold (bitsandbytes' 6.0) was tuned on OPT-scale activations. A small
model's projection inputs rarely reach it, so almost nothing goes through the 16-bit stream and a
few moderately large features set every token's int8 scale (docs/ACCURACY.md). Calibration keeps
the numerics (vector-wise int8 + 16-bit outlier columns) and chooses, per projection:

1. a threshold from the float model's activations on calibration text: the lowest threshold at
   which every calibration call of `window` tokens has at most `capacity` outlier columns, with
   capacity = outlier_budget x the layer's input features (never above `max_threshold`; a layer
   that needs more columns at max_threshold gets its capacity raised to what it needs);
2. optionally (skip_budget > 0) a skip_modules list, measured: each projection (skip_granularity
   "layer", e.g. "model/layers_3/self_attn/v_proj") or each projection group ("group": every
   layer's v_proj, ...) is int8 alone with those thresholds, and its KL divergence to the float
   model is measured on the first sensitivity_windows calibration windows (one compiled forward
   for all of them: partial_int8_kl); those whose KL per weight stands out (>= outlier_factor x
   the median's) stay in 16 bits, most harmful per weight first, while their weights fit in
   skip_budget (a fraction of the quantized kernel elements).

The result is a plain Int8Config (threshold_overrides / capacity_overrides keyed by exact module
path, skip_modules by module path or projection name), written as JSON by `config_to_json` and
read back by `load_int8_config` (or `Int8Config(**json.load(f))`).

Calibrate on text that is not the evaluation text.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from pathlib import Path
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jint8.errors import InvalidConfigError
from jint8.evaluation import inspect_outliers
from jint8.progress import progress_bar
from jint8.layers import int8_weight_apply
from jint8.quantize import Int8Config, Int8Weight, _path_names, quantize_params

_logger = logging.getLogger("jint8")


@dataclasses.dataclass(frozen=True)
class LayerCalibration:
    """What calibration chose for one projection, and what it saw on the calibration windows."""

    path: str  # '/'-joined module path, e.g. "model/layers_3/mlp/down_proj"
    num_features: int  # K, the projection's input features
    threshold: float
    capacity: int
    outlier_columns: int  # most outlier columns of any calibration window at `threshold`
    peak: float  # largest |x| seen on the calibration windows

    @property
    def group(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def budget_threshold(column_absmax: np.ndarray, capacity: int) -> float:
    """The lowest threshold at which every row of column_absmax [W, K] has <= capacity columns >= it.

    A column is an outlier column of window w when column_absmax[w, k] >= threshold, so the count
    stays <= capacity iff the threshold is above each window's (capacity+1)-th largest value.
    Always > 0 (0 would switch the decomposition off).
    """
    column_absmax = np.asarray(column_absmax, np.float32)
    if column_absmax.ndim != 2:
        raise InvalidConfigError(f"column_absmax must be [windows, K], got shape {column_absmax.shape}")
    if capacity < 0:
        raise InvalidConfigError(f"capacity={capacity} must be >= 0")
    if capacity >= column_absmax.shape[1]:
        kth = np.float32(0.0)
    else:
        ordered = -np.sort(-column_absmax, axis=1)
        kth = np.float32(ordered[:, capacity].max())
    return float(np.nextafter(kth, np.float32(np.inf)))


def _outlier_count(column_absmax: np.ndarray, threshold: float) -> int:
    return int((np.asarray(column_absmax, np.float32) >= np.float32(threshold)).sum(axis=1).max())


def calibrate_layers(
    model: nn.Module,
    params,
    token_ids: Sequence[int],
    *,
    window: int = 512,
    outlier_budget: float = 0.05,
    max_threshold: float = 6.0,
    base: Optional[Int8Config] = None,
) -> list[LayerCalibration]:
    """Per projection of a float model: threshold and capacity from calibration activations.

    token_ids are cut into consecutive windows of `window` tokens (one call each: the outlier
    columns of a call are the union over its tokens). outlier_budget is the fraction of a
    layer's input features allowed through the 16-bit stream per call (capacity = ceil(budget x K)).
    Projections that `base` skips or leaves in float (min_size) are not listed.
    """
    base = base or Int8Config()
    if not 0 < outlier_budget <= 1:
        raise InvalidConfigError(f"outlier_budget={outlier_budget} must be in (0, 1]")
    if not max_threshold > 0:
        raise InvalidConfigError(f"max_threshold={max_threshold} must be > 0")
    windows = _windows(token_ids, window)
    layers = []
    for stats in inspect_outliers(model, params, windows, threshold=max_threshold):
        names = tuple(stats.path.split("/"))
        if base.is_skipped(names) or not _is_quantized(params, names, base):
            continue
        k = stats.num_features
        capacity = min(k, max(1, math.ceil(outlier_budget * k)))
        threshold = min(budget_threshold(stats.column_absmax, capacity), float(max_threshold))
        count = _outlier_count(stats.column_absmax, threshold)
        layers.append(LayerCalibration(stats.path, k, threshold, max(capacity, count), count,
                                       float(stats.column_absmax.max())))
    if not layers:
        raise InvalidConfigError("calibrate: found no projection that the base Int8Config quantizes")
    return layers


def _windows(token_ids, window: int) -> list[np.ndarray]:
    tokens = np.asarray(token_ids).reshape(-1)
    if window < 2:
        raise InvalidConfigError(f"window={window} must be >= 2")
    if tokens.size < window:
        raise InvalidConfigError(f"calibration needs at least window={window} tokens, got {tokens.size}")
    return [tokens[i : i + window].astype(np.int32)[None] for i in range(0, tokens.size - window + 1, window)]


def _is_quantized(params, names: tuple[str, ...], base: Int8Config) -> bool:
    """Whether quantize_params(params, base) turns this module's kernel into an Int8Weight."""
    node = params
    for name in names:
        node = node.get(name) if hasattr(node, "get") else None
        if node is None:
            return False
    kernel = next((node[k] for k in base.kernel_names if hasattr(node, "get") and k in node), None)
    return kernel is not None and getattr(kernel, "ndim", 0) in (2, 3) and kernel.size >= base.min_size


def layers_to_config(layers: Sequence[LayerCalibration], base: Optional[Int8Config] = None,
                     skip_modules: Sequence[str] = ()) -> Int8Config:
    """An Int8Config with one exact-path threshold and capacity override per calibrated layer,
    skipping base's skip_modules and skip_modules (projection paths or names)."""
    base = base or Int8Config()
    anchored = lambda path: "re:^" + re.escape(path) + "$"  # noqa: E731  exact path, not a suffix match
    return dataclasses.replace(
        base,
        skip_modules=tuple(base.skip_modules) + tuple(skip_modules),
        threshold_overrides=tuple((anchored(l.path), l.threshold) for l in layers) + tuple(base.threshold_overrides),
        capacity_overrides=tuple((anchored(l.path), l.capacity) for l in layers) + tuple(base.capacity_overrides),
    )


# ----------------------------------------------------------------------------- sensitivity

SKIP_GRANULARITIES = ("layer", "group")


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """What int8 costs in one place: the KL to the float model when only `module` is int8."""

    module: str  # a skip_modules pattern: one projection's path ("model/layers_3/self_attn/v_proj") or a group ("v_proj")
    kl: float  # mean per-token KL(float || only this module int8) on the sensitivity windows, nats
    weight_fraction: float  # its share of the quantized kernel elements

    @property
    def harm_per_weight(self) -> float:
        return self.kl / max(self.weight_fraction, 1e-12)


def partial_int8_kl(model: nn.Module, params, int8_params, selections: Sequence[Sequence[str]],
                    windows: Sequence[np.ndarray], *, progress: Optional[bool] = None) -> list[float]:
    """Per selection (a set of module paths), the mean per-token KL(float || the model with only
    those projections int8) over windows ([1, L] token ids each).

    int8_params: quantize_params(params, config); every selected path must be an Int8Weight there.
    One jit-compiled forward serves every selection: an interceptor runs each projection's float
    call and, where a traced mask selects it, replaces the output by the int8 call (lax.cond: only
    the taken branch runs). So nothing recompiles per selection (210 projections for SmolLM2), and
    the unselected projections compute bit for bit what the float reference computed.
    """
    paths = sorted({path for selection in selections for path in selection})
    order = {path: i for i, path in enumerate(paths)}
    weights = {path: (_module_params(int8_params, path)["kernel"], _module_params(params, path).get("bias"))
               for path in paths}
    if bad := [path for path, (kernel, _) in weights.items() if not isinstance(kernel, Int8Weight)]:
        raise InvalidConfigError(f"partial_int8_kl: {bad[:3]} are not Int8Weight kernels in int8_params")

    logprobs = _selectively_int8_logprobs(model, order)
    reference_logprobs = jax.jit(logprobs)

    @jax.jit
    def token_kl(params, weights, mask, ids, reference):
        return jnp.sum(jnp.exp(reference) * (reference - logprobs(params, weights, mask, ids)))

    masks = np.zeros((len(selections), max(len(paths), 1)), bool)
    for row, selection in enumerate(selections):
        masks[row, [order[path] for path in selection]] = True
    totals, count = np.zeros(len(selections)), 0
    with progress_bar(total=len(windows) * len(selections), progress=progress,
                      desc="int8 sensitivity", unit="pass") as bar:
        for ids in windows:  # one window's float log-probs ([L, vocab] f32) held at a time
            ids = jnp.asarray(np.asarray(ids, np.int32).reshape(1, -1))
            reference = reference_logprobs(params, weights, np.zeros(masks.shape[1], bool), ids)
            for row, mask in enumerate(masks):
                totals[row] += float(token_kl(params, weights, mask, ids, reference))
                bar.update()
            count += ids.size
    return list(totals / count)


def _selectively_int8_logprobs(model: nn.Module, order: dict[str, int]):
    """(params, weights {path: (Int8Weight, bias)}, mask [len(order)] bool, ids [1, L]) -> float32
    log-probs [1, L, vocab] of the model whose projection `path` is int8 where mask[order[path]]."""

    def logprobs(params, weights, mask, ids):
        def int8_where_selected(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            path = "/".join(context.module.scope.path)
            if context.method_name != "__call__" or path not in order:
                return y
            kernel, bias = weights[path]
            dtype = getattr(context.module, "dtype", None)  # as Int8Dense calls int8_weight_apply
            int8_y = lambda: int8_weight_apply(args[0], kernel, bias, dtype=dtype)[0].astype(y.dtype)  # noqa: E731
            return jax.lax.cond(mask[order[path]], int8_y, lambda: y)

        with nn.intercept_methods(int8_where_selected):
            logits, _ = model.apply({"params": params}, ids)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    return logprobs


def module_sensitivity(model: nn.Module, params, token_ids: Sequence[int], config: Int8Config, *,
                       granularity: str = "layer", window: int = 512, max_windows: int = 2,
                       compute_dtype=jnp.float32, progress: Optional[bool] = None) -> list[Sensitivity]:
    """KL to the float model when only one projection (granularity "layer") or one projection group
    ("group": e.g. every layer's v_proj) is int8 with config, on the first max_windows windows of
    token_ids; one entry per quantized projection (or group), in parameter-path order.

    compute_dtype: the model runs in it for this pass (None: as given). float32 by default because
    in bfloat16 any change to one projection, even one ulp of one weight, sends everything after it
    down another rounding path, and that alone costs SmolLM2-135M 0.0004-0.0007 nats/token (more
    the earlier the layer; float32: < 1e-8) — as much as one projection's int8 error, so bfloat16
    KLs would rank projections by their size and depth rather than by their int8 error.
    """
    if granularity not in SKIP_GRANULARITIES:
        raise InvalidConfigError(f"granularity={granularity!r} must be one of {SKIP_GRANULARITIES}")
    if max_windows < 1:
        raise InvalidConfigError(f"max_windows={max_windows} must be >= 1")
    windows = _windows(token_ids, window)[:max_windows]
    if compute_dtype is not None:
        model, params = _with_compute_dtype(model, params, compute_dtype)
    int8_params = quantize_params(params, config)
    sizes = _int8_kernel_sizes(int8_params, config)
    members: dict[str, list[str]] = {}
    for path in sizes:
        members.setdefault(path if granularity == "layer" else path.rsplit("/", 1)[-1], []).append(path)
    kls = partial_int8_kl(model, params, int8_params, list(members.values()), windows, progress=progress)
    total = sum(sizes.values())
    return [Sensitivity(name, kl, sum(sizes[p] for p in paths) / total)
            for (name, paths), kl in zip(members.items(), kls)]


def _with_compute_dtype(model: nn.Module, params, dtype):
    """The model (its `config.dtype`, as every jint8 model has) and float params in dtype."""
    config = getattr(model, "config", None)
    if not (dataclasses.is_dataclass(config) and hasattr(config, "dtype")):
        raise InvalidConfigError(f"compute_dtype: {type(model).__name__} has no config.dtype to set; "
                                 "pass compute_dtype=None to measure in the model's own dtype")
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return model.clone(config=dataclasses.replace(config, dtype=dtype)), jax.tree.map(cast, params)


def _int8_kernel_sizes(int8_params, config: Int8Config) -> dict[str, int]:
    """{module path: kernel elements} of the Int8Weight kernels (not int8 embeddings)."""
    sizes = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(
            int8_params, is_leaf=lambda x: isinstance(x, Int8Weight))[0]:
        names = _path_names(key_path)
        if isinstance(leaf, Int8Weight) and names[-1] in config.kernel_names:
            sizes["/".join(names[:-1])] = int(leaf.qvalue.size)
    return sizes


def _module_params(params, path: str):
    node = params
    for name in path.split("/"):
        node = node[name]
    return node


def choose_skip_modules(sensitivity: Sequence[Sensitivity], *, skip_budget: float,
                        outlier_factor: float = 2.0) -> tuple[str, ...]:
    """Modules kept in 16 bits, chosen by harm per weight (KL / weight_fraction): those at least
    outlier_factor x the median module's, most harmful per weight first, while their combined
    weight fraction stays within skip_budget (one that does not fit is passed over for smaller
    ones: a greedy knapsack). Nothing stands out -> nothing is skipped."""
    if not sensitivity or skip_budget <= 0:
        return ()
    median = float(np.median([s.harm_per_weight for s in sensitivity]))
    candidates = sorted((s for s in sensitivity if s.harm_per_weight >= outlier_factor * median),
                        key=lambda s: -s.harm_per_weight)
    chosen, used = [], 0.0
    for s in candidates:
        if used + s.weight_fraction <= skip_budget:
            chosen.append(s.module)
            used += s.weight_fraction
    return tuple(chosen)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """calibrate_model's result: the config and the measurements it was chosen from."""

    config: Int8Config
    layers: tuple[LayerCalibration, ...]
    sensitivity: tuple[Sensitivity, ...] = ()  # empty unless skip_budget > 0


def calibrate_model(
    model: nn.Module,
    params,
    token_ids: Sequence[int],
    *,
    window: int = 512,
    outlier_budget: float = 0.05,
    max_threshold: float = 6.0,
    skip_budget: float = 0.0,
    skip_granularity: str = "layer",
    sensitivity_windows: int = 2,
    outlier_factor: float = 2.0,
    base: Optional[Int8Config] = None,
    progress: Optional[bool] = None,
) -> Calibration:
    """calibrate() with its measurements: per-layer statistics and, if skip_budget > 0, the
    sensitivities the skip list was chosen from."""
    if not 0 <= skip_budget <= 1:
        raise InvalidConfigError(f"skip_budget={skip_budget} must be in [0, 1]")
    layers = calibrate_layers(model, params, token_ids, window=window, outlier_budget=outlier_budget,
                              max_threshold=max_threshold, base=base)
    config = layers_to_config(layers, base)
    if skip_budget <= 0:
        return Calibration(config, tuple(layers))
    sensitivity = module_sensitivity(model, params, token_ids, config, granularity=skip_granularity,
                                     window=window, max_windows=sensitivity_windows, progress=progress)
    skip = choose_skip_modules(sensitivity, skip_budget=skip_budget, outlier_factor=outlier_factor)
    for s in sorted(sensitivity, key=lambda s: -s.harm_per_weight)[: max(len(skip), 8)]:
        _logger.info("calibrate: %s alone: KL %.6f nats/token (%.2f %% of weights)%s", s.module, s.kl,
                     100 * s.weight_fraction, " -> 16-bit" if s.module in skip else "")
    return Calibration(layers_to_config(layers, base, skip), tuple(layers), tuple(sensitivity))


def calibrate(model: nn.Module, params, token_ids: Sequence[int], **options) -> Int8Config:
    """An Int8Config calibrated on token_ids with float params: per-layer thresholds and capacities
    (outlier_budget, max_threshold, window) plus, if skip_budget > 0, the projections (or, with
    skip_granularity="group", the projection groups) measured to hurt most kept in 16 bits.
    Options: see calibrate_model; steps: calibrate_layers, module_sensitivity, choose_skip_modules.
    """
    return calibrate_model(model, params, token_ids, **options).config


# ----------------------------------------------------------------------------- JSON


def config_to_dict(config: Int8Config) -> dict:
    """JSON-safe dict of an Int8Config; overrides as {pattern: value} objects (order = match order)."""
    fields = dataclasses.asdict(config)
    for name in ("capacity_overrides", "threshold_overrides", "in_ndim_overrides"):
        fields[name] = {pattern: value for pattern, value in getattr(config, name)}
    for name in ("skip_modules", "kernel_names"):
        fields[name] = list(fields[name])
    return fields


def config_to_json(config: Int8Config, path: Optional[str | Path] = None) -> str:
    """The config as JSON text (and written to path, if given)."""
    text = json.dumps(config_to_dict(config), indent=1) + "\n"
    if path is not None:
        Path(path).write_text(text, encoding="utf-8")
    return text


def config_from_dict(fields: dict) -> Int8Config:
    """Int8Config from config_to_dict's output (JSON lists become the config's tuples)."""
    if not isinstance(fields, dict):
        raise InvalidConfigError(f"an Int8Config JSON must be an object, got {type(fields).__name__}")
    known = {f.name for f in dataclasses.fields(Int8Config)}
    if unknown := sorted(set(fields) - known):
        raise InvalidConfigError(f"unknown Int8Config fields {unknown}; known: {sorted(known)}")
    as_tuples = lambda v: tuple(as_tuples(x) for x in v) if isinstance(v, list) else v  # noqa: E731
    return Int8Config(**{k: as_tuples(v) for k, v in fields.items()})


def load_int8_config(path: str | Path) -> Int8Config:
    """Read an Int8Config JSON file (as written by config_to_json / `jint8 calibrate`)."""
    try:
        fields = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidConfigError(f"{path}: cannot read an Int8Config JSON: {e}") from None
    return config_from_dict(fields)


def default_calibration_text() -> str:
    """Python's pydoc_data.topics in reverse topic order: real English prose that does not overlap
    the evaluation text (jint8.assets.default_eval_text, which starts at the first topic) unless
    more than about 100k tokens of either are used."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics, reverse=True))
