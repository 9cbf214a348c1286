"""Per-array checksums: CRC-32C of each stored array's bytes (C order), written into the leaf
records at save and compared after restore, so flipped or truncated bytes are refused instead of
loaded. CRC-32C runs at memory speed with the SSE4.2 / ARMv8 instructions the crc32c package uses;
restore checks several arrays at once (a small thread pool: crc32c releases the GIL), each read
from the devices shard by shard where its shards are whole leading-axis blocks."""

from __future__ import annotations

import logging
import os
import pathlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import crc32c
import jax
import jax.numpy as jnp
import numpy as np

from jint8.errors import CheckpointIntegrityError

logger = logging.getLogger(__name__)

ALGORITHM = "crc32c"


def _host_copy(array) -> np.ndarray:
    """The array's values on the host, gathered shard by shard, without jax keeping that copy: an
    accelerator array caches the host copy np.asarray / device_get made of it for its lifetime (a
    verified model would hold a second copy of its weights in host memory). Each shard is copied on
    its device first and the copy fetched, so only the temporary holds the cached host value."""
    if not isinstance(array, jax.Array):
        return np.ascontiguousarray(np.asarray(array))
    host = np.empty(array.shape, array.dtype)
    for shard in array.addressable_shards:
        if shard.replica_id == 0:
            host[shard.index] = np.asarray(jnp.copy(shard.data))
    return host


def _c_order_blocks(array):
    """Host arrays whose bytes, one after another, are the array's in C order: the array itself
    (a host array, or a jax.Array with one copy of its values on one device), its shards in
    order where they split the leading axis only, else the whole array gathered (_host_copy).
    Each block is fetched when the caller asks for it, so at most one is on the host at a time."""
    if not isinstance(array, jax.Array):
        yield np.ascontiguousarray(np.asarray(array))
        return
    shards = [shard for shard in array.addressable_shards if shard.replica_id == 0]
    leading_only = all(index == slice(None) or index == slice(0, size, None)
                       for shard in shards for index, size in zip(shard.index[1:], array.shape[1:]))
    if array.ndim == 0 or not leading_only:
        yield _host_copy(array)
        return
    for shard in sorted(shards, key=lambda s: s.index[0].start or 0):
        yield np.ascontiguousarray(np.asarray(jnp.copy(shard.data)))  # a copy: jax keeps no host value


def array_checksum(array) -> int:
    """CRC-32C of an array's bytes in C order (a sharded jax.Array read shard by shard)."""
    crc = 0
    for block in _c_order_blocks(array):
        crc = crc32c.crc32c(block.reshape(-1).view(np.uint8), crc)
    return int(crc)


def _checksum_workers() -> int:
    # crc32c releases the GIL for buffers of 32 KiB and more, and the device-to-host copies run
    # outside it: threads check several arrays at once. A few: each holds one array's block
    # on the host while it runs.
    return max(1, min(4, os.cpu_count() or 1))


def _verifiable(array) -> bool:
    # an array with shards on other processes cannot be gathered here; each process could check its
    # own shards only against per-shard sums, which this format does not store
    return not isinstance(array, jax.Array) or array.is_fully_addressable


def verify_checksums(path: pathlib.Path, leaves, restored: Mapping) -> None:
    """Compare each restored array with its recorded checksum; CheckpointIntegrityError names the
    arrays that differ. Leaves recorded without checksums (older checkpoints) are not checked."""
    from jint8.checkpoint.tree import _lookup

    checks, unchecked = [], 0
    for leaf in leaves:
        for part, expected in leaf.checksums:
            storage_path = leaf.storage_path + ((part,) if part else ())
            array = _lookup(restored, storage_path)
            if not _verifiable(array):
                unchecked += 1
                continue
            checks.append((storage_path, array, expected))
    with ThreadPoolExecutor(_checksum_workers(), thread_name_prefix="jint8-crc") as pool:
        sums = list(pool.map(lambda check: array_checksum(check[1]), checks))
    bad = ["/".join(path) for (path, _, expected), got in zip(checks, sums) if got != expected]
    if unchecked:
        logger.info("%s: %d arrays span other processes and were not checksummed", path, unchecked)
    if bad:
        raise CheckpointIntegrityError(
            f"{path}: {len(bad)} arrays do not match the checksums written at save ({ALGORITHM}): "
            f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the files are damaged: save the checkpoint again"
        )
