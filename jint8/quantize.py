"""Vector-wise int8 weight quantization and the pure transforms over Flax parameter trees.

Weights (once): per output feature n, s_w[n] = max over the contracting axes of |W|;
Wq = round(W * (127 / s_w)) as int8, half to even (bitsandbytes' int8_vectorwise_quant on W[N, K]).
Flax kernels are W[K, N]; Int8Weight stores Wq K-major, [N, K], as bitsandbytes does. A zero
column gets scale 0 and Wq 0 (bitsandbytes would produce NaN there).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import re
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jint8.errors import InvalidConfigError, QuantizationError
from jint8.numerics import INV_127, quantization_multiplier
from jint8.quant4 import Int4Config, Int4Weight, int4_weight_specs, quantize_4bit

_logger = logging.getLogger("jint8")


@struct.dataclass
class Int8Weight:
    """A Dense-like kernel quantized vector-wise to int8, stored K-major.

    The float kernel it stands for has Flax's shape [*in_shape, *out_shape] (len(in_shape) ==
    in_ndim, the contracting axes). qvalue stores it transposed, [*out_shape, *in_shape]: for a
    2-D kernel that is [N, K], bitsandbytes' layout, because int8 tensor-core MMAs (wgmma) read
    both operands K-major and a [K, N] weight measured 2-4x slower from M = 64 up
    (benchmarks/RESULTS.md). scale has shape out_shape (one float32 absmax per output feature).
    threshold and outlier_capacity are the layer's LLM.int8() settings (outlier_capacity sizes
    the XLA backend's static gather only; the GPU kernels take any count); they are static so
    they survive jit as part of the tree structure.
    """

    qvalue: jax.Array
    scale: jax.Array
    in_ndim: int = struct.field(pytree_node=False, default=1)
    threshold: float = struct.field(pytree_node=False, default=6.0)
    outlier_capacity: int = struct.field(pytree_node=False, default=64)

    @property
    def out_ndim(self) -> int:
        return self.qvalue.ndim - self.in_ndim

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.shape[self.out_ndim :])

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.qvalue.shape[: self.out_ndim])

    @property
    def shape(self) -> tuple[int, ...]:
        """The float kernel's shape, [*in_shape, *out_shape] (qvalue.shape is the transpose)."""
        return self.in_shape + self.out_shape

    @property
    def nbytes(self) -> int:
        return int(self.qvalue.size) + 4 * int(self.scale.size)

    def as_matrix(self) -> tuple[jax.Array, jax.Array]:
        """(wq [N, K] int8, K-major, col_scales [N] float32) with K, N the flattened in/out shapes."""
        k, n = math.prod(self.in_shape), math.prod(self.out_shape)
        return self.qvalue.reshape(n, k), self.scale.reshape(n)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """The float kernel [*in, *out] this stands for: Wq * s_w / 127 (bnb's int8_vectorwise_dequant)."""
        scale = self.scale.reshape(self.out_shape + (1,) * self.in_ndim)
        w = (self.qvalue.astype(jnp.float32) * scale * INV_127).astype(dtype)
        return jnp.transpose(w, kernel_permutation(self.qvalue.ndim, self.in_ndim))


def storage_permutation(ndim: int, in_ndim: int) -> tuple[int, ...]:
    """Axes of a kernel [*in, *out] in the order Int8Weight.qvalue stores them, [*out, *in]."""
    return tuple(range(in_ndim, ndim)) + tuple(range(in_ndim))


def kernel_permutation(ndim: int, in_ndim: int) -> tuple[int, ...]:
    """Axes of a stored qvalue [*out, *in] in the kernel's order [*in, *out]."""
    out_ndim = ndim - in_ndim
    return tuple(range(out_ndim, ndim)) + tuple(range(out_ndim))


def validate_int8_weight(w: Int8Weight, name: str = "weight") -> None:
    """Check Int8Weight's shape rule; raise QuantizationError naming `name`."""
    if w.qvalue.dtype != jnp.int8:
        raise QuantizationError(f"{name}: qvalue must be int8, got {w.qvalue.dtype}")
    if not 1 <= w.in_ndim < w.qvalue.ndim:
        raise QuantizationError(f"{name}: in_ndim={w.in_ndim} invalid for qvalue shape {tuple(w.qvalue.shape)}")
    if tuple(w.scale.shape) != w.out_shape:
        raise QuantizationError(
            f"{name}: scale.shape={tuple(w.scale.shape)} must equal out_shape={w.out_shape} "
            f"(qvalue is stored K-major, [*out_shape, *in_shape] = {tuple(w.qvalue.shape)})"
        )


