"""Export jint8 int8 params as a transformers + bitsandbytes 8-bit checkpoint.

The files are what transformers' save_pretrained writes for a `load_in_8bit` model, so
`AutoModelForCausalLM.from_pretrained(out_dir)` loads them with bitsandbytes: per quantized
Linear `<module>.weight` int8 [out, in] (Int8Weight.qvalue as it is; bitsandbytes' CB),
`<module>.SCB` float32 [out] (the scale) and `<module>.weight_format` (uint8 0, row-major);
every other tensor in the model's float dtype; config.json with a `quantization_config` block.
A 4-bit tree (Int4Weight kernels) becomes a `load_in_4bit` checkpoint: per Linear the packed
codes `<module>.weight` uint8 [(out * in + 1) // 2, 1] and their quant state (`.absmax`,
`.quant_map`, `.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__<nf4|fp4>`
JSON), as bitsandbytes' QuantState.as_dict(packed=True) writes them (jint8/loading/bnb_int4.py).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from jint8.checkpoint.atomic import refuse_foreign_directory, staged_directory
from jint8.errors import InvalidConfigError, UnsupportedArchitectureError
from jint8.loading.bnb_int4 import QUANT_STATE
from jint8.loading.names import NameRules, expected_tensors, flax_path_to_hf
from jint8.loading.pretrained import name_rules_for
from jint8.models import llama, registered_fusions, spec_for
from jint8.quant4 import NESTED_BLOCKSIZE, Int4Weight, code_book
from jint8.quantize import Int8Weight

_logger = logging.getLogger("jint8")

INDEX_FILE = "model.safetensors.index.json"


def hf_config_of(config):
    """A transformers config for a jint8 Llama-family config (Llama, Mistral, Qwen2, Qwen3)."""
    from transformers import AutoConfig

    if config.model_type not in llama.SPEC.model_types:
        raise InvalidConfigError(
            f"export_bitsandbytes: pass hf_config= for model_type={config.model_type!r} "
            "(only the Llama family's config is rebuilt automatically)"
        )
    rope = config.rope
    fields = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
        hidden_act=config.hidden_act, rope_theta=rope.theta,
    )
    if config.model_type == "llama":
        fields.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if rope.rope_type == "llama3":
        fields["rope_scaling"] = dict(rope_type="llama3", factor=rope.factor, low_freq_factor=rope.low_freq_factor,
                                      high_freq_factor=rope.high_freq_factor,
                                      original_max_position_embeddings=rope.original_max_position_embeddings)
    if config.sliding_window is not None:
        fields["sliding_window"] = config.sliding_window
    return AutoConfig.for_model(config.model_type, **fields)


def _bnb_converts(linear_class: str) -> Optional[bool]:
    """Whether transformers' bitsandbytes integration (replace_with_bnb_linear, which loading a
    bitsandbytes checkpoint runs) converts modules of linear_class ("module:Class"); None where
    it cannot be asked here (torch, transformers or the class missing)."""
    import importlib

    module_name, _, class_name = linear_class.partition(":")
    try:
        import torch
        from transformers import BitsAndBytesConfig
        from transformers.integrations.bitsandbytes import replace_with_bnb_linear

        layer_class = getattr(importlib.import_module(module_name), class_name)
        holder = torch.nn.Module()
        with torch.device("meta"):
            holder.proj = layer_class(8, 8, bias=False)
        quiet = logging.getLogger("transformers.integrations.bitsandbytes")  # its "no linear modules" warning
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            replace_with_bnb_linear(holder, quantization_config=BitsAndBytesConfig(load_in_8bit=True))
        finally:
            quiet.setLevel(level)
    except (ImportError, AttributeError, TypeError, ValueError, RuntimeError) as e:  # not installed, another API
        _logger.info("export_bitsandbytes: cannot ask transformers whether it converts %s: %s", linear_class, e)
        return None
    return type(holder.proj) is not layer_class


def _refuse_unconverted_linears(model_type: str) -> None:
    """A family whose projections transformers' bitsandbytes integration leaves float (it converts
    torch.nn.Linear itself, not subclasses like Falcon's FalconLinear) cannot be loaded back
    from an 8-bit or 4-bit checkpoint: transformers would read the int8 codes into float layers."""
    try:
        linear_class = spec_for(model_type).hf_linear_class
    except UnsupportedArchitectureError:
        return
    if linear_class is not None and _bnb_converts(linear_class) is False:
        raise InvalidConfigError(
            f"export_bitsandbytes: transformers cannot load a bitsandbytes checkpoint of model_type={model_type!r}: "
            f"its bitsandbytes integration does not convert {linear_class.rpartition(':')[2]} layers (it replaces "
            "torch.nn.Linear itself only), so it would read the quantized weights into float layers; keep this "
            "model as a jint8 checkpoint (save_quantized) instead")


def _refuse_kept_float_modules(params, model_type: str) -> None:
    """transformers + bitsandbytes keep a family's _keep_in_fp32_modules float: an int8 kernel
    exported under one would be read into a float Linear."""
    try:
        keep = spec_for(model_type).keep_float_modules
    except UnsupportedArchitectureError:
        return
    quantized_leaf = (Int8Weight, Int4Weight)
    flat = flatten_dict(params, is_leaf=lambda _, x: isinstance(x, quantized_leaf))
    quantized = sorted("/".join(path) for path, leaf in flat.items()
                       if isinstance(leaf, quantized_leaf) and len(path) > 1 and path[-2] in keep)
    if quantized:
        raise InvalidConfigError(
            f"export_bitsandbytes: {quantized[0]} (and {len(quantized) - 1} more) is int8, but transformers keeps "
            f"{list(keep)} of model_type={model_type!r} in float (_keep_in_fp32_modules) and cannot load it "
            f"quantized; quantize with skip_modules=({keep[0]!r},)")


def _tensors(params, rules: NameRules, float_dtype) -> dict[str, np.ndarray]:
    """{transformers name: numpy array} in PyTorch layout."""
    flat = flatten_dict(jax.device_get(params), is_leaf=lambda _, x: isinstance(x, (Int8Weight, Int4Weight)))
    fused_names = {fusion.fused for fusion in registered_fusions()}
    fused = sorted({"/".join(p[:-1]) for p in flat if fused_names.intersection(p)})
    if fused:
        raise InvalidConfigError(
            f"export_bitsandbytes: {fused[0]} (and {len(fused) - 1} more) were fused by fuse_projections; "
            "transformers has no such modules: export the params as loaded, before fusing")
    for path, leaf in flat.items():
        if isinstance(leaf, Int4Weight) and path[-1] == "embedding":
            # Embedding4bit has no state dict (its _save_to_state_dict raises) and transformers'
            # load_in_4bit keeps embeddings 16-bit: no checkpoint of it would load
            raise InvalidConfigError(
                f"export_bitsandbytes: {'/'.join(path)} is a 4-bit embedding; bitsandbytes checkpoints keep "
                "embeddings in 16-bit: quantize with Int4Config(quantize_embeddings=False) to export")
    table = expected_tensors({p: tuple(x.shape[::-1]) if isinstance(x, Int4Weight) else tuple(x.shape)
                              if isinstance(x, Int8Weight) else np.shape(x) for p, x in flat.items()}, rules)
    transpose = {target.path: target.transpose for target in table.values()}
    out = {}
    for path, leaf in flat.items():
        name = flax_path_to_hf(path, rules)
        if isinstance(leaf, Int4Weight):
            out.update(_int4_tensors(name, leaf))
        elif isinstance(leaf, Int8Weight):
            if path[-1] == "embedding":
                raise InvalidConfigError(
                    f"export_bitsandbytes: {'/'.join(path)} is an int8 embedding; bitsandbytes keeps embeddings "
                    "in 16-bit: quantize with Int8Config(quantize_embeddings=False) to export")
            if leaf.qvalue.ndim != 2:
                raise InvalidConfigError(f"export_bitsandbytes: {'/'.join(path)} is a {leaf.qvalue.ndim}-D int8 kernel; bitsandbytes stores 2-D Linear weights only")
            prefix = name[: -len(".weight")]
            out[name] = np.ascontiguousarray(np.asarray(leaf.qvalue))  # K-major, as bnb's CB
            out[prefix + ".SCB"] = np.asarray(leaf.scale, np.float32)
            out[prefix + ".weight_format"] = np.zeros((), np.uint8)  # 0 = "row" in bitsandbytes
        else:
            array = np.asarray(leaf).astype(float_dtype)
            out[name] = np.ascontiguousarray(array.T) if transpose[path] else array
    return out


def _int4_tensors(name: str, w: Int4Weight) -> dict[str, np.ndarray]:
    """The tensors transformers' save_pretrained writes for one bitsandbytes 4-bit Linear."""
    state = {"quant_type": w.quant_type, "blocksize": int(w.blocksize), "dtype": jax.numpy.dtype(w.dtype).name,
             "shape": [int(d) for d in w.shape]}
    out = {name: np.ascontiguousarray(np.asarray(w.packed, np.uint8)), name + ".absmax": np.asarray(w.absmax),
           name + ".quant_map": code_book(w.quant_type).copy()}
    if w.double_quant:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=float(w.offset))
        out[name + ".nested_absmax"] = np.asarray(w.nested_absmax, np.float32)
        out[name + ".nested_quant_map"] = np.asarray(w.nested_code, np.float32)
    out[name + QUANT_STATE + w.quant_type] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()
    return out


