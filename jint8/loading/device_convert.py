"""Checkpoint tensors converted on the device: stored arrays in, placed parameters out.

A tensor goes to the device as it is stored (16-bit stays 16-bit, PyTorch's [out, in] stays
[out, in]), each device of a mesh receiving only its own shard of it. The layout change, the
dtype cast and the int8 quantization then run there, in one jitted function per distinct
Conversion (stored shape and dtype, layout, output, shardings), compiled once and cached; the
outputs carry their final shardings, so nothing is moved again and nothing comes back to the host.

Quantization calls quantize.quantize_leaf, the function quantize_params uses, so the int8 values
are quantize_params' own (tests/loading/test_device_conversion.py holds them equal).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from jint8.quantize import LeafQuantization, int8_weight_specs, quantize_leaf


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How one stored tensor becomes its parameter's arrays; hashable, the compile cache's key.

    shape / dtype: the array sent to the device (as stored, [out, in] for a PyTorch Linear).
    transpose: stored [out, in] -> Flax [in, out] (2-D only).
    quantization: the int8 settings of a quantized leaf (None: a float leaf).
    out_dtype: a float leaf's dtype (int8 when quantized to int8; a 4-bit leaf is quantized from it).
    source: where the stored array is placed (staging_spec: on a mesh, blocks of whole leading-
      axis rows where the format allows); outputs: the final sharding of each output array:
      the array of a float leaf, or qvalue and scale of a quantized one, then a scalar flag,
      true where the source holds a NaN or Inf (read once after the load).
    row_order: a function of the stored array putting its rows in transformers' order (a GGUF
      file's RowOrder), run first; None: the rows are in that order.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    transpose: bool
    quantization: Optional[LeafQuantization]
    out_dtype: np.dtype
    source: jax.sharding.Sharding
    outputs: tuple[jax.sharding.Sharding, ...]
    row_order: Optional[Callable] = None


def default_device() -> jax.Device:
    """The device jax.device_put(x) would use (honours jax.default_device)."""
    device = jax.config.jax_default_device
    if isinstance(device, str):
        return jax.devices(device)[0]
    return device if device is not None else jax.devices()[0]


def staging_spec(shape: tuple[int, ...], spec: tuple, mesh) -> tuple:
    """How a stored array [d0, d1, ...] is sent to a mesh whose final layout of it is `spec`.

    A C-order array split along a later axis only (a PyTorch [out, in] weight of a row-parallel
    layer: o_proj, down_proj; K over "model") has strided blocks, which the host would have to
    gather row by row into a copy for each device. Split along d0 over the same mesh axes
    instead, each device's block is one contiguous range of the file, and the jitted conversion
    moves the values to the final layout on the devices (an all-to-all over those axes, of the
    int8 qvalue where it is quantized: the row-wise absmax needs nothing from other devices).
    Each device still receives 1 / n of the tensor's bytes from the host, but not its own final
    block: the cost is that device-to-device exchange and a second 1 / n buffer while it runs.
    Where d0 does not divide evenly the split stays where the layout wants it.
    """
    split = [(axis, entry) for axis, entry in enumerate(spec) if entry is not None]
    if len(shape) < 2 or len(split) != 1 or split[0][0] == 0:
        return spec
    entry = split[0][1]
    size = math.prod(int(mesh.shape[a]) for a in ((entry,) if isinstance(entry, str) else entry))
    if shape[0] % size:
        return spec
    return (entry,) + (None,) * (len(shape) - 1)


def plan_conversion(shape, dtype, *, transpose: bool, quantization: Optional[LeafQuantization], out_dtype,
                    float_spec: PartitionSpec, mesh: Optional[jax.sharding.Mesh],
                    int4_specs: Optional[tuple[PartitionSpec, ...]] = None,
                    row_order: Optional[Callable] = None) -> Conversion:
    """The Conversion of a stored tensor whose parameter (Flax layout, float) is sharded by float_spec
    (a 4-bit one's arrays by int4_specs, quant4.int4_weight_specs' in leaf order; default replicated).
    row_order: Conversion's."""
    shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
    if quantization is not None and not quantization.quantized:
        quantization = None
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        # jax would canonicalise a float64 array on the host anyway: cast it where the host loader
        # did (straight to a float leaf's dtype, to float32 for quantization)
        dtype = np.dtype(np.float32 if quantization is not None else out_dtype)
    ndim = len(shape)
    spec = tuple(float_spec) + (None,) * (ndim - len(tuple(float_spec)))
    source_spec = spec[::-1] if transpose else spec
    if quantization is not None and quantization.int4 is not None:
        # the source replicated: the quantization reads the whole weight (double quantization's
        # offset is the mean absmax of every block, summed in one order as on one device); the
        # Int4Weight's arrays leave it split as int4_specs say (column-parallel: along N)
        source_spec = (None,) * ndim
        count = 5 if quantization.int4.double_quant else 2
        out_specs = tuple(int4_specs or (PartitionSpec(),) * count) + (PartitionSpec(),)
    elif quantization is not None:
        out_specs = int8_weight_specs(PartitionSpec(*spec), ndim, quantization.in_ndim,
                                      embedding=quantization.embedding) + (PartitionSpec(),)
    else:
        out_specs = (PartitionSpec(*spec), PartitionSpec())
    if mesh is None:
        device = SingleDeviceSharding(default_device())
        source, outputs = device, (device,) * len(out_specs)
    else:
        source = NamedSharding(mesh, PartitionSpec(*staging_spec(shape, source_spec, mesh)))
        outputs = tuple(NamedSharding(mesh, s) for s in out_specs)
    # a 4-bit kernel is quantized from the weight in out_dtype (transformers casts to torch_dtype
    # before bitsandbytes quantizes); an int8 one from the stored precision
    out_dtype = np.dtype(np.int8 if quantization is not None and quantization.int4 is None else out_dtype)
    return Conversion(shape, dtype, bool(transpose), quantization, out_dtype, source, outputs, row_order)


