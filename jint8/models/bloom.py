"""BLOOM: ALiBi attention (no position embeddings), a LayerNorm after the word embeddings, one
fused query_key_value projection, GELU(tanh) MLP, pre-LayerNorm blocks, tied head.

query_key_value's output features are interleaved per head, [head][q, k, v][head_dim] (Megatron's
layout, as transformers reads it), so its kernel is kept as stored and its output split per head:
a bitsandbytes 8-bit checkpoint's int8 rows load as they are, and a column-parallel split keeps
whole heads on each device.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jint8.errors import InvalidConfigError
from jint8.layers import Int8Dense, Int8Embed
from jint8.models.alibi import alibi_slopes
from jint8.models.common import CausalLM, cached_attention
from jint8.models.spec import ModelSpec, NameRules, ShardingRules


@dataclasses.dataclass(frozen=True, kw_only=True)
class BloomConfig:
    """BLOOM hyper-parameters; num_kv_heads == num_heads; `dtype` is the compute dtype.

    residual_post_layernorm: transformers' apply_residual_connection_post_layernorm (the residual
    branch starts from the LayerNorm's output instead of its input).
    """

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-5
    residual_post_layernorm: bool = False
    tie_word_embeddings: bool = True
    model_type: str = "bloom"
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads"):
            if int(getattr(self, name)) <= 0:
                raise InvalidConfigError(f"BloomConfig.{name}={getattr(self, name)} must be > 0")
        if self.hidden_size % self.num_heads:
            raise InvalidConfigError(
                f"BloomConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def intermediate_size(self) -> int:
        return 4 * self.hidden_size

    @classmethod
    def from_hf_config(cls, hf_config, dtype=jnp.bfloat16, **overrides) -> "BloomConfig":
        # pretraining_tp / slow_but_exact only split transformers' dense matmuls into slices
        # summed in sequence (the same products, another float summation order): nothing to refuse.
        fields = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.n_layer,
            num_heads=hf_config.n_head,
            layer_norm_eps=float(hf_config.layer_norm_epsilon),
            residual_post_layernorm=bool(getattr(hf_config, "apply_residual_connection_post_layernorm", False)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            dtype=dtype,
        )
        fields.update(overrides)
        return cls(**fields)


def bloom_gelu(x: jax.Array) -> jax.Array:
    """transformers' bloom_gelu_forward: the tanh GELU with Megatron's constant 0.79788456."""
    return x * 0.5 * (1.0 + jnp.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _dense(cfg: BloomConfig, features: int, name: str) -> Int8Dense:
    return Int8Dense(features, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


def _layer_norm(cfg: BloomConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


class BloomAttention(nn.Module):
    config: BloomConfig
    layer: int

    @nn.compact
    def __call__(self, h, cache, cache_index, kv_mask):
        cfg = self.config
        b, t, d = h.shape
        qkv = _dense(cfg, 3 * d, "query_key_value")(h).reshape(b, t, cfg.num_heads, 3, cfg.head_dim)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        # transformers: alibi.baddbmm(q, k^T, beta=1, alpha=1/sqrt(H)): the bias is not scaled
        out, cache = cached_attention(q, k, v, layer=self.layer, cache=cache, cache_index=cache_index,
                                      kv_mask=kv_mask, scale=1.0 / math.sqrt(cfg.head_dim),
                                      alibi_slopes=alibi_slopes(cfg.num_heads))
        return _dense(cfg, d, "dense")(out.reshape(b, t, d)), cache


class BloomMLP(nn.Module):
    config: BloomConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        return _dense(cfg, cfg.hidden_size, "dense_4h_to_h")(bloom_gelu(_dense(cfg, cfg.intermediate_size, "dense_h_to_4h")(h)))


class BloomBlock(nn.Module):
    """x += attn(ln(x)); x += mlp(ln(x)) (residual_post_layernorm: the residual is ln(x))."""

    config: BloomConfig
    layer: int

    @nn.compact
    def __call__(self, x, cache, cache_index, kv_mask):
        cfg = self.config
        h = _layer_norm(cfg, "input_layernorm")(x)
        out, cache = BloomAttention(cfg, self.layer, name="self_attention")(h, cache, cache_index, kv_mask)
        x = (h if cfg.residual_post_layernorm else x) + out
        h = _layer_norm(cfg, "post_attention_layernorm")(x)
        return (h if cfg.residual_post_layernorm else x) + BloomMLP(cfg, name="mlp")(h), cache


class BloomModel(nn.Module):
    config: BloomConfig

    def setup(self):
        cfg = self.config
        self.word_embeddings = Int8Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.dtype)
        self.word_embeddings_layernorm = _layer_norm(cfg, "word_embeddings_layernorm")
        self.h = [BloomBlock(cfg, i) for i in range(cfg.num_layers)]
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(self, input_ids, positions, cache, cache_index, kv_mask):
        # positions are unused: ALiBi takes every position from the slots' kv_mask (alibi.py)
        x = self.word_embeddings_layernorm(self.word_embeddings(input_ids))
        for block in self.h:
            x, cache = block(x, cache, cache_index, kv_mask)
        return self.ln_f(x), cache

    def attend(self, hidden):
        return self.word_embeddings.attend(hidden)


class BloomForCausalLM(CausalLM):
    """input_ids [B, T] -> (logits [B, T, vocab] float32, cache); same interface as LlamaForCausalLM."""

    BACKBONE = BloomModel
    BACKBONE_NAME = "transformer"
    config: BloomConfig


SPEC = ModelSpec(
    model_types=("bloom",),
    model_class=BloomForCausalLM,
    config_class=BloomConfig,
    name_rules=NameRules(
        list_modules=("h",),
        optional_prefixes=("transformer.",),  # bigscience's BloomModel saves lack it
    ),
    sharding=ShardingRules(
        column_parallel=("query_key_value", "dense_h_to_4h", "lm_head"),
        row_parallel=("dense", "dense_4h_to_h"),
        vocab_parallel=("word_embeddings",),
    ),
)
