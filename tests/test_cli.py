"""The `flatlora` CLI: tasks listing, a tiny compare end to end, help that explains every key, and
one-line errors for bad input (tracebacks for bugs)."""

import json
import re

import pytest

from flatlora import __version__
from flatlora.cli.main import build_parser, main, parse_args
from flatlora.experiments.spec import config_keys


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
    (["compare", "ranks=[0]"], "ranks must be a non-empty list of distinct integers >= 1"),
    (["run", "train.epochs=.inf"], "train.epochs must be a positive finite number, got inf"),
    (["run", "train.device=tpu"], "train.device must be auto | cpu | cuda | cuda:N, got 'tpu'"),
    (["compare", "train.threads=-2"], "train.threads must be a positive integer, or null, got -2"),
    (["compare", "task=byo-text", "--jobs", "0"], "jobs must be a positive integer, got 0"),
])
def test_bad_input_is_one_clear_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"flatlora {__version__}"


@pytest.mark.parametrize("command", ["run", "compare"])
def test_help_lists_every_config_key_with_its_default_and_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for key, default, help, _ in config_keys():
        assert f"  {key} = {json.dumps(default)}\n" in out, key
    assert "learning rate of adapter methods  [a positive finite number]" in out
    assert ("--jobs N" in out) == (command == "compare") and "--out" in out and "--print-config" in out


def test_print_config_shows_the_resolved_spec_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: byo-text\ntrain: {lr: 1.0e-3}\n")
    assert main(["compare", str(cfg), "--print-config", "seeds=[4,5]", "--jobs", "3", "--out", "elsewhere"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  lr: 0.001$", out, re.M) and "seeds:\n- 4\n- 5\n" in out
    assert "jobs: 3" in out and "out_dir: elsewhere" in out and not (tmp_path / "elsewhere").exists()
    # run: the same, its own keys; no config at all shows the defaults
    assert main(["run", str(cfg), "--print-config", "seed=7", "method=flat-lora", "--out", "other"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^seed: 7$", out, re.M) and re.search(r"^method: flat-lora$", out, re.M)
    assert "out_dir: other" in out and not (tmp_path / "other").exists()
    assert main(["run", "--print-config"]) == 0 and re.search(r"^seed: 0$", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("command", ["run", "compare"])
def test_no_config_asks_for_one_instead_of_training_defaults(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main([command]) == 2
    err = capsys.readouterr().err
    assert "give a config file or key=value settings" in err and "--help" in err
    assert not (tmp_path / "runs").exists()


def test_compare_takes_out_and_overrides_after_options(tmp_path, capsys):
    args = parse_args(["compare", "task=byo-text", "--jobs", "2", "plot=false", "--out", "x", "seeds=[1]"])
    assert args.overrides == ["plot=false", "seeds=[1]"] and (args.jobs, args.out, args.config) == (2, "x", "task=byo-text")
    with pytest.raises(SystemExit):
        parse_args(["compare", "task=byo-text", "--jbos", "2"])
    assert "unrecognized arguments: --jbos" in capsys.readouterr().err
    assert main(["compare", "task=byo-text", f"task_args.path={_byo(tmp_path)}", "model=tiny-bert", "train.max_steps=1",
                 "methods=[lora]", "seeds=[0]", "plot=false", "--no-progress", "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "runs" / "lora_r8_s0" / "metrics.json").exists() and (tmp_path / "o" / "summary.md").exists()


def test_a_diverged_run_exits_1_with_its_reason(tmp_path, capsys):
    assert main(["run", "task=byo-text", f"task_args.path={_byo(tmp_path)}", "model=tiny-bert", "train.max_steps=1",
                 "train.lr=1e30", "train.warmup_ratio=0", "method=lora", "--out", str(tmp_path / "r"), "--no-progress"]) == 1
    assert "flatlora run: the run failed: diverged: " in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"train: {lr: [1e-3}\n", ":1:"),
    (b"train:\n  lr: !!python/object/apply:os.system [echo hacked]\n", ":2: the tag !!python/object/apply:os.system is not allowed"),
    (b"description: \xff\xfe\n", ":1: not UTF-8 text (byte 0xff)"),
    (b"train:\n  epochs: .inf\n", ":2: train.epochs must be a positive finite number, got inf"),
])
def test_bad_config_files_are_one_line_naming_file_and_line(tmp_path, capsys, content, message):
    f = tmp_path / "bad.yaml"
    f.write_bytes(content)
    assert main(["run", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}{message}" in err and "Traceback" not in err and err.count("\n") == 1


def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["compare", "task=byo-text", "--out", str(tmp_path / "f")]) == 2
    assert "is not a folder: give a folder path" in capsys.readouterr().err


def test_an_internal_bug_keeps_its_traceback(monkeypatch):
    import flatlora.experiments.compare as cmp

    monkeypatch.setattr(cmp, "compare", lambda *a, **k: json.loads("{"))  # a ValueError raised outside flatlora
    with pytest.raises(json.JSONDecodeError):
        main(["compare", "task=byo-text", "model=tiny-bert"])


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys):
    import flatlora.experiments.compare as cmp

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmp, "compare", interrupted)
    assert main(["compare", "task=byo-text", "model=tiny-bert"]) == 130
    assert "finished runs are kept, the same command resumes" in capsys.readouterr().err


def test_plugin_subcommands_register_when_present():
    import importlib.util

    from flatlora.cli.main import PLUGINS

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "compare", "tasks"} <= set(sub.choices)
    present = {p for p in PLUGINS if importlib.util.find_spec(f"flatlora.cli.{p}") is not None}
    assert {"landscape", "fetch"} <= present  # shipped in this package: their absence is a failure, not a pass
    assert present <= set(sub.choices)
