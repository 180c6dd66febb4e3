"""Our EfficientNet-Lite0 matches the shipped state dict; untrusted code only runs in the sandbox."""

import pytest
import torch

from flatlora.experiments import fetch
from flatlora.experiments.models.efficientnet_lite import EfficientNetLite0, load_efficientnet_lite0
from flatlora.experiments.sandbox import run_untrusted
from flatlora.experiments.tasks.gsm import extract_number
from flatlora.experiments.tasks.humaneval import check_program, pass_at_1, truncate


def test_efficientnet_lite0_shape():
    m = EfficientNetLite0()
    assert sum(p.numel() for p in m.parameters()) == 4_652_008  # DATA.md's count for the shipped weights
    assert m(torch.zeros(2, 3, 64, 64)).shape == (2, 1000)
    assert "_blocks.15._project_conv" in m.pointwise_convs() and "_conv_head" in m.pointwise_convs()
    assert "_blocks.0._depthwise_conv" not in m.pointwise_convs()


@pytest.mark.skipif(not fetch.status()["image"], reason="needs `python -m flatlora.experiments.fetch image`")
def test_imagenet_weights_load_strictly_and_recognise_a_photo():
    import os

    import matplotlib
    import numpy as np
    from PIL import Image

    m = load_efficientnet_lite0(fetch.effnet_file(), 1000).eval()
    img = Image.open(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg")).convert("RGB")
    x = torch.tensor(np.asarray(img.resize((224, 224), Image.BICUBIC)), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    with torch.no_grad():
        top = m((x - 0.5) / 0.5).argmax(-1).item()
    assert top == 652  # ImageNet "military uniform": Grace Hopper in uniform


def test_sandbox_outcomes_and_throwaway_cwd():
    assert run_untrusted("assert sum([1, 2]) == 3") == "passed"
    assert run_untrusted("raise SystemExit(1)") == "failed"
    assert run_untrusted("while True: pass", timeout=1.5) == "timeout"
    assert run_untrusted("import os; assert os.path.basename(os.getcwd()).startswith('flatlora-sandbox-')") == "passed"


def test_sandbox_blocks_network_where_namespaces_allow():
    from flatlora.experiments.sandbox import network_isolated

    if not network_isolated():
        pytest.skip("no unprivileged network namespace on this machine")
    prog = "import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)"
    assert run_untrusted(prog, timeout=5) == "failed"


def test_humaneval_scoring_on_a_synthetic_problem():
    problem = {"prompt": "def add(a, b):\n", "entry_point": "add",
               "test": "def check(f):\n    assert f(2, 3) == 5\n"}
    good = "    return a + b\n\ndef unrelated():\n    while True: pass\n"
    assert truncate(good) == "    return a + b\n"
    assert run_untrusted(check_program(problem, truncate(good))) == "passed"
    assert pass_at_1([problem, problem], [good, "    return a - b\n"]) == 0.5


@pytest.mark.skipif(not fetch.status()["code"], reason="needs `python -m flatlora.experiments.fetch code`")
def test_humaneval_canonical_solutions_pass():
    from flatlora.experiments.tasks.humaneval import load_problems

    problems = load_problems(limit=3)
    assert pass_at_1(problems, [p["canonical_solution"] for p in problems]) == 1.0


def test_extract_number():
    assert extract_number("x = 3\n#### 1,234") == 1234.0
    assert extract_number("the answer is -2.5 dollars") == -2.5
    assert extract_number("no number") is None
