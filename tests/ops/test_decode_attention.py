"""The decode-attention kernel (Pallas interpret mode on the CPU) against its jnp reference, and
the reference against transformers-style float64 attention."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.ops.attention import decode_attention_reference, unsupported_reason
from jint8.ops.attention.pallas_triton import decode_attention_pallas, num_splits


def _inputs(rng, *, b, n, kv, h, s, layers=3, dtype=jnp.bfloat16):
    q = jnp.asarray(rng.standard_normal((b, n, h)), dtype)
    k = jnp.asarray(rng.standard_normal((layers, b, s, kv, h)), dtype)
    v = jnp.asarray(rng.standard_normal((layers, b, s, kv, h)), dtype)
    return q, k, v


def _float64_attention(q, k, v, valid, layer, scale):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k[layer], v[layer]))
    b, n, h = q.shape
    groups = n // k.shape[2]
    out = np.zeros((b, n, h))
    for bi in range(b):
        for head in range(n):
            logits = k[bi, :, head // groups] @ q[bi, head] * scale
            logits = np.where(valid[bi], logits, -np.inf)
            p = np.exp(logits - logits.max())
            out[bi, head] = (p / p.sum()) @ v[bi, :, head // groups]
    return out


@pytest.mark.parametrize("b,n,kv,h,s,used,pad", [
    (1, 8, 2, 64, 200, 150, 0),      # GQA 4, ragged last block, slots past num_slots unused
    (3, 9, 3, 32, 130, 130, 5),      # SmolLM2's 9/3 heads, left padding in sequence 0
    (2, 4, 4, 16, 64, 1, 0),         # first decode slot only
])
def test_kernel_matches_reference_and_float64(b, n, kv, h, s, used, pad):
    seed = time.time_ns() % 2**31
    rng = np.random.default_rng(seed)
    q, k, v = _inputs(rng, b=b, n=n, kv=kv, h=h, s=s)
    valid = np.arange(s)[None, :] < used
    valid = np.broadcast_to(valid, (b, s)).copy()
    valid[0, :pad] = False
    scale = h ** -0.5
    got = decode_attention_pallas(q, k, v, jnp.asarray(valid), jnp.int32(used), layer=1,
                                  scale=scale, block_s=32, interpret=True)
    want = decode_attention_reference(q, k, v, jnp.asarray(valid), layer=1, scale=scale)
    exact = _float64_attention(q, k, v, valid, 1, scale)
    assert got.shape == (b, n, h) and got.dtype == q.dtype
    # Both round the probabilities to bf16 once and the output to bf16 once.
    for name, value in (("kernel", got), ("reference", want)):
        err = np.max(np.abs(np.asarray(value, np.float64) - exact)) / np.max(np.abs(exact))
        assert err < 2e-2, f"{name}: {err:.3g} of max |out|, seed {seed}"
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2, rtol=2e-2, err_msg=f"seed {seed}")


def test_splits_cover_the_gpu_and_cpu_is_unsupported():
    assert num_splits(1, 8, 640) == 10 and num_splits(8, 8, 640) == 2 and num_splits(1, 1, 10) == 1
    q, k, _ = _inputs(np.random.default_rng(0), b=1, n=2, kv=1, h=16, s=8)
    assert "not a GPU" in unsupported_reason(q, k)
