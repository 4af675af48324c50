"""Outputs appear complete or not at all, one writer at a time, and never over an input.

Work is written into a hidden temporary folder next to the destination and renamed into place only when
everything succeeded, so an interrupted run never leaves a folder that looks finished. Around that:

* **One writer per output.** :func:`check_output_dir` (called before any expensive work) takes an exclusive
  ``flock`` on ``.NAME.fuselab-lock`` beside the output and holds it until the output is written (or the
  process ends): a second run to the same output fails at once, naming the first run's process. The kernel
  drops a ``flock`` when its process dies, so a crashed or killed run never leaves a lock that blocks.
* **``--force`` replaces only what fuselab wrote.** Every atomic output carries a stamp
  (``.fuselab-output.json``); older outputs are recognised by their ``fuselab_*.yaml``/``.json`` recipe
  file. Any other existing folder, the current folder or one of its parents, an input or a parent of an
  input is refused whatever the flags: issue 16 saw ``--force`` with ``OUT_DIR=.`` delete a working folder
  and ``OUT_DIR`` = the base model overwrite the input.
* **SIGTERM is an interrupt.** While an output is being written, SIGTERM raises :class:`Terminated` (a
  ``KeyboardInterrupt``), so the temporary folder is removed as for Ctrl-C.
* **Stale temporaries are removed.** Temporaries are named ``.NAME.tmp-PID-TAG``; once the lock is held,
  those of dead processes (from SIGKILL, power loss) are deleted before new work starts.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fuselab.utils.errors import OutputExistsError, OutputLockedError, OutputNotWritableError

STAMP = ".fuselab-output.json"
_LEGACY_STAMP = re.compile(r"fuselab_[a-z0-9_]+\.(json|yaml)")  # recipe files every stage already wrote
_TEMP = re.compile(r"\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{8}")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where it arrives so that cleanup runs as for Ctrl-C."""


# -- safety of the destination -------------------------------------------------------------------------


def written_by_fuselab(folder: Path) -> bool:
    """Whether ``folder`` carries fuselab's stamp (or, from before the stamp, a ``fuselab_*`` recipe file)."""
    if (folder / STAMP).is_file():
        return True
    return any(f.is_file() and _LEGACY_STAMP.fullmatch(f.name) for f in folder.iterdir())


def _refuse_unsafe(out_dir: Path, inputs: Iterable[str | Path]) -> None:
    """The current folder, its parents, inputs and their parents are never an output, with or without
    ``--force``: replacing them destroys what the run reads or where the user works."""
    real = out_dir.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise OutputExistsError(
            f"output folder {out_dir} is the current folder or one of its parents; replacing it would delete "
            "your files. Name a new folder, e.g. out/merged"
        )
    for inp in inputs:
        r = Path(inp).resolve()
        if real == r or real in r.parents:
            what = "is" if real == r else "contains"
            raise OutputExistsError(
                f"output folder {out_dir} {what} the input {inp}; writing there would replace the input. "
                "Choose an output folder outside every input"
            )


def check_output_dir(
    out_dir: Path, force: bool, *, inputs: Iterable[str | Path] = (), owned: bool = False
) -> None:
    """Refuse a destination that must not be written, then lock it; call before starting any work.

    An existing, non-empty folder needs ``force`` and must have been written by fuselab. The lock is held
    until :func:`atomic_output_dir` finishes the same output, :func:`release_output` is called or the
    process ends. ``owned``: the location is fuselab's own by construction (a folder of its model cache), so
    whatever is there may be replaced.
    """
    out_dir = Path(out_dir).absolute()
    _refuse_unsafe(out_dir, inputs)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"output path {out_dir} exists and is not a folder; choose another path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise OutputExistsError(
                f"output folder {out_dir} already exists; choose another path or pass --force to replace it"
            )
        if not owned and not written_by_fuselab(out_dir):
            raise OutputExistsError(
                f"output folder {out_dir} exists and was not written by fuselab (it has no {STAMP} or "
                "fuselab_*.yaml), so --force does not replace it; choose another folder, or remove it yourself"
            )
    lock_output(out_dir)


# -- locks ------------------------------------------------------------------------------------------------


@dataclass
class _Held:
    fd: int
    lock_file: Path
    claimed: bool  # a ``with output_lock`` owns it and releases it on exit


_HELD: dict[Path, _Held] = {}
_HELD_GUARD = threading.Lock()


def lock_file_for(out_dir: Path) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.fuselab-lock"


