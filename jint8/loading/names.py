"""Name maps between transformers' PyTorch state-dict names and jint8's Flax parameter paths.

jint8's module names follow transformers' (q_proj, mlp, input_layernorm, ...), so one rule maps
both ways: a list index "layers.3" is the Linen submodule "layers_3", and a ".weight" is the
Flax leaf "kernel" (Dense, transposed from PyTorch's [out, in] unless the family stores [in, out]
like GPT-2's Conv1D), "embedding" (nn.Embed) or "scale" (norms).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

from jint8.models.spec import NameRules  # noqa: F401  (the family's rules; re-exported)

# Flax leaf name -> transformers' suffix
_LEAF_TO_HF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")


@dataclasses.dataclass(frozen=True)
class TensorTarget:
    """Where one checkpoint tensor goes: its Flax path, expected Flax shape and layout rule."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    transpose: bool  # PyTorch Linear [out, in] -> Flax kernel [in, out]


def flax_path_to_hf(path: tuple[str, ...], rules: NameRules) -> str:
    """("model", "layers_3", "self_attn", "q_proj", "kernel") -> "model.layers.3.self_attn.q_proj.weight"."""
    parts = []
    for name in path[:-1]:
        match = _INDEXED.match(name)
        if match and match.group(1) in rules.list_modules:
            parts.extend(match.groups())
        else:
            parts.append(name)
    parts.append(_LEAF_TO_HF.get(path[-1], path[-1]))
    return ".".join(parts)


def expected_tensors(param_shapes: Mapping[tuple[str, ...], tuple[int, ...]], rules: NameRules) -> dict[str, TensorTarget]:
    """{transformers name: TensorTarget} for every leaf of the model's (flattened) param tree."""
    table = {}
    for path, shape in param_shapes.items():
        module = path[-2] if len(path) > 1 else ""
        transpose = path[-1] == "kernel" and len(shape) == 2 and module not in rules.conv1d_modules
        table[flax_path_to_hf(path, rules)] = TensorTarget(tuple(path), tuple(shape), transpose)
    return table


def match_checkpoint_name(name: str, table: Mapping[str, TensorTarget], rules: NameRules) -> Optional[str]:
    """The table key a checkpoint tensor name stands for, or None if it is ignorable."""
    if name in table:
        return name
    for prefix in rules.optional_prefixes:
        if prefix + name in table:
            return prefix + name
    if any(re.search(pattern, name) for pattern in rules.ignored):
        return None
    return name  # unknown: the caller reports it


def needs_transpose(target: TensorTarget, flax_layout: bool, rules: NameRules) -> bool:
    """PyTorch files: Linear weights are [out, in]. v4 Flax files: kernels are already [in, out],
    except v4's FlaxConv1D (GPT-2), which stored [out, in] and transposed at run time."""
    if not flax_layout:
        return target.transpose
    module = target.path[-2] if len(target.path) > 1 else ""
    return target.path[-1] == "kernel" and module in rules.conv1d_modules


def stored_shape(target: TensorTarget, flax_layout: bool, rules: NameRules) -> tuple[int, ...]:
    """The shape the checkpoint tensor must have for this target."""
    return tuple(reversed(target.shape)) if needs_transpose(target, flax_layout, rules) else target.shape
