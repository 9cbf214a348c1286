"""Error-compensating int8 rounding of a weight (GPTQ, Frantar et al. 2022) in bitsandbytes' format.

Round-to-nearest int8 (`quantize_kmajor`) rounds each weight on its own. GPTQ rounds a kernel's
input features one after another and, after each, moves the rounding error onto the features not
yet rounded, in the direction that least changes the output on the calibration inputs: it
minimises |X W - X Ŵ|^2 with the Hessian H = XᵀX instead of |W - Ŵ|^2. The format is unchanged:
the same int8 values [N, K] K-major and the same per-output-channel scale s_w[n] = max_k |W[n, k]|
as bitsandbytes' int8_vectorwise_quant, so every int8 matmul, checkpoint and kernel takes the
result as it is; only which integer each weight rounds to differs (by at most a few steps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jint8.errors import InvalidConfigError
from jint8.numerics import INV_127

BLOCK = 32  # input features rounded per inner loop; the rest of the kernel is updated once per block
DAMPING = 0.01  # H + DAMPING * mean(diag H) * I: keeps H invertible when tokens < K or features are dead


def _upper_inverse_cholesky(hessian: jax.Array, damping: float) -> jax.Array:
    """U upper triangular with UᵀU = (H + λI)⁻¹ (GPTQ's Cholesky form of the inverse Hessian)."""
    k = hessian.shape[0]
    diag = jnp.diagonal(hessian)
    dead = diag <= 0
    # a feature no calibration token used gets weight 1 on its own and none elsewhere
    hessian = jnp.where(dead[:, None] | dead[None, :], 0.0, hessian) + jnp.diag(jnp.where(dead, 1.0, 0.0))
    live_mean = jnp.sum(jnp.where(dead, 0.0, diag)) / jnp.maximum(jnp.sum(~dead), 1)
    hessian = hessian + damping * jnp.maximum(live_mean, 1e-12) * jnp.eye(k, dtype=hessian.dtype)
    inverse = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(hessian), True), jnp.eye(k, dtype=hessian.dtype))
    return jnp.linalg.cholesky(inverse).T


@functools.partial(jax.jit, static_argnames=("block", "damping"))
def _gptq(w_t: jax.Array, hessian: jax.Array, block: int, damping: float):
    n, k = w_t.shape
    scale = jnp.max(jnp.abs(w_t), axis=1)
    step = jnp.where(scale > 0, scale * INV_127, 1.0)  # [N]: one int8 step per output channel
    # K padded to whole blocks with zero weights that couple to nothing (u = 1 on their diagonal),
    # so one loop body serves every block: compiling a Python loop of blocks took 37 s for a
    # [576, 1536] kernel on the CPU, this form compiles once
    pad = (-k) % block
    u = jnp.pad(_upper_inverse_cholesky(hessian, damping), ((0, pad), (0, pad)))
    u = u + jnp.diag(jnp.concatenate([jnp.zeros(k), jnp.ones(pad)]).astype(u.dtype))
    w = jnp.pad(w_t.T, ((0, pad), (0, 0)))  # rows = input features: the loop reads contiguous rows
    features = jnp.arange(k + pad)

    def round_block(b, carry):
        w, q = carry
        start = b * block
        w_block = jax.lax.dynamic_slice_in_dim(w, start, block, 0)  # [B, N]
        u_rows = jax.lax.dynamic_slice_in_dim(u, start, block, 0)  # [B, K]
        u_block = jax.lax.dynamic_slice_in_dim(u_rows, start, block, 1)  # [B, B]

        def round_one(i, carry):
            w_block, q_block = carry
            row = w_block[i]
            rounded = jnp.clip(jnp.rint(row / step), -127, 127)
            error = (row - rounded * step) / u_block[i, i]
            # u_block is upper triangular: only the features after i move
            w_block = w_block - u_block[i][:, None] * error[None, :]
            w_block = w_block.at[i].set(error)  # feature i is done: keep its scaled error for the update below
            return w_block, q_block.at[i].set(rounded)

        errors, q_block = jax.lax.fori_loop(0, block, round_one, (w_block, jnp.zeros((block, n), jnp.float32)))
        later = jnp.where(features[None, :] >= start + block, u_rows, 0.0)  # the features after this block
        return w - later.T @ errors, jax.lax.dynamic_update_slice_in_dim(q, q_block, start, 0)

    _, q = jax.lax.fori_loop(0, (k + pad) // block, round_block, (w, jnp.zeros((k + pad, n), jnp.float32)))
    return q[:k].T.astype(jnp.int8), scale


def gptq_int8(w_t, hessian, *, block: int = BLOCK, damping: float = DAMPING,
              act_order: bool = False) -> tuple[jax.Array, jax.Array]:
    """(qvalue [N, K] int8, scale [N] float32) of a kernel given K-major, w_t [N, K], rounded with the
    Hessian [K, K] = Σ x xᵀ of its calibration inputs. scale is bitsandbytes' row absmax, so
    qvalue * scale / 127 dequantizes exactly as `quantize_kmajor`'s result does.

    act_order: round the input features in order of decreasing H[k, k] (GPTQ's "act-order"), so
    the features with the largest inputs are rounded first, while the most features are left to
    take up their error; the values come back in the kernel's own feature order."""
    w_t = jnp.asarray(w_t, jnp.float32)
    hessian = jnp.asarray(hessian, jnp.float32)
    if w_t.ndim != 2:
        raise InvalidConfigError(f"gptq_int8: w_t must be [N, K], got shape {tuple(w_t.shape)}")
    if hessian.shape != (w_t.shape[1], w_t.shape[1]):
        raise InvalidConfigError(f"gptq_int8: hessian.shape={tuple(hessian.shape)} must be [K, K] with "
                                 f"K={w_t.shape[1]} (w_t.shape={tuple(w_t.shape)})")
    if not block >= 1:
        raise InvalidConfigError(f"gptq_int8: block={block} must be >= 1")
    if not damping > 0:
        raise InvalidConfigError(f"gptq_int8: damping={damping} must be > 0")
    if not act_order:
        return _gptq(w_t, hessian, block, float(damping))
    order = jnp.argsort(-jnp.diagonal(hessian), stable=True)
    qvalue, scale = _gptq(w_t[:, order], hessian[order][:, order], block, float(damping))
    return qvalue[:, jnp.argsort(order)], scale


def input_hessian(inputs) -> np.ndarray:
    """Σ_t x_t x_tᵀ [K, K] (float32) over calibration inputs, a list of [T, K] arrays."""
    k = inputs[0].shape[-1]
    hessian = np.zeros((k, k), np.float64)
    for x in inputs:
        x = np.asarray(x, np.float32).reshape(-1, k)
        hessian += (x.T @ x).astype(np.float64)
    return hessian.astype(np.float32)
