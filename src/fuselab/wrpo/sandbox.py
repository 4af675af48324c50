"""Run untrusted Python (model-written code under test) in an operating-system sandbox.

A guard inside the guarded interpreter cannot be made tight (a subinterpreter has no audit hook, a
``dir_fd`` or ``sqlite3`` write never names its path, two threads race a shared flag), so the isolation comes
from the kernel, set up with util-linux's ``unshare``, ``mount``, ``pivot_root`` and ``setpriv`` (present on
every Linux that has ``mount``; bubblewrap would do the same job but is rarely installed, and one tested
backend is better than two where one is untested). Layers, each exercised by ``tests/test_wrpo_sandbox.py``:

1. **Namespaces** (``isolation: namespaces``, the default): a new user namespace (the caller maps to root
   there, so nothing needs privileges), mount, PID, network, IPC, UTS and cgroup namespaces.

   - *Files*: the root is a fresh tmpfs holding read-only bind mounts of exactly what the interpreter needs
     (see :func:`readable_host_paths`: the interpreter binary, its standard library, ``libpython``, the
     system's shared-library folders, ``/etc/ld.so.cache``, ``setpriv``), ``/dev/null`` and ``/dev/urandom``,
     and a fresh procfs that shows only the sandbox's own processes. The root itself is read-only; the only
     writable place is a second, size-limited tmpfs at ``/work`` (the working directory, also ``HOME``
     and ``TMPDIR``; there is no ``/tmp``). The host root is unmounted after ``pivot_root``, so no other host path can be named at all.
   - *Processes*: the program is PID 1 of its own PID namespace. When it exits or is killed, the kernel
     kills every process left in the namespace, detached (``setsid``) ones included; ``unshare
     --kill-child`` ties PID 1 to the launcher, which the timeout kills.
   - *Privileges*: the program runs through ``setpriv`` with an empty capability bounding set and
     ``no_new_privs``: it cannot mount, remount read-only mounts writable, ``chroot`` or raise limits, and the
     namespace refuses nested user namespaces (``max_user_namespaces`` = 0).
   - *Network*: the network namespace has no interface but a downed loopback; nothing is reachable.
2. **Resource limits** (``setrlimit`` before exec): address space (``RLIMIT_AS``: memory bombs raise
   MemoryError), CPU seconds (``RLIMIT_CPU``), file size (``RLIMIT_FSIZE``: also caps stdout/stderr, which go
   to files), processes (``RLIMIT_NPROC``, set by the program's first line; *not effective when the caller is
   root*, which the kernel exempts, so there the PID namespace and the timeout bound a fork bomb) and the
   tmpfs' size and inode count.
3. **Wall-clock timeout**: the launcher leads its own process group, which gets SIGKILL when the time is up.
4. **In-process guard** (second layer only): an audit hook refusing sockets, process creation, ``ctypes``
   and writes outside the working directory, so ordinary mistakes fail with a clear message.

Where user namespaces are unavailable (disabled by ``sysctl``, AppArmor's
``restrict_unprivileged_userns``, some containers) :func:`choose_isolation` refuses to run untrusted code
unless the user opted in with ``--unsafe-exec`` (``FUSELAB_UNSAFE_EXEC=1``, or ``unsafe_exec: true`` on the
execution scorer); then only layers 2-4 hold, in a throwaway host folder. It never degrades silently.

What this is not: a defence against kernel exploits. The readable host paths listed above stay readable
(system libraries and the Python installation: software, no user data).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

from fuselab.utils.errors import FuselabError

log = logging.getLogger(__name__)

Status = Literal["ok", "error", "timeout", "memory"]
Isolation = Literal["namespaces", "none"]

UNSAFE_ENV = "FUSELAB_UNSAFE_EXEC"
SANDBOX_WORKDIR = "/work"  # the working directory inside the namespaces

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


class SandboxUnavailableError(FuselabError):
    """OS isolation is required for untrusted code but does not work on this machine."""


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    memory_mb: int = 512
    file_size_mb: int = 8
    workdir_mb: int = 64  # size of the writable tmpfs (namespaces only)
    max_processes: int = 1
    guard: bool = True  # layer 4 (tests switch it off to check the other layers alone)
    isolation: Isolation = "namespaces"  # "none" only after the user opted in (see choose_isolation)


@dataclass
class SandboxResult:
    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    layers: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------ host view


def _interpreter() -> str:
    """The real interpreter binary (outside any venv: the sandbox sees only the base installation)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


