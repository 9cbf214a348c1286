"""Peak host memory of a load stays within the largest shard plus a constant (a ~200 MB checkpoint)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

SCRIPT = Path(__file__).with_name("rss_script.py")
# the loader's own memory beyond the placed parameters may be the largest shard (the issue's
# bound) plus this: the tensors staged or converting at once (the pipeline holds at most
# prefetch + in_flight = 6; an int8 conversion of an 8 MiB bf16 kernel uses float32 temporaries
# of 16-32 MiB) and XLA's compiled conversions. Measured on the CI CPU (jax 0.10.2): bf16
# 75-90 MiB, int8 130-140 MiB in all, so the whole bound (96 + 128 MiB) has ~85 MiB of margin;
# holding the checkpoint (224 MiB) on the host as well would exceed it
CONSTANT = 128 * 2**20
# Llama-shaped, 6 layers of hidden 1024 / MLP 4096, 8k vocab, untied: 117 M parameters, 235 MB bf16
CONFIG = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=6, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=8192, max_position_embeddings=128, tie_word_embeddings=False)


def _shapes(config: dict) -> dict[str, tuple[int, int]]:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (d, d) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
    return shapes


def write_random_checkpoint(directory: Path, shards: int = 3) -> list[Path]:
    """A bf16 Llama safetensors checkpoint of random values in `shards` files with an index."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    block = (np.random.default_rng(0).standard_normal(1 << 20, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
    shapes = list(_shapes(CONFIG).items())
    groups = np.array_split(np.arange(len(shapes)), shards)
    weight_map, files = {}, []
    for number, group in enumerate(groups):
        name = f"model-{number + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {shapes[i][0]: np.resize(block, shapes[i][1]) for i in group}  # tiled: cheap to write
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        files.append(directory / name)
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    LlamaConfig(**CONFIG).save_pretrained(directory)
    return files


def test_peak_host_memory_is_bounded_by_the_largest_shard_plus_a_constant(tmp_path):
    files = write_random_checkpoint(tmp_path)
    total, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    assert 200e6 < total < 260e6
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # one load, int8: the reading pipeline a bfloat16 load runs too, plus the conversion's temporaries
    # (a bfloat16 load measured 75-90 MiB, inside this bound whenever the int8 load is)
    [load] = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert load["load"] == "int8"
    overhead = load["peak"] - load["before"] - load["placed"]
    # a loader that held the whole checkpoint (or two shards) on the host would exceed it
    assert overhead <= largest + CONSTANT, (load, overhead / 2**20, largest / 2**20)
    assert load["placed"] > 0.45 * total
