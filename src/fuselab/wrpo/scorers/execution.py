"""Score code responses by running the prompt's tests (HumanEval ``check(candidate)``) in the sandbox.

Score, stated once (binary pass/fail makes almost every small-model sample tie at 0, leaving no preference):

- 0.0 if no code can be extracted, it does not compile or run, or it does not define the entry point;
- 0.1 + 0.9 · passed/total when ``check`` runs to the end, where every ``assert`` executed counts once
  (asserts are rewritten so that a failing one is counted and the next still runs);
- 0.1 when ``check`` does not finish (timeout, memory limit, crash);
- with ``partial_credit: false``: 1.0 if every assert passed, else 0.0.

``passed`` (all asserts of a finished ``check`` held, and there was at least one) is what pass@1 counts.
The report from the child carries a per-run nonce read from stdin, so ordinary output of the code under test
cannot be mistaken for it (it is not hardened against code that inspects the harness; the sandbox protects
the host, not the score).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from fuselab.wrpo.sandbox import SandboxLimits, run_python

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


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


def prompt_imports(prompt_text: str) -> str:
    """Top-level import lines of the code in a prompt (HumanEval prompts import typing, math, ...)."""
    code = extract_code(prompt_text)
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


HARNESS = r"""
import json as __json, sys as __sys
__nonce = __sys.stdin.readline().strip()
__w = __sys.stdout.write
__fl = {"passed": 0, "total": 0}
def __report(**kw):
    __w(__nonce + __json.dumps(kw) + "\n"); __sys.stdout.flush()
def __fl_check(f):
    __fl["total"] += 1
    try:
        ok = bool(f())
    except MemoryError:
        ok = False
    except Exception:
        ok = False
    if ok:
        __fl["passed"] += 1
__ns = {"__name__": "__candidate__", "__fl_check": __fl_check}
try:
    exec(compile(CANDIDATE, "candidate.py", "exec"), __ns)
except MemoryError:
    __report(stage="candidate", error="MemoryError"); __sys.exit(3)
except BaseException as e:
    __report(stage="candidate", error=type(e).__name__); __sys.exit(1)
if not callable(__ns.get(ENTRY)):
    __report(stage="entry_point", error="not defined"); __sys.exit(1)
__report(stage="defined")
exec(compile(TEST, "test.py", "exec"), __ns)
__ns["check"](__ns[ENTRY])
__report(stage="done", passed=__fl["passed"], total=__fl["total"])
"""


@dataclass(frozen=True)
class ExecutionOutcome:
    score: float
    passed: bool
    status: str  # no_code | error | defined_only | done
    n_passed: int = 0
    n_total: int = 0


def run_tests(
    response: str,
    test_code: str,
    entry_point: str,
    prompt_text: str = "",
    limits: SandboxLimits | None = None,
    partial_credit: bool = True,
) -> ExecutionOutcome:
    """Run HumanEval-style tests against a response and score it by the rule of this module's docstring."""
    code = extract_code(response, entry_point)
    if not code.strip():
        return ExecutionOutcome(0.0, False, "no_code")
    candidate = (prompt_imports(prompt_text) + "\n\n" + code) if prompt_text else code
    try:
        test = rewrite_test(test_code)
    except SyntaxError as err:
        raise ValueError(f"the test code of {entry_point!r} does not parse: {err}") from None
    source = f"CANDIDATE = {candidate!r}\nTEST = {test!r}\nENTRY = {entry_point!r}\n" + HARNESS
    nonce = secrets.token_hex(16)
    result = run_python(source, limits, stdin=nonce + "\n")
    reports = [
        json.loads(line[len(nonce) :]) for line in result.stdout.splitlines() if line.startswith(nonce)
    ]
    stages = {r.get("stage"): r for r in reports}
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
