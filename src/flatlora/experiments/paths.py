"""Where fetched data and models live: $FLATLORA_DATA, else `.data/` under the working directory.

Everything in there is produced by `python -m flatlora.experiments.fetch` (never by hand) and is
git-ignored; the offline tasks read only from here.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_root() -> Path:
    """The cache folder for fetched data and weights (not created here)."""
    return Path(os.environ.get("FLATLORA_DATA") or Path.cwd() / ".data").expanduser().resolve()


def find_one(root: Path, pattern: str) -> Path | None:
    """The first path under `root` matching the glob `pattern` (sorted, so the choice is stable), or None."""
    hits = sorted(root.glob(pattern)) if root.exists() else []
    return hits[0] if hits else None


def fetch_hint(item: str) -> str:
    return f"run `python -m flatlora.experiments.fetch {item}` (or set FLATLORA_DATA to where it was fetched)"
