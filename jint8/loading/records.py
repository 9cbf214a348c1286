"""What every checkpoint reader produces: one TensorRecord per stored tensor, read on demand."""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    """One tensor of a checkpoint file, not yet read.

    name: its transformers name ("model.layers.0.self_attn.q_proj.weight"), the key of the name map.
    file / stored_name: where it lives, for error messages.
    shape: the stored shape (PyTorch layout unless flax_layout).
    read: returns the tensor as a host numpy array (float types; bfloat16 via ml_dtypes).
    """

    name: str
    file: str
    stored_name: str
    shape: tuple[int, ...]
    flax_layout: bool
    read: Callable[[], np.ndarray]
