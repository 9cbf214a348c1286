"""LLM.int8() matmul: public op (api.py), its prologues and output gate (prologue.py), XLA reference
(reference.py), GPU kernels (pallas_triton/)."""

from jint8.ops._platform import make_callable
from jint8.ops.int8_matmul.api import (
    BACKEND_ENV_VAR,
    Backend,
    available_backends,
    int8_matmul,
    register_backend,
    select_backend,
)
from jint8.ops.int8_matmul.sharded import MatmulLayout, layout_for
from jint8.ops.int8_matmul.prologue import InputGate, InputNorm, OutputGate
from jint8.ops.int8_matmul.reference import (
    Int8MatmulStats,
    dequantize_accumulator,
    int8_dot,
    int8_matmul_reference,
    outlier_column_mask,
    quantize_rows,
)
from jint8.ops.int8_matmul import pallas_triton as _pallas_triton

# GPU kernels ahead of the XLA reference; their unsupported_reason sends CPU calls on to "xla".
register_backend(_pallas_triton.BACKEND, first=True)
# jint8.ops.int8_matmul(x, ...) runs the op; jint8.ops.int8_matmul.<module> stays reachable.
make_callable(__name__, int8_matmul)

__all__ = [
    "BACKEND_ENV_VAR",
    "Backend",
    "InputGate",
    "InputNorm",
    "Int8MatmulStats",
    "MatmulLayout",
    "OutputGate",
    "available_backends",
    "dequantize_accumulator",
    "int8_dot",
    "int8_matmul",
    "int8_matmul_reference",
    "layout_for",
    "outlier_column_mask",
    "quantize_rows",
    "register_backend",
    "select_backend",
]