LIBRARY_DIRS = (
    "/lib",
    "/lib64",
    "/lib32",
    "/libx32",
    "/usr/lib",
    "/usr/lib64",
    "/usr/lib32",
    "/usr/libx32",
    "/usr/local/lib",
)


@functools.lru_cache(maxsize=1)
def _host_view() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(host paths bound read-only, (path, symlink target) pairs recreated), both sorted and deduplicated."""
    paths: list[str] = []
    links: list[tuple[str, str]] = []
    for d in LIBRARY_DIRS:
        if os.path.islink(d):
            links.append((d, os.readlink(d)))
        elif os.path.isdir(d):
            paths.append(d)
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix, "installed_base": sys.base_prefix}
    scheme = sysconfig.get_paths(vars=base)
    paths += [_interpreter(), scheme["stdlib"], scheme["platstdlib"], "/etc/ld.so.cache"]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
        if libdir and soname:
            paths.append(os.path.join(libdir, soname))
    with contextlib.suppress(SandboxUnavailableError):
        paths.append(_tools()["setpriv"])
    real = sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})
    kept: list[str] = []
    for p in real:  # sorted, so a folder comes before what it contains
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return tuple(kept), tuple(links)


def readable_host_paths() -> list[str]:
    """The host paths a sandboxed program can read (all read-only), besides ``/dev/null``, ``/dev/urandom``
    and its own procfs."""
    paths, links = _host_view()
    return [*paths, *(f"{p} -> {t}" for p, t in links)]


def _fstab_field(path: str) -> str:
    """A path as an fstab field (whitespace and backslashes octal-escaped, as fstab(5) requires)."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


def _setup_script(workdir: str, limits: SandboxLimits, argv: list[str]) -> str:
    """The shell script run as root of the new user namespace: build the view, pivot into it, drop every
    capability and exec ``argv``. ``set -e``: any failing step stops the run (never a partial sandbox).

    All mounts come from one fstab (``mount -a -T``): one process instead of one per mount, which is most of
    the set-up time."""
    q = shlex.quote
    tools = _tools()
    root = os.path.join(workdir, "root")
    paths, links = _host_view()
    ro = "bind,ro,nosuid,nodev"
    fstab: list[tuple[str, str, str, str]] = []
    dirs, files = {"/dev", "/.oldroot"}, ["/dev/null", "/dev/urandom"]
    for p in paths:
        if os.path.isdir(p):
            fstab.append((p, p, "none", ro + ",X-mount.mkdir"))
        else:
            dirs.add(os.path.dirname(p))
            files.append(p)
            fstab.append((p, p, "none", ro))
    for dev in ("/dev/null", "/dev/urandom"):
        fstab.append((dev, dev, "none", "bind"))
    fstab += [
        ("proc", "/proc", "proc", "nosuid,nodev,noexec,X-mount.mkdir"),
        (
            "fuselab-work",
            SANDBOX_WORKDIR,
            "tmpfs",
            f"mode=0777,size={limits.workdir_mb}m,nr_inodes=8192,nosuid,nodev,X-mount.mkdir",
        ),
        (os.path.join(workdir, "in"), "/.in", "none", ro + ",X-mount.mkdir"),
    ]
    # Symlinked library folders (merged /usr: /lib -> usr/lib) are bound again at the link's path: the same
    # files, without one more process per link.
    fstab[:0] = [(os.path.realpath(p), p, "none", ro + ",X-mount.mkdir") for p, _ in links]
    fstab_path = os.path.join(workdir, "fstab")
    with open(fstab_path, "w", encoding="utf-8") as f:
        for src, target, kind, options in fstab:
            f.write(f"{_fstab_field(src)} {_fstab_field(root + target)} {kind} {options} 0 0\n")
    lines = [
        "set -e",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
        f"R={q(root)}",
        f'{q(tools["mount"])} -t tmpfs -o mode=0755,size=1m,nr_inodes=2000 fuselab-root "$R"',
        "mkdir -p " + " ".join(f'"$R"{q(d)}' for d in sorted(dirs)),
        *(f': > "$R"{q(p)}' for p in files),
        f"{q(tools['mount'])} -a -T {q(fstab_path)}",
        'echo 0 > "$R/proc/sys/user/max_user_namespaces"',
        f'{q(tools["mount"])} -o remount,bind,ro "$R"',
        'cd "$R"',
        f"{q(tools['pivot_root'])} . .oldroot",
        f"{q('/.oldroot' + tools['umount'])} -l /.oldroot",
        f"cd {SANDBOX_WORKDIR}",
        "unset PWD OLDPWD",
        f"exec {q(tools['setpriv'])} --no-new-privs --inh-caps=-all --ambient-caps=-all --bounding-set=-all -- "
        + " ".join(q(a) for a in argv),
    ]
    return "\n".join(lines) + "\n"


