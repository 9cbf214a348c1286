"""What jint8 knows about a model family, in one place: a ModelSpec per family file.

Each family file (llama.py, gemma.py, gpt2.py, opt.py, bloom.py, falcon.py, t5.py) ends with `SPEC = ModelSpec(...)`, and
everything that depends on the family reads it from there: the model_type registry
(jint8.models), the checkpoint name map (loading.pretrained, export), the tensor-parallel rules
(loading.sharding) and the projections fuse_projections may concatenate (models.fusion).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

from jint8.errors import InvalidConfigError


@dataclasses.dataclass(frozen=True)
class NameRules:
    """A family's deviations from the generic rule.

    list_modules: Linen names "<name>_<i>" that stand for transformers' list "<name>.<i>".
    conv1d_modules: Dense modules whose checkpoint weight is already [in, out] (GPT-2's Conv1D).
    ignored: regexes of checkpoint tensors that are buffers or duplicates, not parameters.
    optional_prefixes: prefixes a checkpoint may omit (GPT2LMHeadModel vs GPT2Model saves).
    """

    list_modules: tuple[str, ...] = ("layers",)
    conv1d_modules: tuple[str, ...] = ()
    ignored: tuple[str, ...] = (r"rotary_emb\.inv_freq$", r"\.masked_bias$")
    optional_prefixes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Megatron-style tensor parallelism, by the name of the module that owns a parameter.

    column_parallel: modules whose output features split over "model" (kernel P(None, "model"),
      bias and int8 column scales P("model")).
    row_parallel: modules whose contracting features split over "model" (kernel P("model", None),
      bias and scales replicated; XLA all-reduces the partial sums).
    vocab_parallel: embeddings whose vocabulary rows split over "model" (P("model", None)).
    Every other parameter is replicated.
    """

    column_parallel: tuple[str, ...] = ()
    row_parallel: tuple[str, ...] = ()
    vocab_parallel: tuple[str, ...] = ()

    def __post_init__(self):
        both = sorted(set(self.column_parallel) & set(self.row_parallel))
        if both:
            raise InvalidConfigError(f"ShardingRules: {both} are listed as both column_parallel and row_parallel")

    @classmethod
    def union(cls, *rules: "ShardingRules") -> "ShardingRules":
        """One rule set holding every module name of `rules` (first occurrence order)."""

        def names(field: str) -> tuple[str, ...]:
            return tuple(dict.fromkeys(name for r in rules for name in getattr(r, field)))

        return cls(names("column_parallel"), names("row_parallel"), names("vocab_parallel"))


class Fusion(NamedTuple):
    """Projections of one `parent` module that read the same input; fuse_projections replaces
    `parts` by one module `fused` whose output features are theirs, concatenated in this order."""

    parent: str
    fused: str
    parts: tuple[str, ...]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model family: the transformers model_types it serves and how jint8 builds, loads,
    shards and fuses it.

    model_class: the Flax module (a CausalLM, or T5's encoder-decoder) built from a config_class instance.
    config_class: a frozen config dataclass with from_hf_config(hf_config, dtype=...).
    name_rules: the family's deviations from the generic checkpoint name map.
    sharding: None shards by every registered family's rules (what a family registered with
      register_model alone gets).
    fusions: what fuse_projections may fuse in this family's params.
    keep_float_modules: modules transformers leaves out of its bitsandbytes 8-bit conversion
      (its `_keep_in_fp32_modules`, T5's "wo"): transformers would load an int8 weight of one
      into a float Linear, so export_bitsandbytes refuses them quantized.
    hf_linear_class: "module:Class" of the transformers layer the family's projections are, where
      it is not torch.nn.Linear itself (Falcon's FalconLinear): export_bitsandbytes asks
      transformers' bitsandbytes integration whether it converts that class, and refuses a
      quantized export it could not load back.
    """

    model_types: tuple[str, ...]
    model_class: type
    config_class: type
    name_rules: NameRules = NameRules()
    sharding: Optional[ShardingRules] = None
    fusions: tuple[Fusion, ...] = ()
    keep_float_modules: tuple[str, ...] = ()
    hf_linear_class: Optional[str] = None

    def __post_init__(self):
        if not self.model_types or not all(isinstance(t, str) and t for t in self.model_types):
            raise InvalidConfigError(f"ModelSpec.model_types={self.model_types!r} must be non-empty strings")
        if not callable(getattr(self.config_class, "from_hf_config", None)):
            raise InvalidConfigError(
                f"ModelSpec.config_class={self.config_class.__name__} has no from_hf_config(hf_config, dtype=)")
        if self.sharding is not None:
            for fusion in self.fusions:
                # the fused kernel's output features are its parts': column-parallel parts make a
                # column-parallel whole, and the tree after fuse_projections must shard like that
                if (all(p in self.sharding.column_parallel for p in fusion.parts)
                        and fusion.fused not in self.sharding.column_parallel):
                    raise InvalidConfigError(
                        f"ModelSpec({self.model_types[0]!r}).sharding.column_parallel must list {fusion.fused!r}: "
                        f"it fuses the column-parallel {fusion.parts}")

    def config_from_hf(self, hf_config, dtype):
        """This family's jint8 config (compute dtype `dtype`) for a transformers config."""
        return self.config_class.from_hf_config(hf_config, dtype=dtype)


__all__ = ["Fusion", "ModelSpec", "ShardingRules"]
