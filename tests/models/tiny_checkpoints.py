"""Tiny random transformers models of every family, saved as checkpoints in a tmp dir.

Every parameter (biases and norm weights included) is drawn at random so that no code path is
hidden behind a zero bias or a unit norm weight.
"""

from __future__ import annotations

import numpy as np

BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)


def hf_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**BASE, attention_bias=True, mlp_bias=True)
    if family == "llama3_rope":
        return tf.LlamaConfig(**BASE, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16, "rope_theta": 500000.0})
    if family == "mistral":
        return tf.MistralConfig(**BASE, sliding_window=4)
    if family == "qwen2":
        return tf.Qwen2Config(**BASE)
    if family == "qwen3":
        return tf.Qwen3Config(**BASE, head_dim=16)
    if family == "smollm2":  # tied embeddings, 1 kv head like SmolLM2's GQA ratio 3
        return tf.LlamaConfig(**{**BASE, "num_attention_heads": 4, "num_key_value_heads": 1},
                              tie_word_embeddings=True)
    if family == "gemma":
        return tf.GemmaConfig(**BASE, head_dim=16)
    if family == "gemma2":
        return tf.Gemma2Config(**BASE, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=256, max_position_embeddings=64, word_embed_proj_dim=64)
    if family == "bloom":
        return tf.BloomConfig(hidden_size=64, n_layer=2, n_head=4, vocab_size=256)
    falcon = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=256, ffn_hidden_size=128)
    if family == "falcon_7b":  # multi-query, parallel attention + MLP off one input_layernorm, rotary
        return tf.FalconConfig(**falcon, multi_query=True, parallel_attn=True)
    if family == "falcon_new":  # grouped KV heads, ln_attn / ln_mlp, rotary, biases
        return tf.FalconConfig(**falcon, new_decoder_architecture=True, num_kv_heads=2, bias=True,
                               tie_word_embeddings=False)
    if family == "falcon_rw":  # per-head q/k/v, sequential LayerNorms, ALiBi, biases
        return tf.FalconConfig(**falcon, multi_query=False, parallel_attn=False, alibi=True, bias=True)
    raise ValueError(family)


def torch_model(family: str, seed: int = 0):
    """A random transformers causal LM of `family`, float32, eval mode."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    config = hf_config(family)
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:  # biases and norm weights: random around their init
                param.add_(0.1 * torch.randn_like(param))
    return model


def save_checkpoint(family: str, directory, seed: int = 0):
    """Save a random model with safetensors; returns the torch model."""
    model = torch_model(family, seed)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def random_ids(batch: int, length: int, vocab: int = 256, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


def torch_logits(model, ids: np.ndarray, attention_mask=None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if attention_mask is None else {"attention_mask": torch.tensor(attention_mask)}
        return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.float().numpy()
