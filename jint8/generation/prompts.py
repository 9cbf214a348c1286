"""The checks every generate entry point applies to its input ids and attention mask."""

from __future__ import annotations

import numpy as np

from jint8.errors import EmptyPromptError, PromptPaddingError


def checked_ids_and_mask(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray]:
    """input_ids as a non-empty integer [B, T] array (a 1-D row becomes [1, T]) and the mask as
    bool [B, T] (all ones when None), every row holding at least one token. Token ids keep their
    dtype: the vocabulary check comes before any cast (an int64 2**32 + 5 must not become 5)."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise EmptyPromptError(f"input_ids must be a non-empty [batch, length] array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise EmptyPromptError(f"input_ids must hold integer token ids, got dtype {ids.dtype}")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.ndim == 1:
        mask = mask[None, :]
    if mask.shape != ids.shape:
        raise PromptPaddingError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    empty = np.flatnonzero(mask.sum(axis=1) == 0)
    if empty.size:
        raise EmptyPromptError(f"prompt rows {empty.tolist()} have no tokens (attention_mask all 0)")
    return ids, mask
