"""Meshes: sharded loading on 8 fake CPU devices (in a subprocess: this process's jax already has
one device) gives the unsharded logits; make_mesh and the sharding rules on their own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from reference import require_module
from tiny_checkpoints import save_checkpoint

import jint8
from jint8.errors import InvalidConfigError
from jint8.loading import kernel_spec, parse_bytes, scale_spec

SCRIPT = Path(__file__).with_name("sharded_loading_script.py")
FUSED_SCRIPT = Path(__file__).with_name("fused_sharding_script.py")
PLACEMENT_SCRIPT = Path(__file__).with_name("placement_script.py")


def _run_on_8_cpu_devices(script: Path, *args: str) -> str:
    """Runs script in a fresh process with 8 fake CPU devices; its stdout, which must end "OK"."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = Path(jint8.__file__).resolve().parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("OK")
    return result.stdout


def test_sharded_logits_equal_unsharded_on_8_cpu_devices(tmp_path):
    require_module("torch")
    save_checkpoint("llama", tmp_path)
    stdout = _run_on_8_cpu_devices(SCRIPT, str(tmp_path))
    assert "needs" in stdout
    assert "jint8 checkpoint restored onto the mesh" in stdout


def test_load_places_every_tensor_with_its_final_sharding_on_4_and_8_cpu_devices(tmp_path):
    require_module("torch")
    from tiny_checkpoints import torch_model
    from tiny_gguf import write_llama_gguf

    save_checkpoint("llama", tmp_path / "safetensors")
    write_llama_gguf(torch_model("smollm2"), tmp_path / "tiny.gguf", quant="F16")  # no biases: GGUF's llama has none
    stdout = _run_on_8_cpu_devices(PLACEMENT_SCRIPT, str(tmp_path / "safetensors"), str(tmp_path / "tiny.gguf"))
    assert stdout.count("arrays split") == 8 and stdout.count("tiny.gguf") == 2


def test_whole_model_on_explicit_mesh_axes_gives_one_devices_logits_cache_and_tokens(tmp_path):
    """jax.make_mesh's default AxisType.Explicit: int8 layers and int8 embeddings (the
    vocab-parallel gather) on a (2, 4) mesh, forward, KV cache sharding and generate."""
    require_module("torch")
    save_checkpoint("llama", tmp_path)
    stdout = _run_on_8_cpu_devices(Path(__file__).with_name("explicit_axes_script.py"), str(tmp_path))
    assert "tokens equal" in stdout and "vocab-parallel gather OK" in stdout


def test_fused_projections_are_column_parallel_on_8_cpu_devices():
    _run_on_8_cpu_devices(FUSED_SCRIPT)


def test_4bit_load_is_column_parallel_in_whole_blocks_on_8_cpu_devices(tmp_path):
    require_module("torch")
    require_module("bitsandbytes")
    transformers = require_module("transformers")
    save_checkpoint("llama", tmp_path / "float")
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=False)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config,
                                                      device_map="cpu").save_pretrained(tmp_path / "bnb4")
    _run_on_8_cpu_devices(Path(__file__).with_name("int4_mesh_script.py"), str(tmp_path / "float"),
                          str(tmp_path / "bnb4"))


def test_max_memory_on_8_devices_names_the_short_device_and_refuses_70b_before_reading(tmp_path):
    require_module("torch")
    save_checkpoint("llama", tmp_path / "tiny")
    stdout = _run_on_8_cpu_devices(Path(__file__).with_name("max_memory_script.py"), str(tmp_path / "tiny"),
                                   str(tmp_path / "scratch"))
    assert "device 5: " in stdout and "70B: the model needs 8.35 GiB" in stdout


def test_planned_bytes_per_device_of_a_config(tmp_path):
    """From config.json alone, on an AbstractMesh: no weights, no devices."""
    require_module("transformers")
    import transformers

    transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=256).save_pretrained(tmp_path)
    one, four = (jint8.loading.planned_bytes_per_device(tmp_path, dtype=jax.numpy.float32,
                                                        mesh=jax.sharding.AbstractMesh((1, d), ("data", "model")))
                 for d in (1, 4))
    norms = 4 * 64 * 5  # 2 layers x 2 norms + the final norm, float32, on every device
    assert one == 4 * (256 * 64 * 2 + 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3)) + norms
    assert four == (one - norms) // 4 + norms


