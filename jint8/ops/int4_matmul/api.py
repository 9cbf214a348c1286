"""The public 4-bit (NF4 / FP4) matmul op and its backend dispatch.

Backends are tried in order ("pallas_triton", then "xla"); the first that supports the call runs
it. The `backend=` argument must name one this op has that can run the call, or the op raises
BackendUnavailableError saying why. JINT8_BACKEND, the switch every jint8 op shares, is a
preference: its backend is tried first, and a name this op lacks or a kernel that cannot run the
call (pallas_triton on a CPU, or on a weight it does not read in place) falls through to the
first backend that fits, so one environment setting serves every op. Every backend computes
reference.py's recipe (bitsandbytes' dequantize-then-matmul).

The weight is an Int4Weight (jint8.quant4) used through its fields and dequantize() only, so
this op imports no Flax: packed codes of the torch Linear weight [N, K] flattened row-major in
blocks, exactly as bitsandbytes stores them. On a mesh (a split along N, read from Explicit-axis
types or given as layout=) each device runs the backend on its own rows (shard_map); only that
path reads quant4's split rule, imported when it runs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jint8.errors import BackendUnavailableError, ShapeError
from jint8.ops._platform import BACKEND_ENV_VAR, requested_backend
from jint8.ops._sharding import MatmulLayout, spec_entry, typed_layout
from jint8.ops.int4_matmul.reference import int4_matmul_reference

_logger = logging.getLogger("jint8")


class Int4MatmulImpl(Protocol):
    def __call__(self, x: jax.Array, w, bias: Optional[jax.Array], *, compute_dtype, out_dtype) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Backend:
    """A named implementation and a check returning why it cannot run a call (None if it can)."""

    name: str
    impl: Int4MatmulImpl
    unsupported_reason: Callable[[jax.Array, object], Optional[str]]


def _always_supported(x, w):
    return None


_BACKENDS: list[Backend] = [Backend("xla", int4_matmul_reference, _always_supported)]


def register_backend(backend: Backend, *, first: bool = True) -> None:
    """Add (or replace) a backend; GPU kernels register themselves ahead of the XLA reference."""
    _BACKENDS[:] = [b for b in _BACKENDS if b.name != backend.name]
    _BACKENDS.insert(0 if first else len(_BACKENDS), backend)


def available_backends() -> tuple[str, ...]:
    return tuple(b.name for b in _BACKENDS)


def select_backend(x: jax.Array, w, backend: Optional[str] = None) -> Backend:
    """The backend that will run int4_matmul(x, w): the requested one, or the first that can."""
    if backend is not None:
        match = [b for b in _BACKENDS if b.name == backend]
        if not match:
            raise BackendUnavailableError(f"int4_matmul: backend={backend!r} is unknown; available: "
                                          f"{available_backends()}")
        reason = match[0].unsupported_reason(x, w)
        if reason is not None:
            raise BackendUnavailableError(f"int4_matmul: backend={backend!r} cannot run this call: {reason}")
        return match[0]
    from_env = requested_backend()
    candidates = [b for b in _BACKENDS if b.name == from_env] + [b for b in _BACKENDS if b.name != from_env]
    if from_env is not None and from_env not in available_backends():
        _logger.debug("int4_matmul: %s=%s names no 4-bit backend; using the first that fits",
                      BACKEND_ENV_VAR, from_env)
    for candidate in candidates:
        reason = candidate.unsupported_reason(x, w)
        if reason is None:
            return candidate
        _logger.debug("int4_matmul: skipped backend %s: %s", candidate.name, reason)
    raise BackendUnavailableError("no int4_matmul backend supports this call")  # xla always does


def int4_matmul(x: jax.Array, w, bias: Optional[jax.Array] = None, *, dtype=None, out_dtype=None,
                backend: Optional[str] = None, layout: Optional[MatmulLayout] = None) -> jax.Array:
    """x [..., K] times a 4-bit weight: y [..., N] = x @ dequantize(w).T + bias, as bitsandbytes'
    Linear4bit computes it.

    Args:
      x: [..., K] float activations.
      w: an Int4Weight of shape (N, K) (a torch Linear weight, bitsandbytes' layout).
      bias: optional [N].
      dtype: the compute dtype (bnb_4bit_compute_dtype): x and the dequantized weight are cast to
        it and the matmul runs in it; default w.compute_dtype if set, else x.dtype.
      out_dtype: the result's dtype, default x.dtype (bitsandbytes casts back to the input's).
      backend: "xla", a registered kernel name, or None (JINT8_BACKEND if it names one of this
        op's backends, else the first that fits).
      layout: how x (as [M, K]) and the weight are split over a mesh (ops/_sharding.py's
        MatmulLayout; N only: quant4.int4_weight_specs' splits): each device runs the backend
        on its own rows of the weight, a valid Int4Weight of [N / D, K] (shard_map). A weight
        whose arrays' types carry an Explicit-axis split along N needs none.
    Returns:
      [..., N] in out_dtype.
    """
    _validate(x, w, bias)
    compute_dtype = jnp.dtype(dtype or getattr(w, "compute_dtype", None) or x.dtype)
    n, k = w.shape
    x2d = x.reshape(-1, k)
    chosen = select_backend(x2d, w, backend)
    layout = layout or typed_layout(x2d, w.packed, "nk")  # packed [N * K / 2, 1]: its rows follow N's
    if layout is not None:
        y = _int4_matmul_sharded(x2d, w, bias, layout, chosen.impl, compute_dtype, jnp.dtype(out_dtype or x.dtype))
    else:
        y = chosen.impl(x2d, w, bias, compute_dtype=compute_dtype, out_dtype=jnp.dtype(out_dtype or x.dtype))
    return y.reshape(*x.shape[:-1], n)


def _int4_matmul_sharded(x, w, bias, layout: MatmulLayout, impl, compute_dtype, out_dtype):
    """impl on each device's shard: x [M, K] (rows over layout.m, K whole), the weight's rows over
    layout.n; y [M, N] split the same way. Each shard's arrays are an Int4Weight of [N / D, K] of
    their own (whole blocks and 256-block groups, int4_weight_specs), so any backend runs it."""
    from jint8.quant4 import int4_weight_specs  # the packed layout's rule (quant4 imports no op)

    n, k = w.shape
    if layout.k:
        raise ShapeError(f"int4_matmul: a 4-bit weight [N, K] = {tuple(w.shape)} cannot be split along K "
                         f"(mesh axes {layout.k}): its codes are the flattened weight, so only N splits")
    parts = layout.size(layout.n)
    w_specs, reason = int4_weight_specs(P(None, spec_entry(layout.n)), w, layout.mesh.shape)
    if reason is not None:
        raise ShapeError(f"int4_matmul: {reason}; split N so that each shard holds whole blocks, or replicate the weight")
    if x.shape[0] % layout.size(layout.m):
        raise ShapeError(f"int4_matmul: M={x.shape[0]} does not split evenly over mesh axes {layout.m}")
    m, n_entry = spec_entry(layout.m), spec_entry(layout.n)
    args, specs = [x, w], [P(m, None), w_specs]
    if bias is not None:
        args, specs = args + [bias], specs + [P(n_entry)]
    if layout.explicit:
        args = [jax.sharding.reshard(a, s) for a, s in zip(args, specs)]

    def body(x_l, w_l, *bias_l):
        local = w_l.replace(shape=(n // parts, k))
        return impl(x_l, local, bias_l[0] if bias_l else None, compute_dtype=compute_dtype, out_dtype=out_dtype)

    return jax.shard_map(body, mesh=layout.mesh, in_specs=tuple(specs), out_specs=P(m, n_entry),
                         check_vma=False)(*args)


def _validate(x, w, bias) -> None:
    shape = tuple(getattr(w, "shape", ()))
    if not hasattr(w, "packed") or len(shape) != 2:
        raise ShapeError(f"int4_matmul: w must be an Int4Weight of a 2-D weight [N, K], got "
                         f"{type(w).__name__} of shape {shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ShapeError(f"int4_matmul: x must be floating point, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != shape[1]:
        raise ShapeError(f"int4_matmul: x.shape={x.shape} does not contract with the weight [N, K] = {shape}")
    if bias is not None and tuple(bias.shape) != (shape[0],):
        raise ShapeError(f"int4_matmul: bias.shape={tuple(bias.shape)} must be ({shape[0]},)")
