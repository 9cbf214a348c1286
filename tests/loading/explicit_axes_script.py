"""Whole models loaded onto meshes with Explicit axes (jax.make_mesh's default) give one device's
logits, KV cache and generated tokens; Int8Embed's gather on its own names its output sharding.

usage: python explicit_axes_script.py LLAMA_DIR (in a subprocess: XLA_FLAGS must be set
before jax starts)
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import jint8  # noqa: E402
from jint8.layers import gather_rows  # noqa: E402
from jint8.loading import cache_spec, shard_cache  # noqa: E402
from jint8.models import init_cache  # noqa: E402
from jint8.ops.int8_matmul import sharded  # noqa: E402

GREEDY = jint8.GenerationConfig(max_new_tokens=6, do_sample=False)


def explicit_mesh(data, model):
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)


def prefill(model, params, ids):
    """(logits [B, T, V] of a prefill into a fresh cache, that cache), on the mesh set if any."""
    cache = init_cache(model.config, ids.shape[0], 12, jnp.float32)
    if not jax.sharding.get_abstract_mesh().empty:
        cache = shard_cache(cache, jax.sharding.get_mesh())
    step = jax.jit(lambda p, x, c: model.apply({"params": p}, x, cache=c, cache_index=jnp.int32(0)))
    logits, cache = step(params, ids, cache)
    return np.asarray(logits), cache


def check_model(directory, quantization, data, model_axis):
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 7)), jnp.int32)
    model, params = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=quantization, progress=False)
    expected, _ = prefill(model, params, ids)
    tokens = jint8.generate(model, params, ids, config=GREEDY).sequences
    mesh = explicit_mesh(data, model_axis)
    sharded_model, placed = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=quantization,
                                                  mesh=mesh, progress=False)
    calls = []
    run_sharded = sharded.int8_matmul_sharded
    sharded.int8_matmul_sharded = lambda *a, **kw: calls.append(kw["layout"]) or run_sharded(*a, **kw)
    try:
        with jax.set_mesh(mesh):
            got, cache = prefill(sharded_model, placed, ids)
    finally:
        sharded.int8_matmul_sharded = run_sharded
    # int32 accumulators are exact in any order; the float parts (scales, outliers, softmax)
    # may be summed in another order after the all-reduces: 1e-5 relative
    scale = np.max(np.abs(expected))
    assert np.max(np.abs(got - expected)) <= 1e-5 * scale, np.max(np.abs(got - expected))
    kv_spec = cache_spec(model.config.num_kv_heads, ids.shape[0], mesh)
    assert cache.k.sharding == NamedSharding(mesh, kv_spec), (cache.k.sharding, kv_spec)
    if quantization is not None:  # every int8 layer ran its own shard, not a replicated kernel
        assert calls and all(c.size(c.k + c.n) == model_axis for c in calls), calls
    # generate sets the params' mesh itself (jax.set_mesh): the whole loop, KV cache included
    got_tokens = jint8.generate(sharded_model, placed, ids, config=GREEDY).sequences
    np.testing.assert_array_equal(got_tokens, tokens)
    print(f"{os.path.basename(directory)} int8={quantization is not None} explicit mesh ({data},{model_axis}): "
          f"{len(calls)} sharded int8 calls, max|diff|={np.max(np.abs(got - expected)):.3g}, tokens equal")


def check_embedding_gather():
    """gather_rows of a vocab-parallel table on Explicit axes equals jnp.take, rows following the
    ids' batch split."""
    mesh = explicit_mesh(2, 4)
    table = np.random.RandomState(1).randn(256, 16).astype(np.float32)
    ids = np.random.RandomState(2).randint(0, 256, (4, 5)).astype(np.int32)
    placed = jax.device_put(table, NamedSharding(mesh, P("model", None)))
    placed_ids = jax.device_put(ids, NamedSharding(mesh, P("data", None)))
    with jax.set_mesh(mesh):
        rows = jax.jit(gather_rows)(placed, placed_ids)
    assert rows.sharding.spec == P("data", None, None), rows.sharding
    np.testing.assert_array_equal(np.asarray(rows), table[ids])
    print("vocab-parallel gather OK")


def main(llama_dir):
    assert jax.device_count() == 8, jax.devices()
    check_embedding_gather()
    embeddings = jint8.Int8Config(min_size=0, quantize_embeddings=True)
    check_model(llama_dir, embeddings, 2, 4)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
