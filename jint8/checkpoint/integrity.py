"""Per-array checksums: CRC-32C of each stored array's bytes (C order), written into the leaf
records at save and compared after restore, so flipped or truncated bytes are refused instead of
loaded. CRC-32C runs at memory speed with the SSE4.2 / ARMv8 instructions the crc32c package uses."""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping

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


def array_checksum(array) -> int:
    """CRC-32C of an array's bytes in C order (a sharded jax.Array is gathered to the host first)."""
    return int(crc32c.crc32c(_host_copy(array).reshape(-1).view(np.uint8)))


def _verifiable(array) -> bool:
    # an array with shards on other processes cannot be gathered here; each process could check its
    # own shards only against per-shard sums, which this format does not store
    return not isinstance(array, jax.Array) or array.is_fully_addressable


def verify_checksums(path: pathlib.Path, leaves, restored: Mapping) -> None:
    """Compare each restored array with its recorded checksum; CheckpointIntegrityError names the
    arrays that differ. Leaves recorded without checksums (older checkpoints) are not checked."""
    from jint8.checkpoint.tree import _lookup

    bad, unchecked = [], 0
    for leaf in leaves:
        for part, expected in leaf.checksums:
            storage_path = leaf.storage_path + ((part,) if part else ())
            array = _lookup(restored, storage_path)
            if not _verifiable(array):
                unchecked += 1
                continue
            if array_checksum(array) != expected:
                bad.append("/".join(storage_path))
    if unchecked:
        logger.info("%s: %d arrays span other processes and were not checksummed", path, unchecked)
    if bad:
        raise CheckpointIntegrityError(
            f"{path}: {len(bad)} arrays do not match the checksums written at save ({ALGORITHM}): "
            f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; the files are damaged: save the checkpoint again"
        )
