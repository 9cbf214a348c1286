"""Checkpoint loading: safetensors (bitsandbytes 8-bit ones too), v4 Flax msgpack and GGUF readers,
name maps, quantize-and-place, meshes, sharding rules and max_memory.

    model, params = jint8.from_pretrained("path/to/llama-dir", quantization=jint8.Int8Config(),
                                          dtype=jnp.bfloat16, mesh=jint8.make_mesh(model=2))
    logits, _ = model.apply({"params": params}, input_ids)
"""

from jint8.loading.gguf_file import load_tokenizer
from jint8.loading.pretrained import NAME_RULES, from_pretrained, planned_bytes_per_device
from jint8.loading.sharding import (
    cache_spec,
    check_max_memory,
    kernel_spec,
    make_mesh,
    parse_bytes,
    scale_spec,
    shard_cache,
)

__all__ = [
    "NAME_RULES",
    "cache_spec",
    "check_max_memory",
    "from_pretrained",
    "kernel_spec",
    "load_tokenizer",
    "make_mesh",
    "parse_bytes",
    "planned_bytes_per_device",
    "scale_spec",
    "shard_cache",
]
