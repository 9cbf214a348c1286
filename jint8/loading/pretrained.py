"""from_pretrained: checkpoint -> (Flax model, params) quantized while loading, placed on a mesh.

Each tensor is read once (a view of the memory-mapped file for safetensors), moved to the
device(s) as stored, each device receiving only its shard, and laid out, cast and quantized
there by a jitted conversion compiled once per distinct shape (device_convert); reads, compiles
and device work overlap (streaming). Quantization follows Int8Config's rules with quantize_params'
own functions, so the numbers are the library's. The full-precision model never sits on an
accelerator. Names, shapes and dtypes are checked against the model before anything is placed;
if a later step fails, what was placed is deleted before the error propagates.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import unflatten_dict
from jax.sharding import NamedSharding, SingleDeviceSharding

from jint8.errors import (
    CheckpointFileError,
    InvalidConfigError,
    QuantizationError,
    UnsupportedArchitectureError,
    WeightsMismatchError,
)
from jint8.loading import gguf_file, msgpack_file, safetensors_file
from jint8.loading.bnb_int4 import QuantStateRecords, bnb_int4_settings, read_int4_kernel, split_bnb4_records
from jint8.loading.bnb_int8 import bnb_int8_settings, read_int8_kernel, split_bnb_records
from jint8.loading.config_check import abstract_params, check_config_against_arrays
from jint8.loading.device_convert import default_device, plan_conversion, stage, stage_sharded
from jint8.loading.names import (
    NameRules,
    TensorTarget,
    expected_tensors,
    match_checkpoint_name,
    needs_transpose,
    stored_shape,
)
from jint8.loading.records import TensorRecord, check_readable
from jint8.loading.sharding import bytes_per_device, check_max_memory, kernel_spec
from jint8.loading.streaming import TensorJob, delete_arrays, run_jobs
from jint8.models import registered_specs, spec_for
from jint8.models.spec import ShardingRules
from jint8.progress import progress_bar
from jint8.quant4 import Int4Config, Int4Weight, NESTED_BLOCKSIZE, int4_weight_specs
from jint8.quantize import (
    EMBEDDING_NAME,
    Int8Config,
    Int8Weight,
    LeafQuantization,
    has_output_head,
    int8_weight_specs,
    leaf_quantization,
    storage_permutation,
    warn_tied_table,
    warn_unmatched_patterns,
)

_logger = logging.getLogger("jint8")

# model_type -> the family's name-map deviations, as the built-in families' ModelSpecs declare
# them (name_rules_for reads the registry itself, so families registered later count too)
NAME_RULES: dict[str, NameRules] = {t: spec.name_rules for spec in registered_specs() for t in spec.model_types}


def name_rules_for(model_type: str) -> NameRules:
    """The checkpoint name rules of a model_type's family (the generic rules if it has none)."""
    try:
        return spec_for(model_type).name_rules
    except UnsupportedArchitectureError:
        return NameRules()


def _find_format(path: Path) -> tuple[str, Path]:
    """("gguf" | "safetensors" | "msgpack", file or directory)."""
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise CheckpointFileError(f"{path}: a file path must be a .gguf file; pass a checkpoint directory otherwise")
    if not path.is_dir():
        raise CheckpointFileError(f"{path}: no such file or directory")
    if (path / safetensors_file.INDEX_FILE).exists() or (path / safetensors_file.SINGLE_FILE).exists():
        return "safetensors", path
    if (path / msgpack_file.INDEX_FILE).exists() or (path / msgpack_file.SINGLE_FILE).exists():
        return "msgpack", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise CheckpointFileError(f"{path}: holds several GGUF files {[g.name for g in ggufs]}; pass one file path")
    pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
    hint = f" (found pickle files {pickles}; jint8 does not unpickle: convert them to safetensors)" if pickles else ""
    raise CheckpointFileError(f"{path}: no model.safetensors, index, flax_model.msgpack or .gguf file{hint}")


def _hf_config(kind: str, location: Path):
    if kind == "gguf":
        return gguf_file.gguf_hf_config(location)
    from transformers import AutoConfig

    if not (location / "config.json").exists():
        raise CheckpointFileError(f"{location}: no config.json")
    check_readable(location / "config.json")
    try:
        return AutoConfig.from_pretrained(os.fspath(location))
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointFileError(f"{location / 'config.json'}: {e}") from None


