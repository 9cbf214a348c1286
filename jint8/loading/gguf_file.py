"""GGUF files (llama.cpp): config and tokenizer through transformers, tensors through `gguf`.

llama.cpp's converter permutes the rows of attn_q / attn_k of "llama"-architecture models
(interleaved rotary pairs instead of transformers' rotate_half halves); the reverse permutation
here is transformers' LlamaTensorProcessor._reverse_permute_weights (modeling_gguf_pytorch_utils).
Gemma GGUFs store norm weights + 1 (transformers' Gemma2TensorProcessor subtracts it again).
BLOOM's fused attn_qkv is stored as q | k | v, not BLOOM's per-head [q, k, v] interleave
(transformers' BloomTensorProcessor undoes that; so does `bloom_qkv_from_llama_cpp`). Falcon
GGUFs of the multi-query (7B) layout store attn_qkv as Falcon does; transformers' GGUF config
reader cannot describe the new decoder architecture (no new_decoder_architecture, ln_attn), so
those files are refused. T5 GGUFs (llama.cpp's "t5": enc.blk.* / dec.blk.*, token_embd = shared)
take the feed-forward kind and the head tying from their tensors (_t5_config_from_tensors).

The gguf reader parses the header only. Tensors stored as F32 / F16 / BF16 are read as views of a
memory map of the file and go to the device as stored (cast, reordered (RowOrder) and quantized
there, as safetensors tensors are); llama.cpp's block-quantized types are dequantized to float32 on the host one tensor
at a time, in the loader's reader thread. Each tensor's pages are released once it is converted.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path
from typing import Iterable

import ml_dtypes
import numpy as np

from jint8.errors import CheckpointFileError, UnsupportedArchitectureError, UnsupportedQuantTypeError
from jint8.loading.records import MappedFile, TensorRecord, check_readable


def _supported_types():
    from gguf import GGMLQuantizationType as Q

    return {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
            Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def open_gguf(file: Path):
    """A gguf.GGUFReader, with parse failures of a truncated or corrupt file as CheckpointFileError."""
    import struct

    from gguf import GGUFReader

    check_readable(file)
    try:
        return GGUFReader(file)
    except (struct.error, IndexError, ValueError) as e:
        message = str(e)
        # reads past the end of the mapped file: a header cut short (struct / index errors) or
        # tensor data shorter than the header declares (the reader's reshape of a short slice)
        if isinstance(e, (struct.error, IndexError)) or "reshape" in message or "buffer" in message:
            raise CheckpointFileError(
                f"{file}: GGUF file is truncated ({file.stat().st_size} bytes end before the header or "
                f"tensor data it declares): {type(e).__name__}: {message}") from None
        raise CheckpointFileError(f"{file}: not a readable GGUF file (corrupt?): {type(e).__name__}: {message}") from None
    except Exception as e:  # the reader raises other types on garbage bytes (bad enum values, UTF-8)
        raise CheckpointFileError(f"{file}: not a readable GGUF file (corrupt?): {type(e).__name__}: {e}") from None


def gguf_architecture(reader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise CheckpointFileError("GGUF file has no general.architecture field")
    return bytes(field.parts[field.data[0]]).decode()


def reverse_rotary_permutation(weights, num_heads: int):
    """Undo llama.cpp's permute of attn_q / attn_k rows ([heads * H, in] PyTorch layout); a numpy
    or a jax array (array methods only: RowOrder runs it in the jitted conversion)."""
    dim = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def bloom_qkv_from_llama_cpp(weights, num_heads: int):
    """llama.cpp's q | k | v rows ([3 * D, ...] PyTorch layout, weight or bias) back to BLOOM's
    per-head [head][q, k, v][head_dim] interleave; a numpy or a jax array."""
    w = weights.reshape(3, num_heads, weights.shape[0] // 3 // num_heads, *weights.shape[1:])
    return w.swapaxes(0, 1).reshape(weights.shape)


@dataclasses.dataclass(frozen=True)
class RowOrder:
    """A llama.cpp row order of a stored tensor, undone on the device in its jitted conversion
    (device_convert.Conversion.row_order): the read stays a view of the mapped file, and no
    host copy is made to permute it. kind: "rotary" (attn_q / attn_k of "llama" files) or
    "bloom_qkv" (BLOOM's attn_qkv weight and bias)."""

    kind: str
    num_heads: int

    def __call__(self, weights):
        if self.kind == "rotary":
            return reverse_rotary_permutation(weights, self.num_heads)
        return bloom_qkv_from_llama_cpp(weights, self.num_heads)


def _row_order(name: str, architecture: str, hf_config):
    """The RowOrder a tensor's rows are stored in, None where they are in transformers' order."""
    if architecture == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
        heads = hf_config.num_attention_heads
        if "attn_k" in name:
            heads = getattr(hf_config, "num_key_value_heads", None) or heads
        return RowOrder("rotary", heads)
    if architecture == "bloom" and ".attn_qkv." in name:
        return RowOrder("bloom_qkv", hf_config.n_head)
    return None


def _gguf_to_hf_names(reader, architecture: str, hf_names: Iterable[str], num_layers: int) -> dict[str, str]:
    import gguf

    arch = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == architecture), None)
    if arch is None:
        raise UnsupportedArchitectureError(f"GGUF architecture {architecture!r} is unknown to the gguf package")
    name_map = gguf.get_tensor_name_map(arch, num_layers)
    table, unmapped = {}, []
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            table[f"{gguf_base}.{suffix}"] = hf_name
        elif "." in base:
            unmapped.append((base.split(".", 1)[1], suffix, hf_name))
    # gguf's map knows some families' tensors by their base-model names only (BLOOM's
    # "h.{bid}.post_attention_layernorm", not "transformer.h.{bid}..."); such a name never takes
    # a GGUF name another tensor already maps to
    for base, suffix, hf_name in unmapped:
        gguf_base = name_map.get_name(base)
        if gguf_base is not None:
            table.setdefault(f"{gguf_base}.{suffix}", hf_name)
    return table


