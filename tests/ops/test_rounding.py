"""jint8.ops.rounding.round_to(explicit=True) against the correctly rounded cast."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jint8.ops.rounding import round_to


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_interpret_rounding_equals_the_cast_including_subnormals(rng, dtype):
    finfo = jnp.finfo(dtype)
    tiny = float(finfo.smallest_normal)
    values = np.concatenate([
        rng.standard_normal(4096) * 100,                               # normal range
        rng.uniform(-tiny, tiny, 4096),                                # dtype's subnormals
        (rng.integers(-1024, 1024, 512) + 0.5) * float(finfo.smallest_subnormal),  # exact ties
        [0.0, -0.0, tiny, -tiny, tiny * (1 - 2.0**-12)],
    ]).astype(np.float32)
    want = np.asarray(jnp.asarray(values).astype(dtype))  # eager cast: round to nearest even
    got = np.asarray(jax.jit(lambda v: round_to(v, dtype, explicit=True))(values))
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))