def _records(kind: str, location: Path, hf_config, table) -> list[TensorRecord]:
    if kind == "gguf":
        return gguf_file.gguf_records(location, hf_config, table)
    if kind == "msgpack":
        return msgpack_file.msgpack_records(location)
    return safetensors_file.safetensors_records(location)


def _backend_and_records(kind: str, location: Path) -> Optional[list[TensorRecord]]:
    """The default backend started and, but for GGUF (whose records need the config), the
    checkpoint's tensor records."""
    jax.devices()
    return None if kind == "gguf" else _records(kind, location, None, None)


def _stores_lm_head(records) -> bool:
    """Whether a checkpoint holds its own output head (an lm_head.weight tensor)."""
    return any(record.name == "lm_head.weight" or record.name.endswith(".lm_head.weight") for record in records)


def _match(records, table: Mapping[str, TensorTarget], rules: NameRules, tied: bool):
    """[(record, target)] for every expected tensor; WeightsMismatchError naming files and tensors."""
    plan, seen, unknown, wrong_shape = [], {}, [], []
    for record in records:
        key = match_checkpoint_name(record.name, table, rules)
        if key is None or (tied and record.name.endswith("lm_head.weight") and key not in table):
            continue
        if key not in table:
            unknown.append(f"{record.stored_name!r} in {record.file}")
            continue
        target = table[key]
        want = stored_shape(target, record.flax_layout, rules)
        if record.shape is not None and tuple(record.shape) != want:
            wrong_shape.append(f"{record.stored_name!r} in {record.file}: shape {record.shape}, model expects {want}")
        seen[key] = record
        plan.append((record, target))
    missing = [name for name in table if name not in seen]
    problems = []
    if wrong_shape:
        problems.append("shape mismatch: " + "; ".join(wrong_shape[:8]))
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if unknown:
        problems.append(f"unknown to the model: {unknown[:8]}" + (" ..." if len(unknown) > 8 else ""))
    if problems:
        raise WeightsMismatchError("checkpoint does not match the model built from its config: " + " | ".join(problems))
    return plan


def _planned_leaves(shapes: dict, quantization: Optional[Int8Config]) -> tuple[dict, dict]:
    """({path: ShapeDtypeStruct | Int8Weight of ShapeDtypeStructs} after quantization,
    {path: LeafQuantization} of the quantized leaves): quantize_params' decisions, made from
    paths and shapes alone (no tracing)."""
    planned, decisions = dict(shapes), {}
    if quantization is None:
        return planned, decisions
    warn_unmatched_patterns(quantization, [path[:-1] for path in shapes])
    warn_tied_table(quantization, shapes)
    output_head = has_output_head(shapes)
    for path, leaf in shapes.items():
        decision = leaf_quantization(path, leaf.shape, quantization, output_head=output_head)
        if decision is None or not decision.quantized:
            continue
        if decision.int4 is not None:  # a kernel as a torch Linear's [out, in]; a table [V, H] as it is
            stored = tuple(leaf.shape) if decision.embedding else tuple(leaf.shape[::-1])
            planned[path] = _planned_int4(stored, decision.int4, leaf.dtype)
            decisions[path] = decision
            continue
        ndim = len(leaf.shape)
        stored = tuple(leaf.shape) if decision.embedding else tuple(
            leaf.shape[i] for i in storage_permutation(ndim, decision.in_ndim))
        planned[path] = Int8Weight(jax.ShapeDtypeStruct(stored, jnp.int8),
                                   jax.ShapeDtypeStruct(stored[: ndim - decision.in_ndim], jnp.float32),
                                   decision.in_ndim, decision.threshold, decision.outlier_capacity)
        decisions[path] = decision
    return planned, decisions


def _plan_4bit_tables(planned: dict, decisions: dict, shapes: dict, quantization: Int4Config) -> None:
    """A bitsandbytes 4-bit checkpoint stores its embeddings 16-bit (its kernels keep their own
    codes): Int4Config(quantize_embeddings=True) quantizes those tables while loading."""
    tables, table_decisions = _planned_leaves(shapes, quantization)
    for path, decision in table_decisions.items():
        if decision.embedding:
            planned[path], decisions[path] = tables[path], decision


