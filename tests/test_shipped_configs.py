"""Every shipped config loads, validates, and says how to run it; the paper protocols build on tiny models."""

from pathlib import Path

import pytest

from flatlora.experiments.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_is_headed_by_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# flatlora ") and path.name in first, f"{path.name}: first line must be the command"
    spec = load_spec(path)
    assert spec.methods and spec.seeds


@pytest.mark.parametrize("name, tiny", [("paper_t5_glue.yaml", "tiny-t5"), ("paper_t5_variants.yaml", "tiny-t5"),
                                        ("paper_t5_sam.yaml", "tiny-t5"), ("paper_clip_images.yaml", "tiny-clip"),
                                        ("paper_llama_math.yaml", "tiny-llama"), ("paper_llama_code.yaml", "tiny-llama")])
def test_paper_protocol_runs_on_a_tiny_model_of_its_architecture(name, tiny, tmp_path, monkeypatch):
    """The protocol's own settings (methods, ranks, targets, dtype, accumulation, ...) with the model swapped
    for a random tiny one and the hub data for a stub: one step per method, first seed, first rank."""
    from PIL import Image

    from flatlora.experiments.compare import compare
    from flatlora.experiments.tasks import hub, humaneval

    def stub(path, cfg, split):
        if path == "nyu-mll/glue":
            cols = ["sentence", "sentence1", "sentence2", "question", "premise", "hypothesis"]
            return [{**{c: f"s {i}" for c in cols}, "label": i % 2} for i in range(8)]
        if path.startswith("uoft-cs/cifar"):
            return [{"img": Image.new("RGB", (8, 8), (i, i, i)), "label": i % 10, "fine_label": i % 100} for i in range(8)]
        if path == "meta-math/MetaMathQA":
            return [{"query": f"{i}+1?", "response": f"#### {i + 1}"} for i in range(8)]
        if path == "openai/gsm8k":
            return [{"question": "1+1?", "answer": "#### 2"}]
        return [{"messages": [{"role": "user", "content": "f"}, {"role": "assistant", "content": "def f(): pass"}]}] * 8

    monkeypatch.setattr(hub, "load_hub_dataset", stub)
    monkeypatch.setattr(humaneval, "load_problems", lambda limit=None: [
        {"prompt": "def f():\n", "test": "def check(g):\n    g()\n", "entry_point": "f", "canonical_solution": "    pass\n"}])
    spec = load_spec(ROOT / "configs" / name)
    rank = (spec.ranks or [spec.lora.r])[0]
    task_args = {k: v for k, v in spec.task_args.items() if k not in ("resolution", "train_size")}
    if "max_new_tokens" in task_args:
        task_args["max_new_tokens"] = 2
    if "humaneval" in task_args:
        task_args["humaneval"] = 1
    train = {**spec.to_dict()["train"], "max_steps": 1, "batch_size": 2, "grad_accum": min(spec.train.grad_accum, 2)}
    tiny = spec.replace(model=tiny, seeds=spec.seeds[:1], ranks=[rank], task_args=task_args, train=train,
                        out_dir=str(tmp_path), plot=False)
    res = compare(tiny, progress=False, log=lambda s: None)
    assert res.ran == len(spec.methods)
    assert all(r["metrics"] for r in res.records)
