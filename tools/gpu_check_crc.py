"""The restore's device-side CRC-32C (jint8.checkpoint.crc) against the crc32c package, on the
default device: bf16, f32, int8 and uint8 arrays of even, odd and block-straddling lengths.

    python tools/gpu_check_crc.py      # prints one line per case and exits 1 on any mismatch
"""
import sys

import crc32c
import jax
import jax.numpy as jnp
import numpy as np

from jint8.checkpoint.crc import device_crc32c


def main() -> int:
    rng = np.random.default_rng(0)
    failures = 0
    shapes = [(1,), (7,), (4096,), (4097, 3), (1024, 4096), (14336, 4096)]
    for dtype in (jnp.bfloat16, jnp.float32, jnp.int8, jnp.uint8):
        for shape in shapes:
            host = rng.integers(-128, 128, size=shape).astype(np.float32) * rng.random(shape, np.float32)
            x = jax.device_put(jnp.asarray(host).astype(dtype))
            want = crc32c.crc32c(np.asarray(x).tobytes())
            got = device_crc32c(x)
            ok = got == want
            failures += not ok
            print(f"{jnp.dtype(dtype).name:8s} {str(shape):14s} {x.devices()} device {got:#010x} "
                  f"crc32c {want:#010x} {'ok' if ok else 'MISMATCH'}")
    print(f"{failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
