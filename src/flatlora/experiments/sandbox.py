"""Run untrusted, model-generated Python (HumanEval completions) in a separate, limited process.

Never in-process: each program runs as `python -I -B file.py` in a fresh temporary working directory
(deleted afterwards), in its own session (the whole process group is killed on timeout), with CPU,
memory and file-size limits, a minimal environment whose proxies point nowhere, and — where the kernel
allows unprivileged user namespaces — no network at all (`unshare --net`).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile

MEMORY_BYTES = 2 * 1024**3
FILE_BYTES = 16 * 1024**2


@functools.lru_cache(maxsize=1)
def _no_network_prefix() -> tuple[str, ...]:
    """`unshare` arguments that drop the network, if this machine lets us create a network namespace."""
    exe = shutil.which("unshare")
    if exe is None:
        return ()
    for args in ((exe, "--net"), (exe, "--user", "--map-root-user", "--net")):
        try:
            if subprocess.run([*args, "true"], capture_output=True, timeout=5).returncode == 0:
                return args
        except (OSError, subprocess.TimeoutExpired):
            pass
    return ()


def network_isolated() -> bool:
    return bool(_no_network_prefix())


def _limits(cpu_seconds: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
        try:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
        except ValueError:
            pass
    return apply


def run_untrusted(program: str, timeout: float = 10.0) -> str:
    """Run `program`; returns 'passed' (exit 0), 'failed' (nonzero exit) or 'timeout'.

    Example:
        >>> run_untrusted("assert 1 + 1 == 2")
        'passed'
    """
    with tempfile.TemporaryDirectory(prefix="flatlora-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
        cmd = [*_no_network_prefix(), sys.executable, "-I", "-B", path]
        proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=_limits(int(timeout) + 1))
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            return "timeout"
        return "passed" if code == 0 else "failed"