def quantize_vectorwise(
    w: jax.Array, *, in_ndim: int = 1, threshold: float = 6.0, outlier_capacity: int = 64
) -> Int8Weight:
    """Quantize one kernel [*in_shape, *out_shape] to int8 with one scale per output feature."""
    w = jnp.asarray(w)
    return quantize_kmajor(
        jnp.transpose(w, storage_permutation(w.ndim, in_ndim)),
        in_ndim=in_ndim,
        threshold=threshold,
        outlier_capacity=outlier_capacity,
    )


def quantize_kmajor(
    w_t: jax.Array, *, in_ndim: int = 1, threshold: float = 6.0, outlier_capacity: int = 64
) -> Int8Weight:
    """Quantize a kernel given transposed, [*out_shape, *in_shape] (a torch Linear's weight
    [out, in] as it is): bitsandbytes' int8_vectorwise_quant over the trailing in_ndim axes."""
    wf = jnp.asarray(w_t).astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=tuple(range(wf.ndim - in_ndim, wf.ndim)))
    multiplier = quantization_multiplier(scale).reshape(scale.shape + (1,) * in_ndim)
    qvalue = jnp.round(wf * multiplier).astype(jnp.int8)
    return Int8Weight(qvalue, scale, in_ndim, float(threshold), int(outlier_capacity))


# ----------------------------------------------------------------------------- configuration


def _compile_pattern(pattern: str, field: str):
    """A module-path matcher. Syntax: 're:<regex>' (searched), 'glob:<glob>' or a string with
    * ? [ (fnmatch on the '/'-joined path), else a plain name matching one path component or a
    '/'-separated run of components (bitsandbytes' skip_modules semantics)."""
    if not isinstance(pattern, str) or not pattern:
        raise InvalidConfigError(f"{field}: pattern {pattern!r} must be a non-empty string")
    prefix, sep, body = pattern.partition(":")
    if sep and prefix == "re":
        try:
            regex = re.compile(body)
        except re.error as e:
            raise InvalidConfigError(f"{field}: invalid regex in {pattern!r}: {e}") from None
        return lambda path: regex.search("/".join(path)) is not None
    if sep and prefix == "glob":
        return lambda path: fnmatch.fnmatchcase("/".join(path), body)
    if sep:
        raise InvalidConfigError(
            f"{field}: unknown pattern syntax {prefix + ':'!r} in {pattern!r}; "
            "use 're:<regex>', 'glob:<glob>' or a plain module name"
        )
    if any(c in pattern for c in "*?["):
        return lambda path: fnmatch.fnmatchcase("/".join(path), pattern)
    parts = tuple(pattern.strip("/").split("/"))
    n = len(parts)
    return lambda path: any(tuple(path[i : i + n]) == parts for i in range(len(path) - n + 1))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) or (
        hasattr(value, "dtype") and getattr(value, "shape", None) == () and jnp.issubdtype(value.dtype, jnp.integer))


def _as_pairs(value, field: str, minimum: int) -> tuple[tuple[str, int], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple((k, v) for k, v in items)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"{field}={value!r} must be a mapping or (pattern, value) pairs") from None
    for pattern, number in pairs:
        _compile_pattern(pattern, field)
        if not _is_int(number) or number < minimum:
            raise InvalidConfigError(f"{field}[{pattern!r}]={number!r} must be an int >= {minimum}")
    return tuple((str(k), int(v)) for k, v in pairs)


def unmatched_patterns(config, module_paths) -> list[str]:
    """The skip / override patterns of config that match none of module_paths (tuples of names),
    nor any of their prefixes: a typo there would otherwise pass unseen."""
    candidates = {tuple(path[:i]) for path in module_paths for i in range(1, len(path) + 1)}
    fields = [("skip_modules", p) for p in config.skip_modules] + [
        (name, pattern) for name in ("capacity_overrides", "threshold_overrides", "in_ndim_overrides")
        for pattern, _ in getattr(config, name, ())]  # Int4Config has no overrides
    return [f"{name}: {pattern!r}" for name, pattern in fields
            if not any(_compile_pattern(pattern, name)(path) for path in candidates)]


