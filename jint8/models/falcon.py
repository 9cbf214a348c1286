"""Falcon in the variants transformers' FalconModel runs:

- 7B-style: multi-query attention (one key/value head), attention and MLP in parallel off one
  input_layernorm, rotary positions;
- the new decoder architecture (40B/180B): grouped key/value heads, ln_attn and ln_mlp (or one
  input_layernorm where num_ln_in_parallel_attn == 1), attention and MLP in parallel;
- falcon-rw-style: sequential blocks (input_layernorm, post_attention_layernorm), per-head q/k/v,
  ALiBi instead of rotary (alibi=True works with any of them).

The fused query_key_value kernel is kept as stored. All three of its layouts are one rule with the
layer's number of key/value heads K: for each key/value head, its G = N / K query heads, then its
key, then its value ([K][G + 2][head_dim]); multi-query is K = 1, per-head [q, k, v] is K = N.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import ml_dtypes
import jax.numpy as jnp
import numpy as np

from jint8.errors import InvalidConfigError, UnsupportedArchitectureError
from jint8.layers import Int8Dense, Int8Embed
from jint8.models.alibi import alibi_slopes
from jint8.models.common import (
    ACTIVATIONS,
    CausalLM,
    RopeConfig,
    activation,
    cached_attention,
    rope_inverse_frequencies,
    rope_tables,
)
from jint8.models.spec import ModelSpec, NameRules, ShardingRules

# The block's LayerNorms: sequential (input_layernorm before attention, post_attention_layernorm
# before the MLP), one shared input_layernorm for parallel attention + MLP, or ln_attn + ln_mlp.
NORM_LAYOUTS = ("sequential", "shared", "separate")


@dataclasses.dataclass(frozen=True, kw_only=True)
class FalconConfig:
    """Falcon hyper-parameters; `dtype` is the compute dtype.

    num_kv_heads: the key/value heads the layers produce and the cache stores (1 for multi-query).
    norm_layout: one of NORM_LAYOUTS; alibi: ALiBi biases instead of `rope`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    norm_layout: str = "shared"
    alibi: bool = False
    use_bias: bool = False
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = True
    model_type: str = "falcon"
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if int(getattr(self, name)) <= 0:
                raise InvalidConfigError(f"FalconConfig.{name}={getattr(self, name)} must be > 0")
        if self.hidden_size % self.num_heads:
            raise InvalidConfigError(
                f"FalconConfig.hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise InvalidConfigError(
                f"FalconConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.norm_layout not in NORM_LAYOUTS:
            raise InvalidConfigError(f"FalconConfig.norm_layout={self.norm_layout!r} must be one of {NORM_LAYOUTS}")
        activation(self.hidden_act)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf_config(cls, hf_config, dtype=jnp.bfloat16, **overrides) -> "FalconConfig":
        """Build from a transformers FalconConfig; combinations transformers' FalconModel cannot
        run (it raises or builds mismatched modules) are refused naming the field."""
        new_arch = bool(getattr(hf_config, "new_decoder_architecture", False))
        multi_query = bool(getattr(hf_config, "multi_query", True))
        parallel = bool(getattr(hf_config, "parallel_attn", True))
        num_ln = getattr(hf_config, "num_ln_in_parallel_attn", None)
        num_heads = hf_config.num_attention_heads
        configured_kv = getattr(hf_config, "num_kv_heads", None) or num_heads
        if new_arch:
            if not parallel:
                raise UnsupportedArchitectureError(
                    "Falcon new_decoder_architecture=True needs parallel_attn=True (got parallel_attn=False)")
            num_kv_heads, norm_layout = configured_kv, "shared" if num_ln == 1 else "separate"
        else:
            if num_ln == 2:
                raise UnsupportedArchitectureError(
                    "Falcon num_ln_in_parallel_attn=2 (ln_attn/ln_mlp) needs new_decoder_architecture=True")
            num_kv_heads = 1 if multi_query else configured_kv
            if not multi_query and num_kv_heads != num_heads:
                raise UnsupportedArchitectureError(
                    f"Falcon num_kv_heads={num_kv_heads} != num_attention_heads={num_heads} needs "
                    "new_decoder_architecture=True or multi_query=True")
            norm_layout = "shared" if parallel else "sequential"
        act = getattr(hf_config, "activation", "gelu")
        if act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(f"Falcon activation={act!r} is not supported (known: {sorted(ACTIVATIONS)})")
        alibi = bool(getattr(hf_config, "alibi", False))
        fields = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=getattr(hf_config, "ffn_hidden_size", None) or 4 * hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            norm_layout=norm_layout,
            alibi=alibi,
            use_bias=bool(getattr(hf_config, "bias", False)),
            layer_norm_eps=float(hf_config.layer_norm_epsilon),
            hidden_act=act,
            rope=RopeConfig() if alibi else RopeConfig.from_hf_config(hf_config),
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            dtype=dtype,
        )
        fields.update(overrides)
        return cls(**fields)


