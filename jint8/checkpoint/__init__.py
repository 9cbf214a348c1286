"""Quantized checkpoints with Orbax: save an Int8Weight tree once, restore it onto any mesh.

One Orbax composite checkpoint directory holds two items:
  arrays/    a PyTree item (StandardCheckpointHandler) with every array leaf; an Int8Weight
             kernel is stored as its own two arrays, <path>/qvalue (int8, K-major
             [*out, *in] as Int8Weight holds it) and <path>/scale (float32), so the bytes on
             disk are the int8 bytes plus the scales.
  metadata/  a JSON item: format name and version, jint8 version, the Int8Config, the model
             config, the tree's kind (Linen dict, FrozenDict, nnx.State) and one record per leaf
             (path, shape, dtype, nnx Variable type, and an Int8Weight's static in_ndim,
             threshold and outlier_capacity, which are not arrays and so live here, and the
             CRC-32C of each stored array, compared after every restore unless
             verify_checksums=False).
Restore reads each array straight into its target sharding (TensorStore reads only each
device's shard): no full-precision weight is materialised and nothing is re-quantized.

Saving is atomic at two levels: Orbax writes into a temporary directory and renames it when
finalized, and that happens inside a hidden sibling staging directory which is then renamed
onto the destination (or, with overwrite=True, swapped with the old checkpoint by
renameat2(RENAME_EXCHANGE)), so a crash at any point leaves the previous checkpoint loadable.
Staging directories of writers that died are removed by the next save to the same parent.
Files of a replaced checkpoint that Orbax does not own (tokenizer files) are carried over.
Single-process saving only (jax.process_count() == 1); restoring works in any process layout.

Modules: metadata (format version, leaf records, the metadata JSON, the Orbax items), tree
(params tree <-> stored arrays), integrity (per-array checksums), atomic (staged publish, stale
staging cleanup, shared with export_bitsandbytes), shardings (restore targets), save
(save_quantized, quantize_checkpoint), restore (load_quantized, load_metadata).
"""

from jint8.checkpoint.metadata import FORMAT_NAME, FORMAT_VERSION, CheckpointMetadata, PathLike
from jint8.checkpoint.restore import is_jint8_checkpoint, load_metadata, load_quantized
from jint8.checkpoint.save import quantize_checkpoint, save_quantized
from jint8.checkpoint.shardings import ShardingsArg

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointMetadata",
    "PathLike",
    "ShardingsArg",
    "is_jint8_checkpoint",
    "load_metadata",
    "load_quantized",
    "quantize_checkpoint",
    "save_quantized",
]
