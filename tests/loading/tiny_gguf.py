"""Write a tiny llama.cpp-style GGUF (Q/K rows permuted as convert_hf_to_gguf.py does) from a torch model."""

from __future__ import annotations

import numpy as np


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_name(hf_name: str, name_map) -> str:
    base, _, suffix = hf_name.rpartition(".")
    return f"{name_map.get_name(base)}.{suffix}"


def write_llama_gguf(torch_model, path, *, quant: str = "Q8_0", tokens: bool = True, arch: str = "llama") -> None:
    """Projections in `quant` (Q8_0 / F16 / BF16 / F32 / Q4_0 / Q4_1), embeddings F16 (F32 and BF16
    files: as the projections), norms and biases F32. arch "llama" permutes Q/K rows like llama.cpp; "qwen2" does not."""
    import gguf

    cfg = torch_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    if tokens:
        writer.add_tokenizer_model("llama")
        writer.add_token_list([f"<t{i}>".encode() for i in range(cfg.vocab_size)])
        writer.add_token_scores([0.0] * cfg.vocab_size)
        writer.add_token_types([1] * cfg.vocab_size)
    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    name_map = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for hf_name, tensor in torch_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        if arch != "llama":
            pass
        elif hf_name.endswith("q_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            data = llama_cpp_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        name = _gguf_name(hf_name, name_map)
        if data.ndim == 1:
            writer.add_tensor(name, data.astype(np.float32))
        elif "embed_tokens" in hf_name and quant != "BF16":
            writer.add_tensor(name, data.astype(np.float32 if quant == "F32" else np.float16))
        elif quant in ("F32", "F16"):
            writer.add_tensor(name, data.astype(np.float32 if quant == "F32" else np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
