"""Run untrusted, model-generated Python (HumanEval completions) in a contained, throw-away process tree.

Never in-process. Each program runs as `python -I -B` under a trusted launcher that, before any untrusted
code runs:

- enters new PID, network and mount namespaces (`unshare --pid --fork --kill-child --net --mount`): when
  the program's first process ends or is killed, the kernel kills every process it started, a `setsid`
  grandchild included; no network; nothing outside the namespace can be signalled or seen;
- mounts fresh, small tmpfs over /tmp, /var/tmp and /dev/shm, and works in a new directory of that /tmp
  (thrown away with the namespace);
- sets CPU-time, address-space, file-size, open-file, core and process-count limits (`setrlimit`);
- drops to the unprivileged user `nobody` (uid/gid 65534, no supplementary groups, no_new_privs) when the
  evaluator runs as root, so the program can write nowhere but its own tmpfs and cannot signal the
  evaluator. The interpreter is then the base installation of this Python, bound read-only into the
  private /tmp (standard library and the base site-packages, not the virtual environment's packages:
  HumanEval needs only the standard library).

Scoring never trusts the exit code. The evaluator draws a random 32-byte nonce per run and hands it to the
harness through a pipe; the harness reads it and closes that pipe *before* the program's code runs, then
writes the nonce to a second pipe only after the whole program (the problem's `check(...)` is its last
statement) has returned. A program that exits early (`os._exit(0)`, `SystemExit(0)`), raises, or writes
its own guess of the marker is scored 'failed'. The nonce lives only in the harness's local variables:
a completion written to dig it out of the interpreter's memory could forge a pass; no completion that
merely exits, prints or writes files can.

Levels (`isolation()`): 'nobody' (root: everything above), 'userns' (an unprivileged user with user
namespaces: the same, except that the program keeps the user's own rights to files outside /tmp),
'session' (neither: own session killed as a whole on timeout, limits, throw-away cwd; a `setsid`
grandchild can outlive the run). Running as a normal user, prefer a machine that allows user namespaces.
"""

from __future__ import annotations

import functools
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

MEMORY_BYTES = 2 * 1024**3
FILE_BYTES = 16 * 1024**2
TMPFS_BYTES = 64 * 1024**2
MAX_PROCESSES = 64   # per uid: the sandbox user's processes, all sandboxes together
OPEN_FILES = 256
NOBODY = 65534

# Runs as root (or userns root) inside the new namespaces, then becomes the harness: argv = [launcher,
# workdir parent, cpu seconds, drop to nobody (0/1), mount tmpfs (0/1), nonce fd, marker fd]; the program
# text arrives on stdin.
_LAUNCHER = r'''
import ctypes, fcntl, os, resource, sys
root, cpu, drop, mount = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
# The harness finds the pipes at fds 3 and 4: move them there (via high numbers, so that they cannot clash).
high = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 10) for fd in sys.argv[5:7]]
for fd in set(map(int, sys.argv[5:7])) | {3, 4}:
    try:
        os.close(fd)
    except OSError:
        pass
os.dup2(high[0], 3)
os.dup2(high[1], 4)
os.close(high[0])
os.close(high[1])
program = sys.stdin.buffer.read()
# Resolved before /tmp is replaced: a virtual environment under /tmp (a CI checkout) would vanish with it.
real_exe = os.path.realpath(sys.executable)
libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 16384, 1 << 18
if mount:
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise SystemExit(f"sandbox: cannot make mounts private (errno {ctypes.get_errno()})")
    for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(d) and libc.mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV,
                                           b"size=%d,mode=1777" % TMPFS) != 0:
            raise SystemExit(f"sandbox: cannot mount a tmpfs on {d.decode()} (errno {ctypes.get_errno()})")
work = os.path.join(root, "flatlora-sandbox-%d" % os.getpid())
os.mkdir(work, 0o700)
with open(os.path.join(work, "program.py"), "wb") as f:
    f.write(program)
if drop:
    os.chown(work, NOBODY, NOBODY)
for lim, v in ((resource.RLIMIT_CPU, cpu), (resource.RLIMIT_FSIZE, FILE_BYTES), (resource.RLIMIT_CORE, 0),
               (resource.RLIMIT_NOFILE, OPEN_FILES), (resource.RLIMIT_NPROC, MAX_PROCESSES)):
    resource.setrlimit(lim, (v, v))
try:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
except ValueError:
    pass
python, env = sys.executable, {"HOME": work, "TMPDIR": work}
if drop:
    # The interpreter may sit where nobody cannot reach it (pyenv under /root): bind its installation,
    # read-only, into the private /tmp. Its absolute RUNPATH then needs LD_LIBRARY_PATH.
    base, exe = sys.base_prefix, real_exe
    if not exe.startswith(base + os.sep):
        raise SystemExit(f"sandbox: interpreter {exe} is not under {base}")
    bind = "/tmp/.python"
    os.mkdir(bind, 0o755)
    MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
    if (libc.mount(base.encode(), bind.encode(), None, MS_BIND | MS_REC, None) != 0
            or libc.mount(None, bind.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None) != 0):
        raise SystemExit(f"sandbox: cannot bind {base} (errno {ctypes.get_errno()})")
    python = bind + exe[len(base):]
    env["LD_LIBRARY_PATH"] = os.path.join(bind, "lib")
os.chdir(work)
if drop:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    if os.getuid() != NOBODY or os.geteuid() != NOBODY:
        raise SystemExit("sandbox: could not drop to nobody")
PR_SET_NO_NEW_PRIVS = 38
libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
os.environ.update(env)
os.execv(python, [python, "-I", "-B", "-c", HARNESS, os.path.join(work, "program.py")])
'''

