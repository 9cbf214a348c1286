"""T5 (original, tied head scaled by d_model**-0.5) and T5 v1.1 (gated-GELU, own lm_head): logits
equal transformers' PyTorch forward, encoder-decoder greedy generation equal to transformers'
generate, incremental decoder steps equal to the full decoder forward, int8 within the families'
bound with an Orbax round trip, a bitsandbytes 8-bit T5 checkpoint, and refused configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from reference import require_module
from test_model_parity import FLOAT_RTOL, INT8_RTOL, relative_error

import jint8
from jint8 import GenerationConfig, generate
from jint8.errors import InvalidConfigError, UnsupportedArchitectureError
from jint8.models import T5Config, T5ForConditionalGeneration

VOCAB = 96
# the stored duplicates of `shared` that transformers' state_dict lists (the file holds `shared`)
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _hf_config(variant: str, **fields):
    transformers = require_module("transformers")
    gated = variant == "t5_v1_1"
    return transformers.T5Config(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20,
        feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated,
        decoder_start_token_id=0, **fields)


def _torch_t5(variant: str, directory, weight_scale: float = 4.0, **fields):
    """A random T5 (matrices scaled by weight_scale: 4 gives greedy decoding clear argmax margins,
    so float32 summation-order differences cannot flip a token), saved as transformers 5
    saves it: config.json says tie_word_embeddings=true for both variants, and v1.1's file carries
    its own lm_head.weight."""
    torch = require_module("torch")
    from safetensors.torch import save_file

    transformers = require_module("transformers")
    torch.manual_seed(0)
    config = _hf_config(variant, **fields)
    config._attn_implementation = "eager"
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(weight_scale) if param.ndim == 2 else param.add_(0.1 * torch.randn_like(param))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in _EMBED_COPIES}
    if variant == "t5_v1_1":
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
        state["lm_head.weight"] = model.lm_head.weight.detach().clone()
    else:
        state.pop("lm_head.weight")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    return model


def _inputs():
    rng = np.random.RandomState(0)
    ids = rng.randint(2, VOCAB, (2, 9)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding, as T5's tokenizer pads
    return ids, mask


@pytest.fixture(scope="module", params=["t5", "t5_v1_1"])
def t5_checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    torch_model = _torch_t5(request.param, directory)
    model, params = jint8.from_pretrained(directory, dtype=jnp.float32, progress=False)
    return request.param, directory, torch_model, model, params


def _torch_logits(torch_model, ids, mask, decoder_ids):
    torch = require_module("torch")
    with torch.no_grad():
        return torch_model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                           decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long)).logits.numpy()


def test_t5_forward_generate_and_cache_equal_transformers(t5_checkpoint):
    torch = require_module("torch")
    variant, directory, torch_model, model, params = t5_checkpoint
    # transformers 5 writes tie_word_embeddings=true for v1.1 too: the stored lm_head decides
    assert json.loads((directory / "config.json").read_text())["tie_word_embeddings"] is True
    assert model.config.tie_word_embeddings is (variant == "t5")
    assert ("lm_head" in params) is (variant == "t5_v1_1")
    assert model.config.scale_decoder_outputs is (variant == "t5")
    ids, mask = _inputs()
    with torch.no_grad():
        greedy = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                                      max_new_tokens=16, do_sample=False).numpy()
    result = generate(model, params, ids, mask, GenerationConfig(max_new_tokens=16))
    assert greedy.shape == (2, 17)  # no eos within 16 tokens: both ran the whole loop
    np.testing.assert_array_equal(result.sequences, greedy)
    # sampling restricted to the top token is greedy again (the sampled route through the loop)
    sampled = generate(model, params, ids, mask, GenerationConfig(max_new_tokens=16, do_sample=True, top_k=1, seed=3))
    np.testing.assert_array_equal(sampled.sequences, greedy)

    decoder_ids = greedy[:, :10]
    forward = jax.jit(lambda p, *args: model.apply({"params": p}, *args))
    full = np.asarray(forward(params, jnp.asarray(ids), jnp.asarray(decoder_ids), jnp.asarray(mask)))
    assert relative_error(full, _torch_logits(torch_model, ids, mask, decoder_ids)) <= FLOAT_RTOL
    # one decoder token per step through the static cache (cross-attention keys/values projected
    # once by init_cache) equals the full decoder forward at every position
    variables = {"params": params}
    encoded = model.apply(variables, jnp.asarray(ids), jnp.asarray(mask), method="encode")
    cache = model.apply(variables, encoded, jnp.asarray(mask), 16, method="init_cache")
    step_fn = jax.jit(lambda p, token, cache, index: model.apply({"params": p}, token, cache, index, method="decode"))
    for step in range(decoder_ids.shape[1]):
        step_logits, cache = step_fn(params, jnp.asarray(decoder_ids[:, step:step + 1]), cache, step)
        assert relative_error(step_logits[:, 0], full[:, step]) <= FLOAT_RTOL, step


def test_t5_int8_within_bound_fused_and_orbax_round_trip(tmp_path):
    # v1.1: every projection kind (gated feed-forward, own lm_head) and every fusion
    variant = "t5_v1_1"
    # unscaled weights (transformers' init): the 4x weights the generation test uses make T5's
    # unscaled attention logits 16x larger and its softmax nearly one-hot, where one int8 rounding
    # can move a whole attention row; the families' bound is derived for weights like these
    torch_model = _torch_t5(variant, tmp_path, weight_scale=1.0)
    quantization = jint8.Int8Config(threshold=6.0)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False, quantization=quantization)
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jint8.Int8Weight))
    # encoder 2 x (q, k, v, o, wi_0, wi_1, wo), decoder 2 x (8 attention + the feed-forward), lm_head
    assert sum(isinstance(leaf, jint8.Int8Weight) for leaf in leaves) == 2 * (4 + 3) + 2 * (8 + 3) + 1
    ids, mask = _inputs()
    decoder_ids = np.random.RandomState(2).randint(2, VOCAB, (2, 5)).astype(np.int32)
    forward = jax.jit(model.apply)
    logits = forward({"params": params}, jnp.asarray(ids), jnp.asarray(decoder_ids), jnp.asarray(mask))
    assert relative_error(logits, _torch_logits(torch_model, ids, mask, decoder_ids)) <= INT8_RTOL
    # self-attention q|k|v, cross-attention k|v and v1.1's wi_0|wi_1 fused: one matmul each reads
    # the same input, so LLM.int8()'s row scales and outlier columns are the parts' own: exact
    fused = jint8.fuse_projections(params)
    assert {"qkv", "o"} <= set(fused["decoder"]["block_1"]["layer_0"]["SelfAttention"])
    assert set(fused["decoder"]["block_1"]["layer_1"]["EncDecAttention"]) == {"q", "kv", "o"}
    assert set(fused["encoder"]["block_0"]["layer_1"]["DenseReluDense"]) == {"wi_01", "wo"}
    np.testing.assert_array_equal(
        forward({"params": fused}, jnp.asarray(ids), jnp.asarray(decoder_ids), jnp.asarray(mask)), logits)
    # transformers + bitsandbytes keep wo float (_keep_in_fp32_modules) and could not read an int8 one
    with pytest.raises(InvalidConfigError, match=r"wo.*skip_modules=\('wo',\)"):
        jint8.export_bitsandbytes(model, params, tmp_path / "bnb", hf_config=_hf_config(variant))
    jint8.save_quantized(tmp_path / "ckpt", params, quant_config=quantization, model_config=model.config)
    restored_model, restored = jint8.from_pretrained(tmp_path / "ckpt")
    assert isinstance(restored_model, T5ForConditionalGeneration) and restored_model.config == model.config
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bnb_int8_t5_checkpoint_loads_as_stored(tmp_path):
    require_module("bitsandbytes")
    transformers = require_module("transformers")
    float_dir, bnb_dir = tmp_path / "float", tmp_path / "bnb8"
    float_dir.mkdir()
    _torch_t5("t5", float_dir, weight_scale=1.0)
    bnb_model = transformers.T5ForConditionalGeneration.from_pretrained(
        float_dir, quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    stored_q = bnb_model.encoder.block[0].layer[0].SelfAttention.q.weight
    stored_int8, stored_scale = stored_q.data.numpy().copy(), stored_q.SCB.numpy().copy()
    bnb_model.save_pretrained(bnb_dir)
    model, params = jint8.from_pretrained(bnb_dir, dtype=jnp.float32, progress=False)
    q = params["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]
    assert isinstance(q, jint8.Int8Weight) and q.threshold == 6.0
    np.testing.assert_array_equal(q.qvalue, stored_int8)
    np.testing.assert_array_equal(q.scale, stored_scale)
    # transformers leaves _keep_in_fp32_modules ("wo") out of the 8-bit conversion: stored float
    wo = params["encoder"]["block_0"]["layer_1"]["DenseReluDense"]["wo"]["kernel"]
    assert not isinstance(wo, jint8.Int8Weight) and wo.dtype == jnp.float32
    ids, mask = _inputs()
    decoder_ids = np.random.RandomState(2).randint(2, VOCAB, (2, 5)).astype(np.int32)
    logits = jax.jit(model.apply)({"params": params}, jnp.asarray(ids), jnp.asarray(decoder_ids), jnp.asarray(mask))
    # bitsandbytes' own LLM.int8() forward of the same int8 weights (the BLOOM test's bound: float
    # summation order and activations rounded to 1/127 differently where bitsandbytes casts to float16)
    assert relative_error(logits, _torch_logits(bnb_model, ids, mask, decoder_ids)) <= 1e-2


def test_float16_t5_keeps_wo_in_float32_and_clamps(tmp_path):
    """transformers' float16 T5: wo's parameters (as loaded) and matmul in float32, hidden states
    clamped to the float16 range after each sub-layer (an overflow becomes finfo.max - 1000).
    XLA:CPU has no float16 dot, so the float16 forward itself runs on GPUs only."""
    from jint8.models.t5 import _clamp_fp16

    _torch_t5("t5_v1_1", tmp_path)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float16, progress=False)
    dtypes = {path: leaf.dtype for path, leaf in flatten_dict(params).items()}
    assert {d for path, d in dtypes.items() if "wo" in path} == {jnp.dtype(jnp.float32)}
    assert {d for path, d in dtypes.items() if "wo" not in path} == {jnp.dtype(jnp.float16)}
    torch = require_module("torch")
    for values in ([np.inf, -np.inf, 1.0, 65504.0], [65504.0, -65504.0, 2.0, 3.0]):
        hidden = torch.tensor(values, dtype=torch.float16)
        # T5Block's clamp as transformers writes it (max - 1000 rounds to 64512 in float16)
        limit = torch.where(torch.isinf(hidden).any(), torch.finfo(torch.float16).max - 1000,
                            torch.finfo(torch.float16).max)
        expected = torch.clamp(hidden, min=-limit, max=limit).numpy()
        np.testing.assert_array_equal(np.asarray(_clamp_fp16(jnp.asarray(values, jnp.float16))), expected)


def test_jint8_generate_command_on_a_t5_checkpoint(tmp_path, capsys):
    tokenizers = require_module("tokenizers")
    transformers = require_module("transformers")
    from jint8 import cli

    _torch_t5("t5_v1_1", tmp_path)
    words = [c + v for c in "bcdfghjklmnpqrstvwxz" for v in "aeiou"][:VOCAB]
    vocabulary = {w: i for i, w in enumerate(words)}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocabulary, unk_token=words[2]))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    word_level.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    # T5's tokenizer closes every input with </s> (here words[1], the config's eos_token_id)
    word_level.post_processor = tokenizers.processors.TemplateProcessing(single=f"$A {words[1]}",
                                                                         special_tokens=[(words[1], 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token=words[0], eos_token=words[1],
                                         unk_token=words[2]).save_pretrained(tmp_path)
    prompt_ids = [3, 14, 15, 92, 65]
    argv = ["generate", "--model", str(tmp_path), "--prompt", " ".join(words[i] for i in prompt_ids),
            "--quantize", "none", "--dtype", "float32", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    result = generate(model, params, [prompt_ids + [1]], config=GenerationConfig(max_new_tokens=6))
    new = result.sequences[0, 1:1 + int(result.num_new_tokens[0])]
    expected = " ".join(words[t] for t in new if t not in (0, 1))
    assert expected and capsys.readouterr().out.strip() == expected


def test_t5_int8_sharded_over_a_mesh_equals_the_unsharded_load(tmp_path):
    _torch_t5("t5_v1_1", tmp_path, weight_scale=1.0)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = Path(jint8.__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("t5_sharded_script.py")), str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")


@pytest.mark.parametrize("field, value, message", [
    ("feed_forward_proj", "gated-mish", "feed_forward_proj='gated-mish'"),
    ("feed_forward_proj", "relu-gated", "feed_forward_proj='relu-gated'"),
    ("is_decoder", True, "is_decoder=True"),
])
def test_unsupported_t5_configs_are_refused_naming_the_field(field, value, message):
    hf = _hf_config("t5_v1_1")
    setattr(hf, field, value)  # after __post_init__, as a config.json would set it
    with pytest.raises(UnsupportedArchitectureError, match=message):
        T5Config.from_hf_config(hf)


def test_t5_runs_4bit_trees_as_their_dequantized_float_model(tmp_path):
    """NF4 on every T5 projection (loaded from the float checkpoint, quantized while loading)
    computes what the float model does with bitsandbytes' dequantized weights, and generates."""
    _torch_t5("t5_v1_1", tmp_path, weight_scale=1.0)
    model, params = jint8.from_pretrained(tmp_path, dtype=jnp.float32, progress=False,
                                          quantization=jint8.Int4Config(min_size=0))
    leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, jint8.Int4Weight))
    assert sum(isinstance(leaf, jint8.Int4Weight) for leaf in leaves) == 2 * (4 + 3) + 2 * (8 + 3)
    ids, mask = _inputs()
    decoder_ids = np.random.RandomState(3).randint(2, VOCAB, (2, 5)).astype(np.int32)
    args = (jnp.asarray(ids), jnp.asarray(decoder_ids), jnp.asarray(mask))
    logits = np.asarray(model.apply({"params": params}, *args))
    want = np.asarray(model.apply({"params": jint8.dequantize_params(params)}, *args))
    np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
    result = generate(model, params, ids, mask, GenerationConfig(max_new_tokens=3))
    assert result.sequences.shape == (2, 4)


def test_t5_cache_on_explicit_axes_keeps_its_heads_and_batch_sharded():
    """The cross-attention keys/values leave an Explicit-axis apply sharded like the self-attention
    cache (batch over "data", heads over "model"), not replicated on every device."""
    from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

    from jint8.models import explicit_axes
    from jint8.models.common import KVCache
    from jint8.models.t5 import T5Cache

    kv = jax.ShapeDtypeStruct((2, 4, 16, 8, 4), jnp.float32)  # [L, B, S or E, N, H]
    cache = T5Cache(KVCache(kv, kv), kv, kv, jax.ShapeDtypeStruct((4, 16), jnp.bool_))
    logits = jax.ShapeDtypeStruct((4, 1, 32), jnp.float32)
    mesh = AbstractMesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.sharding.use_abstract_mesh(mesh):
        got_logits, got = explicit_axes.output_specs((logits, cache))
    heads = P(None, "data", None, "model", None)
    assert got_logits == P()
    assert (got.self_attention.k, got.self_attention.v, got.cross_k, got.cross_v) == (heads,) * 4
    assert got.encoder_mask == P("data", None)
