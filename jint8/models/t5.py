"""T5 (encoder-decoder): T5, T5 v1.1 / FLAN-T5 (gated-GELU wi_0 / wi_1) and mT5, as transformers'
modeling_t5.py computes them.

Read top to bottom: RMS-style T5LayerNorm (no mean, no bias), attention without the 1/sqrt(d)
scaling, a learned relative-position bias from block 0 shared by every layer of its stack
(bidirectional buckets in the encoder, unidirectional in the decoder), cross-attention over the
encoder output, and the decoder output scaled by d_model**-0.5 before the head where the config
says so (original T5; not v1.1 / FLAN-T5 / mT5).

Serving a request: `encode` once, `init_cache` projects every decoder layer's cross-attention
keys and values once and allocates the decoder's static self-attention cache, then `decode`
steps the decoder (generation/seq2seq.py runs that loop).

float16: T5's feed-forward output overflows float16 (transformers issue 20287), so, as
transformers does with `_keep_in_fp32_modules = ["wo"]` for a float16 model, each `wo` keeps
float32 parameters and computes in float32 (its input cast up; the residual stream then follows
torch's promotion to float32), and each block clamps float16 hidden states to the float16 range
(finfo.max - 1000 where an inf appeared) after every sub-layer as T5Block does. bfloat16 and
float32 models run `wo` in their own dtype, as transformers does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from jint8.errors import InvalidConfigError, UnsupportedArchitectureError
from jint8.layers import Int8Dense, Int8Embed
from jint8.models import explicit_axes
from jint8.models.common import ACTIVATIONS, KVCache, RMSNorm, update_layer_cache
from jint8.models.common import attention_mask as causal_slot_mask
from jint8.models.spec import Fusion, ModelSpec, NameRules, ShardingRules


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """T5 hyper-parameters (transformers' T5Config / MT5Config names); `dtype` is the compute dtype.

    gated: T5 v1.1's wi_0 / wi_1 feed-forward (feed_forward_proj "gated-<act>").
    scale_decoder_outputs: multiply the decoder output by d_model**-0.5 before the head (original T5).
    tie_word_embeddings: the head is the shared embedding (the loader unties it when the file
    stores its own lm_head.weight).
    """

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_decoder_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    dense_act_fn: str = "relu"
    gated: bool = False
    scale_decoder_outputs: bool = True
    tie_word_embeddings: bool = True
    decoder_start_token_id: int = 0
    eos_token_id: Optional[int] = 1
    pad_token_id: int = 0
    model_type: str = "t5"
    dtype: Any = jnp.bfloat16

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if int(getattr(self, name)) <= 0:
                raise InvalidConfigError(f"T5Config.{name}={getattr(self, name)} must be > 0")
        if self.dense_act_fn not in ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"T5Config.dense_act_fn={self.dense_act_fn!r} is not supported (known: {sorted(ACTIVATIONS)})")

    # what the shared pieces (init_cache-style helpers, generate's checks) read
    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_kv

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads

    @classmethod
    def from_hf_config(cls, hf_config, dtype=jnp.bfloat16, **overrides) -> "T5Config":
        model_type = getattr(hf_config, "model_type", "t5")
        proj = str(getattr(hf_config, "feed_forward_proj", "relu"))
        parts = proj.split("-")
        act = parts[-1]
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise UnsupportedArchitectureError(f"{model_type} config: feed_forward_proj={proj!r} is not "
                                               "'<act>' or 'gated-<act>'")
        if proj == "gated-gelu":
            act = "gelu_new"  # transformers' backwards-compatible reading of "gated-gelu"
        if act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"{model_type} config: feed_forward_proj={proj!r} has activation {act!r}, which jint8 lacks "
                f"(known: {sorted(ACTIVATIONS)})")
        if getattr(hf_config, "is_decoder", False) or not getattr(hf_config, "is_encoder_decoder", True):
            raise UnsupportedArchitectureError(
                f"{model_type} config: is_decoder={getattr(hf_config, 'is_decoder', False)}, is_encoder_decoder="
                f"{getattr(hf_config, 'is_encoder_decoder', True)}: jint8 builds the encoder-decoder T5 only")
        # transformers 5 forces tie_word_embeddings=True and keeps the old flag as
        # scale_decoder_outputs (T5); mT5 never scales
        scale = bool(getattr(hf_config, "scale_decoder_outputs", getattr(hf_config, "tie_word_embeddings", True)))
        eos = getattr(hf_config, "eos_token_id", 1)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        start = getattr(hf_config, "decoder_start_token_id", None)
        pad = getattr(hf_config, "pad_token_id", None)
        fields = dict(
            vocab_size=hf_config.vocab_size,
            d_model=hf_config.d_model,
            d_kv=hf_config.d_kv,
            d_ff=hf_config.d_ff,
            num_layers=hf_config.num_layers,
            num_decoder_layers=getattr(hf_config, "num_decoder_layers", None) or hf_config.num_layers,
            num_heads=hf_config.num_heads,
            relative_attention_num_buckets=hf_config.relative_attention_num_buckets,
            relative_attention_max_distance=getattr(hf_config, "relative_attention_max_distance", 128),
            layer_norm_eps=float(hf_config.layer_norm_epsilon),
            dense_act_fn=act,
            gated=len(parts) == 2,
            scale_decoder_outputs=scale and model_type != "mt5",
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", True)),
            decoder_start_token_id=int(start if start is not None else (pad or 0)),
            eos_token_id=None if eos is None else int(eos),
            pad_token_id=int(pad or 0),
            model_type=model_type,
            dtype=dtype,
        )
        fields.update(overrides)
        return cls(**fields)


def relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> jax.Array:
    """transformers' T5Attention._relative_position_bucket: memory - query position -> bucket id
    (exact buckets for small distances, log-spaced up to max_distance; the sign splits the buckets
    in two when bidirectional, positive distances count as 0 when not)."""
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        relative_position = jnp.abs(relative_position)
    else:
        relative_position = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # float32 log like torch's .float(); the small distances' log(0) is masked by is_small
    log_ratio = jnp.log(jnp.maximum(relative_position, 1).astype(jnp.float32) / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(relative_position.dtype)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, relative_position, large)


@struct.dataclass
class T5Cache:
    """One request's decoder state: the static self-attention cache (k, v [L, B, S, N, H]), every
    decoder layer's cross-attention keys and values (cross_k, cross_v [L, B, E, N, H], projected
    once from the encoder output) and the encoder's mask [B, E]."""

    self_attention: KVCache
    cross_k: jax.Array
    cross_v: jax.Array
    encoder_mask: jax.Array

    @property
    def max_length(self) -> int:
        return self.self_attention.max_length


