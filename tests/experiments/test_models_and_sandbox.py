"""Our EfficientNet-Lite0 matches the shipped state dict; untrusted code only runs in the sandbox."""

import os
import time
import uuid

import pytest
import torch

from flatlora.experiments import fetch, sandbox
from flatlora.experiments.models.efficientnet_lite import EfficientNetLite0, load_efficientnet_lite0
from flatlora.experiments.sandbox import isolation, run_untrusted
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


def test_sandbox_outcomes():
    assert run_untrusted("assert sum([1, 2]) == 3") == "passed"
    assert run_untrusted("raise SystemExit(1)") == "failed"
    assert run_untrusted("while True: pass", timeout=1.5) == "timeout"


# ---------------------------------------------------------------- containment (each attack a test)
contained = pytest.mark.skipif(isolation() == "session", reason="needs PID/mount namespaces (root or user namespaces)")


def _processes_with_token(token: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if token.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def test_wrong_completion_that_exits_zero_early_fails():
    assert run_untrusted("import os\nos._exit(0)\nassert 1 == 2") == "failed"
    assert run_untrusted("raise SystemExit(0)\nassert 1 == 2") == "failed"
    assert run_untrusted("import sys\nsys.exit()\nassert 1 == 2") == "failed"


def test_completion_cannot_forge_the_pass_marker():
    # Guessing at the marker pipe, reading the nonce pipe (closed before the program runs), printing 'passed'.
    forge = ("import os\nfor fd in range(3, 64):\n    try: os.write(fd, b'0' * 64)\n    except OSError: pass\n"
             "print('passed')\nos._exit(0)\n")
    assert run_untrusted(forge) == "failed"
    steal = "import os\nnonce = os.read(3, 64)\nos.write(4, nonce)\nos._exit(0)\n"
    assert run_untrusted(steal) == "failed"
    # A correct program that also scribbles on the marker pipe does not pass either: the marker must be exact.
    assert run_untrusted("import os\nos.write(4, b'x')\nassert True") == "failed"


def test_throwaway_working_directory_is_fresh_each_run():
    prog = ("import os\nassert os.path.basename(os.getcwd()).startswith('flatlora-sandbox-')\n"
            "assert sorted(os.listdir('.')) == ['program.py'], os.listdir('.')\nopen('left-behind.txt', 'w').write('x')\n")
    assert run_untrusted(prog) == "passed"
    assert run_untrusted(prog) == "passed"  # the file of the first run is gone


@contained
def test_completion_runs_unprivileged_and_cannot_write_outside(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("intact")
    victim.chmod(0o666)
    tmp_path.chmod(0o777)
    prog = (f"import os\ntry:\n    open({str(victim)!r}, 'w').write('pwned')\nexcept OSError:\n    pass\n"
            "assert not os.access('/etc/passwd', os.W_OK)\n")
    if isolation() == "nobody":
        prog += "assert os.getuid() == os.geteuid() == 65534 and os.getgroups() in ([], [65534])\n"
    assert run_untrusted(prog) == "passed"
    assert victim.read_text() == "intact"


@contained
def test_setsid_grandchild_does_not_outlive_the_run():
    for ending, expected, timeout in [("", "passed", 10.0), ("while True: pass\n", "timeout", 2.0)]:
        token = f"{uuid.uuid4().int % 10**6}.{os.getpid()}"
        prog = (f"import subprocess\nsubprocess.Popen(['sleep', '{token}'], start_new_session=True)\n"
                f"import os\nif os.fork() == 0:\n    os.setsid()\n    os.execv('/bin/sleep', ['sleep', '{token}'])\n"
                "import time\ntime.sleep(0.5)\n" + ending)
        assert run_untrusted(prog, timeout=timeout) == expected
        time.sleep(0.2)
        assert _processes_with_token(token) == []


@contained
def test_evaluator_survives_kill_attempts():
    # Guard first: the attack below (kill -1 included) must only ever run inside its own PID namespace.
    assert run_untrusted("import os\nassert os.getpid() == 1") == "passed"
    me, parent = os.getpid(), os.getppid()
    prog = (f"import os, signal\nfor pid in ({me}, {parent}, 1, os.getppid()):\n    try:\n"
            "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\n"
            "try:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\nassert False\n")
    assert run_untrusted(prog) == "failed"
    assert os.getpid() == me and os.getppid() == parent  # still here, under the same parent


@contained
def test_process_count_is_limited_and_forks_are_reaped():
    prog = ("import os, time\nn = 0\ntry:\n    for _ in range(500):\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
            f"assert 0 < n <= {sandbox.MAX_PROCESSES}, n\n")
    assert run_untrusted(prog, timeout=20) == "passed"


def test_memory_is_limited():
    prog = "try:\n    x = bytearray(3 * 1024**3)\nexcept MemoryError:\n    pass\nelse:\n    raise SystemExit('allocated 3 GiB')\n"
    assert run_untrusted(prog) == "passed"


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


def test_an_interpreter_reached_through_tmp_still_runs(monkeypatch):
    # A CI checkout under /tmp puts the virtual environment there; the sandbox replaces /tmp with a tmpfs,
    # so it must resolve the interpreter before that.
    import shutil
    import sys
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(dir="/tmp"))
    try:
        (d / "python").symlink_to(os.path.realpath(sys.executable))
        monkeypatch.setattr(sys, "executable", str(d / "python"))
        assert run_untrusted("assert 1 + 1 == 2") == "passed"
        assert run_untrusted("assert 1 + 1 == 3") == "failed"
    finally:
        shutil.rmtree(d)
