"""Every task builds on a small slice (offline ones when fetched, hub ones on tiny models with a stub
loader), and bad input fails before training with the problem named."""

import pytest
import torch

from flatlora.experiments import fetch
from flatlora.experiments.tasks import create_task, list_tasks
from flatlora.experiments.tasks import hub
from flatlora.experiments.tasks import text as text_mod

needs = lambda item: pytest.mark.skipif(not fetch.status()[item],  # noqa: E731
                                        reason=f"needs `python -m flatlora.experiments.fetch {item}`")


def _one_step(task):
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(task.batches(4, seed=0, epoch=0))
    loss = task.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    return model


def test_byo_text_csv_maps_string_labels_and_splits_stratified(byo_csv):
    t = create_task("byo-text", model="tiny-bert", path=str(byo_csv), text_column="sentence", label_column="sentiment")
    assert t.info["label_names"] == ["neg", "pos"] and t.num_labels == 2
    assert (len(t.train_rows), len(t.eval_rows["test"])) == (64, 16)
    assert sum(r[2] for r in t.eval_rows["test"]) == 8  # stratified: half positive
    _one_step(t)
    model = t.build_model().eval()
    m = t.evaluate(model, 8)
    assert set(m) == {"test/accuracy", "test/mcc"} and 0 <= m["test/accuracy"] <= 1


def test_byo_jsonl_with_integer_labels_and_a_test_file(byo_jsonl, byo_csv):
    t = create_task("byo-text", model="tiny-t5", path=str(byo_jsonl), test_path=str(byo_jsonl), text_column="sentence",
                    label_column="y")
    assert len(t.train_rows) == len(t.eval_rows["test"]) == 80
    _one_step(t)


@pytest.mark.parametrize("kwargs, message", [
    ({"path": "missing.csv"}, "does not exist"),
    ({"text_column": "text"}, "has no column 'text'"),
    ({"label_column": "y", "num_labels": 1}, "do not match num_labels=1"),
    ({"num_labels": 3}, "2 distinct labels"),
    ({"train_size": 0}, "train split is empty"),
    ({}, None),
])
def test_byo_text_errors(byo_csv, kwargs, message):
    args = {"path": str(byo_csv), "text_column": "sentence", "label_column": "sentiment", **kwargs}
    if message is None:
        create_task("byo-text", model="tiny-bert", **args)
        return
    with pytest.raises(ValueError, match=message):
        create_task("byo-text", model="tiny-bert", **args)


def test_group_by_length_covers_the_epoch_once_with_less_padding(tmp_path):
    import random as _random

    r = _random.Random(0)
    lines = [f"{' '.join(['word'] * r.randint(1, 40))} {i},{i % 2}" for i in range(300)]
    path = tmp_path / "lengths.csv"
    path.write_text("text,label\n" + "\n".join(lines) + "\n")
    plain = create_task("byo-text", model="tiny-bert", path=str(path), test_fraction=0.2)
    grouped = create_task("byo-text", model="tiny-bert", path=str(path), test_fraction=0.2, group_by_length=True)

    def epoch(task, seed):
        return [b for b in task.batches(16, seed=seed, epoch=0)]

    def padded(bs):
        return sum(b["input_ids"].numel() for b in bs)

    a, b = epoch(grouped, 0), epoch(grouped, 0)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))  # seeded: replayable
    rows = sorted(tuple(x[m.bool()].tolist()) for bt in a for x, m in zip(bt["input_ids"], bt["attention_mask"]))
    ref = sorted(tuple(x[m.bool()].tolist()) for bt in epoch(plain, 0) for x, m in zip(bt["input_ids"], bt["attention_mask"]))
    assert rows == ref and len(a) == len(epoch(plain, 0)) == 15  # every example once, same number of batches
    assert padded(a) < 0.7 * padded(epoch(plain, 0))
    assert [x["input_ids"].shape for x in epoch(grouped, 1)] != [x["input_ids"].shape for x in a]  # seed matters


# ---------------------------------------------------------------- label space from bad data (one-line errors)
def _write(path, text):
    path.write_text(text)
    return str(path)


def _rows(labels):
    return "text,label\n" + "".join(f"sentence {i},{y}\n" for i, y in enumerate(labels))


@pytest.mark.parametrize("labels, message", [
    ([0, 1] * 10 + [1000000], r"classes 2\.\.999999 \(999998 classes\) have no example"),
    ([1, 2] * 10, r"class 0 has no example .*renumber them from 0"),
    ([0, 2] * 10, r"class 1 has no example"),
    ([0] * 20, r"1 class \(0\); classification needs at least 2"),
    (["pos"] * 20, r"1 class \('pos'\)"),
    ([0, -1] * 10, r"must be 0\.\.K-1, found -1"),
])
def test_label_space_must_be_complete_and_have_two_classes(tmp_path, labels, message):
    path = _write(tmp_path / "d.csv", _rows(labels))
    with pytest.raises(ValueError, match=message) as e:
        create_task("byo-text", model="tiny-bert", path=path)
    assert "\n" not in str(e.value)


