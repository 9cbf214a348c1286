"""The tools/ helpers that interpret XLA output, profiles and tuned tables:
decode_step_kernels.kernels_of, profile_summary.gpu_kernel_times, tune_decode_shapes' table
writer."""

import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tools"))

from decode_step_kernels import kernels_of  # noqa: E402

GPU_STYLE_HLO = """HloModule jit_step, entry_computation_layout={(bf16[1,4096]{1,0}, bf16[4096]{0})->bf16[1,4096]{1,0}}

%fused_multiply (param_0: bf16[1,4096], param_1: bf16[4096]) -> bf16[1,4096] {
  %param_0 = bf16[1,4096]{1,0} parameter(0)
  %param_1 = bf16[4096]{0} parameter(1)
  %broadcast.1 = bf16[1,4096]{1,0} broadcast(%param_1), dimensions={1}
  ROOT %multiply.1 = bf16[1,4096]{1,0} multiply(%param_0, %broadcast.1)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %add.0 = f32[] add(%a, %b)
}

%fused_reduce (param_0.1: f32[4,4096]) -> f32[4096] {
  %param_0.1 = f32[4,4096]{1,0} parameter(0)
  %constant.1 = f32[] constant(0)
  ROOT %reduce.2 = f32[4096]{0} reduce(%param_0.1, %constant.1), dimensions={0}, to_apply=%add
}

ENTRY %main (p0: bf16[1,4096], p1: bf16[4096]) -> bf16[1,4096] {
  %p0 = bf16[1,4096]{1,0} parameter(0)
  %p1 = bf16[4096]{0} parameter(1)
  %custom-call.3 = f32[4,4096]{1,0} custom-call(%p0), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name": "jint8_fused_int8_matmul"}
  %input_reduce_fusion = f32[4096]{0} fusion(%custom-call.3), kind=kInput, calls=%fused_reduce
  %custom-call.4 = (f32[1,8,10,16,128]{4,3,2,1,0}, f32[1,8,10,16]{3,2,1,0}, /*index=2*/bf16[2,1,640,8,128]{4,3,2,1,0}) custom-call(%p0), custom_call_target="__gpu$xla.gpu.triton", backend_config={"name": "jint8_decode_attention"}
  ROOT %loop_multiply_fusion = bf16[1,4096]{1,0} fusion(%p0, %p1), kind=kLoop, calls=%fused_multiply
}
"""


def test_kernels_of_lists_entry_kernels_with_fusion_roots_not_fused_internals():
    kernels = kernels_of(GPU_STYLE_HLO)
    assert [k.label for k in kernels] == [
        "custom-call __gpu$xla.gpu.triton jint8_fused_int8_matmul",
        "fusion kInput reduce",
        "custom-call __gpu$xla.gpu.triton jint8_decode_attention",  # a tuple-shaped result
        "fusion kLoop multiply",
    ]
    assert [k.name for k in kernels] == ["custom-call.3", "input_reduce_fusion", "custom-call.4",
                                         "loop_multiply_fusion"]


def test_kernels_of_reads_a_real_compiled_module():
    f = jax.jit(lambda x, y: jnp.sin(x) * y + jnp.sum(x))
    text = f.lower(jnp.ones((8, 128)), jnp.ones((8, 128))).compile().as_text()
    kernels = kernels_of(text)
    assert kernels and all(k.op in ("fusion", "copy", "custom-call", "reduce") for k in kernels)
    # the fused computations' own multiply / sine never show up as kernels of their own
    assert not any(k.name.startswith(("multiply", "sine")) for k in kernels)


