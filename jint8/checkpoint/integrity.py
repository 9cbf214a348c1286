"""Per-array checksums: CRC-32C of each stored array's bytes (C order), written into the leaf
records at save and compared after restore, so flipped or truncated bytes are refused instead of
loaded.

An array on accelerators is checked where it is (checkpoint.crc: one uint32 per shard comes back,
shard by shard where its shards are whole leading-axis blocks): copying a model's weights back to
the host to checksum them would cost as long as the restore itself. Host arrays, CPU-device
arrays (their buffers are host memory: read in place) and other shardings are checksummed on the
host at memory speed with the SSE4.2 / ARMv8 instructions the crc32c package uses, several arrays
at once (a small thread pool: crc32c releases the GIL)."""

from __future__ import annotations

import logging
import math
import os
import pathlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import crc32c
import jax
import jax.numpy as jnp
import numpy as np

from jint8.checkpoint import crc
from jint8.errors import CheckpointIntegrityError

logger = logging.getLogger(__name__)

ALGORITHM = "crc32c"


def _on_cpu_devices(devices) -> bool:
    return all(device.platform == "cpu" for device in devices)


def _on_cpu(array: jax.Array) -> bool:
    return _on_cpu_devices(array.sharding.device_set)


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
            host[shard.index] = _shard_on_host(shard.data)
    return host


def _shard_on_host(data: jax.Array) -> np.ndarray:
    # a CPU device's buffer is host memory: viewed in place (jax caches no copy of it); an
    # accelerator's is copied on the device first (see _host_copy)
    return np.asarray(data if _on_cpu(data) else jnp.copy(data))


def _leading_axis_shards(array: jax.Array):
    """The single-device arrays whose bytes, one after another, are the array's in C order (one
    copy of each block), or None where its shards split a later axis."""
    shards = [shard for shard in array.addressable_shards if shard.replica_id == 0]
    leading_only = all(index == slice(None) or index == slice(0, size, None)
                       for shard in shards for index, size in zip(shard.index[1:], array.shape[1:]))
    if array.ndim == 0 or not leading_only:
        return None if len(shards) > 1 else [shards[0].data]
    return [shard.data for shard in sorted(shards, key=lambda s: s.index[0].start or 0)]


def _c_order_blocks(array):
    """Host arrays whose bytes, one after another, are the array's in C order: the array itself
    (a host array, or a jax.Array with one copy of its values on one device), its shards in
    order where they split the leading axis only, else the whole array gathered (_host_copy).
    Each block is fetched when the caller asks for it, so at most one is on the host at a time."""
    if not isinstance(array, jax.Array):
        yield np.ascontiguousarray(np.asarray(array))
        return
    blocks = _leading_axis_shards(array)
    if blocks is None:
        yield _host_copy(array)
        return
    for block in blocks:
        yield np.ascontiguousarray(_shard_on_host(block))


def _on_device_blocks(array):
    """The blocks of an accelerator array that checkpoint.crc sums where they are, or None (a host
    array, a CPU one, or shards that split a later axis: summed on the host)."""
    if not isinstance(array, jax.Array) or _on_cpu(array):
        return None
    return _leading_axis_shards(array)


def _host_checksum(array) -> int:
    value = 0
    for block in _c_order_blocks(array):
        value = crc32c.crc32c(block.reshape(-1).view(np.uint8), value)
    return int(value)


def _combined(blocks, raws) -> int:
    """The CRC-32C of the blocks' bytes one after another, from each block's raw register."""
    value = 0
    for block, raw in zip(blocks, raws):
        value = crc.finish(int(raw), block.size * block.dtype.itemsize, value)
    return value


def array_checksum(array) -> int:
    """CRC-32C of an array's bytes in C order (a sharded jax.Array read shard by shard; an
    accelerator array summed on its devices)."""
    blocks = _on_device_blocks(array)
    if blocks is None:
        return _host_checksum(array)
    return _combined(blocks, jax.device_get([crc.device_raw(block) for block in blocks]))


def _device_checksums(arrays: list) -> list[int]:
    """array_checksum of many accelerator arrays: each distinct block shape compiled once, several
    compiles at once (XLA compiles outside the GIL), then every sum dispatched before any is
    fetched, so the device works through them back to back and one transfer brings them all."""
    blocks = [_on_device_blocks(array) for array in arrays]
    distinct = {crc.compile_key(b) for bs in blocks for b in bs if b.size}
    with ThreadPoolExecutor(_checksum_workers(), thread_name_prefix="jint8-crc-compile") as pool:
        list(pool.map(lambda key: crc.compiled_raw(*key), distinct))
    raws = jax.device_get([[crc.device_raw(block) for block in bs] for bs in blocks])
    return [_combined(bs, rs) for bs, rs in zip(blocks, raws)]


def array_checksums(arrays: list) -> list[int]:
    """array_checksum of each array: the accelerator arrays' all dispatched at once (_device_checksums),
    the others on a few host threads."""
    on_device = [i for i, array in enumerate(arrays) if _on_device_blocks(array) is not None]
    sums: list = [None] * len(arrays)
    for i, value in zip(on_device, _device_checksums([arrays[i] for i in on_device])):
        sums[i] = value
    on_host = [i for i in range(len(arrays)) if sums[i] is None]
    with ThreadPoolExecutor(_checksum_workers(), thread_name_prefix="jint8-crc") as pool:
        for i, value in zip(on_host, pool.map(lambda i: _host_checksum(arrays[i]), on_host)):
            sums[i] = value
    return sums


def compile_ahead(target) -> ThreadPoolExecutor:
    """Start compiling the checksums of a restore target's single-device accelerator arrays (a tree
    of ShapeDtypeStructs with shardings) on a few threads, so the compiles run while the arrays are
    read; the caller shuts the pool down (waiting) before verify_checksums. Other arrays compile
    when they are checked."""
    distinct = set()
    for leaf in jax.tree.leaves(target):
        sharding = getattr(leaf, "sharding", None)
        if (isinstance(sharding, jax.sharding.SingleDeviceSharding) and math.prod(leaf.shape) > 0
                and not _on_cpu_devices(sharding.device_set)):
            distinct.add(crc.compile_key(leaf))
    pool = ThreadPoolExecutor(_checksum_workers(), thread_name_prefix="jint8-crc-compile")
    for key in distinct:
        pool.submit(crc.compiled_raw, *key)
    return pool


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
    sums = array_checksums([array for _, array, _ in checks])
    bad = ["/".join(path) for (path, _, expected), got in zip(checks, sums) if got != expected]
    if unchecked:
        logger.info("%s: %d arrays span other processes and were not checksummed", path, unchecked)
    if bad:
        raise CheckpointIntegrityError(
            f"{path}: {len(bad)} arrays do not match the checksums written at save ({ALGORITHM}): "
            f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the files are damaged: save the checkpoint again"
        )
