"""Device meshes, per-parameter sharding (Megatron-style tensor parallelism) and max_memory.

Which modules are column-, row- or vocab-parallel is each family's ModelSpec.sharding
(jint8.models.spec.ShardingRules): column-parallel projections (q/k/v/gate/up and their fused
qkv_proj/gate_up_proj, GPT-2 c_attn/c_fc, OPT fc1, BLOOM/Falcon query_key_value/dense_h_to_4h,
lm_head) split their output features over "model": kernel P(None, "model"), bias and int8 column
scales P("model"). Row-parallel ones (o/down, c_proj, fc2, out_proj, dense/dense_4h_to_h) split the contracting features: kernel P("model", None), bias
and scales replicated (XLA all-reduces the partial sums). Embeddings are vocab-parallel
P("model", None); everything else is replicated. An axis that does not divide evenly is left
replicated. "data" replicates params.
"""

from __future__ import annotations

import math
import re
from typing import Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jint8.errors import InsufficientMemoryError, InvalidConfigError
from jint8.models import registered_sharding
from jint8.models.spec import ShardingRules

# The built-in families' module names together (the registry's, as jint8 ships it); kernel_spec
# reads the registry itself, so families registered later shard too.
_BUILTIN = registered_sharding()
COLUMN_PARALLEL = _BUILTIN.column_parallel
ROW_PARALLEL = _BUILTIN.row_parallel
VOCAB_PARALLEL = _BUILTIN.vocab_parallel
MODEL_AXIS, DATA_AXIS = "model", "data"


def make_mesh(data: int = 1, model: Optional[int] = None, devices=None) -> Mesh:
    """A ("data", "model") mesh over `devices` (default all); model defaults to the devices left."""
    devices = list(devices if devices is not None else jax.devices())
    if model is None:
        model = len(devices) // data
    if data < 1 or model < 1:
        raise InvalidConfigError(f"make_mesh: data={data} and model={model} must be >= 1")
    if data * model > len(devices):
        raise InvalidConfigError(
            f"make_mesh: data={data} x model={model} needs {data * model} devices, {len(devices)} available"
        )
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def _model_axis_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(MODEL_AXIS, 1))


def kernel_spec(path: tuple[str, ...], shape: tuple[int, ...], mesh: Mesh,
                rules: Optional[ShardingRules] = None) -> P:
    """The PartitionSpec of a float parameter at `path` (for an int8 kernel: of the float kernel it
    stands for, [*in, *out]; quantize.int8_weight_specs turns it into qvalue's and scale's).

    rules: the family's (ModelSpec.sharding); default every registered family's rules together.
    """
    rules = rules if rules is not None else registered_sharding()
    size = _model_axis_size(mesh)
    module, leaf = (path[-2] if len(path) > 1 else ""), path[-1]
    spec: tuple = (None,) * len(shape)
    if leaf == "kernel" and len(shape) == 2:
        if module in rules.column_parallel:
            spec = (None, MODEL_AXIS)
        elif module in rules.row_parallel:
            spec = (MODEL_AXIS, None)
    elif leaf == "bias" and module in rules.column_parallel:
        spec = (MODEL_AXIS,)
    elif leaf == "embedding" and module in rules.vocab_parallel:
        spec = (MODEL_AXIS, None)
    spec = tuple(axis if axis is None or shape[i] % size == 0 else None for i, axis in enumerate(spec))
    return P(*spec)


def scale_spec(kernel_spec: P, in_ndim: int, ndim: int) -> P:
    """An Int8Weight scale follows its kernel's output axes: column-parallel P("model"), row-parallel P()."""
    from jint8.quantize import int8_weight_specs

    return int8_weight_specs(kernel_spec, ndim, in_ndim)[1]


