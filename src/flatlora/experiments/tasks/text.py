"""Text classification: Rotten-Tomatoes sentences (offline), your own CSV/JSONL, GLUE (hub).

`rt-sentiment`: the 10,605 Rotten-Tomatoes review sentences of the VADER ICWSM-2014 sets (Hutto &
Gilbert 2014; mean of >= 20 human ratings on -4..+4), positive = rating > 0, the 37 zero-rated dropped.
No official split exists: a seeded stratified train/dev/test split (70/10/20, `split_seed`) is made and
its ids are written next to the results. The tweets and Amazon sentence sets of the same archive are
out-of-domain test sets for a model trained on movie sentences.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models import HashTokenizer, ModelRef, hub_error, resolve_model, tiny_config
from . import hub, register_task
from .base import Task, fingerprint, require_nonempty, stratified_split, stratified_subsample, to_device

Row = tuple  # (id, text or (text_a, text_b), label)

# LoRA targets per architecture (attention + MLP linears), and the new head trained in full.
_TARGETS = {"bert": ["query", "key", "value", "dense"], "t5": ["q", "k", "v", "o", "wi", "wo"],
            "roberta": ["query", "key", "value", "dense"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"]}
_HEADS = {"t5": ["classification_head"], "llama": ["score"]}


def load_tokenizer(ref: ModelRef):
    if ref.kind == "tiny":
        return HashTokenizer(vocab_size=tiny_config(ref.name).vocab_size)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref.path)
    except OSError as e:
        raise hub_error(ref, e) from e


def build_sequence_classifier(ref: ModelRef, num_labels: int) -> nn.Module:
    """A HF sequence classifier with a new `num_labels` head (random init from torch's RNG: seeded by the runner)."""
    from transformers import AutoModelForSequenceClassification

    if ref.kind == "tiny":
        return AutoModelForSequenceClassification.from_config(tiny_config(ref.name, num_labels))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(ref.path, num_labels=num_labels,
                                                                   ignore_mismatched_sizes=True)
    except OSError as e:
        raise hub_error(ref, e) from e
    if getattr(model.config, "pad_token_id", None) is None:  # decoder LMs: the head pools the last non-pad token
        model.config.pad_token_id = model.config.eos_token_id
    return model


class TextClassificationTask(Task):
    """Sentence (or sentence-pair) classification with a HF encoder; accuracy (and MCC for 2 classes)."""

    def __init__(self, name: str, train: list[Row], evals: dict[str, list[Row]], num_labels: int, model: str,
                 max_length: int, info: dict[str, Any] | None = None, group_by_length: bool = False):
        require_nonempty(name, {"train": train, **evals})
        self.group_by_length = bool(group_by_length)
        check_labels(name, [r[2] for r in train] + [r[2] for rows in evals.values() for r in rows], num_labels)
        self.name, self.num_labels, self.max_length = name, num_labels, max_length
        self.ref = resolve_model(model)
        self.tokenizer = load_tokenizer(self.ref)
        self.train_rows, self.eval_rows = train, evals
        self.primary_metric = "test/accuracy" if "test" in evals else f"{next(iter(evals))}/accuracy"
        self.info = info or {}
        self._train = self._encode(train)
        self._evals = {k: self._encode(v) for k, v in evals.items()}

    def _encode(self, rows: list[Row]) -> tuple[list[list[int]], torch.Tensor]:
        texts = [r[1] for r in rows]
        if texts and isinstance(texts[0], (tuple, list)):
            a, b = [t[0] for t in texts], [t[1] for t in texts]
            if isinstance(self.tokenizer, HashTokenizer):
                enc = self.tokenizer([x + " " + y for x, y in zip(a, b)], max_length=self.max_length)
            else:
                enc = self.tokenizer(a, b, truncation=True, max_length=self.max_length)
        else:
            enc = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        return enc["input_ids"], torch.tensor([r[2] for r in rows], dtype=torch.long)

    def build_model(self) -> nn.Module:
        model = build_sequence_classifier(self.ref, self.num_labels)
        mt = model.config.model_type
        self.default_targets = _TARGETS.get(mt, "all-linear")
        self.default_modules_to_save = _HEADS.get(mt, ["classifier"])
        return model.train()

    def num_train(self) -> int:
        return len(self._train[1])

    def _pad(self, ids: list[list[int]], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        # Pad each batch to its own longest sentence: a quarter of the cost of a fixed max_length here.
        pad = getattr(self.tokenizer, "pad_token_id", None) or 0
        n = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), n), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x)
            mask[i, :len(x)] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        ids, y = self._train
        return self._pad([ids[i] for i in indices], y[list(indices)])

    def batches(self, batch_size: int, seed: int, epoch: int, device: torch.device | str = "cpu"):
        """The seeded epoch order; with `group_by_length`, sentences of similar length share a batch.

        Grouping (as HF's `group_by_length`): the seeded permutation is cut into chunks of 16 batches,
        each chunk sorted by length and cut into batches, and the batches are then shuffled (same
        generator). Every method still sees the same batches for a seed; padding drops from ~1.8x the
        real tokens to ~1.05x on the demo's sentences, which is most of a CPU step's cost.
        """
        if not self.group_by_length:
            yield from super().batches(batch_size, seed, epoch, device)
            return
        ids = self._train[0]
        g = torch.Generator()
        order = self.epoch_order(seed, epoch, g)
        chunk = 16 * batch_size
        groups = []
        for i in range(0, len(order), chunk):
            part = sorted(order[i:i + chunk], key=lambda j: -len(ids[j]))
            groups += [part[k:k + batch_size] for k in range(0, len(part), batch_size)]
        for b in torch.randperm(len(groups), generator=g).tolist():
            yield to_device(self.collate(groups[b]), device)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int) -> dict[str, float]:
        device = next(model.parameters()).device
        out = {}
        for split, (ids, y) in self._evals.items():
            # Sort by length so batches pad little; predictions are put back in order.
            order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
            pred = torch.empty(len(ids), dtype=torch.long)
            for i in range(0, len(order), batch_size):
                sel = order[i:i + batch_size]
                b = self._pad([ids[j] for j in sel], y[sel])
                logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
                pred[sel] = logits.argmax(-1).cpu()
            out[f"{split}/accuracy"] = (pred == y).float().mean().item()
            if self.num_labels == 2:
                out[f"{split}/mcc"] = matthews(pred, y)
        return out

    def describe(self) -> dict[str, Any]:
        return {"model": self.ref.name, "num_labels": self.num_labels, "max_length": self.max_length,
                "sizes": {"train": len(self.train_rows), **{k: len(v) for k, v in self.eval_rows.items()}},
                "fingerprints": {"train": fingerprint([r[0] for r in self.train_rows]),
                                 **{k: fingerprint([r[0] for r in v]) for k, v in self.eval_rows.items()}},
                **self.info}

    def split_record(self) -> dict[str, list]:
        return {"train": [r[0] for r in self.train_rows], **{k: [r[0] for r in v] for k, v in self.eval_rows.items()}}


