"""Fingerprints of what a run was trained and evaluated on, so runs on different data are never mixed.

Every run records, in metrics.json under "inputs":

    data   per input of the task: sha256, bytes and file count of its files, keyed by role, not by path
           (`task_args.path`, `task_args.test_path`, `fetched:text`, ...), so moving the data folder to
           another machine keeps a comparison resumable while any change of content does not
    split  per split: the number of example ids and the sha256 of the ids in order

The inputs of a task are the files its `task_args` name (options called *path, *dir, *file, *folder or
*root whose value is an existing file or folder) and the data of the fetch item the task requires (`fetched:<item>`; models are named in the
config, not hashed). `compare` refuses to resume or to pair runs whose inputs differ, naming the difference.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

# The data (not the model) of each fetch item a task can require; the locators live in fetch.py.
PATH_OPTIONS = ("path", "dir", "file", "folder", "root")
FETCHED_DATA = {"text": "vader_dir", "image": "fmnist_dir", "math": "gsm_dir", "code": "humaneval_file"}


def task_inputs(task_name: str, task_args: dict[str, Any], task) -> dict[str, Any]:
    """{"data": {role: {"sha256", "bytes", "files"}}, "split": {split: {"n", "sha256"}}} of a built task."""
    from .tasks import get_task_entry

    data: dict[str, Any] = {}
    for key, value in sorted(task_args.items()):
        if key.endswith(PATH_OPTIONS) and isinstance(value, str) and value and Path(value).expanduser().exists():
            data[f"task_args.{key}"] = hash_path(Path(value).expanduser())
    item = get_task_entry(task_name).requires
    if item in FETCHED_DATA:
        from . import fetch

        where = getattr(fetch, FETCHED_DATA[item])()
        data[f"fetched:{item}"] = hash_path(where) if where is not None else None
    split = {name: {"n": len(ids), "sha256": _sha([json.dumps(i, default=str) for i in ids])}
             for name, ids in task.split_record().items()}
    return {"data": data, "split": split}


def hash_path(path: Path) -> dict[str, Any]:
    """sha256 over the files under `path` (relative name + content, sorted), their bytes and count.
    Hidden files and __pycache__ are skipped: they are not data, and importing a generator creates them."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in f.relative_to(path).parts))
    h, size = hashlib.sha256(), 0
    for f in files:
        h.update((f.name if f == path else f.relative_to(path).as_posix()).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                size += len(chunk)
        h.update(b"\0")
    return {"sha256": h.hexdigest(), "bytes": size, "files": len(files)}


def diff_inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two `task_inputs` records, one phrase each (old = finished run, new = now)."""
    out = []
    for section, what in (("data", "data"), ("split", "split")):
        a, b = old.get(section, {}), new.get(section, {})
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                out.append(f"{what} {k}: {_describe(a.get(k), k in a)} (finished run) vs {_describe(b.get(k), k in b)} (now)")
    return out


def _describe(v: dict | None, present: bool) -> str:
    if not present:
        return "not an input"
    if v is None:
        return "not fetched"
    if "n" in v:
        return f"{v['n']} ids (sha256 {v['sha256'][:12]})"
    return f"{v['bytes']:,} bytes in {v['files']} file(s) (sha256 {v['sha256'][:12]})"


def _sha(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()