TOOLS = ("unshare", "mount", "umount", "pivot_root", "setpriv", "sh")


@functools.lru_cache(maxsize=1)
def _tools() -> dict[str, str]:
    """Absolute real paths of the util-linux tools (and ``sh``) the set-up runs."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    found = {t: shutil.which(t, path=search) for t in TOOLS}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        raise SandboxUnavailableError(
            f"the sandbox needs util-linux's tools on PATH; missing: {', '.join(missing)} (install util-linux)"
        )
    return {t: os.path.realpath(p) for t, p in found.items() if p}


def _namespace_command(workdir: str, limits: SandboxLimits, argv: list[str]) -> list[str]:
    tools = _tools()
    flags = ["--user", "--map-root-user", "--mount", "--pid", "--fork", "--kill-child"]
    flags += ["--net", "--ipc", "--uts", "--cgroup"]
    return [tools["unshare"], *flags, "--", tools["sh"], "-c", _setup_script(workdir, limits, argv)]


# ----------------------------------------------------------------------------------------- isolation


@dataclass(frozen=True)
class IsolationProbe:
    available: bool
    detail: str  # why not, when not


@functools.lru_cache(maxsize=1)
def probe_isolation() -> IsolationProbe:
    """Whether the namespace sandbox works here: one real run of ``pass`` through it (cached per process)."""
    try:
        proc = start_python("pass", SandboxLimits(timeout_s=20, guard=False), stdin=subprocess.DEVNULL)
    except (SandboxUnavailableError, OSError) as err:
        return IsolationProbe(False, str(err))
    result = proc.finish()
    if result.status == "ok":
        return IsolationProbe(True, "")
    detail = result.stderr.strip().splitlines()[-1:] or [f"exit status {result.returncode}"]
    return IsolationProbe(False, detail[0])


def namespace_available() -> bool:
    """Whether untrusted code can run in the namespace sandbox on this machine."""
    return probe_isolation().available


def unsafe_exec_from_env() -> bool:
    return os.environ.get(UNSAFE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def choose_isolation(unsafe_exec: bool = False) -> Isolation:
    """``namespaces`` where they work; otherwise ``none`` only with the user's explicit opt-in (``unsafe_exec``
    or ``FUSELAB_UNSAFE_EXEC=1``), else :class:`SandboxUnavailableError`. Called before any expensive stage."""
    probe = probe_isolation()
    if probe.available:
        return "namespaces"
    if unsafe_exec or unsafe_exec_from_env():
        log.warning(
            "running generated code WITHOUT OS isolation (--unsafe-exec): only rlimits, the timeout and the "
            "in-process guard hold, which code can step around (%s)",
            probe.detail,
        )
        return "none"
    raise SandboxUnavailableError(
        "generated code must run in an OS sandbox, but user namespaces do not work here "
        f"(`unshare --user --map-root-user --mount --pid --net` failed: {probe.detail}). Enable unprivileged "
        "user namespaces (sysctl kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0; on "
        "Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0), or, only for code you trust, pass "
        f"--unsafe-exec (or set {UNSAFE_ENV}=1, or `unsafe_exec: true` on the execution scorer)"
    )


# ------------------------------------------------------------------------------------------- running


def _limits_preexec(limits: SandboxLimits, nproc: bool):
    mem = limits.memory_mb * 1024 * 1024
    cpu = max(1, int(limits.timeout_s + 0.999))
    fsize = limits.file_size_mb * 1024 * 1024

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc:
            with contextlib.suppress(ValueError, OSError):
                resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))

    return apply


def _prelude(limits: SandboxLimits) -> str:
    """RLIMIT_NPROC from inside: set before exec it would also stop the launcher's own forks."""
    n = limits.max_processes
    return (
        "import resource as __r\ntry:\n    __r.setrlimit(__r.RLIMIT_NPROC, "
        f"({n}, {n}))\nexcept (ValueError, OSError):\n    pass\ndel __r\n"
    )


def _read_capped(path: str, limit: int = 1 << 20) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return ""