def sharding_for(path, shape, mesh: Optional[Mesh], rules: Optional[ShardingRules] = None):
    """NamedSharding for a parameter (None without a mesh: the default device); rules as kernel_spec's."""
    if mesh is None:
        return None
    return NamedSharding(mesh, kernel_spec(tuple(path), tuple(shape), mesh, rules))


def cache_spec(num_kv_heads: int, batch_size: int, mesh: Mesh) -> P:
    """PartitionSpec of a KVCache's k/v [L, B, S, K, H]: batch over "data", KV heads over "model"
    (where they divide evenly), matching the column-parallel k_proj/v_proj outputs."""
    data = DATA_AXIS if batch_size % int(mesh.shape.get(DATA_AXIS, 1)) == 0 else None
    model = MODEL_AXIS if num_kv_heads % _model_axis_size(mesh) == 0 else None
    return P(None, data, None, model, None)


def shard_cache(cache, mesh: Mesh):
    """Place a KVCache (init_cache's) on `mesh` with cache_spec."""
    sharding = NamedSharding(mesh, cache_spec(cache.k.shape[3], cache.k.shape[1], mesh))
    return jax.device_put(cache, sharding)


# ----------------------------------------------------------------------------- max_memory

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(value) -> int:
    """20 * 2**30, "20GiB", "1.5GB" -> bytes."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).upper() not in _UNITS:
        raise InvalidConfigError(f"max_memory: cannot parse {value!r} as a size (e.g. '20GiB', 2**30)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def bytes_per_device(leaf_specs, mesh: Optional[Mesh]) -> int:
    """Bytes one device holds for [(shape, dtype, PartitionSpec)], shards rounded up."""
    total = 0
    for shape, dtype, spec in leaf_specs:
        shard = list(shape)
        for i, axis in enumerate(tuple(spec)):
            if axis is not None and mesh is not None:
                shard[i] = math.ceil(shard[i] / int(mesh.shape[axis]))
        total += math.prod(shard) * np.dtype(dtype).itemsize
    return total


def check_max_memory(max_memory: Optional[Mapping], needed_per_device: int, mesh: Optional[Mesh]) -> None:
    """Raise InsufficientMemoryError if any device the parameters go to has less than it needs.

    max_memory: {device: bytes or "20GiB"}, a device given by its id (jax.Device.id: an int, in a
    multi-process run the global id) or as a jax.Device; devices it leaves out are unbounded, and
    devices outside the mesh are ignored. Every device of a mesh holds the same bytes (each split
    axis divides evenly, kernel_spec), so needed_per_device is each one's need. In a multi-process
    run every process checks every device, so all fail alike before anything is read.
    """
    if not max_memory:
        return
    devices = list(mesh.devices.flat) if mesh is not None else [jax.devices()[0]]
    limits = {}
    for key, value in max_memory.items():
        if not isinstance(key, (int, np.integer)) and not hasattr(key, "id"):
            raise InvalidConfigError(f"max_memory: key {key!r} is not a device id (int) or a jax.Device")
        limits[int(key.id if hasattr(key, "id") else key)] = parse_bytes(value)
    short = [(d, limits[d.id]) for d in devices if d.id in limits and limits[d.id] < needed_per_device]
    if short:
        listing = ", ".join(f"device {d.id}: {format_bytes(limit)} ({limit} bytes, {d.device_kind} "
                            f"{d.platform}:{d.id} of process {d.process_index})" for d, limit in short[:8])
        more = f" and {len(short) - 8} more" if len(short) > 8 else ""
        model = _model_axis_size(mesh) if mesh is not None else 1
        raise InsufficientMemoryError(
            f"the model needs {format_bytes(needed_per_device)} ({needed_per_device} bytes) of parameters per "
            f"device on {len(devices)} device(s) (model axis {model}), more than max_memory gives {listing}{more}; "
            "use more devices in the mesh's 'model' axis, int8 or 4-bit quantization, or a larger max_memory"
        )


def format_bytes(size: int) -> str:
    for unit, factor in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size} B"
