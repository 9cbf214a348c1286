"""4-bit NF4 / FP4 matmul: public op (api.py), the XLA reference (reference.py) and the Pallas
(Triton lowering) kernels (pallas_triton.py), registered ahead of "xla": on a GPU they run every
call whose shape they read in place, and their unsupported_reason sends the rest (and every CPU
call) on to "xla"."""

from jint8.ops.int4_matmul.api import (
    Backend,
    available_backends,
    int4_matmul,
    register_backend,
    select_backend,
)
from jint8.ops.int4_matmul.reference import dequantized_weight, int4_matmul_reference
from jint8.ops.int4_matmul import pallas_triton as _pallas_triton

register_backend(_pallas_triton.BACKEND, first=True)

__all__ = [
    "Backend",
    "available_backends",
    "dequantized_weight",
    "int4_matmul",
    "int4_matmul_reference",
    "register_backend",
    "select_backend",
]
