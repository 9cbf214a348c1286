"""CRC-32C computed on the device that holds an array: the checkpoint checksum without copying the
array back to the host (only one uint32 per shard comes back).

CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF, as
the crc32c package computes it) is linear over GF(2). With `raw(B)` the CRC register after
feeding bytes B to a register starting at 0, and `shift_m` the linear map "feed m zero bytes":

    raw(A || B) = shift_|B|(raw(A)) ^ raw(B),    crc32c(B, prev) = ~(shift_|B|(~prev) ^ raw(B))

and leading zero bytes leave raw unchanged (a zero register stays zero on zero input). So the
array's bytes are front-padded to whole 4-byte words, read as little-endian uint32, and merged 256
at a time, a few passes in all (4 for 1 GiB): within a group, element c's share of the group's raw
is a linear map of it (its raw, for a word, then shift by the bytes after it), looked up byte by
byte in a [256 positions, 4 bytes, 256 values] table made on the host, and the shares are xored.
A program of a few dozen operations per pass (it compiles in well under a second), with
temporaries of at most about twice the array's bytes (XLA:CPU, measured). The result equals crc32c.crc32c of the C-order
bytes (tests/checkpoint/test_device_crc.py holds them equal for several dtypes and lengths).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import SingleDeviceSharding

_POLYNOMIAL = 0x82F63B78
_MASK = 0xFFFFFFFF


@functools.cache
def _byte_table() -> np.ndarray:
    """table[i]: the register after feeding byte i to a zero register (the classic CRC table)."""
    table = np.arange(256, dtype=np.uint64)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ _POLYNOMIAL, table >> 1)
    return table.astype(np.uint32)


def _shift_one_byte(register: int) -> int:
    return (register >> 8) ^ int(_byte_table()[register & 0xFF])


def _apply(columns: tuple[int, ...], register: int) -> int:
    """A GF(2) linear map of 32-bit registers, given by the images of the 32 unit vectors."""
    out = 0
    for bit in range(32):
        if register >> bit & 1:
            out ^= columns[bit]
    return out


@functools.cache
def _shift_columns(nbytes: int) -> tuple[int, ...]:
    """The map shift_nbytes as the images of the 32 unit vectors (repeated squaring)."""
    if nbytes == 0:
        return tuple(1 << bit for bit in range(32))
    if nbytes == 1:
        return tuple(_shift_one_byte(1 << bit) for bit in range(32))
    half = _shift_columns(nbytes // 2)
    squared = tuple(_apply(half, column) for column in half)
    if nbytes % 2:
        one = _shift_columns(1)
        squared = tuple(_apply(one, column) for column in squared)
    return squared


def shift_register(register: int, nbytes: int) -> int:
    """The register after feeding nbytes zero bytes to it (host side, for combining shards)."""
    return _apply(_shift_columns(nbytes), register & _MASK)


def finish(raw: int, nbytes: int, previous: int = 0) -> int:
    """crc32c.crc32c(data, previous) of data with raw(data) = raw and len(data) = nbytes."""
    return (shift_register(~previous & _MASK, nbytes) ^ raw) ^ _MASK


_FAN_IN = 256  # elements merged into one per pass: a 1 GiB array takes 4 passes


@functools.cache
def _word_columns() -> tuple[int, ...]:
    """raw of a 4-byte word as a linear map of its little-endian uint32's 32 bits."""
    columns = []
    for bit in range(32):
        register = 0
        for byte in (1 << bit).to_bytes(4, "little"):
            register = _shift_one_byte(register ^ byte)  # feeding a byte: (s >> 8) ^ T[(s ^ byte) & 255]
        columns.append(register)
    return tuple(columns)


_IDENTITY = tuple(1 << bit for bit in range(32))


def _apply_many(columns: np.ndarray, registers: np.ndarray) -> np.ndarray:
    """A GF(2) linear map (columns [32] uint32) applied to each of registers (uint32, any shape)."""
    out = np.zeros(registers.shape, np.uint32)
    for bit in range(32):
        out ^= np.where(registers >> np.uint32(bit) & np.uint32(1), columns[bit], np.uint32(0))
    return out


