"""Flax causal LMs with a static KV cache, one file per family, and the model_type registry."""

from __future__ import annotations

from jint8.errors import UnsupportedArchitectureError
from jint8.models.common import KVCache, RopeConfig, init_cache
from jint8.models.fusion import fuse_projections
from jint8.models.gemma import GemmaConfig, GemmaForCausalLM
from jint8.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jint8.models.llama import LlamaConfig, LlamaForCausalLM
from jint8.models.opt import OPTConfig, OPTForCausalLM

# model_type -> (Flax module class, config class); every config class has from_hf_config.
_REGISTRY: dict[str, tuple[type, type]] = {
    "llama": (LlamaForCausalLM, LlamaConfig),
    "mistral": (LlamaForCausalLM, LlamaConfig),
    "qwen2": (LlamaForCausalLM, LlamaConfig),
    "qwen3": (LlamaForCausalLM, LlamaConfig),
    "gemma": (GemmaForCausalLM, GemmaConfig),
    "gemma2": (GemmaForCausalLM, GemmaConfig),
    "gpt2": (GPT2LMHeadModel, GPT2Config),
    "opt": (OPTForCausalLM, OPTConfig),
}


def register_model(model_type: str, model_class: type, config_class: type) -> None:
    """Map a transformers model_type to a jint8 model class and its config class."""
    _REGISTRY[model_type] = (model_class, config_class)


def _entry(hf_config) -> tuple[type, type]:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} has no jint8 model (supported: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[model_type]


def model_class_for(hf_config) -> type:
    """The jint8 Flax model class for a transformers config, by its model_type."""
    return _entry(hf_config)[0]


def config_class_for(hf_config) -> type:
    """The jint8 config dataclass for a transformers config, by its model_type."""
    return _entry(hf_config)[1]


def config_from_hf(hf_config, dtype):
    """The jint8 config (compute dtype `dtype`) for a transformers config."""
    return config_class_for(hf_config).from_hf_config(hf_config, dtype=dtype)


__all__ = [
    "GemmaConfig",
    "GemmaForCausalLM",
    "GPT2Config",
    "GPT2LMHeadModel",
    "KVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "OPTConfig",
    "OPTForCausalLM",
    "RopeConfig",
    "config_class_for",
    "config_from_hf",
    "fuse_projections",
    "init_cache",
    "model_class_for",
    "register_model",
]
