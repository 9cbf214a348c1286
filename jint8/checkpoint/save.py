"""save_quantized: an Orbax save into a hidden staging directory, published atomically."""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Optional

import jax
import orbax.checkpoint as ocp

from jint8.checkpoint.atomic import check_writable, refuse_foreign_directory, staged_directory
from jint8.checkpoint.metadata import (
    _ARRAYS_ITEM,
    _METADATA_ITEM,
    PathLike,
    _checkpointer,
    _metadata_json,
)
from jint8.checkpoint.tree import _to_storage
from jint8.errors import CheckpointError, CheckpointExistsError, InvalidConfigError
from jint8.quant4 import Int4Config
from jint8.quantize import Int8Config

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- destination


def _is_checkpoint_dir(target: pathlib.Path) -> bool:
    return (target / _METADATA_ITEM).is_dir() and (target / _ARRAYS_ITEM).is_dir()  # even if corrupt


def _check_destination(target: pathlib.Path, overwrite: bool) -> None:
    refuse_foreign_directory(target, overwrite, _is_checkpoint_dir, "a jint8 checkpoint")


def _owned_by_orbax(name: str) -> bool:
    """Entries of an old checkpoint that a new save replaces (everything else, such as tokenizer
    files a user copied in, is carried over into the new checkpoint)."""
    return name in (_ARRAYS_ITEM, _METADATA_ITEM, "commit_success.txt") or name.startswith("_CHECKPOINT")


def _save_assets(directory: pathlib.Path, tokenizer, generation_config) -> None:
    """A tokenizer (files, chat template) and generation config in transformers' layout, so the
    checkpoint directory is self-contained like a transformers one."""
    if tokenizer is not None:
        tokenizer.save_pretrained(os.fspath(directory))
    if generation_config is not None:
        generation_config.save_pretrained(os.fspath(directory))


# ----------------------------------------------------------------------------- public API


def save_quantized(
    directory: PathLike,
    params,
    *,
    quant_config,
    model_config=None,
    overwrite: bool = False,
    tokenizer=None,
    generation_config=None,
) -> pathlib.Path:
    """Write a quantized params tree (Linen dict, FrozenDict or nnx.State) as an Orbax checkpoint.

    quant_config: the Int8Config or Int4Config params were quantized with (stored, returned by
      load_quantized). Int4Weight leaves are stored as they are and restored replicated.
    model_config: a dataclass (stored as dataclasses.asdict plus its class name), a dict, or None.
    overwrite: replace an existing jint8 checkpoint at directory, atomically; without it an
      existing path raises CheckpointExistsError. Files of the old checkpoint that this save does
      not write (a tokenizer copied in) are kept. Returns the absolute checkpoint path.
    tokenizer, generation_config: transformers objects saved beside the arrays with their
      save_pretrained (tokenizer files and chat template, generation_config.json).
    Every array's CRC-32C is recorded in the metadata; load_quantized checks it.
    """
    if not isinstance(quant_config, (Int8Config, Int4Config)):
        raise InvalidConfigError(f"quant_config must be an Int8Config or Int4Config, got {type(quant_config).__name__}")
    if getattr(quant_config, "mode", "fixed") == "auto":
        raise InvalidConfigError("quant_config: save the Int8Config that mode='auto' resolved to (calibrate_auto's "
                                 "config, or load_auto_int8's third result), not the request")
    if jax.process_count() > 1:
        raise CheckpointError(f"{directory}: save_quantized supports one process, not {jax.process_count()}")
    target = pathlib.Path(directory).absolute()
    kind, leaves, arrays = _to_storage(params)
    metadata = _metadata_json(kind, leaves, quant_config, model_config)
    _check_destination(target, overwrite)
    with staged_directory(target, "save_quantized", _owned_by_orbax) as staged:
        try:
            with _checkpointer() as checkpointer:
                checkpointer.save(
                    staged,
                    args=ocp.args.Composite(
                        **{_ARRAYS_ITEM: ocp.args.StandardSave(arrays), _METADATA_ITEM: ocp.args.JsonSave(metadata)}
                    ),
                )
        except OSError:
            raise
        except Exception as e:  # TensorStore reports a full disk or an I/O error as ValueError/RuntimeError
            raise CheckpointError(f"save_quantized: writing {target} failed: {_first_line(e)}") from None
        _save_assets(staged, tokenizer, generation_config)
    nbytes = sum(leaf.nbytes for leaf in leaves)
    logger.info("saved %d leaves (%.1f MiB before compression) to %s", len(leaves), nbytes / 2**20, target)
    return target


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:300] if text else ''}"


def quantize_checkpoint(
    src: PathLike,
    out: PathLike,
    *,
    quant_config: Optional[Int8Config] = None,
    progress: bool = True,
    overwrite: bool = False,
) -> pathlib.Path:
    """Load any source jint8.from_pretrained reads (safetensors, msgpack, GGUF), quantized while loading
    with quant_config (default Int8Config()), and save it to out with its model config.
    Int8Config(mode="auto") calibrates while loading and stores the config it resolved to.

    The source's tokenizer (files, chat template) and generation_config.json are saved into the
    checkpoint, so that generate / eval-ppl can use it alone.
    progress: from_pretrained's progress bar (over the bytes read). Returns the checkpoint path.
    """
    import jint8

    if not hasattr(jint8, "from_pretrained"):
        raise CheckpointError("quantize_checkpoint needs jint8.from_pretrained, which this build lacks")
    quant_config = quant_config or Int8Config()
    target = pathlib.Path(out).absolute()
    # refused before the expensive load: an existing path, or a parent that cannot be written
    _check_destination(target, overwrite)
    check_writable(target.parent, "quantize_checkpoint")
    tokenizer, generation_config = _source_assets(pathlib.Path(src))
    if isinstance(quant_config, Int8Config) and quant_config.mode == "auto":
        from jint8.auto_int8 import load_auto_int8

        # the checkpoint stores what calibration chose (mode "fixed"), so it reloads as saved
        model, params, quant_config = load_auto_int8(src, quant_config, progress=progress)
    else:
        model, params = jint8.from_pretrained(src, quantization=quant_config, progress=progress)
    return save_quantized(out, params, quant_config=quant_config, model_config=model.config, overwrite=overwrite,
                          tokenizer=tokenizer, generation_config=generation_config)


def _source_assets(src: pathlib.Path):
    """(tokenizer or None, GenerationConfig or None) of a source checkpoint directory or GGUF file."""
    from jint8.loading import load_tokenizer

    tokenizer = generation_config = None
    if not src.exists():  # not a local checkpoint: never let transformers look it up on the hub
        return tokenizer, generation_config
    try:
        tokenizer = load_tokenizer(src)
    except (OSError, ValueError, TypeError) as e:  # transformers' ways of saying "no tokenizer here"
        logger.warning("%s: no tokenizer could be loaded (%s); the checkpoint will have none", src,
                       str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
    if src.is_dir() and (src / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_pretrained(os.fspath(src))
    return tokenizer, generation_config
