"""The `flatlora` CLI: tasks listing, a tiny compare end to end, and one-line errors for bad input."""

import pytest

from flatlora.cli.main import build_parser, main


def _byo(tmp_path):
    import csv

    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(24):
            w.writerow([("good nice" if i % 2 else "bad poor") + f" item{i}", i % 2])
    return path


def test_tasks_lists_tasks_methods_and_models(capsys):
    assert main(["tasks", "--options"]) == 0
    out = capsys.readouterr().out
    for word in ["rt-sentiment", "byo-text", "fashion-mnist", "gsm-templates", "glue-mrpc", "flat-dora", "sam-w",
                 "tiny-llama", "options: "]:
        assert word in out


def test_compare_end_to_end_without_a_config(tmp_path, capsys):
    args = ["compare", "task=byo-text", f"task_args.path={_byo(tmp_path)}", "model=tiny-bert", "train.max_steps=2",
            "seeds=[0,1]", f"out_dir={tmp_path / 'out'}", "plot=false", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| flat-lora | lora | 8 | test/accuracy | 2 |" in out and "ran 4, kept 0" in out
    assert main(args) == 0
    assert "ran 0, kept 4" in capsys.readouterr().out


def test_run_writes_one_results_folder(tmp_path, capsys):
    assert main(["run", "task=byo-text", f"task_args.path={_byo(tmp_path)}", "model=tiny-bert", "train.max_steps=1",
                 "method=lora", "seed=3", "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert (tmp_path / "r" / "lora_r8_s3" / "metrics.json").exists()


@pytest.mark.parametrize("args, message", [
    (["run", "task=nope"], "unknown task 'nope'"),
    (["compare", "methods=[lora,flat-lorra]"], "unknown method 'flat-lorra'"),
    (["run", "missing.yaml"], "does not exist"),
    (["compare", "task=byo-text", "model=tiny-bert"], "needs task_args.path"),
    (["compare", "task=byo-text", "task_args.path=/no/such.csv", "model=tiny-bert"], "does not exist"),
])
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_plugin_subcommands_register_when_present():
    import importlib.util

    from flatlora.cli.main import PLUGINS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "compare", "tasks"} <= set(sub.choices)
    present = {p for p in PLUGINS if importlib.util.find_spec(f"flatlora.cli.{p}") is not None}
    assert {"landscape", "fetch"} <= present  # shipped in this package: their absence is a failure, not a pass
    assert present <= set(sub.choices)
