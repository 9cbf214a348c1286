"""Fuse the projections that read the same input into one matmul: q/k/v and gate/up.

At decode time (one token per step) every projection is a small, bandwidth-bound matmul and a
kernel launch of its own; the GPU profile of an 8B-shaped int8 model (benchmarks/RESULTS.md) shows
the 4096x1024 k/v projections reaching a fifth of the copy bandwidth. Concatenating the weights
along their output axis once, after loading, turns seven matmuls per Llama layer into four.

For LLM.int8() this is exact: the row scales and the outlier columns depend only on the shared
input, and every output column keeps its own weight scale, so the fused layer computes the same
int8 values and accumulators as the separate ones (only float32 summation order in the kernels'
epilogues can differ). Kernels with different LLM.int8() settings (e.g. calibrated per-layer
thresholds) are left separate. Which projections fuse is each family's ModelSpec.fusions
(llama.py declares q/k/v -> `qkv_proj` and gate/up -> `gate_up_proj`, which its modules use when
the params hold them); loaders and exporters see the checkpoint's own names, so fuse after
loading and keep the unfused tree for export_bitsandbytes.
"""

from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence

import jax.numpy as jnp

from jint8.models.spec import Fusion
from jint8.quant4 import Int4Weight
from jint8.quantize import Int8Weight

_logger = logging.getLogger("jint8")


def fuse_projections(params, fusions: Optional[Sequence[Fusion]] = None):
    """A new param tree whose attention/MLP blocks hold each fusion's fused module (Llama's
    `qkv_proj` and `gate_up_proj`) instead of its parts, wherever the parts can be fused (same
    kind: all float kernels or all Int8Weight with equal settings; biases on all or none). Pure;
    idempotent. fusions: default every registered family's (jint8.models.registered_fusions)."""
    from flax.core import FrozenDict, freeze, unfreeze

    if fusions is None:
        from jint8.models import registered_fusions  # the registry imports this module

        fusions = registered_fusions()
    if isinstance(params, FrozenDict):
        return freeze(fuse_projections(unfreeze(params), fusions))
    if not isinstance(params, Mapping):
        raise TypeError(f"fuse_projections: params must be a Linen param dict, got {type(params).__name__}")
    return _walk(dict(params), (), tuple(fusions))


def __getattr__(name: str):
    # FUSIONS, the old module constant, now derived from the registry (ModelSpec.fusions)
    if name == "FUSIONS":
        from jint8.models import registered_fusions

        return registered_fusions()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _walk(node: dict, path: tuple, fusions: tuple[Fusion, ...]) -> dict:
    out = {}
    for key, child in node.items():
        out[key] = _walk(dict(child), path + (key,), fusions) if isinstance(child, Mapping) else child
    for parent, fused, parts in fusions:
        if path and path[-1] == parent and all(p in out for p in parts):
            merged = _fuse([out[p] for p in parts], "/".join(path))
            if merged is not None:
                for p in parts:
                    del out[p]
                out[fused] = merged
    return out


def _fuse(modules: list, where: str):
    """{"kernel", "bias"?} of the fused module, or None when the parts cannot be fused."""
    if any(set(m) - {"kernel", "bias"} for m in modules):
        return None
    has_bias = ["bias" in m for m in modules]
    if any(has_bias) and not all(has_bias):
        return None
    kernels = [m["kernel"] for m in modules]
    if any(isinstance(k, Int4Weight) for k in kernels):
        kernel = _fuse_int4(kernels, where)
        if kernel is None:
            return None
    elif all(isinstance(k, Int8Weight) for k in kernels):
        first = kernels[0]
        settings = {(k.in_ndim, k.threshold, k.outlier_capacity) for k in kernels}
        if len(settings) != 1 or any(k.qvalue.ndim != 2 for k in kernels):
            _logger.debug("fuse_projections: %s kept separate (LLM.int8 settings differ: %s)", where, settings)
            return None
        kernel = first.replace(qvalue=jnp.concatenate([k.qvalue for k in kernels], axis=0),
                               scale=jnp.concatenate([k.scale for k in kernels], axis=0))
    elif not any(isinstance(k, Int8Weight) for k in kernels):
        if len({(k.ndim, k.shape[0], k.dtype) for k in kernels}) != 1 or kernels[0].ndim != 2:
            return None
        kernel = jnp.concatenate(kernels, axis=1)
    else:
        return None
    fused = {"kernel": kernel}
    if all(has_bias):
        fused["bias"] = jnp.concatenate([m["bias"] for m in modules], axis=0)
    return fused


def _fuse_int4(kernels: list, where: str):
    """The Int4Weight of the parts' [out, in] weights stacked along out, or None (logged) when that
    is not exact: 4-bit blocks run over the flattened weight, so each part must hold whole blocks.
    Doubly quantized parts each have their own offset and 256-block groups: the fused weight
    keeps their float32 block absmax instead (the values dequantize uses; 4 bytes a block)."""
    if not all(isinstance(k, Int4Weight) for k in kernels):
        _logger.warning("fuse_projections: %s kept separate (4-bit and other kernels mixed)", where)
        return None
    first = kernels[0]
    settings = {(k.shape[1], k.quant_type, k.blocksize, k.dtype, k.compute_dtype) for k in kernels}
    if len(settings) != 1:
        _logger.warning("fuse_projections: %s kept separate (4-bit settings differ: %s)", where, settings)
        return None
    if any(k.numel % k.blocksize for k in kernels):
        _logger.warning("fuse_projections: %s kept separate: a part's %s weight is not a whole number of "
                        "%d-value 4-bit blocks, so concatenating would move block boundaries",
                        where, [k.shape for k in kernels], first.blocksize)
        return None
    nested = any(k.double_quant for k in kernels)
    absmax = [k.block_absmax() if nested else k.absmax for k in kernels]
    return Int4Weight(packed=jnp.concatenate([k.packed for k in kernels], axis=0),
                      absmax=jnp.concatenate(absmax, axis=0),
                      shape=(sum(k.shape[0] for k in kernels), first.shape[1]), quant_type=first.quant_type,
                      blocksize=first.blocksize, dtype=first.dtype, compute_dtype=first.compute_dtype)
