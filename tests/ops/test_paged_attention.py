"""The paged decode-attention kernel (Pallas interpret mode on the CPU) against
paged_attention_reference and float64 attention, and paged_attention's choice between them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.ops import attention as attention_ops
from jint8.ops.attention import paged_attention_reference
from jint8.ops.attention.paged_pallas import paged_decode_attention_pallas


def _paged_inputs(rng, *, b, n, kv, h, block_size, blocks_per_seq, positions, layers=2, dtype=jnp.bfloat16):
    """A pool whose sequences own shuffled, non-adjacent blocks (block 0 is scratch)."""
    pool_blocks = 1 + b * blocks_per_seq + 3
    k = jnp.asarray(rng.standard_normal((layers, pool_blocks, block_size, kv, h)), dtype)
    v = jnp.asarray(rng.standard_normal((layers, pool_blocks, block_size, kv, h)), dtype)
    owned = rng.permutation(np.arange(1, pool_blocks))[: b * blocks_per_seq].reshape(b, blocks_per_seq)
    tables = np.zeros((b, blocks_per_seq), np.int32)
    for row, position in enumerate(positions):
        used = max(position, -1) // block_size + 1  # blocks holding positions 0..position
        tables[row, :used] = owned[row, :used]
    q = jnp.asarray(rng.standard_normal((b, n, h)), dtype)
    return q, k, v, jnp.asarray(tables), jnp.asarray(positions, jnp.int32)


def _float64_paged(q, k, v, tables, positions, *, layer, scale, window, softcap):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k[layer], v[layer]))
    b, n, h = q.shape
    z, groups = k.shape[1], n // k.shape[2]
    out = np.zeros((b, n, h))
    for row in range(b):
        pos = int(positions[row])
        if pos < 0:
            continue
        seen = [s for s in range(pos + 1) if window is None or s > pos - window]
        slots = [(int(tables[row, s // z]), s % z) for s in seen]
        keys = np.stack([k[blk, off] for blk, off in slots])  # [S, K, H]
        values = np.stack([v[blk, off] for blk, off in slots])
        for head in range(n):
            logits = keys[:, head // groups] @ q[row, head] * scale
            if softcap is not None:
                logits = np.tanh(logits / softcap) * softcap
            p = np.exp(logits - logits.max())
            out[row, head] = (p / p.sum()) @ values[:, head // groups]
    return out


@pytest.mark.parametrize("b,n,kv,h,block_size,blocks_per_seq,positions,window,softcap", [
    # GQA 4, 16-slot blocks, rows of different lengths across several 64-position steps and
    # splits, one padding row
    (4, 8, 2, 64, 16, 12, [150, 0, -1, 191], None, None),
    # SmolLM2's 9/3 heads, 8-slot blocks (one step spans eight blocks), a block's last slot
    (3, 9, 3, 32, 8, 20, [159, 7, 64], None, None),
    # a sliding window that starts mid-block (Mistral / Gemma local layers) and a logit softcap
    (2, 4, 2, 16, 16, 10, [130, 40], 37, 30.0),
])
def test_kernel_matches_reference_and_float64(rng, b, n, kv, h, block_size, blocks_per_seq, positions,
                                              window, softcap):
    seed = rng.seed_value
    q, k, v, tables, pos = _paged_inputs(rng, b=b, n=n, kv=kv, h=h, block_size=block_size,
                                         blocks_per_seq=blocks_per_seq, positions=positions)
    scale = h ** -0.5
    got = paged_decode_attention_pallas(q, k, v, tables, pos, layer=1, scale=scale, sliding_window=window,
                                        logit_softcap=softcap, interpret=True)
    want = paged_attention_reference(q[:, None], k, v, tables, pos[:, None], layer=1, scale=scale,
                                     sliding_window=window, logit_softcap=softcap)[:, 0]
    assert got.shape == (b, n, h) and got.dtype == q.dtype
    padding = np.asarray(positions) < 0
    assert not np.any(np.asarray(got)[padding]), "a padding row's output is zero, as the reference's"
    exact = _float64_paged(q, k, v, np.asarray(tables), positions, layer=1, scale=scale, window=window,
                           softcap=softcap)
    # Both round the probabilities to bf16 once (relative 2^-8 each, over a convex combination of
    # values with |v| <= ~4) and the output once; 2e-2 of max |out| holds that with margin.
    for name, value in (("kernel", got), ("reference", want)):
        err = np.max(np.abs(np.asarray(value, np.float64) - exact)) / np.max(np.abs(exact))
        assert err < 2e-2, f"{name}: {err:.3g} of max |out|, seed {seed}"
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=2e-2, rtol=2e-2, err_msg=f"seed {seed}")


def test_paged_attention_runs_the_kernel_for_decode_and_the_reference_for_chunks(rng, monkeypatch):
    """With the kernel allowed (forced on the CPU, interpret mode), T = 1 queries go through it and
    prefill chunks (T > 1) through the reference; on the CPU nothing is forced and both are the
    reference."""
    q, k, v, tables, pos = _paged_inputs(rng, b=2, n=4, kv=2, h=16, block_size=16, blocks_per_seq=4,
                                         positions=[20, 50])
    calls = []
    kernel = paged_decode_attention_pallas

    def interpret_kernel(*args, **kwargs):
        calls.append(kwargs["layer"])
        return kernel(*args, **kwargs, interpret=True)

    reference = paged_attention_reference(q[:, None], k, v, tables, pos[:, None], layer=0, scale=0.25)
    plain = attention_ops.paged_attention(q[:, None], k, v, tables, pos[:, None], layer=0, scale=0.25)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(reference))
    assert "not a GPU" in attention_ops.unsupported_reason(q[:, None], k)

    import jint8.ops.attention.paged_pallas as paged_pallas
    monkeypatch.setattr(attention_ops, "unsupported_reason", lambda q, k: None)
    monkeypatch.setattr(paged_pallas, "paged_decode_attention_pallas", interpret_kernel)
    decoded = attention_ops.paged_attention(q[:, None], k, v, tables, pos[:, None], layer=0, scale=0.25)
    assert calls == [0] and decoded.shape == (2, 1, 4, 16)
    np.testing.assert_allclose(np.asarray(decoded, np.float32), np.asarray(reference, np.float32),
                               atol=2e-2, rtol=2e-2)
    chunk_pos = jnp.stack([pos - 1, pos], axis=1)
    chunk = jnp.concatenate([q[:, None], q[:, None]], axis=1)
    attention_ops.paged_attention(chunk, k, v, tables, chunk_pos, layer=0, scale=0.25)
    assert calls == [0], "a two-token chunk runs the reference"


def test_a_model_decodes_through_the_paged_kernel_as_closely_as_through_the_reference(monkeypatch):
    """A tiny bf16 Llama on a paged cache: a prefill of three prompts of different lengths (the
    reference), then decode steps with the kernel forced on the CPU in interpret mode. Its logits
    are as close to the float32 model's as the reference's are."""
    import dataclasses

    from jint8.models import LlamaConfig, LlamaForCausalLM
    from jint8.models.common import PagedKVCache, init_paged_pool

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                         dtype=jnp.bfloat16)
    params = LlamaForCausalLM(config).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    rng = np.random.default_rng(0)
    lengths = np.array([11, 4, 7])
    ids = jnp.asarray(rng.integers(1, 128, (3, 11)), jnp.int32)
    steps = jnp.asarray(rng.integers(1, 128, (3, 3)), jnp.int32)
    # blocks of 8 slots, each sequence's blocks shuffled over the pool (block 0 is scratch)
    tables = jnp.asarray(rng.permutation(np.arange(1, 13)).reshape(3, 4), jnp.int32)
    prompt_positions = np.where(np.arange(11)[None] < lengths[:, None], np.arange(11)[None], -1)

    def decode_logits(dtype):
        model = LlamaForCausalLM(dataclasses.replace(config, dtype=dtype))
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        apply = jax.jit(lambda ids, positions, cache: model.apply({"params": p}, ids, jnp.maximum(positions, 0),
                                                                  cache=cache.replace(positions=positions)))
        k, v = init_paged_pool(model.config, 13, 8, dtype)
        positions = jnp.asarray(prompt_positions, jnp.int32)
        _, cache = apply(ids, positions, PagedKVCache(k, v, tables, positions))
        out = []
        for step in range(3):
            positions = jnp.asarray(lengths + step, jnp.int32)[:, None]
            logits, cache = apply(steps[:, step:step + 1], positions, cache)
            out.append(np.asarray(logits[:, -1], np.float64))
        return np.stack(out, 1)

    exact, reference = decode_logits(jnp.float32), decode_logits(jnp.bfloat16)
    calls = []
    kernel = paged_decode_attention_pallas

    def interpret_kernel(*args, **kwargs):
        calls.append(kwargs["layer"])
        return kernel(*args, **kwargs, interpret=True)

    import jint8.ops.attention.paged_pallas as paged_pallas
    monkeypatch.setattr(attention_ops, "unsupported_reason", lambda q, k: None)
    monkeypatch.setattr(paged_pallas, "paged_decode_attention_pallas", interpret_kernel)
    through_kernel = decode_logits(jnp.bfloat16)
    assert set(calls) == {0, 1}, "every layer's decode attention"
    scale = np.max(np.abs(exact))
    err_reference = np.max(np.abs(reference - exact), axis=(1, 2)) / scale
    err_kernel = np.max(np.abs(through_kernel - exact), axis=(1, 2)) / scale
    assert np.all(err_kernel <= 1.5 * err_reference + 2e-3), (err_kernel, err_reference)
