"""load_quantized and load_metadata: a finalized checkpoint checked against its metadata and
read straight into the target shardings."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jint8.checkpoint.integrity import compile_ahead, verify_checksums
from jint8.checkpoint.metadata import (
    _ARRAYS_ITEM,
    _METADATA_ITEM,
    _PREVIOUS_MARK,
    FORMAT_NAME,
    CheckpointMetadata,
    PathLike,
    _checkpointer,
    _Leaf,
    _parse_metadata,
)
from jint8.checkpoint.shardings import ShardingsArg, _abstract_arrays, _resolve_shardings
from jint8.checkpoint.tree import _rebuild
from jint8.errors import CheckpointError, CheckpointFormatError, CheckpointNotFoundError


def _check_directory(directory: PathLike) -> pathlib.Path:
    path = pathlib.Path(directory).absolute()
    if not path.is_dir():
        previous = sorted(path.parent.glob(f".{path.name}{_PREVIOUS_MARK}*")) if path.parent.is_dir() else []
        hint = f" (an interrupted overwrite left the old checkpoint at {previous[-1]})" if previous else ""
        raise CheckpointNotFoundError(f"{path}: no checkpoint directory here{hint}")
    if not ocp.step.is_checkpoint_finalized(path):
        raise CheckpointNotFoundError(f"{path}: checkpoint was never finalized (an interrupted save)")
    for item in (_METADATA_ITEM, _ARRAYS_ITEM):
        if not (path / item).is_dir():
            raise CheckpointNotFoundError(f"{path}: checkpoint has no {item!r} item")
    return path


def _read_raw_metadata(path: pathlib.Path):
    with _checkpointer() as checkpointer:
        try:
            restored = checkpointer.restore(path, args=ocp.args.Composite(**{_METADATA_ITEM: ocp.args.JsonRestore()}))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointFormatError(f"{path}: metadata item is not valid JSON: {e}") from None
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"{path}: metadata item is incomplete: {e}") from None
    return restored[_METADATA_ITEM]


def load_metadata(directory: PathLike) -> CheckpointMetadata:
    """A checkpoint's metadata alone (configs, versions), without reading any array."""
    path = _check_directory(directory)
    return _parse_metadata(_read_raw_metadata(path), str(path))[0]


def stored_parameter_shapes(directory: PathLike) -> dict[tuple, tuple]:
    """{leaf path: the float parameter's shape} of every stored leaf, from the metadata alone
    (an int8 kernel's [*in, *out], an embedding's [V, H])."""
    path = _check_directory(directory)
    _, leaves = _parse_metadata(_read_raw_metadata(path), str(path))
    return {leaf.path: tuple(leaf.kernel_shape) for leaf in leaves if leaf.kind != "empty"}


