"""Whole models on Explicit mesh axes (jax.make_mesh's default): the model body runs with the
mesh's axes made Auto, and its results come back typed with the shardings they are given.

On Explicit axes every op's output sharding is part of its type and jax refuses the ops whose
output it cannot infer: a vocab-parallel embedding gather, the reshape of a column-parallel
q/k/v [B, T, heads * head_dim] into heads that the "model" axis does not divide, the KV cache
update, and so on in every family's attention. Spelling out an out_sharding at each of them
would tie every model file to the mesh. On Auto axes XLA's partitioner decides those shardings
itself and every int8 layer still runs its own shard (layers.tensor_parallel_layout), the path
the Auto-axis tests hold equal to one device; so the model runs there, as
jax.sharding.auto_axes does, with the output shardings chosen after the body has run (the
output's structure is known only then: logits, a cache, collections).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
from jax.sharding import AxisType, PartitionSpec as P


def explicit_mesh() -> Optional[jax.sharding.AbstractMesh]:
    """The ambient abstract mesh (jax.set_mesh) when any of its axes is Explicit, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
        return None
    return mesh


def _is_array(leaf) -> bool:
    return isinstance(leaf, jax.Array) or hasattr(leaf, "__jax_array__")


def on_auto_axes(fn: Callable, args: tuple, kwargs: dict, out_specs: Callable[[object], object]):
    """fn(*args, **kwargs), on the ambient mesh with its Explicit axes made Auto; as fn(...) where
    no axis is Explicit.

    Array leaves of args and kwargs enter untyped (their physical sharding stays, XLA propagates
    it); other leaves (Python ints such as logits_to_keep, static flags) pass as they are.
    out_specs(out) -> a PartitionSpec per leaf of out (a pytree prefix of it): the Explicit
    shardings the results are resharded to on the way out.
    """
    mesh = explicit_mesh()
    if mesh is None:
        return fn(*args, **kwargs)
    leaves, structure = jax.tree.flatten((args, kwargs))
    positions = [i for i, leaf in enumerate(leaves) if _is_array(leaf)]
    auto = mesh.update_axis_types({name: AxisType.Auto for name, t in zip(mesh.axis_names, mesh.axis_types)
                                   if t == AxisType.Explicit})

    def body(*arrays):
        rebuilt = list(leaves)
        for i, array in zip(positions, arrays):
            rebuilt[i] = array
        inner_args, inner_kwargs = jax.tree.unflatten(structure, rebuilt)
        return fn(*inner_args, **inner_kwargs)

    with jax.sharding.use_abstract_mesh(auto):
        # every axis the types named is Auto now: nothing is left for the types to carry
        arrays = [jax.sharding.reshard(leaves[i], P()) for i in positions]
        out = body(*arrays)
    return jax.sharding.reshard(out, out_specs(out))


def output_specs(out):
    """The Explicit-axis PartitionSpecs of a model's results on the ambient mesh: a KVCache's k/v
    as loading.shard_cache places them (batch over "data", KV heads over "model"), T5's
    cross-attention keys and values [L, B, E, N, H] the same way (heads over "model", as the
    column-parallel k/v projections make them) with its encoder mask [B, E] over "data"; every
    other leaf (logits, collections) replicated."""
    from jint8.loading.sharding import cache_spec  # the loader's rules (it imports the models)
    from jint8.models.common import KVCache
    from jint8.models.t5 import T5Cache

    mesh = jax.sharding.get_abstract_mesh()

    def kv_spec(k):
        return cache_spec(k.shape[3], k.shape[1], mesh)

    def spec(leaf):
        if isinstance(leaf, KVCache):
            return KVCache(kv_spec(leaf.k), kv_spec(leaf.k))
        if isinstance(leaf, T5Cache):
            cross = kv_spec(leaf.cross_k)
            return T5Cache(KVCache(kv_spec(leaf.self_attention.k), kv_spec(leaf.self_attention.k)), cross, cross,
                           P(cross[1], None))
        return P()

    return jax.tree.map(spec, out, is_leaf=lambda x: isinstance(x, (KVCache, T5Cache)))


class RunsOnAutoAxes:
    """A Linen model mixin: apply() under jax.set_mesh of a mesh with Explicit axes runs the
    model with them made Auto (on_auto_axes) and returns output_specs' shardings; elsewhere
    nn.Module.apply as it is."""

    def apply(self, variables, *args, **kwargs):
        if explicit_mesh() is None:
            return super().apply(variables, *args, **kwargs)
        return on_auto_axes(super().apply, (variables, *args), kwargs, output_specs)
