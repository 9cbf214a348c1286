"""A fused Llama tree (fuse_projections) placed with kernel_spec on 8 fake CPU devices: the fused
q|k|v and gate|up kernels are column-parallel, and the sharded model gives the unsharded logits.

usage: python fused_sharding_script.py (in a subprocess: XLA_FLAGS must be set before jax starts)
"""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax.traverse_util import flatten_dict, unflatten_dict  # noqa: E402

import jint8  # noqa: E402
from jint8.loading import kernel_spec  # noqa: E402
from jint8.models import LlamaConfig, LlamaForCausalLM, spec_for  # noqa: E402
from jint8.ops.int8_matmul import sharded  # noqa: E402
from jint8.quantize import Int8Weight, int8_weight_specs  # noqa: E402

# q 64 + k 32 + v 32 = 128 and gate|up 2 x 64 = 128 output features: 8 divides both
CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=16, qkv_bias=True, dtype=jnp.float32)


def spec(array):
    return tuple(array.sharding.spec) + (None,) * (array.ndim - len(array.sharding.spec))


def place(params, mesh):
    """Every leaf on `mesh` with kernel_spec under the Llama family's rules."""
    rules = spec_for("llama").sharding
    placed = {}
    for path, leaf in flatten_dict(params, is_leaf=lambda _, x: isinstance(x, Int8Weight)).items():
        if isinstance(leaf, Int8Weight):
            q_spec, s_spec = int8_weight_specs(kernel_spec(path, leaf.shape, mesh, rules), len(leaf.shape),
                                               leaf.in_ndim)
            placed[path] = leaf.replace(
                qvalue=jax.device_put(leaf.qvalue, jax.sharding.NamedSharding(mesh, q_spec)),
                scale=jax.device_put(leaf.scale, jax.sharding.NamedSharding(mesh, s_spec)))
        else:
            sharding = jax.sharding.NamedSharding(mesh, kernel_spec(path, leaf.shape, mesh, rules))
            placed[path] = jax.device_put(leaf, sharding)
    return unflatten_dict(placed)


def main():
    assert jax.device_count() == 8, jax.devices()
    model = LlamaForCausalLM(CONFIG)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, 7)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]
    mesh = jint8.make_mesh(model=8)
    forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
    for quantized in (False, True):
        tree = jint8.quantize_params(params, jint8.Int8Config(min_size=0)) if quantized else params
        fused = jint8.fuse_projections(tree)
        expected = np.asarray(forward(fused, ids))
        sharded_tree = place(fused, mesh)
        layer = sharded_tree["model"]["layers_0"]
        qkv, gate_up = layer["self_attn"]["qkv_proj"], layer["mlp"]["gate_up_proj"]
        if quantized:  # qvalue is K-major [out, in]: column-parallel shards its first axis
            for kernel in (qkv["kernel"], gate_up["kernel"]):
                assert spec(kernel.qvalue) == ("model", None), spec(kernel.qvalue)
                assert spec(kernel.scale) == ("model",), spec(kernel.scale)
                assert len(kernel.qvalue.sharding.device_set) == 8
        else:
            for kernel in (qkv["kernel"], gate_up["kernel"]):
                assert spec(kernel) == (None, "model"), spec(kernel)
                assert len(kernel.sharding.device_set) == 8
        assert spec(qkv["bias"]) == ("model",), spec(qkv["bias"])
        got = np.asarray(forward(sharded_tree, ids))
        # int32 accumulators are exact in any order; float sums may be reordered by the
        # collectives the split of q|k|v and gate|up needs: 1e-5 relative
        scale = np.max(np.abs(expected))
        assert np.max(np.abs(got - expected)) <= 1e-5 * scale, (quantized, np.max(np.abs(got - expected)))
        print(f"quantized={quantized} max|diff|={np.max(np.abs(got - expected)):.3g}")
        if quantized:  # under jax.set_mesh each int8 layer runs its shard (layers.tensor_parallel_layout)
            calls = []
            run_sharded = sharded.int8_matmul_sharded
            sharded.int8_matmul_sharded = lambda *a, **kw: calls.append(kw["layout"]) or run_sharded(*a, **kw)
            try:
                with jax.set_mesh(mesh):
                    on_mesh = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(sharded_tree, ids))
            finally:
                sharded.int8_matmul_sharded = run_sharded
            splits = {(c.k, c.n) for c in calls}
            assert splits == {((), ("model",)), (("model",), ())}, splits  # column- and row-parallel layers
            assert np.max(np.abs(on_mesh - expected)) <= 1e-5 * scale, np.max(np.abs(on_mesh - expected))
            print(f"on the mesh: {len(calls)} sharded int8 calls, max|diff|={np.max(np.abs(on_mesh - expected)):.3g}")
    print("OK")


if __name__ == "__main__":
    main()