def _quantization_config(params, float_dtype) -> dict:
    """config.json's quantization_config for the tree's int8 or 4-bit kernels (one setting each)."""
    is_quantized = lambda x: isinstance(x, (Int8Weight, Int4Weight))  # noqa: E731
    weights = [w for w in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(w)]
    if not weights:
        raise InvalidConfigError("export_bitsandbytes: params hold no Int8Weight or Int4Weight; quantize them first")
    kinds = {type(w) for w in weights}
    if len(kinds) > 1:
        raise InvalidConfigError("export_bitsandbytes: params mix int8 and 4-bit kernels; a bitsandbytes "
                                 "checkpoint is one or the other")
    common = {"quant_method": "bitsandbytes", "llm_int8_enable_fp32_cpu_offload": False,
              "llm_int8_has_fp16_weight": False}
    if Int8Weight in kinds:
        thresholds = {w.threshold for w in weights}
        if len(thresholds) > 1:
            raise InvalidConfigError(f"export_bitsandbytes: int8 kernels use several thresholds {sorted(thresholds)}; bitsandbytes has one")
        return {**common, "load_in_8bit": True, "load_in_4bit": False, "llm_int8_threshold": float(thresholds.pop())}
    settings = {(w.quant_type, w.double_quant, w.compute_dtype) for w in weights}
    if len(settings) > 1:
        raise InvalidConfigError(f"export_bitsandbytes: 4-bit kernels differ in (quant_type, double_quant, "
                                 f"compute_dtype) {sorted(settings, key=str)}; bitsandbytes has one setting per model")
    quant_type, double_quant, compute_dtype = settings.pop()
    compute = jax.numpy.dtype(compute_dtype).name if compute_dtype is not None else float_dtype.name
    return {**common, "load_in_8bit": False, "load_in_4bit": True, "bnb_4bit_quant_type": quant_type,
            "bnb_4bit_use_double_quant": bool(double_quant), "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": "uint8"}


