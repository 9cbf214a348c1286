"""jint8.quant4 (NF4 / FP4, double quantization) against the real bitsandbytes 0.50 on the CPU.

These must run in CI: `make test` sets JINT8_REQUIRE_REFERENCE=1, so a missing torch or
bitsandbytes fails here instead of skipping.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jint8
from jint8 import functional as F
from jint8 import quant4
from jint8.errors import InvalidConfigError, QuantizationError, ShapeError
from reference import require_module

torch = require_module("torch")
bnb_functional = require_module("bitsandbytes.functional")
bnb_default_ops = require_module("bitsandbytes.backends.default.ops")

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
JAX_DTYPES = {"float16": jnp.float16, "bfloat16": jnp.bfloat16, "float32": jnp.float32}
# (shape, blocksize): odd sizes, sizes below one block, a short last block, a last dimension
# that is not a multiple of the blocksize, 3-D, and the largest blocksize with two blocks.
CASES = [
    ((7, 5), 64),
    ((3, 33), 32),
    ((64, 48), 32),
    ((16, 128), 256),
    ((1000,), 64),
    ((5, 3, 21), 128),
    ((40, 130), 4096),
]


def _source(shape, dtype_name, rng):
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.01, 3)
    w.reshape(-1)[: min(3, w.size)] = 0  # exact zeros hit the FP4 zero split and code 7 of NF4
    torch_w = torch.from_numpy(w).to(TORCH_DTYPES[dtype_name])
    # The same values on both sides: round to the dtype in torch, then hand them to jax.
    return torch_w, jnp.asarray(torch_w.float().numpy()).astype(JAX_DTYPES[dtype_name])


def _bits(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])


def _torch_bits(t) -> np.ndarray:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).numpy().view(
        np.uint16 if t.element_size() == 2 else np.uint32
    )


def _reference_dequantize(packed, state):
    """bitsandbytes' own torch implementation (backends/default/ops.py, which its CPU dispatch runs
    for odd last dimensions), eager: flat blocks for every shape."""
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    compute = bnb_default_ops._dequantize_4bit_compute
    compute = getattr(compute, "__wrapped__", compute)  # past its torch.compile wrapper
    code = bnb_functional.get_4bit_type(state.quant_type, device="cpu")
    return compute(packed.reshape(-1), absmax.float(), code, state.blocksize, state.shape, state.dtype)


def _cpu_kernel_blocks_by_row(shape, blocksize) -> bool:
    # bitsandbytes 0.50's AVX512 dequantize_4bit indexes absmax per row on this path (see
    # quant4.dequantize_4bit), so its output there is not the flat-block format.
    last = shape[-1]
    return last % 16 == 0 and last % blocksize != 0 and blocksize < 2048


def _from_bitsandbytes_state(packed, state) -> quant4.Int4Weight:
    """An Int4Weight from the tensors a bitsandbytes checkpoint stores, taken as they are."""
    nested = {}
    if state.nested:
        nested = dict(
            nested_absmax=jnp.asarray(state.state2.absmax.numpy()),
            nested_code=jnp.asarray(state.state2.code.numpy()),
            offset=jnp.asarray(state.offset.numpy()),
        )
    return quant4.Int4Weight(
        packed=jnp.asarray(packed.numpy()),
        absmax=jnp.asarray(state.absmax.numpy()),
        shape=tuple(state.shape),
        quant_type=state.quant_type,
        blocksize=state.blocksize,
        dtype=jnp.dtype(str(state.dtype).removeprefix("torch.")),
        **nested,
    )


def test_code_books_equal_bitsandbytes():
    for quant_type in quant4.QUANT_TYPES:
        theirs = bnb_functional.get_4bit_type(quant_type, device="cpu").numpy()
        np.testing.assert_array_equal(_bits(quant4.code_book(quant_type)), _bits(theirs))
    np.testing.assert_array_equal(_bits(quant4.DYNAMIC_MAP), _bits(bnb_functional.create_dynamic_map().numpy()))


@pytest.mark.parametrize("shape,blocksize", CASES)
@pytest.mark.parametrize("dtype_name", sorted(TORCH_DTYPES))
@pytest.mark.parametrize("quant_type", quant4.QUANT_TYPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_4bit_equals_bitsandbytes(rng, shape, blocksize, dtype_name, quant_type, double_quant):
    torch_w, jax_w = _source(shape, dtype_name, rng)
    packed, state = bnb_functional.quantize_4bit(
        torch_w, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )
    ours = quant4.quantize_4bit(jax_w, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant)
    quant4.validate_int4_weight(ours)
    assert ours.packed.shape == tuple(packed.shape) == ((torch_w.numel() + 1) // 2, 1)
    np.testing.assert_array_equal(np.asarray(ours.packed), packed.numpy())
    if double_quant:
        # Only the offset may differ: jnp's and torch's float32 means sum in different orders.
        # Both sum positive values, so each is within (blocks - 1) * u of the exact sum, plus one
        # rounding for the division: |ours - theirs| <= 2 * (blocks + 1) * u * mean, u = 2^-24.
        blocks = state.absmax.numel()
        np.testing.assert_allclose(float(ours.offset), state.offset.item(), rtol=2 * (blocks + 1) * 2.0**-24)
        ours = quant4.quantize_4bit(
            jax_w, quant_type=quant_type, blocksize=blocksize, double_quant=True, offset=state.offset.numpy()
        )
        np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
        np.testing.assert_array_equal(_bits(ours.nested_absmax), _bits(state.state2.absmax.numpy()))
        np.testing.assert_array_equal(_bits(ours.nested_code), _bits(state.state2.code.numpy()))
        assert ours.absmax.dtype == jnp.uint8
    else:
        np.testing.assert_array_equal(_bits(ours.absmax), _bits(state.absmax.numpy()))

    reference = _reference_dequantize(packed, state)
    got = quant4.dequantize_4bit(ours)
    assert got.dtype == jax_w.dtype and got.shape == shape
    np.testing.assert_array_equal(_bits(got).reshape(-1), _torch_bits(reference).reshape(-1))
    stored = quant4.dequantize_4bit(_from_bitsandbytes_state(packed, state))
    np.testing.assert_array_equal(_bits(stored), _bits(got))
    if not _cpu_kernel_blocks_by_row(shape, blocksize):
        # The dispatched CPU kernel (C++ here) agrees in value; its scalar table stores FP4's code 8
        # as -0.0, so compare values, not bits.
        dispatched = bnb_functional.dequantize_4bit(packed, state).float().numpy()
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)).reshape(-1), dispatched.reshape(-1))


@pytest.mark.parametrize("quant_type", quant4.QUANT_TYPES)
def test_quantize_4bit_under_jit_equals_eager(rng, quant_type):
    _, jax_w = _source((24, 70), "bfloat16", rng)
    eager = quant4.quantize_4bit(jax_w, quant_type=quant_type, blocksize=64)
    # The offset is passed in: XLA's fused mean may sum in another order than the eager one.
    quantize = jax.jit(lambda w, offset: quant4.quantize_4bit(w, quant_type=quant_type, blocksize=64, offset=offset))
    jitted = quantize(jax_w, eager.offset)
    for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    np.testing.assert_array_equal(_bits(jax.jit(quant4.dequantize_4bit)(jitted)), _bits(eager.dequantize()))


def test_functional_4bit_follows_bitsandbytes_defaults(rng):
    torch_w, jax_w = _source((12, 40), "float16", rng)
    packed, state = bnb_functional.quantize_4bit(torch_w)  # fp4, blocksize 64, no double quantization
    ours_packed, ours_state = F.quantize_4bit(jax_w)
    assert (ours_state.quant_type, ours_state.blocksize, ours_state.double_quant) == ("fp4", 64, False)
    np.testing.assert_array_equal(np.asarray(ours_packed), packed.numpy())
    reference = _torch_bits(_reference_dequantize(packed, state))
    np.testing.assert_array_equal(_bits(F.dequantize_4bit(ours_packed, ours_state)), reference.reshape(12, 40))
    from_absmax = F.dequantize_4bit(ours_packed, absmax=ours_state.absmax, shape=(12, 40), dtype=jnp.float16)
    np.testing.assert_array_equal(_bits(from_absmax), reference.reshape(12, 40))
    with pytest.raises(InvalidConfigError, match="absmax and shape"):
        F.dequantize_4bit(ours_packed, absmax=ours_state.absmax)


def test_int4_weight_is_a_pytree_with_static_metadata(rng):
    w = quant4.quantize_4bit(jnp.asarray(rng.standard_normal((9, 64)), jnp.float32), quant_type="fp4", blocksize=32)
    leaves, treedef = jax.tree.flatten(w)
    assert [leaf.dtype for leaf in leaves] == [jnp.uint8, jnp.uint8, jnp.float32, jnp.float32, jnp.float32]
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert (rebuilt.shape, rebuilt.quant_type, rebuilt.blocksize, rebuilt.dtype) == ((9, 64), "fp4", 32, jnp.float32)
    # 288 bytes of codes, 18 absmax codes, 1 nested absmax, the 256-entry map, the offset.
    assert w.nbytes == 288 + 18 + 4 + 1024 + 4


def test_validate_int4_weight_names_the_field(rng):
    w = quant4.quantize_4bit(jnp.ones((4, 64), jnp.float32), double_quant=False)
    with pytest.raises(ShapeError, match=r"q\.absmax: shape \(3,\) must be \(4,\)"):
        quant4.validate_int4_weight(w.replace(absmax=jnp.ones(3, jnp.float32)), "q")
    with pytest.raises(ShapeError, match=r"q\.packed"):
        quant4.validate_int4_weight(w.replace(shape=(4, 66)), "q")
    with pytest.raises(InvalidConfigError, match=r"q: blocksize=48"):
        quant4.validate_int4_weight(w.replace(blocksize=48), "q")


def test_quantize_4bit_refuses_bad_input():
    with pytest.raises(QuantizationError, match="int8"):
        quant4.quantize_4bit(jnp.ones((4, 4), jnp.int8))
    with pytest.raises(InvalidConfigError, match="blocksize=16"):
        quant4.quantize_4bit(jnp.ones((4, 4)), blocksize=16)
    with pytest.raises(InvalidConfigError, match="quant_type='int4'"):
        F.quantize_4bit(jnp.ones((4, 4)), quant_type="int4")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("quant_type", "int4", r"Int4Config\.quant_type='int4' must be one of \('nf4', 'fp4'\)"),
        ("blocksize", 48, r"Int4Config\.blocksize=48 must be one of"),
        ("blocksize", 8192, r"Int4Config\.blocksize=8192"),
        ("blocksize", True, r"Int4Config\.blocksize=True"),
        ("double_quant", "yes", r"Int4Config\.double_quant='yes' must be a bool"),
        ("compute_dtype", "int8", r"Int4Config\.compute_dtype='int8'"),
        ("compute_dtype", "not-a-dtype", r"Int4Config\.compute_dtype='not-a-dtype'"),
        ("skip_modules", ["lm_head", 3], r"Int4Config\.skip_modules=.* must be strings"),
    ],
)
def test_int4_config_rejects_bad_fields(field, value, message):
    with pytest.raises(InvalidConfigError, match=message):
        jint8.Int4Config(**{field: value})


def test_int4_config_defaults_and_normalisation():
    assert jint8.Int4Config() == jint8.Int4Config("nf4", 64, True, None, ("lm_head",))
    cfg = jint8.Int4Config(quant_type="fp4", blocksize=4096, compute_dtype="bfloat16", skip_modules="re:.*head")
    assert cfg.compute_dtype == jnp.bfloat16 and cfg.skip_modules == ("re:.*head",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.blocksize = 64