def falcon_alibi_slopes(num_heads: int, head_dim: int) -> np.ndarray:
    """transformers' Falcon ALiBi: slopes rounded to bfloat16 (as its build_alibi_tensor does, in
    every dtype), the bias divided by sqrt(head_dim) like the logits it is added to. (transformers
    also rounds slope * position to bfloat16; jint8 keeps that product in float32, alibi.py.)"""
    slopes = alibi_slopes(num_heads).astype(ml_dtypes.bfloat16).astype(np.float32)
    return slopes / np.float32(math.sqrt(head_dim))


def _dense(cfg: FalconConfig, features: int, name: str) -> Int8Dense:
    return Int8Dense(features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


def _layer_norm(cfg: FalconConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


class FalconAttention(nn.Module):
    config: FalconConfig
    layer: int

    @nn.compact
    def __call__(self, h, positions, cache, cache_index, kv_mask):
        cfg = self.config
        b, t, d = h.shape
        groups = cfg.num_heads // cfg.num_kv_heads
        qkv = _dense(cfg, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, "query_key_value")(h)
        qkv = qkv.reshape(b, t, cfg.num_kv_heads, groups + 2, cfg.head_dim)
        q = qkv[..., :groups, :].reshape(b, t, cfg.num_heads, cfg.head_dim)
        k, v = qkv[..., groups, :], qkv[..., groups + 1, :]
        rope, slopes = None, None
        if cfg.alibi:
            slopes = falcon_alibi_slopes(cfg.num_heads, cfg.head_dim)
        else:
            rope = rope_tables(positions, rope_inverse_frequencies(cfg.rope, cfg.head_dim), q.dtype)
        out, cache = cached_attention(q, k, v, layer=self.layer, cache=cache, cache_index=cache_index,
                                      kv_mask=kv_mask, scale=1.0 / math.sqrt(cfg.head_dim), rope=rope,
                                      alibi_slopes=slopes)
        return _dense(cfg, d, "dense")(out.reshape(b, t, d)), cache


class FalconMLP(nn.Module):
    config: FalconConfig

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        up = _dense(cfg, cfg.intermediate_size, "dense_h_to_4h")(h)
        return _dense(cfg, cfg.hidden_size, "dense_4h_to_h")(activation(cfg.hidden_act)(up))


class FalconDecoderLayer(nn.Module):
    """Parallel: x + attn(ln_a(x)) + mlp(ln_m(x)) (ln_a = ln_m = input_layernorm where shared).
    Sequential: x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))."""

    config: FalconConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache, cache_index, kv_mask):
        cfg = self.config
        attention = FalconAttention(cfg, self.layer, name="self_attention")
        mlp = FalconMLP(cfg, name="mlp")
        if cfg.norm_layout == "separate":
            attn_in, mlp_in = _layer_norm(cfg, "ln_attn")(x), _layer_norm(cfg, "ln_mlp")(x)
        else:
            attn_in = mlp_in = _layer_norm(cfg, "input_layernorm")(x)
        attn, cache = attention(attn_in, positions, cache, cache_index, kv_mask)
        if cfg.norm_layout == "sequential":
            x = x + attn
            return x + mlp(_layer_norm(cfg, "post_attention_layernorm")(x)), cache
        # transformers: mlp_output += attention_output, then the residual
        return x + (mlp(mlp_in) + attn), cache


class FalconModel(nn.Module):
    config: FalconConfig

    def setup(self):
        cfg = self.config
        self.word_embeddings = Int8Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.dtype)
        self.h = [FalconDecoderLayer(cfg, i) for i in range(cfg.num_layers)]
        self.ln_f = _layer_norm(cfg, "ln_f")

    def __call__(self, input_ids, positions, cache, cache_index, kv_mask):
        x = self.word_embeddings(input_ids)
        for layer in self.h:
            x, cache = layer(x, positions, cache, cache_index, kv_mask)
        return self.ln_f(x), cache

    def attend(self, hidden):
        return self.word_embeddings.attend(hidden)


class FalconForCausalLM(CausalLM):
    """input_ids [B, T] -> (logits [B, T, vocab] float32, cache); same interface as LlamaForCausalLM."""

    BACKBONE = FalconModel
    BACKBONE_NAME = "transformer"
    config: FalconConfig


SPEC = ModelSpec(
    model_types=("falcon",),
    model_class=FalconForCausalLM,
    config_class=FalconConfig,
    name_rules=NameRules(list_modules=("h",)),
    sharding=ShardingRules(
        column_parallel=("query_key_value", "dense_h_to_4h", "lm_head"),
        row_parallel=("dense", "dense_4h_to_h"),
        vocab_parallel=("word_embeddings",),
    ),
    hf_linear_class="transformers.models.falcon.modeling_falcon:FalconLinear",
)