def _save(tensors: dict[str, np.ndarray], path: Path) -> None:
    # safetensors.flax handles bfloat16 (numpy's safetensors writer does not)
    import jax.numpy as jnp
    from safetensors.flax import save_file

    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, os.fspath(path), metadata={"format": "pt"})


def _shards(tensors: dict[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards, current, size = [], {}, 0
    for name, array in tensors.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    return shards + [current]


def export_bitsandbytes(
    model,
    params,
    out_dir,
    *,
    hf_config=None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write params as a transformers+bitsandbytes 8-bit (Int8Weight kernels) or 4-bit
    (Int4Weight kernels) checkpoint directory; returns it.

    Every int8 kernel must carry the same threshold (bitsandbytes has one llm_int8_threshold per
    model), every 4-bit kernel the same quant_type, double quantization and compute dtype; float
    kernels are listed in llm_int8_skip_modules. Shards above max_shard_bytes go
    to model-0000i-of-0000n.safetensors with model.safetensors.index.json.
    """
    out = Path(out_dir).absolute()
    if not (out.is_dir() and not any(out.iterdir())):  # an empty directory is written into as it is
        refuse_foreign_directory(out, overwrite, _is_export_dir, "an exported checkpoint (config.json + safetensors)")
    config = model.config
    hf_config = hf_config or hf_config_of(config)
    rules = name_rules_for(config.model_type)
    _refuse_unconverted_linears(config.model_type)
    _refuse_kept_float_modules(params, config.model_type)
    float_dtype = np.dtype(jax.numpy.dtype(config.dtype))
    quantization_config = _quantization_config(params, float_dtype)
    tensors = _tensors(params, rules, float_dtype)
    skipped = sorted({name.rsplit(".", 2)[-2] for name in tensors if name.endswith(".weight")
                      and tensors[name].ndim == 2
                      and tensors[name].dtype not in (np.int8, np.uint8) and "embed" not in name})

    # written into a staging sibling and renamed onto out: a crash leaves the previous export,
    # and shards or an index of an earlier export never survive beside the new files
    with staged_directory(out, "export_bitsandbytes", _owned_by_export) as staged:
        staged.mkdir()
        _write_export(staged, tensors, max_shard_bytes, hf_config, float_dtype, quantization_config, skipped)
    return out


def _write_export(out: Path, tensors, max_shard_bytes: int, hf_config, float_dtype, quantization_config,
                  skipped) -> None:
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        _save(shards[0], out / "model.safetensors")
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _save(shard, out / filename)
            weight_map.update({name: filename for name in shard})
        total = int(sum(a.nbytes for a in tensors.values()))
        (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))

    config_dict = hf_config.to_dict()
    config_dict["torch_dtype"] = config_dict["dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[float_dtype.name]
    config_dict["quantization_config"] = {**quantization_config, "llm_int8_skip_modules": skipped or None}
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))


_SHARD_FILE = re.compile(r"model(-\d+-of-\d+)?\.safetensors")


def _owned_by_export(name: str) -> bool:
    """Files an export writes; anything else in a directory it replaces (a tokenizer) is kept."""
    return name in ("config.json", INDEX_FILE) or _SHARD_FILE.fullmatch(name) is not None


def _is_export_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(_SHARD_FILE.fullmatch(p.name) for p in path.iterdir())


__all__ = ["export_bitsandbytes", "hf_config_of"]
