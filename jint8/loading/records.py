"""What every checkpoint reader produces: one TensorRecord per stored tensor, read on demand."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import mmap
import threading
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np

from jint8.errors import CheckpointFileError


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One tensor of a checkpoint file, not yet read.

    name: its transformers name ("model.layers.0.self_attn.q_proj.weight"), the key of the name map.
    file / stored_name: where it lives, for error messages.
    shape: the stored shape (PyTorch layout unless flax_layout).
    read: returns the tensor as a host numpy array (float types; bfloat16 via ml_dtypes), as
      stored: a reader may return a read-only view of a memory-mapped file.
    dtype / nbytes: the stored dtype and size where the file's header says them (None otherwise),
      so a wrong dtype is refused and progress is counted in bytes before anything is read.
    release: called once the tensor is converted and its read no longer needed (a memory-mapped
      reader drops the pages from the process); None where there is nothing to release.
    row_order: a hashable function of the stored array (numpy or jax) giving its rows in
      transformers' order (GGUF's gguf_file.RowOrder), applied on the device in the conversion;
      None where read() returns them in that order.
    """

    name: str
    file: str
    stored_name: str
    shape: tuple[int, ...]
    flax_layout: bool
    read: Callable[[], np.ndarray]
    dtype: Optional[np.dtype] = None
    nbytes: Optional[int] = None
    release: Optional[Callable[[], None]] = None
    row_order: Optional[Callable] = None


# madvise(MADV_POPULATE_READ) (linux/mman.h; Python's mmap module names it from 3.13 only)
_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_populate_supported = [hasattr(mmap.mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED")]


class MappedFile:
    """One file's memory map, opened on the first read (by whichever thread reads first); the
    readers of safetensors, msgpack and GGUF files take their tensors from it as views."""

    def __init__(self, file: Path):
        self.file = file
        self._map: Optional[mmap.mmap] = None
        self._lock = threading.Lock()

    def buffer(self) -> mmap.mmap:
        """The whole file, mapped read-only (an empty file cannot be mapped: ValueError)."""
        with self._lock:
            if self._map is None:
                with open(self.file, "rb") as handle:
                    self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            return self._map

    def view(self, dtype, shape: tuple[int, ...], offset: int) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        self._populate(offset, count * np.dtype(dtype).itemsize)
        # not closed explicitly: arrays (and zero-copy device buffers on a CPU backend) may still
        # view it; the map goes when the last of them does
        return np.frombuffer(self.buffer(), dtype=dtype, count=count, offset=offset).reshape(shape)

    def _populate(self, offset: int, nbytes: int) -> None:
        """Map the range's pages in one call (Linux 5.14+; elsewhere a no-op), on the reading
        thread: a device transfer reading the view then copies at memory speed instead of taking
        a page fault every few pages in the transfer's own thread, and several readers populate
        their tensors in parallel (from the disk, where the page cache does not hold them)."""
        if nbytes <= 0 or not _populate_supported[0]:
            return
        page = mmap.PAGESIZE
        start = offset // page * page
        buffer = self.buffer()
        try:
            buffer.madvise(_MADV_POPULATE_READ, start, min(offset + nbytes, len(buffer)) - start)
        except (OSError, ValueError):
            _populate_supported[0] = False  # an older kernel (EINVAL) or platform: fault pages as read

    def release(self, offset: int, nbytes: int) -> None:
        """Drop a converted tensor's pages from this process (its resident set), so that a load
        holds a few tensors of the file mapped, not the whole file; a later read of the range
        faults the same bytes back in from the page cache or the file."""
        page = mmap.PAGESIZE
        start, end = -(-offset // page) * page, (offset + nbytes) // page * page
        with self._lock:
            if self._map is not None and end > start and hasattr(mmap, "MADV_DONTNEED"):
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)


@functools.cache
def _host_cpu_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
        logging.getLogger("jint8").warning(
            "no jax CPU backend (JAX_PLATFORMS?): tensors are converted on the default device, one at a time")
        return None


def on_host():
    """Context in which jnp work runs on the host CPU, so full-precision tensors stay off accelerators."""
    device = _host_cpu_device()
    return jax.default_device(device) if device is not None else contextlib.nullcontext()


def check_readable(file) -> None:
    """CheckpointFileError naming file if it is missing or this user may not read it (libraries
    report the latter as "No such file or directory" or as corruption)."""
    import os

    try:
        with open(file, "rb"):
            pass
    except PermissionError:
        raise CheckpointFileError(f"{file}: permission denied (the current user cannot read this file)") from None
    except FileNotFoundError:
        raise CheckpointFileError(f"{file}: no such file") from None
    except IsADirectoryError:
        raise CheckpointFileError(f"{file}: is a directory, expected a file") from None
    if not os.access(file, os.R_OK):
        raise CheckpointFileError(f"{file}: permission denied (the current user cannot read this file)")


def read_weight_map(index: Path, kind: str) -> dict[str, str]:
    """{tensor name: shard file} of a sharded checkpoint's index JSON (safetensors or msgpack)."""
    try:
        return json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointFileError(f"{index}: not a valid {kind} index ({e})") from None
