"""Int4Weight leaves in a jint8 checkpoint: their arrays (packed codes, absmax and, with double
quantization, nested_absmax, nested_code, offset) stored as they are under <path>/<field>, their
static fields (shape, quant_type, blocksize, dtype, compute_dtype) in the leaf's metadata record.
They are restored replicated (on mesh, or on the default device). from_pretrained of a float or
bitsandbytes checkpoint splits column-parallel 4-bit kernels along N in whole blocks
(quant4.int4_weight_specs); restoring a saved jint8 checkpoint does not split them yet."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jint8.errors import CheckpointError
from jint8.quant4 import NESTED_BLOCKSIZE, Int4Weight, validate_int4_weight

KIND = "int4_weight"
_FIELDS = ("packed", "absmax", "nested_absmax", "nested_code", "offset")


def static_fields(w: Int4Weight) -> dict:
    """The metadata record's "int4" entry (JSON-safe)."""
    return {"shape": [int(d) for d in w.shape], "quant_type": w.quant_type, "blocksize": int(w.blocksize),
            "dtype": jnp.dtype(w.dtype).name, "double_quant": bool(w.double_quant),
            "compute_dtype": None if w.compute_dtype is None else jnp.dtype(w.compute_dtype).name}


def stored_arrays(w: Int4Weight, name: str) -> dict:
    try:
        validate_int4_weight(w, name)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return {field: getattr(w, field) for field in _FIELDS if getattr(w, field) is not None}


def array_shapes(fields: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """{field: (shape, dtype)} of the arrays an Int4Weight with these static fields stores."""
    n = 1
    for d in fields["shape"]:
        n *= int(d)
    blocks = -(-n // int(fields["blocksize"]))
    shapes = {"packed": (((n + 1) // 2, 1), "uint8"), "absmax": ((blocks,), "uint8" if fields["double_quant"] else "float32")}
    if fields["double_quant"]:
        shapes.update(nested_absmax=((-(-blocks // NESTED_BLOCKSIZE),), "float32"), nested_code=((256,), "float32"),
                      offset=((), "float32"))
    return shapes


def abstract_arrays(fields: dict, sharding) -> dict:
    return {field: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=sharding)
            for field, (shape, dtype) in array_shapes(fields).items()}


def rebuild(fields: dict, arrays: dict) -> Int4Weight:
    compute = fields.get("compute_dtype")
    return Int4Weight(shape=tuple(int(d) for d in fields["shape"]), quant_type=fields["quant_type"],
                      blocksize=int(fields["blocksize"]), dtype=jnp.dtype(fields["dtype"]),
                      compute_dtype=None if compute is None else jnp.dtype(compute),
                      **{field: arrays[field] for field in array_shapes(fields)})
