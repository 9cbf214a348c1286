"""Quantized checkpoints with Orbax: save an Int8Weight tree once, restore it onto any mesh.

One Orbax composite checkpoint directory holds two items:
  arrays/    a PyTree item (StandardCheckpointHandler) with every array leaf; an Int8Weight
             kernel is stored as its own two arrays, <path>/qvalue (int8, K-major
             [*out, *in] as Int8Weight holds it) and <path>/scale (float32), so the bytes on
             disk are the int8 bytes plus the scales.
  metadata/  a JSON item: format name and version, jint8 version, the Int8Config, the model
             config, the tree's kind (Linen dict, FrozenDict, nnx.State) and one record per leaf
             (path, shape, dtype, nnx Variable type, and an Int8Weight's static in_ndim,
             threshold and outlier_capacity, which are not arrays and so live here).
Restore reads each array straight into its target sharding (TensorStore reads only each
device's shard): no full-precision weight is materialised and nothing is re-quantized.

Saving is atomic at two levels: Orbax writes into a temporary directory and renames it when
finalized, and that happens inside a hidden sibling staging directory which is then renamed
onto the destination (or, with overwrite=True, swapped with the old checkpoint by
renameat2(RENAME_EXCHANGE)), so a crash at any point leaves the previous checkpoint loadable.
Single-process saving only (jax.process_count() == 1); restoring works in any process layout.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import logging
import math
import os
import pathlib
import shutil
import sys
import uuid
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jint8.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointVersionError,
    InvalidConfigError,
)
from jint8.quantize import EMBEDDING_NAME, Int8Config, Int8Weight, int8_weight_specs, validate_int8_weight

logger = logging.getLogger(__name__)

FORMAT_NAME = "jint8-quantized"
# Bump when the layout changes; readers refuse versions above theirs. 2: qvalue K-major [*out, *in]
# (version 1 stored the kernel's [*in, *out]; such checkpoints must be re-quantized).
FORMAT_VERSION = 2
_ARRAYS_ITEM, _METADATA_ITEM = "arrays", "metadata"
_STAGING_MARK, _PREVIOUS_MARK = ".jint8-staging-", ".jint8-previous-"

PathLike = Union[str, os.PathLike]
ShardingsArg = Union[None, Any, Callable[[tuple, jax.ShapeDtypeStruct], Any]]


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """What load_quantized returns beside the params (read alone with load_metadata)."""

    directory: str
    format_version: int
    jint8_version: str
    quant_config: Int8Config
    model_config: Optional[dict]
    model_config_class: Optional[str]
    tree_kind: str  # "dict" (Linen), "frozen_dict" or "nnx_state"


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One leaf of the saved tree as recorded in the metadata JSON (kind: array, int8_weight, empty)."""

    path: tuple
    kind: str
    shape: tuple = ()
    dtype: str = ""
    variable: Optional[str] = None  # nnx Variable collection name ("params", "batch_stats"), if any
    in_ndim: int = 1
    threshold: float = 0.0
    outlier_capacity: int = 0

    def to_json(self) -> dict:
        record = {"path": list(self.path), "kind": self.kind}
        if self.kind != "empty":
            record.update(shape=list(self.shape), dtype=self.dtype, variable=self.variable)
        if self.kind == "int8_weight":
            record.update(in_ndim=self.in_ndim, threshold=self.threshold, outlier_capacity=self.outlier_capacity)
        return record

    @property
    def storage_path(self) -> tuple[str, ...]:
        return tuple(str(k) for k in self.path)

    @property
    def name(self) -> str:
        return "/".join(self.storage_path)

    @property
    def scale_shape(self) -> tuple:
        """An int8 kernel's scale: qvalue's leading (output) axes; shape is qvalue's [*out, *in]."""
        return tuple(self.shape[: len(self.shape) - self.in_ndim])

    @property
    def is_int8_embedding(self) -> bool:
        return self.kind == "int8_weight" and str(self.path[-1]) == EMBEDDING_NAME

    @property
    def kernel_shape(self) -> tuple:
        """The float parameter an int8 leaf stands for: a kernel [*in, *out], or an embedding
        table [V, H] (stored as it is); an array's own shape."""
        if self.kind != "int8_weight" or self.is_int8_embedding:
            return tuple(self.shape)
        return tuple(self.shape[len(self.scale_shape) :]) + self.scale_shape

    @property
    def nbytes(self) -> int:
        if self.kind == "empty":
            return 0
        size = math.prod(self.shape) * jnp.dtype(self.dtype).itemsize
        return size + (4 * math.prod(self.scale_shape) if self.kind == "int8_weight" else 0)


