"""The one public LLM.int8() matmul op and its backend dispatch.

Backends are tried in order; the first that supports the call runs it. An explicit backend (the
`backend=` argument, else the JINT8_BACKEND environment variable) must support the call or the op
raises BackendUnavailableError saying why. Every backend computes the recipe in reference.py.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Protocol

import jax
import jax.numpy as jnp

from jint8.errors import BackendUnavailableError, InvalidConfigError, ShapeError
from jint8.ops._platform import BACKEND_ENV_VAR, requested_backend  # noqa: F401 (re-exported)
from jint8.ops.int8_matmul import configs, sharded
from jint8.ops.int8_matmul.prologue import InputGate, InputNorm, OutputGate
from jint8.ops.int8_matmul.reference import Int8MatmulStats, int8_matmul_reference

_logger = logging.getLogger("jint8")



class Int8MatmulImpl(Protocol):
    def __call__(
        self,
        x: jax.Array,  # [M, K] ([M, 2K] with a gate)
        wq: jax.Array,  # [K, N] int8 ("kn") or [N, K] ("nk")
        col_scales: jax.Array,  # [N] float32
        bias: Optional[jax.Array],  # [N]
        *,
        threshold: float,
        outlier_capacity: int,
        out_dtype,
        weight_layout: str,
        norm: Optional[InputNorm],
        gate: Optional[InputGate],
        output_gate: Optional[OutputGate],
    ) -> tuple[jax.Array, Int8MatmulStats]: ...


@dataclasses.dataclass(frozen=True)
class Backend:
    """A named implementation and a check that returns why it cannot run a call (None if it can).

    partials_impl: optional; impl's signature, returning [S, M, N] split-K partials whose sum
    over S is impl's result before its cast to out_dtype (int8_matmul(split_partials=True)).
    Without one a call that asks for partials gets impl's result as [1, M, N]."""

    name: str
    impl: Int8MatmulImpl
    unsupported_reason: Callable[[jax.Array, jax.Array], Optional[str]]
    partials_impl: Optional[Int8MatmulImpl] = None


def _always_supported(x, wq):
    return None


_BACKENDS: list[Backend] = [Backend("xla", int8_matmul_reference, _always_supported)]


def register_backend(backend: Backend, *, first: bool = True) -> None:
    """Add (or replace) a backend; GPU kernels register themselves ahead of the XLA reference."""
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != backend.name]
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def available_backends() -> tuple[str, ...]:
    return tuple(b.name for b in _BACKENDS)


def select_backend(x: jax.Array, wq: jax.Array, backend: Optional[str] = None) -> Backend:
    """The backend that will run int8_matmul(x, wq): the requested one, or the first that can."""
    requested = backend or requested_backend()
    if requested is not None:
        match = [b for b in _BACKENDS if b.name == requested]
        if not match:
            raise BackendUnavailableError(
                f"backend={requested!r} is unknown; available: {available_backends()}"
            )
        reason = match[0].unsupported_reason(x, wq)
        if reason is not None:
            raise BackendUnavailableError(f"backend={requested!r} cannot run this call: {reason}")
        return match[0]
    for candidate in _BACKENDS:
        reason = candidate.unsupported_reason(x, wq)
        if reason is None:
            return candidate
        _logger.debug("int8_matmul: skipped backend %s: %s", candidate.name, reason)
    raise BackendUnavailableError("no int8_matmul backend supports this call")  # xla always does