def warn_unmatched_patterns(config, module_paths) -> None:
    """Log a warning naming each pattern of config that matches no module of the tree."""
    unmatched = unmatched_patterns(config, module_paths)
    if unmatched:
        _logger.warning("%s patterns match no module of the model (a typo?): %s", type(config).__name__,
                        "; ".join(unmatched))


INT8_MODES = ("fixed", "auto")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8Config:
    """How to quantize a parameter tree with LLM.int8().

    threshold: |x| >= threshold marks an outlier input feature (16-bit path); 0 disables it.
    outlier_capacity: columns the XLA backend (CPU, JINT8_BACKEND=xla) gathers per call under jit;
      more take its exact dense path. A speed setting there only: the GPU kernels have no
      capacity (any count 0..K, read on the device per call), and results never depend on it.
    skip_modules: module-path patterns left in floating point (e.g. "lm_head", "re:.*gate").
    min_size: kernels with fewer elements stay in floating point (tiny matrices gain nothing).
    capacity_overrides: {pattern: capacity} per-layer outlier capacities (XLA backend), first
      match wins.
    threshold_overrides: {pattern: threshold} per-layer outlier thresholds, first match wins
      (small models whose activations never reach 6.0 need a lower one; see docs/ACCURACY.md).
    in_ndim_overrides: {pattern: n} contracting-axis count for >2-D kernels, first match wins
      (default: 1 if shape[0] >= prod(shape[1:]) else ndim - 1, which fits attention's
      [features, heads, head_dim] and [heads, head_dim, features] kernels).
    kernel_names: parameter names treated as Dense-like kernels.
    quantize_embeddings: also quantize embedding tables (parameters named "embedding", [V, H])
      to int8 with one scale per row (per token): lookups dequantize the gathered rows, and a
      tied output head (Embed.attend) runs LLM.int8() on them. Off by default, like
      bitsandbytes; it halves the two largest 16-bit tensors left in an int8 Llama.
    mode: "fixed" (default): exactly these settings (bitsandbytes' numerics unless changed);
      "auto": from_pretrained chooses per-layer settings itself while loading a float checkpoint
      (jint8.auto_int8: scale migration folded into the float model and per-layer thresholds,
      calibrated on built-in text); the other fields are kept as the base. quantize_params cannot
      calibrate (it has no model): use jint8.auto_int8.calibrate_auto there.
    calibration: how a "fixed" config was chosen, "" when by hand ("auto-v3": by mode="auto";
      its params then hold migrated scales, so it belongs with the checkpoint it was saved with).
    """

    threshold: float = 6.0
    outlier_capacity: int = 64
    skip_modules: tuple[str, ...] = ()
    min_size: int = 1024
    capacity_overrides: Any = ()
    threshold_overrides: Any = ()
    in_ndim_overrides: Any = ()
    kernel_names: tuple[str, ...] = ("kernel",)
    quantize_embeddings: bool = False
    mode: str = "fixed"
    calibration: str = ""

    def __post_init__(self):
        if self.mode not in INT8_MODES:
            raise InvalidConfigError(f"Int8Config.mode={self.mode!r} must be one of {INT8_MODES}")
        if not isinstance(self.calibration, str):
            raise InvalidConfigError(f"Int8Config.calibration={self.calibration!r} must be a string")
        # bool is an int subclass: True would pass as threshold 1.0 or a capacity of 1
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise InvalidConfigError(f"Int8Config.threshold={self.threshold!r} must be a finite number")
        if self.threshold < 0:
            raise InvalidConfigError(f"Int8Config.threshold={self.threshold} must be >= 0")
        if not _is_int(self.outlier_capacity) or self.outlier_capacity < 0:
            raise InvalidConfigError(
                f"Int8Config.outlier_capacity={self.outlier_capacity!r} must be an int >= 0"
            )
        if not _is_int(self.min_size) or self.min_size < 0:
            raise InvalidConfigError(f"Int8Config.min_size={self.min_size!r} must be an int >= 0")
        if not isinstance(self.quantize_embeddings, bool):
            raise InvalidConfigError(f"Int8Config.quantize_embeddings={self.quantize_embeddings!r} must be a bool")
        if isinstance(self.skip_modules, str):
            object.__setattr__(self, "skip_modules", (self.skip_modules,))
        object.__setattr__(self, "skip_modules", tuple(self.skip_modules))
        if isinstance(self.kernel_names, str):
            object.__setattr__(self, "kernel_names", (self.kernel_names,))
        object.__setattr__(self, "kernel_names", tuple(self.kernel_names))  # JSON gives lists
        if not self.kernel_names or not all(isinstance(n, str) and n for n in self.kernel_names):
            raise InvalidConfigError(
                f"Int8Config.kernel_names={self.kernel_names!r} must be non-empty parameter names (empty quantizes nothing)")
        for pattern in self.skip_modules:
            _compile_pattern(pattern, "Int8Config.skip_modules")
        object.__setattr__(
            self,
            "capacity_overrides",
            _as_pairs(self.capacity_overrides, "Int8Config.capacity_overrides", 0),
        )
        object.__setattr__(
            self, "in_ndim_overrides", _as_pairs(self.in_ndim_overrides, "Int8Config.in_ndim_overrides", 1)
        )
        items = self.threshold_overrides.items() if isinstance(self.threshold_overrides, Mapping) else self.threshold_overrides
        thresholds = tuple((k, v) for k, v in items)
        for pattern, value in thresholds:
            _compile_pattern(pattern, "Int8Config.threshold_overrides")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidConfigError(f"Int8Config.threshold_overrides[{pattern!r}]={value!r} must be a finite number >= 0")
        object.__setattr__(self, "threshold_overrides", tuple((str(k), float(v)) for k, v in thresholds))

    @classmethod
    def from_bitsandbytes(cls, bnb_config, **overrides) -> "Int8Config":
        """The Int8Config equivalent to a transformers.BitsAndBytesConfig (or its dict) for 8-bit.

        llm_int8_threshold -> threshold; llm_int8_skip_modules -> skip_modules (None means
        transformers' default, the output head: ("lm_head",)); every Linear is quantized, as
        bitsandbytes does (min_size=0). Options with no int8-inference meaning raise.
        """
        options = bnb_config if isinstance(bnb_config, Mapping) else bnb_config.to_dict()
        method = options.get("quant_method", "bitsandbytes")
        method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
        if str(method).lower().rsplit(".", 1)[-1] != "bitsandbytes":
            raise InvalidConfigError(f"quantization_config.quant_method={method!r} is not 'bitsandbytes'")
        if options.get("load_in_4bit"):
            raise InvalidConfigError(
                "BitsAndBytesConfig(load_in_4bit=True) is 4-bit (NF4/FP4): use jint8.Int4Config.from_bitsandbytes"
            )
        if not options.get("load_in_8bit"):
            raise InvalidConfigError("BitsAndBytesConfig.load_in_8bit must be True for an Int8Config")
        if options.get("llm_int8_enable_fp32_cpu_offload"):
            raise InvalidConfigError(
                "llm_int8_enable_fp32_cpu_offload=True has no jint8 equivalent: place the model on a "
                "mesh with from_pretrained(mesh=..., max_memory=...) instead"
            )
        if options.get("llm_int8_has_fp16_weight"):
            raise InvalidConfigError(
                "llm_int8_has_fp16_weight=True keeps 16-bit master weights for training; jint8 is "
                "for inference: apply the float params directly, or quantize them with this flag off"
            )
        skip = options.get("llm_int8_skip_modules")
        fields = dict(
            threshold=float(options.get("llm_int8_threshold", 6.0)),
            skip_modules=("lm_head",) if skip is None else tuple(skip),
            min_size=0,
        )
        fields.update(overrides)
        return cls(**fields)

    def is_skipped(self, path: Sequence[str]) -> bool:
        return any(_compile_pattern(p, "skip_modules")(path) for p in self.skip_modules)

    def capacity_for(self, path: Sequence[str]) -> int:
        for pattern, capacity in self.capacity_overrides:
            if _compile_pattern(pattern, "capacity_overrides")(path):
                return capacity
        return int(self.outlier_capacity)

    def threshold_for(self, path: Sequence[str]) -> float:
        for pattern, threshold in self.threshold_overrides:
            if _compile_pattern(pattern, "threshold_overrides")(path):
                return threshold
        return float(self.threshold)

    def in_ndim_for(self, path: Sequence[str], shape: Sequence[int]) -> int:
        for pattern, n in self.in_ndim_overrides:
            if _compile_pattern(pattern, "in_ndim_overrides")(path):
                if not 1 <= n < len(shape):
                    raise InvalidConfigError(
                        f"in_ndim_overrides: {n} invalid for {'/'.join(path)} with shape {tuple(shape)}"
                    )
                return n
        if len(shape) == 2 or shape[0] >= math.prod(shape[1:]):
            return 1
        return len(shape) - 1


