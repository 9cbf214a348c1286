"""The decode-attention kernel (Pallas interpret mode on the CPU) against its jnp reference, and
the reference against transformers-style float64 attention."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.ops.attention import decode_attention_step, decode_step_reference, unsupported_reason
from jint8.ops.attention.pallas_triton import num_splits


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


def _rope_tables(rng, b, h, dtype):
    angles = rng.uniform(0, 50, (b, h // 2))
    angles = np.concatenate([angles, angles], axis=-1)
    return jnp.asarray(np.cos(angles), dtype), jnp.asarray(np.sin(angles), dtype)


def _rotated_float64(x, cos, sin):
    x, cos, sin = (np.asarray(a, np.float64) for a in (x, cos, sin))
    half = x.shape[-1] // 2
    return x * cos[:, None] + np.concatenate([-x[..., half:], x[..., :half]], -1) * sin[:, None]


@pytest.mark.parametrize("b,n,kv,h,s,used,pad,rope,packed", [
    (1, 8, 2, 64, 200, 150, 0, True, True),     # GQA 4, ragged last block, slots past the step unused
    (3, 9, 3, 32, 130, 130, 5, True, False),    # SmolLM2's 9/3 heads, left padding, last slot
    (2, 4, 4, 16, 64, 1, 0, False, False),      # first decode slot only, no RoPE (GPT-2, OPT)
    (2, 6, 2, 16, 100, 65, 0, False, True),     # the step's slot opens a new split's first block
])
def test_kernel_matches_reference_and_float64(rng, b, n, kv, h, s, used, pad, rope, packed):
    """The decode step: q, k, v (from one packed array or three, rotated or not) -> the cache
    written at slot used - 1 and attention over the valid slots, against decode_step_reference
    and float64."""
    seed = rng.seed_value
    q, k_cache, v_cache = _inputs(rng, b=b, n=n, kv=kv, h=h, s=s)
    k_new, v_new = (jnp.asarray(rng.standard_normal((b, kv, h)), jnp.bfloat16) for _ in range(2))
    cos, sin = _rope_tables(rng, b, h, jnp.bfloat16) if rope else (None, None)
    valid = np.arange(s)[None, :] < used
    valid = np.broadcast_to(valid, (b, s)).copy()
    valid[0, :pad] = False
    scale, index = h ** -0.5, jnp.int32(used - 1)
    packed_qkv = jnp.concatenate([a.reshape(b, -1) for a in (q, k_new, v_new)], -1) if packed else None
    got, got_k, got_v = decode_attention_step(
        q, k_new, v_new, k_cache, v_cache, jnp.asarray(valid), index, layer=1, scale=scale,
        rope=None if cos is None else (cos, sin), packed=packed_qkv, interpret=True)
    want, want_k, want_v = decode_step_reference(q, k_new, v_new, k_cache, v_cache, jnp.asarray(valid),
                                                 index, cos, sin, layer=1, scale=scale)
    assert got.shape == (b, n, h) and got.dtype == q.dtype
    # The cache: untouched but for the step's slot of layer 1, which holds the rotated key (each
    # product and the sum rounded to bf16: within one bf16 rounding of float64) and the value.
    untouched = np.ones(k_cache.shape, bool)
    untouched[1, :, used - 1] = False
    np.testing.assert_array_equal(np.asarray(got_k)[untouched], np.asarray(k_cache)[untouched])
    np.testing.assert_array_equal(np.asarray(got_v)[untouched], np.asarray(v_cache)[untouched])
    np.testing.assert_array_equal(np.asarray(got_v)[1, :, used - 1], np.asarray(v_new))
    np.testing.assert_allclose(np.asarray(got_k[1, :, used - 1], np.float32),
                               np.asarray(want_k[1, :, used - 1], np.float32), rtol=2 ** -7, atol=1e-6)
    if rope:
        exact_k = _rotated_float64(k_new, cos, sin)
        np.testing.assert_allclose(np.asarray(got_k[1, :, used - 1], np.float64), exact_k,
                                   rtol=2 ** -7, atol=2 ** -7, err_msg=f"seed {seed}")
        q = _rotated_float64(q, cos, sin)
    exact = _float64_attention(q, got_k, got_v, valid, 1, scale)
    # Both round the probabilities to bf16 once and the output to bf16 once.
    for name, value in (("kernel", got), ("reference", want)):
        err = np.max(np.abs(np.asarray(value, np.float64) - exact)) / np.max(np.abs(exact))
        assert err < 2e-2, f"{name}: {err:.3g} of max |out|, seed {seed}"
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2, rtol=2e-2, err_msg=f"seed {seed}")


def test_splits_cover_the_gpu_and_cpu_is_unsupported():
    assert num_splits(1, 8, 640) == 10 and num_splits(8, 8, 640) == 2 and num_splits(1, 1, 10) == 1
    # more programs to aim for: as many slot ranges as block_s allows, and no more
    assert num_splits(1, 8, 640, 32, target_programs=256) == 20
    assert num_splits(8, 8, 640, 64, target_programs=256) == 4
    q, k, _ = _inputs(np.random.default_rng(0), b=1, n=2, kv=1, h=16, s=8)
    assert "not a GPU" in unsupported_reason(q, k)


def test_models_decode_through_the_kernel_as_closely_as_through_xla(monkeypatch):
    """cached_attention's kernel route (mask -> valid slots, cache_index + 1 slots in use, the
    layer's cache), forced on the CPU in interpret mode: a tiny bf16 Llama's decode logits over a
    left-padded batch are as close to its float32 logits as with XLA attention."""
    import dataclasses

    from jint8.models import LlamaConfig, fuse_projections, LlamaForCausalLM
    from jint8.models.common import init_cache
    from jint8.ops import attention as attention_ops

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                         dtype=jnp.bfloat16)
    params = LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, 128, (3, 12)), jnp.int32)
    steps = jnp.asarray(rng.integers(1, 128, (3, 4)), jnp.int32)
    kv_mask = jnp.ones((3, 32), jnp.int32).at[1, :3].set(0).at[2, :7].set(0)

    def decode_logits(dtype, fuse=False):
        model = LlamaForCausalLM(dataclasses.replace(config, dtype=dtype))
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        p = fuse_projections(p) if fuse else p
        _, cache = model.apply({"params": p}, ids, cache=init_cache(model.config, 3, 32, dtype),
                               cache_index=0, kv_mask=kv_mask)
        out = []
        for step in range(4):
            logits, cache = model.apply({"params": p}, steps[:, step:step + 1], cache=cache,
                                        cache_index=12 + step, kv_mask=kv_mask)
            out.append(np.asarray(logits[:, -1], np.float64))
        return np.stack(out, 1)

    exact, xla = decode_logits(jnp.float32), decode_logits(jnp.bfloat16)
    calls = []
    kernel_step = attention_ops.decode_attention_step

    def interpret_kernel(*args, **kwargs):
        calls.append((kwargs["layer"], kwargs["rope"] is not None, kwargs["packed"] is not None))
        return kernel_step(*args, **kwargs, interpret=True)

    monkeypatch.setattr(attention_ops, "unsupported_reason", lambda q, k: None)
    monkeypatch.setattr(attention_ops, "decode_attention_step", interpret_kernel)
    kernel = decode_logits(jnp.bfloat16)
    # every decode step, every layer, RoPE in the kernel; the unfused projections are three arrays
    assert sorted(set(calls)) == [(0, True, False), (1, True, False)] and len(calls) == 2 * 4
    # a fused q|k|v projection: the kernel reads q, k, v from its output, same logits
    calls.clear()
    np.testing.assert_allclose(decode_logits(jnp.bfloat16, fuse=True), kernel, rtol=0, atol=1e-6 * np.max(np.abs(kernel)))
    assert sorted(set(calls)) == [(0, True, True), (1, True, True)]
    scale = np.max(np.abs(exact))
    err_xla = np.max(np.abs(xla - exact), axis=(1, 2)) / scale
    err_kernel = np.max(np.abs(kernel - exact), axis=(1, 2)) / scale
    assert np.all(err_kernel <= 1.5 * err_xla + 2e-3), (err_kernel, err_xla)


@pytest.mark.parametrize("parts,rope", [(3, True), (8, False)])
def test_kernel_sums_split_partials_where_it_loads_q_k_v(rng, parts, rope):
    """packed as a fused q|k|v projection's float32 split-K partials [P, B, W]: the kernel adds
    them in order where it loads q, k, v and rounds once to q's dtype, so its output and cache
    are those of the kernel reading the summed, rounded array (bit for bit)."""
    b, n, kv, h, s, used = 2, 8, 2, 32, 96, 70
    q, k_cache, v_cache = _inputs(rng, b=b, n=n, kv=kv, h=h, s=s)
    width = (n + 2 * kv) * h
    partials = jnp.asarray(rng.standard_normal((parts, b, width)), jnp.float32)
    total = partials[0]
    for p in range(1, parts):
        total = total + partials[p]
    packed = total.astype(jnp.bfloat16)
    q = packed[:, :n * h].reshape(b, n, h)
    k_new, v_new = (packed[:, (n + i) * h:(n + i + kv) * h].reshape(b, kv, h) for i in (0, kv))
    cos, sin = _rope_tables(rng, b, h, jnp.bfloat16) if rope else (None, None)
    valid = jnp.asarray(np.broadcast_to(np.arange(s)[None, :] < used, (b, s)))
    run = lambda source: decode_attention_step(  # noqa: E731
        q, k_new, v_new, k_cache, v_cache, valid, jnp.int32(used - 1), layer=2, scale=h ** -0.5,
        rope=None if cos is None else (cos, sin), packed=source, interpret=True)
    for got, want in zip(run(partials), run(packed)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32),
                                      err_msg=f"seed {rng.seed_value}")
    for got, want in zip(run(packed[None]), run(packed)):  # one partial: the array itself
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_packed_of_the_wrong_shape_is_named():
    from jint8.errors import ShapeError

    q, k_cache, v_cache = _inputs(np.random.default_rng(0), b=2, n=4, kv=2, h=16, s=32)
    k_new = jnp.zeros((2, 2, 16), jnp.bfloat16)
    for bad in ((2, 7 * 16), (3, 2, 8 * 16, 1), (2, 3, 8 * 16)):
        with pytest.raises(ShapeError, match=r"packed\.shape"):
            decode_attention_step(q, k_new, k_new, k_cache, v_cache, jnp.ones((2, 32), bool),
                                  jnp.int32(3), layer=0, scale=0.25, packed=jnp.zeros(bad, jnp.float32),
                                  interpret=True)
