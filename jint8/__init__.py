"""jint8: LLM.int8() inference for JAX/Flax.

    qparams = jint8.quantize_params(params, jint8.Int8Config(threshold=6.0, skip_modules=("lm_head",)))
    logits = model.apply({"params": qparams}, ids)        # model written with jint8 layers
    with jint8.intercept():                               # or any unmodified Linen model
        logits = model.apply({"params": qparams}, ids)
"""

from jint8 import errors, functional, ops
from jint8._version import __version__
from jint8.calibration import calibrate, load_int8_config
from jint8.export import export_bitsandbytes
from jint8.generation import GenerationConfig, generate
from jint8.layers import GatedInput, Int8Dense, Int8Embed, Int8Linear, NormedInput, intercept
from jint8.loading import from_pretrained, make_mesh
from jint8.models.fusion import fuse_projections
from jint8.ops.int4_matmul import int4_matmul
from jint8.ops.int8_matmul import int8_matmul
from jint8.quant4 import Int4Config, Int4Weight
from jint8.quantize import (
    Int8Config,
    Int8Weight,
    dequantize_params,
    param_bytes,
    quantize_params,
    quantize_vectorwise,
)


def __getattr__(name):
    # Orbax (and tensorstore) load on first use of the checkpoint API, not on `import jint8`.
    if name in ("save_quantized", "load_quantized"):
        from jint8 import checkpoint

        return getattr(checkpoint, name)
    if name == "serve":  # `jint8.serve.Engine` without an import line; the HTTP stack loads on its own use
        import jint8.serve

        return jint8.serve
    raise AttributeError(f"module 'jint8' has no attribute {name!r}")

__all__ = [
    "GatedInput",
    "GenerationConfig",
    "Int4Config",
    "Int4Weight",
    "Int8Config",
    "Int8Dense",
    "Int8Embed",
    "Int8Linear",
    "Int8Weight",
    "NormedInput",
    "calibrate",
    "dequantize_params",
    "errors",
    "export_bitsandbytes",
    "functional",
    "fuse_projections",
    "from_pretrained",
    "generate",
    "int4_matmul",
    "int8_matmul",
    "intercept",
    "load_int8_config",
    "load_quantized",
    "make_mesh",
    "ops",
    "param_bytes",
    "quantize_params",
    "quantize_vectorwise",
    "save_quantized",
    "serve",
]