def test_max_memory_counts_4bit_bytes(tmp_path):
    require_module("torch")
    save_checkpoint("llama", tmp_path)
    _, params = jint8.from_pretrained(tmp_path, quantization=jint8.Int4Config(min_size=0), progress=False)
    needed = jint8.param_bytes(params)  # bf16 float leaves + every Int4Weight array
    with pytest.raises(jint8.errors.InsufficientMemoryError, match=rf"\({needed} bytes\)"):
        jint8.from_pretrained(tmp_path, quantization=jint8.Int4Config(min_size=0), max_memory={0: needed - 1},
                              progress=False)
    _, placed = jint8.from_pretrained(tmp_path, quantization=jint8.Int4Config(min_size=0), max_memory={0: needed},
                                      mesh=jint8.make_mesh(model=1), progress=False)
    q = placed["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    # double quantization: 64 blocks of q_proj do not make whole 256-block groups: replicated
    assert all(a.sharding.is_fully_replicated for a in jax.tree.leaves(q))
    np.testing.assert_array_equal(np.asarray(q.packed), np.asarray(params["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"].packed))


class _FakeMesh:
    shape = {"data": 1, "model": 4}


@pytest.mark.parametrize(
    "path, shape, expected",
    [
        (("model", "layers_0", "self_attn", "q_proj", "kernel"), (64, 64), P(None, "model")),
        (("model", "layers_0", "self_attn", "q_proj", "bias"), (64,), P("model")),
        (("model", "layers_0", "self_attn", "o_proj", "kernel"), (64, 64), P("model", None)),
        (("model", "layers_0", "self_attn", "o_proj", "bias"), (64,), P(None)),
        (("model", "layers_0", "mlp", "gate_proj", "kernel"), (64, 128), P(None, "model")),
        (("model", "layers_0", "mlp", "down_proj", "kernel"), (128, 64), P("model", None)),
        (("model", "embed_tokens", "embedding"), (256, 64), P("model", None)),
        (("lm_head", "kernel"), (64, 256), P(None, "model")),
        (("model", "norm", "scale"), (64,), P(None)),
        (("model", "layers_0", "self_attn", "k_proj", "kernel"), (64, 6), P(None, None)),  # 6 % 4 != 0
        # fuse_projections' modules: q|k|v and gate|up output features side by side
        (("model", "layers_0", "self_attn", "qkv_proj", "kernel"), (64, 128), P(None, "model")),
        (("model", "layers_0", "self_attn", "qkv_proj", "bias"), (128,), P("model")),
        (("model", "layers_0", "mlp", "gate_up_proj", "kernel"), (64, 256), P(None, "model")),
        (("transformer", "h_0", "attn", "c_attn", "kernel"), (64, 192), P(None, "model")),
        (("transformer", "h_0", "mlp", "c_proj", "kernel"), (256, 64), P("model", None)),
        (("model", "decoder", "layers_0", "fc2", "kernel"), (256, 64), P("model", None)),
        (("transformer", "wte", "embedding"), (256, 64), P("model", None)),
    ],
)
def test_sharding_rules(path, shape, expected):
    assert kernel_spec(path, shape, _FakeMesh()) == expected


def test_int8_scales_follow_the_output_axis():
    assert scale_spec(P(None, "model"), 1, 2) == P("model")
    assert scale_spec(P("model", None), 1, 2) == P(None)


def test_make_mesh_names_axes_and_checks_device_count():
    mesh = jint8.make_mesh()
    assert mesh.axis_names == ("data", "model") and mesh.devices.size == len(jax.devices())
    with pytest.raises(InvalidConfigError, match="needs 16 devices"):
        jint8.make_mesh(data=2, model=8)


def test_parse_bytes():
    assert parse_bytes("20GiB") == 20 * 2**30 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(7) == 7
    with pytest.raises(InvalidConfigError, match="20 parsecs"):
        parse_bytes("20 parsecs")


def test_cache_spec_shards_batch_over_data_and_kv_heads_over_model():
    from jint8.loading import cache_spec

    class Mesh2x4:
        shape = {"data": 2, "model": 4}

    assert cache_spec(8, 4, Mesh2x4()) == P(None, "data", None, "model", None)
    assert cache_spec(2, 3, Mesh2x4()) == P(None, None, None, None, None)