# ----------------------------------------------------------------------------- tree <-> storage


def _tree_kind(params) -> str:
    from flax import nnx
    from flax.core import FrozenDict

    if isinstance(params, nnx.State):
        return "nnx_state"
    if isinstance(params, FrozenDict):
        return "frozen_dict"
    if isinstance(params, Mapping):
        return "dict"
    raise CheckpointError(
        f"params must be a Linen param dict, a FrozenDict or an nnx.State, got {type(params).__name__}"
    )


def _variable_name(variable) -> Optional[str]:
    from flax.nnx import variablelib

    try:
        return variablelib.variable_name_from_type(type(variable))
    except ValueError:
        logger.warning("nnx Variable type %s has no registered name; restored as a plain value", type(variable))
        return None


_EMPTY = object()  # stands for an empty sub-mapping, which Orbax stores and the tree must get back


def _walk(node, path: tuple, out: list) -> None:
    """Append (path, value, nnx variable name or None) for every leaf of a nested mapping."""
    from flax import nnx

    if isinstance(node, Mapping):
        if not node and path:
            out.append((path, _EMPTY, None))
        for key, child in node.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{'/'.join(map(str, path))}: key {key!r} must be a str or an int")
            _walk(child, path + (key,), out)
    elif isinstance(node, nnx.Variable):
        out.append((path, node.get_value(), _variable_name(node)))
    else:
        out.append((path, node, None))


def _to_storage(params) -> tuple[str, list[_Leaf], dict]:
    """Split params into leaf records (for the JSON) and a nested str-keyed dict of arrays (for Orbax)."""
    kind = _tree_kind(params)
    walked: list = []
    _walk(params, (), walked)
    if not walked:
        raise CheckpointError("params is empty: there is nothing to save")
    leaves, arrays = [], {}
    for path, value, variable in walked:
        name = "/".join(map(str, path))
        if value is _EMPTY:
            leaves.append(_Leaf(path, "empty"))
            _insert(arrays, tuple(map(str, path)), {}, name)
            continue
        if isinstance(value, Int8Weight):
            validate_int8_weight(value, name)
            leaf = _Leaf(path, "int8_weight", tuple(value.qvalue.shape), "int8", variable, int(value.in_ndim),
                         float(value.threshold), int(value.outlier_capacity))  # fmt: skip
            stored = {"qvalue": value.qvalue, "scale": value.scale}
        elif isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            stored = value if isinstance(value, (jax.Array, np.ndarray)) else jnp.asarray(value)
            if jnp.issubdtype(stored.dtype, jax.dtypes.extended):
                raise CheckpointError(f"{name}: arrays of dtype {stored.dtype} (e.g. PRNG keys) cannot be saved")
            leaf = _Leaf(path, "array", tuple(stored.shape), str(jnp.dtype(stored.dtype)), variable)
        else:
            raise CheckpointError(f"{name}: leaf of type {type(value).__name__} is not an array or Int8Weight")
        leaves.append(leaf)
        _insert(arrays, leaf.storage_path, stored, name)
    return kind, leaves, arrays


def _insert(tree: dict, path: tuple[str, ...], value, name: str) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if not path or path[-1] in tree:
        # Orbax stores keys as strings: {0: ..} and {"0": ..} side by side would collide.
        raise CheckpointError(f"{name}: two keys of the tree are stored under the same name")
    tree[path[-1]] = value


