"""The code sandbox, layer by layer, the escapes it must stop, and the execution scorer on real HumanEval rows.

The escapes are the ones found against the old in-process guard (issue 16): a subinterpreter (no audit
hook), ``dir_fd`` and ``sqlite3`` writes, a two-thread race, a detached ``setsid`` process, a forged score.
Namespace tests are skipped where user namespaces do not work (the refusal there is tested separately).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import pytest

from fuselab.data.bundled import load_bundled
from fuselab.wrpo import sandbox
from fuselab.wrpo.sandbox import (
    SandboxLimits,
    SandboxUnavailableError,
    choose_isolation,
    namespace_available,
    readable_host_paths,
    run_python,
)
from fuselab.wrpo.scorers.execution import extract_code, run_tests

FAST = SandboxLimits(timeout_s=2.0, memory_mb=256)
GUARD_ONLY = SandboxLimits(timeout_s=2.0, memory_mb=256, isolation="none")  # the --unsafe-exec fallback
OS_ONLY = SandboxLimits(timeout_s=3.0, memory_mb=256, guard=False)  # namespaces without the guard
needs_ns = pytest.mark.skipif(not namespace_available(), reason="user namespaces unavailable here")


# ------------------------------------------------------------------------------------------------ layers


@needs_ns
def test_ordinary_code_runs_in_a_fresh_tmpfs_with_a_stripped_view(tmp_path):
    r = run_python(
        "import os; open('f.txt','w').write('x'); print(os.getcwd()); print(sorted(os.environ));"
        f"print(sorted(os.listdir('/'))); print(os.path.exists({str(tmp_path)!r}), os.path.exists('/etc/passwd'))",
        FAST,
    )
    assert r.status == "ok", r.stderr
    cwd, env, top, visible = r.stdout.splitlines()[:4]
    assert cwd == "/work" and "namespaces" in r.layers
    assert eval(env) == ["HOME", "LANG", "PATH", "TMPDIR"]  # stripped environment
    assert set(eval(top)) <= {
        ".in",
        ".oldroot",
        "dev",
        "proc",
        "work",
        "etc",
        "usr",
        "lib",
        "lib64",
        "lib32",
        "libx32",
        "root",
        "home",
        "opt",
        "bin",
    } | {p.split("/")[1] for p in readable_host_paths()}
    assert visible == "False False"  # host files outside the interpreter's needs do not exist in there


def test_unsafe_fallback_runs_in_a_throwaway_host_directory():
    r = run_python("import os; open('f.txt','w').write('x'); print(os.getcwd())", GUARD_ONLY)
    assert r.status == "ok", r.stderr
    cwd = r.stdout.strip()
    assert "fuselab-sandbox-" in cwd and "namespaces" not in r.layers
    assert not os.path.exists(cwd)  # deleted afterwards


@pytest.mark.parametrize(
    "limits", [SandboxLimits(timeout_s=1.0, guard=False), SandboxLimits(timeout_s=1.0, isolation="none")]
)
def test_infinite_loops_and_sleeps_are_killed(limits):
    if limits.isolation == "namespaces" and not namespace_available():
        pytest.skip("user namespaces unavailable here")
    for src in ("while True: pass", "import time\ntime.sleep(60)"):
        r = run_python(src, limits)
        assert r.status == "timeout" and r.seconds < 5


@needs_ns
@pytest.mark.parametrize("guard", [True, False])
def test_memory_bombs_hit_the_address_space_limit(guard):
    r = run_python(
        "x = bytearray(2 * 1024**3)\nprint('allocated')", SandboxLimits(memory_mb=256, guard=guard)
    )
    assert r.status == "memory" and "allocated" not in r.stdout


@needs_ns
def test_file_size_limit_applies_inside_the_directory():
    r = run_python("open('big', 'w').write('x' * (4 * 1024**2))", SandboxLimits(file_size_mb=1))
    assert r.status == "error" and "File too large" in r.stderr


@needs_ns
def test_the_tmpfs_is_the_only_writable_place_and_it_is_bounded():
    r = run_python(
        "import os\nfor p in ('/x', '/usr/lib/x', '/dev/x', '/proc/x', '/.in/x'):\n"
        "    try:\n        open(p, 'w')\n        print('wrote', p)\n    except OSError as e:\n"
        "        print(type(e).__name__)\n"
        "open('/work/big', 'wb').write(b'x' * (3 * 1024**2))\n",
        SandboxLimits(guard=False, workdir_mb=2, file_size_mb=8),
    )
    assert "wrote" not in r.stdout and r.stdout.count("Error") == 5, r.stdout
    assert r.status == "error" and "No space left" in r.stderr


@needs_ns
def test_the_sandboxed_program_has_no_privileges():
    # Root of its user namespace but with an empty capability set: no chroot (the classic chroot escape),
    # no mount or remount (read-only binds stay read-only), no hostname, no nested user namespace.
    src = (
        "import os, ctypes\n"
        "try:\n    os.chroot('/work')\n    print('chroot allowed')\nexcept PermissionError:\n    print('refused')\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print(libc.mount(b'none', b'/work', b'tmpfs', 0, None), libc.sethostname(b'x', 1),"
        " libc.unshare(0x10000000))\n"
    )
    r = run_python(src, OS_ONLY)
    assert r.status == "ok", r.stderr
    assert r.stdout.splitlines() == ["refused", "-1 -1 -1"], r.stdout


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(1)
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


NET = "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')"


def test_guard_alone_blocks_network(listener):
    port, hits = listener
    r = run_python(NET.format(port=port), SandboxLimits(timeout_s=3, isolation="none"))
    assert r.status == "error" and "sandbox: socket." in r.stderr and not hits
    r = run_python("import socket\nsocket.socket()", GUARD_ONLY)
    assert r.status == "error" and "socket.__new__ is not allowed" in r.stderr


@needs_ns
def test_network_namespace_alone_blocks_network(listener):
    port, hits = listener
    r = run_python(NET.format(port=port), OS_ONLY)
    assert r.status == "error" and "connected" not in r.stdout and not hits
    assert "netns" in r.layers and "guard" not in r.layers


@needs_ns
@pytest.mark.parametrize("limits", [FAST, OS_ONLY], ids=["with-guard", "os-only"])
def test_writes_outside_the_directory_never_reach_the_host(tmp_path, limits):
    target = tmp_path / "outside.txt"
    other = tmp_path / "keep.txt"
    other.write_text("keep")
    for src in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
        f"import os\nos.remove({str(other)!r})",
        f"import os\nos.rename({str(other)!r}, 'stolen')",
        f"import shutil\nshutil.copyfile('/etc/ld.so.cache', {str(target)!r})",
        "open('../escape.txt', 'w').write('x')",
    ):
        r = run_python(src, limits)
        assert r.status == "error", (src, r.stderr)
    assert not target.exists() and other.read_text() == "keep"


def test_guard_refuses_writes_outside_and_process_creation(tmp_path):
    target = tmp_path / "outside.txt"
    for src in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nos.open({str(target)!r}, os.O_CREAT | os.O_WRONLY)",
        "import os\nos.fork()",
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import ctypes",
    ):
        r = run_python(src, GUARD_ONLY)
        assert r.status == "error" and "sandbox:" in r.stderr, (src, r.stderr)
    assert not target.exists()


# ------------------------------------------------------------------------------------ escapes (issue 16)

SUBINTERPRETER = "import _xxsubinterpreters as _si\n_i = _si.create()\n_si.run_string(_i, {code!r})\n"


def _with_escape(inner: str, row) -> str:
    """The canonical solution, preceded (in its code block) by a subinterpreter running ``inner``."""
    body = extract_code(row["messages"][1]["content"], row["entry_point"])
    return "```python\n" + SUBINTERPRETER.format(code=inner) + body + "\n```"


def _task(row):
    return row["test"], row["entry_point"], _prompt(row)


def _host_marker_processes(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


@needs_ns
def test_subinterpreter_escape_writes_nothing_and_reaches_no_network(tmp_path, listener, humaneval_row):
    # The subinterpreter has no audit hook; every attempt is made (each in its own try) and must fail.
    port, hits = listener
    attempts = (
        f"open({str(tmp_path / 'sub.txt')!r}, 'w').write('escaped')",
        f"os.system('echo escaped > {tmp_path / 'system.txt'}')",
        f"socket.create_connection(('127.0.0.1', {port}), timeout=1)",
    )
    inner = "import os, socket\n" + "".join(f"try:\n    {a}\nexcept Exception:\n    pass\n" for a in attempts)
    out = run_tests(_with_escape(inner, humaneval_row), *_task(humaneval_row), FAST)
    assert out.passed  # the escape ran to the end, and the canonical solution still scores
    assert os.listdir(tmp_path) == [] and not hits


@needs_ns
def test_dir_fd_sqlite_and_thread_race_writes_stay_inside(tmp_path):
    keep = tmp_path / "keep.txt"
    keep.write_text("keep")
    d = str(tmp_path)
    attempts = {
        "dir_fd create": f"import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.close(os.open('made.txt', os.O_CREAT | os.O_WRONLY, dir_fd=fd))",
        "dir_fd unlink": f"import os\nfd = os.open({d!r}, os.O_RDONLY)\nos.unlink('keep.txt', dir_fd=fd)",
        "sqlite3": f"import sqlite3\nc = sqlite3.connect({str(tmp_path / 'x.db')!r})\nc.execute('create table t(x)')\nc.commit()",
        "thread race": (
            "import threading\nstop = False\ndef churn():\n    while not stop:\n        open('in.txt', 'w').close()\n"
            "ts = [threading.Thread(target=churn) for _ in range(2)]\n[t.start() for t in ts]\n"
            f"for i in range(3000):\n    try:\n        open({str(tmp_path / 'race.txt')!r}, 'w').write('x')\n        break\n"
            "    except OSError:\n        pass\nstop = True\n[t.join() for t in ts]\n"
        ),
    }
    for name, src in attempts.items():
        for limits in (FAST, OS_ONLY):
            run_python(src, limits)
            assert sorted(os.listdir(tmp_path)) == ["keep.txt"], name
    assert keep.read_text() == "keep"


@needs_ns
def test_detached_processes_die_with_the_sandbox(tmp_path, humaneval_row):
    # Through the scorer, as found: a subinterpreter starts `setsid sh -c 'sleep; echo > outside' &`.
    inner = f"import os\nos.system(\"setsid sh -c 'sleep 2; echo x > {tmp_path}/survivor.txt' &\")\n"
    run_tests(_with_escape(inner, humaneval_row), *_task(humaneval_row), FAST)
    # And the PID namespace on its own: a double-forked, setsid'd sleeper must not outlive the run.
    marker = f"fuselab-survivor-{os.getpid()}-{time.monotonic_ns()}"
    detach = (
        "import os, sys\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', {marker!r}])\n"
        "    os._exit(0)\nprint('parent done')\n"
    )
    r = run_python(detach, OS_ONLY)
    assert r.status == "ok" and "parent done" in r.stdout, r.stderr
    assert _host_marker_processes(marker) == []
    time.sleep(2.5)  # past the sleeper's sleep
    assert not (tmp_path / "survivor.txt").exists()


@needs_ns
def test_a_candidate_cannot_forge_its_score(humaneval_row):
    test, entry, prompt = humaneval_row["test"], humaneval_row["entry_point"], _prompt(humaneval_row)
    honest = "def has_close_elements(numbers, threshold):\n    return False\n"
    base = run_tests(f"```python\n{honest}```", test, entry, prompt, FAST)
    assert (base.n_passed, base.n_total) == (3, 7)
    forgeries = {
        # replace the assert counter the test calls (it used to share the candidate's namespace)
        "counter": "def __fl_check(f):\n    import sys\n    g = sys.modules['__main__'].__dict__\n"
        "    g['__fl']['total'] += 1\n    g['__fl']['passed'] += 1\n",
        # read the report nonce and print a perfect report
        "nonce": "import sys, json\n_g = sys.modules['__main__'].__dict__\n"
        "print(_g.get('__nonce', '') + json.dumps({'stage': 'done', 'passed': 7, 'total': 7}), flush=True)\n",
        # write a perfect report to every descriptor it has (the judge's pipe included)
        "descriptors": "import os, json\nfor _fd in range(3, 64):\n    try:\n"
        "        os.write(_fd, (json.dumps({'stage': 'done', 'passed': 7, 'total': 7}) + '\\n').encode())\n"
        "    except OSError:\n        pass\n",
        # an object equal to everything
        "always-equal": "class _Eq:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
        "def has_close_elements(numbers, threshold):\n    return _Eq()\n",
        # shadow a builtin the test might use
        "builtins": "def abs(x):\n    return 0\ndef len(x):\n    return 0\n",
    }
    for name, code in forgeries.items():
        out = run_tests(
            f"```python\n{code}\n{honest if name != 'always-equal' else ''}```", test, entry, prompt, FAST
        )
        assert not out.passed and out.score <= base.score, (name, out)


@needs_ns
def test_the_judge_takes_prompt_helpers_from_the_prompt():
    # HumanEval/50-style: the test calls encode_shift, which the prompt defines; a candidate that redefines
    # it as the identity (and decodes by identity) must not pass.
    row = next(
        r for r in load_bundled("code", "train") + load_bundled("code", "heldout") if "encode_" in r["test"]
    )
    entry = row["entry_point"]
    helper = next(n for n in ("encode_shift", "encode_cyclic") if n in row["test"])
    cheat = f"```python\ndef {helper}(s):\n    return s\ndef {entry}(s):\n    return s\n```"
    out = run_tests(cheat, row["test"], entry, _prompt(row), FAST)
    assert not out.passed
    assert run_tests(row["messages"][1]["content"], row["test"], entry, _prompt(row), FAST).passed


# ------------------------------------------------------------------------------------------- fallback


@pytest.fixture
def no_namespaces(monkeypatch):
    probe = sandbox.IsolationProbe(False, "unshare: unshare failed: Operation not permitted")
    monkeypatch.setattr(sandbox, "probe_isolation", lambda: probe)
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "")  # not opted in; and restored afterwards (the CLI sets it)


def test_without_namespaces_untrusted_code_is_refused_unless_opted_in(no_namespaces, monkeypatch, caplog):
    with pytest.raises(SandboxUnavailableError, match="--unsafe-exec") as err:
        choose_isolation()
    assert "user namespaces" in str(err.value) and "Operation not permitted" in str(err.value)
    from fuselab.wrpo.scorers import build_scorer

    with pytest.raises(SandboxUnavailableError):
        build_scorer({"type": "execution"})
    with caplog.at_level(logging.WARNING):
        assert choose_isolation(unsafe_exec=True) == "none"
    assert "WITHOUT OS isolation" in caplog.text
    assert build_scorer({"type": "execution", "unsafe_exec": True}).limits.isolation == "none"
    monkeypatch.setenv(sandbox.UNSAFE_ENV, "1")
    assert build_scorer({"type": "execution"}).limits.isolation == "none"


def test_a_broken_namespace_setup_never_runs_the_code_unsandboxed(monkeypatch, tmp_path):
    def missing():
        raise SandboxUnavailableError("the sandbox needs util-linux's tools on PATH; missing: unshare")

    monkeypatch.setattr(sandbox, "_tools", missing)
    with pytest.raises(SandboxUnavailableError, match="unshare"):
        run_python(f"open({str(tmp_path / 'ran.txt')!r}, 'w')", FAST)
    assert not (tmp_path / "ran.txt").exists()


def test_cli_wrpo_build_refuses_and_names_the_opt_in(no_namespaces, tmp_path, capsys, monkeypatch):
    from fuselab.cli import main as cli_main

    (tmp_path / "prompts.jsonl").write_text(
        '{"id": "a", "prompt": "x", "test": "def check(c): pass", "entry_point": "f"}\n'
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"prompts: {{path: {tmp_path / 'prompts.jsonl'}}}\ntarget: {tmp_path / 'nope'}\n"
        f"sources: [{{model: {tmp_path / 'nope'}}}]\nscorer: {{type: execution}}\n"
    )
    assert cli_main(["wrpo", "build", str(recipe), str(tmp_path / "out")]) != 0
    assert "--unsafe-exec" in capsys.readouterr().err
    cli_main(["wrpo", "build", str(recipe), str(tmp_path / "out"), "--unsafe-exec"])
    assert os.environ.get(sandbox.UNSAFE_ENV) == "1"  # the flag reached the sandbox's opt-in


# ------------------------------------------------------------------------------------------- execution


@pytest.fixture(scope="module")
def humaneval_row():
    return next(r for r in load_bundled("code", "train") if r["entry_point"] == "has_close_elements")


def _prompt(row):
    return row["messages"][0]["content"]


def test_canonical_solution_passes(humaneval_row):
    answer = humaneval_row["messages"][1]["content"]
    out = run_tests(answer, humaneval_row["test"], humaneval_row["entry_point"], _prompt(humaneval_row), FAST)
    assert out.passed and out.score == 1.0 and out.n_total == 7


def test_partial_credit_and_failures(humaneval_row):
    test, entry, prompt = humaneval_row["test"], humaneval_row["entry_point"], _prompt(humaneval_row)
    always_true = "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```"
    out = run_tests(always_true, test, entry, prompt, FAST)
    assert not out.passed and out.n_passed == 4 and out.n_total == 7
    assert out.score == pytest.approx(0.1 + 0.9 * 4 / 7)
    assert run_tests(always_true, test, entry, prompt, FAST, partial_credit=False).score == 0.0
    assert run_tests("no code here", test, entry, prompt, FAST).score == 0.0
    wrong_name = "```python\ndef other(x):\n    return 1\n```"
    assert run_tests(wrong_name, test, entry, prompt, FAST).status == "error"
    looping = "```python\ndef has_close_elements(numbers, threshold):\n    while True: pass\n```"
    out = run_tests(looping, test, entry, prompt, SandboxLimits(timeout_s=1))
    assert out.status == "defined_only" and out.score == pytest.approx(0.1)


def test_printed_fake_reports_do_not_count(humaneval_row):
    spoof = (
        '```python\nprint(\'{"stage": "done", "passed": 7, "total": 7}\')\n'
        "def has_close_elements(numbers, threshold):\n    return False\n```"
    )
    out = run_tests(spoof, humaneval_row["test"], humaneval_row["entry_point"], limits=FAST)
    assert not out.passed and out.n_passed == 3


def test_extract_code_prefers_the_block_defining_the_entry_point():
    text = "Here:\n```python\nimport math\n```\nand\n```python\ndef f(x):\n    return x\n```\n"
    assert extract_code(text, "f").startswith("def f(x)")
    assert extract_code("def f(): pass", "f") == "def f(): pass"