def test_tuned_two_kernel_entry_is_what_dispatch_then_runs(tmp_path, monkeypatch):
    """tune_decode_shapes --write-table records the winning route, and plan_for runs it."""
    import json
    import shutil

    import tune_decode_shapes
    from jint8.ops.int8_matmul import configs

    table = tmp_path / "nvidia_h100.json"
    shutil.copy(configs._DATA_DIR / "nvidia_h100.json", table)
    quantize = configs.plan_for("NVIDIA H100", 8, 14336, 4096, "nk").quantize
    candidate = dict(block_n=64, block_k=256, split_k=2, split_reduce="xla", num_warps=4, num_stages=4)
    plan = tune_decode_shapes.route_plans("pallas", candidate, 8, quantize)
    assert (plan.gemm_path, plan.gemm.block_m, plan.gemm.split_k) == ("pallas", 16, 2)
    assert tune_decode_shapes.route_plans("xla_gemm", candidate, 8, quantize) is None  # no K loop to split

    # jint8's entry for down_proj covers M = 1-16 and was tuned at M = 1: the M = 8 winner takes
    # M = 2-16, M = 1 keeps its plan, and the M = 65-256 entry (split-K K loop) stays as it was.
    h100 = "NVIDIA H100 80GB HBM3"
    at_m1 = configs.plan_for(h100, 1, 14336, 4096, "nk")
    best = dict(gemm_path="pallas", gemm=candidate, ms=0.0401, device=h100)
    tune_decode_shapes._write_entry(str(table), 14336, 4096, 8, best)
    entries = [e for e in json.loads(table.read_text())["shapes_nk"] if (e["k"], e["n"]) == (14336, 4096)]
    assert [(e.get("min_m", 1), e["max_m"], e["gemm_path"]) for e in entries] == [
        (1, 1, "fused"), (2, 16, "pallas"), (65, 256, "pallas")]
    assert entries[1]["measured"] == {"m": 8, "us": 40.1}
    assert entries[2]["gemm"]["split_k"] == 2 and entries[2].get("measured", {}).get("m") != 8

    monkeypatch.setattr(configs, "_DATA_DIR", tmp_path)
    configs.clear_cache()
    try:
        assert configs.plan_for(h100, 1, 14336, 4096, "nk") == at_m1
        for m in (2, 8, 16):
            plan = configs.plan_for(h100, m, 14336, 4096, "nk")
            assert plan.gemm_path == "pallas" and plan.gemm.block_n == 64 and plan.gemm.split_k == 2
        # tuned at M = 8 again: that entry is replaced whole, range kept
        tune_decode_shapes._write_entry(str(table), 14336, 4096, 8, dict(best, ms=0.0388))
        entries = [e for e in json.loads(table.read_text())["shapes_nk"] if (e["k"], e["n"]) == (14336, 4096)]
        at_m8 = lambda e: e["measured"]["us"] if e.get("measured", {}).get("m") == 8 else None  # noqa: E731
        assert [(e.get("min_m", 1), e["max_m"], at_m8(e)) for e in entries] == [
            (1, 1, None), (2, 16, 38.8), (65, 256, None)]
        # a shape whose only entry starts above the tuned M: the new one fills the gap below it
        data = json.loads(table.read_text())
        data["shapes_nk"] = [e for e in data["shapes_nk"] if (e["k"], e["n"]) != (14336, 4096) or e["max_m"] > 1]
        table.write_text(json.dumps(data))
        tune_decode_shapes._write_entry(str(table), 14336, 4096, 1, dict(best, gemm_path="fused"))
        entries = [e for e in json.loads(table.read_text())["shapes_nk"] if (e["k"], e["n"]) == (14336, 4096)]
        assert [(e.get("min_m", 1), e["max_m"]) for e in entries] == [(1, 1), (2, 16), (65, 256)]
    finally:
        configs.clear_cache()


def test_tuned_entry_below_a_large_m_entry_covers_decode_rows_only(tmp_path):
    """A shape whose only entry is for M = 65-256 (the big layer's xla_gemm entry): an M = 1
    winner covers M = 1-16, not the 17-64 rows in between (the fused kernel's M <= 16 range)."""
    import json

    import tune_decode_shapes

    table = tmp_path / "nvidia_h100.json"
    large = dict(k=8192, n=28672, min_m=65, max_m=256, gemm_path="xla_gemm",
                 gemm=dict(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=2))
    table.write_text(json.dumps({"shapes_nk": [large]}))
    best = dict(gemm_path="fused", ms=0.0965, device="NVIDIA H100 80GB HBM3",
                gemm=dict(block_n=128, block_k=256, split_k=1, num_warps=8, num_stages=4))
    tune_decode_shapes._write_entry(str(table), 8192, 28672, 1, best)
    entries = json.loads(table.read_text())["shapes_nk"]
    assert [(e.get("min_m", 1), e["max_m"], e["gemm_path"]) for e in entries] == [
        (1, 16, "fused"), (65, 256, "xla_gemm")]
    assert entries[0]["measured"] == {"m": 1, "us": 96.5}


