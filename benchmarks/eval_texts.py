"""Write the three held-out evaluation texts of docs/ACCURACY.md, none of them calibration text
(jint8's built-in calibration text is jint8/data/calibration_text.txt, written for jint8):

- docstrings.txt: Python standard-library docstrings (module, then its public classes and
  functions in name order) of a fixed list of modules;
- pydoc_topics.txt: Python's pydoc_data.topics in topic order (jint8.assets.default_eval_text);
- python_license.txt: CPython's LICENSE.txt (the history of the software and its licenses).

    python benchmarks/eval_texts.py OUT_DIR
    jint8 eval-ppl --reference f32 --quantize int8-auto --text OUT_DIR/docstrings.txt ...
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from pathlib import Path

from jint8.assets import default_eval_text

DOCSTRING_MODULES = ("textwrap", "json", "collections", "fractions", "heapq", "bisect", "statistics",
                     "shlex", "difflib", "string", "calendar", "ipaddress")


def stdlib_docstrings(modules=DOCSTRING_MODULES) -> str:
    parts = []
    for name in modules:
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module) or "")
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            obj = getattr(module, attr, None)
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != name:
                continue
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{name}.{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def python_license() -> str:
    return Path(os.path.join(sys.base_prefix, "lib", f"python{sys.version_info.major}.{sys.version_info.minor}",
                             "LICENSE.txt")).read_text(encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="directory to write the texts to")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("docstrings.txt", stdlib_docstrings()), ("pydoc_topics.txt", default_eval_text()),
                       ("python_license.txt", python_license())):
        (out / name).write_text(text, encoding="utf-8")
        print(f"{out / name}: {len(text)} characters")


if __name__ == "__main__":
    main()
