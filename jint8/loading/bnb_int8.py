"""bitsandbytes 8-bit checkpoints (transformers' save_pretrained of a load_in_8bit model).

Each quantized Linear is stored as "<module>.weight" int8 [out, in] (bnb's CB), "<module>.SCB"
float32 [out] (the per-output-row absmax) and "<module>.weight_format" (0 = row-major). That is
exactly LLM.int8()'s vector-wise weight recipe, so it becomes an Int8Weight as it is:
qvalue = CB.T [in, out], scale = SCB; nothing is re-quantized.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jint8.errors import CheckpointFileError
from jint8.loading.records import TensorRecord


@dataclasses.dataclass(frozen=True)
class BnbInt8Settings:
    """The checkpoint's LLM.int8() threshold (llm_int8_threshold) for its int8 kernels."""

    threshold: float


def bnb_int8_settings(hf_config) -> Optional[BnbInt8Settings]:
    """Settings when the config says the weights are bitsandbytes 8-bit, else None."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    if quant.get("quant_method") != "bitsandbytes":
        return None
    if not quant.get("load_in_8bit", quant.get("_load_in_8bit", False)):
        raise CheckpointFileError(
            f"bitsandbytes checkpoint with {quant.get('bnb_4bit_quant_type', '4-bit')} weights: jint8 reads "
            "only 8-bit (load_in_8bit) checkpoints"
        )
    return BnbInt8Settings(threshold=float(quant.get("llm_int8_threshold", 6.0)))


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
    """(qvalue [in, out] int8, scale [out] float32) from bnb's CB [out, in] and SCB [out]."""
    cb, scb = weight.read(), np.asarray(scale.read(), np.float32)
    if cb.dtype != np.int8:
        raise CheckpointFileError(f"{weight.file}: {weight.stored_name!r} has SCB but dtype {cb.dtype}, not int8")
    if cb.ndim != 2 or scb.shape != (cb.shape[0],):
        raise CheckpointFileError(
            f"{weight.file}: {weight.stored_name!r} {cb.shape} and {scale.stored_name!r} {scb.shape} do not pair up"
        )
    return np.ascontiguousarray(cb.T), scb
