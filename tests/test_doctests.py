"""Every docstring example in the package runs (STYLE.md 12: "the example in the docstring should run")."""

import doctest
import importlib
from pathlib import Path

import pytest

import flatlora

SRC = Path(flatlora.__file__).parent
MODULES = sorted(".".join(("flatlora",) + p.relative_to(SRC).with_suffix("").parts)
                 for p in SRC.rglob("*.py") if ">>>" in p.read_text(encoding="utf-8"))


def test_the_examples_were_found():
    assert {"flatlora.baselines.sam", "flatlora.experiments.sandbox", "flatlora.experiments.tasks.text"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0 and result.failed == 0, f"{name}: {result.failed} of {result.attempted} examples failed"