def bytes_per_device(directory: PathLike, *, mesh: Optional[jax.sharding.Mesh] = None,
                     shardings: ShardingsArg = None) -> int:
    """Bytes of parameters each device holds once load_quantized(directory, mesh=, shardings=)
    has placed them, from the metadata alone (from_pretrained's max_memory check)."""
    path = _check_directory(directory)
    _, leaves = _parse_metadata(_read_raw_metadata(path), str(path))
    target = _abstract_arrays(leaves, _resolve_shardings(leaves, mesh, shardings, str(path)))
    return int(sum(math.prod(a.sharding.shard_shape(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in jax.tree.leaves(target)))


def is_jint8_checkpoint(directory: PathLike) -> bool:
    """True if directory holds a finalized jint8 quantized checkpoint (of any format version)."""
    try:
        path = _check_directory(directory)
        raw = _read_raw_metadata(path)
    except CheckpointError:
        return False
    return isinstance(raw, Mapping) and raw.get("format") == FORMAT_NAME


def _damaged(path: pathlib.Path, error: Exception) -> CheckpointFormatError:
    """One error naming the checkpoint instead of TensorStore's multi-page spec dumps."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else ""
    # TensorStore messages end with the spec JSON; keep the part that says what failed
    first = first.split(" [source locations=")[0].split("; spec=")[0][:400]
    return CheckpointFormatError(
        f"{path}: the arrays item is damaged or incomplete (a file missing or truncated?): "
        f"{type(error).__name__}: {first}")


def _check_stored_arrays(path: pathlib.Path, checkpointer, leaves: list[_Leaf]) -> None:
    """The arrays item must hold exactly the arrays the metadata records, with their shapes."""
    try:
        tree = checkpointer.metadata(path).item_metadata[_ARRAYS_ITEM]
    except Exception as e:  # Orbax/TensorStore raise ValueError, FileNotFoundError, KeyError ...
        raise _damaged(path, e) from None
    tree = getattr(tree, "tree", tree) or {}
    stored: dict = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, prefix + (str(key),))
        elif hasattr(node, "shape"):
            stored[prefix] = tuple(node.shape)
        else:  # an empty sub-tree
            stored[prefix] = None

    walk(tree, ())
    expected = {}
    for leaf in leaves:
        if leaf.kind == "array":
            expected[leaf.storage_path] = leaf.shape
        elif leaf.kind == "int4_weight":
            from jint8.checkpoint.int4 import array_shapes

            expected.update({leaf.storage_path + (field,): shape for field, (shape, _) in array_shapes(leaf.int4).items()})
        elif leaf.kind == "int8_weight":
            expected[leaf.storage_path + ("qvalue",)] = leaf.shape
            expected[leaf.storage_path + ("scale",)] = leaf.scale_shape
    missing = sorted("/".join(p) for p in set(expected) - set(stored))
    unrecorded = sorted("/".join(p) for p in set(stored) - set(expected) if stored[p] is not None)
    wrong = sorted(f"{'/'.join(p)}: {stored[p]} != {s}" for p, s in expected.items() if p in stored and stored[p] != s)
    problems = ([f"{len(missing)} arrays missing {missing[:5]}"] if missing else []) + (
        [f"{len(wrong)} shapes differ (stored != recorded) {wrong[:5]}"] if wrong else []) + (
        [f"{len(unrecorded)} stored arrays have no leaf record {unrecorded[:5]}"] if unrecorded else []
    )
    if problems:
        raise CheckpointFormatError(f"{path}: arrays item disagrees with the metadata: {'; '.join(problems)}")


def load_quantized(directory: PathLike, *, mesh: Optional[jax.sharding.Mesh] = None, shardings: ShardingsArg = None,
                   verify_checksums: bool = True):
    """Restore (params, CheckpointMetadata) written by save_quantized, bit-identical, onto a sharding.

    shardings: where each array goes, one of
      - one Sharding or PartitionSpec (with mesh=) for every parameter;
      - a tree matching the saved params whose leaves are Shardings, PartitionSpecs (with mesh=),
        abstract or concrete arrays with .sharding (their shapes are checked), or None (default);
        at an Int8Weight, one entry is read as the float parameter's sharding (a kernel's
        [*in, *out], Flax layout; an embedding's [V, H]) and placed on qvalue's K-major axes and
        the scale's output axes alike, or
        Int8Weight(qvalue=..., scale=...) gives both stored arrays' shardings as they are;
      - a callable (path: tuple, kernel: jax.ShapeDtypeStruct) -> one such entry (for an int8
        leaf, kernel has the float parameter's shape: [*in, *out], or [V, H] for an embedding).
    mesh alone replicates everything on mesh; neither puts everything on jax.devices()[0].
    verify_checksums: compare every array with the CRC-32C recorded at save (CheckpointIntegrityError
      names the arrays that differ); False skips it for trusted storage (it costs one pass over the
      arrays where they are: on accelerators, with one uint32 per shard coming back; for CPU
      devices, on the host buffers).
    Arrays are read straight into their shards: no float weights, no re-quantization. A load that
    races with an overwrite of the same path (which swaps directories) is retried once.
    """
    path = pathlib.Path(directory).absolute()
    identity = _identity(path)
    try:
        return _load(path, mesh, shardings, verify_checksums)
    except CheckpointError:
        if identity is None or _identity(path) == identity:
            raise
    return _load(path, mesh, shardings, verify_checksums)  # replaced while being read: read the new one


def _identity(path: pathlib.Path):
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def _load(path: pathlib.Path, mesh, shardings, verify: bool):
    path = _check_directory(path)
    info, leaves = _parse_metadata(_read_raw_metadata(path), str(path))
    target = _abstract_arrays(leaves, _resolve_shardings(leaves, mesh, shardings, str(path)))
    compiles = compile_ahead(target) if verify else None  # the checksums' programs, while the arrays are read
    try:
        with _checkpointer() as checkpointer:
            _check_stored_arrays(path, checkpointer, leaves)
            try:
                restored = checkpointer.restore(
                    path, args=ocp.args.Composite(**{_ARRAYS_ITEM: ocp.args.StandardRestore(target)})
                )[_ARRAYS_ITEM]
            except CheckpointError:
                raise
            except Exception as e:  # a missing or truncated array file surfaces as a TensorStore error
                raise _damaged(path, e) from None
    except BaseException:
        if compiles is not None:
            compiles.shutdown(wait=True, cancel_futures=True)
        raise
    if compiles is not None:
        compiles.shutdown(wait=True)
    if verify:
        try:
            verify_checksums(path, leaves, restored)
        except CheckpointError:
            jax.tree.map(lambda a: a.delete() if isinstance(a, jax.Array) else None, restored)
            raise
    return _rebuild(info.tree_kind, leaves, restored), info
