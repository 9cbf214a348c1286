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
   for all of them: jint8.sensitivity); those whose KL per weight stands out (>= outlier_factor x
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
import numpy as np

from jint8.errors import InvalidConfigError
from jint8.evaluation import inspect_outliers
from jint8.quantize import Int8Config
from jint8.sensitivity import Sensitivity, choose_skip_modules, module_sensitivity, token_windows

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
    _check_budget(outlier_budget, max_threshold)
    windows = token_windows(token_ids, window)
    column_absmax = {stats.path: stats.column_absmax
                     for stats in inspect_outliers(model, params, windows, threshold=max_threshold)}
    return layers_from_column_absmax(column_absmax, params, outlier_budget=outlier_budget,
                                     max_threshold=max_threshold, base=base)


def layers_from_column_absmax(column_absmax: dict[str, np.ndarray], params, *, outlier_budget: float = 0.05,
                              max_threshold: float = 6.0, base: Optional[Int8Config] = None) -> list[LayerCalibration]:
    """calibrate_layers' choice from measured statistics: column_absmax {module path: [windows, K]
    max |x| per input feature and calibration call}, in the order the layers are listed."""
    _check_budget(outlier_budget, max_threshold)
    base = base or Int8Config()
    layers = []
    for path, maxima in column_absmax.items():
        names = tuple(path.split("/"))
        if base.is_skipped(names) or not _is_quantized(params, names, base):
            continue
        k = maxima.shape[-1]
        capacity = min(k, max(1, math.ceil(outlier_budget * k)))
        threshold = min(budget_threshold(maxima, capacity), float(max_threshold))
        count = _outlier_count(maxima, threshold)
        layers.append(LayerCalibration(path, k, threshold, max(capacity, count), count, float(maxima.max())))
    if not layers:
        raise InvalidConfigError("calibrate: found no projection that the base Int8Config quantizes")
    return layers


def _check_budget(outlier_budget: float, max_threshold: float) -> None:
    if not 0 < outlier_budget <= 1:
        raise InvalidConfigError(f"outlier_budget={outlier_budget} must be in (0, 1]")
    if not max_threshold > 0:
        raise InvalidConfigError(f"max_threshold={max_threshold} must be > 0")


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
    except UnicodeDecodeError as e:
        raise InvalidConfigError(f"{path}: an Int8Config JSON must be UTF-8 text (byte {e.start}: {e.reason})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InvalidConfigError(f"{path}: cannot read an Int8Config JSON: {e}") from None
    try:
        return config_from_dict(fields)
    except (TypeError, ValueError) as e:  # the config's own field checks name the field, not the file
        raise InvalidConfigError(f"{path}: {e}") from None


def default_calibration_text() -> str:
    """Python's pydoc_data.topics in reverse topic order: real English prose that does not overlap
    the evaluation text (jint8.assets.default_eval_text, which starts at the first topic) unless
    more than about 100k tokens of either are used."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics, reverse=True))