def _stored_float_dtype(tensor_type):
    """The numpy dtype of a tensor stored unquantized (read as a view, sent to the device as stored);
    None for llama.cpp's block-quantized types (dequantized to float32 on the host, tensor by tensor)."""
    from gguf import GGMLQuantizationType as Q

    return {Q.F32: np.dtype(np.float32), Q.F16: np.dtype(np.float16),
            Q.BF16: np.dtype(ml_dtypes.bfloat16)}.get(tensor_type)


def _read_dtype(tensor_type, hf_name: str, architecture: str) -> np.dtype:
    """The dtype _reader returns: as stored for float types (Gemma's norms, shifted by 1 on the
    host, in float32 as before), float32 for dequantized ones."""
    stored = _stored_float_dtype(tensor_type)
    if stored is None or (architecture.startswith("gemma") and hf_name.endswith("norm.weight")):
        return np.dtype(np.float32)
    return stored


def _reader(mapped: MappedFile, tensor, hf_name: str, architecture: str, hf_config):
    """read() of one tensor: a view of the mapped file (float types) or its dequantized float32
    values, in PyTorch layout and llama.cpp's row order (the record's row_order undoes it on the
    device); Gemma's norm weights shifted back by 1 on the host (a float32 copy)."""
    name, tensor_type, offset = tensor.name, tensor.tensor_type, int(tensor.data_offset)
    shape = tuple(reversed([int(d) for d in tensor.shape]))
    stored_shape, stored = tuple(int(d) for d in tensor.data.shape), _stored_float_dtype(tensor_type)

    def read() -> np.ndarray:
        from gguf.quants import dequantize

        try:
            if stored is not None:
                weights = mapped.view(stored, shape, offset)
            else:
                weights = np.asarray(dequantize(mapped.view(np.uint8, stored_shape, offset), tensor_type),
                                     dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError) as e:
            raise UnsupportedQuantTypeError(
                f"{mapped.file}: tensor {name!r} of type {tensor_type.name} cannot be dequantized: {e}"
            ) from None
        if architecture.startswith("gemma") and hf_name.endswith("norm.weight"):
            weights = weights.astype(np.float32) - 1.0
        return weights

    return read


