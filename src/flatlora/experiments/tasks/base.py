"""What the runner needs from a task, and the split/batching helpers every task shares.

A Task owns its data (already split), builds its base model, and knows its loss and its metrics. The
runner owns the loop, so every method sees the same batches: the order of epoch e is a permutation
drawn from a private generator seeded by (seed, e), never from torch's global RNG, and so identical
across methods for one seed (the pairing of the statistics is real).
"""

from __future__ import annotations

import hashlib
import random
from collections import defaultdict
from typing import Any, Iterator, Sequence

import torch
from torch import nn


class Task:
    """Base of all tasks. Subclasses set the attributes and implement the four methods below."""

    name: str = ""
    primary_metric: str = "test/accuracy"
    default_targets: Any = "all-linear"
    default_modules_to_save: Any = None
    peft_task_type: str | None = None  # "CAUSAL_LM" for generation tasks (PEFT then offers generate)
    quantizable: bool = False  # its model can be loaded quantized by bitsandbytes (`quant.type`, QLoRA)

    def build_model(self) -> nn.Module:
        """The base model (no adapters), in train mode, on CPU."""
        raise NotImplementedError

    def num_train(self) -> int:
        raise NotImplementedError

    def collate(self, indices: Sequence[int]) -> Any:
        """The training batch made of the given training examples."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        """Metrics keyed '<split>/<metric>'; the model is in eval mode and clean (no noise)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Split sizes, split seed and anything else a reader of the results needs to know."""
        return {}

    def split_record(self) -> dict[str, list]:
        """The example ids of each split (written next to the results so a split can be audited)."""
        return {}

    # ------------------------------------------------------------------ shared
    def epoch_order(self, seed: int, epoch: int, g: torch.Generator) -> list[int]:
        """The seeded permutation of the training examples for (seed, epoch); `g` is seeded here and can go
        on drawing (length grouping shuffles its batches with it)."""
        g.manual_seed(1_000_003 * seed + epoch)
        return torch.randperm(self.num_train(), generator=g).tolist()

    def batches(self, batch_size: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> Iterator[Any]:
        """Training batches of one epoch in the seeded order (the last, smaller batch is kept). A last batch of
        a single example joins the one before it: BatchNorm cannot train on one sample (n = 1 mod batch_size)."""
        order = self.epoch_order(seed, epoch, torch.Generator())
        starts = list(range(0, len(order), batch_size))
        if len(starts) > 1 and len(order) - starts[-1] == 1:
            starts.pop()
        for i, start in enumerate(starts):
            stop = starts[i + 1] if i + 1 < len(starts) else len(order)
            yield to_device(self.collate(order[start:stop]), device)


def to_device(batch: Any, device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def stratified_split(labels: Sequence[Any], fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Indices split per class in the given fractions (the last split takes the rest), seeded.

    Example:
        >>> [len(s) for s in stratified_split([0] * 50 + [1] * 50, [0.8, 0.2], seed=0)]
        [80, 20]
    """
    by_class: dict[Any, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng = random.Random(seed)
    out: list[list[int]] = [[] for _ in fractions]
    for y in sorted(by_class, key=str):
        idx = by_class[y]
        rng.shuffle(idx)
        start = 0
        for k, f in enumerate(fractions):
            end = len(idx) if k == len(fractions) - 1 else start + round(f * len(idx))
            out[k].extend(idx[start:end])
            start = end
    for s in out:
        rng.shuffle(s)
    return out


def stratified_subsample(indices: list[int], labels: Sequence[Any], n: int | None, seed: int) -> list[int]:
    """At most `n` of `indices`, keeping class proportions (seeded)."""
    if n is None or n >= len(indices):
        return indices
    frac = n / len(indices)
    keep = stratified_split([labels[i] for i in indices], [frac, 1 - frac], seed)[0]
    return [indices[i] for i in keep]


def fingerprint(ids: Sequence[Any]) -> str:
    """Short hash of a split's example ids: equal fingerprints = the same split."""
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def require_nonempty(task: str, splits: dict[str, Sequence]) -> None:
    for name, rows in splits.items():
        if len(rows) == 0:
            raise ValueError(f"task {task!r}: the {name} split is empty; check the data file and the split "
                             "options (train_size, test_fraction, ...)")
