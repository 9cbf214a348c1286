"""jint8.numerics is the bottom layer: it imports nothing from jint8, the op reference re-exports
its definitions unchanged, and quantize / models take them from it rather than from op internals."""

import ast
from pathlib import Path

import pytest

import jint8
from jint8 import numerics
from jint8.ops import rounding
from jint8.ops.int8_matmul import reference

PACKAGE = Path(jint8.__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_numerics_imports_nothing_from_jint8():
    assert not {m for m in _imported_modules(PACKAGE / "numerics.py") if m.split(".")[0] == "jint8"}


@pytest.mark.parametrize("name", ["INV_127", "INV_127_SQ", "quantization_multiplier", "rms_norm",
                                  "GATE_ACTIVATIONS", "gated_activation"])
def test_reference_reexports_the_numerics_definitions(name):
    assert getattr(reference, name) is getattr(numerics, name)


def test_rounding_reexports_round_to():
    assert rounding.round_to is numerics.round_to


@pytest.mark.parametrize("path", ["quantize.py", *sorted(f"models/{p.name}" for p in (PACKAGE / "models").glob("*.py"))])
def test_upper_layers_import_no_op_internals(path):
    internals = {"jint8.ops.int8_matmul.reference", "jint8.ops.rounding"}
    assert not _imported_modules(PACKAGE / path) & internals