def test_a_stray_label_never_builds_a_huge_head(tmp_path):
    path = _write(tmp_path / "d.csv", _rows([0, 1] * 10 + [1000000]))
    with pytest.raises(ValueError, match="fix the stray values"):
        create_task("byo-text", model="tiny-bert", path=path)
    # with the stray row fixed, the head has 2 outputs
    t = create_task("byo-text", model="tiny-bert", path=_write(tmp_path / "ok.csv", _rows([0, 1] * 10 + [1])))
    assert t.num_labels == 2


@pytest.mark.parametrize("name, text, message", [
    ("d.csv", "text,label\na,0\nb,1\nc\nd,1\n", r"d\.csv:4 has no label \(column 'label' is missing\)"),
    ("d.csv", "text,label\na,0\nb,1\nc,  \n", r"d\.csv:4 has no label \(column 'label' is empty\)"),
    ("d.csv", "text,label\na,0\n,1\n", r"d\.csv:3 has no text"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n\n{"text": "c"}\n',
     r"d\.jsonl:4 has no label"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": null}\n', r"d\.jsonl:2 has no label"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n', r"d\.jsonl:2 is a JSON list, not an object"),
])
def test_missing_label_or_text_names_file_and_line(tmp_path, name, text, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(ValueError, match=message):
        text_mod.read_table(path, "text", "label")


def test_image_folder_ignores_hidden_and_refuses_empty_or_single_class(image_folder):
    (image_folder / ".ipynb_checkpoints").mkdir()
    (image_folder / ".ipynb_checkpoints" / "x.png").write_bytes((image_folder / "dark" / "0.png").read_bytes())
    (image_folder / "dark" / ".hidden.png").write_bytes(b"not an image")
    t = create_task("image-folder", model="tiny-effnet", path=str(image_folder), resolution=32)
    assert t.info["classes"] == ["dark", "light"] and t.num_labels == 2
    (image_folder / "zebra").mkdir()
    with pytest.raises(ValueError, match=r"class folder\(s\) \['zebra'\] hold no images"):
        create_task("image-folder", model="tiny-effnet", path=str(image_folder), resolution=32)
    (image_folder / "zebra").rmdir()
    import shutil

    shutil.rmtree(image_folder / "light")
    with pytest.raises(ValueError, match=r"has 1 class folder \('dark'\); classification needs at least 2"):
        create_task("image-folder", model="tiny-effnet", path=str(image_folder), resolution=32)


def test_model_references_fail_clearly(tmp_path, byo_csv):
    args = {"path": str(byo_csv), "text_column": "sentence", "label_column": "sentiment"}
    empty = tmp_path / "model"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no weights"):
        create_task("byo-text", model=str(empty), **args)
    with pytest.raises(ValueError, match="unknown model 'bertt'"):
        create_task("byo-text", model="bertt", **args)
    with pytest.raises(ValueError, match="has no option 'pathh'"):
        create_task("byo-text", model="tiny-bert", pathh="x")


def test_image_folder(image_folder):
    t = create_task("image-folder", model="tiny-effnet", path=str(image_folder), resolution=32)
    assert t.info["classes"] == ["dark", "light"] and len(t.train_y) == 16
    x, y = next(t.batches(4, seed=0, epoch=0))
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    _one_step(t)
    with pytest.raises(ValueError, match="no class sub-folders"):
        create_task("image-folder", model="tiny-effnet", path=str(image_folder / "dark"))


def test_a_last_batch_of_one_image_joins_the_one_before_so_batchnorm_trains(image_folder):
    t = create_task("image-folder", model="tiny-effnet", path=str(image_folder), resolution=32)
    assert len(t.train_y) == 16  # = 3 * 5 + 1
    sizes = [len(y) for _, y in t.batches(5, seed=0, epoch=0)]
    assert sizes == [5, 5, 6]
    model = t.build_model()
    model.train()
    for x, y in t.batches(5, seed=0, epoch=0):
        t.loss(model, (x, y)).backward()  # a batch of one would raise in BatchNorm
    assert [len(y) for _, y in t.batches(4, seed=0, epoch=0)] == [4, 4, 4, 4]


def test_image_folder_on_tiny_clip(image_folder):
    t = create_task("image-folder", model="tiny-clip", path=str(image_folder))
    _one_step(t)


def test_seeded_order_is_the_same_for_every_build(byo_csv):
    args = dict(path=str(byo_csv), text_column="sentence", label_column="sentiment")
    a = create_task("byo-text", model="tiny-bert", **args)
    b = create_task("byo-text", model="tiny-bert", **args)
    assert torch.equal(next(a.batches(8, 3, 1))["input_ids"], next(b.batches(8, 3, 1))["input_ids"])
    assert not torch.equal(next(a.batches(8, 3, 1))["input_ids"], next(a.batches(8, 4, 1))["input_ids"])


# ------------------------------------------------------------------ hub tasks on tiny architectures
@pytest.fixture
def fake_hub(monkeypatch):
    from PIL import Image

    def load(path, name, split):
        if path == "nyu-mll/glue":
            cols = text_mod.GLUE[name][0]
            return [{**{c: f"{'good' if i % 2 else 'bad'} text {i}" for c in cols}, "label": i % text_mod.GLUE[name][1]}
                    for i in range(12)]
        if path.startswith("uoft-cs/cifar"):
            return [{"img": Image.new("RGB", (32, 32), (i * 20, 0, 0)), "label": i % 10, "fine_label": i % 100}
                    for i in range(20)]
        if path == "meta-math/MetaMathQA":
            return [{"query": f"What is {i} + 1?", "response": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(8)]
        if path == "openai/gsm8k":
            return [{"question": f"What is {i} + 2?", "answer": f"#### {i + 2}"} for i in range(3)]
        if path == "m-a-p/Code-Feedback":
            return [{"messages": [{"role": "user", "content": "add"}, {"role": "assistant", "content": "def f(): pass"}]}] * 4
        raise AssertionError(path)

    monkeypatch.setattr(hub, "load_hub_dataset", load)


@pytest.mark.parametrize("task, model", [("glue-mrpc", "tiny-t5"), ("glue-mnli", "tiny-t5"), ("glue-cola", "tiny-bert"),
                                         ("cifar100", "tiny-clip"), ("metamathqa-gsm8k", "tiny-llama")])
def test_hub_tasks_build_on_tiny_models(fake_hub, task, model):
    t = create_task(task, model=model)
    _one_step(t)


def test_every_registered_task_is_listed_with_availability():
    names = {e.name for e in list_tasks()}
    assert {"rt-sentiment", "byo-text", "fashion-mnist", "image-folder", "gsm-templates", "glue-sst2", "cifar10",
            "metamathqa-gsm8k", "code-feedback-humaneval"} <= names
    for e in list_tasks():
        ok, why = e.available()
        assert isinstance(ok, bool) and why


def test_tasks_live_in_the_project_registry_and_names_are_unique():
    from flatlora.experiments.tasks import TASKS, register_task
    from flatlora.registry import Registry

    assert isinstance(TASKS, Registry) and TASKS.names() == [e.name for e in list_tasks()]
    with pytest.raises(ValueError, match="task 'byo-text' is already registered"):
        register_task("byo-text", "again", default_model="tiny-bert")(lambda *, model: None)
    with pytest.raises(ValueError, match="unknown task 'byo-txt'; available: .*byo-text"):
        create_task("byo-txt")


def test_task_modules_do_not_import_each_other_in_a_cycle():
    import ast
    from pathlib import Path

    import flatlora.experiments.tasks as pkg

    def imports(name):
        tree = ast.parse((Path(pkg.__file__).parent / f"{name}.py").read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 1 and n.module}

    assert imports("humaneval") == set()  # scoring only: no task module
    assert "humaneval" in imports("causal_lm") and not imports("causal_lm") & {"gsm", "code_feedback"}
    assert "causal_lm" in imports("gsm") and "humaneval" not in imports("gsm")


# ------------------------------------------------------------------ offline tasks on the fetched data
@needs("text")
def test_rt_sentiment_split_is_stratified_recorded_and_disjoint():
    t = create_task("rt-sentiment", model="tiny-bert", train_size=200, test_size=100, ood_size=50)
    rec = t.split_record()
    assert len(rec["train"]) == 200 and len(rec["test"]) == 100 and len(rec["tweets"]) == 50
    assert not set(rec["train"]) & set(rec["test"]) and not set(rec["dev"]) & set(rec["test"])
    full = create_task("rt-sentiment", model="tiny-bert")
    assert full.describe()["sizes"] == {"train": 7397, "dev": 1057, "test": 2114, "tweets": 4196, "amazon": 3610}  # zero-rated dropped
    _one_step(t)


@needs("image")
def test_fashion_mnist_slice():
    t = create_task("fashion-mnist", model="tiny-effnet", train_size=100, test_size=50, resolution=32)
    assert len(t.train_y) == 100 and sorted(set(t.train_y.tolist())) == list(range(10))
    _one_step(t)


@needs("math-data")
def test_gsm_templates_split_by_template():
    t = create_task("gsm-templates", model="tiny-llama", train_per_template=1, test_per_template=1, max_new_tokens=4)
    train_t, test_t = set(t.info["train_templates"]), set(t.info["test_templates"])
    assert not train_t & test_t and len(train_t | test_t) == 85
    assert {r[4] for r in t.train_rows} <= train_t and {r[4] for r in t.eval_rows["test"]} <= test_t
    assert all(r[3] is not None and "####" in r[2] for r in t.train_rows)
    model = _one_step(t)
    m = t.evaluate(model.eval(), 8)
    assert 0 <= m["test/exact_match"] <= 1
