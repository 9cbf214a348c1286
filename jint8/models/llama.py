"""The Llama family as one Linen model: Llama 2/3, Mistral, Qwen2 (q/k/v bias), Qwen3 (q/k norms),
SmolLM2, TinyLlama — and, through config flags, Gemma 1/2 (see gemma.py).

Pre-norm decoder: x += o_proj(attn(rope(q), rope(k), v)); x += down(act(gate(x)) * up(x)).
Every projection is an Int8Dense, so quantize_params / the loader's Int8Config find its "kernel".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from jint8.errors import InvalidConfigError
from jint8.layers import Int8Dense, Int8Embed
from jint8.models.common import (
    CausalLM,
    KVCache,
    RMSNorm,
    RopeConfig,
    activation,
    cached_attention,
    rope_inverse_frequencies,
    rope_tables,
)
from jint8.models.spec import Fusion, ModelSpec, ShardingRules
from jint8.numerics import GATE_ACTIVATIONS, gated_activation


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder; `dtype` is the compute (and float param) dtype.

    sliding_layers[i] says whether layer i uses `sliding_window`. The Gemma flags default to
    Llama's behaviour: norm_unit_offset (RMSNorm * (1 + w)), embed_scale (embeddings * sqrt(d)),
    sandwich_norms (Gemma 2's extra post-attention / post-MLP norms), query_scale (1/sqrt of
    Gemma 2's query_pre_attn_scalar), attn_logit_softcap / final_logit_softcap.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    hidden_act: str = "silu"
    sliding_window: Optional[int] = None
    sliding_layers: tuple[bool, ...] = ()
    norm_unit_offset: bool = False
    embed_scale: bool = False
    sandwich_norms: bool = False
    query_scale: Optional[float] = None
    attn_logit_softcap: Optional[float] = None
    final_logit_softcap: Optional[float] = None
    model_type: str = "llama"
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise InvalidConfigError(f"LlamaConfig.{name}={getattr(self, name)} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise InvalidConfigError(
                f"LlamaConfig.num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise InvalidConfigError(
                f"LlamaConfig.sliding_layers has {len(self.sliding_layers)} entries, num_layers={self.num_layers}"
            )
        activation(self.hidden_act)

    def window_for(self, layer: int) -> Optional[int]:
        if self.sliding_window is None:
            return None
        if not self.sliding_layers:
            return self.sliding_window
        return self.sliding_window if self.sliding_layers[layer] else None

    @classmethod
    def from_hf_config(cls, hf_config, dtype=jnp.bfloat16, **overrides) -> "LlamaConfig":
        """Build from a transformers Llama/Mistral/Qwen2/Qwen3 config (Gemma: gemma.py)."""
        model_type = hf_config.model_type
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        qkv_bias = True if model_type == "qwen2" else attention_bias
        o_bias = False if model_type == "qwen2" else attention_bias
        fields = dict(
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
            rope=RopeConfig.from_hf_config(hf_config),
            max_position_embeddings=getattr(hf_config, "max_position_embeddings", 2048),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            model_type=model_type,
            dtype=dtype,
            **_sliding_window_fields(hf_config),
        )
        fields.update(overrides)
        return cls(**fields)


def _sliding_window_fields(hf_config) -> dict:
    window = getattr(hf_config, "sliding_window", None)
    if window is None or getattr(hf_config, "use_sliding_window", True) is False:
        return {}
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return dict(sliding_window=int(window),
                    sliding_layers=tuple(t == "sliding_attention" for t in layer_types))
    return dict(sliding_window=int(window))


def _dense(config: LlamaConfig, features: int, use_bias: bool, name: Optional[str] = None,
           output_gate: Optional[str] = None) -> Int8Dense:
    return Int8Dense(features, use_bias=use_bias, dtype=config.dtype, param_dtype=config.dtype, name=name,
                     output_gate=output_gate)


def _norm(config: LlamaConfig, name: Optional[str] = None) -> RMSNorm:
    return RMSNorm(eps=config.rms_norm_eps, dtype=config.dtype, param_dtype=config.dtype,
                   unit_offset=config.norm_unit_offset, name=name)


class LlamaAttention(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache: Optional[KVCache], cache_index, kv_mask):
        cfg = self.config
        b, t, _ = x.shape
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        packed = None
        if self.has_variable("params", "qkv_proj"):  # fuse_projections' one q|k|v matmul
            # Its split-K partials where the int8 decode plan leaves them to the consumer: the
            # decode-attention kernel adds them where it loads q, k, v (no XLA sum between the
            # two kernels); every other path takes their sum (which XLA drops where unused).
            parts = _dense(cfg, q_size + 2 * kv_size, cfg.qkv_bias, "qkv_proj")(
                x, split_partials=True)
            qkv = parts[0] if parts.shape[0] == 1 else parts.sum(axis=0).astype(cfg.dtype)
            q, k, v = jnp.split(qkv, [q_size, q_size + kv_size], axis=-1)
            packed = None if cfg.qk_norm else parts
        else:
            q = _dense(cfg, q_size, cfg.qkv_bias, "q_proj")(x)
            k = _dense(cfg, kv_size, cfg.qkv_bias, "k_proj")(x)
            v = _dense(cfg, kv_size, cfg.qkv_bias, "v_proj")(x)
        q = q.reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # Qwen3: RMSNorm over head_dim before the rotation
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        rope = rope_tables(positions, rope_inverse_frequencies(cfg.rope, cfg.head_dim), q.dtype)
        scale = cfg.query_scale if cfg.query_scale is not None else 1.0 / math.sqrt(cfg.head_dim)
        # RoPE is applied by cached_attention: in the decode kernel, or by XLA first.
        out, cache = cached_attention(q, k, v, layer=self.layer, cache=cache, cache_index=cache_index,
                                      kv_mask=kv_mask, scale=scale, sliding_window=cfg.window_for(self.layer),
                                      logit_softcap=cfg.attn_logit_softcap, rope=rope, packed=packed)
        out = _dense(cfg, cfg.hidden_size, cfg.o_bias, "o_proj")(out.reshape(b, t, -1))
        return out, cache


class LlamaMLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        down_proj = _dense(cfg, cfg.hidden_size, cfg.mlp_bias, "down_proj")
        # silu: act(gate) * up with transformers' roundings (numerics.gated_activation), the
        # same bits fused or not; other activations as jnp computes them in cfg.dtype.
        gated = cfg.hidden_act in GATE_ACTIVATIONS
        if self.has_variable("params", "gate_up_proj"):  # fuse_projections' one gate|up matmul
            if gated:  # the int8 decode kernel gates in its epilogue (no [.., 2I] product)
                hidden = _dense(cfg, 2 * cfg.intermediate_size, cfg.mlp_bias, "gate_up_proj",
                                output_gate=cfg.hidden_act)(x)
                return down_proj(hidden)
            gate_up = _dense(cfg, 2 * cfg.intermediate_size, cfg.mlp_bias, "gate_up_proj")(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "gate_proj")(x)
            up = _dense(cfg, cfg.intermediate_size, cfg.mlp_bias, "up_proj")(x)
        if gated:
            return down_proj(gated_activation(gate, up, cfg.hidden_act, gate.dtype))
        return down_proj(activation(cfg.hidden_act)(gate) * up)


class LlamaDecoderLayer(nn.Module):
    config: LlamaConfig
    layer: int

    @nn.compact
    def __call__(self, x, positions, cache, cache_index, kv_mask):
        cfg = self.config
        # Norms that feed projections are deferred (NormedInput): int8 projections fold them
        # into their kernel; float ones normalise first, as before.
        attn, cache = LlamaAttention(cfg, self.layer, name="self_attn")(
            _norm(cfg, "input_layernorm")(x, defer=True), positions, cache, cache_index, kv_mask
        )
        if cfg.sandwich_norms:  # Gemma 2
            x = x + _norm(cfg, "post_attention_layernorm")(attn)
            mlp = LlamaMLP(cfg, name="mlp")(_norm(cfg, "pre_feedforward_layernorm")(x, defer=True))
            return x + _norm(cfg, "post_feedforward_layernorm")(mlp), cache
        x = x + attn
        return x + LlamaMLP(cfg, name="mlp")(_norm(cfg, "post_attention_layernorm")(x, defer=True)), cache


class LlamaModel(nn.Module):
    """Embeddings, decoder layers and final norm: input_ids [B, T] -> hidden [B, T, D]."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        self.embed_tokens = Int8Embed(cfg.vocab_size, cfg.hidden_size, dtype=cfg.dtype, param_dtype=cfg.dtype)
        self.layers = [LlamaDecoderLayer(cfg, i) for i in range(cfg.num_layers)]
        self.norm = _norm(cfg)

    def __call__(self, input_ids, positions, cache, cache_index, kv_mask):
        x = self.embed_tokens(input_ids)
        if self.config.embed_scale:  # Gemma: the normaliser is rounded to the compute dtype
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), self.config.dtype)
        for layer in self.layers:
            x, cache = layer(x, positions, cache, cache_index, kv_mask)
        return self.norm(x), cache

    def attend(self, hidden):
        return self.embed_tokens.attend(hidden)


