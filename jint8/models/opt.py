"""OPT: learned positions offset by 2, pre- (or, for opt-350m, post-) LayerNorm blocks, ReLU MLP,
optional project_in/project_out when word_embed_proj_dim != hidden_size, tied head."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jint8.errors import UnsupportedArchitectureError
from jint8.layers import Int8Dense, Int8Embed
from jint8.models.common import CausalLM, activation, cached_attention
from jint8.models.spec import ModelSpec, ShardingRules

# OPTLearnedPositionalEmbedding: row p + 2 holds position p (fairseq's padding offset)
POSITION_OFFSET = 2


@dataclasses.dataclass(frozen=True, kw_only=True)
class OPTConfig:
    """OPT hyper-parameters; num_kv_heads == num_heads; `dtype` is the compute dtype."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    use_bias: bool = True
    hidden_act: str = "relu"
    tie_word_embeddings: bool = True
    model_type: str = "opt"
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        activation(self.hidden_act)

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf_config, dtype=jnp.bfloat16, **overrides) -> "OPTConfig":
        if not getattr(hf_config, "layer_norm_elementwise_affine", True):
            raise UnsupportedArchitectureError("OPT with layer_norm_elementwise_affine=False is not supported")
        pre_norm = bool(hf_config.do_layer_norm_before)
        fields = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.ffn_dim,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            max_position_embeddings=hf_config.max_position_embeddings,
            word_embed_proj_dim=hf_config.word_embed_proj_dim or hf_config.hidden_size,
            do_layer_norm_before=pre_norm,
            final_layer_norm=pre_norm and not getattr(hf_config, "_remove_final_layer_norm", False),
            use_bias=bool(getattr(hf_config, "enable_bias", True)),
            hidden_act=hf_config.activation_function,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            dtype=dtype,
        )
        fields.update(overrides)
        return cls(**fields)


def _dense(cfg: OPTConfig, features: int, name: str, use_bias: Optional[bool] = None) -> Int8Dense:
    use_bias = cfg.use_bias if use_bias is None else use_bias
    return Int8Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


def _layer_norm(cfg: OPTConfig, name: Optional[str] = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


class OPTAttention(nn.Module):
    config: OPTConfig
    layer: int

    @nn.compact
    def __call__(self, h, cache, cache_index, kv_mask):
        cfg = self.config
        b, t, d = h.shape
        shape = (b, t, cfg.num_heads, cfg.head_dim)
        q = _dense(cfg, d, "q_proj")(h).reshape(shape)
        k = _dense(cfg, d, "k_proj")(h).reshape(shape)
        v = _dense(cfg, d, "v_proj")(h).reshape(shape)
        out, cache = cached_attention(q, k, v, layer=self.layer, cache=cache, cache_index=cache_index,
                                      kv_mask=kv_mask, scale=1.0 / math.sqrt(cfg.head_dim))
        return _dense(cfg, d, "out_proj")(out.reshape(b, t, d)), cache


class OPTDecoderLayer(nn.Module):
    """Pre-norm: x += attn(ln(x)); x += fc2(act(fc1(ln(x)))). Post-norm (opt-350m): ln after each add."""

    config: OPTConfig
    layer: int

    @nn.compact
    def __call__(self, x, cache, cache_index, kv_mask):
        cfg = self.config
        attn_norm, mlp_norm = _layer_norm(cfg, "self_attn_layer_norm"), _layer_norm(cfg, "final_layer_norm")
        h = attn_norm(x) if cfg.do_layer_norm_before else x
        out, cache = OPTAttention(cfg, self.layer, name="self_attn")(h, cache, cache_index, kv_mask)
        x = x + out
        if not cfg.do_layer_norm_before:
            x = attn_norm(x)
        h = mlp_norm(x) if cfg.do_layer_norm_before else x
        x = x + _dense(cfg, cfg.hidden_size, "fc2")(activation(cfg.hidden_act)(_dense(cfg, cfg.intermediate_size, "fc1")(h)))
        if not cfg.do_layer_norm_before:
            x = mlp_norm(x)
        return x, cache


class OPTDecoder(nn.Module):
    config: OPTConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Int8Embed(cfg.vocab_size, cfg.word_embed_proj_dim, dtype=cfg.dtype, param_dtype=cfg.dtype)
        self.embed_positions = Int8Embed(cfg.max_position_embeddings + POSITION_OFFSET, cfg.hidden_size,
                                        dtype=cfg.dtype, param_dtype=cfg.dtype)
        projected = cfg.word_embed_proj_dim != cfg.hidden_size
        if projected:
            self.project_in = _dense(cfg, cfg.hidden_size, "project_in", use_bias=False)
            self.project_out = _dense(cfg, cfg.word_embed_proj_dim, "project_out", use_bias=False)
        self.layers = [OPTDecoderLayer(cfg, i) for i in range(cfg.num_layers)]
        if cfg.final_layer_norm:
            self.final_layer_norm = _layer_norm(cfg)

    def __call__(self, input_ids, positions, cache, cache_index, kv_mask):
        cfg = self.config
        x = self.embed_tokens(input_ids)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            x = self.project_in(x)
        x = x + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            x, cache = layer(x, cache, cache_index, kv_mask)
        if cfg.final_layer_norm:
            x = self.final_layer_norm(x)
        if cfg.word_embed_proj_dim != cfg.hidden_size:
            x = self.project_out(x)
        return x, cache

    def attend(self, hidden):
        return self.embed_tokens.attend(hidden)


class OPTModel(nn.Module):
    config: OPTConfig

    def setup(self):
        self.decoder = OPTDecoder(self.config)

    def __call__(self, *args):
        return self.decoder(*args)

    def attend(self, hidden):
        return self.decoder.attend(hidden)


class OPTForCausalLM(CausalLM):
    """input_ids [B, T] -> (logits [B, T, vocab] float32, cache); same interface as LlamaForCausalLM."""

    BACKBONE = OPTModel
    config: OPTConfig


SPEC = ModelSpec(
    model_types=("opt",),
    model_class=OPTForCausalLM,
    config_class=OPTConfig,
    sharding=ShardingRules(
        column_parallel=("q_proj", "k_proj", "v_proj", "fc1", "lm_head"),
        row_parallel=("out_proj", "fc2"),
        vocab_parallel=("embed_tokens",),
    ),
)