class SandboxProcess:
    """A program started in the sandbox; :meth:`finish` waits (up to the timeout), kills and cleans up."""

    def __init__(self, source: str, limits: SandboxLimits, stdin: int | None, pass_fds: tuple[int, ...]):
        self.limits = limits
        self.layers = ["rlimits", "timeout"]
        self.workdir = tempfile.mkdtemp(prefix="fuselab-sandbox-")
        try:
            self._start(source, stdin, pass_fds)
        except BaseException:
            shutil.rmtree(self.workdir, ignore_errors=True)
            raise

    def _start(self, source: str, stdin: int | None, pass_fds: tuple[int, ...]) -> None:
        limits = self.limits
        program = _prelude(limits) + (GUARD_SOURCE if limits.guard else "") + "\n" + source
        os.mkdir(os.path.join(self.workdir, "in"))
        program_path = os.path.join(self.workdir, "in", "program.py")
        with open(program_path, "w", encoding="utf-8") as f:
            f.write(program)
        if limits.guard:
            self.layers.append("guard")
        if limits.isolation == "namespaces":
            os.mkdir(os.path.join(self.workdir, "root"))
            argv = [_interpreter(), "-I", "-S", "/.in/program.py"]
            cmd, cwd, home = _namespace_command(self.workdir, limits, argv), "/", SANDBOX_WORKDIR
            self.layers[:0] = ["namespaces", "netns", "pidns", "mountns"]
        elif limits.isolation == "none":
            cmd, cwd, home = [_interpreter(), "-I", "-S", program_path], self.workdir, self.workdir
            self.layers.insert(0, "workdir")
        else:
            raise ValueError(f"unknown sandbox isolation {limits.isolation!r}; use 'namespaces' or 'none'")
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": home}
        self.out_path = os.path.join(self.workdir, ".stdout")
        self.err_path = os.path.join(self.workdir, ".stderr")
        self.start = time.monotonic()
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(
                cmd,
                cwd=cwd,
                env=env,
                stdin=stdin,
                stdout=out,
                stderr=err,
                pass_fds=pass_fds,
                start_new_session=True,
                preexec_fn=_limits_preexec(limits, nproc=limits.isolation == "none"),
            )

    def kill(self) -> None:
        """SIGKILL the launcher's process group; in the namespaces this takes PID 1 and so everything."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def finish(self, stdin: bytes | None = None, deadline: float | None = None) -> SandboxResult:
        """Wait until the program exits or the time is up, kill what is left, return the result.

        The wait blocks and a timer kills at the deadline: ``Popen.wait(timeout)`` polls with sleeps of up
        to 50 ms, which would be most of the cost of a short run."""
        end = deadline if deadline is not None else self.start + self.limits.timeout_s
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            self.kill()

        timer = threading.Timer(max(0.0, end - time.monotonic()), expire)
        timer.start()
        try:
            self.proc.communicate(stdin)
        finally:
            timer.cancel()
        timed_out = expired.is_set()
        self.kill()
        self.proc.wait()
        seconds = time.monotonic() - self.start
        rc = self.proc.returncode
        stdout, stderr = _read_capped(self.out_path), _read_capped(self.err_path)
        shutil.rmtree(self.workdir, ignore_errors=True)
        if timed_out or rc in (-signal.SIGXCPU, -signal.SIGKILL):
            status: Status = "timeout"
        elif rc == 3 or "MemoryError" in stderr[-2000:]:
            status = "memory"
        elif rc == 0:
            status = "ok"
        else:
            status = "error"
        return SandboxResult(status, rc, stdout, stderr, seconds, tuple(self.layers))


def start_python(
    source: str,
    limits: SandboxLimits | None = None,
    *,
    stdin: int | None = subprocess.PIPE,
    pass_fds: tuple[int, ...] = (),
) -> SandboxProcess:
    """Start ``source`` under the layers of this module (``pass_fds`` stay open in it, same numbers)."""
    return SandboxProcess(source, limits or SandboxLimits(), stdin, pass_fds)


def run_python(source: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run ``source`` as a Python program under the layers of this module; never raises for its failures.

    Status: ``ok`` (exit 0), ``timeout`` (wall clock or CPU limit), ``memory`` (MemoryError, reported by exit
    code 3 of the program or by Python's own message) or ``error`` (anything else, a failed sandbox set-up
    included: its message is in ``stderr``).
    """
    return start_python(source, limits).finish(stdin.encode())