def _clamp_fp16(x: jax.Array) -> jax.Array:
    """T5Block's float16 clamp: keep hidden states finite (finfo.max - 1000 once an inf appeared)."""
    if x.dtype != jnp.float16:
        return x
    top = jnp.finfo(jnp.float16).max
    limit = jnp.where(jnp.isinf(x).any(), top - 1000, top).astype(x.dtype)
    return jnp.clip(x, -limit, limit)


def _dense(cfg: T5Config, features: int, name: Optional[str] = None, dtype=None) -> Int8Dense:
    dtype = dtype or cfg.dtype
    return Int8Dense(features, use_bias=False, dtype=dtype, param_dtype=dtype, name=name)


def _norm(cfg: T5Config, name: Optional[str] = None) -> RMSNorm:
    return RMSNorm(eps=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.dtype, name=name)


class T5Attention(nn.Module):
    """q k^T (unscaled) + position bias -> softmax -> v; q, k, v, o without biases."""

    config: T5Config
    is_decoder: bool
    has_relative_attention_bias: bool = False

    def setup(self):
        cfg = self.config
        inner = cfg.num_heads * cfg.d_kv
        # fuse_projections' one matmul for q|k|v (self-attention) or k|v (cross-attention: both
        # read the encoder output), else transformers' separate projections
        if self.has_variable("params", "qkv"):
            self.qkv = _dense(cfg, 3 * inner)
        else:
            self.q = _dense(cfg, inner)
            if self.has_variable("params", "kv"):
                self.kv = _dense(cfg, 2 * inner)
            else:
                self.k, self.v = _dense(cfg, inner), _dense(cfg, inner)
        self.o = _dense(cfg, cfg.d_model)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = Int8Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                     dtype=cfg.dtype, param_dtype=cfg.dtype)

    def heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

    def query(self, h: jax.Array) -> jax.Array:
        """h [B, T, D] -> queries [B, T, N, H] (cross-attention)."""
        return self.heads(self.q(h))

    def project_kv(self, states: jax.Array) -> tuple[jax.Array, jax.Array]:
        """states [B, S, D] -> keys, values [B, S, N, H] (cross-attention)."""
        if self.has_variable("params", "kv"):
            k, v = jnp.split(self.kv(states), 2, axis=-1)
            return self.heads(k), self.heads(v)
        return self.heads(self.k(states)), self.heads(self.v(states))

    def project_qkv(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """h [B, T, D] -> queries, keys, values [B, T, N, H] (self-attention)."""
        if self.has_variable("params", "qkv"):
            return tuple(self.heads(part) for part in jnp.split(self.qkv(h), 3, axis=-1))
        return self.query(h), self.heads(self.k(h)), self.heads(self.v(h))

    def compute_bias(self, query_positions: jax.Array, num_keys: int) -> jax.Array:
        """[1, N, T, S] bias of queries at query_positions [T] over key positions 0..S-1."""
        cfg = self.config
        relative = jnp.arange(num_keys, dtype=jnp.int32)[None, :] - query_positions[:, None]
        buckets = relative_position_bucket(relative, bidirectional=not self.is_decoder,
                                           num_buckets=cfg.relative_attention_num_buckets,
                                           max_distance=cfg.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(buckets), (2, 0, 1))[None]

    def __call__(self, q, keys, values, mask, bias):
        """q [B, T, N, H]; keys, values [B, S, N, H]; mask [B|1, 1, T|1, S]; bias [1, N, T, S] or None."""
        out = jax.nn.dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), bias=bias,
                                           mask=mask, scale=1.0)
        return self.o(out.reshape(*q.shape[:-2], -1))