class LlamaForCausalLM(CausalLM):
    """input_ids [B, T] -> (logits [B, T, vocab] float32, updated cache or None) (CausalLM),
    with Gemma 2's final logit soft-cap where the config has one."""

    BACKBONE = LlamaModel
    config: LlamaConfig

    def __call__(self, input_ids, positions=None, cache: Optional[KVCache] = None, cache_index=None,
                 kv_mask=None, logits_to_keep: int = 0):
        logits, cache = super().__call__(input_ids, positions, cache, cache_index, kv_mask, logits_to_keep)
        if self.config.final_logit_softcap is not None:
            cap = self.config.final_logit_softcap
            logits = jnp.tanh(logits / cap) * cap
        return logits, cache


# q|k|v and gate|up read the same normalised input (fusion.py says why fusing them is exact).
FUSIONS = (
    Fusion("self_attn", "qkv_proj", ("q_proj", "k_proj", "v_proj")),
    Fusion("mlp", "gate_up_proj", ("gate_proj", "up_proj")),
)

# The fused q|k|v and gate|up kernels are their parts' output features side by side, so they
# split over "model" as the parts do.
SHARDING = ShardingRules(
    column_parallel=("q_proj", "k_proj", "v_proj", "qkv_proj", "gate_proj", "up_proj", "gate_up_proj",
                     "lm_head"),
    row_parallel=("o_proj", "down_proj"),
    vocab_parallel=("embed_tokens",),
)

SPEC = ModelSpec(
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    model_class=LlamaForCausalLM,
    config_class=LlamaConfig,
    sharding=SHARDING,
    fusions=FUSIONS,
)
