"""Small kernel plans of the int8 matmul tests: tiles that keep interpret mode fast on tiny shapes."""

from jint8.ops.int8_matmul import configs

THRESHOLD = 6.0
SMALL_QUANT = configs.QuantizeConfig(block_rows=4, block_cols=64, num_warps=4)


def gemm_config(**overrides) -> configs.Config:
    fields = dict(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2)
    return configs.Config(**{**fields, **overrides})


PLANS = {
    "kn": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config()),
    "kn_split3": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(split_k=3)),
    "nk_split3_in_kernel": configs.KernelPlan(
        quantize=SMALL_QUANT, gemm=gemm_config(weight_layout="nk", split_k=3, split_reduce="kernel")),
    "kn_swap_ab": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(swap_ab=True)),
    "nk": configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm_config(weight_layout="nk", block_m=32)),
    "kn_transposed": configs.KernelPlan(quantize=SMALL_QUANT, transpose_weight=True,
                                        gemm=gemm_config(weight_layout="nk", block_m=32)),
    # XLA's int8 GEMM, then the GEMM kernel's epilogue alone on its int32 result.
    "nk_xla_gemm": configs.KernelPlan(quantize=SMALL_QUANT, gemm_path="xla_gemm",
                                      gemm=gemm_config(weight_layout="nk", block_m=32)),
    "kn_xla_gemm": configs.KernelPlan(quantize=SMALL_QUANT, gemm_path="xla_gemm", gemm=gemm_config()),
}


def fused_plan(m, *, layout="nk", mode="branch", split_k=1, block_k=32, reduce="xla"):
    gemm = gemm_config(block_m=configs.fused_block_m(m), block_k=block_k, weight_layout=layout,
                       outlier_mode=mode, split_k=split_k, split_reduce=reduce)
    return configs.KernelPlan(quantize=SMALL_QUANT, gemm=gemm, gemm_path="fused")


FUSED_VARIANTS = {  # name: (weight layout, outlier_mode, split_k, split_reduce)
    "nk_branch": ("nk", "branch", 1, "xla"),
    "nk_dense": ("nk", "dense", 1, "xla"),
    "kn_branch": ("kn", "branch", 1, "xla"),
    "nk_split3": ("nk", "branch", 3, "xla"),
    "nk_split3_in_kernel": ("nk", "branch", 3, "kernel"),  # the tile's last program sums
}
