"""Score code responses by running the prompt's tests (HumanEval ``check(candidate)``) in the sandbox.

Score, stated once (binary pass/fail makes almost every small-model sample tie at 0, leaving no preference):

- 0.0 if no code can be extracted, it does not compile or run, or it does not define the entry point;
- 0.1 + 0.9 · passed/total when ``check`` runs to the end, where every ``assert`` executed counts once
  (asserts are rewritten so that a failing one is counted and the next still runs);
- 0.1 when ``check`` does not finish (timeout, memory limit, crash);
- with ``partial_credit: false``: 1.0 if every assert passed, else 0.0.

``passed`` (all asserts of a finished ``check`` held, and there was at least one) is what pass@1 counts.

**The verdict is out of the candidate's reach.** The candidate runs alone in the sandbox
(:mod:`fuselab.wrpo.sandbox`); the test code, the assert counter and the verdict live in a separate *judge*
process outside it (no shared memory, another PID namespace, nothing the candidate can signal or trace). The
judge calls the candidate's functions through a pipe: arguments go in and the return value comes back as
plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset, nothing else), so
the comparison runs on the judge's own objects and a returned object cannot override ``__eq__``. The score is
computed from what the judge reports on its own stdout, which the candidate cannot write. Helper functions
that a test borrows from the prompt (HumanEval's ``encode_cyclic``, ``poly``) are taken from the prompt's own
code where it runs, from the candidate otherwise; builtins are never the candidate's. The test code is
trusted input (it comes with the prompts, like a ``python`` scorer's function) and is not sandboxed.
"""

from __future__ import annotations

import ast
import builtins
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from fuselab.wrpo.sandbox import SandboxLimits, _limits_preexec, start_python

# Fences open at the start of a line: an instruction that mentions "```python" inline is not a block.
FENCE = re.compile(
    r"^[ \t]*```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.DOTALL | re.MULTILINE
)


def extract_code(response: str, entry_point: str | None = None) -> str:
    """The code of a response: the fenced block defining ``entry_point`` (else the first python/unlabelled
    block, else the longest), or the whole text when there is no fence."""
    blocks = [(lang.lower(), body) for lang, body in FENCE.findall(response)]
    if not blocks:
        return response
    if entry_point:
        pattern = re.compile(rf"^\s*(async\s+)?def\s+{re.escape(entry_point)}\s*\(", re.MULTILINE)
        for _, body in blocks:
            if pattern.search(body):
                return body
    for lang, body in blocks:
        if lang in ("python", "py", "python3", ""):
            return body
    return max((b for _, b in blocks), key=len)


def prompt_imports(prompt_text: str, entry_point: str | None = None) -> str:
    """Top-level import lines of the code in a prompt (HumanEval prompts import typing, math, ...)."""
    code = extract_code(prompt_text, entry_point)
    return "\n".join(
        line for line in code.splitlines() if re.match(r"^(import\s+\w|from\s+[\w.]+\s+import\s)", line)
    )


class _CountAsserts(ast.NodeTransformer):
    """``assert cond[, msg]`` -> ``__fl_check(lambda: cond)``: counted, and a failure does not stop check."""

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        call = ast.Call(
            func=ast.Name("__fl_check", ast.Load()),
            args=[ast.Lambda(args=ast.arguments([], [], None, [], [], None, []), body=node.test)],
            keywords=[],
        )
        return ast.copy_location(ast.Expr(call), node)


def rewrite_test(test_code: str) -> str:
    tree = _CountAsserts().visit(ast.parse(test_code))
    return ast.unparse(ast.fix_missing_locations(tree))


# Plain data across the pipe, both ways. JSON natives stand for themselves; every other value is a
# [tag, payload] list, so no bare JSON list is ever data. Self-contained: source text for both processes.
CODEC_SOURCE = r"""
import json as __json

def __fl_encode(x, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    if x is None or isinstance(x, (bool, str)):
        return bool(x) if isinstance(x, bool) else (None if x is None else str(x))
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return float(x)
    if isinstance(x, complex):
        return ["c", float(x.real), float(x.imag)]
    if isinstance(x, (bytes, bytearray)):
        return ["b", bytes(x).hex()]
    if isinstance(x, dict):
        return ["d", [[__fl_encode(k, depth + 1), __fl_encode(v, depth + 1)] for k, v in dict.items(x)]]
    for tag, kind in (("l", list), ("t", tuple), ("s", set), ("fs", frozenset)):
        if isinstance(x, kind):
            return [tag, [__fl_encode(v, depth + 1) for v in kind.__iter__(x)]]
    raise TypeError("unsupported value of type " + type(x).__name__ + " (only plain data crosses the sandbox)")

def __fl_decode(x, depth=0):
    if depth > 100:
        raise ValueError("value nested too deeply")
    if x is None or type(x) in (bool, int, float, str):
        return x
    if type(x) is not list or not x or type(x[0]) is not str:
        raise ValueError("malformed value")
    tag, rest = x[0], x[1:]
    if tag == "c":
        return complex(float(rest[0]), float(rest[1]))
    if tag == "b":
        return bytes.fromhex(str(rest[0]))
    items = rest[0]
    if type(items) is not list:
        raise ValueError("malformed value")
    if tag == "d":
        return {__fl_decode(k, depth + 1): __fl_decode(v, depth + 1) for k, v in items}
    kinds = {"l": list, "t": tuple, "s": set, "fs": frozenset}
    if tag not in kinds:
        raise ValueError("malformed value")
    return kinds[tag](__fl_decode(v, depth + 1) for v in items)
"""

