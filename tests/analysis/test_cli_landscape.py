"""`flatlora landscape RUN_DIR ...` on runs of a tiny model: files written, model rebuilt from the folder."""

import json

import torch

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("transformers")
pytest.importorskip("yaml")

from flatlora.cli import landscape as cli  # noqa: E402


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from flatlora.experiments import runner
    from flatlora.experiments.spec import load_spec

    root = tmp_path_factory.mktemp("runs")
    data = root / "data.csv"
    data.write_text("text,label\n" + "".join(f"{'good fine great' if i % 2 else 'bad awful poor'} {i},{i % 2}\n"
                                           for i in range(40)))
    spec = load_spec(None, [f"task=byo-text", f"task_args.path={data}", "model=tiny-bert", "train.max_steps=2",
                            "train.batch_size=8", "lora.r=2", "train.threads=1"])
    kept, build = {}, runner._build

    def keep(*a, **k):
        kept["m"] = build(*a, **k)
        return kept["m"]

    runner._build = keep
    try:
        dirs = []
        for method in ("lora", "flat-lora"):
            d = root / method
            runner.run_one(spec, d, method=method, seed=0, progress=False)  # writes weights.safetensors
            m = kept.pop("m")
            assert (d / "weights.safetensors").exists()
            dirs.append((d, {k: v.clone() for k, v in m.state_dict().items()}))
    finally:
        runner._build = build
    return dirs


def test_load_run_rebuilds_the_trained_model(runs):
    d, state = runs[1]
    loaded = cli.load_run(d)
    for k, v in loaded.model.state_dict().items():
        assert v.dtype == state[k].dtype and bool((v == state[k]).all()), k
    assert loaded.label == "flat-lora r=2"


def test_cli_writes_figures_and_json(runs, tmp_path, capsys):
    from flatlora.cli.main import main

    out = tmp_path / "ls"
    rc = main(["landscape", str(runs[0][0]), str(runs[1][0]), "--out", str(out), "--steps", "3", "--curve-steps", "3",
               "--batches", "1", "--batch-size", "8", "--samples", "2", "--ascent-steps", "1", "--power-iters", "2",
               "--trace-probes", "2", "--hvp", "fd", "--sigmas", "0.05"])
    assert rc == 0
    for f in ("surfaces.png", "curves.png", "sharpness.png", "sharpness.md", "landscape.json"):
        assert (out / f).stat().st_size > 0
    md = (out / "sharpness.md").read_text()
    assert "Expected sharpness, paired over the same noise draws, vs lora r=2" in md
    assert capsys.readouterr().out.startswith(md)  # the table printed is the one written
    js = json.loads((out / "landscape.json").read_text())
    assert list(js["models"]) == ["lora r=2", "flat-lora r=2"]
    surf = js["models"]["lora r=2"]["surface"]
    assert len(surf["loss"]) == 3 and all(0 <= a <= 1 for row in surf["metric"] for a in row)  # accuracy drawn too
    assert js["paired_expected_sharpness"]["flat-lora r=2"][0]["n"] == 2
    # The figures come back from the JSON alone (how benchmarks/results/landscape/ is redrawn).
    again = tmp_path / "again"
    assert main(["landscape", "--from-json", str(out / "landscape.json"), "--out", str(again)]) == 0
    for f in ("surfaces.png", "curves.png", "sharpness.png"):
        assert (again / f).read_bytes()[:4] == b"\x89PNG"
    assert (again / "sharpness.md").read_text() == (out / "sharpness.md").read_text()


def test_from_json_refuses_a_file_that_is_not_a_landscape(tmp_path, capsys):
    from flatlora.cli.main import main

    bad = tmp_path / "x.json"
    bad.write_text('{"rows": []}')
    assert main(["landscape", "--from-json", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a landscape.json of `flatlora landscape` (KeyError" in err and "Traceback" not in err


def test_run_without_weights_says_what_is_missing(runs, tmp_path):
    import shutil

    d = tmp_path / "noweights"
    shutil.copytree(runs[0][0], d)
    (d / "weights.safetensors").unlink()
    assert (d / "adapter" / "adapter_config.json").exists()
    cli.load_run(d)  # the run's PEFT adapter folder is enough
    shutil.rmtree(d / "adapter")
    with pytest.raises(ValueError, match="weights.safetensors or adapter"):
        cli.load_run(d)


def test_cli_on_explicit_adapter_folder(runs, tmp_path):
    import yaml

    from flatlora.cli.main import main

    d, state = runs[0]
    loaded = cli.load_run(d)
    loaded.model.save_pretrained(str(tmp_path / "adapter"))  # PEFT folder, classifier head included
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    again = cli.load_explicit("byo-text", "tiny-bert", str(tmp_path / "adapter"), cfg["task_args"])
    ref = {k.replace(".base_layer", ""): v for k, v in loaded.model.state_dict().items()}
    got = {k.replace(".base_layer", ""): v for k, v in again.model.state_dict().items()}
    for k in ref:  # the trained adapter and head come back on the rebuilt base
        if "lora_" in k or "modules_to_save" in k:
            assert torch.equal(ref[k], got[k]), k
    out = tmp_path / "ls"
    rc = main(["landscape", "--task", "byo-text", "--task-arg", f"path={cfg['task_args']['path']}", "--model", "tiny-bert",
               "--adapter", str(tmp_path / "adapter"), "--label", "mine", "--out", str(out), "--steps", "2",
               "--curve-steps", "0", "--batches", "1", "--batch-size", "8", "--samples", "2", "--rho", "0",
               "--no-hessian", "--sigmas", "0.05"])
    assert rc == 0 and list(json.loads((out / "landscape.json").read_text())["models"]) == ["mine"]
