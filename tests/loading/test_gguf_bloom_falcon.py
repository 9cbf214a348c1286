"""GGUF files of BLOOM and Falcon, written the way llama.cpp's convert_hf_to_gguf.py writes them
(BLOOM's attn_qkv reordered to q | k | v), load to the model they came from."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from reference import require_module
from tiny_checkpoints import random_ids, torch_logits

import jint8
from jint8.errors import UnsupportedArchitectureError


def _random_torch_model(family: str):
    torch = require_module("torch")
    transformers = require_module("transformers")
    torch.manual_seed(0)
    if family == "bloom":
        config = transformers.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256)
    else:  # transformers' GGUF config reader sets no ffn_hidden_size: it must be the 4 * hidden default
        config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=256, new_decoder_architecture=family == "falcon_new",
                                           num_kv_heads=2 if family == "falcon_new" else None)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def _llama_cpp_bloom_qkv(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py BloomModel.modify_tensors: per-head [q, k, v] rows to q | k | v."""
    per_head = weights.reshape(num_heads, 3, weights.shape[0] // num_heads // 3, *weights.shape[1:])
    return np.concatenate([per_head[:, i].reshape(-1, *weights.shape[1:]) for i in range(3)], axis=0)


def _write_gguf(torch_model, path, arch: str) -> None:
    gguf = require_module("gguf")
    cfg = torch_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    if arch == "falcon":
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_feed_forward_length(cfg.ffn_hidden_size)
        writer.add_head_count_kv(cfg.num_kv_heads if cfg.new_decoder_architecture else 1)
        writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    for hf_name, tensor in torch_model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied
        data = tensor.detach().float().numpy()
        if arch == "bloom" and "query_key_value" in hf_name:
            data = _llama_cpp_bloom_qkv(data, cfg.n_head)
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base) or name_map.get_name(base.split(".", 1)[1])
        writer.add_tensor(f"{gguf_base}.{suffix}", np.ascontiguousarray(data, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("family, arch", [("bloom", "bloom"), ("falcon_7b", "falcon")])
def test_float32_gguf_logits_equal_the_torch_model(family, arch, tmp_path):
    torch_model = _random_torch_model(family)
    path = tmp_path / f"{family}.gguf"
    _write_gguf(torch_model, path, arch)
    model, params = jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
    ids = random_ids(2, 9)
    logits, _ = model.apply({"params": params}, jnp.asarray(ids))
    expected = torch_logits(torch_model, ids)
    # float32 both sides, the Llama GGUF test's F32 bound
    assert np.max(np.abs(np.asarray(logits) - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_new_decoder_architecture_falcon_gguf_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "falcon40b-style.gguf"
    _write_gguf(_random_torch_model("falcon_new"), path, "falcon")
    with pytest.raises(UnsupportedArchitectureError, match="falcon40b-style.gguf.*new-decoder-architecture"):
        jint8.from_pretrained(path, dtype=jnp.float32, progress=False)
