"""Tuned kernel tables: jint8's own per GPU, and tables of your own (JINT8_KERNEL_TABLES)."""

import json

import pytest

from jint8.errors import InvalidConfigError
from jint8.ops.int8_matmul import configs

A100 = "NVIDIA A100-SXM4-80GB"
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def tables(tmp_path, monkeypatch):
    """A JINT8_KERNEL_TABLES directory, the plan cache cleared around the test."""
    monkeypatch.setenv(configs.TABLES_ENV_VAR, str(tmp_path))
    configs.clear_cache()
    yield tmp_path
    configs.clear_cache()


def _entry(**gemm):
    fields = dict(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=2,
                  weight_layout="nk")
    return dict(k=14336, n=4096, max_m=16, gemm_path="fused", gemm={**fields, **gemm})


def test_device_table_names():
    assert configs.device_table_name(H100) == "nvidia_h100"
    assert configs.device_table_name("NVIDIA H200") == "nvidia_h200"
    assert configs.device_table_name(A100) == "nvidia_a100_sxm4_80gb"


def test_a_table_of_your_own_tunes_a_gpu_jint8_has_none_for(tables):
    assert configs.plan_for(A100, 8, 14336, 4096, "nk") == configs.default_plan(8, 14336, 4096, "nk")
    (tables / "nvidia_a100_sxm4_80gb.json").write_text(json.dumps({"shapes_nk": [_entry()]}))
    configs.clear_cache()
    plan = configs.plan_for(A100, 8, 14336, 4096, "nk")
    assert plan.gemm_path == "fused" and (plan.gemm.block_n, plan.gemm.split_k) == (64, 2)
    # other shapes and layouts of that GPU keep the default heuristic
    assert configs.plan_for(A100, 8, 4096, 4096, "nk") == configs.default_plan(8, 4096, 4096, "nk")
    assert configs.plan_for(A100, 8, 14336, 4096, "kn") == configs.default_plan(8, 14336, 4096, "kn")


def test_a_table_of_your_own_wins_over_jint8s(tables):
    own = json.loads((configs._DATA_DIR / "nvidia_h100.json").read_text())
    own["shapes_nk"] = [e for e in own["shapes_nk"] if (e["k"], e["n"]) != (14336, 4096)]
    own["shapes_nk"].append(_entry(split_k=2))  # jint8's own table splits K 4 ways here
    (tables / "nvidia_h100.json").write_text(json.dumps(own))
    configs.clear_cache()
    assert configs.plan_for(H100, 8, 14336, 4096, "nk").gemm.split_k == 2
    assert configs.table_path("nvidia_h100") == tables / "nvidia_h100.json"
    (tables / "nvidia_h100.json").unlink()
    configs.clear_cache()  # jint8's own again
    assert configs.table_path("nvidia_h100") == configs._DATA_DIR / "nvidia_h100.json"
    assert configs.plan_for(H100, 8, 14336, 4096, "nk").gemm.split_k == 4


@pytest.mark.parametrize("content,message", [
    ("{not json", "not readable JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"shapes_nk": [{"k": 1, "n": 2, "gemm": {}}]}), r"shapes_nk\[0\] lacks \['max_m'\]"),
    (json.dumps({"shapes_nk": [_entry(block_n=48)]}), r"shapes_nk\[0\]: block_n=48"),
    (json.dumps({"buckets_nk": [dict(max_m=16, gemm=dict(_entry()["gemm"], tile=3))]}),
     r"buckets_nk\[0\]: .*tile"),
    (json.dumps({"buckets": [dict(max_m=4096, gemm_path="xla_gemm", gemm=_entry()["gemm"])]}),
     r"buckets\[0\]: .*split_k"),
])
def test_a_bad_table_is_refused_naming_the_file_and_the_entry(tables, content, message):
    path = tables / "nvidia_a100_sxm4_80gb.json"
    path.write_text(content)
    with pytest.raises(InvalidConfigError, match=message) as raised:
        configs.plan_for(A100, 8, 14336, 4096, "nk")
    assert str(path) in str(raised.value)


def test_tuner_writes_a_new_table_for_a_gpu_jint8_has_none_for(tables):
    import sys
    sys.path.insert(0, str(configs._DATA_DIR.parents[3] / "tools"))
    import tune_decode_shapes

    best = dict(gemm_path="fused", gemm=dict(block_n=128, block_k=256, split_k=1, split_reduce="xla",
                                             num_warps=8, num_stages=4, row_scales="input"),
                ms=0.0512, device=A100)
    path = tables / "nvidia_a100_sxm4_80gb.json"
    tune_decode_shapes._write_entry(str(path), 4096, 28672, 8, best)
    configs.clear_cache()
    plan = configs.plan_for(A100, 8, 4096, 28672, "nk")
    assert (plan.gemm.block_n, plan.gemm.row_scales, plan.gemm.block_m) == (128, "input", 16)
    assert json.loads(path.read_text())["shapes_nk"][0]["measured"] == {"m": 8, "us": 51.2}


def test_float32_activations_get_tiles_that_fit_shared_memory():
    """The H100 table's large-M plan (128 x 128 output tiles, tuned on 16-bit activations) asked
    for 289 KiB of shared memory with float32 x, over the H100's 227 KiB: for activations wider
    than 16 bits the two-kernel routes' tiles are cut to 64 x 64; 16-bit activations and the
    fused decode kernel keep the table's plan."""
    import jax.numpy as jnp

    configs.clear_cache()
    plan = configs.plan_for("NVIDIA H100 80GB HBM3", 1024, 1024, 777)
    assert plan.gemm_path != "fused" and plan.gemm.block_m * plan.gemm.block_n > 64 * 64
    wide = configs.fit_to_activations(plan, jnp.float32)
    assert (wide.gemm.block_m, wide.gemm.block_n) == (64, 64)
    assert wide.gemm.block_k == plan.gemm.block_k and wide.gemm_path == plan.gemm_path
    assert configs.fit_to_activations(plan, jnp.bfloat16) == plan
    assert configs.fit_to_activations(plan, jnp.float16) == plan
    decode = configs.plan_for("NVIDIA H100 80GB HBM3", 1, 4096, 4096)
    assert decode.gemm_path == "fused" and configs.fit_to_activations(decode, jnp.float32) == decode
