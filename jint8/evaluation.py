"""Accuracy tools: sliding-window perplexity, outlier-feature inspection, outlier amplification.

- perplexity(): HF-style strided sliding windows; every token after the first is scored exactly
  once, with up to `max_length - 1` tokens of context; one jit-compiled scoring step.
- compare_to_reference(): a tree against a reference tree on the same windows, token by token: the
  mean NLL difference and mean KL(ref || tree), each with a per-window (block) standard error.
- kl_divergence(): mean per-token KL divergence between two parameter trees of one model.
- inspect_outliers(): per Int8Dense/nn.Dense input, which input features reach the LLM.int8()
  threshold on given prompts (the paper's emergent features), and how often capacity is exceeded.
- amplify_outlier_features(): a function-preserving transform that creates large-model-like
  outliers in a small model: RMSNorm weight entries x alpha, matching input rows of the following
  projections / alpha. The float model computes the same function (exactly, for powers of two).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from jint8.errors import InvalidConfigError
from jint8.layers import Int8Dense, as_array
from jint8.progress import progress_bar
from jint8.quantize import Int8Weight

# ----------------------------------------------------------------------------- perplexity


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    stderr: float  # standard error of the perplexity, from the spread of per-window mean NLLs
    mean_nll: float
    num_tokens: int
    num_windows: int


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """A tree against a reference tree of one model, scored token by token on the same windows.

    mean_nll_diff: mean over scored tokens of NLL(tree) - NLL(reference), in nats.
    nll_diff_stderr / kl_stderr: per-window (block) standard errors. Tokens of one window share
    their context, so they are correlated and a per-token s.e. would understate the noise; each
    window's sum is one observation instead (the delta-method s.e. of a ratio mean, weighting
    windows by their token count). Windows overlap only in context, never in scored tokens, and
    are treated as independent.
    mean_kl: mean over scored tokens of KL(reference || tree) of the predicted distributions.
    """

    perplexity: PerplexityResult  # the compared tree
    reference: PerplexityResult
    mean_nll_diff: float
    nll_diff_stderr: float
    perplexity_ratio: float  # exp(mean_nll_diff) = perplexity / reference perplexity
    mean_kl: float
    kl_stderr: float
    num_tokens: int
    num_windows: int

    @property
    def percent_diff(self) -> float:
        """The perplexity difference to the reference, in percent."""
        return 100.0 * (self.perplexity_ratio - 1.0)

    @property
    def percent_diff_stderr(self) -> float:
        """s.e. of percent_diff: d ratio / d mean_nll_diff = ratio (delta method)."""
        return 100.0 * self.perplexity_ratio * self.nll_diff_stderr


def _windows(num_tokens: int, max_length: int, stride: int):
    """(begin, first_scored, end) per window; tokens [first_scored, end) are predicted."""
    scored_until = 1
    begin = 0
    while scored_until < num_tokens:
        end = min(begin + max_length, num_tokens)
        yield begin, max(scored_until, begin + 1), end
        scored_until = end
        begin += stride
        if end == num_tokens:
            break


def _window_batches(model: nn.Module, token_ids, max_length: int, stride: int) -> list:
    """The validated token ids cut into windows: (ids [1, L], score_mask [1, L]) each."""
    tokens = np.asarray(token_ids).reshape(-1)
    if tokens.size < 2:
        raise InvalidConfigError(f"perplexity needs at least 2 tokens, got {tokens.size}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise InvalidConfigError(f"token_ids must be integer token ids, got dtype {tokens.dtype}")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    # checked before the int32 cast, which would wrap 2**32 + 5 to token 5
    if vocab is not None and (tokens.min() < 0 or tokens.max() >= vocab):
        raise InvalidConfigError(f"token_ids hold ids outside [0, vocab_size={vocab}): min {tokens.min()}, "
                                 f"max {tokens.max()}")
    tokens = tokens.astype(np.int32)
    if not 0 < stride <= max_length or max_length < 2:
        raise InvalidConfigError(f"need 0 < stride={stride} <= max_length={max_length} and max_length >= 2")
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if context is not None and max_length > context:
        raise InvalidConfigError(f"max_length={max_length} exceeds the model's context "
                                 f"max_position_embeddings={context}")
    max_length = min(max_length, tokens.size)
    batches = []
    for begin, first, end in _windows(tokens.size, max_length, stride):
        ids = np.zeros((1, max_length), np.int32)
        ids[0, : end - begin] = tokens[begin:end]
        mask = np.zeros((1, max_length), bool)
        mask[0, first - begin : end - begin] = True
        batches.append((ids, mask))
    return batches


def _token_nll(logits, ids, score_mask):
    """Per-token NLL [B, L] of ids under logits [B, L, V]; 0 where score_mask is False."""
    logprobs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logprobs, ids[:, 1:, None], axis=-1)[..., 0]
    nll = jnp.where(score_mask[:, 1:], -target, 0.0)
    return jnp.pad(nll, ((0, 0), (1, 0)))


def _position_kl(ref_logits, logits):
    """KL(ref || logits) [B, L] of the next-token distribution at each position."""
    ref = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    got = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(ref) * (ref - got), axis=-1)


def token_nll_fn(model: nn.Module) -> Callable:
    """jit(params, ids [B, L], score_mask [B, L]) -> per-token NLL [B, L] (0 where not scored).

    score_mask[b, j] says whether token j is predicted (from tokens < j) and counted.
    """

    @jax.jit
    def token_nll(params, ids, score_mask):
        logits, _ = model.apply({"params": params}, ids)
        return _token_nll(logits, ids, score_mask)

    return token_nll


def _perplexity_result(sums: np.ndarray, counts: np.ndarray) -> PerplexityResult:
    """Perplexity and its s.e. from per-window NLL sums and scored-token counts."""
    mean_nll = float(sums.sum() / counts.sum())
    ppl = math.exp(mean_nll)
    window_means = sums / counts
    se_nll = float(window_means.std(ddof=1) / math.sqrt(len(sums))) if len(sums) > 1 else float("nan")
    return PerplexityResult(ppl, ppl * se_nll, mean_nll, int(counts.sum()), len(sums))


def _block_stderr(sums: np.ndarray, counts: np.ndarray) -> float:
    """s.e. of sum(sums) / sum(counts) with each window one observation (cluster-robust ratio mean)."""
    if len(sums) < 2:
        return float("nan")
    residuals = sums - counts * (sums.sum() / counts.sum())
    return float(math.sqrt(len(sums) / (len(sums) - 1) * np.sum(residuals**2)) / counts.sum())


def perplexity(
    model: nn.Module,
    params,
    token_ids: Sequence[int],
    *,
    max_length: int = 512,
    stride: int = 256,
    progress: Optional[bool] = None,
) -> PerplexityResult:
    """Perplexity of token_ids under the model with strided sliding windows (HF's recipe)."""
    batches = _window_batches(model, token_ids, max_length, stride)
    token_nll = token_nll_fn(model)
    window_sums, window_counts = [], []
    for ids, mask in progress_bar(batches, progress=progress, desc="perplexity", unit="window"):
        window_sums.append(np.asarray(token_nll(params, ids, mask), np.float64).sum())
        window_counts.append(int(mask.sum()))
    return _perplexity_result(np.asarray(window_sums), np.asarray(window_counts))


def compare_to_reference(
    model: nn.Module,
    params,
    ref_params,
    token_ids: Sequence[int],
    *,
    ref_model: Optional[nn.Module] = None,
    max_length: int = 512,
    stride: int = 256,
    progress: Optional[bool] = None,
) -> PairedComparison:
    """params (e.g. quantized) against ref_params (e.g. float32) on perplexity()'s windows, token by token.

    ref_model: the module of ref_params when it differs from model's (another compute dtype);
    the windows and scored tokens are the same for both.
    """
    ref_model = model if ref_model is None else ref_model
    batches = _window_batches(model, token_ids, max_length, stride)
    # one jitted forward per tree, so identical trees give bit-identical logits (difference and KL exactly 0)
    logits_of = jax.jit(lambda params, ids: model.apply({"params": params}, ids)[0])
    ref_logits_of = logits_of if ref_model is model else jax.jit(lambda p, ids: ref_model.apply({"params": p}, ids)[0])

    windows = ((ref_logits_of(ref_params, ids), logits_of(params, ids), ids, mask)
               for ids, mask in progress_bar(batches, progress=progress, desc="paired perplexity", unit="window"))
    return paired_statistics(windows)


@jax.jit
def _token_stats(ref_logits, logits, ids, mask):
    kl = jnp.where(mask[:, 1:], _position_kl(ref_logits[:, :-1], logits[:, :-1]), 0.0)
    return _token_nll(ref_logits, ids, mask), _token_nll(logits, ids, mask), jnp.pad(kl, ((0, 0), (1, 0)))


def paired_statistics(windows) -> PairedComparison:
    """compare_to_reference's statistics of (reference logits, logits, ids, mask) per window
    ([1, L, V] float logits, [1, L] ids and scored-token mask), for callers that hold the
    reference logits already (e.g. cached across runs)."""
    sums = {"ref": [], "nll": [], "diff": [], "kl": []}
    counts = []
    for ref_logits, logits, ids, mask in windows:
        ref_nll, nll, kl = (np.asarray(a, np.float64) for a in _token_stats(ref_logits, logits, ids, mask))
        for key, value in (("ref", ref_nll), ("nll", nll), ("diff", nll - ref_nll), ("kl", kl)):
            sums[key].append(value.sum())
        counts.append(int(mask.sum()))
    sums = {key: np.asarray(value) for key, value in sums.items()}
    counts = np.asarray(counts)
    mean_diff = float(sums["diff"].sum() / counts.sum())
    return PairedComparison(
        perplexity=_perplexity_result(sums["nll"], counts),
        reference=_perplexity_result(sums["ref"], counts),
        mean_nll_diff=mean_diff,
        nll_diff_stderr=_block_stderr(sums["diff"], counts),
        perplexity_ratio=math.exp(mean_diff),
        mean_kl=float(sums["kl"].sum() / counts.sum()),
        kl_stderr=_block_stderr(sums["kl"], counts),
        num_tokens=int(counts.sum()),
        num_windows=len(counts),
    )


def kl_divergence(model: nn.Module, ref_params, params, windows: Sequence) -> float:
    """Mean per-token KL(ref || params) in nats over every position of windows ([1, L] token ids each).

    The paired, noise-free measure of what quantization changes: perplexity differences of a few
    0.1 % are within what reordered float rounding alone moves (docs/ACCURACY.md).
    """

    @jax.jit
    def token_kl(ref_params, params, ids):
        ref, _ = model.apply({"params": ref_params}, ids)
        got, _ = model.apply({"params": params}, ids)
        return jnp.sum(_position_kl(ref, got)), ids.size

    total, count = 0.0, 0
    for ids in windows:
        kl, n = token_kl(ref_params, params, jnp.asarray(np.asarray(ids, np.int32).reshape(1, -1)))
        total, count = total + float(kl), count + int(n)
    if count == 0:
        raise InvalidConfigError("kl_divergence: no windows given")
    return total / count


# ----------------------------------------------------------------------------- outlier inspection

_INSPECT = "outlier_inspect"


def _record_inputs(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and args and isinstance(context.module, (nn.Dense, Int8Dense)):
        x = as_array(args[0])  # a deferred norm or gate (NormedInput, GatedInput) applied
        column_absmax = jnp.max(jnp.abs(x.astype(jnp.float32)).reshape(-1, x.shape[-1]), axis=0)
        context.module.sow(_INSPECT, "column_absmax", column_absmax)
    return next_fun(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class LayerOutliers:
    """Outlier statistics of one projection's input over the inspected prompts."""

    path: str
    num_features: int
    column_absmax: np.ndarray  # [num_prompts, K]: max |x| per input feature, per prompt
    threshold: float
    capacity: Optional[int]

    @property
    def outlier_features(self) -> np.ndarray:
        """Feature indices at or above the threshold in any prompt."""
        return np.nonzero((self.column_absmax >= self.threshold).any(axis=0))[0]

    @property
    def max_outlier_columns(self) -> int:
        return int((self.column_absmax >= self.threshold).sum(axis=1).max())

    @property
    def capacity_exceeded(self) -> int:
        """Number of prompts whose outlier column count exceeded the layer's capacity."""
        if self.capacity is None:
            return 0
        return int(((self.column_absmax >= self.threshold).sum(axis=1) > self.capacity).sum())

    def largest(self, n: int = 3) -> list[tuple[int, float]]:
        peak = self.column_absmax.max(axis=0)
        order = np.argsort(-peak)[:n]
        return [(int(i), float(peak[i])) for i in order]


def _kernel_capacity(params, path: tuple[str, ...]) -> Optional[int]:
    node = params
    for name in path:
        node = node.get(name) if hasattr(node, "get") else None
        if node is None:
            return None
    kernel = node.get("kernel") if hasattr(node, "get") else None
    return kernel.outlier_capacity if isinstance(kernel, Int8Weight) else None


def inspect_outliers(
    model: nn.Module, params, prompts: Sequence[Sequence[int]], *, threshold: float = 6.0
) -> list[LayerOutliers]:
    """Per projection (in parameter-path order), the input features that reach `threshold` on the prompts."""
    if threshold <= 0:
        raise InvalidConfigError(f"inspect_outliers: threshold={threshold} must be > 0")

    @jax.jit
    def column_maxima(params, ids):
        with nn.intercept_methods(_record_inputs):
            _, state = model.apply({"params": params}, ids, mutable=[_INSPECT])
        return state[_INSPECT]

    per_prompt = []
    for prompt in prompts:
        ids = np.asarray(prompt)
        ids = ids.reshape(1, -1) if ids.ndim == 1 else ids  # [T] token ids -> a batch of one
        ids = ids.astype(np.int32) if np.issubdtype(ids.dtype, np.integer) else ids
        per_prompt.append(jax.device_get(column_maxima(params, ids)))
    flat = [jax.tree_util.tree_flatten_with_path(p)[0] for p in per_prompt]
    layers = []
    for i, (key_path, _) in enumerate(flat[0]):
        names = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
        module_path = names[: names.index("column_absmax")]
        maxima = np.stack([np.asarray(f[i][1]) for f in flat])
        layers.append(
            LayerOutliers("/".join(module_path), maxima.shape[-1], maxima, threshold,
                          _kernel_capacity(unfreeze(params), module_path))
        )
    return layers


def format_outlier_table(layers: Sequence[LayerOutliers], max_indices: int = 8) -> str:
    rows = [f"{'layer':<42} {'K':>6} {'cols>=t':>7} {'cap':>5} {'over':>4}  features (largest |x|)"]
    for layer in layers:
        feats = layer.outlier_features
        shown = ",".join(str(i) for i in feats[:max_indices]) + ("…" if len(feats) > max_indices else "")
        largest = " ".join(f"{i}:{v:.1f}" for i, v in layer.largest(2))
        cap = "-" if layer.capacity is None else str(layer.capacity)
        rows.append(
            f"{layer.path:<42} {layer.num_features:>6} {layer.max_outlier_columns:>7} {cap:>5} "
            f"{layer.capacity_exceeded:>4}  [{shown}] ({largest})"
        )
    return "\n".join(rows)


def plot_outlier_heatmap(layers: Sequence[LayerOutliers], path: str, *, title: str = "") -> None:
    """PNG heat-map: rows = projections whose input is the residual stream width, columns =
    features, colour = log10 max |x|; features at the threshold are the bright stripes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = max(layer.num_features for layer in layers)
    hidden = min(layer.num_features for layer in layers)
    chosen = [layer for layer in layers if layer.num_features == hidden] or list(layers)
    # natural order: layers_2 before layers_10
    chosen.sort(key=lambda layer: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", layer.path)])
    grid = np.stack([np.log10(layer.column_absmax.max(axis=0) + 1e-6) for layer in chosen])
    fig, ax = plt.subplots(figsize=(12, min(10, max(3, 0.18 * len(chosen)))))
    image = ax.imshow(grid, aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xlabel(f"input feature (of {chosen[0].num_features})")
    ax.set_ylabel("projection")
    step = max(1, len(chosen) // 40)
    ax.set_yticks(range(0, len(chosen), step))
    ax.set_yticklabels([layer.path[-40:] for layer in chosen[::step]], fontsize=6)
    ax.set_title(title or f"max |x| per input feature (threshold {chosen[0].threshold}); widest K={width}")
    fig.colorbar(image, ax=ax, label="log10 max |x|")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- outlier amplification

_NORM_TO_PROJECTIONS = {
    "input_layernorm": ("self_attn", ("q_proj", "k_proj", "v_proj")),
    "post_attention_layernorm": ("mlp", ("gate_proj", "up_proj")),
}


def amplify_outlier_features(
    params, features: Sequence[int], alpha: float, *, layers: Optional[Sequence[int]] = None
):
    """Llama-family float params with chosen hidden features scaled up before each projection.

    RMSNorm output feature f becomes alpha * that feature; the following projections' input
    row f is divided by alpha, so every projection output, and the model, is unchanged (exactly
    when alpha is a power of two), while the Int8Dense inputs now carry |x| ~ alpha x normal:
    the large-model outlier situation LLM.int8() was built for.
    """
    if not alpha > 0:
        raise InvalidConfigError(f"amplify_outlier_features: alpha={alpha} must be > 0")
    params = jax.tree.map(lambda x: x, unfreeze(params))
    model = params.get("model", {})
    layer_names = sorted((k for k in model if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
    if not layer_names:
        raise InvalidConfigError("amplify_outlier_features: params have no model/layers_* (Llama family)")
    chosen = range(len(layer_names)) if layers is None else layers
    idx = jnp.asarray(list(features), jnp.int32)
    for i in chosen:
        layer = model[layer_names[i]]
        for norm, (block, projections) in _NORM_TO_PROJECTIONS.items():
            if norm not in layer:
                raise InvalidConfigError(f"amplify_outlier_features: {layer_names[i]} has no {norm}")
            scale = layer[norm]["scale"]
            layer[norm]["scale"] = scale.at[idx].multiply(jnp.asarray(alpha, scale.dtype))
            for name in projections:
                kernel = layer[block][name]["kernel"]
                if isinstance(kernel, Int8Weight):
                    raise InvalidConfigError(
                        f"amplify_outlier_features: {layer_names[i]}/{block}/{name} is already quantized; "
                        "apply the transform to float params, then quantize"
                    )
                layer[block][name]["kernel"] = kernel.at[idx, :].divide(jnp.asarray(alpha, kernel.dtype))
    return params
