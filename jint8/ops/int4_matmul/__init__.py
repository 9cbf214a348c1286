"""4-bit NF4 / FP4 matmul: public op (api.py) and the XLA reference (reference.py).

A Pallas kernel registers itself here with register_backend, ahead of "xla"."""

from jint8.ops.int4_matmul.api import (
    Backend,
    available_backends,
    int4_matmul,
    register_backend,
    select_backend,
)
from jint8.ops.int4_matmul.reference import dequantized_weight, int4_matmul_reference

__all__ = [
    "Backend",
    "available_backends",
    "dequantized_weight",
    "int4_matmul",
    "int4_matmul_reference",
    "register_backend",
    "select_backend",
]
