"""4-bit NF4 / FP4 matmul: public op (api.py), the XLA reference (reference.py) and the Pallas
(Triton lowering) kernels (pallas_triton.py), registered after "xla": they run where asked for
(backend="pallas_triton" or JINT8_BACKEND=pallas_triton), every call whose shape they read in
place. They are not the GPU default until benchmarks/bench_int4_matmul.py --check has passed on
a GPU and their timings are in benchmarks/RESULTS.md (so far they have run in interpret mode
and been lowered to Triton IR, never compiled for a GPU)."""

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

register_backend(_pallas_triton.BACKEND, first=False)
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
