"""Progress bars (tqdm) shared by loading, evaluation and calibration."""

from __future__ import annotations

import sys
from typing import Iterable, Optional


def progress_bar(iterable: Optional[Iterable] = None, *, progress: Optional[bool], **tqdm_options):
    """A tqdm bar, shown when `progress` is True or, when it is None, when stderr is a terminal."""
    from tqdm.auto import tqdm

    shown = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(iterable, disable=not shown, **tqdm_options)
