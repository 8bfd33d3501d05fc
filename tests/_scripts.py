"""Load a script of the repository (benchmarks/, examples/) as a module, as the tests of those scripts do."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
"""The repository's root folder."""


def load_script(relative_path: str, module_name: str, *, register: bool = True, monkeypatch=None) -> ModuleType:
    """Execute ``ROOT / relative_path`` as module ``module_name`` and return it.

    ``register`` puts it in ``sys.modules`` first (a script's dataclasses look their module up there);
    with ``monkeypatch`` (pytest's fixture) that entry is removed again after the test."""
    spec = importlib.util.spec_from_file_location(module_name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    if monkeypatch is not None:
        monkeypatch.setitem(sys.modules, module_name, module)
    elif register:
        sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module
