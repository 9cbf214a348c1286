"""Flax causal LMs with a static KV cache and the encoder-decoder T5, one file per family, and the model_type registry built
from the families' ModelSpecs (spec.py)."""

from __future__ import annotations

from jint8.errors import UnsupportedArchitectureError
from jint8.models import bloom, falcon, gemma, gpt2, llama, opt, t5
from jint8.models.bloom import BloomConfig, BloomForCausalLM
from jint8.models.common import KVCache, PagedKVCache, RopeConfig, init_cache, init_paged_pool
from jint8.models.fusion import fuse_projections
from jint8.models.gemma import GemmaConfig, GemmaForCausalLM
from jint8.models.gpt2 import GPT2Config, GPT2LMHeadModel
from jint8.models.llama import LlamaConfig, LlamaForCausalLM
from jint8.models.falcon import FalconConfig, FalconForCausalLM
from jint8.models.opt import OPTConfig, OPTForCausalLM
from jint8.models.spec import Fusion, ModelSpec, ShardingRules
from jint8.models.t5 import T5Cache, T5Config, T5ForConditionalGeneration

# model_type -> the ModelSpec of the family that serves it
_REGISTRY: dict[str, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> None:
    """Serve every model_type of `spec` with its family (replacing an earlier registration)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_spec: spec must be a ModelSpec, got {type(spec).__name__}")
    for model_type in spec.model_types:
        _REGISTRY[model_type] = spec


for _spec in (llama.SPEC, gemma.SPEC, gpt2.SPEC, opt.SPEC, bloom.SPEC, falcon.SPEC, t5.SPEC):
    register_spec(_spec)


def register_model(model_type: str, model_class: type, config_class: type, **spec_fields) -> None:
    """Map a transformers model_type to a jint8 model class and its config class; spec_fields
    (name_rules, sharding, fusions) as ModelSpec takes them."""
    register_spec(ModelSpec(model_types=(model_type,), model_class=model_class, config_class=config_class,
                            **spec_fields))


def spec_for(model_type: str) -> ModelSpec:
    """The ModelSpec registered for a transformers model_type."""
    if model_type not in _REGISTRY:
        raise UnsupportedArchitectureError(
            f"model_type={model_type!r} has no jint8 model (supported: {', '.join(sorted(_REGISTRY))})"
        )
    return _REGISTRY[model_type]


def registered_specs() -> tuple[ModelSpec, ...]:
    """Every registered family's spec, once each, in registration order."""
    return tuple(dict.fromkeys(_REGISTRY.values()))


def registered_fusions() -> tuple[Fusion, ...]:
    """Every registered family's fusions, once each (fuse_projections' default)."""
    return tuple(dict.fromkeys(f for spec in registered_specs() for f in spec.fusions))


def registered_sharding() -> ShardingRules:
    """Every registered family's sharding rules as one (how a tree of unknown family is sharded)."""
    return ShardingRules.union(*(spec.sharding for spec in registered_specs() if spec.sharding is not None))


def model_class_for(hf_config) -> type:
    """The jint8 Flax model class for a transformers config, by its model_type."""
    return spec_for(getattr(hf_config, "model_type", None)).model_class


def config_class_for(hf_config) -> type:
    """The jint8 config dataclass for a transformers config, by its model_type."""
    return spec_for(getattr(hf_config, "model_type", None)).config_class


def config_from_hf(hf_config, dtype):
    """The jint8 config (compute dtype `dtype`) for a transformers config."""
    return spec_for(getattr(hf_config, "model_type", None)).config_from_hf(hf_config, dtype)


__all__ = [
    "BloomConfig",
    "BloomForCausalLM",
    "FalconConfig",
    "FalconForCausalLM",
    "Fusion",
    "GemmaConfig",
    "GemmaForCausalLM",
    "GPT2Config",
    "GPT2LMHeadModel",
    "KVCache",
    "PagedKVCache",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelSpec",
    "OPTConfig",
    "OPTForCausalLM",
    "RopeConfig",
    "ShardingRules",
    "T5Cache",
    "T5Config",
    "T5ForConditionalGeneration",
    "config_class_for",
    "config_from_hf",
    "fuse_projections",
    "init_cache",
    "init_paged_pool",
    "model_class_for",
    "register_model",
    "register_spec",
    "registered_fusions",
    "registered_sharding",
    "registered_specs",
    "spec_for",
]
