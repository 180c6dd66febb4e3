"""Runs triton_backend_cases.py: here when this process can use Triton (CUDA, or the interpreter chosen before
Triton was imported); otherwise in a fresh process with TRITON_INTERPRET=1 (see tests/kernels/test_kernels.py)."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).parent
_FRESH = "triton" not in sys.modules

if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" or _FRESH:
    from tests.core.triton_backend_cases import *  # noqa: F401,F403
else:

    def test_triton_backend_cases_under_the_triton_interpreter():
        pytest.importorskip("triton")
        env = dict(os.environ, TRITON_INTERPRET="1")
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            str(_HERE / "triton_backend_cases.py")],
                           cwd=_HERE.parent.parent, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
        for line in r.stdout.splitlines():  # the cases that ran passed; say which did not run, and why
            if line.startswith("SKIPPED"):
                warnings.warn(line)
