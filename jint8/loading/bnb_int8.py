"""bitsandbytes 8-bit checkpoints (transformers' save_pretrained of a load_in_8bit model).

Each quantized Linear is stored as "<module>.weight" int8 [out, in] (bnb's CB), "<module>.SCB"
float32 [out] (the per-output-row absmax) and "<module>.weight_format" (0 = row-major). That is
exactly LLM.int8()'s vector-wise weight recipe, so it becomes an Int8Weight as it is:
qvalue = CB [out, in] (both K-major), scale = SCB; nothing is re-quantized or transposed.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from jint8.errors import CheckpointFileError, InvalidConfigError
from jint8.quantize import Int8Config
from jint8.loading.records import TensorRecord


def bnb_int8_settings(hf_config) -> Optional[Int8Config]:
    """The Int8Config of a transformers+bitsandbytes 8-bit checkpoint (Int8Config.from_bitsandbytes
    of its quantization_config), None for an unquantized checkpoint; other methods are refused."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    quant = dict(quant if isinstance(quant, dict) else quant.to_dict())
    method = quant.get("quant_method", "")
    method = str(getattr(method, "value", method))  # transformers' QuantizationMethod enum
    if method.lower().rsplit(".", 1)[-1] != "bitsandbytes":
        raise CheckpointFileError(
            f"config.json: quantization_config.quant_method={method!r}: jint8 reads float checkpoints and "
            "bitsandbytes 8-bit and 4-bit ones only"
        )
    quant.setdefault("load_in_8bit", quant.get("_load_in_8bit", False))
    quant.setdefault("load_in_4bit", quant.get("_load_in_4bit", False))
    try:
        return Int8Config.from_bitsandbytes(quant)
    except InvalidConfigError as e:
        raise CheckpointFileError(f"config.json: bitsandbytes checkpoint jint8 cannot read: {e}") from None


def split_bnb_records(records: list[TensorRecord]) -> tuple[list[TensorRecord], dict[str, TensorRecord]]:
    """(records without SCB / weight_format, {"<module>.weight": its SCB record})."""
    scales = {r.name[: -len(".SCB")] + ".weight": r for r in records if r.name.endswith(".SCB")}
    formats = [r for r in records if r.name.endswith(".weight_format")]
    for record in formats:
        value = np.asarray(record.read())
        if value.size != 1 or int(value.reshape(())) != 0:
            raise CheckpointFileError(
                f"{record.file}: {record.stored_name!r} = {value.tolist()}: only bitsandbytes' row format (0) is supported"
            )
    rest = [r for r in records if not r.name.endswith((".SCB", ".weight_format"))]
    return rest, scales


def read_int8_kernel(weight: TensorRecord, scale: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
    """(qvalue [out, in] int8, scale [out] float32): bnb's CB and SCB as stored (Int8Weight is
    K-major like bitsandbytes, so nothing is transposed)."""
    cb, scb = weight.read(), np.asarray(scale.read(), np.float32)
    if cb.dtype != np.int8:
        raise CheckpointFileError(f"{weight.file}: {weight.stored_name!r} has SCB but dtype {cb.dtype}, not int8")
    if cb.ndim != 2 or scb.shape != (cb.shape[0],):
        raise CheckpointFileError(
            f"{weight.file}: {weight.stored_name!r} {cb.shape} and {scale.stored_name!r} {scb.shape} do not pair up"
        )
    return np.ascontiguousarray(cb), scb
