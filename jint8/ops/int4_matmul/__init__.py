"""4-bit NF4 / FP4 matmul: public op (api.py), the XLA reference (reference.py) and the Pallas
(Triton lowering) kernels (pallas_triton.py), registered first: on an NVIDIA GPU they run every
call whose weight they read in place (unsupported_reason says why not; XLA runs the rest).
benchmarks/bench_int4_matmul.py --check holds them to the reference on a GPU; on the H100 they
beat the XLA backend 2-4.5x at decode on the Llama-3-8B shapes (benchmarks/RESULTS.md)."""

from jint8.ops._platform import make_callable
from jint8.ops.int4_matmul.api import (
    Backend,
    available_backends,
    int4_matmul,
    register_backend,
    select_backend,
)
from jint8.ops.int4_matmul.reference import dequantized_weight, int4_matmul_reference
from jint8.ops.int4_matmul import pallas_triton as _pallas_triton

register_backend(_pallas_triton.BACKEND)
# jint8.ops.int4_matmul(x, ...) runs the op; jint8.ops.int4_matmul.<module> stays reachable.
make_callable(__name__, int4_matmul)

__all__ = [
    "Backend",
    "available_backends",
    "dequantized_weight",
    "int4_matmul",
    "int4_matmul_reference",
    "register_backend",
    "select_backend",
]
