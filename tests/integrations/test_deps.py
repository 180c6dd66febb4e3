"""Optional dependencies: `require` names the extra when a module is absent, tries alternatives in order,
and never hides a broken install behind the 'not installed' message."""

import json
import sys

import pytest

from flatlora.integrations._deps import require


def test_a_missing_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "flatlora_absent_pkg", None)
    with pytest.raises(ImportError, match=r"^thing needs flatlora_absent_pkg, which is not installed: "
                                          r"pip install 'flatlora\[hf\]'$") as info:
        require("flatlora_absent_pkg.sub", "hf", "thing")
    assert info.value.name.split(".")[0] == "flatlora_absent_pkg"


def test_alternatives_are_tried_in_order_and_all_are_named_when_none_is_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "flatlora_absent_a", None)
    monkeypatch.setitem(sys.modules, "flatlora_absent_b", None)
    assert require(("flatlora_absent_a.x", "json"), "extra", "thing") is json   # first absent: the next one
    assert require(("json", "flatlora_absent_a"), "extra", "thing") is json     # first present: taken
    with pytest.raises(ImportError, match=r"^thing needs flatlora_absent_a \(or flatlora_absent_b\), which is not "
                                          r"installed: pip install 'flatlora\[extra\]'$") as info:
        require(("flatlora_absent_a.x", "flatlora_absent_b"), "extra", "thing")
    assert info.value.name.split(".")[0] == "flatlora_absent_a"  # the preferred one


def test_a_broken_install_raises_its_own_error_and_is_not_skipped(tmp_path, monkeypatch):
    pkg = tmp_path / "flatlora_broken_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import flatlora_missing_inner_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flatlora_broken_pkg", raising=False)
    for module in ("flatlora_broken_pkg", ("flatlora_broken_pkg", "json")):
        with pytest.raises(ImportError) as info:
            require(module, "extra", "thing")
        assert info.value.name == "flatlora_missing_inner_dep" and "pip install" not in str(info.value)