def _lookup(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _rebuild(kind: str, leaves: list[_Leaf], arrays: Mapping):
    """The params tree from restored arrays: Int8Weight nodes, nnx Variables and containers put back."""
    from flax import nnx
    from flax.core import freeze
    from flax.nnx import variablelib

    nested: dict = {}
    for leaf in leaves:
        node = nested
        for key in leaf.path[:-1]:
            node = node.setdefault(key, {})
        if leaf.kind == "empty":
            node[leaf.path[-1]] = {}
            continue
        value = _lookup(arrays, leaf.storage_path)
        if leaf.kind == "int8_weight":
            value = Int8Weight(value["qvalue"], value["scale"], leaf.in_ndim, leaf.threshold, leaf.outlier_capacity)
        if kind == "nnx_state" and leaf.variable is not None:
            try:
                value = variablelib.variable_type_from_name(leaf.variable)(value)
            except ValueError:
                logger.warning("%s: nnx Variable type %r is unregistered; kept as a plain value", leaf.name, leaf.variable)
        node[leaf.path[-1]] = value
    if kind == "nnx_state":
        return nnx.State(nested)
    return freeze(nested) if kind == "frozen_dict" else nested


# ----------------------------------------------------------------------------- metadata JSON


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    try:
        return jnp.dtype(value).name  # dtype fields of model configs (jnp.bfloat16, np.float32, ...)
    except TypeError:
        raise TypeError(f"{type(value).__name__} value {value!r} is not JSON-serializable") from None


def _config_dict(config, field: str) -> tuple[Optional[dict], Optional[str]]:
    """(JSON-safe dict, fully qualified class name) of a dataclass, mapping, .to_dict() object or None."""
    if config is None:
        return None, None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        as_dict, cls = dataclasses.asdict(config), type(config)
    elif isinstance(config, Mapping):
        as_dict, cls = dict(config), None
    elif callable(getattr(config, "to_dict", None)):
        as_dict, cls = config.to_dict(), type(config)
    else:
        raise InvalidConfigError(f"{field} must be a dataclass, a mapping or None, got {type(config).__name__}")
    try:
        as_dict = json.loads(json.dumps(as_dict, default=_json_default, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidConfigError(f"{field} cannot be stored as JSON: {e}") from None
    return as_dict, None if cls is None else f"{cls.__module__}.{cls.__qualname__}"


def _metadata_json(kind, leaves, quant_config, model_config) -> dict:
    from jint8 import __version__

    quant_dict, _ = _config_dict(quant_config, "quant_config")
    model_dict, model_class = _config_dict(model_config, "model_config")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "jint8_version": __version__,
        "orbax_version": getattr(ocp, "__version__", "unknown"),
        "tree_kind": kind,
        "quant_config": quant_dict,
        "model_config": model_dict,
        "model_config_class": model_class,
        "leaves": [leaf.to_json() for leaf in leaves],
    }


def _tuples(value):
    """JSON turned the config's tuples into lists; frozen configs want them back (hashable)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _parse_leaf(record: Mapping, index: int, directory: str) -> _Leaf:
    try:
        kind = record["kind"]
        path = tuple(record["path"])
        if kind not in ("array", "int8_weight", "empty") or not all(isinstance(k, (str, int)) for k in path):
            raise ValueError(f"kind={kind!r}, path={path!r}")
        if kind == "empty":
            return _Leaf(path, kind)
        common = dict(shape=tuple(int(d) for d in record["shape"]), dtype=str(jnp.dtype(record["dtype"])),
                      variable=record.get("variable"))  # fmt: skip
        if kind == "array":
            return _Leaf(path, kind, **common)
        return _Leaf(path, kind, in_ndim=int(record["in_ndim"]), threshold=float(record["threshold"]),
                     outlier_capacity=int(record["outlier_capacity"]), **common)  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{directory}: metadata leaf record #{index} is invalid ({e!r}): {record}") from None


def _parse_metadata(raw, directory: str) -> tuple[CheckpointMetadata, list[_Leaf]]:
    from jint8 import __version__

    if not isinstance(raw, Mapping) or raw.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{directory}: metadata does not describe a {FORMAT_NAME!r} checkpoint")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointFormatError(f"{directory}: metadata has an invalid format_version={version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointVersionError(
            f"{directory}: written with format_version={version} by jint8 {raw.get('jint8_version')}; "
            f"jint8 {__version__} reads format versions <= {FORMAT_VERSION}: upgrade jint8"
        )
    if version < 2:
        raise CheckpointVersionError(
            f"{directory}: format_version={version} (jint8 {raw.get('jint8_version')}) stored int8 kernels "
            f"[in, out]; jint8 {__version__} keeps them K-major: quantize the original checkpoint again "
            "(jint8 quantize SRC OUT)"
        )
    missing = [k for k in ("tree_kind", "quant_config", "leaves") if k not in raw]
    if missing or raw["tree_kind"] not in ("dict", "frozen_dict", "nnx_state") or not isinstance(raw["leaves"], list):
        raise CheckpointFormatError(f"{directory}: metadata is incomplete (missing {missing}) or of unknown tree_kind")
    known = {f.name for f in dataclasses.fields(Int8Config)}
    quant = raw["quant_config"] or {}
    if not isinstance(quant, Mapping):
        raise CheckpointFormatError(f"{directory}: stored quant_config {quant!r} is not a mapping")
    if unknown := sorted(set(quant) - known):
        logger.warning("%s: ignoring unknown Int8Config fields %s", directory, unknown)
    try:
        quant_config = Int8Config(**{k: _tuples(v) for k, v in quant.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{directory}: stored quant_config is invalid: {e}") from None
    leaves = [_parse_leaf(record, i, directory) for i, record in enumerate(raw["leaves"])]
    info = CheckpointMetadata(directory, version, str(raw.get("jint8_version")), quant_config,
                              raw.get("model_config"), raw.get("model_config_class"), raw["tree_kind"])  # fmt: skip
    return info, leaves


# ----------------------------------------------------------------------------- target shardings


def _trimmed(spec) -> jax.sharding.PartitionSpec:
    spec = list(spec)
    while spec and spec[-1] is None:  # P("model", None) -> P("model"): the same layout, one spelling
        spec.pop()
    return jax.sharding.PartitionSpec(*spec)


def _int8_shardings_from_kernel(sharding, leaf: _Leaf, directory: str):
    """(qvalue, scale) shardings from one sharding given for the float kernel [*in, *out]: the
    same mesh axes on the same logical axes, in qvalue's K-major order, as quantize_params does."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        if len(tuple(sharding.spec)) > len(leaf.shape):
            raise CheckpointMismatchError(
                f"{directory}: {leaf.name}/qvalue: spec={tuple(sharding.spec)} has more axes than the "
                f"saved kernel shape {leaf.kernel_shape}"
            )
        q_spec, s_spec = int8_weight_specs(sharding.spec, len(leaf.shape), leaf.in_ndim,
                                           embedding=leaf.is_int8_embedding)
        return (jax.sharding.NamedSharding(sharding.mesh, _trimmed(q_spec)),
                jax.sharding.NamedSharding(sharding.mesh, _trimmed(s_spec)))  # fmt: skip
    if sharding.is_fully_replicated:
        return sharding, sharding
    raise CheckpointMismatchError(
        f"{directory}: {leaf.name}: cannot derive the int8 arrays' shardings from {sharding}; "
        "pass Int8Weight(qvalue=<sharding>, scale=<sharding>) at this path"
    )


def _check_fits(sharding, shape: tuple, name: str, directory: str) -> None:
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        if len(spec) > len(shape):
            raise CheckpointMismatchError(f"{directory}: {name}: {spec=} has more axes than the saved {shape=}")
        for dim, axes in zip(shape, spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if dim % parts:
                raise CheckpointMismatchError(
                    f"{directory}: {name}: saved {shape=} cannot be split by {spec=} "
                    f"on mesh {dict(sharding.mesh.shape)}"
                )
    elif hasattr(sharding, "check_compatible_aval"):
        try:
            sharding.check_compatible_aval(shape)
        except ValueError as e:
            raise CheckpointMismatchError(f"{directory}: {name}: saved {shape=} does not fit {sharding}: {e}") from None


def _as_sharding(spec, mesh, default, leaf: _Leaf, directory: str):
    """A target-tree entry (Sharding, PartitionSpec, abstract/concrete array or None) as a Sharding."""
    if spec is None:
        return default
    if isinstance(spec, jax.sharding.PartitionSpec):
        if mesh is None:
            raise CheckpointMismatchError(f"{directory}: {leaf.name}: a PartitionSpec target needs mesh=")
        return jax.sharding.NamedSharding(mesh, spec)
    if isinstance(spec, jax.sharding.Sharding):
        return spec
    if hasattr(spec, "shape") and isinstance(getattr(spec, "sharding", None), jax.sharding.Sharding):
        if tuple(spec.shape) != leaf.shape:
            raise CheckpointMismatchError(
                f"{directory}: {leaf.name}: saved shape {leaf.shape} != target shape {tuple(spec.shape)}"
            )
        return spec.sharding
    raise CheckpointMismatchError(f"{directory}: {leaf.name}: target {type(spec).__name__} is not a sharding")


def _leaf_shardings(leaf: _Leaf, spec, mesh, default, directory: str) -> dict:
    """{storage key: Sharding} for one leaf: "" for a plain array, qvalue/scale for an Int8Weight."""
    if leaf.kind == "array":
        sharding = _as_sharding(spec, mesh, default, leaf, directory)
        _check_fits(sharding, leaf.shape, leaf.name, directory)
        return {"": sharding}
    if isinstance(spec, Int8Weight):  # explicit shardings for both stored arrays
        qvalue = _as_sharding(spec.qvalue, mesh, default, leaf, directory)
        scale_leaf = dataclasses.replace(leaf, shape=leaf.scale_shape)
        scale = _as_sharding(spec.scale, mesh, default, scale_leaf, directory)
    else:  # one entry for the float kernel it stands for
        kernel_leaf = dataclasses.replace(leaf, kind="array", shape=leaf.kernel_shape)
        kernel = _as_sharding(spec, mesh, default, kernel_leaf, directory)
        qvalue, scale = _int8_shardings_from_kernel(kernel, leaf, directory)
    _check_fits(qvalue, leaf.shape, leaf.name + "/qvalue", directory)
    _check_fits(scale, leaf.scale_shape, leaf.name + "/scale", directory)
    return {"qvalue": qvalue, "scale": scale}


def _flat_targets(shardings) -> dict[tuple[str, ...], Any]:
    """{str path: entry} of a user's shardings tree; Int8Weight and nnx Variables count as one entry."""
    from flax import nnx

    flat: dict = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, path + (str(key),))
        elif isinstance(node, nnx.Variable):
            flat[path] = node.get_value()
        else:
            flat[path] = node

    walk(shardings, ())
    return flat


def _resolve_shardings(leaves: list[_Leaf], mesh, shardings, directory: str) -> list[dict]:
    default = (
        jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        if mesh is not None
        else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    )
    stored = [leaf for leaf in leaves if leaf.kind != "empty"]
    if shardings is None or isinstance(shardings, (jax.sharding.Sharding, jax.sharding.PartitionSpec)):
        specs = [shardings] * len(stored)
    elif callable(shardings) and not isinstance(shardings, Mapping):
        specs = [shardings(leaf.path, jax.ShapeDtypeStruct(leaf.kernel_shape, jnp.dtype(leaf.dtype))) for leaf in stored]
    else:
        targets = _flat_targets(shardings)
        saved = {leaf.storage_path for leaf in stored}
        missing = sorted("/".join(p) for p in saved - set(targets))
        extra = sorted("/".join(p) for p in set(targets) - saved)
        if missing or extra:
            raise CheckpointMismatchError(
                f"{directory}: shardings tree does not match the checkpoint's tree: "
                f"{len(missing)} saved leaves missing from shardings {missing[:5]}, "
                f"{len(extra)} shardings leaves not in the checkpoint {extra[:5]}"
            )
        specs = [targets[leaf.storage_path] for leaf in stored]
    return [_leaf_shardings(leaf, spec, mesh, default, directory) for leaf, spec in zip(stored, specs)]


def _abstract_arrays(leaves: list[_Leaf], shardings: list[dict]) -> dict:
    """The Orbax restore target: ShapeDtypeStructs carrying each array's target sharding."""
    target: dict = {}
    placed = iter(shardings)
    for leaf in leaves:
        if leaf.kind == "empty":
            value = {}  # Orbax records empty subtrees and wants them in the target too
        elif leaf.kind == "array":
            value = jax.ShapeDtypeStruct(leaf.shape, jnp.dtype(leaf.dtype), sharding=next(placed)[""])
        else:
            sharding = next(placed)
            value = {
                "qvalue": jax.ShapeDtypeStruct(leaf.shape, jnp.int8, sharding=sharding["qvalue"]),
                "scale": jax.ShapeDtypeStruct(leaf.scale_shape, jnp.float32, sharding=sharding["scale"]),
            }
        _insert(target, leaf.storage_path, value, leaf.name)
    return target


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


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous Orbax checkpointer that knows both items' handlers (needed to read their metadata)."""
    registry = ocp.DefaultCheckpointHandlerRegistry()
    arrays_handler, json_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
    registry.add(_ARRAYS_ITEM, ocp.args.StandardSave, arrays_handler)
    registry.add(_ARRAYS_ITEM, ocp.args.StandardRestore, arrays_handler)
    registry.add(_METADATA_ITEM, ocp.args.JsonSave, json_handler)
    registry.add(_METADATA_ITEM, ocp.args.JsonRestore, json_handler)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))


