"""The on-device CRC-32C (jint8.checkpoint.crc) against the crc32c package, and restore's
verification through it."""

import types

import crc32c
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jint8
from jint8.checkpoint import crc, integrity


@pytest.mark.parametrize("dtype", [np.int8, np.bool_, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("shape", [(3,), (7, 5), (1031,)])
def test_device_crc_equals_crc32c_of_the_c_order_bytes(dtype, shape, rng):
    # odd word counts at several merge levels, byte counts that are not whole words
    host = (rng.standard_normal(shape) * 40).astype(dtype)
    previous = int(rng.integers(0, 2**32))
    assert crc.device_crc32c(jnp.asarray(host)) == crc32c.crc32c(host.tobytes())
    assert crc.device_crc32c(jnp.asarray(host), previous) == crc32c.crc32c(host.tobytes(), previous)


def test_device_crc_of_a_scalar_and_of_an_empty_array():
    assert crc.device_crc32c(jnp.float32(3.5)) == crc32c.crc32c(np.float32(3.5).tobytes())
    assert crc.device_crc32c(jnp.zeros((0, 4), jnp.float16), 77) == 77


def test_blocks_summed_apart_combine_to_the_whole_arrays_crc(rng):
    """What a leading-axis-sharded array's shards give, one raw register each."""
    whole = rng.integers(-128, 128, (37, 6), dtype=np.int8)
    blocks = [jnp.asarray(part) for part in np.split(whole, [5, 6, 30])]
    raws = [crc.device_raw(block) for block in blocks]
    assert integrity._combined(blocks, raws) == crc32c.crc32c(whole.tobytes())


def test_verification_on_the_device_names_exactly_the_damaged_arrays(tmp_path, monkeypatch):
    """CPU arrays are summed on the host; with that switched off, the device path gives the same verdict."""
    monkeypatch.setattr(integrity, "_on_cpu_devices", lambda devices: False)
    rng = np.random.default_rng(3)
    restored = {f"layer_{i}": {"kernel": jnp.asarray(rng.standard_normal((16, 12)).astype(np.float32)),
                               "scale": jnp.asarray(rng.standard_normal((12,)), jnp.bfloat16)} for i in range(4)}
    damaged = {("layer_1", "scale"), ("layer_2", "kernel")}
    leaves = [types.SimpleNamespace(storage_path=(name, part), checksums=(
        ("", crc32c.crc32c(np.asarray(tree[part]).tobytes()) ^ ((name, part) in damaged)),))
        for name, tree in restored.items() for part in tree]
    assert integrity._on_device_blocks(restored["layer_0"]["kernel"]) is not None
    with pytest.raises(jint8.errors.CheckpointIntegrityError, match="2 arrays do not match") as info:
        integrity.verify_checksums(tmp_path, leaves, restored)
    assert "['layer_1/scale', 'layer_2/kernel']" in str(info.value)
    integrity.verify_checksums(tmp_path, [leaf for leaf in leaves if leaf.storage_path not in damaged], restored)


def test_restore_compiles_the_checksums_of_its_target_ahead_once_per_shape(monkeypatch):
    """compile_ahead: one program per distinct shape and dtype (empty arrays need none); the
    verification afterwards compiles nothing more."""
    import jax

    monkeypatch.setattr(integrity, "_on_cpu_devices", lambda devices: False)
    crc.compiled_raw.cache_clear()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = [((6, 8), jnp.int8), ((6, 8), jnp.int8), ((8,), jnp.float32), ((0, 3), jnp.float32)]
    target = {f"a{i}": jax.ShapeDtypeStruct(shape, dtype, sharding=device) for i, (shape, dtype) in enumerate(shapes)}
    integrity.compile_ahead(target).shutdown(wait=True)
    assert crc.compiled_raw.cache_info().currsize == 2
    arrays = {name: jnp.ones(leaf.shape, leaf.dtype) for name, leaf in target.items()}
    leaves = [types.SimpleNamespace(storage_path=(name,), checksums=(
        ("", crc32c.crc32c(np.asarray(array).tobytes())),)) for name, array in arrays.items()]
    integrity.verify_checksums(None, leaves, arrays)
    assert crc.compiled_raw.cache_info().currsize == 2