def _convert(conversion: Conversion, stored: jax.Array) -> tuple[jax.Array, ...]:
    if conversion.row_order is not None:  # a permutation: exact in any dtype
        stored = conversion.row_order(stored)
    w = stored.T if conversion.transpose else stored  # Flax layout, the source dtype
    # quantize_params' NaN/Inf check, for float leaves too (a NaN norm weight or embedding row
    # would load silently), as one flag: w * 0 is 0, or NaN where w is NaN or +-Inf, and a sum
    # propagates NaN (a max need not: XLA:CPU's vectorised max drops it). Fused with the absmax
    # pass or the cast; the exact count is taken on the host if the flag is ever set. Taken of the
    # stored array: the same values, and no transposed copy for the reduction to read.
    nonfinite = jnp.isnan(jnp.sum(stored.astype(jnp.float32) * 0.0))
    if conversion.quantization is not None and conversion.quantization.int4 is not None:
        weight = quantize_leaf(w.astype(conversion.out_dtype), conversion.quantization)
        return (*jax.tree.leaves(weight), nonfinite)
    if conversion.quantization is not None:
        # for a PyTorch [out, in] weight the two transposes (to Flax, then to the K-major
        # storage) cancel in XLA: the quantization reads the stored array as it is
        weight = quantize_leaf(w, conversion.quantization)
        return weight.qvalue, weight.scale, nonfinite
    if w.dtype == conversion.out_dtype and not conversion.transpose:
        return jnp.copy(w), nonfinite  # a new buffer: the source may be a view of the memory-mapped file
    return w.astype(conversion.out_dtype), nonfinite


@functools.lru_cache(maxsize=256)
def compiled_conversion(conversion: Conversion):
    """The compiled converter of one Conversion: f(stored array) -> tuple of placed arrays.

    Cached (compiled_conversion.cache_clear() empties it): a model's many layers share a few
    shapes, and loading the same model again compiles nothing.
    """
    converter = jax.jit(functools.partial(_convert, conversion), in_shardings=conversion.source,
                        out_shardings=conversion.outputs)
    return converter.lower(jax.ShapeDtypeStruct(conversion.shape, conversion.dtype,
                                                sharding=conversion.source)).compile()


def stage(host_array: np.ndarray, conversion: Conversion) -> jax.Array:
    """The stored array on the device(s), each device holding only its shard of conversion.source."""
    if host_array.dtype != conversion.dtype:
        host_array = host_array.astype(conversion.dtype)  # float64 sources only (plan_conversion)
    if isinstance(conversion.source, NamedSharding):
        return stage_sharded(host_array, conversion.source)
    return jax.device_put(host_array, conversion.source)


def stage_sharded(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """host_array on sharding's devices, each receiving its own block: only the blocks of this
    process's devices are read (of a memory-mapped file: only their bytes), so in a
    multi-process run (jax.distributed) each process reads its own shards and no other. A CPU
    device gets a copy (its buffer may alias host memory: it would keep viewing the file); an
    accelerator's transfer reads the view itself, a block of whole rows (staging_spec) being one
    contiguous range."""
    on_cpu = all(device.platform == "cpu" for device in sharding.device_set)

    def block(index):
        return np.array(host_array[index]) if on_cpu else host_array[index]

    return jax.make_array_from_callback(tuple(host_array.shape), sharding, block, dtype=host_array.dtype)
