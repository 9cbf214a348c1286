"""Peak host memory of from_pretrained, measured in this fresh process.

usage: python rss_script.py CHECKPOINT_DIR
Loads the checkpoint from bfloat16 into int8 (the conversion's temporaries on top of the reading
pipeline a plain bfloat16 load runs too) and prints one JSON line: the resident set before the
load, its peak during the load and the bytes of the placed parameters. On the CPU backend the placed parameters are host memory
too, so peak - before - placed is what the loader itself held.
"""

import ctypes
import gc
import json
import sys

import jax
import jax.numpy as jnp
from transformers import AutoConfig

import jint8


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))


def _reset_peak() -> None:
    """Return freed heap to the system (glibc keeps it otherwise), then restart the peak from here."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:  # "5": reset VmHWM to the current VmRSS
        refs.write("5")


def main(directory: str) -> None:
    # what the load imports on the way (transformers' config classes, torch if installed) and the
    # backend's start-up are not the loader's memory: done before the baseline
    AutoConfig.from_pretrained(directory)
    jax.block_until_ready(jnp.zeros(8) + 1)
    _reset_peak()
    before = _status("VmRSS")
    _, params = jint8.from_pretrained(directory, dtype=jnp.bfloat16, quantization=jint8.Int8Config(), progress=False)
    jax.block_until_ready(params)
    print(json.dumps(dict(load="int8", before=before, peak=_status("VmHWM"), placed=jint8.param_bytes(params))))


if __name__ == "__main__":
    main(sys.argv[1])
