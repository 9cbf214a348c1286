"""Scale migration folded into the float model (SmoothQuant-style), exact in floating point.

A projection y = x @ W computes the same y from x / s and W with its input rows times s
(W'[k, :] = s[k] W[k, :]). Where x is the output of something linear in the features k, the
division by s folds into that producer, so the model computes the same function with different
int8 inputs: the activations lose their large features (easier per-token int8) and the weight rows
of those features gain precision against their output channel's absmax. Producers in a pre-norm
Llama layer:

- "attn_in":  input_layernorm's weight (RMSNorm(x) * w / s) -> q/k/v_proj rows * s
- "mlp_in":   post_attention_layernorm's weight -> gate/up_proj rows * s
- "attn_out": v_proj's output columns / s (and bias) -> o_proj rows * s; attention is linear in v,
              and with grouped-query attention o_proj's row (h, d) reads kv head h // (H / KV), so
              one scale per (kv head, d) serves every query head of its group
- "mlp_out":  up_proj's output columns / s (and bias) -> down_proj rows * s; act(gate) * up is
              linear in up

Every s is a power of two (s = 2**e, e an int8 exponent), so each scaled value is the same
float with another exponent: rounding commutes with it, and the migrated float model computes
bit-identical logits (as long as no value leaves the normal range: |e| <= MAX_EXPONENT keeps
float32/bfloat16 weights of a trained model far from it). The producer's int8 quantization is
unchanged too: v_proj's and up_proj's per-output-channel scales absorb the column factor exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np

from jint8.errors import InvalidConfigError

MAX_EXPONENT = 8  # |log2 s| at most: weights of a trained model stay far inside float16/bf16/f32 range


@dataclasses.dataclass(frozen=True)
class MigrationSite:
    """One place where a per-feature scale folds exactly: a producer and the projections reading it.

    producer: ("norm", path of the norm's param dict) or ("columns", (kernel module paths,)),
      paths '/'-joined. consumers: module paths of the projections whose input rows take s.
    expand: [K] int, consumer input feature k -> producer feature expand[k] (identity except for
      grouped-query attention's o_proj); the site has expand.max() + 1 scales.
    """

    name: str  # e.g. "model/layers_3/attn_in"
    producer: tuple[str, tuple[str, ...]]
    consumers: tuple[str, ...]
    expand: np.ndarray

    @property
    def num_scales(self) -> int:
        return int(self.expand.max()) + 1


def _node(params, path: str):
    node = params
    for name in path.split("/"):
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


def llama_sites(params, config) -> list[MigrationSite]:
    """The migration sites of a jint8 Llama-family param tree (unfused: q/k/v, gate/up separate).

    Gemma's RMSNorm multiplies by (1 + w), where a power-of-two factor does not fold exactly, so
    its norm sites are left out (its attn_out / mlp_out sites remain)."""
    if _node(params, "model/layers_0/self_attn/qkv_proj") is not None or _node(params, "model/layers_0/mlp/gate_up_proj") is not None:
        raise InvalidConfigError("scale migration needs the unfused tree (q/k/v_proj, gate/up_proj): "
                                 "migrate before fuse_projections")
    norms_fold = not getattr(config, "norm_unit_offset", False)
    n_rep = config.num_heads // config.num_kv_heads
    head_dim = config.head_dim
    heads = np.arange(config.num_heads * head_dim)
    gqa_expand = (heads // head_dim // n_rep) * head_dim + heads % head_dim
    sites = []
    for layer in range(config.num_layers):
        base = f"model/layers_{layer}"
        attn, mlp = f"{base}/self_attn", f"{base}/mlp"
        if _node(params, f"{attn}/q_proj/kernel") is None:
            raise InvalidConfigError(f"scale migration: {attn}/q_proj/kernel not found (not a jint8 Llama tree?)")
        if norms_fold:
            sites.append(MigrationSite(f"{base}/attn_in", ("norm", (f"{base}/input_layernorm",)),
                                       tuple(f"{attn}/{p}" for p in ("q_proj", "k_proj", "v_proj")),
                                       np.arange(config.hidden_size)))
            mlp_norm = "pre_feedforward_layernorm" if getattr(config, "sandwich_norms", False) else "post_attention_layernorm"
            sites.append(MigrationSite(f"{base}/mlp_in", ("norm", (f"{base}/{mlp_norm}",)),
                                       (f"{mlp}/gate_proj", f"{mlp}/up_proj"), np.arange(config.hidden_size)))
        sites.append(MigrationSite(f"{base}/attn_out", ("columns", (f"{attn}/v_proj",)), (f"{attn}/o_proj",),
                                   gqa_expand))
        sites.append(MigrationSite(f"{base}/mlp_out", ("columns", (f"{mlp}/up_proj",)), (f"{mlp}/down_proj",),
                                   np.arange(config.intermediate_size)))
    return sites


def _scaled(array, exponents: np.ndarray, axis: int):
    """array * 2**exponents along axis (exact: ldexp only changes the exponent)."""
    shape = [1] * array.ndim
    shape[axis] = -1
    e = jnp.asarray(exponents.reshape(shape), jnp.int32)
    return jnp.ldexp(array.astype(jnp.float32), e).astype(array.dtype)


def fold_scales(params, sites, exponents: Mapping[str, np.ndarray]):
    """A new param tree with s = 2**exponents[site.name] migrated at each named site (others as
    they are): producers divided by s, consumer input rows multiplied by s. Pure."""
    from flax.core import FrozenDict, freeze, unfreeze

    if isinstance(params, FrozenDict):
        return freeze(fold_scales(unfreeze(params), sites, exponents))
    params = _copy_tree(params)
    by_name = {site.name: site for site in sites}
    if unknown := sorted(set(exponents) - set(by_name)):
        raise InvalidConfigError(f"fold_scales: no migration site named {unknown[:3]}")
    for name, e in exponents.items():
        site = by_name[name]
        e = np.asarray(e)
        if e.shape != (site.num_scales,) or not np.issubdtype(e.dtype, np.integer):
            raise InvalidConfigError(f"fold_scales: {name} needs {site.num_scales} integer exponents, got "
                                     f"{e.dtype} {e.shape}")
        if np.abs(e).max(initial=0) > MAX_EXPONENT:
            raise InvalidConfigError(f"fold_scales: {name} exponents must be within ±{MAX_EXPONENT}")
        kind, paths = site.producer
        for path in paths:
            node = _node(params, path)
            if kind == "norm":
                node["scale"] = _scaled(node["scale"], -e, 0)
            else:
                node["kernel"] = _scaled(node["kernel"], -e, 1)
                if "bias" in node:
                    node["bias"] = _scaled(node["bias"], -e, 0)
        for path in site.consumers:
            node = _node(params, path)
            node["kernel"] = _scaled(node["kernel"], e[site.expand], 0)
    return params


def _copy_tree(tree):
    return {k: _copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def smoothing_exponents(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float,
                        expand: Optional[np.ndarray] = None) -> np.ndarray:
    """SmoothQuant's s = max|x|**alpha / max|w|**(1 - alpha) per producer feature, as a power of
    two centred on 1 (int8 is scale-free per row and column; only the ratios between features
    matter): e = round(log2 s - mean log2 s), clipped to ±MAX_EXPONENT.

    act_absmax: [K] max |x| per consumer input feature; weight_absmax: [K] max |W| over each
    consumer row (all consumers); expand: the site's [K] -> producer map (features sharing a
    scale take their largest statistics)."""
    act = np.asarray(act_absmax, np.float64)
    weight = np.asarray(weight_absmax, np.float64)
    if expand is not None:
        size = int(expand.max()) + 1
        act = np.maximum.reduceat(act[np.argsort(expand, kind="stable")], _group_starts(expand, size))
        weight = np.maximum.reduceat(weight[np.argsort(expand, kind="stable")], _group_starts(expand, size))
    tiny = np.finfo(np.float32).tiny
    log_s = alpha * np.log2(np.maximum(act, tiny)) - (1 - alpha) * np.log2(np.maximum(weight, tiny))
    live = (act > 0) & (weight > 0)  # a dead feature keeps s = 1
    if not live.any():
        return np.zeros(act.shape, np.int8)
    log_s = np.where(live, log_s - log_s[live].mean(), 0.0)
    return np.clip(np.rint(log_s), -MAX_EXPONENT, MAX_EXPONENT).astype(np.int8)


def _group_starts(expand: np.ndarray, size: int) -> np.ndarray:
    counts = np.bincount(expand, minlength=size)
    if (counts == 0).any():
        raise InvalidConfigError("a migration site's expand map must reach every producer feature")
    return np.concatenate([[0], np.cumsum(counts)[:-1]])