@functools.lru_cache(maxsize=64)
def _position_tables(base: tuple[int, ...], block: int) -> np.ndarray:
    """[_FAN_IN * 4 * 256] uint32: entry (c, j, v) is the share of the merged raw that byte value v
    in byte j of element c contributes, for _FAN_IN consecutive elements of `block` bytes: byte j
    of element c, through base (the word's raw at the first pass, the identity after it), then
    shift_{(_FAN_IN - 1 - c) * block}. Made position by position from the last (shift by 0),
    composing one shift_block each step."""
    step = np.array(_shift_columns(block), np.uint32)
    maps = [np.array(base, np.uint32)]
    for _ in range(_FAN_IN - 1):
        maps.append(_apply_many(step, maps[-1]))
    values = (np.arange(256, dtype=np.uint32)[None, :] << (8 * np.arange(4, dtype=np.uint32))[:, None])  # [4, 256]
    tables = np.stack([_apply_many(columns, values) for columns in reversed(maps)])  # [_FAN_IN, 4, 256]
    return tables.reshape(-1)


def _merge_pass(x: jax.Array, block: int, base: tuple[int, ...]) -> jax.Array:
    """x [n] elements of `block` bytes each -> [ceil(n / _FAN_IN)] raw registers of _FAN_IN * block
    bytes: four table lookups per element and an xor reduction. The n % _FAN_IN leading elements
    make the first register, as if zero-padded in front (leading zeros leave raw unchanged)."""
    tables = jnp.asarray(_position_tables(base, block))

    def merged(elements: jax.Array, first_position: int) -> jax.Array:  # [rows, k] -> [rows]
        positions = jnp.arange(first_position, first_position + elements.shape[1], dtype=jnp.int32) * 1024
        shares = [tables[positions + 256 * j + ((elements >> (8 * j)) & 0xFF).astype(jnp.int32)] for j in range(4)]
        return jax.lax.reduce(functools.reduce(jnp.bitwise_xor, shares), np.uint32(0), jax.lax.bitwise_xor, (1,))

    head = x.shape[0] % _FAN_IN
    parts = []
    if head:
        parts.append(merged(x[:head][None, :], _FAN_IN - head))
    if x.shape[0] >= _FAN_IN:
        parts.append(merged(x[head:].reshape(-1, _FAN_IN), 0))
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts)


def _bytes_of(array: jax.Array) -> jax.Array:
    """The array's C-order bytes as a flat uint8 array (bool as its 0/1 bytes)."""
    if array.dtype == jnp.bool_:
        array = array.astype(jnp.uint8)
    if array.dtype != jnp.uint8:  # wider items: a trailing axis of the item's bytes
        array = jax.lax.bitcast_convert_type(array, jnp.uint8)
    return array.reshape(-1)


def _raw(array: jax.Array) -> jax.Array:
    """raw(bytes of array) as a uint32 scalar, computed where the array is."""
    data = _bytes_of(array)
    pad = -data.size % 4
    if pad:
        data = jnp.concatenate([jnp.zeros((pad,), jnp.uint8), data])
    # the words as little-endian uint32 (a bitcast: no copy); b0, a word's first byte, is its low byte
    register = _merge_pass(jax.lax.bitcast_convert_type(data.reshape(-1, 4), jnp.uint32), 4, _word_columns())
    block = 4 * _FAN_IN
    while register.shape[0] > 1:
        register = _merge_pass(register, block, _IDENTITY)
        block *= _FAN_IN
    return register.reshape(())


@functools.lru_cache(maxsize=256)
def compiled_raw(shape: tuple[int, ...], dtype: np.dtype, device: jax.Device):
    """raw, compiled for a single-device array of this shape and dtype on device (cached: a model's
    many layers share a few shapes; compiled_raw.cache_clear() empties it)."""
    sharding = SingleDeviceSharding(device)
    return jax.jit(_raw).lower(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)).compile()


def compile_key(array) -> tuple:
    """compiled_raw's arguments for a single-device array (or a ShapeDtypeStruct with its sharding)."""
    return tuple(array.shape), np.dtype(array.dtype), next(iter(array.sharding.device_set))


def device_raw(array: jax.Array) -> jax.Array:
    """raw of a single-device array's bytes, dispatched asynchronously on its device (a uint32
    scalar there)."""
    if array.size == 0:
        return np.zeros((), np.uint32)
    return compiled_raw(*compile_key(array))(array)


def device_crc32c(array: jax.Array, previous: int = 0) -> int:
    """crc32c.crc32c(C-order bytes of a single-device array, previous), computed on its device."""
    nbytes = int(math.prod(array.shape)) * jnp.dtype(array.dtype).itemsize
    return finish(int(jax.device_get(device_raw(array))), nbytes, previous)
