"""Small kernel plans of the int8 matmul tests: tiles that keep interpret mode fast on tiny shapes."""

from jint8.ops.int8_matmul import configs

THRESHOLD = 6.0
SMALL_QUANT = configs.QuantizeConfig(block_rows=4, block_cols=64, num_warps=4)


def gemm_config(**overrides) -> configs.GemmConfig:
    fields = dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    return configs.GemmConfig(**{**fields, **overrides})


PLANS = {
    "kn": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config()),
    "kn_split3": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(split_k=3)),
    "nk_split3": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(weight_layout="nk", split_k=3)),
    "nk": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(weight_layout="nk", block_m=32)),
    "kn_transposed": configs.KernelPlan(quantize=SMALL_QUANT, transpose_weight=True,
                                        gemm=gemm_config(weight_layout="nk", block_m=32)),
    # XLA's int8 GEMM, then the GEMM kernel's epilogue alone on its int32 result.
    "nk_xla_gemm": configs.KernelPlan(quantize=SMALL_QUANT, gemm_path="xla_gemm",
                                      gemm=gemm_config(weight_layout="nk", block_m=32)),
    "kn_xla_gemm": configs.KernelPlan(quantize=SMALL_QUANT, gemm_path="xla_gemm", gemm=gemm_config()),
}


def fused_plan(m, *, layout="nk", mode="branch", split_k=1, block_k=32, split_partials=False,
               row_scales="kernel"):
    gemm = configs.FusedConfig(block_m=configs.fused_block_m(m), block_n=32, block_k=block_k,
                               num_warps=4, num_stages=2, weight_layout=layout, outlier_mode=mode,
                               split_k=split_k, split_partials=split_partials,
                               row_scales=row_scales)
    return configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm, gemm_path="fused")


FUSED_VARIANTS = {  # name: fused_plan's keyword arguments
    "nk_branch": dict(layout="nk", mode="branch"),
    "nk_dense": dict(layout="nk", mode="dense"),
    "kn_branch": dict(layout="kn", mode="branch"),
    "nk_split3": dict(layout="nk", split_k=3),
    "nk_split3_row_scales_input": dict(layout="nk", split_k=3, row_scales="input"),  # absmax by XLA
}
