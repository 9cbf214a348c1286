"""Load a checkpoint onto meshes and compare logits with the unsharded load.

usage: python sharded_loading_script.py CHECKPOINT_DIR [--gpu]
Default: 8 fake CPU devices (run in a subprocess: XLA_FLAGS must be set before jax starts).
--gpu: every visible GPU (the 2-GPU check on the device machine).
"""

import os
import sys

if "--gpu" not in sys.argv:
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jint8  # noqa: E402
from jint8.errors import InsufficientMemoryError  # noqa: E402
from jint8.loading import shard_cache  # noqa: E402
from jint8.models import init_cache  # noqa: E402


def spec(array):
    return tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))


def check_int8_layout(params):
    attn = params["model"]["layers_0"]["self_attn"]
    q, o = attn["q_proj"]["kernel"], attn["o_proj"]["kernel"]
    # qvalue is K-major [out, in]: column-parallel shards its first axis, row-parallel its second.
    assert spec(q.qvalue) == ("model", None) and spec(q.scale) == ("model",), (spec(q.qvalue), spec(q.scale))
    assert spec(o.qvalue) == (None, "model") and spec(o.scale) == (None,), (spec(o.qvalue), spec(o.scale))
    down = params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"]
    assert spec(down.qvalue) == (None, "model")
    assert spec(params["model"]["embed_tokens"]["embedding"]) == ("model", None)
    assert spec(params["lm_head"]["kernel"].qvalue) == ("model", None)
    assert len(q.qvalue.sharding.device_set) == jax.device_count()


def logits_and_decode(model, params, ids, mesh=None):
    logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    cache = init_cache(model.config, ids.shape[0], 12, jnp.float32)
    if mesh is not None:
        cache = shard_cache(cache, mesh)
    step = jax.jit(lambda p, x, c, i: model.apply({"params": p}, x, cache=c, cache_index=i))
    prefill, cache = step(params, ids[:, :6], cache, jnp.int32(0))
    decoded, _ = step(params, ids[:, 6:7], cache, jnp.int32(6))
    return np.asarray(logits), np.asarray(jnp.concatenate([prefill, decoded], axis=1))


def main(directory, gpu: bool):
    n = jax.device_count()
    assert gpu or n == 8, jax.devices()
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (4, 7)), jnp.int32)
    # float on a 2 x n/2 mesh (data replicates), int8 on n-way tensor parallelism
    for quantization, data, model_axis in ((None, 2 if n >= 4 else 1, n // 2 if n >= 4 else n),
                                           (jint8.Int8Config(), 1, n)):
        model, params = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=quantization, progress=False)
        expected, _ = logits_and_decode(model, params, ids)
        mesh = jint8.make_mesh(data=data, model=model_axis)
        assert mesh.axis_names == ("data", "model") and mesh.shape["model"] == model_axis
        sharded_model, sharded = jint8.from_pretrained(directory, dtype=jnp.float32, quantization=quantization,
                                                       mesh=mesh, progress=False)
        if quantization is not None:
            check_int8_layout(sharded)
        got, got_cached = logits_and_decode(sharded_model, sharded, ids, mesh)
        # int32 accumulators are exact in any order; the float parts (scales, outliers, softmax)
        # may be summed in another order after the all-reduce: 1e-5 relative
        scale = np.max(np.abs(expected))
        assert np.max(np.abs(got - expected)) <= 1e-5 * scale, (quantization, data, model_axis)
        assert np.max(np.abs(got_cached - expected)) <= 1e-5 * scale
        print(f"quantization={quantization is not None} mesh=({data},{model_axis}) "
              f"max|diff|={np.max(np.abs(got - expected)):.3g}")
        if quantization is not None:
            # a jint8 checkpoint (save_quantized) restores straight onto the same mesh layout
            import tempfile

            saved = os.path.join(tempfile.mkdtemp(), "int8")
            jint8.save_quantized(saved, params, quant_config=quantization, model_config=model.config)
            restored_model, restored = jint8.from_pretrained(saved, mesh=mesh, progress=False)
            check_int8_layout(restored)
            # the checksum pass gathered every array to the host: jax keeps np.asarray's host copy
            # of a sharded (or accelerator) array on the array, and none may stay behind
            assert all(getattr(a, "_npy_value", None) is None for a in jax.tree.leaves(restored))
            restored_logits, _ = logits_and_decode(restored_model, restored, ids, mesh)
            assert np.max(np.abs(restored_logits - expected)) <= 1e-5 * scale
            print("jint8 checkpoint restored onto the mesh")
    # a per-device budget that fits n-way sharding but not one device
    model, params = jint8.from_pretrained(directory, dtype=jnp.float32, progress=False)
    budget = {d.id: int(0.7 * jint8.param_bytes(params)) for d in jax.devices()}
    jint8.from_pretrained(directory, dtype=jnp.float32, mesh=jint8.make_mesh(model=n), max_memory=budget,
                          progress=False)
    try:
        jint8.from_pretrained(directory, dtype=jnp.float32, mesh=jint8.make_mesh(model=1), max_memory=budget,
                              progress=False)
    except InsufficientMemoryError as e:
        print("max_memory:", e)
    else:
        raise AssertionError("max_memory not enforced")
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], "--gpu" in sys.argv)
