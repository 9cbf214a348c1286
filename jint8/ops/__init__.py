"""jint8's ops: one folder per op family (tokamax layout). Nothing here imports Flax.

jint8.ops.int8_matmul and jint8.ops.int4_matmul are the op packages, each callable as its op
(jint8.ops.int8_matmul(x, wq, scales) is jint8.ops.int8_matmul.api.int8_matmul(...)), so their
modules stay reachable as attributes (jint8.ops.int8_matmul.pallas_triton)."""

from jint8.ops import int4_matmul, int8_matmul
from jint8.ops.int8_matmul import Int8MatmulStats

__all__ = ["Int8MatmulStats", "int4_matmul", "int8_matmul"]