def matthews(pred: torch.Tensor, y: torch.Tensor) -> float:
    tp = float(((pred == 1) & (y == 1)).sum()); tn = float(((pred == 0) & (y == 0)).sum())
    fp = float(((pred == 1) & (y == 0)).sum()); fn = float(((pred == 0) & (y == 1)).sum())
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / den if den > 0 else 0.0


def check_labels(task: str, labels: Sequence[Any], num_labels: int) -> None:
    bad = sorted({y for y in labels if not isinstance(y, int) or not 0 <= y < num_labels}, key=str)
    if bad:
        raise ValueError(f"task {task!r}: labels {bad[:5]} do not match num_labels={num_labels} "
                         f"(labels must be integers 0..{num_labels - 1}, or strings mapped to them)")


# ---------------------------------------------------------------------- Rotten-Tomatoes (VADER)
def read_vader(path: Path, prefix: str) -> list[tuple[str, str, float]]:
    """(id, text, mean rating) rows of a VADER `*_GroundTruth.txt` (id<TAB>rating<TAB>text)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) >= 3:
                rows.append((f"{prefix}:{p[0]}", p[2], float(p[1])))
    return rows


@register_task("rt-sentiment", "Rotten-Tomatoes sentences, binary sentiment (VADER sets, seeded stratified "
               "70/10/20 split); tweets + Amazon sentences as out-of-domain tests", default_model="minilm",
               requires="text")
def rt_sentiment(*, model: str, split_seed: int = 1234, max_length: int = 64, train_size: int | None = None,
                 test_size: int | None = None, ood_size: int | None = None, ood: bool = True, dev: bool = True,
                 group_by_length: bool = False) -> Task:
    from ..fetch import vader_dir
    from ..paths import fetch_hint

    d = vader_dir()
    if d is None:
        raise ValueError(f"task 'rt-sentiment' needs the VADER sentence sets: {fetch_hint('text')}")

    def rows(name: str, short: str) -> list[Row]:
        return [(i, t, int(r > 0)) for i, t, r in read_vader(d / f"{name}_GroundTruth.txt", short) if r != 0]

    movie = rows("movieReviewSnippets", "movie")
    labels = [r[2] for r in movie]
    tr, dv, te = stratified_split(labels, [0.7, 0.1, 0.2], split_seed)
    tr = stratified_subsample(tr, labels, train_size, split_seed)
    dv = stratified_subsample(dv, labels, test_size, split_seed)
    te = stratified_subsample(te, labels, test_size, split_seed)
    evals = {"dev": [movie[i] for i in dv]} if dev else {}  # dev: evaluated, never used to pick anything
    evals["test"] = [movie[i] for i in te]
    if ood:
        for name, short in [("tweets", "tweets"), ("amazonReviewSnippets", "amazon")]:
            r = rows(name, short)
            keep = stratified_subsample(list(range(len(r))), [x[2] for x in r], ood_size, split_seed)
            evals[short] = [r[i] for i in keep]
    info = {"source": "VADER ICWSM-2014 movieReviewSnippets (Hutto & Gilbert 2014), rating > 0 = positive",
            "split_seed": split_seed, "split": "stratified 70/10/20 of the non-zero sentences"}
    return TextClassificationTask("rt-sentiment", [movie[i] for i in tr], evals, 2, model, max_length, info,
                                  group_by_length=group_by_length)


# ---------------------------------------------------------------------- bring your own
def read_table(path: str | Path, text_column: str | list, label_column: str) -> list[tuple[Any, Any]]:
    """(text, label) pairs of a CSV/TSV (header row) or JSONL file; `text_column` may name two columns (pairs).

    A row whose label or text is missing or empty is an error naming its file and line (never a class 'None').
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"data file {str(p)!r} does not exist")
    cols = [text_column] if isinstance(text_column, str) else list(text_column)
    records: list[tuple[int, dict]] = []  # (line number, record)
    if p.suffix in (".jsonl", ".json"):
        with open(p, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{n} is not a JSON object per line ({e.msg})") from None
                    if not isinstance(r, dict):
                        raise ValueError(f"{p}:{n} is a JSON {type(r).__name__}, not an object with "
                                         f"{cols + [label_column]} keys")
                    records.append((n, r))
        available = sorted({k for _, r in records for k in r})
    elif p.suffix in (".csv", ".tsv"):
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix == ".tsv" else ",")
            for r in reader:
                records.append((reader.line_num, r))
            available = list(reader.fieldnames or [])
    else:
        raise ValueError(f"data file {p.name!r}: use .csv, .tsv or .jsonl")
    missing = [c for c in cols + [label_column] if c not in available]
    if missing:
        raise ValueError(f"{p.name} has no column {missing[0]!r}; its columns: {available}. "
                         "Set task_args.text_column / task_args.label_column")
    out = []
    for n, r in records:
        for c in cols + [label_column]:
            v = r.get(c)
            if v is None or (isinstance(v, str) and not v.strip()):
                what = "label" if c == label_column else "text"
                raise ValueError(f"{p}:{n} has no {what} (column {c!r} is {'missing' if v is None else 'empty'}): "
                                 "fill it in or drop the row")
        text = str(r[cols[0]]) if len(cols) == 1 else tuple(str(r[c]) for c in cols)
        out.append((text, r[label_column]))
    return out


