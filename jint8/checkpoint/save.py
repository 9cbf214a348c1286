"""save_quantized: an Orbax save into a hidden staging directory, published atomically."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pathlib
import shutil
import sys
import uuid
from typing import Optional

import jax
import orbax.checkpoint as ocp

from jint8.checkpoint.metadata import (
    _ARRAYS_ITEM,
    _METADATA_ITEM,
    _PREVIOUS_MARK,
    _STAGING_MARK,
    PathLike,
    _checkpointer,
    _metadata_json,
)
from jint8.checkpoint.tree import _to_storage
from jint8.errors import CheckpointError, CheckpointExistsError, InvalidConfigError
from jint8.quant4 import Int4Config
from jint8.quantize import Int8Config

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- atomic publish


def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
    """Swap two paths in one step with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    if sys.platform != "linux":
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _check_destination(target: pathlib.Path, overwrite: bool) -> None:
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise CheckpointExistsError(f"{target} already exists; overwrite=True (CLI: --overwrite) replaces it")
    if target.is_dir() and not target.is_symlink():
        ours = (target / _METADATA_ITEM).is_dir() and (target / _ARRAYS_ITEM).is_dir()  # even if corrupt
        if ours or not any(target.iterdir()):
            return
    # Never delete a path that is not ours: a typo must not wipe a model directory.
    raise CheckpointExistsError(f"{target} exists and is not a jint8 checkpoint; remove it yourself to write here")


def _publish(staged: pathlib.Path, target: pathlib.Path, overwrite: bool) -> None:
    """Move a finalized checkpoint onto target; an old one stays loadable until the last step."""
    _check_destination(target, overwrite)
    if not target.exists():
        os.rename(staged, target)
    elif not _exchange(staged, target):
        # Two renames: a crash between them leaves the old checkpoint at the "previous" sibling.
        previous = target.with_name(f".{target.name}{_PREVIOUS_MARK}{uuid.uuid4().hex[:8]}")
        os.rename(target, previous)
        try:
            os.rename(staged, target)
        except OSError:
            os.rename(previous, target)  # put the old checkpoint back before reporting the failure
            raise
        shutil.rmtree(previous)
    # After an exchange the old checkpoint sits at `staged`; the caller removes the staging dir.


# ----------------------------------------------------------------------------- public API


def save_quantized(
    directory: PathLike,
    params,
    *,
    quant_config,
    model_config=None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a quantized params tree (Linen dict, FrozenDict or nnx.State) as an Orbax checkpoint.

    quant_config: the Int8Config or Int4Config params were quantized with (stored, returned by
      load_quantized). Int4Weight leaves are stored as they are and restored replicated.
    model_config: a dataclass (stored as dataclasses.asdict plus its class name), a dict, or None.
    overwrite: replace an existing jint8 checkpoint at directory, atomically; without it an
      existing path raises CheckpointExistsError. Returns the absolute checkpoint path.
    """
    if not isinstance(quant_config, (Int8Config, Int4Config)):
        raise InvalidConfigError(f"quant_config must be an Int8Config or Int4Config, got {type(quant_config).__name__}")
    if jax.process_count() > 1:
        raise CheckpointError(f"{directory}: save_quantized supports one process, not {jax.process_count()}")
    target = pathlib.Path(directory).absolute()
    kind, leaves, arrays = _to_storage(params)
    metadata = _metadata_json(kind, leaves, quant_config, model_config)
    _check_destination(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}{_STAGING_MARK}{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        with _checkpointer() as checkpointer:
            checkpointer.save(
                staging / "checkpoint",
                args=ocp.args.Composite(
                    **{_ARRAYS_ITEM: ocp.args.StandardSave(arrays), _METADATA_ITEM: ocp.args.JsonSave(metadata)}
                ),
            )
        _publish(staging / "checkpoint", target, overwrite)
    finally:
        # Partial data of a failed save, or the replaced checkpoint after a swap. Best effort: a
        # failure to clean up must not hide the exception that is propagating.
        shutil.rmtree(staging, ignore_errors=True)
    nbytes = sum(leaf.nbytes for leaf in leaves)
    logger.info("saved %d leaves (%.1f MiB before compression) to %s", len(leaves), nbytes / 2**20, target)
    return target


def quantize_checkpoint(
    src: PathLike,
    out: PathLike,
    *,
    quant_config: Optional[Int8Config] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> pathlib.Path:
    """Load any source jint8.from_pretrained reads (safetensors, msgpack, GGUF), quantized while loading
    with quant_config (default Int8Config()), and save it to out with its model config.

    progress: from_pretrained's progress bar (over the bytes read). Returns the checkpoint path.
    """
    import jint8

    if not hasattr(jint8, "from_pretrained"):
        raise CheckpointError("quantize_checkpoint needs jint8.from_pretrained, which this build lacks")
    quant_config = quant_config or Int8Config()
    _check_destination(pathlib.Path(out).absolute(), overwrite)  # before the expensive load
    model, params = jint8.from_pretrained(src, quantization=quant_config, progress=progress)
    return save_quantized(out, params, quant_config=quant_config, model_config=model.config, overwrite=overwrite)