# ----------------------------------------------------------------------------- tree transforms


def _path_names(key_path) -> tuple[str, ...]:
    names = []
    for key in key_path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_kernel(path: str, leaf) -> None:
    dtype = jnp.asarray(leaf).dtype if not hasattr(leaf, "dtype") else leaf.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise QuantizationError(f"{path}: kernel has dtype {dtype}; only floating kernels can be quantized")
    if not _is_tracer(leaf):
        finite = jnp.isfinite(leaf)
        if not bool(jnp.all(finite)):
            bad = int(jnp.size(finite) - jnp.sum(finite))
            raise QuantizationError(f"{path}: kernel of shape {tuple(leaf.shape)} holds {bad} NaN/Inf values")


def int8_weight_specs(float_spec, ndim: int, in_ndim: int, *, embedding: bool = False):
    """(qvalue spec, scale spec) of the Int8Weight of a float parameter sharded by float_spec:
    the same mesh axes on the same logical axes. A kernel [*in, *out] is stored K-major, so its
    spec is permuted; an embedding table [V, H] is already [*out, *in] and keeps its spec."""
    spec = tuple(float_spec) + (None,) * (ndim - len(tuple(float_spec)))
    stored = spec if embedding else tuple(spec[i] for i in storage_permutation(ndim, in_ndim))
    return jax.sharding.PartitionSpec(*stored), jax.sharding.PartitionSpec(*stored[: ndim - in_ndim])


