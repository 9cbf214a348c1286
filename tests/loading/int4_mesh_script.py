"""Load a float checkpoint quantized to NF4 onto an 8-device mesh (8 fake CPU devices) and compare
with the single-device 4-bit load: Int4Weight arrays replicated, float leaves sharded as usual,
the same logits.

usage: python int4_mesh_script.py CHECKPOINT_DIR (run in a subprocess: XLA_FLAGS must be
set before jax starts)
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jint8  # noqa: E402


def main(path):
    config = jint8.Int4Config(min_size=0)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 7)), jnp.int32)
    model, single = jint8.from_pretrained(path, quantization=config, dtype=jnp.float32, progress=False)
    expected = np.asarray(model.apply({"params": single}, ids)[0])
    mesh = jint8.make_mesh(model=8)
    _, params = jint8.from_pretrained(path, quantization=config, dtype=jnp.float32, mesh=mesh, progress=False)
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert isinstance(q, jint8.Int4Weight)
    for array in jax.tree.leaves(q):
        assert array.sharding.is_fully_replicated and len(array.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(single["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].packed))
    assert tuple(params["model"]["embed_tokens"]["embedding"].sharding.spec)[:1] == ("model",)  # float: vocab-parallel
    logits = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)[0])
    # the same 4-bit weights and float32 inputs; the sharded lm_head / embedding only reorder sums
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1])
