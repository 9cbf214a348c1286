"""A jint8 checkpoint's stored model config checked against its stored arrays before loading:
an edited num_layers (or any field that changes the parameters) is refused, not loaded with a
layer silently dropped."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict

from jint8.errors import WeightsMismatchError


def _init_shapes(model) -> dict:
    # the key and the dummy input made inside eval_shape: made outside, each would be an eager
    # op compiled (and run) on the device
    return flatten_dict(jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"])


def abstract_params(model) -> dict:
    """{path: ShapeDtypeStruct} of model's params, in the order model.init makes them. Tracing the init of every layer of a deep model
    takes seconds, so the shapes are traced for 1, 2 and 3 layers and the layer list extended to
    config.num_layers; where 1 and 2 layers do not predict the 3-layer tree exactly (or the config
    has no num_layers), the whole model is traced."""
    config = model.config
    layers = getattr(config, "num_layers", None)
    if not dataclasses.is_dataclass(config) or not isinstance(layers, int) or layers <= 3:
        return _init_shapes(model)

    def with_layers(n):
        fields = {"num_layers": n}
        if getattr(config, "sliding_layers", None):
            fields["sliding_layers"] = tuple(config.sliding_layers[:n])
        return _init_shapes(type(model)(dataclasses.replace(config, **fields)))

    one, two = with_layers(1), with_layers(2)
    if _extend_layers(one, two, 3) != with_layers(3):
        return _init_shapes(model)
    return _extend_layers(one, two, layers)


def _extend_layers(one: dict, two: dict, layers: int) -> dict:
    """The n-layer tree from the 1- and 2-layer ones: the paths the second layer added ("x_1"),
    repeated for x_2 ... x_{n-1}, in the order a whole trace gives (layer after layer, each
    layer's parameters in x_1's order, all where x_1 ends)."""
    groups: dict = {}  # (position, prefix) of the "x_1" key -> the second layer's paths, in order
    for path in two:
        if path in one:
            continue
        for i, key in enumerate(path):
            if str(key).endswith("_1"):
                groups.setdefault((path[:i], str(key)[: -len("_1")]), []).append((i, path))
                break
    last = {members[-1][1]: (group, members) for group, members in groups.items()}
    shapes = {}
    for path, leaf in two.items():
        shapes[path] = leaf
        if path in last:
            (_, prefix), members = last[path]
            for layer in range(2, layers):
                for i, member in members:
                    shapes[member[:i] + (f"{prefix}_{layer}",) + member[i + 1:]] = two[member]
    return shapes


def check_config_against_arrays(location: Path, model, stored_shapes: dict) -> None:
    """stored_shapes ({path: shape}, from stored_parameter_shapes) must be the parameters the
    stored model config builds (an edited num_layers would otherwise load and silently drop a
    layer). Projections a fusion merges are compared by their block only, as the tree may have
    been saved fused."""
    from jint8.models import registered_fusions

    shapes = abstract_params(model)
    fusing = {name for fusion in registered_fusions() for name in (fusion.fused, *fusion.parts)}
    blocks = set()

    def key(path):
        path = tuple(str(p) for p in path)
        if len(path) >= 2 and path[-2] in fusing:
            blocks.add(path[:-2])
            return path[:-2]
        return path

    expected, stored = {}, {}
    for path, leaf in shapes.items():
        expected.setdefault(key(path), set()).add(tuple(leaf.shape))
    for path, shape in stored_shapes.items():
        stored.setdefault(key(path), set()).add(tuple(shape))
    missing = sorted("/".join(p) for p in set(expected) - set(stored))
    extra = sorted("/".join(p) for p in set(stored) - set(expected))
    wrong = sorted(f"{'/'.join(p)}: stored {sorted(stored[p])[0]} != config {sorted(expected[p])[0]}"
                   for p in set(expected) & set(stored) if p not in blocks and stored[p] != expected[p])
    problems = ([f"{len(missing)} parameters missing {missing[:5]}"] if missing else []) + (
        [f"{len(extra)} arrays the config has no parameter for {extra[:5]}"] if extra else []) + (
        [f"{len(wrong)} shapes differ {wrong[:5]}"] if wrong else [])
    if problems:
        raise WeightsMismatchError(f"{location}: the stored model_config does not match the stored arrays: "
                                   f"{'; '.join(problems)}")
