"""The "pallas_triton" backend of int4_matmul: Pallas (Triton lowering) kernels for NF4 / FP4.

Computes reference.int4_matmul_reference's function: every weight element is dequantized as
bitsandbytes does, code_book[code] * absmax[block] in float32 rounded once to the compute dtype
(the same bits as reference.dequantized_weight), and the products with x are summed in float32.

The weight is bitsandbytes' layout read in place: the torch Linear weight [N, K] flattened
row-major, two codes a byte (element 2j in the high nibble of byte j), so with K even the packed
bytes are a [N, K / 2] matrix and, with K a multiple of the blocksize, the block absmax a
[N, K / blocksize] one (other shapes fall back to "xla", unsupported_reason says why).

One kernel (_kernel) computes out[block_m, block_n] per program, K in block_k steps, each step in
sub-blocks of s = min(block_k, blocksize) codes sharing one absmax per weight row:
  bytes  = packed[cols, code0 / 2 : (code0 + s) / 2]             [block_n, s / 2] uint8, streamed
  absmax = absmax[cols, code0 / blocksize]                        float32, or with double
           quantization nested_code[q] * nested_absmax[block / 256] + offset (two roundings, as
           quant4 and bitsandbytes compute it)
  w_hi   = round(book[bytes >> 4] * absmax), w_lo = round(book[bytes & 15] * absmax)
  acc   += x[:, even codes] @ w_hi.T + x[:, odd codes] @ w_lo.T  (float32)
The nibbles are never interleaved: the high nibbles are the even K positions, so x is read split
the same way (the wrapper de-interleaves x once, in XLA, so the kernel's x loads are contiguous,
except for the MMA path at 1 < M <= 16, which reads x strided) and the two halves are two dots
over K / 2. The one-row FMA path (M = 1) dequantizes a whole K step at once as [block_n,
block_k / sub, sub / 2] tiles: one wide load of the step's codes and one of its absmax.

Decode (M <= 16) grids (N / block_n, split_k) so that ~128 programs stream the weight on the
132 SMs of an H100 / H200; the float32 split-K partials are summed, with the bias and the casts,
by one XLA reduction after the kernel. configs.Config lists the choices (MMA or CUDA-core FMA at
M = 1, table lookup by gather or by selects); data/<gpu>.json holds the tuned ones.

The "xla_dot" route (large M) runs _dequantize_kernel, which writes the dequantized [N, K]
weight, and then reference.matmul_dequantized: XLA's dot on it, the reference's own step 3.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jint8.numerics import CODE_BOOKS, mul_then_add, round_to
from jint8.ops._pallas_grid import grouped_tile
from jint8.ops._platform import triton_gpu_unsupported_reason
from jint8.ops.int4_matmul import reference
from jint8.ops.int4_matmul.api import Backend
from jint8.ops.int4_matmul.configs import Config, config_for, fit_to_shape, sub_block

BACKEND_NAME = "pallas_triton"
NESTED_BLOCKSIZE = 256  # bitsandbytes' double quantization: one nested absmax per 256 blocks


@dataclasses.dataclass(frozen=True)
class _Layout:
    """The static facts the kernels are specialised on."""

    m: int
    k: int
    n: int
    blocksize: int
    quant_type: str
    double_quant: bool
    compute_dtype: jnp.dtype

    @property
    def blocks_per_row(self) -> int:
        return self.k // self.blocksize


def unsupported_shape_reason(w) -> Optional[str]:
    """Why the kernels cannot read this Int4Weight in place (None if they can)."""
    if len(w.shape) != 2:
        return f"the kernels take a 2-D weight [N, K], got shape {w.shape}"
    n, k = w.shape
    if k % 2:
        return f"K={k} is odd: rows of the packed codes do not start on a byte"
    if k % w.blocksize:
        return f"K={k} is not a multiple of blocksize={w.blocksize}: absmax blocks straddle weight rows"
    if w.quant_type not in CODE_BOOKS:
        return f"quant_type={w.quant_type!r} has no code book"
    return None


def unsupported_reason(x: jax.Array, w) -> Optional[str]:
    """None when the Triton kernels can run this call, else why not."""
    return triton_gpu_unsupported_reason() or unsupported_shape_reason(w)


def _weight_operands(w):
    """The Int4Weight's arrays as the kernels read them: packed [N, K/2] uint8, absmax [N*K/bs]
    (uint8 with double quantization), nested_absmax, nested_code, offset [1] (any array where
    unused: the kernels never read it) and the code book [16] float32."""
    n, k = w.shape
    packed = w.packed.reshape(n, k // 2)
    absmax = w.absmax.reshape(-1)
    if w.double_quant:
        nested = (w.nested_absmax.astype(jnp.float32), w.nested_code.astype(jnp.float32),
                  w.offset.astype(jnp.float32).reshape(1))
    else:
        nested = (absmax, absmax, absmax)
    return packed, absmax, *nested, jnp.asarray(CODE_BOOKS[w.quant_type])


def _load(ref, rows, cols, row_ok, col_ok):
    """ref[rows, cols] for 1-D index vectors, masked (0) only where a bound can be crossed."""
    masks = [m for m in (None if row_ok is None else row_ok[:, None],
                         None if col_ok is None else col_ok[None, :]) if m is not None]
    at = ref.at[rows[:, None], cols[None, :]]
    if not masks:
        return plgpu.load(at)
    mask = functools.reduce(jnp.logical_and, masks)
    return plgpu.load(at, mask=jnp.broadcast_to(mask, (rows.shape[0], cols.shape[0])), other=0)


def _load_vector(ref, index, ok):
    return plgpu.load(ref.at[index]) if ok is None else plgpu.load(ref.at[index], mask=ok, other=0)


def _lookup(codes, book_ref, book, mode: str):
    """book[codes] for int32 codes in [0, 16): a load from the 16-entry table (it stays in L1) or
    a tree of 15 selects between the float32 constants (bit 0 picks within pairs, and so on)."""
    if mode == "gather":
        return plgpu.load(book_ref.at[codes])
    level = [jnp.float32(v) for v in book]
    for bit in range(4):
        chosen = (codes & (1 << bit)) != 0
        level = [jnp.where(chosen, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


class _Dequantizer:
    """Dequantizes one sub-block (s codes of block_n weight rows sharing one absmax each)."""

    def __init__(self, packed_ref, absmax_ref, nested_absmax_ref, nested_code_ref, offset_ref, book_ref, *,
                 layout: _Layout, lookup: str, interpret: bool):
        self.packed_ref, self.absmax_ref, self.book_ref = packed_ref, absmax_ref, book_ref
        self.nested_absmax_ref, self.nested_code_ref, self.offset_ref = nested_absmax_ref, nested_code_ref, offset_ref
        self.layout, self.lookup, self.interpret = layout, lookup, interpret
        self.book = CODE_BOOKS[layout.quant_type]
        # double quantization's offset: loaded once per program, not per sub-block
        self.offset = plgpu.load(offset_ref.at[jnp.arange(1)]) if layout.double_quant else None

    def block_absmax(self, cols, col_ok, block):
        """[block_n] float32 absmax of column block `block` of these weight rows (quant4's
        block_absmax: nested_code[q] * nested_absmax + offset, the product rounded first)."""
        flat = cols * self.layout.blocks_per_row + block
        if col_ok is not None:
            col_ok = jnp.broadcast_to(col_ok, flat.shape)
        stored = _load_vector(self.absmax_ref, flat, col_ok)
        if not self.layout.double_quant:
            return stored.astype(jnp.float32)
        code = plgpu.load(self.nested_code_ref.at[stored.astype(jnp.int32)])
        nested = _load_vector(self.nested_absmax_ref, flat // NESTED_BLOCKSIZE, col_ok)
        return mul_then_add(code, nested, self.offset)

    def step(self, cols, col_ok, code0, size: int, sub: int):
        """(w_hi, w_lo): [block_n, size / sub, sub / 2] in the compute dtype, a whole K step of
        size codes in sub-blocks of sub codes (one absmax each), as one load of the step's packed
        bytes and one of its absmax (the one-row FMA path: wide loads, few dependent ones)."""
        blocks = size // sub
        within = jnp.arange(blocks)[:, None] * (sub // 2) + jnp.arange(sub // 2)[None, :]  # [blocks, sub/2]
        at = self.packed_ref.at[cols[:, None, None], (code0 // 2 + within)[None, :, :]]
        shape = (cols.shape[0], blocks, sub // 2)
        packed = plgpu.load(at) if col_ok is None else plgpu.load(
            at, mask=jnp.broadcast_to(col_ok[:, None, None], shape), other=0)
        packed = packed.astype(jnp.int32)
        block = code0 // self.layout.blocksize + jnp.arange(blocks)[None, :]  # [1, blocks]
        absmax = self.block_absmax(cols[:, None], None if col_ok is None else col_ok[:, None], block)[:, :, None]
        return self._values(packed, absmax)

    def _values(self, packed, absmax):
        """(w_hi, w_lo) in the compute dtype of int32 bytes and their broadcast absmax."""
        return tuple(round_to(_lookup(codes, self.book_ref, self.book, self.lookup) * absmax,
                              self.layout.compute_dtype, explicit=self.interpret)
                     for codes in (packed >> 4, packed & 0xF))

    def __call__(self, cols, col_ok, code0, size: int):
        """(w_hi, w_lo): [block_n, size / 2] in the compute dtype, the weights at K positions
        code0 + 2j (high nibbles) and code0 + 2j + 1 (low nibbles); code0 a multiple of size."""
        packed = _load(self.packed_ref, cols, code0 // 2 + jnp.arange(size // 2), col_ok, None)
        packed = packed.astype(jnp.int32)
        absmax = self.block_absmax(cols, col_ok, code0 // self.layout.blocksize)[:, None]
        return self._values(packed, absmax)


def _dot(a, b_t, dtype):
    """a [p, c] @ b_t.T ([q, c] given) in float32; float32 operands at full precision (Triton
    would use TF32). b_t is transposed explicitly: XLA:CPU (interpret mode) was seen rounding a
    16-bit dot that contracts both minor dimensions to 16 bits before its float32 output."""
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b_t.T, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _kernel(x_ref, packed_ref, absmax_ref, nested_absmax_ref, nested_code_ref, offset_ref, book_ref, bias_ref,
            out_ref, *, layout: _Layout, config: Config, deinterleaved: bool, has_bias: bool, out_dtype,
            interpret: bool):
    m, k, n = layout.m, layout.k, layout.n
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    sub = sub_block(config, layout.blocksize)
    pid_m, pid_n = grouped_tile(m, n, config.block_m, config.block_n)
    split = pl.program_id(1)
    rows, cols = pid_m * bm + jnp.arange(bm), pid_n * bn + jnp.arange(bn)
    row_ok = rows < m if m % bm else None
    col_ok = cols < n if n % bn else None
    dequantize = _Dequantizer(packed_ref, absmax_ref, nested_absmax_ref, nested_code_ref, offset_ref, book_ref,
                              layout=layout, lookup=config.lookup, interpret=interpret)
    dtype = layout.compute_dtype

    def load_x(code0):
        half = jnp.arange(sub // 2)
        if deinterleaved:  # [M, K]: the even K positions, then the odd ones
            even = code0 // 2 + half
            odd = even + k // 2
        else:
            even = code0 + 2 * half
            odd = even + 1
        return _load(x_ref, rows, even, row_ok, None), _load(x_ref, rows, odd, row_ok, None)

    def fma_step(i, acc):  # one row: float32 multiply-adds over [block_n, blocks, sub / 2]
        code0 = i * bk
        w_hi, w_lo = dequantize.step(cols, col_ok, code0, bk, sub)
        # x de-interleaved by the wrapper: the step's even K positions are contiguous, as are its odd
        even = code0 // 2 + jnp.arange(bk // sub)[:, None] * (sub // 2) + jnp.arange(sub // 2)[None, :]
        x_even = plgpu.load(x_ref.at[rows[:, None, None], even[None, :, :]]).astype(jnp.float32)
        x_odd = plgpu.load(x_ref.at[rows[:, None, None], (even + k // 2)[None, :, :]]).astype(jnp.float32)
        return acc + w_hi.astype(jnp.float32) * x_even + w_lo.astype(jnp.float32) * x_odd

    def k_step(i, acc):
        for part in range(bk // sub):
            code0 = i * bk + part * sub
            w_hi, w_lo = dequantize(cols, col_ok, code0, sub)
            x_even, x_odd = load_x(code0)
            if config.dot == "mma_swapped":  # acc.T += w @ x.T: the weight tile is the A operand
                acc = acc + _dot(w_hi, x_even, dtype) + _dot(w_lo, x_odd, dtype)
            else:
                acc = acc + _dot(x_even, w_hi, dtype) + _dot(x_odd, w_lo, dtype)
        return acc

    acc_shape = {"fma": (bn, bk // sub, sub // 2), "mma_swapped": (bn, bm)}.get(config.dot, (bm, bn))
    steps = k // bk
    per_split = pl.cdiv(steps, config.split_k)
    first = split * per_split
    last = jnp.minimum(first + per_split, steps)
    acc = jax.lax.fori_loop(first, last, fma_step if config.dot == "fma" else k_step,
                            jnp.zeros(acc_shape, jnp.float32))
    if config.dot == "fma":
        y = jnp.sum(jnp.sum(acc, axis=2), axis=1)[None, :]
    elif config.dot == "mma_swapped":
        y = acc.T
    else:
        y = acc

    mask = None
    if row_ok is not None or col_ok is not None:
        mask = (rows < m)[:, None] & (cols < n)[None, :]
    if config.split_k > 1:  # float32 partials; the wrapper sums them, adds the bias and casts
        plgpu.store(out_ref.at[split, rows[:, None], cols[None, :]], y, mask=mask)
        return
    if has_bias:  # the operand is already in the compute dtype (bitsandbytes casts it first)
        y = y + _load_vector(bias_ref, cols, col_ok).astype(jnp.float32)[None, :]
    y = round_to(y, dtype, explicit=interpret)
    plgpu.store(out_ref.at[rows[:, None], cols[None, :]], y.astype(out_dtype), mask=mask)


def _dequantize_kernel(packed_ref, absmax_ref, nested_absmax_ref, nested_code_ref, offset_ref, book_ref, out_ref,
                       *, layout: _Layout, config: Config, interpret: bool):
    bn, bk = config.block_n, config.block_k
    sub = sub_block(config, layout.blocksize)
    cols = pl.program_id(0) * bn + jnp.arange(bn)
    col_ok = cols < layout.n if layout.n % bn else None
    dequantize = _Dequantizer(packed_ref, absmax_ref, nested_absmax_ref, nested_code_ref, offset_ref, book_ref,
                              layout=layout, lookup=config.lookup, interpret=interpret)
    code0 = pl.program_id(1) * bk
    w_hi, w_lo = dequantize.step(cols, col_ok, code0, bk, sub)  # [block_n, blocks, sub / 2] each
    # interleave the nibbles back into K order (Triton's join + reshape)
    w = jnp.stack([w_hi, w_lo], axis=-1).reshape(bn, bk)
    at = out_ref.at[cols[:, None], (code0 + jnp.arange(bk))[None, :]]
    plgpu.store(at, w, mask=None if col_ok is None else jnp.broadcast_to(col_ok[:, None], (bn, bk)))


def _poisoned(shape, dtype):
    return jnp.full(shape, jnp.nan, dtype)


@functools.partial(jax.jit, static_argnames=("layout", "config", "interpret", "poison_output"))
def _dequantize(operands, *, layout: _Layout, config: Config, interpret: bool, poison_output: bool = False):
    out_shape = jax.ShapeDtypeStruct((layout.n, layout.k), layout.compute_dtype)
    extra = [_poisoned(out_shape.shape, out_shape.dtype)] if poison_output else []
    kernel = functools.partial(_dequantize_kernel, layout=layout, config=config, interpret=interpret)
    body = (lambda *refs: kernel(*refs[:len(operands)], refs[-1])) if poison_output else kernel
    return pl.pallas_call(
        body,
        grid=(pl.cdiv(layout.n, config.block_n), layout.k // config.block_k),
        out_shape=out_shape,
        input_output_aliases={len(operands): 0} if poison_output else {},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"jint8_int4_dequantize_{layout.n}x{layout.k}",
    )(*operands, *extra)


@functools.partial(jax.jit, static_argnames=("layout", "config", "out_dtype", "interpret", "poison_output"))
def _int4_matmul(x, bias, operands, *, layout: _Layout, config: Config, out_dtype, interpret: bool,
                 poison_output: bool):
    dtype = layout.compute_dtype
    if config.route == "xla_dot":
        weight = _dequantize(operands, layout=layout, config=config, interpret=interpret,
                             poison_output=poison_output)
        return reference.matmul_dequantized(x, weight, bias, compute_dtype=dtype, out_dtype=out_dtype)
    m, k, n = layout.m, layout.k, layout.n
    x = x.astype(dtype)
    # even K positions, then odd: the kernel's x loads are contiguous (wide loads); at 1 < M <= 16
    # the MMA path reads x strided instead of paying this extra XLA op
    deinterleaved = m > 16 or config.dot == "fma"
    if deinterleaved:
        x = jnp.concatenate([x[:, 0::2], x[:, 1::2]], axis=1)
    bias_c = operands[1] if bias is None else bias.astype(dtype)  # any array when unread
    if config.split_k > 1:
        out_shape = jax.ShapeDtypeStruct((config.split_k, m, n), jnp.float32)
    else:
        out_shape = jax.ShapeDtypeStruct((m, n), jnp.dtype(out_dtype))
    args = (x, *operands, bias_c)
    extra = [_poisoned(out_shape.shape, out_shape.dtype)] if poison_output else []
    kernel = functools.partial(_kernel, layout=layout, config=config, deinterleaved=deinterleaved,
                               has_bias=bias is not None, out_dtype=jnp.dtype(out_dtype), interpret=interpret)
    body = (lambda *refs: kernel(*refs[:len(args)], refs[-1])) if poison_output else kernel
    tiles = pl.cdiv(m, config.block_m) * pl.cdiv(n, config.block_n)
    y = pl.pallas_call(
        body,
        grid=(tiles, config.split_k),
        out_shape=out_shape,
        input_output_aliases={len(args): 0} if poison_output else {},
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        # K x N in the name: a profile times each projection of a model apart
        name=f"jint8_int4_matmul_{k}x{n}",
    )(*args, *extra)
    if config.split_k == 1:
        return y
    y = y.sum(axis=0)  # reference.matmul_dequantized's epilogue on the summed partials
    if bias is not None:
        y = y + bias_c.astype(jnp.float32)
    return y.astype(dtype).astype(out_dtype)


def _layout(x, w, compute_dtype) -> _Layout:
    n, k = w.shape
    return _Layout(m=x.shape[0], k=k, n=n, blocksize=w.blocksize, quant_type=w.quant_type,
                   double_quant=w.double_quant, compute_dtype=jnp.dtype(compute_dtype))


def _checked_config(config: Optional[Config], layout: _Layout) -> Config:
    m, k, n = layout.m, layout.k, layout.n
    if config is None:
        return config_for(jax.devices()[0].device_kind, m, k, n, layout.blocksize)
    reason = config.fits(m)
    if reason is not None:
        raise ValueError(f"int4 pallas_triton: config {config} cannot run this call: {reason}")
    return fit_to_shape(config, m, k, n, layout.blocksize)


def int4_matmul_pallas(x: jax.Array, w, bias: Optional[jax.Array] = None, *, compute_dtype, out_dtype,
                       config: Optional[Config] = None, interpret: bool = False,
                       poison_output: bool = False) -> jax.Array:
    """x [M, K] @ dequantize(w [N, K]).T + bias [N] -> [M, N] out_dtype (reference's recipe).

    config: tiles and route; default the GPU's table entry or configs.default_config.
    interpret: run the kernels in Pallas interpret mode (CPU tests).
    poison_output: the kernel writes into a NaN-filled buffer (GPU checks: unwritten tiles show).
    """
    reason = unsupported_shape_reason(w)
    if reason is not None:
        raise ValueError(f"int4 pallas_triton: {reason}")
    layout = _layout(x, w, compute_dtype)
    return _int4_matmul(x, bias, _weight_operands(w), layout=layout, config=_checked_config(config, layout),
                        out_dtype=jnp.dtype(out_dtype), interpret=interpret, poison_output=poison_output)


def dequantize_pallas(w, dtype, *, config: Optional[Config] = None, interpret: bool = False,
                      poison_output: bool = False) -> jax.Array:
    """The [N, K] weight in dtype, from the kernels' dequantization (checks: it must equal
    reference.dequantized_weight(w, dtype) bit for bit)."""
    reason = unsupported_shape_reason(w)
    if reason is not None:
        raise ValueError(f"int4 pallas_triton: {reason}")
    n, k = w.shape
    layout = _Layout(m=1, k=k, n=n, blocksize=w.blocksize, quant_type=w.quant_type, double_quant=w.double_quant,
                     compute_dtype=jnp.dtype(dtype))
    config = config or Config(block_m=128, block_n=64, block_k=256, route="xla_dot")
    config = fit_to_shape(config, 1024, k, n, w.blocksize)
    return _dequantize(_weight_operands(w), layout=layout, config=config, interpret=interpret,
                       poison_output=poison_output)


BACKEND = Backend(BACKEND_NAME, int4_matmul_pallas, unsupported_reason)
