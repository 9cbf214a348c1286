"""Load a T5 checkpoint int8 onto 8 fake CPU devices (2 data x 4 model) and compare with the
unsharded load: the layout of the column- and row-parallel int8 kernels and the logits.

usage: python t5_sharded_script.py CHECKPOINT_DIR   (XLA_FLAGS set before jax starts: run in a
subprocess)
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jint8  # noqa: E402


def spec(array):
    return tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))


def main(directory):
    assert jax.device_count() == 8, jax.devices()
    quantization = jint8.Int8Config()
    ids = np.random.RandomState(0).randint(2, 96, (2, 9)).astype(np.int32)
    decoder_ids = np.random.RandomState(1).randint(2, 96, (2, 5)).astype(np.int32)
    model, params = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=quantization, progress=False)
    expected = np.asarray(jax.jit(model.apply)({"params": params}, ids, decoder_ids))

    mesh = jint8.make_mesh(data=2, model=4)
    sharded_model, sharded = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=quantization,
                                                   mesh=mesh, progress=False)
    block = sharded["decoder"]["block_0"]
    q = block["layer_1"]["EncDecAttention"]["q"]["kernel"]
    wo = block["layer_2"]["DenseReluDense"]["wo"]["kernel"]
    # qvalue is K-major [out, in]: column-parallel shards its first axis, row-parallel its second
    assert spec(q.qvalue) == ("model", None) and spec(q.scale) == ("model",), spec(q.qvalue)
    assert spec(wo.qvalue) == (None, "model") and spec(wo.scale) == (None,), spec(wo.qvalue)
    assert spec(sharded["shared"]["embedding"]) == ("model", None)
    got = np.asarray(jax.jit(sharded_model.apply)({"params": sharded}, ids, decoder_ids))
    # int32 accumulators are exact in any order; the float parts may be summed in another order
    # after the all-reduce: 1e-5 relative
    assert np.max(np.abs(got - expected)) <= 1e-5 * np.max(np.abs(expected))

    # Explicit axes (jax.make_mesh's default): the encoder's cross-attention keys/values stay
    # sharded like the self-attention cache, and generate gives one device's tokens
    explicit = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    explicit_model, placed = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=quantization,
                                                   mesh=explicit, progress=False)
    with jax.set_mesh(explicit):
        encoded = explicit_model.apply({"params": placed}, ids, method=explicit_model.encode)
        cache = explicit_model.apply({"params": placed}, encoded, None, 8, method=explicit_model.init_cache)
    assert spec(cache.cross_k) == (None, "data", None, "model", None), cache.cross_k.sharding
    config = jint8.GenerationConfig(max_new_tokens=5, do_sample=False)
    want = jint8.generate(model, params, ids, config=config).sequences
    np.testing.assert_array_equal(jint8.generate(explicit_model, placed, ids, config=config).sequences, want)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
