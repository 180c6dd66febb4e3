"""Tiny data for the experiments tests: a learnable CSV sentiment set, a JSONL copy, an image folder."""

import csv
import json
import random

import pytest

POS = "good great fine lovely superb wonderful".split()
NEG = "bad awful poor dull boring terrible".split()


def sentiment_rows(n=80, seed=0):
    r = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % 2
        words = [r.choice(POS if y else NEG) for _ in range(3)] + [r.choice(["movie", "film", "plot"]) for _ in range(3)]
        r.shuffle(words)
        rows.append({"sentence": " ".join(words), "sentiment": "pos" if y else "neg", "y": y})
    return rows


@pytest.fixture
def byo_csv(tmp_path):
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["sentence", "sentiment", "y"])
        w.writeheader()
        w.writerows(sentiment_rows())
    return path


@pytest.fixture
def byo_jsonl(tmp_path):
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentiment_rows()))
    return path


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    r = random.Random(0)
    for c, value in [("dark", 30), ("light", 220)]:
        (root / c).mkdir(parents=True)
        for i in range(10):
            v = value + r.randint(-20, 20)
            Image.new("RGB", (12, 12), (v, v, v)).save(root / c / f"{i}.png")
    return root


def tiny_text_overrides(path, out_dir, **extra):
    """key=value overrides of a 2-step byo-text run on tiny-bert."""
    d = {"task": "byo-text", "task_args.path": str(path), "task_args.text_column": "sentence",
         "task_args.label_column": "sentiment", "model": "tiny-bert", "train.batch_size": 16, "train.max_steps": 2,
         "train.lr": 1e-2, "out_dir": str(out_dir)}
    d.update(extra)
    return [f"{k}={v}" for k, v in d.items()]
