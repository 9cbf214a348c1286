"""Load a float checkpoint quantized to NF4 onto an 8-device mesh (8 fake CPU devices) and compare
with the single-device 4-bit load: column-parallel kernels split along N in whole blocks
(quant4.int4_weight_specs), row-parallel ones replicated, float leaves sharded as usual, the same
arrays and the same logits. Also quantize_params on sharded float kernels.

usage: python int4_mesh_script.py CHECKPOINT_DIR [BNB_4BIT_DIR] (run in a subprocess: XLA_FLAGS must be
set before jax starts)
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jint8  # noqa: E402
from jint8.ops.int8_matmul import layout_for  # noqa: E402
from jint8.quant4 import int4_weight_specs  # noqa: E402


def spec(array):
    return tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))


def check_load(path, config, split: bool):
    """split: whether this config's blocks let the tiny model's column-parallel kernels split 8 ways
    (config None: a bitsandbytes 4-bit checkpoint, loaded as stored)."""
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 7)), jnp.int32)
    model, single = jint8.from_pretrained(path, quantization=config, dtype=jnp.float32, progress=False)
    expected = np.asarray(model.apply({"params": single}, ids)[0])
    mesh = jint8.make_mesh(model=8)
    _, params = jint8.from_pretrained(path, quantization=config, dtype=jnp.float32, mesh=mesh, progress=False)
    layer, single_layer = params["model"]["layers_0"], single["model"]["layers_0"]
    for group, name, column in (("self_attn", "q_proj", True), ("mlp", "up_proj", True),
                                ("self_attn", "o_proj", False), ("mlp", "down_proj", False)):
        q = layer[group][name]["kernel"]
        assert isinstance(q, jint8.Int4Weight)
        for got, want in zip(jax.tree.leaves(q), jax.tree.leaves(single_layer[group][name]["kernel"])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        if column and split:  # bytes, absmax (and nested absmax) split along N; code book, offset replicated
            assert spec(q.packed) == ("model", None) and spec(q.absmax) == ("model",), (name, q.packed.sharding)
            assert q.packed.addressable_shards[0].data.shape[0] == q.packed.shape[0] // 8
            if q.double_quant:
                assert spec(q.nested_absmax) == ("model",) and q.nested_code.sharding.is_fully_replicated
        else:
            assert all(a.sharding.is_fully_replicated and len(a.sharding.device_set) == 8 for a in jax.tree.leaves(q))
    assert spec(params["model"]["embed_tokens"]["embedding"])[:1] == ("model",)  # float: vocab-parallel
    logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)[0])
    # the same 4-bit weights and float32 inputs; the sharded lm_head / embedding only reorder sums
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    with jax.set_mesh(mesh):  # each column-parallel 4-bit layer on its own shard (layers.tensor_parallel_layout)
        on_mesh = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)[0])
    np.testing.assert_allclose(on_mesh, expected, rtol=1e-5, atol=1e-5)
    print(f"{config or path}: split={split} OK", flush=True)


def check_rules():
    """int4_weight_specs on its own: which splits the packed layout allows."""
    sizes = {"model": 8, "data": 1}
    w = jint8.quant4.quantize_4bit(jnp.ones((64, 256), jnp.float32), double_quant=False)  # [N, K]
    specs, reason = int4_weight_specs(P(None, "model"), w, sizes)  # column-parallel: 8 rows of 256 = 32 blocks
    assert reason is None and specs.packed == P("model", None) and specs.absmax == P("model")
    specs, reason = int4_weight_specs(P("model", None), w, sizes)  # row-parallel: refused
    assert specs.packed == P() and "no contiguous range" in reason, reason
    odd = jint8.quant4.quantize_4bit(jnp.ones((8, 32), jnp.float32), double_quant=False)  # 1 row of 32 per shard
    specs, reason = int4_weight_specs(P(None, "model"), odd, sizes)
    assert specs.packed == P() and "cuts its 64-value blocks" in reason, reason
    nested = jint8.quant4.quantize_4bit(jnp.ones((64, 256), jnp.float32))  # 32 blocks per shard < 256
    assert "256-block groups" in int4_weight_specs(P(None, "model"), nested, sizes)[1]
    # quantize_params of a sharded kernel [K, N] = [256, 2048]: 256 rows x 256 = 1024 blocks, 4 groups per shard
    mesh = jint8.make_mesh(model=8)
    kernel = jnp.asarray(np.random.default_rng(0).standard_normal((256, 2048)).astype(np.float32))
    placed = {"up_proj": {"kernel": jax.device_put(kernel, NamedSharding(mesh, P(None, "model")))}}
    q = jint8.quantize_params(placed, jint8.Int4Config(min_size=0))["up_proj"]["kernel"]
    plain = jint8.quantize_params({"up_proj": {"kernel": kernel}}, jint8.Int4Config(min_size=0))["up_proj"]["kernel"]
    assert spec(q.packed) == ("model", None) and spec(q.nested_absmax) == ("model",), q.packed.sharding
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32))
    got = jax.jit(lambda x, w: jint8.int4_matmul(x, w))(x, q)
    assert spec(got) == (None, "model"), got.sharding  # each device computes its own N columns
    np.testing.assert_allclose(np.asarray(got), np.asarray(jint8.int4_matmul(x, plain)), rtol=1e-6, atol=1e-5)
    # the shard_map path: Explicit axes (the split read from the types) and Auto axes (a layout
    # given): each device runs the backend on its own Int4Weight of [N / 8, K]. The same dequantized
    # values; XLA:CPU may block the float32 dot's K sum differently for 256 columns than for 2048
    expected = np.asarray(jint8.int4_matmul(x, plain))
    explicit = jax.make_mesh((1, 8), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    specs, _ = int4_weight_specs(P(None, "model"), plain, explicit.shape)
    placed_e = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(explicit, s)), plain, specs)
    with jax.set_mesh(explicit):
        got_e = jax.jit(lambda x, w: jint8.int4_matmul(x, w))(x, placed_e)
    assert spec(got_e) == (None, "model"), got_e.sharding
    np.testing.assert_allclose(np.asarray(got_e), expected, rtol=1e-6, atol=1e-5)
    layout = layout_for(mesh, P(), P("model", None))
    got_a = jax.jit(lambda x, w: jint8.int4_matmul(x, w, layout=layout))(x, q)
    np.testing.assert_allclose(np.asarray(got_a), expected, rtol=1e-6, atol=1e-5)
    try:
        jint8.int4_matmul(x, q, layout=layout_for(mesh, P(None, "model"), P(None, "model")))
    except jint8.errors.ShapeError as e:
        assert "cannot be split along K" in str(e), e
    else:
        raise AssertionError("a K split of a 4-bit weight was not refused")
    print("rules OK", flush=True)


def main(path, bnb4_path=None):
    check_rules()
    check_load(path, jint8.Int4Config(min_size=0, double_quant=False), split=True)  # 8 rows x 64 = 8 blocks a shard
    check_load(path, jint8.Int4Config(min_size=0), split=False)  # 8 blocks a shard: cuts the 256-block groups
    if bnb4_path is not None:  # bitsandbytes' own 4-bit tensors (no double quantization), placed as stored
        check_load(bnb4_path, None, split=True)
    print("OK")


if __name__ == "__main__":
    main(*sys.argv[1:3])