# ----------------------------------------------------------------------------- public API


def save_quantized(
    directory: PathLike,
    params,
    *,
    quant_config: Int8Config,
    model_config=None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a quantized params tree (Linen dict, FrozenDict or nnx.State) as an Orbax checkpoint.

    quant_config: the Int8Config params were quantized with (stored, returned by load_quantized).
    model_config: a dataclass (stored as dataclasses.asdict plus its class name), a dict, or None.
    overwrite: replace an existing jint8 checkpoint at directory, atomically; without it an
      existing path raises CheckpointExistsError. Returns the absolute checkpoint path.
    """
    if not isinstance(quant_config, Int8Config):
        raise InvalidConfigError(f"quant_config must be an Int8Config, got {type(quant_config).__name__}")
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


def is_jint8_checkpoint(directory: PathLike) -> bool:
    """True if directory holds a finalized jint8 quantized checkpoint (of any format version)."""
    try:
        path = _check_directory(directory)
        raw = _read_raw_metadata(path)
    except CheckpointError:
        return False
    return isinstance(raw, Mapping) and raw.get("format") == FORMAT_NAME


def _check_stored_arrays(path: pathlib.Path, checkpointer, leaves: list[_Leaf]) -> None:
    """The arrays item must hold exactly the arrays the metadata records, with their shapes."""
    tree = checkpointer.metadata(path).item_metadata[_ARRAYS_ITEM]
    tree = getattr(tree, "tree", tree) or {}
    stored: dict = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, prefix + (str(key),))
        else:
            stored[prefix] = tuple(node.shape)

    walk(tree, ())
    expected = {}
    for leaf in leaves:
        if leaf.kind == "array":
            expected[leaf.storage_path] = leaf.shape
        elif leaf.kind == "int8_weight":
            expected[leaf.storage_path + ("qvalue",)] = leaf.shape
            expected[leaf.storage_path + ("scale",)] = leaf.scale_shape
    missing = sorted("/".join(p) for p in set(expected) - set(stored))
    wrong = sorted(f"{'/'.join(p)}: {stored[p]} != {s}" for p, s in expected.items() if p in stored and stored[p] != s)
    problems = ([f"{len(missing)} arrays missing {missing[:5]}"] if missing else []) + (
        [f"{len(wrong)} shapes differ (stored != recorded) {wrong[:5]}"] if wrong else []
    )
    if problems:
        raise CheckpointFormatError(f"{path}: arrays item disagrees with the metadata: {'; '.join(problems)}")


def load_quantized(directory: PathLike, *, mesh: Optional[jax.sharding.Mesh] = None, shardings: ShardingsArg = None):
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
    Arrays are read straight into their shards: no float weights, no re-quantization.
    """
    path = _check_directory(directory)
    info, leaves = _parse_metadata(_read_raw_metadata(path), str(path))
    target = _abstract_arrays(leaves, _resolve_shardings(leaves, mesh, shardings, str(path)))
    with _checkpointer() as checkpointer:
        _check_stored_arrays(path, checkpointer, leaves)
        restored = checkpointer.restore(
            path, args=ocp.args.Composite(**{_ARRAYS_ITEM: ocp.args.StandardRestore(target)})
        )[_ARRAYS_ITEM]
    return _rebuild(info.tree_kind, leaves, restored), info


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

    progress: from_pretrained's progress bar over tensors. Returns the checkpoint path.
    """
    import jint8

    if not hasattr(jint8, "from_pretrained"):
        raise CheckpointError("quantize_checkpoint needs jint8.from_pretrained, which this build lacks")
    quant_config = quant_config or Int8Config()
    _check_destination(pathlib.Path(out).absolute(), overwrite)  # before the expensive load
    model, params = jint8.from_pretrained(src, quantization=quant_config, progress=progress)
    return save_quantized(out, params, quant_config=quant_config, model_config=model.config, overwrite=overwrite)
