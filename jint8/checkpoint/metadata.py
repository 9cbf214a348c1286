"""The checkpoint format: its name and version, the two Orbax items, one record per leaf, and
the metadata JSON (written by save, parsed and validated by restore)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jint8._version import __version__
from jint8.errors import CheckpointFormatError, CheckpointVersionError, InvalidConfigError
from jint8.quant4 import Int4Config
from jint8.quantize import EMBEDDING_NAME, Int8Config

logger = logging.getLogger(__name__)

FORMAT_NAME = "jint8-quantized"
# Bump when the layout changes; readers refuse versions above theirs. 2: qvalue K-major [*out, *in]
# (version 1 stored the kernel's [*in, *out]; such checkpoints must be re-quantized).
FORMAT_VERSION = 2
_ARRAYS_ITEM, _METADATA_ITEM = "arrays", "metadata"
_STAGING_MARK, _PREVIOUS_MARK = ".jint8-staging-", ".jint8-previous-"

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class CheckpointMetadata:
    """What load_quantized returns beside the params (read alone with load_metadata)."""

    directory: str
    format_version: int
    jint8_version: str
    quant_config: Union[Int8Config, Int4Config]
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
    # ((stored array, CRC-32C of its bytes), ...): ("", crc) for an array, ("qvalue", ..),
    # ("scale", ..) for an int8 weight; empty for checkpoints written before checksums
    checksums: tuple = ()
    int4: Optional[dict] = None  # an int4_weight's static fields (jint8.checkpoint.int4)

    def to_json(self) -> dict:
        record = {"path": list(self.path), "kind": self.kind}
        if self.kind != "empty":
            record.update(shape=list(self.shape), dtype=self.dtype, variable=self.variable)
        if self.kind == "int8_weight":
            record.update(in_ndim=self.in_ndim, threshold=self.threshold, outlier_capacity=self.outlier_capacity)
        if self.checksums:
            record["crc32c"] = {part: crc for part, crc in self.checksums}
        if self.kind == "int4_weight":
            record["int4"] = self.int4
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
        if self.kind == "int4_weight":
            from jint8.checkpoint.int4 import array_shapes

            return sum(math.prod(s) * jnp.dtype(d).itemsize for s, d in array_shapes(self.int4).values())
        size = math.prod(self.shape) * jnp.dtype(self.dtype).itemsize
        return size + (4 * math.prod(self.scale_shape) if self.kind == "int8_weight" else 0)


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
    quant_dict, _ = _config_dict(quant_config, "quant_config")
    model_dict, model_class = _config_dict(model_config, "model_config")
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "jint8_version": __version__,
        "orbax_version": getattr(ocp, "__version__", "unknown"),
        "tree_kind": kind,
        "quant_config": quant_dict,
        "quant_config_type": "int4" if isinstance(quant_config, Int4Config) else "int8",
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
        if kind not in ("array", "int8_weight", "int4_weight", "empty") or not all(isinstance(k, (str, int)) for k in path):
            raise ValueError(f"kind={kind!r}, path={path!r}")
        if kind == "empty":
            return _Leaf(path, kind)
        sums = record.get("crc32c", {})
        if not isinstance(sums, Mapping) or not all(isinstance(v, int) and not isinstance(v, bool) for v in sums.values()):
            raise ValueError(f"crc32c={sums!r}")
        parts = ("",) if kind == "array" else ("qvalue", "scale")
        if sums and sorted(sums) != sorted(parts):
            raise ValueError(f"crc32c has entries {sorted(sums)}, expected {list(parts)}")
        common = dict(shape=tuple(int(d) for d in record["shape"]), dtype=str(jnp.dtype(record["dtype"])),
                      variable=record.get("variable"), checksums=tuple((p, int(sums[p])) for p in parts if p in sums))  # fmt: skip
        if kind == "array":
            return _Leaf(path, kind, **common)
        if kind == "int4_weight":
            from jint8.checkpoint.int4 import array_shapes

            int4 = dict(record["int4"])
            array_shapes(int4)  # every field it needs is there
            return _Leaf(path, kind, int4=int4, **common)
        return _Leaf(path, kind, in_ndim=int(record["in_ndim"]), threshold=float(record["threshold"]),
                     outlier_capacity=int(record["outlier_capacity"]), **common)  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{directory}: metadata leaf record #{index} is invalid ({e!r}): {record}") from None


def _parse_metadata(raw, directory: str) -> tuple[CheckpointMetadata, list[_Leaf]]:
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
    config_class = Int4Config if raw.get("quant_config_type") == "int4" else Int8Config
    known = {f.name for f in dataclasses.fields(config_class)}
    quant = raw["quant_config"] or {}
    if not isinstance(quant, Mapping):
        raise CheckpointFormatError(f"{directory}: stored quant_config {quant!r} is not a mapping")
    if unknown := sorted(set(quant) - known):
        logger.warning("%s: ignoring unknown %s fields %s", directory, config_class.__name__, unknown)
    try:
        quant_config = config_class(**{k: _tuples(v) for k, v in quant.items() if k in known})
    except (TypeError, ValueError) as e:
        raise CheckpointFormatError(f"{directory}: stored quant_config is invalid: {e}") from None
    leaves = [_parse_leaf(record, i, directory) for i, record in enumerate(raw["leaves"])]
    info = CheckpointMetadata(directory, version, str(raw.get("jint8_version")), quant_config,
                              raw.get("model_config"), raw.get("model_config_class"), raw["tree_kind"])  # fmt: skip
    return info, leaves


# ----------------------------------------------------------------------------- Orbax items


def _checkpointer() -> ocp.Checkpointer:
    """A synchronous Orbax checkpointer that knows both items' handlers (needed to read their metadata)."""
    registry = ocp.DefaultCheckpointHandlerRegistry()
    arrays_handler, json_handler = ocp.StandardCheckpointHandler(), ocp.JsonCheckpointHandler()
    registry.add(_ARRAYS_ITEM, ocp.args.StandardSave, arrays_handler)
    registry.add(_ARRAYS_ITEM, ocp.args.StandardRestore, arrays_handler)
    registry.add(_METADATA_ITEM, ocp.args.JsonSave, json_handler)
    registry.add(_METADATA_ITEM, ocp.args.JsonRestore, json_handler)
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler(handler_registry=registry))
