"""jint8's ops: one folder per op family (tokamax layout). Nothing here imports Flax."""

from jint8.ops.int4_matmul import int4_matmul
from jint8.ops.int8_matmul import Int8MatmulStats, int8_matmul

__all__ = ["Int8MatmulStats", "int4_matmul", "int8_matmul"]
