"""Restore targets: each saved array's sharding, from one sharding, a tree of them or a callable
(an Int8Weight's qvalue and scale shardings derived from its float kernel's)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from jint8.checkpoint.metadata import _Leaf
from jint8.checkpoint.tree import _insert
from jint8.errors import CheckpointMismatchError
from jint8.quantize import Int8Weight, int8_weight_specs

ShardingsArg = Union[None, Any, Callable[[tuple, jax.ShapeDtypeStruct], Any]]


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
    if leaf.kind == "int4_weight":
        return {"": default}  # replicated, whatever the float kernel's sharding (checkpoint/int4.py)
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
        elif leaf.kind == "int4_weight":
            from jint8.checkpoint.int4 import abstract_arrays

            value = abstract_arrays(leaf.int4, next(placed)[""])
        else:
            sharding = next(placed)
            value = {
                "qvalue": jax.ShapeDtypeStruct(leaf.shape, jnp.int8, sharding=sharding["qvalue"]),
                "scale": jax.ShapeDtypeStruct(leaf.scale_shape, jnp.float32, sharding=sharding["scale"]),
            }
        _insert(target, leaf.storage_path, value, leaf.name)
    return target