def _keep_sharding(original, weight: Int8Weight, *, embedding: bool = False) -> Int8Weight:
    """Shard qvalue and scale on the same logical axes as the float parameter was."""
    sharding = getattr(original, "sharding", None)
    if _is_tracer(original) or not isinstance(sharding, jax.sharding.NamedSharding):
        return weight
    q_spec, s_spec = int8_weight_specs(sharding.spec, original.ndim, weight.in_ndim, embedding=embedding)
    return weight.replace(
        qvalue=jax.device_put(weight.qvalue, jax.sharding.NamedSharding(sharding.mesh, q_spec)),
        scale=jax.device_put(weight.scale, jax.sharding.NamedSharding(sharding.mesh, s_spec)),
    )


EMBEDDING_NAME = "embedding"


@dataclasses.dataclass(frozen=True)
class LeafQuantization:
    """What quantize_params does with one leaf, decided from its path and shape alone.

    Every such leaf is checked (floating dtype, no NaN/Inf); a quantized one becomes an
    Int8Weight with these settings, or with int4 set an Int4Weight of the kernel transposed to
    a torch Linear's [out, in] (bitsandbytes' layout). embedding: an [V, H] table, already
    K-major (no transpose; a 4-bit one is the table as bitsandbytes' Embedding4bit stores it).
    """

    quantized: bool
    embedding: bool = False
    in_ndim: int = 1
    threshold: float = 6.0
    outlier_capacity: int = 64
    int4: Optional[Int4Config] = None


OUTPUT_HEAD_NAME = "lm_head"  # every jint8 model's untied output head; tied ones call embedding.attend


def has_output_head(module_paths) -> bool:
    """Whether a tree with these module (or leaf) paths has an untied output head: without one,
    a jint8 model's head is its embedding table (tie_word_embeddings)."""
    return any(OUTPUT_HEAD_NAME in tuple(path) for path in module_paths)


def tied_table_stays_float(config, output_head: bool) -> bool:
    """Whether Int4Config(quantize_embeddings=True) keeps embedding tables 16-bit because the
    model's head is the tied table (no lm_head module) and config skips lm_head: the head is
    what bitsandbytes' load_in_4bit keeps 16-bit, and a tied table cannot be both."""
    return (isinstance(config, Int4Config) and config.quantize_embeddings and not output_head
            and config.is_skipped((OUTPUT_HEAD_NAME,)))


def warn_tied_table(config, leaf_paths) -> None:
    """Log a warning where tied_table_stays_float keeps a tree's embedding tables 16-bit."""
    leaf_paths = [tuple(path) for path in leaf_paths]
    tables = any(path and path[-1] == EMBEDDING_NAME for path in leaf_paths)
    if tables and tied_table_stays_float(config, has_output_head(leaf_paths)):
        _logger.warning("Int4Config(quantize_embeddings=True): the tree has no %s module, so its output head is the "
                        "tied embedding table; it stays 16-bit because skip_modules=%r skips %s (drop that skip to "
                        "quantize the table, head included, to 4 bits)", OUTPUT_HEAD_NAME, config.skip_modules,
                        OUTPUT_HEAD_NAME)


