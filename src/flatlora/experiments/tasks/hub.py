"""Hub datasets for the paper's protocols (GLUE, CIFAR, MetaMathQA, GSM8K, Code-Feedback).

One function, called through this module (`hub.load_hub_dataset`), so tests swap in a stub and the
protocol paths run here on tiny architectures without a hub.
"""

from __future__ import annotations


def load_hub_dataset(path: str, name: str | None, split: str) -> list[dict]:
    """Rows of a hub dataset split (needs the `datasets` package and a reachable hub)."""
    try:
        import datasets
    except ImportError:
        raise ValueError("hub datasets need `pip install datasets` (and a reachable hub)") from None
    try:
        return list(datasets.load_dataset(path, name, split=split))
    except Exception as e:  # noqa: BLE001  (offline, unknown dataset, ...: one clear message)
        raise ValueError(f"could not load hub dataset {path!r} ({name}, {split}): {type(e).__name__}: {e}") from None
