"""bitsandbytes 4-bit checkpoints (transformers' save_pretrained of a load_in_4bit model).

Each quantized Linear "<module>.weight" is stored as the packed codes, uint8 [(out * in + 1) // 2, 1]
(two codes a byte, the torch weight [out, in] flattened row-major), beside
  <module>.weight.absmax             float32 [blocks], or uint8 with double quantization
  <module>.weight.quant_map          float32 [16], the code book
  <module>.weight.nested_absmax      float32 [ceil(blocks / 256)]   (double quantization only)
  <module>.weight.nested_quant_map   float32 [256]                  (double quantization only)
  <module>.weight.quant_state.bitsandbytes__<nf4|fp4>  uint8: JSON with quant_type, blocksize,
      dtype, shape and, with double quantization, nested_blocksize, nested_dtype, nested_offset
(bitsandbytes' QuantState.as_dict(packed=True)). That is exactly Int4Weight, so the codes are
taken as stored: nothing is re-quantized or transposed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jint8.errors import CheckpointFileError, InvalidConfigError, QuantizationError, ShapeError
from jint8.loading.records import TensorRecord
from jint8.quant4 import NESTED_BLOCKSIZE, QUANT_TYPES, Int4Config, Int4Weight, code_book, validate_int4_weight

QUANT_STATE = ".quant_state.bitsandbytes__"
_AUX = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def bnb_int4_settings(hf_config) -> Optional[Int4Config]:
    """The Int4Config of a transformers+bitsandbytes 4-bit checkpoint (Int4Config.from_bitsandbytes
    of its quantization_config), None for any other checkpoint."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    quant = dict(quant if isinstance(quant, dict) else quant.to_dict())
    method = quant.get("quant_method", "")
    method = str(getattr(method, "value", method)).lower().rsplit(".", 1)[-1]
    if method != "bitsandbytes" or not (quant.get("load_in_4bit") or quant.get("_load_in_4bit")):
        return None
    quant.setdefault("load_in_4bit", True)
    try:
        return Int4Config.from_bitsandbytes(quant)
    except InvalidConfigError as e:
        raise CheckpointFileError(f"config.json: bitsandbytes 4-bit checkpoint jint8 cannot read: {e}") from None


@dataclasses.dataclass(frozen=True)
class QuantStateRecords:
    """The tensors of one 4-bit Linear besides its packed codes, by suffix (".absmax", ...)."""

    weight_name: str
    parts: dict  # suffix -> TensorRecord ("quant_state" for the JSON)

    def release(self) -> None:
        for record in self.parts.values():
            if record.release is not None:
                record.release()


def _owner(name: str) -> Optional[tuple[str, str]]:
    """("<module>.weight", suffix) for a quant-state tensor name, else None."""
    if QUANT_STATE in name:
        weight, _, _ = name.partition(QUANT_STATE)
        return weight, "quant_state"
    for suffix in _AUX:
        if name.endswith(".weight" + suffix):
            return name[: -len(suffix)], suffix
    return None


def split_bnb4_records(records: list[TensorRecord]) -> tuple[list[TensorRecord], dict[str, QuantStateRecords]]:
    """(records without quant-state tensors, {"<module>.weight": its QuantStateRecords}).

    A packed weight without a quant state, or a quant state missing its absmax or JSON, is a
    CheckpointFileError naming the file and tensor."""
    states: dict[str, dict] = {}
    rest = []
    for record in records:
        owner = _owner(record.name)
        if owner is None:
            rest.append(record)
        else:
            parts = states.setdefault(owner[0], {})
            if owner[1] in parts:
                raise CheckpointFileError(f"{record.file}: {record.stored_name!r} is stored twice")
            parts[owner[1]] = record
    weights = {r.name: r for r in rest}
    for name, parts in states.items():
        any_part = next(iter(parts.values()))
        for needed in ("quant_state", ".absmax"):
            if needed not in parts:
                field = f"{name}{QUANT_STATE}<nf4|fp4>" if needed == "quant_state" else name + needed
                raise CheckpointFileError(f"{any_part.file}: 4-bit weight {name!r} has no {field!r} tensor "
                                          "(incomplete bitsandbytes quant state)")
        if name not in weights:
            raise CheckpointFileError(f"{any_part.file}: quant state of {name!r} has no packed weight {name!r}")
    for record in rest:
        if record.name not in states and record.dtype == np.uint8 and len(record.shape) == 2 and record.shape[1] == 1:
            raise CheckpointFileError(
                f"{record.file}: {record.stored_name!r} holds packed 4-bit codes {record.shape} but the checkpoint "
                f"has no {record.name + QUANT_STATE}<nf4|fp4> or {record.name}.absmax for it")
    return rest, {name: QuantStateRecords(name, parts) for name, parts in states.items()}