def leaf_quantization(names: Sequence[str], shape: Sequence[int], config, *,
                      output_head: bool = True) -> Optional[LeafQuantization]:
    """How quantize_params treats the leaf at `names` of `shape` (None: left as it is, unchecked);
    config an Int8Config or Int4Config, whose kernel_names / min_size / skip_modules rules agree.
    output_head: whether the tree has an lm_head module (has_output_head); without one a 4-bit
    config that skips lm_head keeps the tied embedding tables float (tied_table_stays_float)."""
    names, shape = tuple(names), tuple(shape)
    if not names:
        return None
    embedding = names[-1] == EMBEDDING_NAME and getattr(config, "quantize_embeddings", False)
    if embedding:
        if len(shape) != 2:
            return None
    elif names[-1] not in config.kernel_names or len(shape) not in (2, 3):
        return None  # not Dense-like (conv kernels, vectors): left untouched
    module = names[:-1]
    if math.prod(shape) < config.min_size or config.is_skipped(module):
        return LeafQuantization(quantized=False, embedding=embedding)
    if embedding and isinstance(config, Int4Config):
        if tied_table_stays_float(config, output_head):
            return LeafQuantization(quantized=False, embedding=True)
        return LeafQuantization(quantized=True, embedding=True, int4=config)
    if isinstance(config, Int4Config):
        # bitsandbytes' 4-bit format is a torch Linear's [out, in] weight: 3-D kernels stay float
        return LeafQuantization(quantized=len(shape) == 2, int4=config)
    in_ndim = 1 if embedding else config.in_ndim_for(module, shape)
    return LeafQuantization(True, embedding, in_ndim, config.threshold_for(module), config.capacity_for(module))


def quantize_leaf(w: jax.Array, plan: LeafQuantization):
    """The Int8Weight (Int4Weight with plan.int4) quantize_params makes of w (a kernel [*in, *out]
    or an embedding [V, H])."""
    if plan.int4 is not None:
        cfg = plan.int4
        # a kernel [in, out] becomes a torch Linear's [out, in]; a table [V, H] is stored as it is
        weight = quantize_4bit(w if plan.embedding else jnp.transpose(w), quant_type=cfg.quant_type,
                               blocksize=cfg.blocksize, double_quant=cfg.double_quant)
        return weight.replace(compute_dtype=cfg.compute_dtype)
    if plan.embedding:
        # an embedding table [V, H] is already K-major for its attend() matmul (logits = x @ E.T):
        # qvalue = the int8 table, scale [V] = each row's absmax
        return quantize_kmajor(w, in_ndim=1, threshold=plan.threshold, outlier_capacity=plan.outlier_capacity)
    return quantize_vectorwise(w, in_ndim=plan.in_ndim, threshold=plan.threshold,
                               outlier_capacity=plan.outlier_capacity)


def _quantize_leaf(key_path, leaf, config, output_head: bool = True):
    if isinstance(leaf, (Int8Weight, Int4Weight)):
        return leaf  # idempotent: an already quantized kernel is kept as it is
    names = _path_names(key_path)
    plan = leaf_quantization(names, getattr(leaf, "shape", ()), config, output_head=output_head)
    if plan is None:
        return leaf
    _check_kernel("/".join(names), leaf)
    if not plan.quantized:
        return leaf
    if plan.int4 is not None:
        return _shard_like(leaf, quantize_leaf(leaf, plan), replicated=plan.embedding)
    return _keep_sharding(leaf, quantize_leaf(leaf, plan), embedding=plan.embedding)


def _shard_like(original, weight: Int4Weight, *, replicated: bool = False) -> Int4Weight:
    """An Int4Weight of a kernel with a NamedSharding, on that mesh: split along N where the
    kernel is column-parallel in whole blocks, else replicated (quant4.int4_weight_specs says
    which splits its packed layout allows); replicated: every array whole on each device (a
    4-bit embedding table, which Int8Embed gathers from one array)."""
    sharding = getattr(original, "sharding", None)
    if _is_tracer(original) or not isinstance(sharding, jax.sharding.NamedSharding):
        return weight
    if replicated:
        specs = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), weight)
    else:
        specs, _ = int4_weight_specs(sharding.spec, weight, sharding.mesh.shape)
    return jax.tree.map(lambda a, s: jax.device_put(a, jax.sharding.NamedSharding(sharding.mesh, s)), weight, specs)


