"""Every tensor of a load onto a mesh is placed with its final sharding and staged shard by shard.

usage: python placement_script.py CHECKPOINT_DIR [GGUF_FILE]
8 fake CPU devices (run in a subprocess: XLA_FLAGS must be set before jax starts). For meshes of
4 and 8 devices and float and int8 loads: each leaf's sharding is the NamedSharding the sharding
rules give it, each device holds only its shard, the values equal the unsharded load's, and each
stored array went to the devices already split (no device received a whole sharded tensor), in
blocks of whole rows of the stored array (device_convert.staging_spec: no strided host copies).
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

import jint8  # noqa: E402
import jint8.loading.pretrained as pretrained  # noqa: E402
from jint8.loading import kernel_spec  # noqa: E402
from jint8.quantize import EMBEDDING_NAME, int8_weight_specs  # noqa: E402

STAGED = []


def _record_stage(stage):
    def recorded(host_array, conversion):
        staged = stage(host_array, conversion)
        STAGED.append((host_array.shape, conversion.source, staged))
        return staged

    return recorded


def expected_shardings(path, leaf, mesh):
    """[(array, NamedSharding)] the rules give one placed leaf."""
    if isinstance(leaf, jint8.Int8Weight):
        embedding = path[-1] == EMBEDDING_NAME
        float_shape = leaf.qvalue.shape if embedding else leaf.shape
        spec = kernel_spec(path, float_shape, mesh)
        q_spec, s_spec = int8_weight_specs(spec, len(float_shape), leaf.in_ndim, embedding=embedding)
        return [(leaf.qvalue, NamedSharding(mesh, q_spec)), (leaf.scale, NamedSharding(mesh, s_spec))]
    return [(leaf, NamedSharding(mesh, kernel_spec(path, leaf.shape, mesh)))]


def check_placement(params, reference, mesh) -> tuple[int, int]:
    """Assert every array's sharding and shard shapes; returns how many arrays and leaves are split."""
    split, split_leaves = 0, 0
    flat, flat_reference = (flatten_dict(t, is_leaf=lambda _, x: isinstance(x, jint8.Int8Weight))
                            for t in (params, reference))
    assert flat.keys() == flat_reference.keys()
    for path, leaf in flat.items():
        arrays_split = 0
        for array, sharding in expected_shardings(path, leaf, mesh):
            assert array.sharding.is_equivalent_to(sharding, array.ndim), (path, array.sharding, sharding)
            shard_shape = sharding.shard_shape(array.shape)
            assert {tuple(s.data.shape) for s in array.addressable_shards} == {shard_shape}, path
            arrays_split += shard_shape != array.shape
        split += arrays_split
        split_leaves += arrays_split > 0
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), leaf,
                     flat_reference[path])
    return split, split_leaves


def staged_split() -> tuple[int, int]:
    """How many stored arrays reached the devices split, each as its source sharding's shards,
    and how many of them split along a later axis than the first (strided blocks of the file)."""
    split, strided = 0, 0
    for host_shape, source, staged in STAGED:
        assert staged.sharding == source
        shard_shape = source.shard_shape(host_shape)
        assert {tuple(s.data.shape) for s in staged.addressable_shards} == {shard_shape}
        split += shard_shape != tuple(host_shape)
        strided += shard_shape[1:] != tuple(host_shape[1:])
    return split, strided


def main(directory, gguf=None):
    assert jax.device_count() == 8, jax.devices()
    pretrained.stage = _record_stage(pretrained.stage)
    runs = [(directory, None, ((1, 8), (2, 4), (1, 4))),
            (directory, jint8.Int8Config(quantize_embeddings=True), ((1, 8), (2, 4), (1, 4)))]
    if gguf is not None:  # another format through the same staging: GGUF tensors read as views of its map
        runs.append((gguf, jint8.Int8Config(), ((1, 8), (1, 4))))
    for directory, quantization, meshes in runs:
        _, reference = jint8.from_pretrained(directory, dtype=jnp.bfloat16, quantization=quantization, progress=False)
        for data, model_axis in meshes:
            mesh = jint8.make_mesh(data=data, model=model_axis, devices=jax.devices()[: data * model_axis])
            STAGED.clear()
            _, params = jint8.from_pretrained(directory, dtype=jnp.bfloat16, quantization=quantization, mesh=mesh,
                                              progress=False)
            split, split_leaves = check_placement(params, reference, mesh)
            # a tensor whose parameter is sharded went to the devices already split, never whole,
            # and in blocks of whole rows of the stored array (contiguous in the file): row-parallel
            # o_proj / down_proj [out, in] too, moved to their K split on the devices
            staged, strided = staged_split()
            assert staged == split_leaves > 0 and strided == 0, (staged, strided, split_leaves)
            print(f"{os.path.basename(directory)} quantization={quantization is not None} mesh=({data},{model_axis}): "
                  f"{split} arrays split, "
                  f"{split_leaves} of {len(STAGED)} tensors staged split in whole rows")
    print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:3])
