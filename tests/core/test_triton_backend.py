"""Runs triton_backend_cases.py here when this process can use Triton, else under the interpreter in a fresh
process (tests/triton_cases.py says why)."""

from pathlib import Path

from tests.triton_cases import run_in_a_fresh_interpreter, runnable_here

if runnable_here():
    from tests.core.triton_backend_cases import *  # noqa: F401,F403
else:

    def test_triton_backend_cases_under_the_triton_interpreter():
        run_in_a_fresh_interpreter(Path(__file__).parent / "triton_backend_cases.py")
