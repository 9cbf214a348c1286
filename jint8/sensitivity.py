"""Per-projection int8 sensitivity: the KL to the float model with only some projections int8.

calibration.calibrate_model uses it for the skip list (`skip_budget`): `module_sensitivity`
measures each projection (or each projection group) alone, through one compiled forward in which a
traced mask switches projections to their int8 call (`partial_int8_kl`), and `choose_skip_modules`
keeps the most harmful per weight in 16 bits within the budget.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jint8.errors import InvalidConfigError
from jint8.layers import as_array, int8_weight_apply
from jint8.progress import progress_bar
from jint8.quantize import Int8Config, Int8Weight, _path_names, quantize_params


def token_windows(token_ids, window: int) -> list[np.ndarray]:
    """Consecutive non-overlapping [1, window] int32 calls cut from token_ids (the tail dropped)."""
    tokens = np.asarray(token_ids).reshape(-1)
    if window < 2:
        raise InvalidConfigError(f"window={window} must be >= 2")
    if tokens.size < window:
        raise InvalidConfigError(f"calibration needs at least window={window} tokens, got {tokens.size}")
    return [tokens[i : i + window].astype(np.int32)[None] for i in range(0, tokens.size - window + 1, window)]


SKIP_GRANULARITIES = ("layer", "group")


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """What int8 costs in one place: the KL to the float model when only `module` is int8."""

    module: str  # a skip_modules pattern: one projection's path ("model/layers_3/self_attn/v_proj") or a group ("v_proj")
    kl: float  # mean per-token KL(float || only this module int8) on the sensitivity windows, nats
    weight_fraction: float  # its share of the quantized kernel elements

    @property
    def harm_per_weight(self) -> float:
        return self.kl / max(self.weight_fraction, 1e-12)


def partial_int8_kl(model: nn.Module, params, int8_params, selections: Sequence[Sequence[str]],
                    windows: Sequence[np.ndarray], *, progress: Optional[bool] = None) -> list[float]:
    """Per selection (a set of module paths), the mean per-token KL(float || the model with only
    those projections int8) over windows ([1, L] token ids each).

    int8_params: quantize_params(params, config); every selected path must be an Int8Weight there.
    One jit-compiled forward serves every selection: an interceptor runs each projection's float
    call and, where a traced mask selects it, replaces the output by the int8 call (lax.cond: only
    the taken branch runs). So nothing recompiles per selection (210 projections for SmolLM2), and
    the unselected projections compute bit for bit what the float reference computed.
    """
    paths = sorted({path for selection in selections for path in selection})
    order = {path: i for i, path in enumerate(paths)}
    weights = {path: (_module_params(int8_params, path)["kernel"], _module_params(params, path).get("bias"))
               for path in paths}
    if bad := [path for path, (kernel, _) in weights.items() if not isinstance(kernel, Int8Weight)]:
        raise InvalidConfigError(f"partial_int8_kl: {bad[:3]} are not Int8Weight kernels in int8_params")

    logprobs = _selectively_int8_logprobs(model, order)
    reference_logprobs = jax.jit(logprobs)

    @jax.jit
    def token_kl(params, weights, mask, ids, reference):
        return jnp.sum(jnp.exp(reference) * (reference - logprobs(params, weights, mask, ids)))

    masks = np.zeros((len(selections), max(len(paths), 1)), bool)
    for row, selection in enumerate(selections):
        masks[row, [order[path] for path in selection]] = True
    totals, count = np.zeros(len(selections)), 0
    with progress_bar(total=len(windows) * len(selections), progress=progress,
                      desc="int8 sensitivity", unit="pass") as bar:
        for ids in windows:  # one window's float log-probs ([L, vocab] f32) held at a time
            ids = jnp.asarray(np.asarray(ids, np.int32).reshape(1, -1))
            reference = reference_logprobs(params, weights, np.zeros(masks.shape[1], bool), ids)
            for row, mask in enumerate(masks):
                totals[row] += float(token_kl(params, weights, mask, ids, reference))
                bar.update()
            count += ids.size
    return list(totals / count)


def _selectively_int8_logprobs(model: nn.Module, order: dict[str, int]):
    """(params, weights {path: (Int8Weight, bias)}, mask [len(order)] bool, ids [1, L]) -> float32
    log-probs [1, L, vocab] of the model whose projection `path` is int8 where mask[order[path]]."""

    def logprobs(params, weights, mask, ids):
        def int8_where_selected(next_fun, args, kwargs, context):
            y = next_fun(*args, **kwargs)
            path = "/".join(context.module.scope.path)
            if context.method_name != "__call__" or path not in order:
                return y
            kernel, bias = weights[path]
            dtype = getattr(context.module, "dtype", None)  # as Int8Dense calls int8_weight_apply
            int8_y = lambda: int8_weight_apply(as_array(args[0]), kernel, bias, dtype=dtype)[0].astype(y.dtype)  # noqa: E731
            return jax.lax.cond(mask[order[path]], int8_y, lambda: y)

        with nn.intercept_methods(int8_where_selected):
            logits, _ = model.apply({"params": params}, ids)
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    return logprobs


def module_sensitivity(model: nn.Module, params, token_ids: Sequence[int], config: Int8Config, *,
                       granularity: str = "layer", window: int = 512, max_windows: int = 2,
                       compute_dtype=jnp.float32, progress: Optional[bool] = None) -> list[Sensitivity]:
    """KL to the float model when only one projection (granularity "layer") or one projection group
    ("group": e.g. every layer's v_proj) is int8 with config, on the first max_windows windows of
    token_ids; one entry per quantized projection (or group), in parameter-path order.

    compute_dtype: the model runs in it for this pass (None: as given). float32 by default because
    in bfloat16 any change to one projection, even one ulp of one weight, sends everything after it
    down another rounding path, and that alone costs SmolLM2-135M 0.0004-0.0007 nats/token (more
    the earlier the layer; float32: < 1e-8) — as much as one projection's int8 error, so bfloat16
    KLs would rank projections by their size and depth rather than by their int8 error.
    """
    if granularity not in SKIP_GRANULARITIES:
        raise InvalidConfigError(f"granularity={granularity!r} must be one of {SKIP_GRANULARITIES}")
    if max_windows < 1:
        raise InvalidConfigError(f"max_windows={max_windows} must be >= 1")
    windows = token_windows(token_ids, window)[:max_windows]
    if compute_dtype is not None:
        model, params = _with_compute_dtype(model, params, compute_dtype)
    int8_params = quantize_params(params, config)
    sizes = _int8_kernel_sizes(int8_params, config)
    members: dict[str, list[str]] = {}
    for path in sizes:
        members.setdefault(path if granularity == "layer" else path.rsplit("/", 1)[-1], []).append(path)
    kls = partial_int8_kl(model, params, int8_params, list(members.values()), windows, progress=progress)
    total = sum(sizes.values())
    return [Sensitivity(name, kl, sum(sizes[p] for p in paths) / total)
            for (name, paths), kl in zip(members.items(), kls)]


def _with_compute_dtype(model: nn.Module, params, dtype):
    """The model (its `config.dtype`, as every jint8 model has) and float params in dtype."""
    config = getattr(model, "config", None)
    if not (dataclasses.is_dataclass(config) and hasattr(config, "dtype")):
        raise InvalidConfigError(f"compute_dtype: {type(model).__name__} has no config.dtype to set; "
                                 "pass compute_dtype=None to measure in the model's own dtype")
    cast = lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x  # noqa: E731
    return model.clone(config=dataclasses.replace(config, dtype=dtype)), jax.tree.map(cast, params)


def _int8_kernel_sizes(int8_params, config: Int8Config) -> dict[str, int]:
    """{module path: kernel elements} of the Int8Weight kernels (not int8 embeddings)."""
    sizes = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(
            int8_params, is_leaf=lambda x: isinstance(x, Int8Weight))[0]:
        names = _path_names(key_path)
        if isinstance(leaf, Int8Weight) and names[-1] in config.kernel_names:
            sizes["/".join(names[:-1])] = int(leaf.qvalue.size)
    return sizes


def _module_params(params, path: str):
    node = params
    for name in path.split("/"):
        node = node[name]
    return node


def choose_skip_modules(sensitivity: Sequence[Sensitivity], *, skip_budget: float,
                        outlier_factor: float = 2.0) -> tuple[str, ...]:
    """Modules kept in 16 bits, chosen by harm per weight (KL / weight_fraction): those at least
    outlier_factor x the median module's, most harmful per weight first, while their combined
    weight fraction stays within skip_budget (one that does not fit is passed over for smaller
    ones: a greedy knapsack). Nothing stands out -> nothing is skipped."""
    if not sensitivity or skip_budget <= 0:
        return ()
    median = float(np.median([s.harm_per_weight for s in sensitivity]))
    candidates = sorted((s for s in sensitivity if s.harm_per_weight >= outlier_factor * median),
                        key=lambda s: -s.harm_per_weight)
    chosen, used = [], 0.0
    for s in candidates:
        if used + s.weight_fraction <= skip_budget:
            chosen.append(s.module)
            used += s.weight_fraction
    return tuple(chosen)
