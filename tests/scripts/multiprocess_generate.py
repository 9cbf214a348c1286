"""One process of a multi-process (jax.distributed) run on this machine's CPU: load a checkpoint
onto a mesh over every process's devices with from_pretrained, each process reading only its own
devices' blocks of each tensor, then generate greedily; the tokens and the prompt's logits go to OUT (.npz).

usage: python multiprocess_generate.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT_DIR OUT [int8|int4|float]
(tests/test_multiprocess.py starts NUM_PROCESSES of these against a coordinator on 127.0.0.1:PORT.)
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

PROCESS_ID, NUM_PROCESSES, PORT = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
# a timeout at each step that waits on the other processes: a lost peer fails the run, never hangs it
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=NUM_PROCESSES,
                           process_id=PROCESS_ID, local_device_ids=[0], initialization_timeout=30,
                           heartbeat_timeout_seconds=20, shutdown_timeout_seconds=10)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import jint8  # noqa: E402
import jint8.loading.device_convert as device_convert  # noqa: E402
import jint8.loading.pretrained as pretrained  # noqa: E402

READS = []  # (the tensor's shape, the index of each block this process read of it)


class _Recorded:
    """A host array whose block reads are recorded."""

    def __init__(self, array):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype

    def __getitem__(self, index):
        READS.append((self.shape, index))
        return self.array[index]


_stage_sharded = device_convert.stage_sharded


def _recording_stage(host_array, sharding):
    return _stage_sharded(_Recorded(host_array), sharding)


device_convert.stage_sharded = pretrained.stage_sharded = _recording_stage


def main(path, out, kind):
    assert jax.process_count() == NUM_PROCESSES and jax.local_device_count() == 1, jax.devices()
    mesh = jint8.make_mesh(model=jax.device_count())
    quantization = {"int8": jint8.Int8Config(min_size=0), "float": None,
                    "int4": jint8.Int4Config(min_size=0, double_quant=False)}[kind]
    model, params = jint8.from_pretrained(path, quantization=quantization, dtype=jnp.float32, mesh=mesh,
                                          progress=False)
    # every column-parallel tensor was read in this process's rows only
    split = [(shape, index) for shape, index in READS if any(s != slice(None) and s != slice(0, d)
                                                             for s, d in zip(index, shape))]
    assert split, "no tensor was read in part"
    for shape, index in split:
        covered = [len(range(*s.indices(d))) for s, d in zip(index, shape)]
        assert np.prod(covered) * NUM_PROCESSES == np.prod(shape), (shape, index)
    q = params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    local = q.qvalue if kind == "int8" else (q.packed if kind == "int4" else q)
    assert not local.is_fully_addressable and len(local.addressable_shards) == 1
    ids = np.random.RandomState(0).randint(0, 256, (2, 7)).astype(np.int32)
    mask = np.ones_like(ids, bool)
    mask[1, :2] = False  # a left-padded row
    result = jint8.generate(model, params, ids, mask, jint8.GenerationConfig(max_new_tokens=6))
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, jnp.asarray(ids))
    assert not logits.is_fully_addressable  # vocab-parallel lm_head: each process holds half
    np.savez(out, sequences=result.sequences, logits=multihost_utils.process_allgather(logits, tiled=True))
    print(f"process {PROCESS_ID}: {len(split)} of {len(READS)} tensors read in part; tokens "
          f"{result.sequences[:, ids.shape[1]:].tolist()}", flush=True)
    print("OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[4], sys.argv[5], sys.argv[6] if len(sys.argv) > 6 else "int8")
