"""Gemma 1 and 2: the Llama decoder (llama.py) with Gemma's switches set from the transformers config.

Gemma 1: embeddings * sqrt(d) (rounded to the compute dtype), RMSNorm * (1 + w), GELU(tanh) gate,
tied embeddings. Gemma 2 adds norms after attention and MLP ("sandwich"), queries scaled by
query_pre_attn_scalar^-1/2, tanh soft-capping of attention logits and final logits, and a
sliding window on the layers transformers' layer_types mark "sliding_attention".
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jint8.models.llama import FUSIONS, SHARDING, LlamaConfig, LlamaForCausalLM
from jint8.models.spec import ModelSpec


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig(LlamaConfig):
    """LlamaConfig with Gemma's defaults; from_hf_config reads Gemma 1 and Gemma 2 configs."""

    norm_unit_offset: bool = True
    embed_scale: bool = True
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    model_type: str = "gemma"

    @classmethod
    def from_hf_config(cls, hf_config, dtype=jnp.bfloat16, **overrides) -> "GemmaConfig":
        activation_name = (getattr(hf_config, "hidden_activation", None)
                           or getattr(hf_config, "hidden_act", None) or "gelu_pytorch_tanh")
        gemma = dict(hidden_act=activation_name, norm_unit_offset=True, embed_scale=True)
        if hf_config.model_type == "gemma2":
            gemma.update(
                sandwich_norms=True,
                query_scale=float(hf_config.query_pre_attn_scalar) ** -0.5,
                attn_logit_softcap=getattr(hf_config, "attn_logit_softcapping", None),
                final_logit_softcap=getattr(hf_config, "final_logit_softcapping", None),
            )
        # LlamaConfig.from_hf_config builds a LlamaConfig; rebuild it as this class
        base = LlamaConfig.from_hf_config(hf_config, dtype=dtype, **{**gemma, **overrides})
        return cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaConfig)})


class GemmaForCausalLM(LlamaForCausalLM):
    """Gemma 1/2 causal LM; the same interface and parameter names as LlamaForCausalLM."""

    config: GemmaConfig


# Gemma's modules and parameter names are Llama's: the same checkpoint names, sharding and fusions.
SPEC = ModelSpec(
    model_types=("gemma", "gemma2"),
    model_class=GemmaForCausalLM,
    config_class=GemmaConfig,
    sharding=SHARDING,
    fusions=FUSIONS,
)
