"""Run untrusted Python (model-written code under test) in a constrained subprocess.

Layers, each of which ``tests/test_wrpo_sandbox.py`` exercises on its own:

1. **Throwaway working directory**: a fresh temp folder, deleted afterwards; ``HOME`` and ``TMPDIR`` point
   into it; the environment is stripped to ``PATH``, ``LANG`` and those two; Python runs isolated (``-I``:
   no ``PYTHON*`` variables, no user site, no script folder on ``sys.path``).
2. **Resource limits** (``setrlimit`` before exec): address space (``RLIMIT_AS``: memory bombs raise
   MemoryError), CPU seconds (``RLIMIT_CPU``: busy loops get SIGXCPU), file size (``RLIMIT_FSIZE``: also caps
   stdout/stderr, which go to files), and processes (``RLIMIT_NPROC``; *not effective for root*, which
   ignores it, so layer 4 is what stops forks there).
3. **Wall-clock timeout**: the child leads its own process group and the whole group gets SIGKILL when the
   time is up (this catches sleeping or blocked code that uses no CPU).
4. **In-process guard** (a ``sys.addaudithook`` hook installed before the untrusted code runs; hooks cannot be
   removed): refuses socket creation/connection/name lookup, process creation (fork, exec, spawn,
   subprocess, os.system), signals to other processes, ``ctypes`` (which could bypass the hook), and any write,
   create, delete, rename or permission change outside the working directory.
5. **Network namespace** (when ``unshare -rn`` works on the machine: an unprivileged user namespace with a
   private network namespace): the child has no network interfaces at all, so even code that got past the
   guard cannot reach the host or the internet. :func:`namespace_available` says whether it holds here.

What this is not: a security boundary against a determined attacker with a kernel exploit, or against code
that reads files (reads are allowed, as HumanEval tests need no secrets). Filesystem *writes* outside the
working directory are stopped by layer 4 only (no mount namespace).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

Status = Literal["ok", "error", "timeout", "memory"]

# Installed as the first thing the child runs. Self-contained: it is source text for the child.
GUARD_SOURCE = r"""
def __fuselab_install_guard():
    import os, sys
    root = os.path.realpath(os.getcwd())
    blocked = {
        "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname",
        "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg",
        "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
        "os.kill", "os.killpg", "pty.spawn", "os.startfile",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
    }
    blocked_imports = {"ctypes", "_ctypes", "_posixsubprocess", "cffi", "_cffi_backend"}
    path_events = {
        "os.remove": (0,), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,), "os.chown": (0,),
        "os.truncate": (0,), "os.utime": (0,), "os.rename": (0, 1), "os.link": (0, 1),
        "os.symlink": (0, 1), "shutil.rmtree": (0,), "shutil.move": (0, 1), "shutil.copyfile": (1,),
        "shutil.copytree": (1,), "os.chdir": (0,), "os.chroot": (0,), "os.mkfifo": (0,), "os.mknod": (0,),
        "os.setxattr": (0,), "os.removexattr": (0,),
    }
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fsdecode, sep = os.path.realpath, os.fsdecode, os.sep
    busy = [False]

    def inside(p):
        if p is None or isinstance(p, int):
            return True  # an already-open descriptor
        rp = realpath(fsdecode(p))
        return rp == root or rp.startswith(root + sep)

    def hook(event, args):
        if busy[0]:
            return
        if event in blocked:
            raise PermissionError("sandbox: " + event + " is not allowed")
        if event == "import" and args and args[0].split(".")[0] in blocked_imports:
            raise ImportError("sandbox: importing " + args[0] + " is not allowed")
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags
            )
            if writing:
                busy[0] = True
                try:
                    ok = inside(path)
                finally:
                    busy[0] = False
                if not ok:
                    raise PermissionError("sandbox: writing outside the working directory is not allowed")
        elif event in path_events:
            busy[0] = True
            try:
                ok = all(inside(args[i]) for i in path_events[event] if i < len(args))
            finally:
                busy[0] = False
            if not ok:
                raise PermissionError("sandbox: " + event + " outside the working directory is not allowed")

    sys.addaudithook(hook)


__fuselab_install_guard()
del __fuselab_install_guard
"""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    file_size_mb: int = 8
    max_processes: int = 1
    guard: bool = True  # layer 4 (tests switch it off to check the other layers alone)
    network_namespace: bool | None = None  # layer 5: None = when available


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    layers: tuple[str, ...] = field(default_factory=tuple)


@functools.lru_cache(maxsize=1)
def namespace_available() -> bool:
    """Whether ``unshare -rn`` (user + network namespace, no privileges needed) works on this machine."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        r = subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def _limits_preexec(limits: SandboxLimits):
    mem = limits.memory_mb * 1024 * 1024
    cpu = max(1, int(limits.timeout_s + 0.999))
    fsize = limits.file_size_mb * 1024 * 1024

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))

    return apply


def _read_capped(path: str, limit: int = 1 << 20) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_python(source: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run ``source`` as a Python program under the layers of this module; never raises for its failures.

    Status: ``ok`` (exit 0), ``timeout`` (wall clock or CPU limit), ``memory`` (MemoryError, reported by exit
    code 3 of the program or by Python's own message) or ``error`` (anything else).
    """
    limits = limits or SandboxLimits()
    use_ns = namespace_available() if limits.network_namespace is None else limits.network_namespace
    layers = ["workdir", "rlimits", "timeout"]
    workdir = tempfile.mkdtemp(prefix="fuselab-sandbox-")
    try:
        program = (GUARD_SOURCE if limits.guard else "") + "\n" + source
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        cmd = [sys.executable, "-I", "program.py"]
        if limits.guard:
            layers.append("guard")
        if use_ns:
            cmd = [shutil.which("unshare") or "unshare", "-rn", *cmd]
            layers.append("netns")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        start = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                cmd,
                cwd=workdir,
                env=env,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                start_new_session=True,
                preexec_fn=_limits_preexec(limits),
            )
            timed_out = False
            try:
                proc.communicate(stdin.encode(), timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - start
        rc = proc.returncode
        stdout, stderr = _read_capped(out_path), _read_capped(err_path)
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
            status: Status = "timeout"
        elif rc == 3 or "MemoryError" in stderr[-2000:]:
            status = "memory"
        elif rc == 0:
            status = "ok"
        else:
            status = "error"
        return SandboxResult(status, rc, stdout, stderr, seconds, tuple(layers))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
