"""4-bit embedding tables (Int4Config(quantize_embeddings=True)) against bitsandbytes 0.50's
nn.Embedding4bit on the CPU: the same codes and absmax for the same table, the same looked-up rows;
then the tree transforms, tied heads, the Orbax round trip and generate on a tiny Llama."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_quant4 import _bits, _cpu_kernel_blocks_by_row, _reference_dequantize, _torch_bits

import jint8
from jint8 import Int4Config, Int4Weight, dequantize_params, quantize_params
from jint8 import quant4
from jint8.errors import InvalidConfigError, ShapeError
from reference import require_module

torch = require_module("torch")
bnb = require_module("bitsandbytes")

# [V, H]: odd vocab sizes; H a multiple of the blocksize (Embedding4bit's row-gather path), H not
# a multiple (its whole-table path: blocks span rows), H odd (rows start mid-byte), and H = 96
# (bitsandbytes' AVX512 kernel indexes absmax per row there: its module's rows are wrong).
TABLES = [(37, 128), (29, 33), (17, 70), (41, 96)]


def _table(shape, dtype, seed):
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    w[0, :3] = 0  # exact zeros: FP4's zero split, NF4's code 7
    torch_w = torch.from_numpy(w).to(dtype)
    return torch_w, jnp.asarray(torch_w.float().numpy()).astype(str(dtype).removeprefix("torch."))


def _ids(vocab):
    return np.array([[0, 5 % vocab, vocab - 1], [3, 3, 1], [vocab // 2, 2, 0]], np.int64)


@pytest.mark.parametrize("shape", TABLES)
@pytest.mark.parametrize("quant_type", quant4.QUANT_TYPES)
def test_4bit_table_and_lookups_equal_bitsandbytes_embedding4bit(shape, quant_type):
    torch_w, jax_w = _table(shape, torch.bfloat16, sum(shape))
    module = bnb.nn.Embedding4bit(*shape, dtype=torch.bfloat16, quant_type=quant_type)
    # Embedding4bit's own Params4bit: blocksize 64, compress_statistics=None (no double quantization)
    module.weight = bnb.nn.Params4bit(torch_w.clone(), requires_grad=False, compress_statistics=None,
                                      quant_type=quant_type, module=module)
    module = module.to("cpu")  # quantizes
    state = module.weight.quant_state
    ours = quantize_params({"embed": {"embedding": jax_w}},
                           Int4Config(quant_type=quant_type, double_quant=False, quantize_embeddings=True,
                                      min_size=0, skip_modules=()))["embed"]["embedding"]
    assert isinstance(ours, Int4Weight) and ours.shape == shape and ours.blocksize == state.blocksize == 64
    np.testing.assert_array_equal(np.asarray(ours.packed), module.weight.data.numpy())
    np.testing.assert_array_equal(_bits(ours.absmax), _bits(state.absmax.numpy()))
    ids = _ids(shape[0])
    got = quant4.dequantize_4bit_rows(ours, jnp.asarray(ids))
    assert got.shape == (*ids.shape, shape[1]) and got.dtype == jnp.bfloat16
    # bitsandbytes' torch implementation of the whole table, then the rows: bit for bit
    reference = _torch_bits(_reference_dequantize(module.weight.data, state))[ids]
    np.testing.assert_array_equal(_bits(got), reference)
    looked_up = module(torch.from_numpy(ids))
    if shape[1] % 64 == 0:  # its row gather feeds dequantize_4bit whole blocks: bit for bit
        np.testing.assert_array_equal(_bits(got), _torch_bits(looked_up))
    elif not _cpu_kernel_blocks_by_row(shape, 64):
        # its whole-table path runs the CPU kernel, which stores FP4's code 8 as -0.0: values equal
        # (the AVX512 kernel's per-row absmax on H % 16 == 0 tables is a bitsandbytes bug, test_quant4)
        np.testing.assert_array_equal(np.asarray(got, np.float32), looked_up.float().numpy())


@pytest.mark.parametrize("shape", [(300, 64), (29, 33)])  # above one 256-block group, and below
@pytest.mark.parametrize("quant_type", quant4.QUANT_TYPES)
def test_double_quantized_table_lookups_equal_bitsandbytes_dequantize(shape, quant_type):
    # Embedding4bit never double-quantizes; its partial path would gather absmax codes out of
    # their 256-block groups. The truth is the whole table's dequantize_4bit, rows taken after.
    torch_w, jax_w = _table(shape, torch.float32, 7)
    packed, state = bnb.functional.quantize_4bit(torch_w, blocksize=64, compress_statistics=True, quant_type=quant_type)
    ours = quant4.quantize_4bit(jax_w, quant_type=quant_type, double_quant=True, offset=state.offset.numpy())
    np.testing.assert_array_equal(np.asarray(ours.packed), packed.numpy())
    np.testing.assert_array_equal(np.asarray(ours.absmax), state.absmax.numpy())
    np.testing.assert_array_equal(_bits(ours.nested_absmax), _bits(state.state2.absmax.numpy()))
    ids = _ids(shape[0])
    got = jax.jit(quant4.dequantize_4bit_rows)(ours, jnp.asarray(ids))
    np.testing.assert_array_equal(_bits(got), _torch_bits(_reference_dequantize(packed, state))[ids])
    np.testing.assert_array_equal(_bits(got), _bits(quant4.dequantize_4bit(ours))[ids])


def test_dequantize_4bit_rows_follows_jnp_take_and_refuses_bad_input():
    w = quant4.quantize_4bit(jnp.asarray(np.random.default_rng(1).standard_normal((9, 40)), jnp.float32),
                             double_quant=False)
    full = np.asarray(quant4.dequantize_4bit(w))
    got = np.asarray(quant4.dequantize_4bit_rows(w, jnp.asarray([-1, 9, 2])))
    np.testing.assert_array_equal(got[0], full[-1])  # negative ids count from the end, as jnp.take
    assert np.isnan(got[1]).all()  # out of range: NaN rows, as jnp.take of a float table
    np.testing.assert_array_equal(got[2], full[2])
    with pytest.raises(ShapeError, match="2-D table"):
        quant4.dequantize_4bit_rows(quant4.quantize_4bit(jnp.ones((2, 3, 4))), jnp.asarray([0]))
    with pytest.raises(ShapeError, match="ids must be integers"):
        quant4.dequantize_4bit_rows(w, jnp.asarray([0.0]))
    with pytest.raises(InvalidConfigError, match="quantize_embeddings='yes'"):
        Int4Config(quantize_embeddings="yes")


def _tree(rng):
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {"embed": {"embedding": f(100, 64)}, "up": {"kernel": f(64, 96)}, "lm_head": {"kernel": f(64, 100)}}


def test_quantize_params_makes_4bit_tables_only_when_asked(rng, caplog):
    params = _tree(rng)
    default = quantize_params(params, Int4Config(min_size=0))
    assert default["embed"]["embedding"] is params["embed"]["embedding"]  # bitsandbytes' default: 16-bit
    q = quantize_params(params, Int4Config(min_size=0, quantize_embeddings=True))
    table = q["embed"]["embedding"]
    assert isinstance(table, Int4Weight) and table.shape == (100, 64) and table.double_quant  # not transposed
    assert not isinstance(q["lm_head"]["kernel"], Int4Weight)
    np.testing.assert_array_equal(np.asarray(table.packed), np.asarray(quant4.quantize_4bit(params["embed"]["embedding"]).packed))
    back = dequantize_params(q)
    np.testing.assert_array_equal(np.asarray(back["embed"]["embedding"]), np.asarray(table.dequantize(jnp.float32)))
    assert jint8.param_bytes(default) - jint8.param_bytes(q) == 100 * 64 * 4 - table.nbytes
    # a tied table (no lm_head module) is the head: it stays 16-bit while lm_head is skipped
    tied = {k: v for k, v in params.items() if k != "lm_head"}
    with caplog.at_level(logging.WARNING, logger="jint8"):
        kept = quantize_params(tied, Int4Config(min_size=0, quantize_embeddings=True))
    assert kept["embed"]["embedding"] is tied["embed"]["embedding"] and "tied embedding table" in caplog.text
    assert isinstance(kept["up"]["kernel"], Int4Weight)
    unskipped = quantize_params(tied, Int4Config(min_size=0, quantize_embeddings=True, skip_modules=()))
    assert isinstance(unskipped["embed"]["embedding"], Int4Weight)


def _tied_llama():
    from jint8.models import LlamaConfig, LlamaForCausalLM

    # H = 72: rows are not whole 64-value blocks, so blocks span two token rows
    config = LlamaConfig(vocab_size=250, hidden_size=72, intermediate_size=96, num_layers=1, num_heads=4,
                         num_kv_heads=2, head_dim=18, tie_word_embeddings=True, dtype=jnp.float32)
    model = LlamaForCausalLM(config)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 250, (2, 6)), jnp.int32)
    return model, jax.jit(model.init)(jax.random.key(0), ids)["params"], ids


def test_tied_head_runs_int4_matmul_on_the_4bit_table_and_round_trips(tmp_path):
    model, params, ids = _tied_llama()
    config = Int4Config(min_size=0, quantize_embeddings=True, skip_modules=())  # the head 4-bit too
    q = jax.jit(lambda p: quantize_params(p, config))(params)  # one program: eager runs ~6x longer
    table = q["model"]["embed_tokens"]["embedding"]
    assert isinstance(table, Int4Weight) and table.shape == (250, 72)
    back = dequantize_params(q)
    # the lookup is exact (dequantize_4bit_rows = dequantize_4bit's rows); every other difference
    # is a float32 dot's summation order, the tied head's 4-bit matmul against the float one among them
    got, _ = model.apply({"params": q}, ids)
    want, _ = model.apply({"params": back}, ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    saved = jint8.save_quantized(tmp_path / "ckpt", q, quant_config=config)
    restored, info = jint8.load_quantized(saved)
    assert info.quant_config == config and info.quant_config.quantize_embeddings
    again = restored["model"]["embed_tokens"]["embedding"]
    assert (again.shape, again.quant_type, again.double_quant) == (table.shape, table.quant_type, True)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(q)):
        np.testing.assert_array_equal(_bits(a), _bits(b))
    # Embedding4bit has no checkpoint format (transformers keeps embeddings 16-bit): export refuses
    with pytest.raises(InvalidConfigError, match="embed_tokens/embedding is a 4-bit embedding"):
        jint8.export_bitsandbytes(model, q, tmp_path / "bnb")