# Runs in the sandbox (untrusted side: whatever it sends is treated as untrusted data).
CANDIDATE_RUNNER = r"""
import os as __os, sys as __sys
__rd, __wr = __os.fdopen(RFD, "rb"), __os.fdopen(WFD, "wb")
def __send(obj):
    __wr.write(__json.dumps(obj).encode() + b"\n"); __wr.flush()
__ns = {"__name__": "__candidate__"}
try:
    exec(compile(CANDIDATE, "candidate.py", "exec"), __ns)
except MemoryError:
    __send({"stage": "candidate", "error": "MemoryError"}); __sys.exit(3)
except BaseException as e:
    __send({"stage": "candidate", "error": type(e).__name__}); __sys.exit(1)
__send({"stage": "defined", "callables": [n for n in NAMES if callable(__ns.get(n))]})
for __line in __rd:
    __req = __json.loads(__line)
    try:
        __res = __ns[__req["name"]](*__fl_decode(__req["args"]), **__fl_decode(__req["kwargs"]))
        __send({"ok": __fl_encode(__res)})
    except MemoryError:
        __send({"raise": "MemoryError"})
    except Exception as e:
        __send({"raise": type(e).__name__})
"""

# The judge: trusted, outside the sandbox. Its verdict goes to its own stdout only.
JUDGE = r"""
import builtins, json, os, sys
_encode, _decode = __fl_encode, __fl_decode
_job = json.loads(sys.stdin.readline())
_verdict = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # the test's own prints go to stderr, never into the verdict
def _report(**kw):
    _verdict.write(json.dumps(kw) + "\n"); _verdict.flush()
_rd, _wr = os.fdopen(_job["rfd"], "rb"), os.fdopen(_job["wfd"], "wb")
MAX_LINE = 64 << 20
class _Gone(BaseException):
    pass
def _recv():
    line = _rd.readline(MAX_LINE + 1)
    if not line or len(line) > MAX_LINE:
        raise _Gone()
    try:
        msg = json.loads(line)
    except (ValueError, RecursionError):
        raise _Gone() from None
    if type(msg) is not dict:
        raise _Gone()
    return msg
class CandidateError(Exception):
    pass
class _Proxy:
    def __init__(self, name):
        self.__name__ = name
    def __call__(self, *args, **kwargs):
        req = {"name": self.__name__, "args": _encode(list(args)), "kwargs": _encode(kwargs)}
        try:
            _wr.write((json.dumps(req) + "\n").encode()); _wr.flush()
        except OSError:
            raise _Gone() from None
        msg = _recv()
        if "ok" in msg:
            try:
                return _decode(msg["ok"])
            except (ValueError, TypeError, IndexError, RecursionError):
                raise CandidateError("the candidate returned malformed data") from None
        kind = getattr(builtins, str(msg.get("raise")), None)
        if isinstance(kind, type) and issubclass(kind, Exception) and kind is not CandidateError:
            raise kind("raised by the candidate")
        raise CandidateError(str(msg.get("raise"))[:200])
_fl = {"passed": 0, "total": 0}
def __fl_check(f):
    _fl["total"] += 1
    try:
        ok = bool(f())
    except Exception:
        ok = False
    if ok:
        _fl["passed"] += 1
try:
    _first = _recv()
except _Gone:
    _report(stage="error"); sys.exit(0)
if _first.get("stage") == "candidate":
    _report(stage="candidate", error=str(_first.get("error"))[:100]); sys.exit(0)
_names = _first.get("callables") if _first.get("stage") == "defined" else None
if type(_names) is not list or _job["entry"] not in _names:
    _report(stage="entry_point", error="not defined"); sys.exit(0)
_report(stage="defined")
_ns = {"__name__": "__judge__", "__fl_check": __fl_check}
_prompt = {"__name__": "__prompt__"}
try:
    exec(compile(_job["prompt_code"], "prompt.py", "exec"), _prompt)
except BaseException:
    _prompt = {"__name__": "__prompt__"}
    for _line in _job["prompt_imports"].splitlines():
        try:
            exec(_line, _prompt)
        except BaseException:
            pass
_ns.update({k: v for k, v in _prompt.items() if not k.startswith("__")})
for _n in set(_names) & set(_job["names"]):
    if _n == _job["entry"] or _n not in _prompt or not callable(_prompt[_n]):
        _ns[_n] = _Proxy(_n)
try:
    exec(compile(_job["test"], "test.py", "exec"), _ns)
    _ns["check"](_Proxy(_job["entry"]))
except _Gone:
    _report(stage="gone"); sys.exit(0)
_report(stage="done", passed=_fl["passed"], total=_fl["total"])
"""