def int8_matmul(
    x: jax.Array,
    wq: jax.Array,
    col_scales: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    threshold: float = 6.0,
    outlier_capacity: int = 64,
    out_dtype=None,
    weight_layout: str = "kn",
    backend: Optional[str] = None,
    return_stats: bool = False,
    norm: Optional[InputNorm] = None,
    gate: Optional[InputGate] = None,
    output_gate: Optional[OutputGate] = None,
    split_partials: bool = False,
    layout: Optional[sharded.MatmulLayout] = None,
):
    """LLM.int8() matmul with outlier decomposition.

    Args:
      x: [..., K] float activations (f32, bf16 or f16).
      wq: int8 weight quantized per output feature: [K, N] (weight_layout="kn", Flax's kernel
        layout) or [N, K] (weight_layout="nk", K-major: bitsandbytes' layout, and what
        Int8Weight stores, because int8 tensor-core MMAs read both operands K-major).
      col_scales: [N] float32 absmax of each output feature of the weight.
      bias: optional [N].
      threshold: |x| >= threshold marks an outlier column (16-bit path); 0 disables it.
      outlier_capacity: static bound on gathered outlier columns; more fall back exactly.
      out_dtype: output dtype, default x.dtype.
      weight_layout: "kn" or "nk", see wq.
      backend: "xla", a registered kernel name, or None (env JINT8_BACKEND, else first that fits).
      return_stats: also return Int8MatmulStats (outlier column count, overflow flag).
      norm: an InputNorm (RMSNorm over K, output in x.dtype) applied to x first; the decode
        kernel does it in its prologue, so a model's norm costs no kernel of its own, for calls
        of at most configs.FUSED_NORM_MAX_M rows (more rows: the op applies it first, see
        _routed_prologue). Its
        float32 sum of squares may be summed in another order than XLA's (last-bit differences
        in 1/rms); every other route is bit-identical to int8_matmul(norm(x), ...).
      gate: an InputGate: x is [..., 2K] = gate | up (a fused gate_up projection's output) and
        the op's input is act(gate) * up in x.dtype (reference.gated_activation's roundings);
        the decode kernel forms it in its prologue, so no multiply kernel runs, for calls of at
        most configs.FUSED_GATE_MAX_M rows (more rows: the op applies it first). Its float32
        sigmoid (exp, division) may differ from XLA's in the last bit on a GPU; every other
        route is bit-identical to int8_matmul(gate(x), ...). Not together with norm.
      output_gate: an OutputGate: wq is a fused gate|up projection (N = 2I, gate's features
        first) and the op returns act(gate) * up [..., I] of its [..., N] result (in out_dtype,
        reference.gated_activation's roundings); the decode kernel forms it in its epilogue, so
        no multiply kernel runs and the [..., N] product is never written. The same last-bit
        caveat as gate's applies to its sigmoid on a GPU; every other route is bit-identical to
        output_gate(int8_matmul(x, ...)).
      split_partials: return [S, ..., N] instead, whose sum over S in float32, cast to
        out_dtype, is the result: the decode kernel's float32 split-K partials where its plan
        allows it (FusedConfig.split_partials; for a consumer that adds them where it reads them,
        as the decode-attention kernel does with a q|k|v projection's), else S = 1.
      layout: how x (as [M, K], its rows flattened) and wq are split over a mesh
        (sharded.layout_for(mesh, x_spec, w_spec)): each device runs the op on its own shard
        under sharded.py's rule (row scales and outlier columns of the whole call, exact int32
        all-reduce over a split K). Operands whose types carry Explicit-axis shardings need
        none: the op reads it from them. On Auto axes without one, XLA partitions the XLA
        backend by itself (same rule) and runs a kernel backend replicated.
    Returns:
      [..., N] in out_dtype ([..., N / 2] with output_gate) (and the stats when asked).
    """
    if norm is not None and gate is not None:
        raise InvalidConfigError("int8_matmul: norm= and gate= cannot be combined (an RMSNorm "
                                 "and a gated activation of one input); apply one first")
    _validate(x, wq, col_scales, bias, threshold, outlier_capacity, weight_layout, gate)
    if output_gate is not None and col_scales.shape[0] % 2:
        raise ShapeError(f"int8_matmul: output_gate={output_gate} needs an even N (gate | up), "
                         f"got col_scales.shape={col_scales.shape}")
    if norm is not None and norm.scale.shape != (x.shape[-1],):
        raise ShapeError(
            f"int8_matmul: norm.scale.shape={norm.scale.shape} must be ({x.shape[-1]},), x's last axis")
    k = wq.shape[0] if weight_layout == "kn" else wq.shape[1]
    batch_shape = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    x2d, gate = _routed_prologue(x2d, gate, configs.FUSED_GATE_MAX_M)
    layout = layout or sharded.typed_layout(x2d, wq, weight_layout)
    if layout is None or not layout.k:  # a norm over a split K stays with sharded.py (below)
        x2d, norm = _routed_prologue(x2d, norm, configs.FUSED_NORM_MAX_M)
    chosen = select_backend(x2d, wq, backend)
    if layout is not None:  # each device runs its shard; split-K partials do not apply (S = 1)
        y, stats = sharded.int8_matmul_sharded(
            x2d, wq, col_scales, bias, layout=layout, impl=chosen.impl, threshold=float(threshold),
            outlier_capacity=int(outlier_capacity), out_dtype=out_dtype or x.dtype, weight_layout=weight_layout,
            norm=norm, gate=gate, output_gate=output_gate)
        y = (y[None] if split_partials else y).reshape(*((1,) if split_partials else ()), *batch_shape, y.shape[-1])
        return (y, stats) if return_stats else y
    impl = chosen.partials_impl if split_partials and chosen.partials_impl else chosen.impl
    y, stats = impl(
        x2d,
        wq,
        col_scales,
        bias,
        threshold=float(threshold),
        outlier_capacity=min(int(outlier_capacity), k),
        out_dtype=out_dtype or x.dtype,
        weight_layout=weight_layout,
        norm=norm,
        gate=gate,
        output_gate=output_gate,
    )
    if split_partials and impl is chosen.impl:
        y = y[None]
    y = y.reshape(*y.shape[:-2], *batch_shape, y.shape[-1])
    return (y, stats) if return_stats else y