class T5FeedForward(nn.Module):
    """wo(act(wi h)) or, gated, wo(act(wi_0 h) * wi_1 h); wo in float32 for a float16 model."""

    config: T5Config

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        act = ACTIVATIONS[cfg.dense_act_fn]
        if cfg.gated and self.has_variable("params", "wi_01"):  # fuse_projections' one wi_0|wi_1 matmul
            gate, linear = jnp.split(_dense(cfg, 2 * cfg.d_ff, "wi_01")(h), 2, axis=-1)
            h = act(gate) * linear
        elif cfg.gated:
            h = act(_dense(cfg, cfg.d_ff, "wi_0")(h)) * _dense(cfg, cfg.d_ff, "wi_1")(h)
        else:
            h = act(_dense(cfg, cfg.d_ff, "wi")(h))
        wo_dtype = jnp.float32 if jnp.dtype(cfg.dtype) == jnp.float16 else cfg.dtype
        return _dense(cfg, cfg.d_model, "wo", dtype=wo_dtype)(h.astype(wo_dtype))


class T5LayerAttention(nn.Module):
    """x + attn(layer_norm(x)): T5LayerSelfAttention (attn_name "SelfAttention") or
    T5LayerCrossAttention ("EncDecAttention")."""

    config: T5Config
    is_decoder: bool
    attn_name: str
    has_relative_attention_bias: bool = False

    def setup(self):
        # setup names a submodule by its attribute: transformers' name is the attribute
        setattr(self, self.attn_name, T5Attention(self.config, self.is_decoder, self.has_relative_attention_bias))
        self.layer_norm = _norm(self.config)

    @property
    def attention(self) -> T5Attention:
        return getattr(self, self.attn_name)

    def normed(self, x):
        return self.layer_norm(x)

    def __call__(self, x, q, keys, values, mask, bias):
        """x: the residual stream; q, keys, values projected by the caller (from normed(x), or the
        encoder output's keys/values)."""
        return x + self.attention(q, keys, values, mask, bias)