def encode_labels(values: list[Any], num_labels: int | None, task: str) -> tuple[list[int], list[Any]]:
    """Integer labels as they are (they must be 0..K-1, every class present); other labels mapped to ids
    in sorted order. Fewer than 2 classes is an error.

    Example:
        >>> encode_labels(["pos", "neg", "pos"], None, "demo")
        ([1, 0, 1], ['neg', 'pos'])
        >>> encode_labels([1, 2, 2], None, "demo")
        Traceback (most recent call last):
        ...
        ValueError: task 'demo': integer labels must be 0..K-1 with every class present, but class 0 has no example (labels found: 1, 2); renumber them from 0 (e.g. subtract 1)
    """
    def as_int(v):
        if isinstance(v, bool):
            return int(v)
        try:
            f = float(v)
            return int(f) if f == int(f) else None
        except (TypeError, ValueError, OverflowError):
            return None

    ints = [as_int(v) for v in values]
    if all(i is not None for i in ints):
        found = sorted(set(ints))
        if found[0] < 0:
            raise ValueError(f"task {task!r}: integer labels must be 0..K-1, found {found[0]}; map them to 0..K-1")
        k = num_labels if num_labels is not None else max(found) + 1
        check_labels(task, ints, k)
        present = set(found)
        absent = [c for c in range(k) if c not in present]
        if absent and num_labels is None:
            shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
            fix = ("renumber them from 0 (e.g. subtract 1)" if found[0] > 0 and len(found) == found[-1] - found[0] + 1
                   else "map them to 0..K-1, or fix the stray values")
            raise ValueError(f"task {task!r}: integer labels must be 0..K-1 with every class present, but "
                             f"{_classes(absent)} {'has' if len(absent) == 1 else 'have'} no example "
                             f"(labels found: {shown}); {fix}")
        if absent:
            raise ValueError(f"task {task!r}: num_labels={num_labels} but {_classes(absent)} "
                             f"{'has' if len(absent) == 1 else 'have'} no example in the data")
        names: list[Any] = list(range(k))
    else:
        names = sorted({str(v) for v in values})
        if num_labels is not None and len(names) != num_labels:
            raise ValueError(f"task {task!r}: the data has {len(names)} distinct labels {names[:10]} but "
                             f"num_labels={num_labels}")
        m = {n: i for i, n in enumerate(names)}
        ints = [m[str(v)] for v in values]
    if len(names) < 2:
        raise ValueError(f"task {task!r}: the data has {len(names)} class ({names[0]!r}); classification needs "
                         "at least 2 — check label_column and the file")
    return ints, names