def gguf_records(file: Path, hf_config, hf_names: Iterable[str]) -> list[TensorRecord]:
    """Records for every tensor; names unknown to the name map keep their GGUF name (reported later).

    hf_names: the transformers names the model expects (they give the GGUF names to look for).
    The reader parses the header only; each tensor is read from one memory map of the file when
    its turn comes, and its pages released once converted.
    """
    reader = open_gguf(file)
    architecture = gguf_architecture(reader)
    if architecture == "falcon" and any(t.name.endswith("attn_norm_2.weight") for t in reader.tensors):
        raise UnsupportedArchitectureError(
            f"{file}: a Falcon new-decoder-architecture GGUF (attn_norm_2 tensors); transformers' GGUF config "
            "reader has no new_decoder_architecture, so jint8 reads multi-query (7B-style) Falcon GGUFs only")
    # an encoder-decoder's decoder may be deeper than its encoder (T5's num_decoder_layers)
    blocks = max(hf_config.num_hidden_layers, getattr(hf_config, "num_decoder_layers", None) or 0)
    names = _gguf_to_hf_names(reader, architecture, hf_names, blocks)
    supported = _supported_types()
    mapped = MappedFile(file)
    records = []
    for tensor in reader.tensors:
        if tensor.tensor_type not in supported:
            raise UnsupportedQuantTypeError(
                f"{file}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}; jint8 reads "
                f"{', '.join(sorted(t.name for t in supported))}"
            )
        hf_name = names.get(tensor.name, tensor.name)
        shape = tuple(reversed([int(d) for d in tensor.shape]))
        offset, nbytes = int(tensor.data_offset), int(tensor.n_bytes)
        records.append(TensorRecord(hf_name, os.fspath(file), tensor.name, shape, False,
                                    _reader(mapped, tensor, hf_name, architecture, hf_config),
                                    _read_dtype(tensor.tensor_type, hf_name, architecture), nbytes,
                                    functools.partial(mapped.release, offset, nbytes),
                                    _row_order(tensor.name, architecture, hf_config)))
    return records


def gguf_hf_config(file: Path):
    """The transformers config transformers builds from the GGUF metadata."""
    from transformers import AutoConfig

    _require_torch_for_gguf(file)
    reader = open_gguf(file)  # jint8's own error for a truncated or corrupt file, before transformers' reader
    architecture = gguf_architecture(reader)
    if architecture == "t5encoder":
        raise UnsupportedArchitectureError(f"{file}: a T5 encoder-only GGUF (t5encoder); jint8 builds the "
                                           "encoder-decoder T5 only")
    try:
        config = AutoConfig.from_pretrained(os.fspath(file.parent), gguf_file=file.name)
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointFileError(f"{file}: cannot build a config from its GGUF metadata: {e}") from None
    if architecture == "t5":
        _t5_config_from_tensors(config, reader)
    return config


def _t5_config_from_tensors(config, reader) -> None:
    """What transformers' GGUF reader leaves out of a T5 config, taken as llama.cpp takes it.

    transformers marks every T5 GGUF gated (is_gated_act) but keeps feed_forward_proj "relu";
    llama.cpp runs a block gated GELU (v1.1 / FLAN-T5: wi_0 -> ffn_gate, wi_1 -> ffn_up) where the
    file has ffn_gate tensors and ReLU (T5: wi -> ffn_up) where it has none. The head is the shared
    embedding only where the file has no output.weight (transformers 5 records that flag as
    scale_decoder_outputs and sets tie_word_embeddings regardless). A decoder of another depth is
    stored as decoder_block_count, which transformers does not read.
    """
    names = {tensor.name for tensor in reader.tensors}
    gated = any(name.endswith(".ffn_gate.weight") for name in names)
    config.feed_forward_proj = "gated-gelu" if gated else "relu"
    config.dense_act_fn, config.is_gated_act = ("gelu_new" if gated else "relu"), gated
    config.tie_word_embeddings = "output.weight" not in names
    field = reader.fields.get("t5.decoder_block_count")
    if field is not None:
        config.num_decoder_layers = int(field.parts[field.data[0]][0])


def _require_torch_for_gguf(file: Path) -> None:
    """transformers 5.x's GGUF metadata reader imports torch: say so instead of a lazy-import error."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        raise CheckpointFileError(
            f"{file}: reading a GGUF config/tokenizer goes through transformers, whose GGUF reader needs "
            "torch: `pip install torch` (the CPU build is enough; jint8 itself does not use it)"
        )


def load_tokenizer(path):
    """The tokenizer of a checkpoint directory, or of a GGUF file (built from its metadata)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        _require_torch_for_gguf(path)
        open_gguf(path)
        return AutoTokenizer.from_pretrained(os.fspath(path.parent), gguf_file=path.name)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs and not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        _require_torch_for_gguf(ggufs[0])
        return AutoTokenizer.from_pretrained(os.fspath(path), gguf_file=ggufs[0].name)
    return AutoTokenizer.from_pretrained(os.fspath(path))
