"""CRC-32C computed on the device that holds an array: the checkpoint checksum without copying the
array back to the host (only one uint32 per shard comes back).

CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF, as
the crc32c package computes it) is linear over GF(2). With `raw(B)` the CRC register after
feeding bytes B to a register starting at 0, and `shift_m` the linear map "feed m zero bytes":

    raw(A || B) = shift_|B|(raw(A)) ^ raw(B),    crc32c(B, prev) = ~(shift_|B|(~prev) ^ raw(B))

and leading zero bytes leave raw unchanged (a zero register stays zero on zero input). So the
array's bytes are front-padded to whole 4-byte words, each word's raw value is four lookups in
the slicing-by-4 tables, and neighbouring blocks are merged pairwise, log2(words) times, each
merge one application of shift (four lookups in a table made on the host for that block size);
an odd count gets a zero block in front. The result equals crc32c.crc32c of the C-order bytes
(tests/checkpoint/test_device_crc.py holds them equal for every dtype and odd length).
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


@functools.cache
def _word_tables() -> np.ndarray:
    """[4, 256] slicing-by-4 tables: raw(b0 b1 b2 b3) = t[3][b0] ^ t[2][b1] ^ t[1][b2] ^ t[0][b3]."""
    table = _byte_table()
    tables = [table]
    for _ in range(3):
        previous = tables[-1]
        tables.append((previous >> 8) ^ table[previous & 0xFF])
    return np.stack(tables)


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


def _shift_tables(nbytes: int) -> np.ndarray:
    """[4, 256]: shift_nbytes(c) = t[0][c & 255] ^ t[1][c >> 8 & 255] ^ t[2][c >> 16 & 255] ^ t[3][c >> 24]."""
    columns = _shift_columns(nbytes)
    values = np.arange(256, dtype=np.int64)
    tables = np.zeros((4, 256), np.uint32)
    for byte in range(4):
        for bit in range(8):
            tables[byte] ^= np.where(values >> bit & 1, np.uint32(columns[8 * byte + bit]), np.uint32(0))
    return tables


def _lookup4(tables: jax.Array, register: jax.Array) -> jax.Array:
    return (tables[0][(register & 0xFF).astype(jnp.int32)] ^ tables[1][(register >> 8 & 0xFF).astype(jnp.int32)]
            ^ tables[2][(register >> 16 & 0xFF).astype(jnp.int32)] ^ tables[3][(register >> 24).astype(jnp.int32)])


def _bytes_of(array: jax.Array) -> jax.Array:
    """The array's C-order bytes as a flat uint8 array (bool as its 0/1 bytes)."""
    if array.dtype == jnp.bool_:
        array = array.astype(jnp.uint8)
    if jnp.dtype(array.dtype).itemsize > 1:
        array = jax.lax.bitcast_convert_type(array, jnp.uint8)  # a trailing axis of the item's bytes
    elif array.dtype != jnp.uint8:
        array = jax.lax.bitcast_convert_type(array, jnp.uint8)
    return array.reshape(-1)


def _raw(array: jax.Array) -> jax.Array:
    """raw(bytes of array) as a uint32 scalar, computed where the array is."""
    data = _bytes_of(array)
    pad = -data.size % 4
    if pad:
        data = jnp.concatenate([jnp.zeros((pad,), jnp.uint8), data])
    words = data.reshape(-1, 4).astype(jnp.int32)
    t = jnp.asarray(_word_tables())
    register = t[3][words[:, 0]] ^ t[2][words[:, 1]] ^ t[1][words[:, 2]] ^ t[0][words[:, 3]]
    block = 4
    while register.shape[0] > 1:
        if register.shape[0] % 2:
            register = jnp.concatenate([jnp.zeros((1,), jnp.uint32), register])
        pairs = register.reshape(-1, 2)
        register = _lookup4(jnp.asarray(_shift_tables(block)), pairs[:, 0]) ^ pairs[:, 1]
        block *= 2
    return register.reshape(())


@functools.lru_cache(maxsize=256)
def compiled_raw(shape: tuple[int, ...], dtype: np.dtype, device: jax.Device):
    """raw, compiled for a single-device array of this shape and dtype on device (cached: a model's
    many layers share a few shapes; compiled_raw.cache_clear() empties it)."""
    sharding = SingleDeviceSharding(device)
    return jax.jit(_raw).lower(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)).compile()


def _compiled_for(array: jax.Array):
    return compiled_raw(tuple(array.shape), np.dtype(array.dtype), next(iter(array.sharding.device_set)))


def device_raw(array: jax.Array) -> jax.Array:
    """raw of a single-device array's bytes, dispatched asynchronously on its device (a uint32
    scalar there)."""
    if array.size == 0:
        return np.zeros((), np.uint32)
    return _compiled_for(array)(array)


def device_crc32c(array: jax.Array, previous: int = 0) -> int:
    """crc32c.crc32c(C-order bytes of a single-device array, previous), computed on its device."""
    nbytes = int(math.prod(array.shape)) * jnp.dtype(array.dtype).itemsize
    return finish(int(jax.device_get(device_raw(array))), nbytes, previous)
