"""4-bit NF4 / FP4 blockwise quantization (bitsandbytes' load_in_4bit) in plain jnp.

The recipe, as bitsandbytes 0.50 runs it on the CPU (functional.quantize_4bit with
backends/default/ops.py, double quantization through csrc/cpu_ops.cpp):
1. Flatten the tensor row-major into n values; cut blocks of `blocksize` (the last may be short).
2. absmax[b] = max |x| over block b, float32. Full blocks are scaled by the float32 reciprocal
   x * (1 / max(absmax, 1e-38)); the short last block is divided, x / max(absmax, 1e-38), and
   stores that clamped absmax. Both clipped to [-1, 1].
3. The code is the nearest code book value with ties to the lower one (torch.bucketize,
   right=False, on the midpoints of the sorted book). FP4's book is not sorted by code: the
   sorted position maps back through _FP4_SORTED_TO_CODE, and its two zeros (codes 0 and 8)
   split: exactly 0 takes code 0, values in (0, 0.0026] code 8.
4. Two codes a byte, the first in the high nibble; an odd n pads one 0.0 value.
5. Double quantization: offset = mean(absmax); absmax - offset is quantized to 8 bits with the
   signed dynamic map in blocks of 256, nearest code through bitsandbytes' 65536-bin table.
Dequantization: book[code] * absmax[block] in float32, one rounding (to nearest even) to the
output dtype; doubly quantized absmax = dynamic_map[q] * nested_absmax[block] + offset, float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jint8.errors import InvalidConfigError, QuantizationError, ShapeError
from jint8.numerics import FP4_CODE, NF4_CODE, mul_then_add as _mul_then_add

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit check
NESTED_BLOCKSIZE = 256  # bitsandbytes quantizes the absmax in blocks of 256 (compress_statistics)
SOURCE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))

# torch.argsort(FP4_CODE) as bitsandbytes computes it: +0 (code 0) sorts before -0 (code 8).
_FP4_SORTED_TO_CODE = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], np.uint8)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    # torch's CPU linspace in float32: a fused multiply-add from each end toward the middle.
    step = (np.float32(end) - np.float32(start)) / np.float32(steps - 1)
    i = np.arange(steps, dtype=np.float64)
    low = np.float64(np.float32(start)) + np.float64(step) * i
    high = np.float64(np.float32(end)) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(np.float32)


def create_dynamic_map(max_exponent_bits: int = 7) -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()), float32 [256] sorted."""
    values = [np.float32(0), np.float32(1)]
    for i in range(max_exponent_bits):
        bounds = _torch_linspace_f32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scale = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
        values += list(scale * means) + list(-scale * means)
    return np.sort(np.array(values, np.float32))


DYNAMIC_MAP = create_dynamic_map()


def _dynamic_lookup_table(code: np.ndarray) -> np.ndarray:
    # cpu_ops.cpp build_quantize_lut: [-1, 1] cut into 65536 points, each mapped to the first
    # code whose upper midpoint is not below it. The CPU kernel rounds through this table, not
    # to the exact nearest code, so values near a midpoint can land one code away from it.
    midpoints = np.float32(0.5) * (code[:-1] + code[1:])
    points = np.float32(-1) + (np.float32(2) * np.arange(65536, dtype=np.float32)) / np.float32(65535)
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


_DYNAMIC_LUT = _dynamic_lookup_table(DYNAMIC_MAP)


def code_book(quant_type: str) -> np.ndarray:
    """The 16 float32 values a 4-bit code stands for (bitsandbytes' quant_map)."""
    return {"nf4": NF4_CODE, "fp4": FP4_CODE}[_checked_quant_type(quant_type)]


def _checked_quant_type(quant_type) -> str:
    if quant_type not in QUANT_TYPES:
        raise InvalidConfigError(f"quant_type={quant_type!r} must be one of {QUANT_TYPES}")
    return quant_type


def _checked_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or blocksize not in BLOCKSIZES:
        raise InvalidConfigError(f"blocksize={blocksize!r} must be one of {BLOCKSIZES} (bitsandbytes' 4-bit sizes)")
    return int(blocksize)


def _blocks(flat: jax.Array, blocksize: int) -> jax.Array:
    """[n] -> [ceil(n / blocksize), blocksize], the short last block padded with zeros."""
    pad = -flat.shape[0] % blocksize
    return jnp.pad(flat, (0, pad)).reshape(-1, blocksize)


