"""A params tree (Linen dict, FrozenDict, nnx.State) to leaf records and a str-keyed dict of
arrays for Orbax, and back."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jint8.checkpoint.integrity import array_checksums
from jint8.checkpoint.metadata import _Leaf
from jint8.errors import CheckpointError
from jint8.checkpoint import int4
from jint8.quant4 import Int4Weight
from jint8.quantize import Int8Weight, validate_int8_weight

logger = logging.getLogger(__name__)


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
    summed: list = []  # (leaf index, stored part, array): checksummed together below
    for path, value, variable in walked:
        name = "/".join(map(str, path))
        if value is _EMPTY:
            leaves.append(_Leaf(path, "empty"))
            _insert(arrays, tuple(map(str, path)), {}, name)
            continue
        if isinstance(value, Int4Weight):
            stored = int4.stored_arrays(value, name)
            leaf = _Leaf(path, int4.KIND, tuple(value.packed.shape), "uint8", variable, int4=int4.static_fields(value))
        elif isinstance(value, Int8Weight):
            validate_int8_weight(value, name)
            stored = {"qvalue": value.qvalue, "scale": value.scale}
            leaf = _Leaf(path, "int8_weight", tuple(value.qvalue.shape), "int8", variable, int(value.in_ndim),
                         float(value.threshold), int(value.outlier_capacity))
            summed.extend((len(leaves), part, stored[part]) for part in ("qvalue", "scale"))
        elif isinstance(value, (jax.Array, np.ndarray, np.generic, int, float, bool)):
            stored = value if isinstance(value, (jax.Array, np.ndarray)) else jnp.asarray(value)
            if jnp.issubdtype(stored.dtype, jax.dtypes.extended):
                raise CheckpointError(f"{name}: arrays of dtype {stored.dtype} (e.g. PRNG keys) cannot be saved")
            leaf = _Leaf(path, "array", tuple(stored.shape), str(jnp.dtype(stored.dtype)), variable)
            summed.append((len(leaves), "", stored))
        else:
            raise CheckpointError(f"{name}: leaf of type {type(value).__name__} is not an array or Int8Weight")
        leaves.append(leaf)
        _insert(arrays, leaf.storage_path, stored, name)
    checksums: dict = {}
    for (index, part, _), value in zip(summed, array_checksums([array for _, _, array in summed])):
        checksums.setdefault(index, []).append((part, value))
    leaves = [dataclasses.replace(leaf, checksums=tuple(checksums[i])) if i in checksums else leaf
              for i, leaf in enumerate(leaves)]
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
        if leaf.kind == int4.KIND:
            value = int4.rebuild(leaf.int4, value)
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
