"""Fetch helpers without the network: locating items, refusing unsafe archive members, unknown items."""

import io
import tarfile

import pytest

from flatlora.experiments import fetch


def test_unknown_item_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="unknown fetch item"):
        fetch.fetch(["textt"], root=tmp_path)


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
