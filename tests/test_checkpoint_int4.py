"""save_quantized / load_quantized of 4-bit (Int4Weight) trees: bit-exact round trip, static fields
and the Int4Config kept, restored replicated on a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint8
from jint8 import Int4Config, Int4Weight


def _bits(x):
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def test_4bit_tree_round_trips_bit_exact(tmp_path, rng):
    f = lambda *s, dtype=jnp.float32: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    nf4 = Int4Config(min_size=0, compute_dtype=jnp.bfloat16)
    params = jint8.quantize_params({"up": {"kernel": f(64, 96, dtype=jnp.bfloat16), "bias": f(96)},
                                    "norm": {"scale": f(64)}}, nf4)
    params["down"] = jint8.quantize_params({"kernel": f(96, 40)}, Int4Config(quant_type="fp4", double_quant=False,
                                                                             blocksize=128, min_size=0))
    out = jint8.save_quantized(tmp_path / "ckpt", params, quant_config=nf4)
    restored, info = jint8.load_quantized(out, mesh=jint8.make_mesh(model=1))
    assert info.quant_config == nf4
    is_weight = lambda x: isinstance(x, Int4Weight)  # noqa: E731
    assert jax.tree.structure(restored, is_leaf=is_weight) == jax.tree.structure(params, is_leaf=is_weight)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(_bits(a), _bits(b))
    up, down = restored["up"]["kernel"], restored["down"]["kernel"]
    assert (up.shape, up.quant_type, up.dtype, up.compute_dtype, up.double_quant) == (
        (96, 64), "nf4", jnp.bfloat16, jnp.bfloat16, True)
    assert (down.quant_type, down.blocksize, down.double_quant) == ("fp4", 128, False)
    assert up.packed.sharding.is_fully_replicated
    np.testing.assert_array_equal(_bits(up.dequantize()), _bits(params["up"]["kernel"].dequantize()))