def _key(out_dir: Path) -> Path:
    return Path(out_dir).absolute().resolve()


def _is_secondary_rank() -> bool:
    """A distributed run's other ranks write through rank 0, which holds the lock for all of them."""
    return os.environ.get("RANK", "0") not in ("", "0")


def lock_output(out_dir: str | Path) -> None:
    """Take the exclusive lock on ``out_dir`` (a no-op if this process holds it already).

    Raises :class:`OutputLockedError` at once when another live process holds it.
    """
    if _is_secondary_rank():
        return
    out_dir = Path(out_dir).absolute()
    key = _key(out_dir)
    with _HELD_GUARD:
        if key in _HELD:
            return
        lock_file = lock_file_for(out_dir)
        try:
            out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputNotWritableError(
                f"cannot create the parent folder of {out_dir}: {err.strerror}; choose an output folder in a "
                "place you can write to"
            ) from None
        while True:
            try:
                fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputNotWritableError(
                    f"cannot write in {out_dir.parent} ({err.strerror}); choose an output folder in a place "
                    "you can write to"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
                os.close(fd)
                raise OutputLockedError(
                    f"another fuselab run is writing {out_dir} ({holder}); wait for it to finish or choose "
                    f"another output folder. The lock ({lock_file}) is released when that process ends"
                ) from None
            # A releasing holder unlinks the file after unlocking; if we locked such an orphan, retry.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock_file))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        os.pwrite(fd, f"pid {os.getpid()} started {started}: {' '.join(sys.argv[:3])}\n".encode(), 0)
        _HELD[key] = _Held(fd, lock_file, claimed=False)


def release_output(out_dir: str | Path) -> None:
    """Drop this process's lock on ``out_dir`` and remove the lock file (a no-op if not held)."""
    with _HELD_GUARD:
        held = _HELD.pop(_key(out_dir), None)
        if held is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(held.lock_file)  # unlink while locked: a waiter that opened it sees it is gone
        os.close(held.fd)


def release_all_outputs() -> None:
    """Drop every lock this process holds (the CLI calls it as a command ends)."""
    for key in list(_HELD):
        release_output(key)


@contextlib.contextmanager
def output_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold the lock on ``out_dir`` for the block; a lock taken earlier by :func:`check_output_dir` is
    taken over and released too, one held by an enclosing ``output_lock`` is left to it."""
    lock_output(out_dir)
    held = _HELD.get(_key(out_dir))
    mine = held is not None and not held.claimed
    if mine:
        assert held is not None
        held.claimed = True
    try:
        yield
    finally:
        if mine:
            release_output(out_dir)


# -- SIGTERM ----------------------------------------------------------------------------------------------


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"terminated by signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (cleanup runs).

    Only a default handler is replaced, and only from the main thread (the only place Python delivers
    signals); a handler someone else installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# -- temporaries ------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Delete ``.NAME.tmp-*`` / ``.NAME.old-*`` left beside ``out_dir`` by dead processes.

    Call with the output's lock held: then no other fuselab process is writing this output, and a temporary
    whose process is gone can only be debris (tens to hundreds of MB each).
    """
    removed = []
    prefix = f".{out_dir.name}"
    if not out_dir.parent.is_dir():
        return removed
    for p in out_dir.parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        m = _TEMP.fullmatch(p.name[len(prefix) :])
        if not m:
            continue
        pid = int(m.group(2)) if m.group(2) else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _stamp(folder: Path) -> None:
    from fuselab import __version__

    data = {
        "fuselab": __version__,
        "command": " ".join(["fuselab", *sys.argv[1:2]]),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    (folder / STAMP).write_text(json.dumps(data) + "\n", encoding="utf-8")


@contextlib.contextmanager
def atomic_output_dir(
    out_dir: str | Path, force: bool = False, *, inputs: Iterable[str | Path] = (), owned: bool = False
) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``out_dir``, on failure (SIGTERM included) it is
    deleted. The output is locked from the check to the end; stale temporaries of dead runs are removed."""
    out_dir = Path(out_dir).absolute()
    inputs = list(inputs)
    with output_lock(out_dir):
        check_output_dir(out_dir, force, inputs=inputs, owned=owned)
        remove_stale_temporaries(out_dir)
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
        tmp.mkdir()
        with sigterm_as_interrupt():
            try:
                yield tmp
                _stamp(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            old = None
            if out_dir.exists():
                old = out_dir.parent / f".{out_dir.name}.old-{tag}"
                os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