def _divide_exactly(x: jax.Array, divisor: jax.Array) -> jax.Array:
    # XLA rewrites x / broadcast(divisor) as x * (1 / divisor), a second rounding; bitsandbytes
    # divides (torch's true division). A full-shaped divisor keeps the division, with NaN as is.
    return x / jnp.where(jnp.isnan(x), x, divisor)


def quantize_blockwise_8bit(x: jax.Array, blocksize: int = NESTED_BLOCKSIZE) -> tuple[jax.Array, jax.Array]:
    """float32 [n] -> (uint8 codes into DYNAMIC_MAP [n], float32 absmax [ceil(n / blocksize)]).

    bitsandbytes' CPU quantize_blockwise: an all-zero block stores absmax 0 and codes 0.
    """
    n = x.shape[0]
    rows = _blocks(x.astype(jnp.float32), blocksize)
    absmax = jnp.max(jnp.abs(rows), axis=1)
    inverse = jnp.float32(1) / jnp.where(absmax == 0, jnp.float32(1), absmax)
    unit = jnp.clip(rows * inverse[:, None], -1, 1)
    # norm_to_lut_index: (v + 1) * 0.5 * 65535 + 0.5, truncated. Whether the last multiply-add
    # is fused (XLA) or not, the floor is the same except when the sum lands within an ulp of
    # an integer and the two roundings split it, which can move a value one table bin.
    index = ((unit + 1) * jnp.float32(0.5) * jnp.float32(65535) + jnp.float32(0.5)).astype(jnp.int32)
    codes = jnp.asarray(_DYNAMIC_LUT)[index]
    codes = jnp.where(absmax[:, None] == 0, jnp.uint8(0), codes)
    return codes.reshape(-1)[:n], absmax


def _four_bit_codes(flat: jax.Array, quant_type: str, blocksize: int) -> tuple[jax.Array, jax.Array]:
    """float32 [n] -> (codes uint8 [n + n % 2], absmax float32 [blocks])."""
    n = flat.shape[0]
    rows = _blocks(flat, blocksize)
    absmax = jnp.max(jnp.abs(rows), axis=1)
    clamped = jnp.maximum(absmax, jnp.float32(1e-38))
    unit = rows * (jnp.float32(1) / clamped)[:, None]
    if n % blocksize:
        unit = unit.at[-1].set(_divide_exactly(rows[-1], clamped[-1]))
        absmax = absmax.at[-1].set(clamped[-1])
    unit = jnp.clip(unit, -1, 1).reshape(-1)[: n + n % 2]  # the pad value is a zero from _blocks
    book = code_book(quant_type)
    order = np.argsort(book, kind="stable") if quant_type == "nf4" else _FP4_SORTED_TO_CODE
    sorted_book = book[order]
    midpoints = (sorted_book[:-1] + sorted_book[1:]) / np.float32(2)
    position = jnp.sum(unit[:, None] > jnp.asarray(midpoints), axis=1)
    return jnp.asarray(order.astype(np.uint8))[position], absmax


def _pack(codes: jax.Array) -> jax.Array:
    return ((codes[0::2] << 4) | codes[1::2]).reshape(-1, 1)


def _unpack(packed: jax.Array, n: int) -> jax.Array:
    packed = packed.reshape(-1)
    return jnp.stack([packed >> 4, packed & 0xF], axis=1).reshape(-1)[:n]


@struct.dataclass
class Int4Weight:
    """A float tensor quantized blockwise to 4 bits (NF4 or FP4), stored as bitsandbytes does.

    Shape rule: the tensor of `shape` (any rank; a torch Linear weight is [N, K]) is flattened
    row-major into n = prod(shape) values in blocks = ceil(n / blocksize) blocks.
      packed: uint8 [(n + 1) // 2, 1]; value 2i in the high nibble of byte i, 2i + 1 in the low.
      absmax: float32 [blocks], or with double quantization uint8 [blocks]: codes into
        nested_code scaled by nested_absmax float32 [ceil(blocks / 256)], plus offset float32 [].
      nested_absmax, nested_code (float32 [256]), offset: None without double quantization.
    dtype: the source dtype, dequantize's default output (bitsandbytes' quant_state.dtype).
    compute_dtype: the matmul dtype the layers use (bnb_4bit_compute_dtype); None: the input's.
    """

    packed: jax.Array
    absmax: jax.Array
    shape: tuple[int, ...] = struct.field(pytree_node=False)
    nested_absmax: Optional[jax.Array] = None
    nested_code: Optional[jax.Array] = None
    offset: Optional[jax.Array] = None
    quant_type: str = struct.field(pytree_node=False, default="nf4")
    blocksize: int = struct.field(pytree_node=False, default=64)
    dtype: Any = struct.field(pytree_node=False, default=jnp.dtype(jnp.float32))
    compute_dtype: Any = struct.field(pytree_node=False, default=None)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def num_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        leaves = (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.offset)
        return sum(int(leaf.size) * leaf.dtype.itemsize for leaf in leaves if leaf is not None)

    def block_absmax(self) -> jax.Array:
        """float32 [blocks], undoing the double quantization if there is one."""
        if not self.double_quant:
            return self.absmax.astype(jnp.float32)
        return _nested_absmax(self)

    def dequantize(self, dtype=None) -> jax.Array:
        return dequantize_4bit(self, dtype)