@dataclass(frozen=True)
class ExecutionOutcome:
    score: float
    passed: bool
    status: str  # no_code | error | defined_only | done
    n_passed: int = 0
    n_total: int = 0


def _wanted_names(test: str, entry_point: str) -> list[str]:
    """Names the test reads that the candidate may define: never a builtin, never ``check``."""
    names = {n.id for n in ast.walk(ast.parse(test)) if isinstance(n, ast.Name)}
    return sorted((names - set(dir(builtins)) - {"check", "candidate", "__fl_check"}) | {entry_point})


def run_tests(
    response: str,
    test_code: str,
    entry_point: str,
    prompt_text: str = "",
    limits: SandboxLimits | None = None,
    partial_credit: bool = True,
) -> ExecutionOutcome:
    """Run HumanEval-style tests against a response and score it by the rule of this module's docstring."""
    limits = limits or SandboxLimits()
    code = extract_code(response, entry_point)
    if not code.strip():
        return ExecutionOutcome(0.0, False, "no_code")
    # entry_point picks the prompt's code block (an instruction may mention ```python inline before it)
    imports = prompt_imports(prompt_text, entry_point) if prompt_text else ""
    candidate = (imports + "\n\n" + code) if prompt_text else code
    try:
        test = rewrite_test(test_code)
    except SyntaxError as err:
        raise ValueError(f"the test code of {entry_point!r} does not parse: {err}") from None
    names = _wanted_names(test, entry_point)
    c2j_r, c2j_w = os.pipe()
    j2c_r, j2c_w = os.pipe()
    source = (
        f"CANDIDATE = {candidate!r}\nNAMES = {names!r}\nRFD, WFD = {j2c_r}, {c2j_w}\n"
        + CODEC_SOURCE
        + CANDIDATE_RUNNER
    )
    judge = sandboxed = None
    try:
        sandboxed = start_python(source, limits, stdin=subprocess.DEVNULL, pass_fds=(j2c_r, c2j_w))
        judge = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", CODEC_SOURCE + JUDGE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(c2j_r, j2c_w),
            start_new_session=True,
            preexec_fn=_limits_preexec(limits, nproc=False),
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        )
    finally:
        for fd in (c2j_r, c2j_w, j2c_r, j2c_w):
            os.close(fd)
        if judge is None and sandboxed is not None:
            sandboxed.kill()
            sandboxed.finish()
    job = {
        "rfd": c2j_r,
        "wfd": j2c_w,
        "entry": entry_point,
        "names": names,
        "test": test,
        "prompt_code": extract_code(prompt_text, entry_point) if prompt_text else "",
        "prompt_imports": imports,
    }
    deadline = sandboxed.start + limits.timeout_s

    def expire() -> None:  # a timer, not communicate(timeout=...), which polls in steps of up to 50 ms
        judge.kill()
        sandboxed.kill()

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
    timer.start()
    try:
        out, _ = judge.communicate((json.dumps(job) + "\n").encode())
    finally:
        timer.cancel()
        sandboxed.kill()  # the verdict is in: PID 1 and everything it started die now
        sandboxed.finish(deadline=time.monotonic())
    stages = {}
    for line in out.decode("utf-8", errors="replace").splitlines():
        report = json.loads(line)
        stages[report["stage"]] = report
    if "done" in stages:
        n_passed, n_total = int(stages["done"]["passed"]), int(stages["done"]["total"])
        passed = n_total > 0 and n_passed == n_total
        if partial_credit:
            score = 0.1 + 0.9 * (n_passed / n_total if n_total else 0.0)
        else:
            score = 1.0 if passed else 0.0
        return ExecutionOutcome(score, passed, "done", n_passed, n_total)
    if "defined" in stages:
        return ExecutionOutcome(0.1 if partial_credit else 0.0, False, "defined_only")
    return ExecutionOutcome(0.0, False, "error")


def row_prompt_text(row: dict[str, Any]) -> str:
    msgs = row.get("messages") or row.get("prompt_messages") or []
    user = [m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if user:
        return str(user[-1])
    return str(row.get("prompt", ""))
