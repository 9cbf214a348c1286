"""What every checkpoint reader produces: one TensorRecord per stored tensor, read on demand."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
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