def _nested_absmax(w: Int4Weight) -> jax.Array:
    values = _blocks(jnp.asarray(w.nested_code, jnp.float32)[w.absmax.astype(jnp.int32)], NESTED_BLOCKSIZE)
    absmax = _mul_then_add(values, w.nested_absmax[:, None], w.offset.astype(jnp.float32))
    return absmax.reshape(-1)[: w.absmax.shape[0]]


def validate_int4_weight(w: Int4Weight, name: str = "weight") -> None:
    """Check Int4Weight's shape rule; raise ShapeError / InvalidConfigError naming `name`."""
    try:
        _checked_quant_type(w.quant_type)
        _checked_blocksize(w.blocksize)
    except InvalidConfigError as e:
        raise InvalidConfigError(f"{name}: {e}") from None
    n, blocks = w.numel, w.num_blocks
    expected = {"packed": ((n + 1) // 2, 1), "absmax": (blocks,)}
    if w.double_quant:
        expected.update(nested_absmax=(-(-blocks // NESTED_BLOCKSIZE),), nested_code=(256,), offset=())
    elif w.nested_code is not None or w.offset is not None:
        raise ShapeError(f"{name}: nested_code/offset given without nested_absmax")
    for field, want in expected.items():
        got = getattr(w, field)
        if got is None or tuple(got.shape) != want:
            have = None if got is None else tuple(got.shape)
            raise ShapeError(
                f"{name}.{field}: shape {have} must be {want} for shape={w.shape}, blocksize={w.blocksize}"
            )
    if w.packed.dtype != jnp.uint8 or w.absmax.dtype != (jnp.uint8 if w.double_quant else jnp.float32):
        raise QuantizationError(f"{name}: packed {w.packed.dtype} / absmax {w.absmax.dtype} have the wrong dtypes")


def quantize_4bit(
    w: jax.Array,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    offset: Optional[jax.Array] = None,
) -> Int4Weight:
    """Quantize a float tensor (any shape; f32, f16 or bf16) to 4 bits as bitsandbytes does.

    offset: double quantization's shift; default mean(absmax) in float32. bitsandbytes takes
      torch's float32 mean, whose summation order (vector width, threads) is the CPU's, so the
      default may differ from it in the last bit; passing bitsandbytes' offset reproduces its
      tensors exactly (the codes never depend on it, only the nested absmax).
    """
    quant_type, blocksize = _checked_quant_type(quant_type), _checked_blocksize(blocksize)
    w = jnp.asarray(w)
    if w.dtype not in SOURCE_DTYPES:
        raise QuantizationError(f"quantize_4bit: dtype {w.dtype} is not one of float32, float16, bfloat16")
    if w.size == 0:
        raise QuantizationError(f"quantize_4bit: shape {w.shape} has no elements")
    codes, absmax = _four_bit_codes(w.reshape(-1).astype(jnp.float32), quant_type, blocksize)
    fields = dict(shape=tuple(w.shape), quant_type=quant_type, blocksize=blocksize, dtype=jnp.dtype(w.dtype))
    if not double_quant:
        return Int4Weight(packed=_pack(codes), absmax=absmax, **fields)
    offset = jnp.mean(absmax) if offset is None else jnp.asarray(offset, jnp.float32).reshape(())
    nested_codes, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    return Int4Weight(
        packed=_pack(codes),
        absmax=nested_codes,
        nested_absmax=nested_absmax,
        nested_code=jnp.asarray(DYNAMIC_MAP),
        offset=offset,
        **fields,
    )


def dequantize_4bit(w: Int4Weight, dtype=None) -> jax.Array:
    """Int4Weight -> the float tensor [*w.shape] in dtype (default w.dtype).

    Blocks run over the flattened tensor. bitsandbytes 0.50's AVX512 CPU kernel instead indexes
    absmax per row when the last dimension is a multiple of 16 but not of blocksize (< 2048; e.g.
    [16, 128] at blocksize 256), disagreeing with its own quantization; this follows its default (torch)
    and scalar kernels, which keep the flat blocks.
    """
    dtype = jnp.dtype(w.dtype if dtype is None else dtype)
    n = w.numel
    values = jnp.asarray(code_book(w.quant_type))[_unpack(w.packed, n).astype(jnp.int32)]
    scaled = _blocks(values, w.blocksize) * w.block_absmax()[:, None]
    return scaled.reshape(-1)[:n].astype(dtype).reshape(w.shape)


def dequantize_4bit_rows(w: Int4Weight, ids: jax.Array, dtype=None) -> jax.Array:
    """Rows ids [...] of a 4-bit table w of shape [V, H] -> [..., H] in dtype (default w.dtype):
    dequantize_4bit(w)[ids] bit for bit, reading only those rows' codes and absmax.

    bitsandbytes' Embedding4bit: the table is quantized as one tensor, flattened row-major in
    blocks of `blocksize`, so H need not be a multiple of the blocksize (a block then spans two
    rows, and an odd H starts every other row mid-byte). Embedding4bit gathers whole rows of
    bytes and absmax when H is a multiple, else dequantizes the whole table and gathers; either
    way a row's values are book[code] * absmax[block] in float32, one rounding to dtype. Here
    each looked-up value finds its byte, nibble and block from its flat index, which serves
    every H; with double quantization its block's absmax is undone from the table's nested
    absmax at the block's own index (a gathered run of absmax codes would no longer line up
    with the 256-block groups).
    """
    if len(w.shape) != 2:
        raise ShapeError(f"dequantize_4bit_rows: the Int4Weight must be a 2-D table [V, H], got shape {w.shape}")
    vocab, hidden = w.shape
    if vocab * hidden >= 2**31:  # flat indices are int32 (jax without x64)
        raise ShapeError(f"dequantize_4bit_rows: table [V, H] = {w.shape} has {vocab * hidden} values; "
                         "flat indices are int32 (at most 2**31 - 1)")
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ShapeError(f"dequantize_4bit_rows: ids must be integers, got {ids.dtype}")
    dtype = jnp.dtype(w.dtype if dtype is None else dtype)
    ids = ids.astype(jnp.int32)
    ids = jnp.where(ids < 0, ids + vocab, ids)  # jnp.take's rule: negative ids count from the end
    valid = (ids >= 0) & (ids < vocab)
    flat = jnp.where(valid, ids, 0)[..., None] * hidden + jnp.arange(hidden, dtype=jnp.int32)
    byte = jnp.take(w.packed.reshape(-1), flat >> 1, mode="clip")
    codes = jnp.where(flat & 1 == 0, byte >> 4, byte & 0xF)  # value 2i: high nibble of byte i
    values = jnp.asarray(code_book(w.quant_type))[codes.astype(jnp.int32)]
    block = flat // w.blocksize
    if w.double_quant:
        nested = jnp.asarray(w.nested_code, jnp.float32)[jnp.take(w.absmax, block, mode="clip").astype(jnp.int32)]
        absmax = _mul_then_add(nested, jnp.take(w.nested_absmax, block // NESTED_BLOCKSIZE, mode="clip"),
                               w.offset.astype(jnp.float32))  # _nested_absmax's roundings
    else:
        absmax = jnp.take(w.absmax.astype(jnp.float32), block, mode="clip")
    rows = (values * absmax).astype(dtype)
    return jnp.where(valid[..., None], rows, jnp.asarray(jnp.nan, dtype))  # out of range: NaN, as jnp.take


def int4_weight_specs(float_spec, w: Int4Weight, axis_sizes: Mapping[str, int]):
    """How an Int4Weight of a kernel whose float form [K, N] (Flax's [in, out]) is sharded by
    float_spec is split over a mesh (axis_sizes: the mesh's {axis: size}): (the Int4Weight with a
    PartitionSpec in place of each array, None) where it can be, else (every array replicated,
    why not).

    The codes are the flattened [N, K] weight, two a byte, with one absmax per `blocksize` values
    of the flat index (and one nested absmax per 256 blocks). Allowed: a split of N (a
    column-parallel kernel) whose shards are whole blocks (and with double quantization whole
    groups of 256 blocks): each device's rows are then one contiguous range of the bytes, of
    absmax and of nested_absmax, a valid Int4Weight of [N / D, K] on its own (nested_code and
    offset replicated). Refused, so replicated: a split of K (row-parallel: each row's slice is
    its own range of the flat index, no array split gives it), and N splits that cut a block or
    a 256-block group."""
    spec = tuple(float_spec) + (None,) * (2 - len(tuple(float_spec)))
    k_axes, n_axes = spec[0], spec[1]
    replicated = jax.tree.map(lambda _: jax.sharding.PartitionSpec(), w)
    if k_axes is not None:
        return replicated, (f"a split of K (the input features) over {k_axes!r} is no contiguous range of the "
                            f"flattened [N, K] = {tuple(w.shape)} codes and blocks")
    if n_axes is None:
        return replicated, None
    parts = math.prod(int(axis_sizes[a]) for a in ((n_axes,) if isinstance(n_axes, str) else n_axes))
    (n, k), group = w.shape, w.blocksize * (NESTED_BLOCKSIZE if w.double_quant else 1)
    if len(w.shape) != 2 or n % parts or (n // parts) * k % group:
        return replicated, (f"[N, K] = {tuple(w.shape)} split {parts} ways along N cuts its "
                            f"{'256-block groups of ' if w.double_quant else ''}{w.blocksize}-value blocks")
    split, whole = jax.sharding.PartitionSpec(n_axes), jax.sharding.PartitionSpec()
    return w.replace(packed=jax.sharding.PartitionSpec(n_axes, None), absmax=split,
                     nested_absmax=split if w.double_quant else None, nested_code=whole if w.double_quant else None,
                     offset=whole if w.double_quant else None), None


@dataclasses.dataclass(frozen=True)
class Int4Config:
    """How to quantize a parameter tree to 4 bits (bitsandbytes' load_in_4bit).

    quant_type: "nf4" (normal-float quantiles) or "fp4" (bnb_4bit_quant_type).
    blocksize: values sharing one absmax, one of BLOCKSIZES (bitsandbytes' default 64).
    double_quant: quantize the absmax again to 8 bits (bnb_4bit_use_double_quant).
    compute_dtype: the matmul dtype (bnb_4bit_compute_dtype); None keeps the input's.
    skip_modules: module-path patterns left in floating point (Int8Config's syntax: a plain name
      matches a path component, "glob:", "re:").
    min_size: kernels with fewer elements stay in floating point (from_bitsandbytes: 0, as
      bitsandbytes quantizes every Linear).
    kernel_names: parameter names treated as Dense-like kernels. Only 2-D kernels are quantized:
      bitsandbytes' format is a torch Linear's [out, in] weight; 3-D DenseGeneral kernels stay float.
    quantize_embeddings: also quantize embedding tables (parameters named "embedding", [V, H], of
      at least min_size values, not skipped) as bitsandbytes' nn.Embedding4bit does: the table
      as one tensor, flattened row-major in blocks of `blocksize` (H need not be a multiple);
      lookups dequantize only the gathered rows (quant4.dequantize_4bit_rows). double_quant
      applies to them too (Embedding4bit itself never double-quantizes). Off by default: like
      bitsandbytes' load_in_4bit, which keeps embeddings 16-bit. A tied table (the tree has no
      lm_head module, so its output head is embedding.attend) is also the head: it stays 16-bit
      while skip_modules skips "lm_head" (the default), and a warning says so; without that skip
      it is quantized and the head runs int4_matmul on it (the table [V, H] is a Linear4bit
      weight [out, in] as it is).
    """

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: Any = None
    skip_modules: tuple[str, ...] = ("lm_head",)
    min_size: int = 1024
    kernel_names: tuple[str, ...] = ("kernel",)
    quantize_embeddings: bool = False

    def __post_init__(self):
        try:
            _checked_quant_type(self.quant_type)
            _checked_blocksize(self.blocksize)
        except InvalidConfigError as e:
            raise InvalidConfigError(f"Int4Config.{e}") from None
        if not isinstance(self.double_quant, (bool, np.bool_)):
            raise InvalidConfigError(f"Int4Config.double_quant={self.double_quant!r} must be a bool")
        if self.compute_dtype is not None:
            try:
                dtype = jnp.dtype(self.compute_dtype)
            except TypeError:
                dtype = None
            if dtype not in SOURCE_DTYPES:
                raise InvalidConfigError(
                    f"Int4Config.compute_dtype={self.compute_dtype!r} must be None, float32, float16 or bfloat16"
                )
            object.__setattr__(self, "compute_dtype", dtype)
        from jint8.quantize import _compile_pattern  # quantize.py imports this module

        skip = (self.skip_modules,) if isinstance(self.skip_modules, str) else tuple(self.skip_modules)
        if not all(isinstance(pattern, str) for pattern in skip):
            raise InvalidConfigError(f"Int4Config.skip_modules={self.skip_modules!r} must be strings")
        for pattern in skip:
            _compile_pattern(pattern, "Int4Config.skip_modules")
        object.__setattr__(self, "skip_modules", skip)
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise InvalidConfigError(f"Int4Config.min_size={self.min_size!r} must be an int >= 0")
        names = (self.kernel_names,) if isinstance(self.kernel_names, str) else tuple(self.kernel_names)
        if not names or not all(isinstance(name, str) and name for name in names):
            raise InvalidConfigError(f"Int4Config.kernel_names={self.kernel_names!r} must be non-empty strings")
        object.__setattr__(self, "kernel_names", names)
        if not isinstance(self.quantize_embeddings, (bool, np.bool_)):
            raise InvalidConfigError(f"Int4Config.quantize_embeddings={self.quantize_embeddings!r} must be a bool")
        object.__setattr__(self, "quantize_embeddings", bool(self.quantize_embeddings))

    def is_skipped(self, path) -> bool:
        from jint8.quantize import _compile_pattern

        return any(_compile_pattern(p, "skip_modules")(path) for p in self.skip_modules)

    @classmethod
    def from_bitsandbytes(cls, bnb_config, **overrides) -> "Int4Config":
        """The Int4Config equivalent to a transformers.BitsAndBytesConfig (or its dict) for 4-bit.

        bnb_4bit_quant_type -> quant_type (transformers' default "fp4"), bnb_4bit_use_double_quant
        -> double_quant, bnb_4bit_compute_dtype -> compute_dtype, llm_int8_skip_modules ->
        skip_modules (transformers reads that one for 4-bit too; None means its default, the
        output head); blocksize 64 (transformers has no option for it); every Linear quantized
        (min_size=0). Options jint8 cannot honour raise, naming the field.
        """
        options = _bnb_options(bnb_config)
        if not options.get("load_in_4bit"):
            raise InvalidConfigError("BitsAndBytesConfig.load_in_4bit must be True for an Int4Config")
        storage = str(options.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
        if storage != "uint8":
            raise InvalidConfigError(
                f"bnb_4bit_quant_storage={storage!r}: jint8 reads and writes bitsandbytes' uint8 storage only")
        if options.get("llm_int8_enable_fp32_cpu_offload"):
            raise InvalidConfigError(
                "llm_int8_enable_fp32_cpu_offload=True has no jint8 equivalent: place the model on a "
                "mesh with from_pretrained(mesh=..., max_memory=...) instead")
        compute = options.get("bnb_4bit_compute_dtype")
        skip = options.get("llm_int8_skip_modules")
        fields = dict(
            quant_type=options.get("bnb_4bit_quant_type") or "fp4",
            blocksize=64,
            double_quant=bool(options.get("bnb_4bit_use_double_quant", False)),
            compute_dtype=None if compute is None else str(compute).removeprefix("torch."),
            skip_modules=("lm_head",) if skip is None else tuple(skip),
            min_size=0,
        )
        fields.update(overrides)
        try:
            return cls(**fields)
        except InvalidConfigError as e:
            raise InvalidConfigError(f"BitsAndBytesConfig: {e}") from None


def _bnb_options(bnb_config) -> dict:
    """A BitsAndBytesConfig (or its dict) as a plain dict, its quant_method checked."""
    options = dict(bnb_config if isinstance(bnb_config, Mapping) else bnb_config.to_dict())
    method = options.get("quant_method", "bitsandbytes")
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum
    if str(method).lower().rsplit(".", 1)[-1] != "bitsandbytes":
        raise InvalidConfigError(f"quantization_config.quant_method={method!r} is not 'bitsandbytes'")
    options.setdefault("load_in_8bit", options.get("_load_in_8bit", False))
    options.setdefault("load_in_4bit", options.get("_load_in_4bit", False))
    return options
