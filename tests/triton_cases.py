"""Running a module of Triton test cases where Triton can run them. Triton fixes interpreted vs compiled when
its jit functions are defined, and other test modules (peft/bitsandbytes) import it first, so the
interpreter cannot be switched on later in the same process: without CUDA, and once Triton is imported
compiled, the cases run in a fresh process with TRITON_INTERPRET=1."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent


def runnable_here() -> bool:
    """True when this process can run the cases itself (CUDA, or the interpreter chosen before Triton loaded)."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" or "triton" not in sys.modules


def run_in_a_fresh_interpreter(cases: Path) -> None:
    """Run `cases` under TRITON_INTERPRET=1 in a new process; fail with its output; warn each case it skipped."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(cases)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    for line in r.stdout.splitlines():  # the cases that ran passed; say which did not run, and why
        if line.startswith("SKIPPED"):
            warnings.warn(line)