class T5LayerFF(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x):
        return x + T5FeedForward(self.config, name="DenseReluDense")(_norm(self.config, "layer_norm")(x))


class T5Block(nn.Module):
    """layer_0 self-attention, (decoder) layer_1 cross-attention, then the feed-forward layer."""

    config: T5Config
    is_decoder: bool
    has_relative_attention_bias: bool = False

    def setup(self):
        cfg = self.config
        layers = [T5LayerAttention(cfg, self.is_decoder, "SelfAttention", self.has_relative_attention_bias)]
        if self.is_decoder:
            layers.append(T5LayerAttention(cfg, True, "EncDecAttention"))
        self.layer = layers + [T5LayerFF(cfg)]

    def cross_kv(self, encoder_hidden):
        return self.layer[1].attention.project_kv(encoder_hidden)

    def __call__(self, x, self_mask, bias, *, cache=None, layer_index=0, cache_index=0, cross=None):
        """Without cache: self-attention over this call's tokens. With cache (decoder): this step's
        keys/values written at cache_index of layer layer_index, attention over the slots.
        cross: (keys, values, mask) of the encoder output (decoder only)."""
        self_layer = self.layer[0]
        q, keys, values = self_layer.attention.project_qkv(self_layer.normed(x))
        if cache is not None:
            cache, keys, values = update_layer_cache(cache, layer_index, keys, values, cache_index)
        x = _clamp_fp16(self_layer(x, q, keys, values, self_mask, bias))
        if self.is_decoder:
            cross_layer = self.layer[1]
            q = cross_layer.attention.query(cross_layer.normed(x))
            x = _clamp_fp16(cross_layer(x, q, *cross, None))
        return _clamp_fp16(self.layer[-1](x)), cache


class T5Stack(nn.Module):
    """The encoder or decoder: blocks (block 0 owns the relative-position bias) + final_layer_norm."""

    config: T5Config
    is_decoder: bool

    def setup(self):
        cfg = self.config
        count = cfg.num_decoder_layers if self.is_decoder else cfg.num_layers
        self.block = [T5Block(cfg, self.is_decoder, i == 0) for i in range(count)]
        self.final_layer_norm = _norm(cfg)

    def position_bias(self, query_positions, num_keys):
        return self.block[0].layer[0].attention.compute_bias(query_positions, num_keys)

    def cross_kv(self, encoder_hidden):
        """Every block's cross-attention keys and values [L, B, E, N, H] (decoder)."""
        pairs = [block.cross_kv(encoder_hidden) for block in self.block]
        return jnp.stack([k for k, _ in pairs]), jnp.stack([v for _, v in pairs])

    def __call__(self, x, self_mask, bias, *, cache=None, cache_index=0, cross=None):
        for i, block in enumerate(self.block):
            layer_cross = None if cross is None else (cross[0][i], cross[1][i], cross[2])
            x, cache = block(x, self_mask, bias, cache=cache, layer_index=i, cache_index=cache_index,
                             cross=layer_cross)
        return self.final_layer_norm(x), cache


def _padding_mask(mask: jax.Array) -> jax.Array:
    """[B, S] 1 = real token -> [B, 1, 1, S] bool."""
    return mask.astype(bool)[:, None, None, :]


