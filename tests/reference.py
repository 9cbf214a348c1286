"""Access to the reference implementations (torch, transformers, bitsandbytes) for tests.

Where JINT8_REQUIRE_REFERENCE=1 (set by `make test`, hence CI), a missing reference package is a
test failure, never a silent skip; elsewhere the test is skipped with the reason.
"""

import importlib
import os

import pytest


def require_module(name: str):
    """Import `name`, or skip (fail under JINT8_REQUIRE_REFERENCE=1) when it is not importable."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if os.environ.get("JINT8_REQUIRE_REFERENCE") == "1":
            pytest.fail(f"reference package {name!r} is required here but cannot be imported: {e}")
        pytest.skip(f"{name} not importable: {e}")