def _planned_int4(shape: tuple[int, ...], config: Int4Config, dtype) -> Int4Weight:
    """The Int4Weight of ShapeDtypeStructs that quantize_4bit makes of a weight [out, in]."""
    n = shape[0] * shape[1]
    blocks = -(-n // config.blocksize)
    sds = jax.ShapeDtypeStruct
    nested = {}
    if config.double_quant:
        nested = dict(nested_absmax=sds((-(-blocks // NESTED_BLOCKSIZE),), jnp.float32),
                      nested_code=sds((256,), jnp.float32), offset=sds((), jnp.float32))
    return Int4Weight(sds(((n + 1) // 2, 1), jnp.uint8), sds((blocks,), jnp.uint8 if config.double_quant else jnp.float32),
                      shape, quant_type=config.quant_type, blocksize=config.blocksize, dtype=jnp.dtype(dtype),
                      compute_dtype=config.compute_dtype, **nested)


def _float_spec(path, leaf, mesh, sharding: Optional[ShardingRules]) -> jax.sharding.PartitionSpec:
    """The PartitionSpec of the float parameter a planned leaf stands for ([*in, *out] for a kernel)."""
    if mesh is None:
        return jax.sharding.PartitionSpec()
    if isinstance(leaf, Int4Weight):  # stored [out, in]: the float kernel is its transpose
        float_shape = tuple(leaf.shape) if path[-1] == EMBEDDING_NAME else tuple(leaf.shape[::-1])
        return kernel_spec(path, float_shape, mesh, sharding)
    if isinstance(leaf, Int8Weight):
        embedding = path[-1] == EMBEDDING_NAME  # the float table [V, H] is stored as it is
        return kernel_spec(path, leaf.qvalue.shape if embedding else leaf.shape, mesh, sharding)
    return kernel_spec(path, leaf.shape, mesh, sharding)


def _int4_specs(path, leaf: Int4Weight, mesh, sharding: Optional[ShardingRules]) -> list:
    """The PartitionSpec of each array of a planned Int4Weight (quant4.int4_weight_specs: column-
    parallel kernels split along N in whole blocks, row-parallel ones and uneven splits replicated)."""
    if mesh is None or path[-1] == EMBEDDING_NAME:  # 4-bit tables stay whole (Int8Embed gathers from one)
        return [jax.sharding.PartitionSpec()] * len(jax.tree.leaves(leaf))
    specs, reason = int4_weight_specs(_float_spec(path, leaf, mesh, sharding), leaf, mesh.shape)
    if reason is not None:
        _logger.debug("%s: 4-bit kernel replicated on the mesh: %s", "/".join(path), reason)
    return jax.tree.leaves(specs)


def _leaf_layout(path, leaf, mesh, sharding: Optional[ShardingRules]):
    """[(shape, dtype, spec)] of the arrays one parameter becomes (qvalue + scale for int8)."""
    spec = _float_spec(path, leaf, mesh, sharding)
    if isinstance(leaf, Int4Weight):
        return [(a.shape, a.dtype, s) for a, s in zip(jax.tree.leaves(leaf), _int4_specs(path, leaf, mesh, sharding))]
    if isinstance(leaf, Int8Weight):
        embedding = path[-1] == EMBEDDING_NAME
        q_spec, s_spec = int8_weight_specs(spec, leaf.qvalue.ndim, leaf.in_ndim, embedding=embedding)
        return [(leaf.qvalue.shape, leaf.qvalue.dtype, q_spec), (leaf.scale.shape, leaf.scale.dtype, s_spec)]
    return [(leaf.shape, leaf.dtype, spec)]


@dataclasses.dataclass(frozen=True)
class _LoadSettings:
    rules: NameRules
    sharding: Optional[ShardingRules]
    dtype: Any
    quantization: Optional[Int8Config]
    mesh: Optional[jax.sharding.Mesh]
    bnb: Optional[Int8Config]  # a bitsandbytes checkpoint's own settings
    bnb4: Optional[Int4Config] = None  # a bitsandbytes 4-bit checkpoint's own settings


def _place(array, mesh, spec):
    """A host array (a view of a memory-mapped file, say) on the default device, or on mesh with
    spec: each device gets a copy of its own block, read from the array, and in a multi-process
    run a process reads only its own devices' blocks. An accelerator's device_put copies the
    array to the device; a CPU device_put may keep viewing host memory (the file would stay
    mapped), so for a CPU device it is copied first."""
    if mesh is None:
        device = default_device()
        if device.platform == "cpu":
            array = np.array(array)
        return jax.device_put(array, SingleDeviceSharding(device))
    return stage_sharded(array, NamedSharding(mesh, spec))


def _bnb_weight(record: TensorRecord, scale: TensorRecord, target: TensorTarget, settings: _LoadSettings) -> Int8Weight:
    """A bitsandbytes int8 kernel as it is; the LLM.int8() settings come from `quantization` if given."""
    qvalue, col_scales = read_int8_kernel(record, scale)
    if qvalue.shape[::-1] != target.shape:
        raise WeightsMismatchError(
            f"{record.file}: tensor {record.stored_name!r} is {qvalue.shape} ([out, in]), model expects "
            f"{target.shape[::-1]}")
    config = settings.quantization or settings.bnb
    module_path = target.path[:-1]
    return Int8Weight(qvalue, col_scales, 1, config.threshold_for(module_path), config.capacity_for(module_path))


def _bnb4_job(record: TensorRecord, state: QuantStateRecords, target: TensorTarget, settings: _LoadSettings):
    """A bitsandbytes 4-bit kernel as stored; the compute dtype from `quantization` if given."""
    compute_dtype = (settings.quantization or settings.bnb4).compute_dtype

    def stage_bnb4():
        weight = read_int4_kernel(record, state, compute_dtype)
        if weight.shape != target.shape[::-1]:
            raise WeightsMismatchError(f"{record.file}: 4-bit weight {record.stored_name!r} is {weight.shape} "
                                       f"([out, in]), model expects {target.shape[::-1]}")
        specs = _int4_specs(target.path, weight, settings.mesh, settings.sharding)
        leaves, structure = jax.tree.flatten(weight)
        # each device's own range of the (memory-mapped) arrays, copied
        placed = jax.tree.unflatten(structure, [_place(a, settings.mesh, s) for a, s in zip(leaves, specs)])
        return placed, sum(int(np.asarray(a).nbytes) for a in leaves), None

    def release():
        if record.release is not None:
            record.release()
        state.release()

    return TensorJob(target.path, stage_bnb4, None, lambda outputs: outputs, release)


def _plan_bnb4_kernels(planned: dict, states: Mapping[str, QuantStateRecords], table) -> None:
    """Mark the kernels stored as bitsandbytes 4-bit as Int4Weight (array shapes as stored)."""
    for name, state in states.items():
        if name not in table:
            record = state.parts["quant_state"]
            raise WeightsMismatchError(f"{record.file}: {record.stored_name!r} belongs to no kernel of the model")
        target = table[name]
        arrays = {field: jax.ShapeDtypeStruct(state.parts[suffix].shape, state.parts[suffix].dtype or np.float32)
                  for field, suffix in (("absmax", ".absmax"), ("nested_absmax", ".nested_absmax"),
                                        ("nested_code", ".nested_quant_map")) if suffix in state.parts}
        if "nested_absmax" in arrays:
            arrays["offset"] = jax.ShapeDtypeStruct((), jnp.float32)
        n = int(np.prod(target.shape))
        planned[target.path] = Int4Weight(jax.ShapeDtypeStruct(((n + 1) // 2, 1), jnp.uint8), shape=target.shape[::-1],
                                          **arrays)


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or np.dtype(dtype).name == "bfloat16"


def _non_float_error(record: TensorRecord, dtype) -> CheckpointFileError:
    return CheckpointFileError(f"{record.file}: tensor {record.stored_name!r} has non-float dtype {dtype}")


def _read_stored(record: TensorRecord, target: TensorTarget, rules: NameRules) -> np.ndarray:
    """Read one tensor (a view of the file where the format allows) and check it against the target."""
    array = record.read()
    if tuple(array.shape) != stored_shape(target, record.flax_layout, rules):
        got = tuple(reversed(array.shape)) if needs_transpose(target, record.flax_layout, rules) else array.shape
        raise WeightsMismatchError(
            f"{record.file}: tensor {record.stored_name!r} has shape {tuple(got)}, model expects {target.shape}")
    if not _is_float(array.dtype):
        raise _non_float_error(record, array.dtype)
    return array


def _tensor_job(record: TensorRecord, target: TensorTarget, planned, decision: Optional[LeafQuantization],
                bnb_scale: Optional[TensorRecord], settings: _LoadSettings,
                bnb4_state: Optional[QuantStateRecords] = None) -> TensorJob:
    """How one checkpoint tensor is read, moved and converted (nothing is read here)."""
    if bnb4_state is not None:
        return _bnb4_job(record, bnb4_state, target, settings)
    if bnb_scale is not None:
        layout = _leaf_layout(target.path, planned, settings.mesh, settings.sharding)

        def stage_bnb():
            weight = _bnb_weight(record, bnb_scale, target, settings)
            # copies: the arrays view the memory-mapped file, and a CPU device_put would keep them
            qvalue, scale = weight.qvalue, weight.scale
            placed = weight.replace(qvalue=_place(qvalue, settings.mesh, layout[0][2]),
                                    scale=_place(scale, settings.mesh, layout[1][2]))
            return placed, qvalue.nbytes + scale.nbytes, None

        return TensorJob(target.path, stage_bnb, None, lambda outputs: outputs, record.release)
    if record.dtype is not None and not _is_float(record.dtype):
        raise _non_float_error(record, record.dtype)
    # a float leaf takes the dtype the model declares for it: `dtype` unless the family keeps a
    # module in float32 (T5's wo in a float16 model, as transformers' _keep_in_fp32_modules)
    out_dtype = planned.dtype if isinstance(planned, jax.ShapeDtypeStruct) else settings.dtype
    conversion_for = functools.partial(
        plan_conversion, stored_shape(target, record.flax_layout, settings.rules),
        transpose=needs_transpose(target, record.flax_layout, settings.rules), quantization=decision,
        out_dtype=jnp.dtype(out_dtype), mesh=settings.mesh,
        float_spec=_float_spec(target.path, planned, settings.mesh, settings.sharding),
        int4_specs=(tuple(_int4_specs(target.path, planned, settings.mesh, settings.sharding))
                    if isinstance(planned, Int4Weight) else None),
        row_order=record.row_order)
    # formats whose headers give no dtype (msgpack, GGUF) plan their conversion once read
    expected = conversion_for(record.dtype) if record.dtype is not None else None

    def stage_stored():
        array = _read_stored(record, target, settings.rules)
        conversion = expected if expected is not None and array.dtype == record.dtype else conversion_for(array.dtype)
        # the bytes the file held (what the progress total counts), not a dequantized GGUF tensor's
        return stage(array, conversion), record.nbytes if record.nbytes is not None else array.nbytes, conversion

    if decision is None or not decision.quantized:
        return TensorJob(target.path, stage_stored, expected, lambda outputs: outputs[0], record.release)
    if decision.int4 is not None:  # the outputs are the Int4Weight's arrays, then the NaN/Inf flag
        structure = jax.tree.structure(planned)
        return TensorJob(target.path, stage_stored, expected,
                         lambda outputs: jax.tree.unflatten(structure, outputs[:-1]), record.release)
    return TensorJob(target.path, stage_stored, expected,
                     lambda outputs: planned.replace(qvalue=outputs[0], scale=outputs[1]), record.release)


def _plan_bnb_kernels(planned: dict, bnb_scales: dict, table) -> None:
    """Mark the kernels stored as bitsandbytes int8 as Int8Weight in the placement plan."""
    for name in bnb_scales:
        if name not in table:
            record = bnb_scales[name]
            raise WeightsMismatchError(f"{record.file}: {record.stored_name!r} belongs to no kernel of the model")
        target = table[name]
        planned[target.path] = Int8Weight(jax.ShapeDtypeStruct(target.shape[::-1], jnp.int8),
                                          jax.ShapeDtypeStruct(target.shape[1:], jnp.float32))


def _raise_on_nonfinite(flags, records: Mapping[tuple, TensorRecord]) -> None:
    """quantize_params' NaN/Inf check, on the flags the conversions left on the device (one transfer
    of a few scalars); a tensor found bad is read again on the host to count its bad values."""
    values = jax.device_get([flag for _, _, flag in flags])
    for (path, conversion, _), nonfinite in zip(flags, values):
        if nonfinite:
            shape = conversion.shape[::-1] if conversion.transpose else conversion.shape
            record = records[path]
            bad = int(np.sum(~np.isfinite(record.read())))
            what = "kernel" if conversion.quantization is not None else "tensor"
            raise QuantizationError(f"{'/'.join(path)}: {what} of shape {tuple(shape)} holds {bad} NaN/Inf values "
                                    f"({record.stored_name!r} in {record.file})")


def from_pretrained(
    path,
    *,
    quantization: Optional[Int8Config] = None,
    dtype=jnp.bfloat16,
    mesh: Optional[jax.sharding.Mesh] = None,
    max_memory: Optional[Mapping] = None,
    progress: Optional[bool] = None,
    verify_checksums: bool = True,
):
    """Load a transformers checkpoint directory (safetensors, v4 Flax msgpack) or GGUF file.

    bitsandbytes 8-bit checkpoints keep their int8 kernels as they are (threshold from the
    checkpoint's llm_int8_threshold unless `quantization` is given); 4-bit ones (NF4/FP4, with or
    without double quantization) their packed codes and absmax (compute dtype from
    bnb_4bit_compute_dtype unless an Int4Config is given). quantization=Int4Config(...) of a
    float checkpoint quantizes each kernel to 4 bits while loading, from the weight cast to
    `dtype` (as transformers casts to torch_dtype before bitsandbytes quantizes). On a mesh a
    column-parallel 4-bit kernel is split along N where its shards are whole blocks (and whole
    256-block groups with double quantization); row-parallel ones and uneven splits are
    replicated (quant4.int4_weight_specs says why). quantization=Int8Config(mode="auto") of a
    float checkpoint loads it in float32, calibrates per-layer settings on jint8's built-in text
    and quantizes (jint8.auto_int8.load_auto_int8); of a checkpoint that mode "auto" saved,
    restores it as saved.

    Returns (model, params): model a jint8 Flax module (compute dtype `dtype`), params the
    {"params": ...}-less parameter tree, int8 where `quantization` says so, placed on `mesh`
    (column/row/vocab-parallel over its "model" axis) or on the default device.
    max_memory: {device id: bytes or "20GiB"}, checked before anything is read.
    progress: a tqdm bar over the bytes read (with MB/s); default: shown when stderr is a
      terminal; False silences it.
    verify_checksums: for jint8 checkpoints, compare each array with its CRC-32C recorded at save
      (load_quantized's argument); False skips it for trusted storage.
    """
    if quantization is not None and not isinstance(quantization, (Int8Config, Int4Config)):
        raise InvalidConfigError(
            f"quantization must be an Int8Config, an Int4Config or None, got {type(quantization).__name__}")
    from jint8 import checkpoint

    if Path(path).is_dir() and (checkpoint.is_jint8_checkpoint(path) or _looks_like_jint8_checkpoint(Path(path))):
        # a damaged jint8 checkpoint gets load_quantized's error, not "no model.safetensors"
        return _from_jint8_checkpoint(Path(path), quantization, mesh, verify_checksums, max_memory)
    if isinstance(quantization, Int8Config) and quantization.mode == "auto":
        from jint8.auto_int8 import load_auto_int8

        model, params, _ = load_auto_int8(path, quantization, dtype=dtype, mesh=mesh, max_memory=max_memory,
                                          progress=progress)
        return model, params
    kind, location = _find_format(Path(path))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jint8-load-early") as early:
        # transformers' config classes import torch and parts of its modeling code (seconds on
        # a GPU machine); the device backend's start-up and the tensor headers do not depend on
        # the config, so they run meanwhile
        early_records = early.submit(_backend_and_records, kind, location)
        hf_config = _hf_config(kind, location)
        early_records = early_records.result()
    spec = spec_for(getattr(hf_config, "model_type", None))
    config = spec.config_from_hf(hf_config, dtype)
    model = spec.model_class(config)
    shapes = abstract_params(model)
    rules = spec.name_rules
    table = expected_tensors({p: tuple(s.shape) for p, s in shapes.items()}, rules)
    records = early_records if early_records is not None else _records(kind, location, hf_config, table)
    if kind != "gguf" and getattr(config, "tie_word_embeddings", False) and _stores_lm_head(records):
        # the file decides: transformers 5 writes tie_word_embeddings=True for checkpoints whose
        # head is its own matrix (T5 v1.1, FLAN-T5, mT5), and a stored lm_head.weight is that head
        config = dataclasses.replace(config, tie_word_embeddings=False)
        model = spec.model_class(config)
        shapes = abstract_params(model)
        table = expected_tensors({p: tuple(s.shape) for p, s in shapes.items()}, rules)
    bnb4 = bnb_int4_settings(hf_config) if kind == "safetensors" else None
    bnb = bnb_int8_settings(hf_config) if kind == "safetensors" and bnb4 is None else None
    _check_bnb_quantization(location, quantization, bnb, bnb4)
    records, bnb_scales = split_bnb_records(records) if bnb is not None else (records, {})
    records, bnb4_states = split_bnb4_records(records) if bnb4 is not None else (records, {})
    if bnb4 is not None and not bnb4_states:
        raise CheckpointFileError(f"{location / 'config.json'}: quantization_config says bitsandbytes 4-bit "
                                  "(load_in_4bit), but no tensor has a 4-bit quant state (absmax, quant_state)")
    # packed 4-bit codes have their own shape; read_int4_kernel checks them against the model
    plan = _match([dataclasses.replace(r, shape=None) if r.name in bnb4_states else r for r in records],
                  table, rules, config.tie_word_embeddings)

    planned, decisions = _planned_leaves(shapes, quantization if bnb4 is None else None)
    if bnb4 is not None and isinstance(quantization, Int4Config) and quantization.quantize_embeddings:
        _plan_4bit_tables(planned, decisions, shapes, quantization)
    _plan_bnb_kernels(planned, bnb_scales, table)
    _plan_bnb4_kernels(planned, bnb4_states, table)
    layout = [entry for p, leaf in planned.items() for entry in _leaf_layout(p, leaf, mesh, spec.sharding)]
    needed = bytes_per_device(layout, mesh)
    check_max_memory(max_memory, needed, mesh)
    _logger.info("loading %s (%s): %d tensors, %.3f GiB per device", location, kind, len(plan), needed / 2**30)

    settings = _LoadSettings(rules, spec.sharding, dtype, quantization, mesh, bnb, bnb4)
    jobs = [_tensor_job(record, target, planned[target.path], decisions.get(target.path),
                        bnb_scales.get(record.name), settings, bnb4_states.get(record.name)) for record, target in plan]
    sizes = [record.nbytes for record, _ in plan]
    total = sum(sizes) if all(size is not None for size in sizes) else None
    with progress_bar(total=total, progress=progress, desc=f"loading {Path(path).name}", unit="B",
                      unit_scale=True) as bar:
        placed, flags = run_jobs(jobs, on_bytes=bar.update)
    try:
        _raise_on_nonfinite(flags, {target.path: record for record, target in plan})
    except BaseException:
        delete_arrays([list(placed.values()), [flag for _, _, flag in flags]])
        raise
    delete_arrays([flag for _, _, flag in flags])
    # the parameter tree in the model's order, whatever order the files gave the tensors in
    placed = {path: placed[path] for path in planned if path in placed}
    return model, unflatten_dict(placed)


def planned_bytes_per_device(path_or_config, *, quantization=None, dtype=jnp.bfloat16, mesh=None) -> int:
    """Bytes of parameters each device of `mesh` holds after from_pretrained(path, quantization=,
    dtype=, mesh=) of a float checkpoint, from the model's config alone: a directory holding only
    config.json, or a transformers config object (no weights need exist). The number
    from_pretrained's max_memory check uses; mesh may be a jax.sharding.AbstractMesh (no devices
    needed), e.g. to plan a 70B model on 8 GPUs from a laptop."""
    if isinstance(path_or_config, (str, os.PathLike)):
        hf_config = _hf_config("safetensors", Path(path_or_config))
    else:
        hf_config = path_or_config
    spec = spec_for(getattr(hf_config, "model_type", None))
    model = spec.model_class(spec.config_from_hf(hf_config, dtype))
    shapes = abstract_params(model)
    planned, _ = _planned_leaves(shapes, quantization)
    layout = [entry for p, leaf in planned.items() for entry in _leaf_layout(p, leaf, mesh, spec.sharding)]
    return bytes_per_device(layout, mesh)


def _check_bnb_quantization(location: Path, quantization, bnb: Optional[Int8Config], bnb4: Optional[Int4Config]):
    """A bitsandbytes checkpoint keeps its own bit width: its codes are taken as stored."""
    if bnb4 is not None and isinstance(quantization, Int8Config):
        raise InvalidConfigError(f"{location} is a bitsandbytes 4-bit checkpoint; quantization=Int8Config cannot "
                                 "re-quantize it (pass an Int4Config, or none, or quantize a float checkpoint)")
    if bnb is not None and isinstance(quantization, Int4Config):
        raise InvalidConfigError(f"{location} is a bitsandbytes 8-bit checkpoint; quantization=Int4Config cannot "
                                 "re-quantize it (pass an Int8Config, or none, or quantize a float checkpoint)")


def _model_config_from_dict(class_path: str, fields: dict, location: Path):
    """Rebuild a jint8 model config dataclass from the JSON save_quantized wrote."""
    import dataclasses
    import importlib
    import typing

    module_name, _, class_name = (class_path or "").rpartition(".")
    if not module_name.startswith("jint8.models"):
        raise CheckpointFileError(f"{location}: model_config_class={class_path!r} is not a jint8 model config")
    config_class = getattr(importlib.import_module(module_name), class_name)
    hints = typing.get_type_hints(config_class)
    values = {}
    for field in dataclasses.fields(config_class):
        if field.name not in fields:
            continue
        value, hint = fields[field.name], hints.get(field.name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = hint(**value)
        elif isinstance(value, list):
            value = tuple(value)
        elif field.name == "dtype":
            value = jnp.dtype(value)
        values[field.name] = value
    return config_class(**values)


def _looks_like_jint8_checkpoint(path: Path) -> bool:
    from jint8.checkpoint.metadata import _ARRAYS_ITEM, _METADATA_ITEM

    return (path / _METADATA_ITEM).is_dir() and (path / _ARRAYS_ITEM).is_dir()


def _auto_checkpoint(requested, stored) -> bool:
    """Whether Int8Config(mode="auto") asks for a checkpoint that mode "auto" wrote."""
    return (isinstance(requested, Int8Config) and requested.mode == "auto" and isinstance(stored, Int8Config)
            and stored.calibration.startswith("auto"))


def _from_jint8_checkpoint(location: Path, quantization: Optional[Int8Config], mesh, verify_checksums: bool = True,
                           max_memory: Optional[Mapping] = None):
    """A directory written by save_quantized: restore as saved (no re-quantization) onto mesh."""
    from jint8 import checkpoint

    info = checkpoint.load_metadata(location)
    if _auto_checkpoint(quantization, info.quant_config):
        quantization = None  # calibrated when it was saved: restored as it is
    if quantization is not None and quantization != info.quant_config:
        raise InvalidConfigError(
            f"{location} was quantized with {info.quant_config}; it cannot be re-quantized with {quantization} "
            "(load it without quantization=, or quantize the original checkpoint)"
        )
    config = _model_config_from_dict(info.model_config_class, info.model_config or {}, location)
    spec = spec_for(config.model_type)
    model = spec.model_class(config)
    check_config_against_arrays(location, model, checkpoint.restore.stored_parameter_shapes(location))

    def place(path, kernel):
        return kernel_spec(tuple(str(p) for p in path), tuple(kernel.shape), mesh, spec.sharding)

    shardings = place if mesh is not None else None
    check_max_memory(max_memory, checkpoint.restore.bytes_per_device(location, mesh=mesh, shardings=shardings), mesh)
    params, _ = checkpoint.load_quantized(location, mesh=mesh, shardings=shardings, verify_checksums=verify_checksums)
    return model, params