def _routed_prologue(x2d, prologue, max_rows: int):
    """(x2d, prologue) as the backends get them: an InputNorm or InputGate folded into the call
    (kept) for at most max_rows rows, else applied to x2d first (x2d through it, None): the
    decode kernel's prologue pays at those rows only (docs/decisions.md D12, D13). Either way
    the recipe quantizes the same prologue(x), so only the fused kernel's own last-bit
    differences (int8_matmul's norm= and gate=) depend on it. A norm whose K is split over a
    mesh is left to sharded.py, which gathers each row for it (the unsharded op's bits)."""
    if prologue is None or x2d.shape[0] <= max_rows:
        return x2d, prologue
    return prologue(x2d), None


def _validate(x, wq, col_scales, bias, threshold, outlier_capacity, weight_layout, gate):
    if weight_layout not in ("kn", "nk"):
        raise InvalidConfigError(f"int8_matmul: weight_layout={weight_layout!r} must be 'kn' or 'nk'")
    layout = "[K, N]" if weight_layout == "kn" else "[N, K]"
    if wq.ndim != 2:
        raise ShapeError(f"int8_matmul: wq must be 2-D {layout}, got shape {wq.shape}")
    if wq.dtype != jnp.int8:
        raise ShapeError(f"int8_matmul: wq must be int8, got {wq.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(f"int8_matmul: x must be floating point, got {x.dtype}")
    k, n = wq.shape if weight_layout == "kn" else wq.shape[::-1]
    if gate is not None and (x.ndim < 1 or x.shape[-1] != 2 * k):
        raise ShapeError(
            f"int8_matmul: with gate={gate}, x.shape={x.shape} must end in 2 * K = {2 * k} "
            f"(gate | up) for wq.shape={wq.shape} (weight_layout={weight_layout!r}, wq is {layout})"
        )
    if gate is None and (x.ndim < 1 or x.shape[-1] != k):
        raise ShapeError(
            f"int8_matmul: x.shape={x.shape} does not contract with wq.shape={wq.shape} "
            f"(weight_layout={weight_layout!r}, wq is {layout})"
        )
    if col_scales.shape != (n,):
        raise ShapeError(f"int8_matmul: col_scales.shape={col_scales.shape} must be ({n},)")
    if bias is not None and bias.shape != (n,):
        raise ShapeError(f"int8_matmul: bias.shape={bias.shape} must be ({n},)")
    if threshold < 0:
        raise InvalidConfigError(f"int8_matmul: threshold={threshold} must be >= 0")
    if outlier_capacity < 0:
        raise InvalidConfigError(f"int8_matmul: outlier_capacity={outlier_capacity} must be >= 0")
