"""How a matmul's operands are split over a mesh, shared by the ops' sharded paths
(int8_matmul/sharded.py, int4_matmul/api.py): MatmulLayout (the mesh axes of M, K and N), read
from the operands' types on Explicit axes (typed_layout) or given (layout_for)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jint8.errors import ShapeError

Axes = tuple[str, ...]


def _axes(entry) -> Axes:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def spec_entry(axes: Axes):
    """A PartitionSpec entry for a dimension split over `axes`."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def _dims(spec, ndim: int) -> list[Axes]:
    entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    return [_axes(entry) for entry in entries[:ndim]]


@dataclasses.dataclass(frozen=True)
class MatmulLayout:
    """How a 2-D call x [M, K] @ wq is split: the mesh axes of M (x's rows), K (contracted) and N
    (the weight's output features). explicit: the mesh's axes are Explicit (operands are
    resharded to these specs by jax.sharding.reshard first)."""

    mesh: Any  # jax.sharding.Mesh or AbstractMesh
    m: Axes = ()
    k: Axes = ()
    n: Axes = ()
    explicit: bool = False

    def size(self, axes: Axes) -> int:
        return math.prod(int(self.mesh.shape[a]) for a in axes)

    def specs(self, weight_layout: str) -> tuple[P, P, P]:
        """(x's, wq's, col_scales' and bias') PartitionSpecs."""
        m, k, n = spec_entry(self.m), spec_entry(self.k), spec_entry(self.n)
        return P(m, k), (P(k, n) if weight_layout == "kn" else P(n, k)), P(n)


def layout_for(mesh, x_spec, w_spec, weight_layout: str = "nk", *, explicit: Optional[bool] = None) -> MatmulLayout:
    """The MatmulLayout of x [M, K] sharded by x_spec and wq sharded by w_spec (its own layout:
    [N, K] for "nk", Int8Weight's). The weight decides K's and N's axes (x is resharded to
    them); M keeps x's axes that the weight does not use."""
    x_dims, w_dims = _dims(x_spec, 2), _dims(w_spec, 2)
    k, n = (w_dims[0], w_dims[1]) if weight_layout == "kn" else (w_dims[1], w_dims[0])
    if set(k) & set(n):
        raise ShapeError(f"int8_matmul: the weight's spec {w_spec} splits K and N over the same mesh axis")
    m = tuple(a for a in x_dims[0] if a not in set(k) | set(n))
    if explicit is None:
        explicit = any(t == AxisType.Explicit for t in getattr(mesh, "axis_types", ()))
    return MatmulLayout(mesh, m, k, n, explicit)


def typed_layout(x: jax.Array, wq: jax.Array, weight_layout: str) -> Optional[MatmulLayout]:
    """The layout of a call whose operands' types carry shardings over Explicit mesh axes; None
    when they carry none (no mesh, Auto axes, replicated operands, or inside a shard_map)."""
    shardings = []
    for array in (x, wq):
        sharding = getattr(jax.typeof(array), "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return None
        shardings.append(sharding)
    meshes = [s.mesh for s in shardings[::-1] if not s.mesh.empty]  # the weight's, else x's
    if not meshes:
        return None
    mesh = meshes[0]
    explicit = {a for a, t in zip(mesh.axis_names, getattr(mesh, "axis_types", ())) if t == AxisType.Explicit}
    used = {a for s in shardings for dim in _dims(s.spec, 2) for a in dim}
    if not used & explicit:
        return None
    for array in (wq, x):  # concrete arrays outside jit: their concrete mesh
        if not isinstance(array, jax.core.Tracer) and isinstance(getattr(array, "sharding", None), NamedSharding):
            mesh = array.sharding.mesh
            break
    return layout_for(mesh, shardings[0].spec, shardings[1].spec, weight_layout, explicit=True)


def local_slice(full: jax.Array, axes: Axes, parts: int) -> jax.Array:
    """This device's block of the last axis of `full`, split `parts` ways over `axes`."""
    width = full.shape[-1] // parts
    return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index(axes) * width, width, axis=full.ndim - 1)
