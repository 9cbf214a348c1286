"""LLM.int8() matmul: public op (api.py), XLA reference (reference.py), GPU kernels (pallas_*)."""

from jint8.ops.int8_matmul.api import (
    BACKEND_ENV_VAR,
    Backend,
    available_backends,
    int8_matmul,
    register_backend,
    select_backend,
)
from jint8.ops.int8_matmul.reference import (
    Int8MatmulStats,
    dequantize_accumulator,
    int8_dot,
    int8_matmul_reference,
    outlier_column_mask,
    quantize_rows,
)

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "Int8MatmulStats",
    "available_backends",
    "dequantize_accumulator",
    "int8_dot",
    "int8_matmul",
    "int8_matmul_reference",
    "outlier_column_mask",
    "quantize_rows",
    "register_backend",
    "select_backend",
]