# The harness: reads the nonce and closes its pipe before the program runs; writes it only after the
# program returned. Everything is local to _run, so the program's globals do not hold it.
_HARNESS = r'''
def _run():
    import os, sys
    nonce = os.read(3, 64)
    os.close(3)
    path = sys.argv[1]
    with open(path, encoding="utf-8") as f:
        code = compile(f.read(), path, "exec")
    sys.argv = [path]
    exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    os.write(4, nonce)
_run()
'''


def _launcher_source() -> str:
    consts = (f"NOBODY, FILE_BYTES, OPEN_FILES, MAX_PROCESSES, MEMORY, TMPFS = {NOBODY}, {FILE_BYTES}, "
              f"{OPEN_FILES}, {MAX_PROCESSES}, {MEMORY_BYTES}, {TMPFS_BYTES}\nHARNESS = {_HARNESS!r}\n")
    return consts + _LAUNCHER


def _works(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@functools.lru_cache(maxsize=1)
def _namespace_prefix() -> tuple[tuple[str, ...], str]:
    """(command prefix, isolation level) for this machine; probed once."""
    exe = shutil.which("unshare")
    if exe is not None:
        base = (exe, "--pid", "--fork", "--kill-child", "--net", "--mount")
        if os.geteuid() == 0 and _works([*base, "true"]):
            return base, "nobody"
        user = (exe, "--user", "--map-root-user", *base[1:])
        if _works([*user, "true"]):
            return user, "userns"
    return (), "session"


def isolation() -> str:
    """'nobody', 'userns' or 'session': how contained programs are on this machine (see the module doc)."""
    return _namespace_prefix()[1]


def _read_available(fd: int) -> bytes:
    out = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
        if len(out) > 4096:  # the marker is 64 bytes; anything longer is not it
            break
    return out


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher's session; the namespace dies with its first process
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_untrusted(program: str, timeout: float = 10.0) -> str:
    """Run `program` contained; 'passed' only if it ran to its end, else 'failed' or 'timeout'.

    Example:
        >>> run_untrusted("assert 1 + 1 == 2")
        'passed'
        >>> run_untrusted("import os; os._exit(0)\\nassert False")
        'failed'
    """
    prefix, level = _namespace_prefix()
    nonce = secrets.token_hex(32).encode()
    nonce_r, nonce_w = os.pipe()
    marker_r, marker_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="flatlora-sandbox-") as tmp:
        # With namespaces the work directory is made inside the private /tmp; otherwise in `tmp`.
        root = "/tmp" if level != "session" else tmp
        if level == "session":
            os.chmod(tmp, 0o700)
        launcher = os.path.join(tmp, "launcher.py")
        with open(launcher, "w", encoding="utf-8") as f:
            f.write(_launcher_source())
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8",
               "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", "no_proxy": ""}
        drop, mount = ("1" if level == "nobody" else "0"), ("0" if level == "session" else "1")
        cmd = [*prefix, sys.executable, "-I", "-B", launcher, root, str(int(timeout) + 1), drop, mount,
               str(nonce_r), str(marker_w)]
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, pass_fds=(nonce_r, marker_w))
        os.close(nonce_r)
        os.close(marker_w)
        try:
            os.write(nonce_w, nonce)
            os.close(nonce_w)
            nonce_w = -1  # closed: the finally must not close a descriptor number reused meanwhile
            try:
                proc.stdin.write(program.encode("utf-8"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
            deadline = time.monotonic() + timeout
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
                return "timeout"
            if level == "session":
                _kill_tree(proc)  # stragglers of its process group
            marker = _read_available(marker_r)
        finally:
            for fd in (nonce_w, marker_r):
                if fd < 0:
                    continue
                try:
                    os.close(fd)
                except OSError:
                    pass
            if proc.poll() is None:
                _kill_tree(proc)
    return "passed" if marker == nonce else "failed"
