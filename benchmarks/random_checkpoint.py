"""A random bf16 Llama checkpoint laid out as transformers saves one (safetensors shards, their
index, config.json), for the loading benchmarks (bench_load.py, load_memory.py): written in
seconds where transformers' own init of an 8B model takes minutes."""

from __future__ import annotations

import json
from pathlib import Path


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """transformers' LlamaForCausalLM state dict (untied lm_head): name -> shape, in its order."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (d // config["num_attention_heads"])
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    shapes.update({"model.norm.weight": (d,), "lm_head.weight": (v, d)})
    return shapes


def checkpoint_bytes(config: dict) -> int:
    """The bf16 bytes of write_checkpoint's tensors."""
    import numpy as np

    return sum(2 * int(np.prod(shape)) for shape in llama_shapes(config).values())


def shard_groups(sizes: dict[str, int], shard_bytes: float) -> list[list[str]]:
    """Contiguous groups of names in order, a new one once the running total passes each multiple
    of shard_bytes (total / shards gives shards files of about equal size)."""
    groups, current, filled = [], [], 0
    for name, size in sizes.items():
        current.append(name)
        filled += size
        if filled >= shard_bytes * (len(groups) + 1):
            groups.append(current)
            current = []
    if current:
        groups.append(current)
    return groups


def write_checkpoint(directory: Path, config: dict, shard_bytes: float) -> list[Path]:
    """Random bf16 weights, N(0, 0.02) tiled from one 32 MiB block from a per-tensor offset (norms
    ones), in shards of about shard_bytes (shard_groups) with transformers' index and config.json.
    Returns the shard files."""
    import ml_dtypes
    import numpy as np
    import transformers
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(config)
    sizes = {name: 2 * int(np.prod(shape)) for name, shape in shapes.items()}
    groups = shard_groups(sizes, shard_bytes)
    block = (np.random.default_rng(0).standard_normal(1 << 24, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    twice = np.concatenate([block, block])  # a window of it at any offset is a view: no copy per tensor
    weight_map, files = {}, []
    for number, names in enumerate(groups):
        file = directory / f"model-{number + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            shape = shapes[name]
            if len(shape) == 1:
                tensors[name] = np.ones(shape, ml_dtypes.bfloat16)
            else:
                offset, count = (7919 * (len(weight_map) + len(tensors))) % block.size, int(np.prod(shape))
                window = twice[offset:offset + min(count, block.size)]
                tensors[name] = (window if count <= block.size else np.resize(window, count)).reshape(shape)
        save_file(tensors, str(file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file.name))
        files.append(file)
        del tensors
    total = sum(sizes.values())
    index = {"metadata": {"total_size": total, "total_parameters": total // 2}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    transformers.LlamaConfig(**config).save_pretrained(directory)
    return files
