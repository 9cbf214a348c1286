"""The README's quick start runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_quick_start_runs(capsys):
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md quick start", "exec"), {})
    out = capsys.readouterr().out
    error = float(re.search(r"relative error: ([0-9.e-]+)", out).group(1))
    assert error < 0.02


@pytest.mark.heavy  # ~1 min on 2 cores; from_pretrained/generate/save_quantized are covered by their own tests
def test_readme_models_section_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    section = README.read_text().split("## Models, generation, checkpoints", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md models section", "exec"), {})
    assert "The capital of France is" in capsys.readouterr().out
