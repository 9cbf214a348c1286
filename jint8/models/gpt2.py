"""GPT-2: learned positions, pre-LayerNorm blocks, fused q/k/v (c_attn), GELU(tanh) MLP, tied head.

transformers stores GPT-2's Conv1D weights as [in, out] (already Flax's kernel layout); the
family's name rules (SPEC.name_rules.conv1d_modules) say so.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jint8.errors import InvalidConfigError, UnsupportedArchitectureError
from jint8.layers import Int8Dense, Int8Embed
from jint8.models.common import CausalLM, KVCache, activation, cached_attention
from jint8.models.spec import ModelSpec, NameRules, ShardingRules


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """GPT-2 hyper-parameters; num_kv_heads == num_heads (no GQA); `dtype` is the compute dtype."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    intermediate_size: int
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu_new"
    tie_word_embeddings: bool = True
    model_type: str = "gpt2"
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise InvalidConfigError(
                f"GPT2Config.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        activation(self.hidden_act)

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf_config, dtype=jnp.bfloat16, **overrides) -> "GPT2Config":
        if getattr(hf_config, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedArchitectureError(
                "GPT-2 with scale_attn_by_inverse_layer_idx=True is not supported")
        fields = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.n_embd,
            num_layers=hf_config.n_layer,
            num_heads=hf_config.n_head,
            max_position_embeddings=hf_config.n_positions,
            intermediate_size=hf_config.n_inner or 4 * hf_config.n_embd,
            layer_norm_eps=hf_config.layer_norm_epsilon,
            hidden_act=hf_config.activation_function,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            dtype=dtype,
        )
        fields.update(overrides)
        return cls(**fields)


def _dense(cfg: GPT2Config, features: int, name: str) -> Int8Dense:
    return Int8Dense(features, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


def _layer_norm(cfg: GPT2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


class GPT2Block(nn.Module):
    """x += attn(ln_1(x)); x += mlp(ln_2(x))."""

    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, x, cache: Optional[KVCache], cache_index, kv_mask):
        cfg = self.config
        out, cache = GPT2Attention(cfg, self.layer, name="attn")(_layer_norm(cfg, "ln_1")(x), cache,
                                                                 cache_index, kv_mask)
        x = x + out
        h = _layer_norm(cfg, "ln_2")(x)
        return x + GPT2MLP(cfg, name="mlp")(h), cache


class GPT2Attention(nn.Module):
    config: GPT2Config
    layer: int

    @nn.compact
    def __call__(self, h, cache, cache_index, kv_mask):
        cfg = self.config
        b, t, d = h.shape
        q, k, v = jnp.split(_dense(cfg, 3 * d, "c_attn")(h), 3, axis=-1)
        shape = (b, t, cfg.num_heads, cfg.head_dim)
        out, cache = cached_attention(q.reshape(shape), k.reshape(shape), v.reshape(shape), layer=self.layer,
                                      cache=cache, cache_index=cache_index, kv_mask=kv_mask,
                                      scale=1.0 / math.sqrt(cfg.head_dim))
        return _dense(cfg, d, "c_proj")(out.reshape(b, t, d)), cache


class GPT2MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        return _dense(cfg, cfg.hidden_size, "c_proj")(activation(cfg.hidden_act)(_dense(cfg, cfg.intermediate_size, "c_fc")(h)))


class GPT2Model(nn.Module):
    config: GPT2Config

    def setup(self):
        cfg = self.config
        self.wte = Int8Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.dtype)
        self.wpe = Int8Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.dtype)
        self.h = [GPT2Block(cfg, i) for i in range(cfg.num_layers)]
        self.ln_f = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.dtype)

    def __call__(self, input_ids, positions, cache, cache_index, kv_mask):
        x = self.wte(input_ids) + self.wpe(positions)
        for block in self.h:
            x, cache = block(x, cache, cache_index, kv_mask)
        return self.ln_f(x), cache

    def attend(self, hidden):
        return self.wte.attend(hidden)


class GPT2LMHeadModel(CausalLM):
    """input_ids [B, T] -> (logits [B, T, vocab] float32, cache); same interface as LlamaForCausalLM."""

    BACKBONE = GPT2Model
    BACKBONE_NAME = "transformer"
    config: GPT2Config


SPEC = ModelSpec(
    model_types=("gpt2",),
    model_class=GPT2LMHeadModel,
    config_class=GPT2Config,
    name_rules=NameRules(
        list_modules=("h",),
        conv1d_modules=("c_attn", "c_proj", "c_fc"),
        ignored=(r"\.attn\.bias$", r"\.attn\.masked_bias$"),  # causal-mask buffers of old checkpoints
        optional_prefixes=("transformer.",),  # GPT2Model saves (the original "gpt2" files) lack it
    ),
    # c_attn is q|k|v in one Conv1D; c_proj is the output projection of attention and MLP alike
    sharding=ShardingRules(
        column_parallel=("c_attn", "c_fc", "lm_head"),
        row_parallel=("c_proj",),
        vocab_parallel=("wte",),
    ),
)
