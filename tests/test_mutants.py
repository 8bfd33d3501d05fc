"""The mutation suite's catalogue stays valid: every mutant's snippet occurs exactly once in the package and its
tests exist (``make mutants`` runs the mutants themselves: tools/mutants.py)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("mutants_tool", ROOT / "tools" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_snippet_occurs_exactly_once_and_every_test_file_exists():
    tool = _tool()
    assert len(tool.MUTANTS) >= 20
    tool.check_catalogue(tool.MUTANTS)  # SystemExit naming the mutant otherwise


def test_a_snippet_found_twice_or_nowhere_stops_the_tool(tmp_path):
    tool = _tool()
    package = tmp_path / tool.PACKAGE / "sub"
    package.mkdir(parents=True)
    (package / "a.py").write_text("x = 1\ny = 2\n")
    (package / "b.py").write_text("y = 2\n")
    once = tool.Mutant("once", "area", "bug", "x = 1", "x = 2", ())
    assert tool.locate(once, tmp_path) == package / "a.py"
    with pytest.raises(SystemExit, match=r"'twice': its snippet occurs 2 times .*a\.py x1, .*b\.py x1"):
        tool.locate(tool.Mutant("twice", "area", "bug", "y = 2", "y = 3", ()), tmp_path)
    with pytest.raises(SystemExit, match=r"'gone': its snippet occurs 0 times .*nowhere"):
        tool.locate(tool.Mutant("gone", "area", "bug", "z = 3", "z = 4", ()), tmp_path)
