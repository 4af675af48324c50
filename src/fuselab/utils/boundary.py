"""The CLI's one error boundary: low-level failures a user can act on, as one line naming the file and the fix.

Input errors are :class:`~fuselab.utils.errors.FuselabError` at their source. What is left are failures the
operating system or a library raises deep inside some stage (a full disk, a read-only folder, a file that is
not UTF-8, a corrupt safetensors file, malformed JSON): each stage would otherwise need its own handler, and
issue 16 found raw tracebacks for every one of them. :func:`explain` turns such an exception into the message
the CLI prints, or returns None for a genuine bug, whose traceback should be seen.
"""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path

from fuselab.utils.errors import FuselabError

# argparse destinations that name where a command writes, for errors whose exception carries no file name
_OUTPUT_ARGS = ("out_dir", "output", "out", "workdir")


def _where_written(args: argparse.Namespace | None) -> str:
    places = [str(Path(v).absolute()) for a in _OUTPUT_ARGS if isinstance(v := getattr(args, a, None), str)]
    return " or ".join(places) if places else "the output or work folder"


def _file_of(err: OSError) -> str | None:
    return str(err.filename) if err.filename else None


def read_text(path: str | Path) -> str:
    """A text file's content as UTF-8, or a :class:`FuselabError` naming the file and the first bad byte."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise not_utf8(path, err) from None


def not_utf8(path: str | Path, err: UnicodeDecodeError) -> FuselabError:
    line = err.object[: err.start].count(b"\n") + 1 if isinstance(err.object, bytes) else None
    at = f"line {line}, byte {err.start + 1}" if line else f"byte {err.start + 1}"
    return FuselabError(
        f"{path} is not UTF-8 text ({at}: {err.reason}); convert it, e.g. "
        f"`iconv -f latin1 -t utf-8 {path} > fixed{Path(path).suffix}`, and point the recipe at the result"
    )


def _out_of_space(full: bool, where: str) -> str:
    kind = "disk full" if full else "disk quota exceeded"
    return (
        f"{kind} while writing {where}; free space there (or point the output / --workdir / "
        "FUSELAB_CACHE at a larger disk) and rerun: finished work is kept and resumed"
    )


def explain(err: BaseException, args: argparse.Namespace | None = None) -> str | None:
    """The one-line message for ``err``, or None when it is not a failure a user can fix."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return _out_of_space(err.errno == errno.ENOSPC, _file_of(err) or _where_written(args))
    if isinstance(err, OSError) and err.errno == errno.EROFS:
        where = _file_of(err) or _where_written(args)
        return f"{where} is on a read-only file system; choose an output folder you can write to"
    if isinstance(err, PermissionError):
        where = _file_of(err) or _where_written(args)
        return f"permission denied for {where}; choose a place you can write to, or fix its permissions"
    if isinstance(err, UnicodeDecodeError):
        return (
            f"a file is not UTF-8 text ({err.reason} at byte {err.start + 1}); save the data files and "
            "recipe as UTF-8 (e.g. with `iconv -f latin1 -t utf-8`)"
        )
    if type(err).__name__ == "SafetensorError":
        # safetensors reports the OS error of a failed write inside its own message: a full disk while a
        # model is saved is not a corrupt input (seen in `make demo` on a full /tmp)
        text = str(err)
        full = f"os error {errno.ENOSPC}" in text or "No space left" in text
        if full or f"os error {errno.EDQUOT}" in text:
            return _out_of_space(full, f"a .safetensors file under {_where_written(args)} ({err})")
        if "while serializing" in text:
            return (
                f"writing a .safetensors file under {_where_written(args)} failed ({err}); check that the disk "
                "is writable and has room, then rerun"
            )
        return (
            f"a .safetensors file of the model is corrupt or truncated ({err}); re-download or re-export the "
            "model (`fuselab info MODEL` names the file)"
        )
    if isinstance(err, json.JSONDecodeError):
        return (
            f"malformed JSON ({err.msg} at line {err.lineno}, column {err.colno}); check the JSON files of "
            "the model folder (config.json, tokenizer_config.json) or the data files"
        )
    return None
