"""4-bit trees: quantize_params(params, Int4Config) / dequantize_params, Int4Config.from_bitsandbytes,
the layers running Int4Weight kernels, and the model families end to end (generate included)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jint8
from jint8 import Int4Config, Int4Weight, Int8Config, Int8Weight, dequantize_params, quantize_params
from jint8.errors import InvalidConfigError, QuantizationError
from reference import require_module


def _params(rng):
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {
        "embed": {"embedding": f(100, 64)},
        "attn": {"query": {"kernel": f(64, 4, 16)}},
        "mlp": {"up": {"kernel": f(64, 96), "bias": f(96)}, "down": {"kernel": f(96, 64)}},
        "lm_head": {"kernel": f(64, 100)},
        "tiny": {"kernel": f(4, 4)},
    }


def test_quantize_params_int4_stores_the_torch_weight_as_bitsandbytes_does(rng):
    bnb_functional = require_module("bitsandbytes.functional")
    torch = require_module("torch")
    params = _params(rng)
    config = Int4Config(quant_type="fp4", double_quant=False, compute_dtype="bfloat16", min_size=100)
    q = quantize_params(params, config)
    up = q["mlp"]["up"]["kernel"]
    assert isinstance(up, Int4Weight) and up.shape == (96, 64) and up.compute_dtype == jnp.bfloat16
    # the codes of the torch Linear weight [out, in] = the Flax kernel transposed, as bitsandbytes packs it
    packed, state = bnb_functional.quantize_4bit(torch.from_numpy(np.asarray(params["mlp"]["up"]["kernel"]).T.copy()),
                                                 blocksize=64, quant_type="fp4")
    np.testing.assert_array_equal(np.asarray(up.packed), packed.numpy())
    np.testing.assert_array_equal(np.asarray(up.absmax), state.absmax.numpy())
    # Int8Config's rules, shared: skip_modules (lm_head), min_size, kernel names; embeddings,
    # biases and 3-D kernels (no bitsandbytes layout) stay float, after the same NaN/Inf check
    assert not isinstance(q["lm_head"]["kernel"], Int4Weight) and not isinstance(q["tiny"]["kernel"], Int4Weight)
    assert q["attn"]["query"]["kernel"] is params["attn"]["query"]["kernel"]
    assert q["embed"]["embedding"] is params["embed"]["embedding"] and q["mlp"]["up"]["bias"] is params["mlp"]["up"]["bias"]
    assert quantize_params(q, config)["mlp"]["up"]["kernel"] is up  # idempotent
    assert isinstance(quantize_params(q, Int8Config(min_size=100))["mlp"]["up"]["kernel"], Int4Weight)
    assert jint8.param_bytes(q) < jint8.param_bytes(params)
    back = dequantize_params(q)
    np.testing.assert_array_equal(np.asarray(back["mlp"]["up"]["kernel"]), np.asarray(up.dequantize(jnp.float32)).T)
    assert back["mlp"]["down"]["kernel"].shape == (96, 64)
    with pytest.raises(QuantizationError, match="mlp/down/kernel: kernel of shape"):
        quantize_params({"mlp": {"down": {"kernel": params["mlp"]["down"]["kernel"].at[0, 0].set(jnp.nan)}}}, config)
    # under jit the same tree structure comes out
    jitted = jax.jit(lambda p: quantize_params(p, config))(params)
    np.testing.assert_array_equal(np.asarray(jitted["mlp"]["up"]["kernel"].packed), np.asarray(up.packed))


def test_int4_config_from_bitsandbytes_follows_transformers():
    transformers = require_module("transformers")
    torch = require_module("torch")
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["mlp"])
    config = Int4Config.from_bitsandbytes(bnb)
    assert (config.quant_type, config.blocksize, config.double_quant, config.compute_dtype, config.skip_modules,
            config.min_size) == ("nf4", 64, True, jnp.bfloat16, ("mlp",), 0)
    defaults = Int4Config.from_bitsandbytes(transformers.BitsAndBytesConfig(load_in_4bit=True))
    assert (defaults.quant_type, defaults.double_quant, defaults.skip_modules) == ("fp4", False, ("lm_head",))
    with pytest.raises(InvalidConfigError, match="use jint8.Int4Config.from_bitsandbytes"):
        Int8Config.from_bitsandbytes(bnb)
    with pytest.raises(InvalidConfigError, match="load_in_4bit must be True"):
        Int4Config.from_bitsandbytes(transformers.BitsAndBytesConfig(load_in_8bit=True))
    with pytest.raises(InvalidConfigError, match="bnb_4bit_quant_storage='bfloat16'"):
        Int4Config.from_bitsandbytes({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"})
    with pytest.raises(InvalidConfigError, match="quant_type='int4'"):
        Int4Config.from_bitsandbytes({"load_in_4bit": True, "bnb_4bit_quant_type": "int4"})
    with pytest.raises(InvalidConfigError, match="quant_method='gptq'"):
        Int4Config.from_bitsandbytes({"quant_method": "gptq", "load_in_4bit": True})
    with pytest.raises(InvalidConfigError, match="Int4Config.blocksize=100"):
        Int4Config(blocksize=100)
    with pytest.raises(InvalidConfigError, match="Int4Config.skip_modules: unknown pattern syntax"):
        Int4Config(skip_modules=("rx:foo",))
    with pytest.raises(InvalidConfigError, match="Int4Config.min_size=-1"):
        Int4Config(min_size=-1)


def test_layers_and_intercept_run_int4_kernels(rng):
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(64)(nn.relu(nn.Dense(128)(x)))

    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    params = MLP().init(jax.random.key(0), x)["params"]
    q = quantize_params(params, Int4Config(min_size=0))
    with jint8.intercept():
        y = MLP().apply({"params": q}, x)
    expected = MLP().apply({"params": dequantize_params(q)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-5)
    dense = jint8.Int8Dense(128, dtype=jnp.bfloat16)
    d_params = quantize_params(dense.init(jax.random.key(1), x)["params"], Int4Config(min_size=0))
    assert dense.apply({"params": d_params}, x).dtype == jnp.bfloat16
    with pytest.raises(jint8.errors.ShapeError, match=r"Int4Weight stands for a kernel of shape \(64, 128\)"):
        jint8.Int8Dense(96).apply({"params": d_params}, x)
    linear = jint8.Int8Linear(64, 32, rngs=nnx.Rngs(0))
    float_y = linear(x)
    linear.kernel.value = quantize_params({"kernel": linear.kernel.value}, Int4Config(min_size=0))["kernel"]
    assert isinstance(linear.kernel.value, Int4Weight)
    # NF4 of a lecun-normal kernel: relative error of a few percent (16 levels per block)
    assert float(jnp.linalg.norm(linear(x) - float_y) / jnp.linalg.norm(float_y)) < 0.15


@pytest.mark.parametrize("double_quant", [False, True])
def test_fuse_projections_of_4bit_kernels_is_exact_or_refused(rng, caplog, double_quant):
    from jint8.models.spec import Fusion

    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    config = Int4Config(min_size=0, double_quant=double_quant)
    fusion = Fusion("attn", "qkv", ("q", "k"))
    whole = quantize_params({"attn": {"q": {"kernel": f(64, 64)}, "k": {"kernel": f(64, 32)}}}, config)
    fused = jint8.fuse_projections(whole, [fusion])["attn"]["qkv"]["kernel"]
    assert isinstance(fused, Int4Weight) and fused.shape == (96, 64) and not fused.double_quant
    parts = [whole["attn"][p]["kernel"].dequantize() for p in ("q", "k")]
    np.testing.assert_array_equal(np.asarray(fused.dequantize()), np.concatenate(parts, axis=0))
    # 3 x 48 = 144 values: the second part's blocks would start mid-block, so the parts stay apart
    cut = quantize_params({"attn": {"q": {"kernel": f(48, 3)}, "k": {"kernel": f(48, 3)}}}, config)
    with caplog.at_level("WARNING", logger="jint8"):
        kept = jint8.fuse_projections(cut, [fusion])["attn"]
    assert set(kept) == {"q", "k"} and "not a whole number of 64-value 4-bit blocks" in caplog.text
