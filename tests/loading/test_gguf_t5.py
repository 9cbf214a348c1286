"""T5 GGUF files, written the way llama.cpp's convert_hf_to_gguf.py writes them (enc.blk.* /
dec.blk.*, token_embd for `shared`, output for a T5 v1.1 head), load to the same model and
logits as the safetensors checkpoint of the same weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module

import jint8
from jint8.errors import UnsupportedArchitectureError

# the duplicates of `shared` transformers' state_dict lists; llama.cpp keeps one as token_embd
_EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def _torch_t5(variant: str):
    """A random tiny T5 (ReLU, tied head) or T5 v1.1 (gated GELU, own lm_head); GGUF stores no
    relative_attention_max_distance, so it keeps transformers' (and llama.cpp's) 128."""
    torch = require_module("torch")
    transformers = require_module("transformers")
    torch.manual_seed(0)
    gated = variant == "t5_v1_1"
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   feed_forward_proj="gated-gelu" if gated else "relu", tie_word_embeddings=not gated)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param)) if param.ndim == 1 else None
        if gated:
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight))
    return model


def _state(model) -> dict[str, np.ndarray]:
    """The tensors a checkpoint stores; T5 v1.1's has its own lm_head.weight (transformers 5 sets
    tie_word_embeddings for both variants: the gated feed-forward tells them apart here)."""
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items() if k not in _EMBED_COPIES}
    if not model.config.is_gated_act:
        state.pop("lm_head.weight")
    return state


def _write_safetensors(model, directory) -> None:
    from safetensors.numpy import save_file

    directory.mkdir()
    save_file({k: np.ascontiguousarray(v) for k, v in _state(model).items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    model.config.save_pretrained(directory)


def _write_gguf(model, path, arch: str = "t5") -> None:
    """convert_hf_to_gguf.py T5Model's metadata and tensor names (float32 tensors)."""
    gguf = require_module("gguf")
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(512)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_decoder_block_count(cfg.num_decoder_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_key_length(cfg.d_kv)
    writer.add_value_length(cfg.d_kv)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_decoder_start_token_id(cfg.decoder_start_token_id)
    writer.add_vocab_size(cfg.vocab_size)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5, max(cfg.num_layers, cfg.num_decoder_layers))
    for name, data in _state(model).items():
        base, _, suffix = name.rpartition(".")
        writer.add_tensor(f"{name_map.get_name(base)}.{suffix}", np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("variant", ["t5", "t5_v1_1"])
def test_t5_gguf_loads_the_safetensors_model_and_logits(variant, tmp_path):
    torch_model = _torch_t5(variant)
    _write_safetensors(torch_model, tmp_path / "safetensors")
    _write_gguf(torch_model, tmp_path / f"{variant}.gguf")
    model, params = jint8.from_pretrained(tmp_path / f"{variant}.gguf", dtype=jnp.float32, progress=False)
    expected_model, expected = jint8.from_pretrained(tmp_path / "safetensors", dtype=jnp.float32, progress=False)
    # feed-forward kind, head tying (and the T5 head's d_model**-0.5 scaling) and the decoder's
    # own depth, read from the tensors and the file's decoder_block_count
    assert (model.config.gated, model.config.dense_act_fn, model.config.tie_word_embeddings,
            model.config.scale_decoder_outputs, model.config.num_decoder_layers) == (
        expected_model.config.gated, expected_model.config.dense_act_fn, expected_model.config.tie_word_embeddings,
        expected_model.config.scale_decoder_outputs, 3)
    assert ("lm_head" in params) is (variant == "t5_v1_1")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, expected)
    rng = np.random.RandomState(0)
    ids, decoder_ids = rng.randint(2, 96, (2, 9)), rng.randint(2, 96, (2, 5))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    args = (jnp.asarray(ids), jnp.asarray(decoder_ids), jnp.asarray(mask))
    logits = np.asarray(model.apply({"params": params}, *args))
    np.testing.assert_array_equal(logits, np.asarray(expected_model.apply({"params": expected}, *args)))


def test_t5_encoder_only_gguf_is_refused(tmp_path):
    require_module("torch")
    path = tmp_path / "encoder.gguf"
    _write_gguf(_torch_t5("t5_v1_1"), path, arch="t5encoder")
    with pytest.raises(UnsupportedArchitectureError, match="encoder.gguf.*encoder-only"):
        jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
