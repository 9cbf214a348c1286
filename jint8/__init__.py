"""jint8: LLM.int8() inference for JAX/Flax.

    qparams = jint8.quantize_params(params, jint8.Int8Config(threshold=6.0, skip_modules=("lm_head",)))
    logits = model.apply({"params": qparams}, ids)        # model written with jint8 layers
    with jint8.intercept():                               # or any unmodified Linen model
        logits = model.apply({"params": qparams}, ids)
"""

from jint8 import errors, ops
from jint8.layers import Int8Dense, Int8Linear, intercept
from jint8.ops import int8_matmul
from jint8.quantize import (
    Int8Config,
    Int8Weight,
    dequantize_params,
    param_bytes,
    quantize_params,
    quantize_vectorwise,
)

__version__ = "0.1.0"

__all__ = [
    "Int8Config",
    "Int8Dense",
    "Int8Linear",
    "Int8Weight",
    "dequantize_params",
    "errors",
    "int8_matmul",
    "intercept",
    "ops",
    "param_bytes",
    "quantize_params",
    "quantize_vectorwise",
]
