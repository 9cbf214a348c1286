"""Run with 8 fake CPU devices: quantize sharded kernels and run the int8 op on sharded inputs."""

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import jint8  # noqa: E402

assert jax.device_count() == 8, jax.devices()
# Auto axes: GSPMD propagates shardings through the op (Explicit axes: tests/scripts/sharded_int8_ops.py).
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rng = np.random.default_rng(0)
column = jnp.asarray(rng.standard_normal((128, 256)).astype(np.float32))
row = jnp.asarray(rng.standard_normal((256, 128)).astype(np.float32))
params = {
    "up": {"kernel": jax.device_put(column, NamedSharding(mesh, P(None, "model")))},
    "down": {"kernel": jax.device_put(row, NamedSharding(mesh, P("model", None)))},
}
cfg = jint8.Int8Config(min_size=0)
q = jint8.quantize_params(params, cfg)
unsharded = jint8.quantize_params({"up": {"kernel": column}, "down": {"kernel": row}}, cfg)

up, down = q["up"]["kernel"], q["down"]["kernel"]
# qvalue is stored K-major [out, in]: the same logical axes carry the same mesh axes.
assert up.qvalue.sharding == NamedSharding(mesh, P("model", None)), up.qvalue.sharding
assert up.scale.sharding.spec == P("model"), up.scale.sharding
assert down.qvalue.sharding == NamedSharding(mesh, P(None, "model")), down.qvalue.sharding
assert down.scale.sharding.is_fully_replicated, down.scale.sharding
for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(unsharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

x = rng.standard_normal((8, 128)).astype(np.float32)
x[:, 7] = 30.0
x_sharded = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P("data", None)))


@jax.jit
def mlp(p, x):
    h = jint8.int8_matmul(x, *p["up"]["kernel"].as_matrix(), weight_layout="nk")
    return jint8.int8_matmul(jax.nn.relu(h), *p["down"]["kernel"].as_matrix(), weight_layout="nk")


# int32 accumulators are exact; the float32 outlier stream is summed in shard-sized partial sums,
# so results agree to float32 reassociation (|y| ~ 1e3 here: ~1e-7 relative per add, K terms).
sharded_y, plain_y = np.asarray(mlp(q, x_sharded)), np.asarray(mlp(unsharded, jnp.asarray(x)))
np.testing.assert_allclose(sharded_y, plain_y, rtol=1e-5, atol=1e-5 * np.abs(plain_y).max())
# quantize_params under jit on sharded inputs keeps the sharding too (propagated by XLA).
qj = jax.jit(lambda p: jint8.quantize_params(p, cfg))(params)
for a, b in zip(jax.tree.leaves(qj), jax.tree.leaves(unsharded)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
assert qj["up"]["kernel"].qvalue.sharding.is_equivalent_to(NamedSharding(mesh, P("model", None)), 2)
print("SHARDED OK")
