"""The paged KV cache: block accounting under churn (property test) and paged attention against the
dense attention the models use with a static cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jint8.errors import InvalidConfigError, ShapeError
from jint8.models.common import attention_mask, dot_product_attention
from jint8.ops.attention import paged_attention as _paged_attention
from jint8.ops.attention import paged_write as _paged_write
from jint8.ops.attention.paged import SCRATCH_BLOCK, gather_sequences, pool_storage_dtype
from jint8.serve.paged_cache import BlockAllocator

# jitted: one compilation each instead of one per eager op
paged_attention = jax.jit(_paged_attention, static_argnames=("layer", "scale", "sliding_window", "dtype"))
paged_write = jax.jit(_paged_write, static_argnames=("layer", "dtype"))

# one event: (join, tokens reserved) | (grow, which, tokens) | (finish, which)
_EVENTS = st.lists(st.one_of(
    st.tuples(st.just("join"), st.integers(1, 80)),
    st.tuples(st.just("grow"), st.integers(0, 10**6), st.integers(1, 80)),
    st.tuples(st.just("finish"), st.integers(0, 10**6)),
), max_size=120)


@settings(deadline=None, max_examples=200)
@given(events=_EVENTS, num_blocks=st.integers(2, 24), block_size=st.sampled_from([1, 4, 16]))
def test_blocks_are_never_leaked_or_shared_under_join_and_finish_churn(events, num_blocks, block_size):
    allocator = BlockAllocator(num_blocks, block_size, max_blocks_per_sequence=num_blocks)
    reserved: dict[int, int] = {}  # seq id -> tokens reserved
    next_id = 0
    for event in events:
        if event[0] == "join":
            if allocator.can_reserve(event[1]):
                allocator.reserve(next_id, event[1])
                reserved[next_id] = event[1]
            else:
                with pytest.raises(InvalidConfigError, match="unreserved"):
                    allocator.reserve(next_id, event[1])
            next_id += 1
        elif reserved:
            seq = sorted(reserved)[event[1] % len(reserved)]
            if event[0] == "grow":
                tokens = min(event[2], reserved[seq])
                table = allocator.ensure(seq, tokens)
                assert len(table) >= -(-tokens // block_size)
            else:
                allocator.free(seq)
                del reserved[seq]
        owned = [b for seq in allocator.sequences for b in allocator.owned(seq)]
        assert len(owned) == len(set(owned)), "a block is held by two sequences"
        assert SCRATCH_BLOCK not in owned
        assert sorted(owned + allocator._free) == list(range(1, num_blocks)), "a block leaked"
        assert allocator.unreserved_blocks >= 0
    for seq in list(reserved):
        allocator.free(seq)
    assert allocator.free_blocks == num_blocks - 1 and allocator.used_blocks == 0


def test_growing_past_the_reservation_is_refused():
    allocator = BlockAllocator(8, 4, max_blocks_per_sequence=8)
    allocator.reserve(0, 6)  # 2 blocks
    allocator.ensure(0, 8)
    with pytest.raises(InvalidConfigError, match="exceed its reservation"):
        allocator.ensure(0, 9)
    with pytest.raises(InvalidConfigError, match="num_blocks=1"):
        BlockAllocator(1, 4, 4)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_over_scattered_blocks_equals_dense_attention(rng, window):
    """Sequences written token by token into shuffled blocks, then attended by a 3-token chunk:
    the same as dense causal attention over each sequence's keys in order."""
    b, t, n, kv, h, z, length = 2, 3, 4, 2, 8, 4, 11
    pool_shape = (1, 16, z, kv, h)
    k_pool, v_pool = jnp.zeros(pool_shape), jnp.zeros(pool_shape)
    blocks = rng.permutation(np.arange(1, 16))[: b * 4].reshape(b, 4).astype(np.int32)
    keys = jnp.asarray(rng.standard_normal((b, length, kv, h)), jnp.float32)
    values = jnp.asarray(rng.standard_normal((b, length, kv, h)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    k_pool = paged_write(k_pool, keys, blocks, positions, layer=0)
    v_pool = paged_write(v_pool, values, blocks, positions, layer=0)
    # a padding token (-1) lands in the scratch block and changes nothing
    padded = jnp.asarray([[-1], [-1]], jnp.int32)
    k_pool = paged_write(k_pool, jnp.full((b, 1, kv, h), 99.0), blocks, padded, layer=0)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    query_positions = jnp.asarray([[length - 3, length - 2, length - 1]] * b, jnp.int32)
    out = paged_attention(q, k_pool, v_pool, blocks, query_positions, layer=0, scale=0.3, sliding_window=window)
    mask = attention_mask(t, length, cache_index=length - 3, sliding_window=window)
    expected = dot_product_attention(q, keys, values, mask, scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(k_pool[0, SCRATCH_BLOCK]).max()) == 99.0
    # a padding query (position -1) gives zeros, whatever the blocks hold
    padding_out = paged_attention(q[:, :1], k_pool, v_pool, blocks, padded, layer=0, scale=0.3)
    assert not np.any(np.asarray(padding_out))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_pool_of_16_bit_values_kept_as_bits_reads_and_attends_the_same_values(rng, dtype):
    """The CPU keeps 16-bit pools as uint16 bits (pool_storage_dtype): what is written and read
    back, and attention over it, are bit for bit what a pool of the values themselves gives."""
    assert pool_storage_dtype(dtype, "cpu") == jnp.uint16 and pool_storage_dtype(dtype, "gpu") == dtype
    assert pool_storage_dtype(jnp.float32, "cpu") == jnp.float32
    b, length, n, kv, h, z = 2, 7, 4, 2, 8, 4
    blocks = rng.permutation(np.arange(1, 9))[: b * 2].reshape(b, 2).astype(np.int32)
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    keys, values = (jnp.asarray(rng.standard_normal((b, length, kv, h)), jnp.float32) for _ in range(2))
    pools = {}
    for storage in (dtype, jnp.uint16):
        k_pool, v_pool = (paged_write(jnp.zeros((2, 9, z, kv, h), storage), x, blocks, positions, layer=1,
                                      dtype=dtype) for x in (keys, values))
        read = gather_sequences(k_pool, blocks, layer=1, dtype=dtype)[:, :length]
        q = jnp.asarray(rng.standard_normal((b, 1, n, h)), dtype) if storage == dtype else q
        out = paged_attention(q, k_pool, v_pool, blocks, positions[:, -1:], layer=1, scale=0.3, dtype=dtype)
        pools[storage] = (read, out)
    (read, out), (read_bits, out_bits) = pools[dtype], pools[jnp.uint16]
    assert read_bits.dtype == dtype and out_bits.dtype == dtype
    np.testing.assert_array_equal(np.asarray(read_bits), np.asarray(keys.astype(dtype)))
    np.testing.assert_array_equal(np.asarray(read_bits), np.asarray(read))
    np.testing.assert_array_equal(np.asarray(out_bits, np.float32), np.asarray(out, np.float32))
    with pytest.raises(ShapeError, match="widths differ"):
        _paged_write(jnp.zeros((1, 2, z, kv, h), jnp.uint16), keys, blocks, positions, layer=0, dtype=jnp.float32)