class T5ForConditionalGeneration(explicit_axes.RunsOnAutoAxes, nn.Module):
    """input_ids [B, E] (+ attention_mask) and decoder_input_ids [B, T] -> logits [B, T, vocab] float32.

    Methods for a request (model.apply(..., method=...)): encode(input_ids, attention_mask) ->
    [B, E, D]; init_cache(encoder_hidden, attention_mask, max_length) -> T5Cache;
    decode(decoder_input_ids, cache, cache_index) -> (logits, cache).
    """

    config: T5Config
    IS_ENCODER_DECODER = True

    def setup(self):
        cfg = self.config
        self.shared = Int8Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.dtype)
        self.encoder = T5Stack(cfg, is_decoder=False)
        self.decoder = T5Stack(cfg, is_decoder=True)
        if not cfg.tie_word_embeddings:
            self.lm_head = _dense(cfg, cfg.vocab_size)

    def encode(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        length = input_ids.shape[1]
        bias = self.encoder.position_bias(jnp.arange(length, dtype=jnp.int32), length)
        hidden, _ = self.encoder(self.shared(input_ids), _padding_mask(attention_mask), bias)
        return hidden

    def _logits(self, hidden):
        if self.config.scale_decoder_outputs:
            hidden = hidden * (self.config.d_model ** -0.5)
        logits = self.shared.attend(hidden) if self.config.tie_word_embeddings else self.lm_head(hidden)
        return logits.astype(jnp.float32)

    def init_cache(self, encoder_hidden, attention_mask, max_length: int) -> T5Cache:
        """The decoder's state for a request: cross-attention keys/values of every decoder layer
        (projected here, once) and a zero self-attention cache of max_length slots."""
        cfg = self.config
        b = encoder_hidden.shape[0]
        cross_k, cross_v = self.decoder.cross_kv(encoder_hidden)
        shape = (cfg.num_decoder_layers, b, max_length, cfg.num_heads, cfg.d_kv)
        zeros = jnp.zeros(shape, cfg.dtype)
        if attention_mask is None:
            attention_mask = jnp.ones(encoder_hidden.shape[:2], bool)
        return T5Cache(KVCache(zeros, zeros), cross_k, cross_v, attention_mask.astype(bool))

    def decode(self, decoder_input_ids, cache: T5Cache, cache_index):
        """decoder_input_ids [B, T] at slots cache_index.. -> (logits [B, T, vocab] float32, cache)."""
        t = decoder_input_ids.shape[1]
        positions = cache_index + jnp.arange(t, dtype=jnp.int32)
        bias = self.decoder.position_bias(positions, cache.max_length)
        self_mask = causal_slot_mask(t, cache.max_length, cache_index=cache_index)
        cross = (cache.cross_k, cache.cross_v, _padding_mask(cache.encoder_mask))
        hidden, self_cache = self.decoder(self.shared(decoder_input_ids), self_mask, bias,
                                          cache=cache.self_attention, cache_index=cache_index, cross=cross)
        return self._logits(hidden), cache.replace(self_attention=self_cache)

    def __call__(self, input_ids, decoder_input_ids=None, attention_mask=None):
        """The full forward without a cache (decoder_input_ids default: the start token)."""
        cfg = self.config
        if decoder_input_ids is None:
            decoder_input_ids = jnp.full((input_ids.shape[0], 1), cfg.decoder_start_token_id, jnp.int32)
        encoder_hidden = self.encode(input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        t = decoder_input_ids.shape[1]
        bias = self.decoder.position_bias(jnp.arange(t, dtype=jnp.int32), t)
        cross_k, cross_v = self.decoder.cross_kv(encoder_hidden)
        hidden, _ = self.decoder(self.shared(decoder_input_ids), causal_slot_mask(t, t), bias,
                                 cross=(cross_k, cross_v, _padding_mask(attention_mask)))
        return self._logits(hidden)


SPEC = ModelSpec(
    model_types=("t5", "mt5"),
    model_class=T5ForConditionalGeneration,
    config_class=T5Config,
    name_rules=NameRules(
        list_modules=("block", "layer"),
        ignored=(
            # the stacks' embed_tokens are the shared table; transformers drops the decoder's
            # unused cross-attention bias too
            r"^(encoder|decoder)\.embed_tokens\.weight$",
            r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$",
        ),
    ),
    sharding=ShardingRules(
        column_parallel=("q", "k", "v", "qkv", "kv", "wi", "wi_0", "wi_1", "wi_01", "lm_head"),
        row_parallel=("o", "wo"),
        vocab_parallel=("shared",),
    ),
    fusions=(
        Fusion("SelfAttention", "qkv", ("q", "k", "v")),
        Fusion("EncDecAttention", "kv", ("k", "v")),
        Fusion("DenseReluDense", "wi_01", ("wi_0", "wi_1")),
    ),
    keep_float_modules=("wo",),
)
