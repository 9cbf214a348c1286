"""GPTQ int8 rounding: bitsandbytes' format and scale, round-to-nearest where inputs are
uncorrelated, and less output error than round-to-nearest on inputs it was not fitted on."""

import jax.numpy as jnp
import numpy as np
import pytest

from jint8.errors import InvalidConfigError
from jint8.gptq import gptq_int8, input_hessian
from jint8.quantize import quantize_kmajor


def _correlated_inputs(rng, mixing, tokens):
    # a few shared directions plus per-feature scales: inputs like a projection's, far from white
    k = mixing.shape[1]
    return (rng.normal(size=(tokens, len(mixing))) @ mixing + 0.1 * rng.normal(size=(tokens, k))).astype(np.float32)


def _dequantized(qvalue, scale):
    return np.asarray(qvalue, np.float32) * np.asarray(scale)[:, None] / 127


@pytest.mark.parametrize("n, k", [(48, 64), (40, 70)])  # 70: a last block shorter than the others
def test_gptq_beats_round_to_nearest_on_held_out_inputs_in_the_same_format(rng, n, k):
    w = rng.normal(size=(n, k)).astype(np.float32)
    mixing = rng.normal(size=(8, k)) * np.exp(rng.normal(size=k))
    fit, held_out = _correlated_inputs(rng, mixing, 4 * k), _correlated_inputs(rng, mixing, 4 * k)
    qvalue, scale = gptq_int8(w, input_hessian([fit[: 2 * k], fit[2 * k:]]))
    nearest = quantize_kmajor(jnp.asarray(w))
    assert qvalue.dtype == jnp.int8 and qvalue.shape == (n, k)
    np.testing.assert_array_equal(scale, nearest.scale)  # bitsandbytes' row absmax, unchanged
    error = lambda deq: np.square(held_out @ (deq - w).T).sum()  # noqa: E731
    assert error(_dequantized(qvalue, scale)) < 0.7 * error(_dequantized(nearest.qvalue, nearest.scale))


def test_gptq_is_round_to_nearest_when_the_inputs_are_uncorrelated(rng):
    # a diagonal Hessian couples no features: no error has anywhere to go
    w = rng.normal(size=(24, 40)).astype(np.float32)
    qvalue, _ = gptq_int8(w, np.diag(rng.uniform(0.5, 2.0, 40)).astype(np.float32))
    np.testing.assert_array_equal(qvalue, quantize_kmajor(jnp.asarray(w)).qvalue)


def test_act_order_rounds_the_largest_features_first_in_the_kernels_own_order(rng):
    # act-order is GPTQ of the kernel with its features sorted by decreasing H[k, k], mapped back
    n, k = 16, 40
    w = rng.normal(size=(n, k)).astype(np.float32)
    x = _correlated_inputs(rng, rng.normal(size=(6, k)) * np.exp(rng.normal(size=k)), 3 * k)
    hessian = input_hessian([x])
    order = np.argsort(-np.diagonal(hessian), kind="stable")
    want, _ = gptq_int8(w[:, order], hessian[order][:, order])
    got, scale = gptq_int8(w, hessian, act_order=True)
    np.testing.assert_array_equal(np.asarray(got)[:, order], want)
    np.testing.assert_array_equal(scale, quantize_kmajor(jnp.asarray(w)).scale)
    assert not np.array_equal(got, gptq_int8(w, hessian)[0])  # the order matters on correlated inputs


def test_gptq_names_the_bad_parameter(rng):
    w = rng.normal(size=(8, 16)).astype(np.float32)
    with pytest.raises(InvalidConfigError, match="hessian.shape"):
        gptq_int8(w, np.eye(8, dtype=np.float32))
    with pytest.raises(InvalidConfigError, match="damping"):
        gptq_int8(w, np.eye(16, dtype=np.float32), damping=0.0)
