"""Independent numpy statements of the LLM.int8() recipe and its error bound, for tests."""

import numpy as np

EPS = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def numpy_quantize_rows(x: np.ndarray, threshold: float):
    """The recipe's activation step in numpy float32: (xq int8, row_scales f32, col_mask bool)."""
    xf = np.asarray(x, dtype=np.float32)
    magnitude = np.abs(xf)
    if threshold > 0:
        outlier = magnitude >= threshold
        col_mask = outlier.any(axis=0)
        magnitude = np.where(outlier, np.float32(0), magnitude)
    else:
        col_mask = np.zeros(x.shape[1], bool)
    scales = magnitude.max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore"):
        # torch's `127.0 / s` is `s.reciprocal() * 127` (bitsandbytes' rounding at ties)
        inv = np.where(scales > 0, (np.float32(1) / scales).astype(np.float32) * np.float32(127), np.float32(0))
        inv = inv.astype(np.float32)
    xq = np.round(xf * inv[:, None]).astype(np.float32)
    xq[:, col_mask] = 0
    return xq.astype(np.int8), scales, col_mask


def float64_matmul(x, w, bias=None):
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    return y if bias is None else y + np.asarray(bias, np.float64)


def int8_error_bound(x, w, threshold: float, dtype_name: str, y_ref):
    """Elementwise bound on |int8_matmul(x, quantize(w)) - x @ w| (float64), derived:

    Non-outlier terms: x = xq*s_x/127 + dx with |dx| <= s_x/254, w = wq*s_w/127 + dw with
    |dw| <= s_w/254, so |x w - xq wq s_x s_w/127^2| <= |x||dw| + |dx||w| + |dx||dw| per term.
    Outlier columns keep x exactly; their weight rows carry |dw| plus the rounding of the
    dequantized row to x's dtype (eps * |w|). The final cast to the output dtype adds
    eps * |y|, and float32 accumulation adds K * 2^-24 * sum|x w| (a loose rounding bound).
    """
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    eps = EPS[dtype_name]
    s_w = np.abs(w).max(axis=0)
    ax = np.abs(x)
    outlier = ax >= threshold if threshold > 0 else np.zeros_like(ax, bool)
    col_mask = outlier.any(axis=0)
    s_x = np.where(outlier, 0, ax).max(axis=1)
    a_in = np.where(col_mask[None, :], 0, ax)
    a_out = np.where(col_mask[None, :], ax, 0)
    aw = np.abs(w)
    k_in = (~col_mask).sum()
    bound = (
        a_in @ (s_w[None, :] / 254 * np.ones_like(aw))
        + (s_x[:, None] / 254) * ((~col_mask)[:, None] * aw).sum(axis=0)[None, :]
        + k_in * np.outer(s_x, s_w) / 254**2
        + a_out @ (s_w[None, :] / 254 + eps * aw)
        + eps * np.abs(y_ref)
        + x.shape[1] * 2.0**-24 * (ax @ aw)
    )
    return bound * 1.01 + 1e-6