def dequantize_embedding(weight: Int8Weight, dtype=jnp.float32) -> jax.Array:
    """The float table [V, H] an int8 embedding stands for (rows times their scale / 127)."""
    return (weight.qvalue.astype(jnp.float32) * weight.scale[:, None] * INV_127).astype(dtype)


def _dequantize_leaf(key_path, leaf, dtype):
    if not isinstance(leaf, (Int8Weight, Int4Weight)):
        return leaf
    names = _path_names(key_path)
    if isinstance(leaf, Int4Weight):
        if names and names[-1] == EMBEDDING_NAME:
            return leaf.dequantize(dtype)  # a table [V, H], stored as it is
        return jnp.transpose(leaf.dequantize(dtype))  # stored [out, in]: the kernel is [in, out]
    if names and names[-1] == EMBEDDING_NAME:
        return dequantize_embedding(leaf, dtype)
    return leaf.dequantize(dtype)


def _map_tree(params, fn):
    """Apply fn(key_path, leaf) over Linen dicts (FrozenDict too) and flax.nnx.State."""
    from flax import nnx
    from flax.core import FrozenDict, freeze, unfreeze

    if isinstance(params, nnx.State):
        pure = _map_tree(params.to_pure_dict(), fn)
        result = jax.tree.map(lambda x: x, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
        result.replace_by_pure_dict(pure)
        return result
    if isinstance(params, FrozenDict):
        return freeze(_map_tree(unfreeze(params), fn))
    is_weight = lambda x: isinstance(x, (Int8Weight, Int4Weight))  # noqa: E731
    return jax.tree_util.tree_map_with_path(fn, params, is_leaf=is_weight)


def quantize_params(params, config=None):
    """Replace every Dense-like kernel in a Linen param dict or nnx.State by an Int8Weight
    (config an Int8Config, the default) or an Int4Weight (an Int4Config: NF4/FP4 of the kernel
    as a torch Linear's [out, in] weight, exactly what bitsandbytes' load_in_4bit stores).

    Pure: returns a new tree; the input is unchanged. Norms, biases, skipped modules, kernels
    smaller than config.min_size and (unless config.quantize_embeddings) embeddings stay as they
    are; a 4-bit embedding table is an Int4Weight of [V, H] as bitsandbytes' Embedding4bit
    stores it (replicated on a mesh). Idempotent: Int8Weight leaves of
    an already quantized tree are kept unchanged. Works under jax.jit (the NaN/Inf check then
    cannot run) and keeps a NamedSharding of the input kernels.
    """
    config = config or Int8Config()
    if not isinstance(config, (Int8Config, Int4Config)):
        raise InvalidConfigError(f"config must be an Int8Config or Int4Config, got {type(config).__name__}")
    if getattr(config, "mode", "fixed") == "auto":
        raise InvalidConfigError("quantize_params cannot calibrate Int8Config(mode='auto') without the model: "
                                 "use jint8.from_pretrained(..., quantization=Int8Config(mode='auto')) or "
                                 "jint8.auto_int8.calibrate_auto(model, params, tokenizer=...)")
    is_weight = lambda x: isinstance(x, (Int8Weight, Int4Weight))  # noqa: E731
    leaf_paths = [_path_names(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_weight)[0]]
    output_head = has_output_head(leaf_paths)
    modules = []

    def quantize(key_path, leaf):
        modules.append(_path_names(key_path)[:-1])
        return _quantize_leaf(key_path, leaf, config, output_head)

    quantized = _map_tree(params, quantize)
    warn_unmatched_patterns(config, modules)
    warn_tied_table(config, leaf_paths)
    return quantized


def dequantize_params(params, dtype=jnp.float32):
    """Replace every Int8Weight / Int4Weight by the float kernel it stands for (Wq * s_w / 127, or
    bitsandbytes' dequantize_4bit transposed back to [in, out]), in dtype."""
    return _map_tree(params, lambda kp, leaf: _dequantize_leaf(kp, leaf, dtype))


def param_bytes(params) -> int:
    """Total bytes of a parameter tree (int8 values + scales, or 4-bit codes + absmax, for
    quantized kernels)."""
    leaves = jax.tree.leaves(params)
    return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in leaves))