def test_write_table_takes_a_correct_candidate_by_the_margin_or_any_with_negative_margin():
    """--write-table records only a candidate whose output is right; by default only one 3 %
    faster than the table's plan, and with a negative --min-gain the fastest right one anyway."""
    import tune_decode_shapes

    def row(plan, ms, error=1e-3):
        return dict(plan=plan, ms=ms, rel_error=error)

    wrong_fast, table = row("candidate", 0.050, error=0.9), row("table", 0.100)
    close, slower = row("candidate", 0.098), row("candidate", 0.120)
    assert tune_decode_shapes.entry_to_write([wrong_fast, close, table], 0.03) is None
    assert tune_decode_shapes.entry_to_write([wrong_fast, close, table], 0.01) is close
    assert tune_decode_shapes.entry_to_write([table, slower], 0.03) is None
    assert tune_decode_shapes.entry_to_write([table, slower], -1) is slower
    assert tune_decode_shapes.entry_to_write([wrong_fast, table], -1) is None
    nan = row("candidate", 0.010, error=float("nan"))  # a broken plan's NaN output
    assert tune_decode_shapes.entry_to_write([nan, table], -1) is None


def test_gpu_kernel_times_sums_stream_events_by_kernel_name(tmp_path, capsys):
    """profile_summary.gpu_kernel_times (behind profile_op.py and the summary of bench_generate.py
    --profile traces): complete events on the GPU's stream threads, summed by name with the
    numeric suffix dropped; host events and the GPU's derived "XLA Ops" lines are not counted."""
    import gzip
    import json

    from profile_summary import gpu_kernel_times

    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13(Compute)"}},
        {"ph": "M", "name": "thread_name", "pid": 2, "tid": 8, "args": {"name": "XLA Ops"}},
        {"ph": "X", "pid": 2, "tid": 7, "name": "jint8_int8_gemm", "ts": 100.0, "dur": 26.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "jint8_int8_gemm", "ts": 300.0, "dur": 27.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "loop_convert_fusion.1", "ts": 130.0, "dur": 1.0},
        {"ph": "X", "pid": 2, "tid": 7, "name": "loop_convert_fusion", "ts": 140.0, "dur": 2.0},
        {"ph": "X", "pid": 2, "tid": 8, "name": "jint8_int8_gemm", "ts": 100.0, "dur": 26.0},
        {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction", "ts": 90.0, "dur": 500.0},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    total, count, span = gpu_kernel_times(path)
    assert dict(total) == {"jint8_int8_gemm": 53.0, "loop_convert_fusion": 3.0}
    assert dict(count) == {"jint8_int8_gemm": 2, "loop_convert_fusion": 2}
    assert span == 227.0  # first start 100, last end 327

    from profile_summary import gpu_kernel_events, main

    # --sequence's input: the same kernels in start order, names without their suffix.
    assert gpu_kernel_events(path) == [(100.0, 26.0, "jint8_int8_gemm"),
                                       (130.0, 1.0, "loop_convert_fusion"),
                                       (140.0, 2.0, "loop_convert_fusion"),
                                       (300.0, 27.0, "jint8_int8_gemm")]
    main([str(tmp_path), "--sequence", "2", "--skip", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")
            or line.startswith("| 3 |")]
    # the gap before a kernel: its start less the previous kernel's end (131 -> 140, 142 -> 300)
    assert rows == ["| 2 | 9.0 | 2.0 | loop_convert_fusion |", "| 3 | 158.0 | 27.0 | jint8_int8_gemm |"]