def _classes(ids: list[int]) -> str:
    if len(ids) == 1:
        return f"class {ids[0]}"
    if len(ids) > 4 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"classes {ids[0]}..{ids[-1]} ({len(ids)} classes)"
    return f"classes {', '.join(map(str, ids[:6]))}" + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")


@register_task("byo-text", "your CSV/TSV/JSONL text classification: task_args.path (+ test_path or a seeded "
               "split), text_column, label_column", default_model="minilm")
def byo_text(*, model: str, path: str | None = None, test_path: str | None = None, text_column: Any = "text",
             label_column: str = "label", num_labels: int | None = None, test_fraction: float = 0.2,
             split_seed: int = 0, max_length: int = 128, train_size: int | None = None,
             group_by_length: bool = False) -> Task:
    if path is None:
        raise ValueError("task 'byo-text' needs task_args.path (a .csv/.tsv/.jsonl file with "
                         f"{text_column!r} and {label_column!r} columns)")
    train = read_table(path, text_column, label_column)
    test = read_table(test_path, text_column, label_column) if test_path else None
    all_labels = [y for _, y in train] + ([y for _, y in test] if test else [])
    ids, names = encode_labels(all_labels, num_labels, "byo-text")
    rows = [(f"train:{i}", t, y) for i, ((t, _), y) in enumerate(zip(train, ids))]
    if test is None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"task_args.test_fraction must be in (0, 1), got {test_fraction}")
        tr, te = stratified_split([r[2] for r in rows], [1 - test_fraction, test_fraction], split_seed)
        train_rows, test_rows = [rows[i] for i in tr], [rows[i] for i in te]
    else:
        train_rows = rows
        test_rows = [(f"test:{i}", t, y) for i, ((t, _), y) in enumerate(zip(test, ids[len(train):]))]
    keep = stratified_subsample(list(range(len(train_rows))), [r[2] for r in train_rows], train_size, split_seed)
    train_rows = [train_rows[i] for i in keep]
    info = {"path": str(path), "test_path": test_path, "label_names": names, "split_seed": split_seed}
    return TextClassificationTask("byo-text", train_rows, {"test": test_rows}, len(names), model, max_length, info,
                                  group_by_length=group_by_length)


# ---------------------------------------------------------------------- GLUE (hub)
GLUE = {"sst2": (("sentence",), 2, "validation"), "cola": (("sentence",), 2, "validation"),
        "mrpc": (("sentence1", "sentence2"), 2, "validation"), "qnli": (("question", "sentence"), 2, "validation"),
        "mnli": (("premise", "hypothesis"), 3, "validation_matched"), "rte": (("sentence1", "sentence2"), 2, "validation")}


def _glue_factory(task: str):
    cols, k, dev_split = GLUE[task]

    def factory(*, model: str, max_length: int = 128, train_size: int | None = None, split_seed: int = 0) -> Task:
        def rows(split: str) -> list[Row]:
            data = hub.load_hub_dataset("nyu-mll/glue", task, split)
            return [(f"{split}:{i}", r[cols[0]] if len(cols) == 1 else tuple(r[c] for c in cols), int(r["label"]))
                    for i, r in enumerate(data)]

        train = rows("train")
        keep = stratified_subsample(list(range(len(train))), [r[2] for r in train], train_size, split_seed)
        # GLUE test labels are hidden: the paper reports the dev set, and so do we (as 'test').
        return TextClassificationTask(f"glue-{task}", [train[i] for i in keep], {"test": rows(dev_split)}, k, model,
                                      max_length, {"source": f"GLUE {task} (dev set reported as test)"})

    return factory


for _t in GLUE:
    register_task(f"glue-{_t}", f"GLUE {_t.upper()} (hub; dev accuracy, as in the paper)", default_model="google-t5/t5-base",
                  requires="hub")(_glue_factory(_t))