def _quant_state_json(record: TensorRecord) -> dict:
    raw = np.asarray(record.read())
    try:
        state = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFileError(f"{record.file}: {record.stored_name!r} is not bitsandbytes' quant-state JSON: {e}") from None
    if not isinstance(state, dict):
        raise CheckpointFileError(f"{record.file}: {record.stored_name!r} is not a JSON object")
    return state


def _field(state: dict, key: str, record: TensorRecord):
    if key not in state:
        raise CheckpointFileError(f"{record.file}: {record.stored_name!r} has no field {key!r}")
    return state[key]


def read_int4_kernel(weight: TensorRecord, state: QuantStateRecords, compute_dtype=None) -> Int4Weight:
    """The Int4Weight (numpy arrays) of a stored 4-bit Linear, codes and absmax as stored."""
    json_record = state.parts["quant_state"]
    meta = _quant_state_json(json_record)
    quant_type = _field(meta, "quant_type", json_record)
    suffix = json_record.name.rpartition("__")[2]
    if quant_type not in QUANT_TYPES or suffix != quant_type:
        raise CheckpointFileError(f"{json_record.file}: {json_record.stored_name!r}: quant_type={quant_type!r} must be "
                                  f"one of {QUANT_TYPES} (and match the tensor's name)")
    quant_map = np.asarray(state.parts[".quant_map"].read(), np.float32) if ".quant_map" in state.parts else None
    if quant_map is not None and not np.array_equal(quant_map, code_book(quant_type)):
        raise CheckpointFileError(f"{weight.file}: {weight.name}.quant_map is not bitsandbytes' {quant_type} code book")
    nested = {}
    if ".nested_absmax" in state.parts:
        if _field(meta, "nested_blocksize", json_record) != NESTED_BLOCKSIZE:
            raise CheckpointFileError(f"{json_record.file}: {json_record.stored_name!r}: nested_blocksize="
                                      f"{meta['nested_blocksize']!r} must be {NESTED_BLOCKSIZE}")
        if ".nested_quant_map" not in state.parts:
            raise CheckpointFileError(f"{weight.file}: 4-bit weight {weight.name!r} has nested_absmax but no "
                                      f"{weight.name + '.nested_quant_map'!r}")
        nested = dict(nested_absmax=np.asarray(state.parts[".nested_absmax"].read(), np.float32),
                      nested_code=np.asarray(state.parts[".nested_quant_map"].read(), np.float32),
                      offset=np.asarray(_field(meta, "nested_offset", json_record), np.float32).reshape(()))
    try:
        w = Int4Weight(packed=np.asarray(weight.read()), absmax=np.asarray(state.parts[".absmax"].read()),
                       shape=tuple(int(d) for d in _field(meta, "shape", json_record)), quant_type=quant_type,
                       blocksize=_field(meta, "blocksize", json_record),
                       dtype=jnp.dtype(str(_field(meta, "dtype", json_record)).removeprefix("torch.")),
                       compute_dtype=compute_dtype, **nested)
        validate_int4_weight(w, f"{weight.file}: {weight.stored_name!r}")
    except (ShapeError, InvalidConfigError, QuantizationError, TypeError) as e:
        raise CheckpointFileError(f"{weight.file}: 4-bit weight {weight.stored_name!r}: {e}") from None
    return w
