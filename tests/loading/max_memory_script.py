"""max_memory for several devices, checked before any tensor is read (8 fake CPU devices).

1. The tiny checkpoint on an 8-device mesh with one device's budget short: the error names that
   device (and no other) with the bytes it needs and the bytes it was given.
2. Llama-3-70B's shapes, int8, on 8 devices: a checkpoint of sparse files (headers of every 70B
   tensor, no data on disk) whose budget of 8 GiB a device is short; from_pretrained refuses
   before reading, with planned_bytes_per_device's number (~8.35 GiB a device).

usage: python max_memory_script.py TINY_CHECKPOINT_DIR SCRATCH_DIR
"""

import json
import math
import os
import struct
import sys
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import jint8  # noqa: E402
from jint8.errors import InsufficientMemoryError  # noqa: E402
import jint8.loading.pretrained as pretrained  # noqa: E402

LLAMA_70B = dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 rms_norm_eps=1e-5, tie_word_embeddings=False)


def _no_reads():
    """Reading starts in the loading pipeline (run_jobs): fail the script if it is ever reached."""
    def refuse(jobs, **kwargs):
        raise AssertionError(f"{len(jobs)} tensors about to be read before max_memory refused the load")

    pretrained.run_jobs = refuse


def llama_70b_checkpoint(directory: Path) -> None:
    """config.json and one safetensors file of bf16 70B tensors, sparse: a header, no data blocks."""
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    tf.LlamaConfig(**LLAMA_70B, torch_dtype="bfloat16").save_pretrained(directory)
    h, i, v, kv = 8192, 28672, 128256, 8 * 128
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h], "lm_head.weight": [v, h]}
    for layer in range(80):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": [h], p + "post_attention_layernorm.weight": [h],
                       p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                       p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                       p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                       p + "mlp.down_proj.weight": [h, i]})
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        f.truncate(8 + len(encoded) + offset)  # ~141 GB apparent, nothing on disk


def main(tiny, scratch):
    _no_reads()
    mesh = jint8.make_mesh(model=8)
    needed = jint8.loading.planned_bytes_per_device(tiny, dtype=jnp.float32, mesh=mesh)
    budget = {d.id: needed for d in jax.devices()}
    budget[5] = needed - 1
    try:
        jint8.from_pretrained(tiny, dtype=jnp.float32, mesh=mesh, max_memory=budget, progress=False)
    except InsufficientMemoryError as e:
        message = str(e)
    else:
        raise AssertionError("max_memory not enforced")
    assert f"({needed} bytes) of parameters per device on 8 device(s)" in message, message
    assert f"device 5: " in message and f"({needed - 1} bytes" in message and "device 4:" not in message, message
    print("tiny:", message)

    big = Path(scratch) / "llama-70b"
    llama_70b_checkpoint(big)
    config = jint8.Int8Config()
    planned = jint8.loading.planned_bytes_per_device(big, quantization=config, mesh=mesh)
    assert 8.3 * 2**30 < planned < 8.4 * 2**30, planned / 2**30  # ~70.6e9 int8 values / 8, bf16 embeddings / 8
    one = jint8.loading.planned_bytes_per_device(big, quantization=config,
                                                 mesh=jax.sharding.AbstractMesh((1, 1), ("data", "model")))
    assert one > 66 * 2**30, one / 2**30  # one H100 (80 GB) cannot hold it with a KV cache; 8 can
    try:
        jint8.from_pretrained(big, quantization=config, mesh=mesh, max_memory={d.id: "8GiB" for d in jax.devices()},
                              progress=False)
    except InsufficientMemoryError as e:
        message = str(e)
    else:
        raise AssertionError("max_memory not enforced for 70B")
    assert f"({planned} bytes)" in message and all(f"device {d.id}: 8.00 GiB" in message for d in jax.devices()[:8])
    print("70B:", message)
    print("OK")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
